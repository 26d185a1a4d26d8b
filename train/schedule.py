"""The schedules of a run, each precomputed as one value per step: the learning rate (step or
cosine, after a linear warm-up) and the key encoder's momentum (constant, or cosine to 1 as BYOL).

The names each knows are declared here once; the configuration refuses any other by them."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

__all__ = ["LR_SCHEDULES", "MOMENTUM_SCHEDULES", "learning_rates", "momenta"]

LR_SCHEDULES = ("step", "cosine")
MOMENTUM_SCHEDULES = ("constant", "cosine")


def learning_rates(
    base_lr: float,
    steps_per_epoch: int,
    epochs: int,
    schedule: str,
    milestones: tuple = (),
    warmup_epochs: float = 0.0,
    epoch_at_step: Optional[np.ndarray] = None,
) -> np.ndarray:
    """The rate at every step: step (x0.1 at each milestone epoch) or cosine to 0, after a
    linear warm-up; at the fractional epoch of each step, ``epoch_at_step`` when given (a run
    whose epochs moved when its world size changed), else ``step / steps_per_epoch``."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose step or cosine")
    total = steps_per_epoch * epochs
    epoch = np.arange(total) / steps_per_epoch if epoch_at_step is None else epoch_at_step
    if schedule == "step":
        rates = (
            base_lr
            * 0.1 ** np.sum(epoch[:, None] >= np.asarray(milestones, dtype=float)[None, :], axis=1)
            if len(milestones)
            else np.full(total, base_lr)
        )
    else:
        rates = base_lr * 0.5 * (1.0 + np.cos(math.pi * epoch / epochs))
    if warmup_epochs > 0:
        rates = np.where(
            epoch < warmup_epochs, base_lr * (epoch + 1.0 / steps_per_epoch) / warmup_epochs, rates
        )
    return rates.astype(np.float64)


def momenta(base: float, total_steps: int, schedule: str = "constant", progress=None) -> np.ndarray:
    """The key encoder's momentum at every step of ``total_steps``: ``base`` throughout, or a
    cosine from ``base`` to 1 over the run's progress (``progress``, 0 to 1 per step, when given)."""
    if schedule not in MOMENTUM_SCHEDULES:
        raise ValueError(f"unknown momentum schedule {schedule!r}; choose 'constant' or 'cosine'")
    if schedule == "constant":
        return np.full(total_steps, base, dtype=np.float64)
    if progress is None:
        progress = np.arange(total_steps) / max(total_steps, 1)
    progress = np.clip(progress, 0.0, 1.0)
    return 1.0 - (1.0 - base) * (np.cos(np.pi * progress) + 1.0) / 2.0
