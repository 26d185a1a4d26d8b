"""The momentum (EMA) update of the key encoder: theta_k <- m * theta_k + (1 - m) * theta_q.

Parameters only, never buffers: the paper updates the key encoder's weights by
momentum, while its BatchNorm running statistics are its own (computed on the keys'
batches), as in the reference code. The update runs as a few multi-tensor kernels
over all parameters at once, never as a Python loop over ~160 tensors (ResNet-50),
which on a GPU costs one or two kernel launches per tensor.

Implementations, chosen in one place (``momentum_update_``):

* ``foreach_lerp`` (default): ``torch._foreach_lerp_`` is one fused read-modify-write
  per tensor group: it reads theta_k and theta_q and writes theta_k once, the
  fewest bytes any form can move.
* ``foreach``: ``_foreach_mul_`` then ``_foreach_add_``, for torch builds without
  ``_foreach_lerp_``; it passes over theta_k twice.
* ``apex``: apex's ``multi_tensor_axpby`` when apex is importable (never required).
* ``loop``: the reference per-parameter formula, kept for tests and the benchmark.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

__all__ = [
    "IMPLEMENTATIONS",
    "momentum_update_",
    "momentum_at",
    "available_implementations",
    "resolve_implementation",
]


def _params(module_or_params) -> list[torch.Tensor]:
    if isinstance(module_or_params, torch.nn.Module):
        return [p.data for p in module_or_params.parameters()]
    return [p.data if isinstance(p, torch.nn.Parameter) else p for p in module_or_params]


@torch.no_grad()
def _foreach_lerp(key: Sequence[torch.Tensor], query: Sequence[torch.Tensor], m: float) -> None:
    torch._foreach_lerp_(list(key), list(query), 1.0 - m)


@torch.no_grad()
def _foreach(key: Sequence[torch.Tensor], query: Sequence[torch.Tensor], m: float) -> None:
    torch._foreach_mul_(list(key), m)
    torch._foreach_add_(list(key), list(query), alpha=1.0 - m)


@torch.no_grad()
def _loop(key: Sequence[torch.Tensor], query: Sequence[torch.Tensor], m: float) -> None:
    for k, q in zip(key, query):
        k.mul_(m).add_(q, alpha=1.0 - m)


def _apex(key: Sequence[torch.Tensor], query: Sequence[torch.Tensor], m: float) -> None:
    import amp_C
    from apex.multi_tensor_apply import multi_tensor_applier  # only when importable

    overflow = torch.zeros(1, dtype=torch.int, device=key[0].device)
    with torch.no_grad():
        # axpby: out = a * x + b * y, written in place into the key tensors.
        multi_tensor_applier(
            amp_C.multi_tensor_axpby, overflow, [list(key), list(query), list(key)], m, 1.0 - m, -1
        )


IMPLEMENTATIONS: dict[str, Callable] = {
    "foreach_lerp": _foreach_lerp,
    "foreach": _foreach,
    "loop": _loop,
    "apex": _apex,
}


def available_implementations() -> list[str]:
    names = ["loop", "foreach"]
    if hasattr(torch, "_foreach_lerp_"):
        names.append("foreach_lerp")
    try:
        import amp_C  # noqa: F401
        from apex.multi_tensor_apply import multi_tensor_applier  # noqa: F401

        names.append("apex")
    except ImportError:
        pass
    return names


def resolve_implementation(implementation: str) -> str:
    """``"auto"`` as the implementation it stands for: ``foreach_lerp`` where torch has it, else ``foreach``."""
    if implementation == "auto":
        return "foreach_lerp" if hasattr(torch, "_foreach_lerp_") else "foreach"
    return implementation


def momentum_update_(key_encoder, query_encoder, m: float, implementation: str = "auto") -> None:
    """Update ``key_encoder``'s parameters in place towards ``query_encoder``'s.

    Args:
        key_encoder, query_encoder: modules (or parameter lists) of identical layout.
        m: the momentum, in [0, 1]; 1 leaves the key encoder unchanged.
        implementation: one of ``IMPLEMENTATIONS`` or ``"auto"`` (``foreach_lerp``
            where torch has it, else ``foreach``).
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {m}")
    key, query = _params(key_encoder), _params(query_encoder)
    if len(key) != len(query):
        raise ValueError(f"key encoder has {len(key)} parameters, query encoder {len(query)}")
    implementation = resolve_implementation(implementation)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown momentum implementation {implementation!r}; choose from {sorted(IMPLEMENTATIONS)}"
        )
    IMPLEMENTATIONS[implementation](key, query, m)


def momentum_at(step: int, total_steps: int, base: float, schedule: str = "constant") -> float:
    """The momentum at ``step`` of ``total_steps``: constant, or cosine from ``base`` to 1 (BYOL)."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
        return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
    raise ValueError(f"unknown momentum schedule {schedule!r}; choose 'constant' or 'cosine'")
