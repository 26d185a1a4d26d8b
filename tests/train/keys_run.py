"""``moco-train`` that also writes the sample keys each rank trained on (``KEYS-rankR.txt`` in
run.out, one line per step), for the elastic resume's count of keys, with a tiny encoder (the
data path is under test, not the ResNet); run as a script for a rank of its own, ``test_elastic``
patches the same functions in for the rank in its process."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from moco_dali.pipeline.config import LoaderConfig
from moco_dali.train import engine, step
from moco_dali.train.cli import main
from tests.model.tiny import TinyEncoder

_train_step = engine.Run.train_step


def with_keys(*args, **kw) -> LoaderConfig:
    """The engine's loader configuration, with the keys handed over."""
    return dataclasses.replace(LoaderConfig(*args, **kw), keys=True)


def train_step(self, batch):
    """The engine's step, after writing the batch's keys."""
    rank = int(os.environ.get("RANK", 0))
    with open(Path(self.config.run.out) / f"KEYS-rank{rank}.txt", "a") as out:
        out.write(f"{self.step + 1} {' '.join(batch.keys)}\n")
    return _train_step(self, batch)


def tiny(arch: str, small_stem: bool = False):
    """``encoders.resnet``'s place: the tiny encoder, whatever ``model.arch`` says."""
    return TinyEncoder


if __name__ == "__main__":
    engine.LoaderConfig = with_keys
    engine.Run.train_step = train_step
    step.resnet = tiny
    sys.exit(main(sys.argv[1:]))
