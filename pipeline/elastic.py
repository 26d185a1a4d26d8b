"""The rest of an epoch interrupted at one world size, dealt to another: pure functions of the counts.

What old ranks had not read is the unread part of each one's current window (known as positions
in its reader's order, which ``graph.emission_order`` replays from a seed and counts) and the
shards of its later windows, whole. The unread parts, laid end to end, are cut into one run per
new rank at whole new batches (shares differ by under two batches); whole shards are dealt
round-robin in the epoch's order, as at an epoch start. A new rank reads each piece of an old
window as a window of its own, then its shards ``per_window`` at a time, whole batches only, the
same number on every rank (the usual epoch end). No file is read; docs/training.md says more.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from . import partition

__all__ = ["OldWorld", "Window", "Remainder", "remainder", "rank_windows", "remainder_steps"]


@dataclass(frozen=True)
class OldWorld:
    """Where the ranks of the interrupted run were in the epoch: one entry per old rank."""

    world: int
    batch_size: int
    """Samples per batch on each old rank."""
    windows: tuple[int, ...]
    """The window each old rank was reading."""
    window_steps: tuple[int, ...]
    """Batches each old rank had taken from that window."""

    def __post_init__(self) -> None:
        if not (len(self.windows) == len(self.window_steps) == self.world >= 1):
            raise ValueError(f"an old world of {self.world} ranks needs one position per rank")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class Window:
    """One window of a new rank in the rest of the epoch: whole shards, or a piece of an old window.

    A piece (``old_rank >= 0``) is the samples at positions ``[start, stop)`` of the order in
    which old rank ``old_rank``'s reader would hand out its window ``shards``.
    """

    shards: tuple[int, ...]
    samples: int
    old_rank: int = -1
    start: int = 0
    stop: int = 0


@dataclass(frozen=True)
class Remainder:
    """The rest of an epoch, dealt: the pieces of old windows and the whole shards, with their ranks."""

    world: int
    pieces: tuple[Window, ...]
    piece_ranks: np.ndarray
    shards: np.ndarray
    """Whole shards not yet read, count descending (the epoch's order)."""
    shard_ranks: np.ndarray


def remainder(
    counts, order: np.ndarray, per_window: int, old: OldWorld, new_world: int, batch_size: int
) -> Remainder:
    """What the old ranks had not read of the epoch whose shard order is ``order``, dealt to
    ``new_world`` ranks of ``batch_size`` samples per batch.

    The unread parts of the old ranks' current windows, laid end to end in old rank order, are
    cut into ``new_world`` runs of whole new batches (the last takes the odd samples), one per new
    rank: the ranks' shares of them differ by under two batches, and a run spans the old windows
    its samples fill (``ceil(old / new) + 1`` when the old ranks had as much left).

    Raises:
        ValueError: a position that does not fit the old ranks' windows.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if new_world < 1 or batch_size < 1:
        raise ValueError(f"new world {new_world} and batch {batch_size} must be at least 1")
    unread: list[tuple[int, tuple[int, ...], int, int]] = []  # old rank, shards, taken, samples
    whole = np.ones(len(order), dtype=bool)
    for rank in range(old.world):
        mine = partition.rank_shards(order, old.world, rank)
        bounds = partition.window_bounds(len(mine), per_window)
        window, taken = old.windows[rank], old.window_steps[rank] * old.batch_size
        # Shards of finished windows, and of the window being read, are not whole any more.
        read_to = min(window + (taken > 0), len(bounds))
        done = bounds[read_to - 1][1] if read_to else 0
        whole[rank + old.world * np.arange(done)] = False
        if not taken:
            continue
        if window >= len(bounds):
            raise ValueError(f"old rank {rank}: window {window} of {len(bounds)}")
        start, stop = bounds[window]
        shards = tuple(int(s) for s in mine[start:stop])
        samples = int(counts[list(shards)].sum())
        if taken > samples:
            raise ValueError(
                f"old rank {rank}: {old.window_steps[rank]} batches of {old.batch_size} taken from "
                f"a window of {samples} samples"
            )
        if samples > taken:
            unread.append((rank, shards, taken, samples))
    total = sum(samples - taken for _, _, taken, samples in unread)
    cuts = batch_size * (((total // batch_size) * np.arange(new_world + 1)) // new_world)
    cuts[-1] = total
    pieces, ranks, offset = [], [], 0
    for rank, shards, taken, samples in unread:
        end = offset + samples - taken
        first = int(np.searchsorted(cuts, offset, side="right")) - 1
        for new_rank in range(first, new_world):
            a, b = max(offset, int(cuts[new_rank])), min(end, int(cuts[new_rank + 1]))
            if a >= end:
                break
            if b > a:
                start = taken + a - offset
                pieces.append(Window(shards, b - a, rank, start, start + b - a))
                ranks.append(new_rank)
        offset = end
    piece_ranks = np.asarray(ranks, dtype=np.int64)
    rest = order[whole]
    shard_ranks = np.arange(len(rest), dtype=np.int64) % new_world
    return Remainder(new_world, tuple(pieces), piece_ranks, rest, shard_ranks)


def rank_windows(rest: Remainder, counts, rank: int, per_window: int) -> list[Window]:
    """New rank ``rank``'s windows of the rest of the epoch, in reading order: its pieces, then its whole shards."""
    counts = np.asarray(counts, dtype=np.int64)
    windows = [p for p, r in zip(rest.pieces, rest.piece_ranks) if r == rank]
    mine = rest.shards[rest.shard_ranks == rank]
    for start, stop in partition.window_bounds(len(mine), per_window):
        shards = mine[start:stop]
        windows.append(Window(tuple(int(s) for s in shards), int(counts[shards].sum())))
    return windows


def remainder_steps(rest: Remainder, counts, per_window: int, batch_size: int) -> int:
    """Steps every new rank takes in the rest of the epoch: whole batches per window, the minimum
    over ranks (vectorised over the shards: every rank computes it for all)."""
    counts = np.asarray(counts, dtype=np.int64)
    world = rest.world
    batches = np.zeros(world, dtype=np.int64)
    for piece, rank in zip(rest.pieces, rest.piece_ranks):  # at most old + new world pieces
        batches[rank] += piece.samples // batch_size
    if len(rest.shards):
        ranks = rest.shard_ranks  # round-robin: shard i is rank i % world's (i // world)-th
        window = np.arange(len(rest.shards)) // world // per_window
        samples = np.zeros((world, int(window.max()) + 1), dtype=np.int64)
        np.add.at(samples, (ranks, window), counts[rest.shards])
        batches += (samples // batch_size).sum(axis=1)
    return int(batches.min())


def windows_digest(windows: list[Window]) -> str:
    """A short digest of one new rank's windows, stored with its position to catch a changed plan."""
    h = hashlib.sha256(repr([(w.shards, w.old_rank, w.start, w.stop) for w in windows]).encode())
    return h.hexdigest()[:16]
