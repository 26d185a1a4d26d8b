"""The loader's elastic resume on the CPU: keys read at W ranks then at W' counted by DALI's own output."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from moco_dali.pipeline import graph, shards
from moco_dali.pipeline.loader import ViewLoader
from moco_dali.pipeline.recipes import v2
from moco_dali.pipeline.shards import ShardError
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.settings import BuildSettings
from tests.conftest import baseline_jpeg, loader_config, write_files

GLOBAL_BATCH = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """96 samples in 6 shards of 16: whole batches at one rank or two, a window per rank."""
    root = tmp_path_factory.mktemp("elastic")
    write_files(root / "dump", {f"{i:04d}.jpg": baseline_jpeg(16, 16, seed=i) for i in range(96)})
    build(
        [str(root / "dump")],
        root / "shards",
        BuildSettings(labels="none", max_count=16),
        workers=0,
        progress=False,
    )
    return root / "shards"


def loader(folder, world, rank, **kw):
    cfg = loader_config(batch_size=GLOBAL_BATCH // world, keys=True, threads=1, shuffle_buffer=8)
    return ViewLoader(folder, v2(size=8), cfg, rank=rank, world=world, **kw)


def read(loaders, steps=None) -> Counter:
    """Keys of ``steps`` batches of every loader in lock step (the rest of the epoch: None)."""
    keys: Counter = Counter()
    iterators = [iter(x) for x in loaders]
    taken = 0
    while steps is None or taken < steps:
        batches = [next(it, None) for it in iterators]
        if any(b is None for b in batches):
            assert all(b is None for b in batches), "ranks took different step counts"
            break
        for batch in batches:
            keys.update(batch.keys)
        taken += 1
    return keys


# 2 -> 1 and 1 -> 2 through moco-train: tests/train/test_elastic.py
@pytest.mark.parametrize("old_world,new_world,at", [(1, 2, 1), (2, 3, 1)])
def test_a_mid_epoch_position_resumes_on_another_world_reading_each_key_once(
    folder, old_world, new_world, at
):
    first = [loader(folder, old_world, r) for r in range(old_world)]
    before = read(first, at)
    states = [x.state_dict() for x in first]
    second = [loader(folder, new_world, r, old_states=states) for r in range(new_world)]
    assert {x.epoch for x in second} == {0}
    after = read(second)
    both = before + after
    assert max(both.values()) == 1
    if (old_world, new_world) != (2, 3):  # the pieces divide: every key of the epoch
        assert len(both) == 96
    else:  # what is left is under a batch per piece, as at every window's end
        assert 96 - len(both) < 3 * (GLOBAL_BATCH // 3)
    # Later epochs are dealt at the new world size as usual.
    assert {x.epoch for x in second} == {1}
    nxt = read(second)
    assert max(nxt.values()) == 1
    assert len(nxt) == len(second[0]) * (GLOBAL_BATCH // new_world) * new_world


def test_a_checkpoint_inside_the_rest_resumes_the_same_batches(folder):
    states = [x.state_dict() for x in _advanced(folder, 2, 2)]
    second = [loader(folder, 1, 0, old_states=states)]
    read(second, 1)
    saved = second[0].state_dict()
    assert saved["elastic"]["world"] == 2
    expected = read(second)
    again = loader(folder, 1, 0, state=saved)
    assert read([again]) == expected
    with pytest.raises(ShardError, match="itself begun on another world size"):
        loader(folder, 2, 0, old_states=[saved])


def _advanced(folder, world, steps):
    loaders = [loader(folder, world, r) for r in range(world)]
    read(loaders, steps)
    return loaders


def test_the_replayed_order_is_the_readers_order(folder, tmp_path):
    """What an old rank had read is known from its seed and counts alone."""
    one = loader(folder, 1, 0)
    keys = [k for batch in list(iter(one))[:3] for k in batch.keys]
    manifest = shards.load_manifest(folder)
    order = graph.emission_order(
        [int(c) for c in manifest.counts[one._my_shards()]],
        seed=graph.window_seed(0, 0, 0, 0),
        shuffle=True,
        shuffle_buffer=8,
        batch_size=16,
        stop=48,
        workdir=tmp_path,
    )
    names = [
        members[0][3].split(".")[0]
        for tar, index in one.pairs
        for members in shards.read_index(index)
    ]
    assert [names[i] for i in order] == keys
