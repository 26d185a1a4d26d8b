"""Evaluation's settings as data: the views it reads (``EvalViews``) and the linear probe's
protocol (``LinearConfig``), with their rules. No torch here: ``moco-eval`` binds them to its
options before anything heavy loads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ...common.options import FLAT, option

__all__ = ["EvalViews", "LinearConfig"]


def _positive(option: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{option} must be a positive number, got {value}")


@dataclass
class EvalViews:
    """The deterministic views evaluation reads: centre crops after a resize, in batches."""

    size: Optional[int] = option(None, metavar="PX")
    """Crop size (default: the run's data.views.size)."""
    resize: Optional[int] = option(None, metavar="PX")
    """Shorter side before the centre crop (default: the run's data.eval_resize)."""
    batch_size: int = 256
    """Images per batch."""
    threads: int = 0
    """DALI CPU threads (0: all cores)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.threads < 0:
            raise ValueError(f"--threads must be at least 0, got {self.threads}")
        for name in ("size", "resize"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1 px, got {value}")
        if self.size and self.resize and self.size > self.resize:
            raise ValueError(
                f"--size {self.size} is larger than --resize {self.resize} (the centre crop is "
                "taken after the resize)"
            )


@dataclass
class LinearConfig:
    """The paper's linear classification protocol (``main_lincls.py``'s settings)."""

    views: EvalViews = option(factory=EvalViews, **FLAT)
    epochs: int = 100
    """Training epochs of the classifier."""
    lr: float = 30.0
    """Learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0
    """L2 weight decay."""
    milestones: list[float] = option(factory=lambda: [0.6, 0.8], nargs="+")
    """Fractions of the epochs at which the rate is multiplied by 0.1 (60 and 80 of 100)."""
    crop_scale: tuple = option((0.08, 1.0), bind=False)
    """RandomResizedCrop area range of the training views."""
    seed: int = 0
    """Seeds the classifier and the views."""
    val_every: int = 1
    """Epochs between validations (the last epoch is always validated)."""
    progress: bool = option(True, flag="--no-progress")
    """A progress bar."""

    def __post_init__(self) -> None:
        self.milestones = [float(m) for m in self.milestones]
        for name in ("epochs", "val_every"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be at least 1, got {getattr(self, name)}")
        _positive("--lr", self.lr)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"--weight-decay must be a number >= 0, got {self.weight_decay}")
        if not all(0 <= m <= 1 for m in self.milestones):
            raise ValueError(
                f"--milestones are fractions of the epochs, in [0, 1], got {self.milestones}"
            )
