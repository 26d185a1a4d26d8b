"""One MoCo training step and what it is made of (model, optimizer, AMP), shared by the engine and moco-bench.

So that ``moco-bench step`` and ``e2e`` time the very step ``moco-train`` runs, not a
copy of it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.nn import functional as F

from ..model.encoders import resnet
from ..model.moco import MoCo
from .config import Config
from .optim import make_optimizer

__all__ = [
    "AMP_DTYPES",
    "QUEUE_DTYPES",
    "amp_dtype",
    "views_dtype",
    "build_model",
    "build_optimizer",
    "forward_loss",
    "backward_step",
]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
"""``run.amp`` (besides "auto") -> the autocast dtype."""
QUEUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""``model.queue_dtype`` -> the queue's storage dtype."""


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``amp`` (``run.amp``: auto, bf16, fp16, none) on ``device``; None: no autocast."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    return AMP_DTYPES[amp]


def views_dtype(dtype: str, amp: Optional[torch.dtype]) -> str:
    """The views' dtype ``data.dtype`` asks for: float16 or float32, or with "auto" float16 under AMP."""
    if dtype != "auto":
        return dtype
    return "float16" if amp is not None else "float32"


def build_model(config: Config, device: torch.device, momentum_impl: str = "auto") -> MoCo:
    """The MoCo model ``config`` describes, on ``device``; seeded by the caller."""
    m = config.model
    queue_dtype = QUEUE_DTYPES[m.queue_dtype]
    model = MoCo(
        resnet(m.arch, small_stem=m.small_stem),
        dim=m.dim,
        K=m.K,
        m=m.m,
        T=m.T,
        mlp=m.mlp,
        queue_dtype=queue_dtype,
        shuffle=m.shuffle,
        num_splits=m.num_splits,
        shuffle_group_size=m.shuffle_group_size or None,
        symmetric=m.symmetric,
        momentum_impl=momentum_impl,
    ).to(device)
    return model.to(memory_format=torch.channels_last) if config.run.channels_last else model


def build_optimizer(
    config: Config, model: MoCo, device: torch.device, fast: bool = True
) -> torch.optim.Optimizer:
    """``optim.name`` over the query encoder, at the rate scaled to the global batch."""
    o = config.optim
    optimizer = make_optimizer(
        o.name,
        model.encoder_q.parameters(),
        lr=o.lr_per_256 * config.data.batch_size / 256,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        device=device,
        trust_coefficient=o.trust_coefficient,
        fast=fast,
    )
    if o.momentum:
        # Zero momentum buffers give the first step's arithmetic (buffer = gradient), and
        # a first step skipped on the device must not leave the fused kernel's
        # uninitialised buffers behind.
        for group in optimizer.param_groups:
            for p in group["params"]:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format
                )
    return optimizer


def forward_loss(
    net: torch.nn.Module, view_q: torch.Tensor, view_k: torch.Tensor, dtype: Optional[torch.dtype]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MoCo's forward (momentum update, keys, logits, enqueue) under autocast; the loss in float32."""
    with torch.autocast(
        view_q.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
    ):
        logits, labels = net(view_q, view_k)
    return F.cross_entropy(logits, labels), logits, labels


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    # Fused SGD and LARS read ``found_inf`` and skip the update in their kernels.
    return bool(optimizer.defaults.get("fused")) or getattr(optimizer, "supports_found_inf", False)


def backward_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    skip_nonfinite: bool = True,
) -> Optional[torch.Tensor]:
    """Gradients of ``loss`` and one optimizer step, skipped if any gradient is not finite.

    Returns the non-finite flag as a 0-d bool tensor on the device, the same on every
    rank. Without a gradient scaler the test is on the gradients after DDP's
    all-reduce, so every rank takes the same decision (a non-finite loss on one rank
    makes every rank's gradients non-finite), and with a fused optimizer it is applied
    on the device: no host sync in the step. With fp16 the gradient scaler skips the
    step on its own overflow test, and its overflows are its normal back-off, not a
    failure: the flag is then the loss's own finiteness, made the same on every rank by
    a one-element all-reduce on the device. ``skip_nonfinite=False`` is the reference
    code's plain step (no test; returns None).
    """
    scaler.scale(loss).backward()
    if not skip_nonfinite:
        scaler.step(optimizer)
        scaler.update()
        return None
    if scaler.is_enabled():
        bad = ~torch.isfinite(loss.detach())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = bad.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = flag.bool()
        scaler.step(optimizer)
        scaler.update()
        return bad
    grads = [
        p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
    ]
    bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
    if _skips_on_device(optimizer):
        optimizer.found_inf = bad.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bad.item():  # an optimizer without a device-side skip pays one sync
        optimizer.step()
    scaler.update()
    return bad
