"""The demo's pretraining and what it measures before and after.

The run is the ``cifar`` preset on a CPU budget (the standard ResNet-18 stem, which
shrinks 32 px views to 8 px before the blocks, and no symmetric loss: about 20x less
compute per image), trained by ``moco-train``'s engine. Features are measured on
the same frozen-feature protocol at initialisation and after: weighted kNN (k 200,
T 0.1) and a linear probe fitted by L-BFGS, with a subset of the training images as
the memory bank and the probe's training set and the test images as the queries;
raw pixels on the same protocol are the baseline row.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import torch
from torch.nn import functional as F

from ...pipeline.config import LoaderConfig, ReadConfig
from ...pipeline.loader import ViewLoader
from ...pipeline.recipes import EvalConfig
from ...pipeline.shards import load_manifest
from ...train import checkpoint
from ...train.config import Config, eval_view
from ...train.engine import train
from ...train.eval.knn import extract_features, knn_classify
from ...train.eval.probe import feature_probe
from ...train.presets import resolve
from ...train.step import build_model

__all__ = ["BATCH_SIZE", "demo_config", "measure", "pixels", "pretrain"]

log = logging.getLogger("moco-demo")

BATCH_SIZE = 128
"""Images per pretraining step: the training images must hold at least one batch."""


def demo_config(root: Path, *, steps: int, epochs: int, seed: int) -> Config:
    """The run: ``steps`` steps of 128 images, or ``epochs`` epochs with the kNN monitor after each.

    The cosine schedule spans the whole epochs the steps reach into. Resolved as moco-train
    resolves a command line, so every key's rule applies (``--seed`` among them).
    """
    train = root / "shards" / "train"
    steps_per_epoch = max(load_manifest(train).samples // BATCH_SIZE, 1)
    keys = {
        "model.small_stem": False,
        "model.symmetric": False,
        "data.train": str(train),
        "data.knn_train": str(root / "shards" / "bank"),
        "data.knn_val": str(root / "shards" / "test"),
        "data.batch_size": BATCH_SIZE,
        "run.epochs": epochs or -(-steps // steps_per_epoch),
        "run.max_steps": 0 if epochs else steps,
        "run.knn_every": 1 if epochs else 0,
        "run.out": str(root / "run"),
        "run.log_every": 10,
        "run.ckpt_every": 500,
        "run.seed": seed,
        "run.device": "cpu",
    }
    return resolve("cifar", None, keys, source="moco-demo")


def _protocol(train_f, train_y, val_f, val_y, classes: int, config: Config) -> dict:
    knn = knn_classify(
        train_f, train_y, val_f, val_y, classes, k=config.run.knn_k, t=config.run.knn_t
    )
    return {
        "knn_top1": knn["top1"],
        "knn_top5": knn["top5"],
        "linear_top1": feature_probe(train_f, train_y, val_f, val_y, classes)["top1"],
    }


def measure(encoder: torch.nn.Module, config: Config) -> dict:
    """kNN and linear probe of the frozen query backbone: bank (``data.knn_train``) against ``data.knn_val``."""
    d = config.data
    common = dict(
        batch_size=256,
        device=torch.device("cpu"),
        channels_last=config.run.channels_last,
        threads=d.read.threads,
    )
    view = eval_view(config)
    train_f, train_y, classes = extract_features(encoder, d.knn_train, view, **common)
    val_f, val_y, _ = extract_features(encoder, d.knn_val, view, **common)
    return _protocol(train_f, train_y, val_f, val_y, classes, config)


def _pixel_vectors(
    folder: str, view: EvalConfig, threads: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    loader = ViewLoader(
        folder,
        view,
        LoaderConfig(
            batch_size=256,
            dtype="float32",
            shuffle=False,
            last_batch="partial",
            read=ReadConfig(threads=threads),
        ),
    )
    vectors, labels = [], []
    for batch in loader:
        vectors.append(F.normalize(batch.view_q.reshape(len(batch), -1), dim=1))
        labels.append(batch.labels)
    return torch.cat(vectors), torch.cat(labels), len(loader.manifest.classes)


def pixels(config: Config) -> dict:
    """The same protocol on the normalised eval views' pixels: what a feature extractor has to beat."""
    view = eval_view(config)
    train_f, train_y, classes = _pixel_vectors(
        config.data.knn_train, view, config.data.read.threads
    )
    val_f, val_y, _ = _pixel_vectors(config.data.knn_val, view, config.data.read.threads)
    return _protocol(train_f, train_y, val_f, val_y, classes, config)


def initial_encoder(config: Config) -> torch.nn.Module:
    torch.manual_seed(config.run.seed)  # as the engine does: the run's own step-0 encoder
    return build_model(config, torch.device("cpu")).encoder_q


def pretrain(config: Config, minutes: Optional[float] = None) -> dict:
    """Train as ``config`` says (stopping after ``minutes`` through the engine's SIGTERM path); the curves and rate.

    A stop before the first logged step leaves the curve empty and the rate None.
    """
    timer = None
    if minutes:
        # The engine finishes the step, writes a checkpoint and returns on SIGTERM.
        timer = threading.Timer(minutes * 60, os.kill, (os.getpid(), signal.SIGTERM))
        timer.daemon = True
        timer.start()
    started = time.perf_counter()
    try:
        train(config)
    finally:
        if timer is not None:
            timer.cancel()
    seconds = time.perf_counter() - started
    out = Path(config.run.out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    model = build_model(config, torch.device("cpu"))
    state = checkpoint.load(checkpoint.latest(out))
    model.load_state_dict(state["model"])
    rates = sorted(r["images_per_s"] for r in steps)
    return {
        "encoder": model.encoder_q,
        "steps": state["step"],
        "seconds": seconds,
        "curve": [{"step": r["step"], "loss": r["loss"], "pretext_top1": r["acc1"]} for r in steps],
        "knn_by_epoch": [
            {"epoch": r["epoch"], "knn_top1": r["top1"]} for r in records if r["kind"] == "knn"
        ],
        "images_per_s": rates[len(rates) // 2] if rates else None,
    }
