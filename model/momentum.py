"""The momentum (EMA) update of the key encoder: theta_k <- m * theta_k + (1 - m) * theta_q.

Parameters only, never buffers: the key encoder's BN statistics are its own, as in the paper's
code. With each encoder's parameters views into one buffer (``flatten_parameters_``, done by the
engine's model builder) the update is one lerp over two buffers (``flat_lerp``); otherwise
multi-tensor kernels over all parameters at once (``IMPLEMENTATIONS``: the fused lerp, mul+add
for torch builds without it, apex's axpby when importable, the reference loop). Never a Python
loop over ~160 tensors; chosen in one place (``resolve_implementation``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

__all__ = [
    "IMPLEMENTATIONS",
    "flatten_parameters_",
    "flat_parameters",
    "momentum_update_",
    "available_implementations",
    "resolve_implementation",
]


def flatten_parameters_(module: torch.nn.Module) -> Optional[torch.Tensor]:
    """Move ``module``'s parameters into one buffer, each parameter a view into it (its shape and
    strides kept, so a channels-last weight stays channels-last); return the buffer.

    The momentum update is then one pass over two buffers instead of one per tensor. Made last,
    after the module's moves between devices and memory formats (a later move gives parameters
    storage of their own again, and the update falls back to the multi-tensor kernels). None
    (nothing moved) when the parameters differ in dtype or device.
    """
    params = list(module.parameters())
    if not params or len({(p.dtype, p.device) for p in params}) != 1:
        return None
    flat = torch.empty(
        sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device
    )
    offset = 0
    with torch.no_grad():
        for p in params:
            view = flat[offset : offset + p.numel()].as_strided(p.shape, p.stride())
            view.copy_(p)
            p.data = view
            offset += p.numel()
    module._flat_parameters = flat
    return flat


def flat_parameters(module) -> Optional[torch.Tensor]:
    """The buffer ``flatten_parameters_`` made, if every parameter is still a view into it."""
    flat = getattr(module, "_flat_parameters", None)
    if flat is None or not isinstance(module, torch.nn.Module):
        return None
    base = flat.untyped_storage().data_ptr()
    if any(p.untyped_storage().data_ptr() != base for p in module.parameters()):
        return None
    return flat


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
    """The list-based implementations here (``flat_lerp`` needs flattened encoders besides)."""
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


def resolve_implementation(implementation: str, key_encoder=None, query_encoder=None) -> str:
    """``"auto"`` as the implementation it stands for: ``flat_lerp`` for two encoders whose
    parameters are views into one buffer each, else ``foreach_lerp`` where torch has it, else
    ``foreach``."""
    if implementation != "auto":
        return implementation
    flat_k, flat_q = flat_parameters(key_encoder), flat_parameters(query_encoder)
    if flat_k is not None and flat_q is not None and flat_k.shape == flat_q.shape:
        return "flat_lerp"
    return "foreach_lerp" if hasattr(torch, "_foreach_lerp_") else "foreach"


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
    implementation = resolve_implementation(implementation, key_encoder, query_encoder)
    if implementation == "flat_lerp":
        flat_k, flat_q = flat_parameters(key_encoder), flat_parameters(query_encoder)
        if flat_k is None or flat_q is None or flat_k.shape != flat_q.shape:
            raise ValueError("flat_lerp needs two encoders flattened alike (flatten_parameters_)")
        with torch.no_grad():
            flat_k.lerp_(flat_q, 1.0 - m)  # one read-modify-write pass over one buffer
        return
    key, query = _params(key_encoder), _params(query_encoder)
    if len(key) != len(query):
        raise ValueError(f"key encoder has {len(key)} parameters, query encoder {len(query)}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown momentum implementation {implementation!r}; choose from {sorted(IMPLEMENTATIONS)}"
        )
    IMPLEMENTATIONS[implementation](key, query, m)
