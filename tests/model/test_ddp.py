"""MoCo under DDP: identical queues, true shuffles, exact unshuffles; with gloo on the CPU, with NCCL on two GPUs."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from moco_dali.model.moco import MoCo
from moco_dali.model.shuffle_bn import batch_shuffle_ddp, batch_unshuffle_ddp, gather
from tests.conftest import forked_ranks
from tests.model.tiny import TinyEncoder


def _all_equal(tensor: torch.Tensor) -> bool:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return all(torch.equal(parts[0], p) for p in parts)


def _worker(
    rank: int,
    world: int,
    init_file: str,
    group_size,
    failures,
    backend: str = "gloo",
    shuffle: str = "auto",
) -> None:
    os.environ.pop("LOCAL_WORLD_SIZE", None)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # identical initial weights on every rank
        model = MoCo(
            TinyEncoder, dim=16, K=30, m=0.9, shuffle=shuffle, shuffle_group_size=group_size
        ).to(device)
        assert model.shuffle == ("ddp" if shuffle == "auto" else shuffle)
        # The queue and the key encoder are kept in sync by the algorithm itself; a
        # buffer broadcast would hide a disagreement.
        ddp = DistributedDataParallel(
            model, device_ids=[rank] if device.type == "cuda" else None, broadcast_buffers=False
        )
        optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1)
        data = torch.Generator().manual_seed(100 + rank)  # every rank sees its own images

        def images(n: int = 4) -> torch.Tensor:
            return torch.randn(n, 3, 8, 8, generator=data).to(device)

        for _ in range(4):
            x_q, x_k = images(), images()
            logits, labels = ddp(x_q, x_k)
            optimizer.zero_grad()
            F.cross_entropy(logits, labels).backward()
            optimizer.step()
            assert _all_equal(model.queue.queue), "queues differ across ranks"
            assert _all_equal(model.queue.queue_ptr)
            assert int(model.queue.queue_ptr) == (4 * world * (_ + 1)) % 30
        for p in model.encoder_k.parameters():
            assert _all_equal(p.detach()), "key encoders differ across ranks"
        if model.shuffle != "ddp":
            return

        group = model._group
        group_ranks = (
            dist.get_process_group_ranks(group) if group is not None else list(range(world))
        )
        x = (torch.arange(5.0, device=device) + 5 * rank).view(5, 1)
        shuffled, idx_unshuffle = batch_shuffle_ddp(x, group)
        everything = gather(shuffled, group).view(-1).sort().values
        expected = torch.cat([torch.arange(5.0, device=device) + 5 * r for r in group_ranks])
        assert torch.equal(everything, expected), (
            "the shuffle is not a permutation of the group's samples"
        )
        assert torch.equal(batch_unshuffle_ddp(shuffled, idx_unshuffle, group), x)

        # BN running statistics are per rank (each normalised its own shuffled share);
        # take rank 0's everywhere, then eval-mode BN is the same function on every
        # rank and per sample, so the shuffled path must give exactly the plain keys.
        for buffer in model.encoder_k.buffers():
            dist.broadcast(buffer, src=0)
        model.encoder_k.eval()
        x_k = images()
        torch.testing.assert_close(model._keys(x_k), F.normalize(model.encoder_k(x_k), dim=1))
    except Exception as exc:  # report to the parent, which asserts
        failures.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise
    finally:
        dist.destroy_process_group()


def _spawn(world: int, *args) -> None:
    failures = mp.get_context("forkserver").SimpleQueue()  # the ranks' context (forked_ranks)
    try:
        forked_ranks(_worker, (world, args[0], args[1], failures, *args[2:]), world)
    except Exception:
        messages = []
        while not failures.empty():
            messages.append(failures.get())
        pytest.fail("; ".join(messages) or "a rank failed")


@pytest.mark.parametrize("world, group_size", [(3, None), (4, 2)])
def test_ddp_queues_agree_and_shuffle_is_exact(tmp_path, world, group_size):
    _spawn(world, str(tmp_path / "init"), group_size)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("shuffle", ["auto", "syncbn"])
def test_nccl_on_two_gpus_queues_agree_and_shuffle_is_exact(tmp_path, shuffle):
    # The same assertions over NCCL, one process per GPU, with the shuffle across GPUs
    # (auto: ddp) or SyncBatchNorm (which runs on GPUs only).
    _spawn(2, str(tmp_path / "init"), None, "nccl", shuffle)
