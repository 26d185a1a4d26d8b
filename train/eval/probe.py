"""A linear probe fitted on frozen features in seconds: multinomial logistic regression by L-BFGS.

The quick companion of ``linear.py`` (the paper's protocol: SGD over augmented views
for 100 epochs). Here the features are extracted once, standardised with the
training set's statistics, and a linear classifier with a small L2 penalty is fitted
to convergence with full-batch L-BFGS; the demo and the parity record use it to
measure features at initialisation and after pretraining side by side.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["feature_probe"]


def feature_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    classes: int,
    *,
    l2: float = 1e-4,
    max_iter: int = 200,
) -> dict[str, float]:
    """Top-1 (%) on ``val_*`` of a logistic-regression probe fitted on ``train_*``, and its training top-1.

    Args:
        train_features, val_features: (N, D) float features (normalised or not: they
            are standardised here with the training set's mean and std).
        train_labels, val_labels: (N,) int64 class indices in ``0..classes-1``.
        l2: weight penalty, relative to the mean loss.
        max_iter: L-BFGS iterations (one full-batch gradient each).
    """
    x = train_features.detach().float().cpu()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y = train_labels.cpu()
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        val = (val_features.detach().float().cpu() - mean) / std
        top1 = (val @ weight + bias).argmax(1).eq(val_labels.cpu()).float().mean().item() * 100
        train_top1 = (x @ weight + bias).argmax(1).eq(y).float().mean().item() * 100
    return {"top1": top1, "train_top1": train_top1}
