"""The folders a run reads and the one it writes, checked from their manifests before any work.

Reads manifests only (O(shards)): the shards themselves are opened by the loader, each by the
rank dealt it. ``run.out`` is checked and then locked for the run's whole life by rank 0, which
tells every rank the outcome.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..common.files import unwritable
from ..common.lock import FolderInUse, FolderLock
from ..pipeline import partition
from ..pipeline.cache import load_manifest, shards_per_window
from ..pipeline.config import ReadConfig
from ..pipeline.shards import ShardError
from .config import Config, ConfigError
from .distributed import Dist, on_main

__all__ = [
    "steps_per_epoch",
    "check_knn_folders",
    "check_out",
    "hold_out",
    "check_resume",
    "LOCK_NAME",
]

LOCK_NAME = ".moco-train.lock"
"""The lock file a run holds in ``run.out`` while it lives."""


def steps_per_epoch(config: Config, world: int) -> int:
    """The steps every rank of ``world`` takes per epoch of ``data.train``, from its manifest alone.

    The loader's own rule (whole batches, shards dealt whole, windows of shards), known before a
    model is built or a checkpoint read. Raises ``ConfigError`` when a rank would get no whole
    batch.
    """
    d = config.data
    read: ReadConfig = d.read
    try:
        manifest = load_manifest(d.train)
        counts = manifest.counts
        if not len(counts):
            raise ConfigError(f"data.train {d.train}: the manifest lists no shards")
        per_window = shards_per_window(manifest, read)
    except ShardError as error:
        raise ConfigError(f"data.train: {error}") from None
    samples = int(counts.sum())
    steps = partition.steps_per_epoch(counts, world, d.batch_size // world, per_window)
    if steps >= 1:
        return steps
    if world == 1:
        raise ConfigError(
            f"data.batch_size {d.batch_size} is larger than the {samples} samples of data.train "
            f"{d.train}: use a smaller batch or more samples"
        )
    raise ConfigError(
        f"data.batch_size {d.batch_size} leaves a rank of {world} no whole batch of "
        f"{d.batch_size // world} per epoch in data.train {d.train} ({samples} samples in "
        f"{len(counts)} shards dealt whole to the ranks); use fewer ranks or a smaller batch, or "
        "build smaller shards"
    )


def check_knn_folders(config: Config) -> None:
    """The kNN monitor's folders exist and hold labelled shards of the same classes: known at the
    start, not after an epoch."""
    d = config.data
    if not (d.knn_train and config.run.knn_every):
        return
    classes = {}
    for key, folder in (("data.knn_train", d.knn_train), ("data.knn_val", d.knn_val)):
        try:
            classes[key] = load_manifest(folder).classes
        except ShardError as error:
            raise ConfigError(f"{key}: {error}") from None
        if not classes[key]:
            raise ConfigError(
                f"{key} {folder}: the kNN monitor needs labelled shards (build with --labels folder)"
            )
    if classes["data.knn_train"] != classes["data.knn_val"]:
        raise ConfigError(
            f"data.knn_train and data.knn_val hold different classes "
            f"({len(classes['data.knn_train'])} and {len(classes['data.knn_val'])}, or in another "
            "order); the kNN monitor needs the same labels on both"
        )


def check_out(config: Config, dist: Dist) -> None:
    """``run.out`` can be written (a file made and removed in it), checked by rank 0 for all."""

    def check() -> None:
        why = unwritable("run.out", config.run.out, folder=True)
        if why:
            raise ConfigError(why)

    on_main(dist, check)


def hold_out(config: Config, dist: Dist) -> Optional[FolderLock]:
    """``run.out``'s lock, taken by rank 0 (made if missing) and held until ``release()``; None
    on the other ranks.

    A second run into the same folder is refused on every one of its ranks, naming the folder
    and the process that holds it: two runs never write checkpoints and metrics into one folder.
    """
    out = Path(config.run.out)

    def take() -> FolderLock:
        lock = FolderLock(out / LOCK_NAME, "moco-train run", "run.out", create=True)
        try:
            return lock.acquire()
        except FolderInUse as error:
            raise ConfigError(f"run.out {error}") from None
        except OSError as error:
            raise ConfigError(
                f"run.out {out}: cannot lock it ({error.strerror or error})"
            ) from None

    return on_main(dist, take)


def check_resume(config: Config) -> None:
    """``run.resume`` is "", "auto" or a file that exists."""
    resume = config.run.resume
    if resume in ("", "auto"):
        return
    try:
        found = Path(resume).is_file()
    except (OSError, ValueError):
        found = False
    if not found:
        raise ConfigError(f"run.resume {resume}: no such checkpoint")
