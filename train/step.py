"""One MoCo training step and what it is made of (model, optimizer, AMP), built from the tree.

The engine and ``moco-bench`` (step, e2e) both run these, so the bench times the very step
``moco-train`` runs. A builder that refuses a value names its key: the model and the optimizer
are built once, for real; only when that fails are they tried again, key by key, on PyTorch's
meta device to find which value the refusal is about.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F

from ..common.options import OptionError, name_fault
from ..model.encoders import resnet
from ..model.moco import MoCo
from .config import Config, ConfigError, ModelConfig, OptimConfig
from .optim import make_optimizer
from .schedule import learning_rates, momenta

__all__ = [
    "AMP_DTYPES",
    "QUEUE_DTYPES",
    "amp_dtype",
    "views_dtype",
    "build_model",
    "build_optimizer",
    "schedules",
    "compile_encoders",
    "forward_loss",
    "backward_step",
    "NonFinite",
]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
"""``run.amp`` (besides "auto", config.AMP_NAMES) -> the autocast dtype."""
QUEUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""``model.queue_dtype`` (config.QUEUE_DTYPE_NAMES) -> the queue's storage dtype."""


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``run.amp`` (auto, bf16, fp16, none) on ``device``; None: no autocast."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    return AMP_DTYPES[amp]


def views_dtype(dtype: str, amp: Optional[torch.dtype]) -> str:
    """The views' dtype ``data.dtype`` asks for: float16 or float32, or with "auto" float16 under AMP."""
    if dtype != "auto":
        return dtype
    return "float16" if amp is not None else "float32"


def _moco(m: ModelConfig, momentum_impl: str) -> MoCo:
    return MoCo(
        resnet(m.arch, small_stem=m.small_stem),
        dim=m.dim,
        K=m.K,
        m=m.m,
        T=m.T,
        mlp=m.mlp,
        queue_dtype=QUEUE_DTYPES[m.queue_dtype],
        shuffle=m.shuffle,
        num_splits=m.num_splits,
        shuffle_group_size=m.shuffle_group_size or None,
        symmetric=m.symmetric,
        momentum_impl=momentum_impl,
    )


def _model_fault(m: ModelConfig, error: BaseException) -> ConfigError:
    """The key a refused model is refused for, found by building it again on the meta device."""
    given = {f.name: (f"model.{f.name}", getattr(m, f.name)) for f in dataclasses.fields(m)}
    given.pop("momentum_schedule")
    if dist.is_initialized() and m.shuffle in ("auto", "ddp", "syncbn"):
        # These modes make process groups, a collective every rank must join; tried on this
        # rank alone they would wait for ever (config.check holds their rules).
        given["shuffle"] = ("model.shuffle", "none")

    def make(**fields):
        trial = ModelConfig(**{"arch": "resnet18", "shuffle": "none", **fields})
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "zero-element tensors": refused just after
            return _moco(trial, "auto")

    try:
        name_fault(make, given)
    except OptionError as named:
        return ConfigError(str(named))
    # Every value passes alone on the meta device: the machine cannot hold the model.
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return ConfigError(
        f"model.K {m.K} and model.dim {m.dim}: the model and its queue do not fit in this "
        f"machine's memory ({first[:160]})"
    )


def build_model(config: Config, device: torch.device, momentum_impl: str = "auto") -> MoCo:
    """The MoCo model ``config.model`` describes, on ``device``; seeded by the caller.

    Raises ``ConfigError`` naming the key a refused value is set by.
    """
    # Built on the CPU, where the weights are drawn, then moved: the same initial weights
    # whatever the device (a meta model, for checks, is made on the meta device outright).
    where = torch.device("meta") if device.type == "meta" else contextlib.nullcontext()
    try:
        with where:
            model = _moco(config.model, momentum_impl)
        model = model.to(device)
    except (ValueError, RuntimeError, OverflowError, MemoryError) as error:
        raise _model_fault(config.model, error) from None
    if config.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.flatten_parameters()  # last: a move would give the parameters storage of their own
    return model


def build_optimizer(
    config: Config, model: MoCo, device: torch.device, fast: bool = True
) -> torch.optim.Optimizer:
    """``optim.name`` over the query encoder, at the rate scaled to the global batch.

    Raises ``ConfigError`` naming the key a refused value is set by.
    """
    o = config.optim
    scale = config.data.batch_size / 256
    names = ("name", "lr_per_256", "momentum", "weight_decay", "trust_coefficient")

    def make(params, base: OptimConfig, **fields):
        f = {**{n: getattr(base, n) for n in names}, **fields}
        return make_optimizer(
            f["name"],
            params,
            lr=f["lr_per_256"] * scale,
            momentum=f["momentum"],
            weight_decay=f["weight_decay"],
            device=device,
            trust_coefficient=f["trust_coefficient"],
            fast=fast,
        )

    try:
        optimizer = make(model.encoder_q.parameters(), o)
    except (ValueError, RuntimeError) as error:
        # Each value alone on the defaults of its optimizer, to name the one refused.
        tiny, base = [torch.nn.Parameter(torch.zeros(2, 2))], OptimConfig(name=o.name)
        _named(lambda **f: make(tiny, base, **f), {n: (f"optim.{n}", getattr(o, n)) for n in names})
        raise ConfigError(f"optim: {error}") from None
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


def _named(make, given: dict):
    """``name_fault``, its refusal as the training configuration's error."""
    try:
        return name_fault(make, given)
    except OptionError as error:
        raise ConfigError(str(error)) from None


def compile_encoders(model: MoCo, config: Config) -> MoCo:
    """``run.compile``: both encoders compiled in place (``nn.Module.compile``), so their state
    dicts keep the eager names and checkpoints of compiled and eager runs load into each other.

    Shapes are fixed in training (whole batches, one view size), so each encoder compiles once
    for training and once for the key encoder's no-grad use; what follows reuses those graphs.
    """
    r = config.run
    if r.compile:
        for encoder in (model.encoder_q, model.encoder_k):
            encoder.compile(mode=r.compile_mode, backend=r.compile_backend, dynamic=False)
    return model


def schedules(
    config: Config, steps_per_epoch: int, epoch_at_step: Optional[np.ndarray] = None
) -> tuple[np.ndarray, np.ndarray]:
    """The learning rate and the key encoder's momentum at every step of the run, computed once
    (their names were checked with the tree); over ``epoch_at_step`` (the fractional epoch of
    each step) when a change of world size moved the epochs' ends."""
    o, m, epochs = config.optim, config.model, config.run.epochs
    base = o.lr_per_256 * config.data.batch_size / 256
    rates = learning_rates(
        base, steps_per_epoch, epochs, o.schedule, o.milestones, o.warmup_epochs, epoch_at_step
    )
    if epoch_at_step is None:
        return rates, momenta(m.m, steps_per_epoch * epochs, m.momentum_schedule)
    return rates, momenta(m.m, len(rates), m.momentum_schedule, epoch_at_step / epochs)


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


class NonFinite:
    """The steps skipped for non-finite gradients, counted on the device: the current streak, the
    total, and the first step a streak reached ``limit``. ``record`` costs no host sync; ``read``
    is the one sync, made at the logging and checkpoint cadence."""

    def __init__(self, limit: int, device: torch.device, skipped: int = 0):
        self.limit = limit
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped = torch.full((), skipped, dtype=torch.int64, device=device)
        self.stopped_at = torch.full((), -1, dtype=torch.int64, device=device)

    def record(self, bad: Optional[torch.Tensor], step: int) -> None:
        """Count step ``step``'s flag (a 0-d bool tensor on the device; None: no check made)."""
        if bad is None:
            return
        b = bad.to(torch.int64)
        self.streak.add_(1).mul_(b)  # one more in a row, or back to 0
        self.skipped.add_(b)
        reached = (self.streak >= self.limit) & (self.stopped_at < 0)
        self.stopped_at.copy_(torch.where(reached, step, self.stopped_at))

    def read(self) -> tuple[int, int, int]:
        """``(streak, skipped, stopped_at)`` on the host (stopped_at -1: no streak reached the
        limit)."""
        values = torch.stack([self.streak, self.skipped, self.stopped_at]).tolist()
        return values[0], values[1], values[2]
