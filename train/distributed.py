"""Distributed set-up from torchrun's environment (NCCL on GPUs, gloo on CPUs, one process per GPU),
which GPU DALI decodes on, gathering rows of every rank's share, and work rank 0 does for all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "Dist",
    "setup",
    "teardown",
    "dali_device_id",
    "gather_rows",
    "world_size",
    "on_main",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto", timeout_s: float = 1800) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), or run alone.

    ``timeout_s`` is how long a collective (all-reduce, gather, barrier) waits for the
    slowest rank before the run fails, set explicitly rather than left to the
    backend's default (10 minutes for NCCL).
    """
    cuda = torch.cuda.is_available() and device != "cpu"
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    target = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(target)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            device_id=target if cuda else None,
            timeout=timedelta(seconds=timeout_s),
        )
    return Dist(rank, world, local_rank, target)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def dali_device_id(device: torch.device) -> Optional[int]:
    """The GPU DALI decodes on for a torch device: None on the CPU, else the device's index.

    The one rule training and evaluation share: ``torch.device("cuda")`` has no index,
    and passing its ``None`` on would silently send DALI down its CPU path; it means
    the current CUDA device.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``tensor``, concatenated in rank order; ranks may hold different numbers of rows."""
    world = world_size()
    if world == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    rows = [int(c.item()) for c in counts]
    padded = tensor.new_zeros((max(rows), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, rows)])


def on_main(ranks: Dist, work: Callable[[], T]) -> Optional[T]:
    """``work()`` on rank 0 alone (None elsewhere); an error it raises is raised on every rank.

    For what only rank 0 may do at start-up (check and lock ``run.out``): when it fails, every
    rank must stop with the same line, for a rank left running would wait in its next collective
    for a rank 0 that has gone. One broadcast of the error (or of None).
    """
    result, error = None, None
    if ranks.main:
        try:
            result = work()
        except Exception as caught:  # handed to every rank, then raised
            error = caught
    if ranks.world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error
    return result
