"""The per-epoch deal of shards to ranks and windows, on counts alone (no file is opened)."""

from __future__ import annotations

import numpy as np
import pytest

from moco_dali.pipeline import partition


def build_like_counts(samples: int, per_shard: int, parts: int = 1) -> np.ndarray:
    """Counts as ``moco-shards build`` writes them: full shards, one partial shard per build part."""
    counts = []
    for part in range(parts):
        share = samples // parts + (part < samples % parts)
        counts += [per_shard] * (share // per_shard) + (
            [share % per_shard] if share % per_shard else []
        )
    return np.array(counts, dtype=np.int64)


def deal(counts, world, seed=0, epoch=0, shuffle=True):
    order = partition.epoch_order(counts, seed, epoch, shuffle)
    return [partition.rank_shards(order, world, rank) for rank in range(world)]


@pytest.mark.parametrize(
    "counts, world",
    [
        (build_like_counts(50, 17), 2),
        (build_like_counts(10_007, 100, parts=3), 8),
        (np.random.default_rng(1).integers(1, 50, 301), 7),
        (np.full(64, 5), 64),
        (np.array([3, 0, 9, 9, 1]), 2),
    ],
)
def test_every_shard_is_dealt_once_per_epoch_and_the_deal_changes_with_the_epoch(counts, world):
    deals = [deal(counts, world, seed=3, epoch=epoch) for epoch in range(4)]
    for ranks in deals:
        dealt = np.concatenate(ranks)
        assert sorted(dealt.tolist()) == list(range(len(counts)))
    assert (
        deal(counts, world, seed=3, epoch=2)[0].tolist() == deals[2][0].tolist()
    )  # a pure function
    if len(set(counts.tolist())) < len(counts):  # shards of equal count move between epochs
        assert len({tuple(partition.epoch_order(counts, 3, epoch)) for epoch in range(10)}) > 1


def test_shares_differ_by_less_than_one_shard_and_do_not_depend_on_the_epoch():
    rng = np.random.default_rng(0)
    for trial in range(40):
        counts = rng.integers(1, 1000, rng.integers(1, 400))
        world = int(rng.integers(1, len(counts) + 1))
        shares = None
        for epoch in range(3):
            now = [int(counts[mine].sum()) for mine in deal(counts, world, seed=trial, epoch=epoch)]
            assert max(now) - min(now) <= counts.max()
            assert shares is None or now == shares
            shares = now


def test_a_full_shard_visits_many_ranks_over_epochs():
    counts = build_like_counts(100_000, 1000)  # 100 full shards
    ranks_of_shard_0 = set()
    for epoch in range(30):
        for rank, mine in enumerate(deal(counts, 8, epoch=epoch)):
            if 0 in mine:
                ranks_of_shard_0.add(rank)
    assert len(ranks_of_shard_0) >= 6  # 8 ranks; a fixed deal would give 1


def test_without_shuffle_equal_counts_keep_manifest_order():
    counts = np.array([8, 8, 5, 8])
    assert partition.epoch_order(counts, 0, 0, shuffle=False).tolist() == [0, 1, 3, 2]
    assert partition.epoch_order(counts, 0, 9, shuffle=False).tolist() == [0, 1, 3, 2]


@pytest.mark.parametrize(
    "world, batch, max_window", [(1, 4, 10**6), (2, 4, 10**6), (3, 5, 20), (8, 32, 3000), (5, 7, 1)]
)
def test_steps_are_the_minimum_over_ranks_of_whole_batches_per_window(world, batch, max_window):
    counts = build_like_counts(10_007, 100, parts=3) if world > 3 else build_like_counts(50, 17)
    per_window = partition.shards_per_window(counts, max_window)
    steps = partition.steps_per_epoch(counts, world, batch, per_window)
    brute = []
    for epoch in range(3):
        for mine in deal(counts, world, epoch=epoch):
            windows = partition.window_bounds(len(mine), per_window)
            assert sum(
                counts[mine[a:b]].sum() <= max(max_window, counts.max()) for a, b in windows
            ) == len(windows)
            brute.append(sum(int(counts[mine[a:b]].sum()) // batch for a, b in windows))
            assert (
                partition.window_batches(
                    partition.rank_window_samples(counts, world, len(brute) % world, per_window),
                    batch,
                    True,
                ).sum()
                >= steps
            )
    assert steps == min(brute)
    if world == 1 and max_window >= counts.sum():
        assert steps == counts.sum() // batch  # one window on one rank: nothing is lost


def test_window_samples_are_what_the_rank_reads():
    counts = build_like_counts(1000, 30)
    per_window = partition.shards_per_window(counts, 100)
    assert per_window == 3
    for rank, mine in enumerate(deal(counts, 3, epoch=5)):
        expected = [
            int(counts[mine[a:b]].sum()) for a, b in partition.window_bounds(len(mine), per_window)
        ]
        assert partition.rank_window_samples(counts, 3, rank, per_window).tolist() == expected
        batches = partition.window_batches(np.array(expected), 8, drop=False)
        assert batches.tolist() == [-(-n // 8) for n in expected]


def test_fewer_shards_than_ranks_gives_no_steps():
    assert partition.steps_per_epoch(np.array([100, 100]), 3, 1, 10) == 0
    assert partition.rank_window_samples(np.array([100, 100]), 3, 2, 10).tolist() == []


def test_millions_of_shards_cost_only_arrays():
    counts = np.full(2_000_000, 500, dtype=np.int64)
    counts[-1] = 17
    order = partition.epoch_order(counts, 0, 7)
    mine = partition.rank_shards(order, 1024, 1023)
    assert len(mine) == 2_000_000 // 1024 + (2_000_000 % 1024 > 1023)
    per_window = partition.shards_per_window(counts, 1_000_000)
    assert per_window == 2000
    assert partition.steps_per_epoch(counts, 1024, 256, per_window) == (1953 * 500) // 256


def test_assignment_digest_tells_assignments_apart():
    a = partition.assignment_digest(np.array([3, 1, 2]), 10)
    assert a == partition.assignment_digest(np.array([3, 1, 2]), 10)
    assert a != partition.assignment_digest(np.array([1, 3, 2]), 10)
    assert a != partition.assignment_digest(np.array([3, 1, 2]), 11)


def test_bad_arguments():
    with pytest.raises(ValueError, match="non-negative"):
        partition.epoch_order(np.array([1, -1]), 0, 0)
    with pytest.raises(ValueError, match="rank 4 is not in 0..3"):
        partition.rank_shards(np.arange(8), 4, 4)
    with pytest.raises(ValueError, match="max_window_samples"):
        partition.shards_per_window(np.array([3]), 0)
    with pytest.raises(ValueError, match="max_window_shards"):
        partition.shards_per_window(np.array([3]), 10, 0)


def test_a_window_of_many_small_shards_is_capped_by_their_number():
    """DALI maps every tar of a window (65,530 maps per process by default): 1e6 samples in
    100,000 shards of 10 would be one window of 100,000 shards, which DALI cannot build."""
    counts = np.full(100_000, 10, dtype=np.int64)
    assert partition.shards_per_window(counts, 1_000_000) == 8192
    assert partition.shards_per_window(counts, 1_000_000, 500) == 500
    assert partition.shards_per_window(counts, 2_000, 500) == 200  # the sample bound still holds
