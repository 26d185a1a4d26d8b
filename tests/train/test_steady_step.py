"""The steady training step never reads a device value on the host: no .item(), bool(tensor),
float(tensor), .tolist() or .numpy() between two logging (or checkpoint) steps.

On a GPU each such read waits for every kernel queued before it; on the CPU there is nothing to
wait for, so the reads themselves are counted, in the engine's own step.
"""

from __future__ import annotations

import pytest
import torch

from moco_dali.tools.demo.data import generated_dump
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.settings import BuildSettings
from moco_dali.train.engine import Run
from moco_dali.train.presets import resolve

READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("steady")
    generated_dump(root / "raw", per_class=4, seed=0)
    build([str(root / "raw")], root / "train", BuildSettings(), workers=0, progress=False)
    return root / "train"


def _run(shards, out, **keys) -> Run:
    config = resolve(
        "v2",
        None,
        {
            "model.arch": "resnet18",
            "model.K": 64,
            "data.batch_size": 8,
            "model.num_splits": 2,
            "data.views.size": 32,
            "data.threads": 1,
            "data.train": str(shards),
            "run.device": "cpu",
            "run.out": str(out),
            "run.log_every": 1000,
            "run.ckpt_every": 1000,
            "run.progress": False,
            **keys,
        },
    )
    return Run(config)


def _counting(monkeypatch) -> dict[str, int]:
    counts = dict.fromkeys(READS, 0)
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


@pytest.mark.parametrize("keys", [{}, {"optim.name": "lars"}], ids=["sgd", "lars"])
def test_steps_between_logs_read_nothing_on_the_host(shards, tmp_path, monkeypatch, keys):
    run = _run(shards, tmp_path / "run", **keys)
    try:
        batches = iter(run.loader)
        run.train_step(next(batches))  # the first step may set things up
        counts = _counting(monkeypatch)
        for _ in range(3):
            run.train_step(next(batches))
        assert counts == dict.fromkeys(READS, 0)
        monkeypatch.undo()
        run.settle_nonfinite()  # the logging cadence's one read
        assert (run.streak, run.skipped) == (0, 0)
    finally:
        run.close()


def test_the_counter_catches_a_read_in_the_step(shards, tmp_path, monkeypatch):
    """The count is not blind: the old per-step read of the skip flag is seen."""
    run = _run(shards, tmp_path / "run")
    try:
        batches = iter(run.loader)
        run.train_step(next(batches))
        counts = _counting(monkeypatch)
        step = run.train_step

        def step_then_read(batch):
            result = step(batch)
            run.nonfinite.read()  # what settle_nonfinite did after every step
            return result

        monkeypatch.setattr(run, "train_step", step_then_read)
        run.train_step(next(batches))
        assert sum(counts.values()) >= 1
    finally:
        run.close()
