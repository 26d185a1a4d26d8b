"""What the engine's tests share: the tiny run's command line, running it, reading what it logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A tiny run: ResNet-18 with the standard stem on 32 px views is a few ms per image;
# 400 images, 12 steps of 32 per epoch; K (64) well under the data set, so an image's
# own earlier key is never in the queue as a negative. On the CPU even where a GPU is
# (run.device auto would turn to CUDA by itself: bf16, NCCL, one GPU for two ranks).
TINY = [
    "--preset",
    "v2",
    "--model.arch",
    "resnet18",
    "--data.views.size",
    "32",
    "--data.eval_resize",
    "32",
    "--data.batch_size",
    "32",
    "--model.K",
    "64",
    "--model.m",
    "0.99",
    "--optim.lr_per_256",
    "0.24",
    "--data.threads",
    "1",
    "--data.shuffle_buffer",
    "64",
    "--run.knn_every",
    "0",
    "--run.progress",
    "false",
    "--run.log_every",
    "1",
    "--run.device",
    "cpu",
]


def moco_train(*args: str, env=None, wait: bool = True):
    command = [sys.executable, "-m", "moco_dali.train", *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(
            command,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=environment)


def losses(out: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run logs some steps twice)."""
    found = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            found[record["step"]] = record["loss"]
    return found


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
