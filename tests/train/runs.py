"""What the engine's tests share: the tiny run's command line, running it, reading what it logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

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


# The tiny runs' torch threads, in a subprocess (OMP_NUM_THREADS) and in the test's own
# process alike, so that the two give the same losses; two, as the CI machine has two
# cores (the learning check's bounds were measured with one and with two).
THREADS = 2


def moco_train(*args: str, env=None, wait: bool = True):
    """``moco-train`` as a command: for what only a process shows (its exit code after a signal,
    a kill, its stderr as a user reads it, separate ranks). Each one starts torch and DALI
    afresh, about 10 s on two cores before its first step; ``train_here`` does not."""
    command = [sys.executable, "-m", "moco_dali.train", *args]
    environment = {**os.environ, "OMP_NUM_THREADS": str(THREADS), **(env or {})}
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


def train_here(*args: str) -> int:
    """``moco-train`` in this process, its exit code: torch and DALI are loaded already. On
    ``THREADS`` torch threads, as ``moco_train``'s OMP_NUM_THREADS: the same losses. Its log
    lines go to the ``moco-train`` logger (``caplog``), its one-line errors to stderr."""
    from moco_dali.train.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return main(list(args))
    finally:
        torch.set_num_threads(threads)


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
