"""Optimizers of the engine: SGD (PyTorch's fused or foreach kernels) and LARS.

LARS (You et al. 2017, in the form MoCo v3 and BYOL use): SGD with momentum whose
update of each weight tensor is scaled by ``trust_coefficient * |w| / |g + wd w|``;
biases and BN parameters (1-d tensors) get neither weight decay nor the scaling.
PyTorch has no LARS, so it is written here with multi-tensor (``_foreach``) kernels:
a handful of launches per step rather than several per parameter.
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["LARS", "make_optimizer"]


class LARS(torch.optim.Optimizer):
    supports_found_inf = True
    """``step()`` honours a ``found_inf`` attribute (a 0-d tensor, 1 = skip) on the device, as fused SGD does."""

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(
                "LARS: need lr > 0, 0 <= momentum < 1, weight_decay >= 0, trust_coefficient > 0"
            )
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                trust_coefficient=trust_coefficient,
                eps=eps,
            ),
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            adapted = [i for i, p in enumerate(params) if p.ndim > 1]
            if adapted:
                weights = [params[i] for i in adapted]
                updates = [grads[i] for i in adapted]
                if group["weight_decay"]:
                    updates = torch._foreach_add(updates, weights, alpha=group["weight_decay"])
                w_norms = torch._foreach_norm(weights)
                u_norms = torch._foreach_norm(updates)
                ratios = [
                    torch.where(
                        (w > 0) & (u > 0),
                        group["trust_coefficient"] * w / (u + group["eps"]),
                        torch.ones_like(w),
                    )
                    for w, u in zip(w_norms, u_norms)
                ]
                updates = torch._foreach_mul(updates, ratios)
                for i, u in zip(adapted, updates):
                    grads[i] = u
            if found_inf is not None:
                # Skip on the device: zero updates and unchanged buffers when found_inf is 1
                # (a where, not a product, because the gradients are NaN then).
                keep = found_inf == 0
                grads = [torch.where(keep, g, torch.zeros_like(g)) for g in grads]
            buffers = []
            for p, _g in zip(params, grads):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffers.append(state["momentum_buffer"])
            if found_inf is not None:
                # buffer <- m * buffer + g and w <- w - lr * buffer, or nothing at all when skipping.
                momentum = torch.where(
                    keep,
                    torch.tensor(group["momentum"], device=keep.device),
                    torch.tensor(1.0, device=keep.device),
                )
                lr = torch.where(
                    keep,
                    torch.tensor(group["lr"], device=keep.device),
                    torch.tensor(0.0, device=keep.device),
                )
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, grads)
                torch._foreach_add_(params, torch._foreach_mul(buffers, -lr))
            else:
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_add_(buffers, grads)
                torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss


def make_optimizer(
    name: str,
    params: Iterable,
    lr: float,
    momentum: float,
    weight_decay: float,
    device: torch.device,
    trust_coefficient: float = 0.001,
    fast: bool = True,
) -> torch.optim.Optimizer:
    """``"sgd"`` or ``"lars"``. ``fast``: SGD's fused kernel; else PyTorch's default, as the reference code calls it."""
    if name == "sgd":
        # Fused on CPUs too: its kernel can skip a step on the device (``found_inf``).
        kind = {"fused": True} if fast else {}
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **kind)
    if name == "lars":
        return LARS(
            params,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
        )
    raise ValueError(f"optimizer {name!r}: choose sgd or lars")
