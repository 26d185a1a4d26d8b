"""``moco-demo``: the built-in default job, on real data where the machine has it.

Unpacks Fashion-MNIST into a raw image dump (or draws shapes where it is absent),
builds train, test and memory-bank shards with ``moco-shards build``'s code, verifies
and inspects them, pretrains with ``moco-train``'s engine, and prints what was
measured in the run: the pretext task's top-1 and loss against chance, kNN and a
linear probe on frozen features at initialisation and after (raw pixels as the
baseline row), images/s, and one verdict computed from those figures. Writes every
printed figure to a JSON file and a picture of the curves and the views.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ...common.commandline import Parser, add_flags, from_flags
from ...common.files import unwritable, write_json_atomic
from ...common.lock import FolderInUse, FolderLock
from ...common.options import OptionError, option
from ...pipeline.shards import ShardError, load_manifest
from ...train.checkpoint import CheckpointError
from ...train.config import ConfigError, check, to_dict
from ...train.engine import TrainingStopped
from ...train.folders import check_knn_folders, steps_per_epoch
from ..shards import BuildError
from ..shards.build import build
from ..shards.preview import preview
from ..shards.settings import BuildSettings
from ..shards.verify import format_inspection, inspect, verify
from . import report, run
from .data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    generated_dump,
    load_fashion_mnist,
    subset_list,
    write_dump,
)

__all__ = ["main", "DemoOptions"]

log = logging.getLogger("moco-demo")

MIN_LIMIT = 10
"""One image per class."""
MIN_TRAIN_LIMIT = 130
"""Ten classes of 13 drawn images: one batch of 128 (``run.BATCH_SIZE``) to pretrain on."""
LOCK_NAME = ".moco-demo.lock"
"""The lock file a demo holds in its ``--out`` folder while it runs: one demo per folder."""


@dataclass
class DemoOptions:
    out: str = option("demo", metavar="DIR")
    """Working folder."""
    limit: Optional[int] = option(None, metavar="N")
    """Use only the first N training images (test: N/6)."""
    workers: Optional[int] = None
    """Shard-build worker processes."""
    generated: bool = False
    """Use drawn shapes even if Fashion-MNIST is there."""
    train_steps: int = option(200, metavar="N")
    """Pretraining steps of 128 images (0: build and verify only)."""
    epochs: int = option(0, metavar="N")
    """Pretrain N whole epochs instead, with the kNN monitor after each."""
    minutes: Optional[float] = option(None, metavar="M")
    """Stop pretraining after M minutes (a checkpoint is written; the figures follow)."""
    bank: int = option(10000, metavar="N")
    """Training images in the kNN memory bank and the probe's training set."""
    seed: int = 0
    """Seeds the run."""
    json: Optional[Path] = option(None, metavar="PATH")
    """Every figure (default OUT/demo.json)."""
    png: Optional[Path] = option(None, metavar="PATH")
    """Curves and views (default OUT/demo.png)."""

    @property
    def training(self) -> bool:
        return self.train_steps > 0 or self.epochs > 0

    def __post_init__(self) -> None:
        for name in ("train_steps", "epochs", "bank"):
            value = getattr(self, name)
            if value < 0 or (name == "bank" and value < 10):
                raise ValueError(f"--{name.replace('_', '-')} {value} is out of range")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers {self.workers} is out of range")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"--minutes {self.minutes} must be positive")
        if self.limit is not None and self.limit < (
            MIN_TRAIN_LIMIT if self.training else MIN_LIMIT
        ):
            if self.training:
                raise ValueError(
                    f"--limit {self.limit}: pretraining takes batches of 128 images; give at "
                    f"least {MIN_TRAIN_LIMIT} (or --train-steps 0 to build the shards only)"
                )
            raise ValueError(
                f"--limit {self.limit}: give at least {MIN_LIMIT} (one image per class)"
            )

    def unwritable(self) -> Optional[str]:
        """Why an output cannot be written, found before any work; None when all can."""
        files = [("--out", Path(self.out), True)]
        if self.training:
            files += [("--json", self.json, False), ("--png", self.png, False)]
        for flag, path, folder in files:
            if path is not None and (why := unwritable(flag, path, folder=folder)):
                return why
        return None


def _shards(args: DemoOptions, root: Path, fashion: bool) -> None:
    name = root.name
    for split in ("train", "test"):
        limit = args.limit if split == "train" or args.limit is None else max(args.limit // 6, 10)
        raw = root / "raw" / split
        if fashion:
            images, labels = load_fashion_mnist(FASHION_MNIST_DIR, split)
            images, labels = images[:limit], labels[:limit]
            log.info("%s: writing the raw dump (%d PNGs) to %s", split, len(images), raw)
            write_dump(images, labels, FASHION_MNIST_CLASSES, raw)
        else:
            per_class = (limit or (6000 if split == "train" else 1000)) // 10
            log.info("%s: drawing %d images per class into %s", split, per_class, raw)
            generated_dump(raw, per_class, seed=0 if split == "train" else 1)
        builds = [(split, [str(raw)])]
        if split == "train":  # the kNN memory bank and the probe's training set: a spread subset
            bank = subset_list(raw, args.bank, root / "raw" / "bank.txt")
            builds.append(("bank", [str(bank or raw)]))
        for folder, sources in builds:
            shard_dir = root / "shards" / folder
            report = build(
                sources,
                shard_dir,
                BuildSettings(name=f"{name}-{folder}", labels="folder"),
                workers=args.workers,
            )
            print(f"moco-demo: build {folder}: {report.summary()}")
            print(f"moco-demo: verify {folder}: {verify(shard_dir).summary()}")
            if folder != "bank":
                print(format_inspection(inspect(shard_dir)))


def _pretrain_and_measure(args: DemoOptions, root: Path) -> dict:
    config = run.demo_config(root, steps=args.train_steps, epochs=args.epochs, seed=args.seed)
    shutil.rmtree(config.run.out, ignore_errors=True)
    # moco-train's own checks, before the minutes of measuring that come first.
    check(config, world=1, cuda=False, amp=False)
    steps_per_epoch(config, world=1)
    check_knn_folders(config)
    log.info(
        "measuring raw pixels and the encoder at initialisation (bank %s, queries %s)",
        config.data.knn_train,
        config.data.knn_val,
    )
    pixels = run.pixels(config)
    init = run.measure(run.initial_encoder(config), config)
    what = f"{args.epochs} epochs" if args.epochs else f"{args.train_steps} steps"
    log.info("pretraining for %s of %d images on the CPU", what, config.data.batch_size)
    trained = run.pretrain(config, args.minutes)
    after = run.measure(trained.pop("encoder"), config)
    samples = load_manifest(config.data.train).samples
    first, last = report.pretext_window(trained["curve"], config.model.K, config.data.batch_size)
    result = {
        "config": to_dict(config),
        "steps": trained["steps"],
        "train_samples": samples,
        "epochs_seen": trained["steps"] * config.data.batch_size / samples,
        "pretraining_s": trained["seconds"],
        "images_per_s": trained["images_per_s"],
        "pretext": {"chance_top1": 100.0 / (config.model.K + 1), "first": first, "last": last},
        "curve": trained["curve"],
        "knn_by_epoch": trained["knn_by_epoch"],
        "features": {
            "protocol": f"kNN k {config.run.knn_k} T {config.run.knn_t} and an L-BFGS linear probe on "
            f"frozen pooled features; bank and probe training set {config.data.knn_train}, "
            f"queries {config.data.knn_val}",
            "pixels": pixels,
            "init": init,
            "after": after,
        },
    }
    result["verdict"] = report.verdict(result)
    # The run's own views (its preset and data.views), drawn three times larger to be seen.
    recipe = dataclasses.replace(config.data.views, size=config.data.views.size * 3)
    views = preview(
        config.data.knn_train,
        Path(config.run.out) / "views.png",
        recipe=recipe,
        count=6,
        seed=args.seed,
    )
    result["png"] = str(report.figure(result, views, args.png or Path(args.out) / "demo.png"))
    return result


def _print(result: dict) -> None:
    p, why = result["pretext"], report.not_logged(result)
    task = (
        f"moco-demo: pretext task ({result['config']['model']['K'] + 1}-way instance discrimination, chance "
        f"{p['chance_top1']:.3f}%)"
    )
    if why:
        print(f"{task}: not measured, {why}")
    else:
        first, last = p["first"]["steps"], p["last"]["steps"]
        print(
            f"{task}: top-1 {p['first']['pretext_top1']:.1f}% over steps {first[0]}-{first[1]} (the first logged "
            f"once real keys fill the queue) -> {p['last']['pretext_top1']:.1f}% over steps {last[0]}-{last[1]}; "
            f"loss {p['first']['loss']:.2f} -> {p['last']['loss']:.2f}"
        )
    for point in result["knn_by_epoch"]:
        print(
            f"moco-demo: kNN monitor after epoch {point['epoch']}: top-1 {point['knn_top1']:.2f}%"
        )
    print(f"moco-demo: frozen features ({result['features']['protocol']}):")
    print(report.table(result))
    rate = (
        "images/s not measured (no step was logged)"
        if result["images_per_s"] is None
        else f"at {result['images_per_s']:.0f} images/s on the CPU"
    )
    print(
        f"moco-demo: pretraining {rate}, {result['steps']} steps in {result['pretraining_s']:.0f} s"
    )
    print(f"moco-demo: verdict: {result['verdict']}")


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="moco-demo", description=__doc__.split("\n\n")[0])
    add_flags(parser, DemoOptions)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="moco-demo: %(message)s")
    try:
        args = from_flags(DemoOptions, _parser().parse_args(argv))
        refusal = args.unwritable()
        if refusal:
            raise ValueError(refusal)
    except (OptionError, ValueError) as exc:
        print(f"moco-demo: error: {exc}", file=sys.stderr)
        return 2
    try:
        with FolderLock(Path(args.out) / LOCK_NAME, "moco-demo", "--out", create=True):
            return _demo(args)
    except (ShardError, BuildError, ConfigError, CheckpointError, FolderInUse) as error:
        print(f"moco-demo: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except TrainingStopped as error:
        print(f"moco-demo: stopped: {error}", file=sys.stderr)
        return 1


def _demo(args: DemoOptions) -> int:
    started = time.monotonic()
    fashion = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file() and not args.generated
    if fashion:
        log.info("Fashion-MNIST found in %s", FASHION_MNIST_DIR)
    else:
        log.info(
            "Fashion-MNIST not found in %s (install the Debian package dataset-fashion-mnist); "
            "using generated shapes",
            FASHION_MNIST_DIR,
        )
    root = Path(args.out) / ("fashion-mnist" if fashion else "generated-shapes")
    _shards(args, root, fashion)
    if args.train_steps > 0 or args.epochs > 0:
        result = _pretrain_and_measure(args, root)
        result["data"] = root.name
        _print(result)
        path = args.json or Path(args.out) / "demo.json"
        write_json_atomic(path, result, sort_keys=False)
        print(f"moco-demo: wrote {path} and {result['png']}")
    print(f"moco-demo: done in {time.monotonic() - started:.0f} s; shards in {root / 'shards'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
