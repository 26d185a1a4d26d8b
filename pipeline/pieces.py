"""The loader's side of an elastic resume: the old ranks' saved positions checked, this rank's
share of the rest of their epoch, and reading a piece of an old rank's window.

The piece is a run ``[start, stop)`` of the order in which the old rank's reader hands out its
window (``elastic.Window``). ``graph.emission_order`` replays that order from the window's seed
and counts; the piece's samples are then kept in each shard's DALI index (a filtered copy in a
scratch folder) and the reader is given the real tars with those indexes: DALI reads only the
piece, whole shards are never copied, and the work is the window's index lines (a window is at
most ``max_window_samples``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from . import elastic, partition, shards
from .config import LoaderConfig
from .elastic import OldWorld, Window
from .graph import emission_order, window_seed

__all__ = ["saved_world", "same_windows", "rank_rest", "piece_pairs"]


def saved_world(
    states: list[dict], manifest: shards.Manifest, config: LoaderConfig, per_window: int
) -> tuple[int, Optional[OldWorld]]:
    """``(epoch, old ranks' positions)`` of every rank's saved ``state_dict`` of another world
    size; no positions when that epoch was over (the next is dealt as usual).

    Raises:
        ShardError: a position older than elastic resume, of an epoch already resumed on another
            world size, of ranks at different points, or of another deal of shards.
    """
    root, counts = manifest.name, manifest.counts
    old_world = len(states)
    if any("batch_size" not in s for s in states):
        raise shards.ShardError(
            f"{root}: the saved data position predates elastic resume; resume on {old_world} ranks"
        )
    if any(s.get("elastic") for s in states):
        raise shards.ShardError(
            f"{root}: the saved epoch {states[0]['epoch']} was itself begun on another world "
            f"size; resume on {old_world} ranks until it ends, then change the world size"
        )
    for state in states:
        same_windows(root, state, per_window)
    first = states[0]
    epoch, done, old_batch = first["epoch"], first["step_in_epoch"], first["batch_size"]
    if any(
        (s["epoch"], s["step_in_epoch"], s["batch_size"]) != (epoch, done, old_batch)
        for s in states
    ):
        raise shards.ShardError(f"{root}: the saved ranks are at different points of the data")
    order = partition.epoch_order(counts, config.seed, epoch, config.shuffle)
    for rank, s in enumerate(states):
        mine = partition.rank_shards(order, old_world, rank)
        if partition.assignment_digest(mine, len(counts)) != s["assignment"]:
            raise shards.ShardError(
                f"{root}: the shards dealt to old rank {rank} in epoch {epoch} differ from the "
                "saved run's (the manifest or the seed changed); cannot resume"
            )
    old_steps = partition.steps_per_epoch(counts, old_world, old_batch, per_window)
    if config.last_batch == "drop" and done >= old_steps:
        return epoch + 1, None
    windows = tuple(s["window"] for s in states)
    return epoch, OldWorld(old_world, old_batch, windows, tuple(s["window_step"] for s in states))


def same_windows(root: str, state: dict, per_window: int) -> None:
    """Refuse a saved position whose windows held another number of shards than this run's."""
    saved = state.get("per_window", per_window)  # positions saved before the cache: the same
    if saved != per_window:
        raise shards.ShardError(
            f"{root}: the saved run read windows of {saved} shards, this one {per_window} "
            "(data.max_window_samples, data.max_window_shards or data.cache_limit changed); set "
            "them as they were to resume"
        )


def rank_rest(
    manifest: shards.Manifest,
    config: LoaderConfig,
    epoch: int,
    per_window: int,
    old: OldWorld,
    world: int,
    rank: int,
) -> tuple[list[Window], int]:
    """Rank ``rank`` of ``world``'s windows of the rest of ``epoch`` and the steps every rank takes in it."""
    counts = manifest.counts
    order = partition.epoch_order(counts, config.seed, epoch, config.shuffle)
    try:
        rest = elastic.remainder(counts, order, per_window, old, world, config.batch_size)
    except ValueError as error:
        raise shards.ShardError(f"{manifest.name}: the saved data position: {error}") from None
    steps = elastic.remainder_steps(rest, counts, per_window, config.batch_size)
    return elastic.rank_windows(rest, counts, rank, per_window), steps


def piece_pairs(
    manifest: shards.Manifest,
    window: Window,
    old: OldWorld,
    files: dict[int, tuple[Path, Path]],
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    shuffle_buffer: int,
    workdir: str | os.PathLike,
) -> list[tuple[Path, Path]]:
    """``(tar, filtered index)`` of each shard of ``window`` holding samples of the piece;
    ``files`` holds each shard's checked ``(tar, index)``."""
    work = Path(workdir)
    counts = [int(manifest.counts[s]) for s in window.shards]
    old_window = old.windows[window.old_rank]
    order = emission_order(
        counts,
        seed=window_seed(seed, epoch, window.old_rank, old_window),
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer,
        batch_size=old.batch_size,
        stop=window.stop,
        workdir=work / "replay",
    )
    chosen = np.sort(order[window.start : window.stop])
    bounds = np.concatenate([[0], np.cumsum(counts)])
    pairs = []
    for number, shard in enumerate(window.shards):
        lo, hi = np.searchsorted(chosen, bounds[number : number + 2])
        if lo == hi:
            continue
        tar, index = files[shard]
        samples = shards.read_index(index)
        kept = chosen[lo:hi] - bounds[number]
        filtered = work / f"piece-{window.old_rank}-{window.start}-{shard}.idx"
        filtered.write_text(
            shards.index_header(len(kept)) + "".join(shards.index_line(samples[i]) for i in kept)
        )
        pairs.append((tar, filtered))
    return pairs
