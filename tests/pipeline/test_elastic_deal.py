"""The rest of an interrupted epoch dealt to another world size, simulated on counts alone.

Each old rank's reader hands out its window in a random order (what DALI's shuffle buffer
does); the simulation counts every sample key read before the checkpoint at W ranks and after
it at W' ranks, through the same deal and step rule the loader uses.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from moco_dali.pipeline import elastic, partition


def simulate(counts, seed, old_world, old_batch, new_world, new_batch, per_window, step, rng):
    """Keys read before and after a checkpoint at ``step`` of epoch 0; the deal; the steps after."""
    counts = np.asarray(counts)
    order = partition.epoch_order(counts, seed, 0)
    steps = partition.steps_per_epoch(counts, old_world, old_batch, per_window)
    read: Counter = Counter()
    emitted, windows, window_steps = {}, [], []
    for rank in range(old_world):
        mine = partition.rank_shards(order, old_world, rank)
        left, position = step, None
        for w, (a, b) in enumerate(partition.window_bounds(len(mine), per_window)):
            samples = [(int(s), i) for s in mine[a:b] for i in range(counts[s])]
            emitted[rank, w] = [samples[i] for i in rng.permutation(len(samples))]
            take = min(len(samples) // old_batch, left)
            read.update(emitted[rank, w][: take * old_batch])
            left -= take
            if position is None and (left == 0 and take < len(samples) // old_batch):
                position = (w, take)
            elif position is None and left == 0 and rng.random() < 0.5:
                # the loader may save a finished window before moving past it
                position = (w, take)
        if position is None:
            position = (len(partition.window_bounds(len(mine), per_window)), 0)
        windows.append(position[0])
        window_steps.append(position[1])
    old = elastic.OldWorld(old_world, old_batch, tuple(windows), tuple(window_steps))
    rest = elastic.remainder(counts, order, per_window, old, new_world, new_batch)
    after = elastic.remainder_steps(rest, counts, per_window, new_batch)
    plans = [elastic.rank_windows(rest, counts, r, per_window) for r in range(new_world)]
    for plan in plans:
        left = after
        for window in plan:
            if window.old_rank >= 0:
                key = (window.old_rank, windows[window.old_rank])
                samples = emitted[key][window.start : window.stop]
            else:
                samples = [(s, i) for s in window.shards for i in range(counts[s])]
            take = min(window.samples // new_batch, left)
            read.update(samples[i] for i in rng.permutation(len(samples))[: take * new_batch])
            left -= take
        assert left == 0, "a new rank ran out of samples before the common step count"
    return read, steps, after, plans, rest


worlds = st.integers(1, 16)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    old_world=worlds,
    new_world=worlds,
    shards=st.integers(1, 60),
    per_shard=st.lists(st.integers(1, 12), min_size=1, max_size=60),
    old_batch=st.integers(1, 6),
    new_batch=st.integers(1, 6),
    per_window=st.integers(1, 5),
    at=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_no_sample_is_read_twice_and_the_rest_ends_as_an_epoch_does(
    old_world, new_world, shards, per_shard, old_batch, new_batch, per_window, at, seed
):
    counts = (per_shard * shards)[:shards]
    steps = partition.steps_per_epoch(counts, old_world, old_batch, per_window)
    assume(steps >= 1)
    step = min(int(at * steps), steps - 1)
    rng = np.random.default_rng(seed)
    read, _, after, plans, rest = simulate(
        counts, seed, old_world, old_batch, new_world, new_batch, per_window, step, rng
    )
    assert max(read.values(), default=1) == 1
    assert sum(read.values()) == step * old_world * old_batch + after * new_world * new_batch
    # What the rest leaves unread is the epoch end's rule: under a batch per window, and the
    # deal's unevenness (round-robin over count-sorted pieces: at most the largest of each kind).
    left = sum(p.samples for p in rest.pieces) + int(np.asarray(counts)[rest.shards].sum())
    largest = max([p.samples for p in rest.pieces] + [max(counts)])
    most_windows = max(len(plan) for plan in plans)
    assert left - after * new_world * new_batch <= new_world * (
        2 * largest + most_windows * new_batch
    )
    # O(shards / world) per rank: a new rank reads its share of the unread parts of the old
    # windows (a batch more at most), from a run of the old windows laid end to end, and its share of the
    # whole shards; no window holds more than per_window shards.
    unread = sum(p.samples for p in rest.pieces)
    for plan in plans:
        pieces = [w for w in plan if w.old_rank >= 0]
        olds = [w.old_rank for w in pieces]
        assert olds == sorted(set(olds))
        assert sum(w.samples for w in pieces) <= unread / new_world + 2 * new_batch
        whole = sum(len(w.shards) for w in plan if w.old_rank < 0)
        assert whole <= math.ceil(len(rest.shards) / new_world)
        assert all(len(w.shards) <= per_window for w in plan)


@settings(max_examples=100, deadline=None)
@given(
    small=st.integers(1, 4),
    factor=st.integers(1, 4),
    grow=st.booleans(),
    per_window=st.integers(1, 3),
    batch_units=st.integers(1, 3),
    at=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_when_the_world_divides_every_sample_is_read_exactly_once(
    small, factor, grow, per_window, batch_units, at, seed
):
    """W -> W' with one a multiple of the other, the global batch kept, equal shards that hold
    whole batches, one window per old rank, and a checkpoint mid-window at a whole new batch:
    every key exactly once (the unread part of each window cuts into equal pieces)."""
    large = small * factor
    old_world, new_world = (small, large) if grow else (large, small)
    global_batch = large * batch_units
    old_batch, new_batch = global_batch // old_world, global_batch // new_world
    per_shard = global_batch * factor  # whole batches of either size, splits included
    shards = old_world * per_window
    counts = [per_shard] * shards
    steps = partition.steps_per_epoch(counts, old_world, old_batch, per_window)
    # a checkpoint where each old rank's taken samples are whole new batches
    unit = new_batch // math.gcd(old_batch, new_batch)
    step = (int(at * steps) // unit) * unit
    assume(0 < step < steps)
    read, *_ = simulate(
        counts,
        seed,
        old_world,
        old_batch,
        new_world,
        new_batch,
        per_window,
        step,
        np.random.default_rng(seed),
    )
    assert len(read) == sum(counts) and set(read.values()) == {1}


def test_a_million_shards_are_dealt_in_a_second():
    """The counts-only work every new rank does at a resume: no file, nothing per sample."""
    counts = np.random.default_rng(0).integers(9_000, 10_001, size=1_000_000)
    order = partition.epoch_order(counts, 0, 3)
    old = elastic.OldWorld(4, 256, (0, 0, 0, 0), (5, 5, 5, 5))
    rest = elastic.remainder(counts, order, 100, old, 7, 128)
    assert len(rest.pieces) <= 4 + 7 and len(rest.shards) == 1_000_000 - 400
    assert elastic.remainder_steps(rest, counts, 100, 128) > 0
    assert len(elastic.rank_windows(rest, counts, 3, 100)) > 1


def test_a_position_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="taken from a window"):
        elastic.remainder([4, 4], np.array([0, 1]), 1, elastic.OldWorld(1, 4, (0,), (2,)), 1, 4)
    with pytest.raises(ValueError, match="one position per rank"):
        elastic.OldWorld(2, 4, (0,), (0,))
