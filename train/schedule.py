"""Learning-rate schedules, precomputed as one value per step."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["learning_rates"]


def learning_rates(
    base_lr: float,
    steps_per_epoch: int,
    epochs: int,
    schedule: str,
    milestones: tuple = (),
    warmup_epochs: float = 0.0,
) -> np.ndarray:
    """The rate at every step: step (x0.1 at each milestone epoch) or cosine to 0, after a linear warm-up."""
    total = steps_per_epoch * epochs
    epoch = np.arange(total) / steps_per_epoch  # fractional epoch at each step
    if schedule == "step":
        rates = (
            base_lr
            * 0.1 ** np.sum(epoch[:, None] >= np.asarray(milestones, dtype=float)[None, :], axis=1)
            if len(milestones)
            else np.full(total, base_lr)
        )
    elif schedule == "cosine":
        rates = base_lr * 0.5 * (1.0 + np.cos(math.pi * epoch / epochs))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose step or cosine")
    if warmup_epochs > 0:
        rates = np.where(
            epoch < warmup_epochs, base_lr * (epoch + 1.0 / steps_per_epoch) / warmup_epochs, rates
        )
    return rates.astype(np.float64)
