"""moco-train resumed on another number of gloo ranks on the CPU: 1 -> 2 -> 1 ranks, each
checkpoint mid-epoch, every key of each epoch read once (counted from the keys the loader handed
over, written by ``keys_run``)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from moco_dali.tools.demo.data import generated_dump
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.settings import BuildSettings
from moco_dali.train import checkpoint, engine
from moco_dali.train import step as train_step
from moco_dali.train.cli import main
from moco_dali.train.epochs import EpochClock
from tests.conftest import free_port
from tests.train import keys_run
from tests.train.runs import REPO, TINY, metrics

# 10 shards of 4: 5 whole batches of 8 on one rank, of 4 on each of two. The checkpoints at
# step 2 (epoch 0, one rank) and 6 (epoch 1, two ranks) leave whole batches of the new size in
# every old window: every key once.
SAMPLES, STEPS, BATCH = 40, 5, 8
SMALL = [*TINY, "--data.batch_size", str(BATCH), "--data.shuffle_buffer", "8", "--run.epochs", "3"]
SMALL += ["--model.shuffle", "none"]  # batches of 4 per rank: too few for split BN


def one_rank(args: list[str], monkeypatch) -> int:
    """The one-rank run in this process, writing its keys as ``keys_run`` does."""
    with monkeypatch.context() as patch:
        patch.setattr(engine, "LoaderConfig", keys_run.with_keys)
        patch.setattr(engine.Run, "train_step", keys_run.train_step)
        patch.setattr(train_step, "resnet", keys_run.tiny)
        return main(args)


def two_ranks(args: list[str], monkeypatch) -> int:
    """Two gloo ranks: rank 1 in a process of its own, rank 0 in this one (one start-up less)."""
    port = str(free_port())
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2"}
    other = subprocess.Popen(
        [sys.executable, keys_run.__file__, *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            **env,
            "OMP_NUM_THREADS": "1",
            "RANK": "1",
            "LOCAL_RANK": "1",
            "PYTHONPATH": str(REPO),  # for tests.model.tiny
        },
    )
    try:
        with monkeypatch.context() as patch:
            for key, value in {**env, "RANK": "0", "LOCAL_RANK": "0"}.items():
                patch.setenv(key, value)
            code = one_rank(args, monkeypatch)
        _, stderr = other.communicate(timeout=300)
    finally:
        other.kill()
    assert other.returncode == 0, stderr[-3000:]
    return code


def keys_by_step(out: Path) -> dict[int, list[str]]:
    steps: dict[int, list[str]] = {}
    for path in out.glob("KEYS-rank*.txt"):
        for line in path.read_text().splitlines():
            step, *keys = line.split()
            steps.setdefault(int(step), []).extend(keys)
    return steps


def test_mid_epoch_checkpoints_resume_on_another_world_reading_every_key_once(
    tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="moco-train")
    generated_dump(tmp_path / "raw", per_class=SAMPLES // 10, seed=0)
    settings = BuildSettings(labels="folder", max_count=4)
    build([str(tmp_path / "raw")], tmp_path / "train", settings, workers=0, progress=False)
    out = tmp_path / "run"
    args = [*SMALL, "--data.train", str(tmp_path / "train"), "--run.out", str(out)]

    assert one_rank([*args, "--run.max_steps", "2"], monkeypatch) == 0
    assert two_ranks([*args, "--run.resume", "auto", "--run.max_steps", "6"], monkeypatch) == 0
    assert f"world size 1 -> 2 at step 2: global batch {BATCH} kept (8 -> 4 per rank)" in (
        caplog.text
    )
    assert checkpoint.load(checkpoint.latest(out))["world"] == 2
    assert one_rank([*args, "--run.resume", "auto", "--run.max_steps", "11"], monkeypatch) == 0
    assert "world size 2 -> 1 at step 6: global batch 8 kept (4 -> 8 per rank)" in caplog.text

    steps = keys_by_step(out)
    assert sorted(steps) == list(range(1, 12)) and all(len(k) == BATCH for k in steps.values())
    for epoch in (0, 1):  # epoch 0 read at 1 then 2 ranks, epoch 1 at 2 then 1
        read = Counter(
            k for s in range(epoch * STEPS + 1, (epoch + 1) * STEPS + 1) for k in steps[s]
        )
        assert len(read) == SAMPLES and set(read.values()) == {1}, epoch
    records = metrics(out)
    moved = [r for r in records if r["kind"] == "resume"]
    assert [r["world"] for r in moved] == [[1, 2], [2, 1]]
    for record, (old, new) in zip(moved, [(1, 2), (2, 1)]):
        assert record["global_batch"] == [BATCH, BATCH]
        assert record["per_rank_batch"] == [BATCH // old, BATCH // new]
        assert record["lr"][0] == record["lr"][1]
    assert [r["rest_of_epoch_steps"] for r in moved] == [3, 4]
    epochs = {r["step"]: r["epoch"] for r in records if r["kind"] == "train"}
    assert [epochs[s] for s in (5, 6, 10, 11)] == [0, 1, 1, 2]


class _At:
    """A loader's position, as EpochClock reads it."""

    def __init__(self, epoch: int, step_in_epoch: int, epoch_steps: int):
        self.epoch, self.step_in_epoch, self.epoch_steps = epoch, step_in_epoch, epoch_steps


def test_the_epoch_clock_is_todays_arithmetic_until_the_world_changes():
    steps, epochs = 7, 4
    for step in range(steps * epochs):  # a run that kept its world size, resumed anywhere
        clock = EpochClock.of(step, steps, _At(step // steps, step % steps, steps))
        assert clock.regular and clock.total_steps(epochs) == steps * epochs
        assert [clock.epoch(s) for s in range(28)] == [s // steps for s in range(28)]
        assert [clock.ends_epoch(s) for s in range(28)] == [s % steps == 0 for s in range(28)]
    # Resumed at step 10 (epoch 1) on a world whose rest of epoch 1 takes 5 steps, epochs 6.
    moved = EpochClock.of(10, 6, _At(1, 0, 5))
    assert not moved.regular and moved.total_steps(epochs) == 15 + 2 * 6
    assert [moved.epoch(s) for s in (10, 14, 15, 20, 21, 26)] == [1, 1, 2, 2, 3, 3]
    assert [s for s in range(10, 28) if moved.ends_epoch(s)] == [15, 21, 27]
    # Resumed again later on the same world: the same schedule to the last bit.
    again = EpochClock.of(23, 6, _At(3, 2, 6))
    assert again.total_steps(epochs) == moved.total_steps(epochs)
    assert np.array_equal(again.epoch_at_step(epochs), moved.epoch_at_step(epochs))
    fractions = moved.epoch_at_step(epochs)
    assert fractions[15] == 2 and fractions[21] == 3 and fractions[-1] < epochs
