"""Where a run's epochs end in its steps, and what a resume on another world size changes.

A run that kept its world size has epochs of ``steps_per_epoch`` steps from step 0. A resume on
another world size keeps the global batch (``data.batch_size``, the per-rank batch is divided
anew) and so the learning rate; the interrupted epoch ends after the steps the loader dealt for
its rest, later epochs take the new world's steps, the run still ends at ``run.epochs``, and the
schedules follow each step's fractional epoch. ``EpochClock`` is read from the loader's position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .config import Config
from .folders import steps_per_epoch
from .step import schedules

__all__ = ["EpochClock", "world_change", "describe"]


@dataclass(frozen=True)
class EpochClock:
    """Epoch ``next_epoch`` begins at step ``boundary``; each later one is ``steps_per_epoch`` long."""

    steps_per_epoch: int
    boundary: int
    next_epoch: int

    @classmethod
    def of(cls, step: int, steps_per_epoch: int, loader) -> "EpochClock":
        """The clock of a run ``step`` steps in, whose loader (``ViewLoader``) is where it is."""
        boundary = step - loader.step_in_epoch + loader.epoch_steps
        return cls(steps_per_epoch, boundary, loader.epoch + 1)

    @property
    def regular(self) -> bool:
        """Whether every epoch so far had ``steps_per_epoch`` steps (the world never changed)."""
        return self.boundary == self.next_epoch * self.steps_per_epoch

    def epoch(self, step: int) -> int:
        """The epoch the step after ``step`` steps belongs to (after an epoch's end: the count of
        finished epochs)."""
        if self.regular:
            return step // self.steps_per_epoch
        if step < self.boundary:
            return self.next_epoch - 1
        return self.next_epoch + (step - self.boundary) // self.steps_per_epoch

    def ends_epoch(self, step: int) -> bool:
        """Whether ``step`` steps end an epoch (a regular clock: any multiple of its length)."""
        at_end = (step - self.boundary) % self.steps_per_epoch == 0
        return at_end and (step >= self.boundary or self.regular)

    def total_steps(self, epochs: int) -> int:
        return self.boundary + (epochs - self.next_epoch) * self.steps_per_epoch

    def epoch_at_step(self, epochs: int) -> np.ndarray:
        """The fractional epoch of every step of the run, measured back from ``boundary`` in the
        new world's epochs (the old steps before the resume are never taken again)."""
        # From the earliest equivalent boundary, so that every resume of the run computes the
        # same array to the last bit.
        whole = self.boundary // self.steps_per_epoch
        first, epoch = self.boundary - whole * self.steps_per_epoch, self.next_epoch - whole
        steps = np.arange(self.total_steps(epochs))
        return np.clip(epoch + (steps - first) / self.steps_per_epoch, 0, None)


def world_change(
    config: Config, state: Optional[dict], world: int, step: int, rates: np.ndarray, clock
) -> dict:
    """The ``resume`` record's fields for a resume of ``state`` on another world size (none on
    the same)."""
    if not state or state["world"] == world:
        return {}
    old_world, global_batch, epochs = state["world"], config.data.batch_size, config.run.epochs
    old_steps = steps_per_epoch(config, old_world)
    old_rates = schedules(config, old_steps)[0]
    old_rate = float(old_rates[min(step, len(old_rates) - 1)])
    rate = float(rates[min(step, len(rates) - 1)])
    record = {
        "world": [old_world, world],
        "global_batch": [global_batch, global_batch],
        "per_rank_batch": [global_batch // old_world, global_batch // world],
        "lr": [old_rate, rate],
        "steps_per_epoch": [old_steps, clock.steps_per_epoch],
        "epoch": clock.next_epoch - 1,
        "rest_of_epoch_steps": clock.boundary - step,
        "total_steps": clock.total_steps(epochs),
        "epochs": epochs,
    }
    return record


def describe(step: int, record: dict) -> str:
    """The stderr line of a ``world_change`` record."""
    (old, new), (batch, _), (old_rank, rank) = (
        record["world"],
        record["global_batch"],
        record["per_rank_batch"],
    )
    return (
        f"world size {old} -> {new} at step {step}: global batch {batch} kept ({old_rank} -> "
        f"{rank} per rank), lr {record['lr'][0]:.4g} -> {record['lr'][1]:.4g}; epoch "
        f"{record['epoch']} ends after {record['rest_of_epoch_steps']} more steps, then "
        f"{record['steps_per_epoch'][1]} steps per epoch (were {record['steps_per_epoch'][0]}) "
        f"to epoch {record['epochs']}, step {record['total_steps']}"
    )
