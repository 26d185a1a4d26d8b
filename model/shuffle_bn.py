"""Shuffling BN: keep batch statistics from leaking which key is the positive (the paper, 3.3).

``ddp``: the keys' inputs shuffled across a group of ranks (default: one node, so the gather's
cost does not grow with the number of nodes) and unshuffled after the key encoder. ``split``:
on one process, ``SplitBatchNorm2d`` computes BN statistics per sub-batch and the keys' batch is
permuted, so single-GPU runs are not silently worse. ``syncbn``: SyncBatchNorm across all ranks.
``none``: plain BN, for ablations and exact tests.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "SHUFFLE_MODES",
    "SplitBatchNorm2d",
    "gather",
    "batch_shuffle_ddp",
    "batch_unshuffle_ddp",
    "shuffle_group",
    "batch_shuffle_local",
    "batch_unshuffle_local",
]

SHUFFLE_MODES = ("ddp", "split", "syncbn", "none")


def _split_moments(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of each (sub-batch, channel) of ``xs`` (S, N/S, C, H, W), in float32 or wider.

    One reduction over the whole batch for float32 input (Welford, as BatchNorm's own
    kernel); for half-precision input two reductions straight into float32 outputs
    (on a GPU each casts as it loads, with no float32 copy of the activations).
    """
    dims = (1, 3, 4)
    if xs.dtype in (torch.float32, torch.float64):
        var, mean = torch.var_mean(xs, dims, correction=0)
        return mean, var
    mean = torch.mean(xs, dims, dtype=torch.float32)
    var = torch.var(xs, dims, correction=0, out=torch.empty_like(mean))
    return mean, var


class _SplitBatchNorm(torch.autograd.Function):
    """Training-mode batch norm with statistics per contiguous sub-batch, as whole-batch kernels.

    Forward: the moments of every sub-batch in one reduction, then one fused
    multiply-add (``x * scale + shift`` with per sub-batch and channel factors) into
    an output laid out like the input. Backward: BatchNorm's gradient formula per
    sub-batch, from two reductions and two multiply-adds. Arithmetic is in float32
    for half-precision inputs (as BatchNorm's kernels do); outputs take the input's
    dtype and memory format. Running statistics are updated in place, as
    ``F.batch_norm`` does.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        running_mean,
        running_var,
        num_splits: int,
        momentum: float,
        eps: float,
    ):
        n, c, h, w = x.shape
        xs = x.view(num_splits, n // num_splits, c, h, w)
        with torch.autocast(x.device.type, enabled=False):
            mean, var = _split_moments(xs)
            invstd = torch.rsqrt(var + eps)
            scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
            shift = (
                -mean * scale
                if bias is None
                else torch.addcmul(bias.to(scale.dtype), mean, scale, value=-1)
            )
            y = torch.empty_like(x)  # the input's memory format: channels-last stays channels-last
            torch.addcmul(
                shift[:, None, :, None, None],
                xs,
                scale[:, None, :, None, None],
                out=y.view(xs.shape),
            )
            if running_mean is not None:
                # The average of what F.batch_norm would leave in per-sub-batch copies:
                # biased variance normalises, unbiased variance enters the running estimate.
                count = xs[0].numel() // c
                running_mean.lerp_(mean.mean(0).to(running_mean.dtype), momentum)
                running_var.lerp_(
                    (var.mean(0) * (count / (count - 1))).to(running_var.dtype), momentum
                )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.num_splits = num_splits
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, mean, invstd = ctx.saved_tensors
        n, c, h, w = x.shape
        s = ctx.num_splits
        xs, gs = x.view(s, n // s, c, h, w), grad_y.view(s, n // s, c, h, w)
        count = xs[0].numel() // c
        dims = (1, 3, 4)
        with torch.autocast(x.device.type, enabled=False):
            sum_dy = gs.sum(dims, dtype=mean.dtype)
            if x.dtype in (torch.float32, torch.float64):
                sum_dy_xmu = torch.addcmul(
                    (gs * xs).sum(dims, dtype=mean.dtype), mean, sum_dy, value=-1
                )
            else:
                # Centre on the mean rounded to the input's dtype first: the products of
                # half-precision values then keep their precision without cancellation.
                centre = mean.to(x.dtype)
                sum_dy_xmu = torch.addcmul(
                    (gs * (xs - centre[:, None, :, None, None])).sum(dims, dtype=mean.dtype),
                    centre.to(mean.dtype) - mean,
                    sum_dy,
                )
            dy_xhat = sum_dy_xmu * invstd  # per sub-batch: the sum of grad * normalised input
            grad_x = grad_weight = grad_bias = None
            if ctx.needs_input_grad[0]:
                # BatchNorm's gradient per sub-batch, as grad * k1 + x * k2 + k3:
                # k1 (grad - sum(grad) / count - x_hat * sum(grad * x_hat) / count).
                k1 = invstd if weight is None else invstd * weight.to(invstd.dtype)
                k2 = (k1 * dy_xhat).mul_(invstd).mul_(-1.0 / count)
                k3 = torch.addcmul((k1 * sum_dy).mul_(-1.0 / count), k2, mean, value=-1)
                grad_x = torch.empty_like(x)
                out = grad_x.view(xs.shape)
                # The small terms first, then the large one, so a half-precision result is rounded once at the end.
                torch.addcmul(k3[:, None, :, None, None], xs, k2[:, None, :, None, None], out=out)
                out.addcmul_(gs, k1[:, None, :, None, None])
            if weight is not None and ctx.needs_input_grad[1]:
                grad_weight = dy_xhat.sum(0).to(weight.dtype)
            if weight is not None and ctx.needs_input_grad[2]:
                grad_bias = sum_dy.sum(0).to(weight.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are computed per sub-batch of ``num_splits``.

    The sub-batches are contiguous slices along the batch (``x.chunk(num_splits)``),
    each normalised with its own mean and biased variance, exactly as ``num_splits``
    ``F.batch_norm`` calls would; the running statistics are updated with the average
    of the sub-batches' statistics (unbiased variance), as ``num_splits`` GPUs with
    their own BN would, on average, leave them. All sub-batches are computed at once
    over a view of the batch (no Python loop per layer, no copies), in NCHW or
    channels-last alike. In eval mode it is a plain BatchNorm2d.
    """

    def __init__(self, num_features: int, num_splits: int = 8, **kwargs):
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"num_splits must be at least 1, got {num_splits}")
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        self._check_input_dim(x)
        if x.shape[0] % self.num_splits:
            raise ValueError(
                f"split BN: batch of {x.shape[0]} is not divisible by num_splits={self.num_splits}"
            )
        if x.shape[0] // self.num_splits * x.shape[2] * x.shape[3] < 2:
            raise ValueError(
                f"split BN: a sub-batch of {x.shape[0] // self.num_splits} sample(s) of "
                f"{x.shape[2]}x{x.shape[3]} has a single value per channel"
            )
        momentum = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            # momentum=None is BatchNorm's cumulative average (one host read, as nn.BatchNorm2d does).
            momentum = (
                self.momentum
                if self.momentum is not None
                else 1.0 / float(self.num_batches_tracked)
            )
        return _SplitBatchNorm.apply(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.num_splits,
            momentum,
            self.eps,
        )

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
def batch_shuffle_ddp(
    x: torch.Tensor, group: Optional[dist.ProcessGroup] = None
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
def batch_unshuffle_ddp(
    x: torch.Tensor, idx_unshuffle: torch.Tensor, group: Optional[dist.ProcessGroup] = None
) -> torch.Tensor:
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
