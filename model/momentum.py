"""The momentum (EMA) update of the key encoder: theta_k <- m * theta_k + (1 - m) * theta_q.

Parameters only, never buffers: the key encoder's BN statistics are its own, as in the paper's
code. The update runs as multi-tensor kernels over all parameters at once, never a Python loop
over ~160 tensors; ``IMPLEMENTATIONS`` holds the fused lerp (default), mul+add for torch builds
without it, apex's axpby (only when importable) and the reference loop, chosen in one place.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = [
    "IMPLEMENTATIONS",
    "momentum_update_",
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
