"""Which shards each rank reads in an epoch, and in which windows: pure functions of the counts.

The manifest's per-shard sample counts go in, shard indices and step counts come out, so every
rank computes the same answer alone, in O(shards) vectorised work, and a unit test of millions
of fake shards opens no file. Shards are sorted by count and dealt round-robin (equal counts in
an order seeded by (seed, epoch)); a rank reads its share as windows of whole shards, each a
DALI reader of its own. docs/design.md says why.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = [
    "epoch_order",
    "rank_shards",
    "shards_per_window",
    "window_bounds",
    "rank_window_samples",
    "window_batches",
    "steps_per_epoch",
    "assignment_digest",
]


def _counts(counts) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("counts must be a 1-d array of non-negative sample counts")
    return counts


def epoch_order(counts, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """A permutation of the shard indices: count descending, equal counts in a (seed, epoch) order.

    Without ``shuffle`` equal counts keep their manifest order.
    """
    counts = _counts(counts)
    if not shuffle:
        return np.argsort(-counts, kind="stable")
    keys = np.random.default_rng([seed, epoch]).random(len(counts))
    return np.lexsort((keys, -counts))  # the last key is the primary one


def rank_shards(order: np.ndarray, world: int, rank: int) -> np.ndarray:
    """The shard indices rank ``rank`` reads this epoch, in reading order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    return order[rank::world]


def shards_per_window(counts, max_window_samples: int, max_window_shards: int = 8192) -> int:
    """Shards per DALI reader: as many of the largest shards as fit ``max_window_samples``, at most
    ``max_window_shards`` (at least one).

    The shard cap is there because DALI's reader maps every tar of its window into
    memory, one mapping each, and Linux allows 65,530 per process by default
    (``vm.max_map_count``): a window of 100,000 small shards cannot be built.
    """
    counts = _counts(counts)
    if max_window_samples < 1:
        raise ValueError(f"max_window_samples must be at least 1, got {max_window_samples}")
    if max_window_shards < 1:
        raise ValueError(f"max_window_shards must be at least 1, got {max_window_shards}")
    largest = int(counts.max()) if len(counts) else 1
    return max(1, min(max_window_samples // max(largest, 1), max_window_shards))


def window_bounds(num_shards: int, per_window: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each window over a rank's ``num_shards`` shards."""
    return [
        (start, min(start + per_window, num_shards)) for start in range(0, num_shards, per_window)
    ]


def rank_window_samples(counts, world: int, rank: int, per_window: int) -> np.ndarray:
    """Samples in each of rank ``rank``'s windows; the same in every epoch."""
    return _windows_of(np.sort(_counts(counts))[::-1], world, rank, per_window)


def _windows_of(ordered: np.ndarray, world: int, rank: int, per_window: int) -> np.ndarray:
    # A rank's counts, whatever the epoch, are the descending counts from position
    # ``rank`` on, every ``world``-th (equal counts are interchangeable).
    mine = ordered[rank::world]
    if not len(mine):
        return np.zeros(0, dtype=np.int64)
    return np.add.reduceat(mine, np.arange(0, len(mine), per_window))


def window_batches(window_samples: np.ndarray, batch_size: int, drop: bool) -> np.ndarray:
    """Batches each window yields: whole ones only (``drop``), or every sample once (the last batch short)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return window_samples // batch_size if drop else -(-window_samples // batch_size)


def steps_per_epoch(counts, world: int, batch_size: int, per_window: int) -> int:
    """Steps every rank takes per epoch with whole batches: the minimum over ranks, from the counts alone."""
    counts = _counts(counts)
    if len(counts) < world:
        return 0
    ordered = np.sort(counts)[::-1]
    return int(
        min(
            window_batches(_windows_of(ordered, world, rank, per_window), batch_size, True).sum()
            for rank in range(world)
        )
    )


def assignment_digest(shard_indices: np.ndarray, num_shards: int) -> str:
    """A short digest of one rank's epoch assignment, stored with the loader's state to catch a changed manifest."""
    h = hashlib.sha256(np.asarray(shard_indices, dtype=np.int64).tobytes())
    h.update(str(num_shards).encode())
    return h.hexdigest()[:16]
