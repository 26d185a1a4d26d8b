"""Shuffling BN: keep batch statistics from leaking which key is the positive.

With BatchNorm computed over the batch that holds both a query and its key, the
model can cheat the pretext task through the statistics (the paper, section 3.3).
Three cures, chosen explicitly by ``ShuffleMode``:

* ``ddp``: the keys' inputs are gathered from a group of ranks, permuted, split back,
  encoded with per-rank BN, and the features unshuffled. The group defaults to the
  ranks of one node, so the gather's cost does not grow with the number of nodes.
* ``split``: one process emulates several GPUs: both encoders use
  ``SplitBatchNorm2d``, which computes BN statistics per sub-batch, and the keys'
  batch is permuted before the key encoder, so a query and its key rarely share a
  sub-batch (single-GPU runs are not silently worse than multi-GPU ones).
* ``syncbn``: SyncBatchNorm across all ranks, no shuffling (the statistics span
  the global batch, which dilutes the leak).
* ``none``: plain per-process BN and no shuffle, for ablations and exact tests.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

__all__ = ["SHUFFLE_MODES", "SplitBatchNorm2d", "gather", "batch_shuffle_ddp", "batch_unshuffle_ddp",
           "shuffle_group", "batch_shuffle_local", "batch_unshuffle_local"]

SHUFFLE_MODES = ("ddp", "split", "syncbn", "none")


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are computed per sub-batch of ``num_splits``.

    Running statistics are updated with the average of the sub-batches' statistics,
    as ``num_splits`` GPUs with their own BN would, on average, leave them. In eval
    mode it is a plain BatchNorm2d. Works with channels-last inputs (the split is
    along the batch dimension, no reshape).
    """

    def __init__(self, num_features: int, num_splits: int = 8, **kwargs):
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"num_splits must be at least 1, got {num_splits}")
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        if x.shape[0] % self.num_splits:
            raise ValueError(f"split BN: batch of {x.shape[0]} is not divisible by num_splits={self.num_splits}")
        momentum = 0.1 if self.momentum is None else self.momentum
        outputs, means, variances = [], [], []
        for chunk in x.chunk(self.num_splits):
            # Per-split copies of the running stats let F.batch_norm do the fused
            # update; their average is the update of the average statistics.
            mean, var = self.running_mean.clone(), self.running_var.clone()
            outputs.append(F.batch_norm(chunk, mean, var, self.weight, self.bias, True, momentum, self.eps))
            means.append(mean)
            variances.append(var)
        with torch.no_grad():
            self.running_mean.copy_(torch.stack(means).mean(0))
            self.running_var.copy_(torch.stack(variances).mean(0))
            self.num_batches_tracked.add_(1)
        return torch.cat(outputs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_splits={self.num_splits}"


# ----------------------------------------------------------------------- local

@torch.no_grad()
def batch_shuffle_local(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Permute a batch on one process; return it and the index that undoes it."""
    permutation = torch.randperm(x.shape[0], device=x.device)
    return x[permutation], torch.argsort(permutation)


@torch.no_grad()
def batch_unshuffle_local(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    return x[idx_unshuffle]


# ----------------------------------------------------------------------- distributed

@torch.no_grad()
def gather(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Concatenate ``x`` from every rank of ``group`` (no gradient), rank order."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


@torch.no_grad()
def batch_shuffle_ddp(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle a batch across the ranks of ``group``; return this rank's share and the unshuffle index.

    The permutation is drawn on the group's first rank and broadcast, so every rank
    of the group agrees on it.
    """
    world = dist.get_world_size(group)
    x_all = gather(x, group)
    permutation = torch.randperm(x_all.shape[0], device=x.device)
    source = dist.get_process_group_ranks(group)[0] if group is not None else 0
    dist.broadcast(permutation, src=source, group=group)
    idx_unshuffle = torch.argsort(permutation)
    mine = permutation.view(world, -1)[dist.get_rank(group)]
    shuffled = x_all[mine]
    if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
        shuffled = shuffled.contiguous(memory_format=torch.channels_last)
    return shuffled, idx_unshuffle


@torch.no_grad()
def batch_unshuffle_ddp(x: torch.Tensor, idx_unshuffle: torch.Tensor,
                        group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Undo ``batch_shuffle_ddp`` on the encoded keys."""
    world = dist.get_world_size(group)
    x_all = gather(x, group)
    return x_all[idx_unshuffle.view(world, -1)[dist.get_rank(group)]]


def shuffle_group(group_size: Optional[int] = None) -> Optional[dist.ProcessGroup]:
    """The process group this rank shuffles within: consecutive blocks of ``group_size`` ranks.

    ``None`` means the ranks of one node (torchrun's LOCAL_WORLD_SIZE); a size equal
    to the world size means all ranks. Every rank must call this, in the same order,
    since creating groups is collective.
    """
    world = dist.get_world_size()
    size = group_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if size < 1 or world % size:
        raise ValueError(f"shuffle group size {size} must divide the world size {world}")
    if size == world:
        return None
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= dist.get_rank() < start + size:
            mine = group
    return mine
