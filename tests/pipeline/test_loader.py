"""The DALI view pipeline on the CPU: layout, coverage, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moco_dali.pipeline import shards
from moco_dali.pipeline.augment import EvalConfig, custom, preset, v1, v2
from moco_dali.pipeline.loader import LoaderConfig, ViewLoader
from moco_dali.pipeline.shards import ShardError
from tests.conftest import baseline_jpeg, write_files
from moco_dali.tools.shards.build import BuildSettings, build

MEAN, STD = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255


def make_folder(root: Path, count: int, classes: int = 0, **jpeg) -> Path:
    dump = root / "dump"
    for i in range(count):
        folder = dump / f"c{i % classes}" if classes else dump
        write_files(folder, {f"{i:04d}.jpg": baseline_jpeg(seed=i, **jpeg)})
    out = root / "shards"
    build([str(dump)], out, BuildSettings(labels="folder" if classes else "none", max_count=max(count // 3, 1)),
          workers=0, progress=False)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("loader"), 50, classes=5, width=48, height=40)


def config(**kw) -> LoaderConfig:
    return LoaderConfig(**{"batch_size": 8, "threads": 2, "shuffle_buffer": 16, **kw})


def test_views_are_channels_last_normalised_and_differ(folder):
    loader = ViewLoader(folder, v2(size=32), config(dtype="float16"))
    batch = next(iter(loader))
    for view in (batch.view_q, batch.view_k):
        assert view.shape == (8, 3, 32, 32) and view.dtype == torch.float16
        assert view.is_contiguous(memory_format=torch.channels_last)
        assert view.stride() == (32 * 32 * 3, 1, 32 * 3, 3)
        low, high = (0 - MEAN) / STD, (255 - MEAN) / STD
        assert view.float().min() >= low.min() - 0.01 and view.float().max() <= high.max() + 0.01
    assert not torch.equal(batch.view_q, batch.view_k)
    assert batch.labels.dtype == torch.int64 and set(batch.labels.tolist()) <= set(range(5))
    loader32 = ViewLoader(folder, v1(size=24), config(dtype="float32"))
    assert next(iter(loader32)).view_q.dtype == torch.float32


def test_labels_and_keys_match_the_manifest(folder):
    loader = ViewLoader(folder, EvalConfig(resize=40, size=32), config(keys=True, shuffle=False, last_batch="partial"))
    truth = {}
    manifest, pairs = shards.discover(folder)
    for tar, idx in pairs:
        with open(tar, "rb") as f:
            for members in shards.read_index(idx):
                _, offset, size, name = next(m for m in members if m[0] == "json")
                f.seek(offset)
                truth[name.split(".")[0]] = Path(json.loads(f.read(size))["source"]).parent.name
    for batch in loader:
        assert batch.view_k is None and batch.view_q.shape[1:] == (3, 32, 32)
        for key, label in zip(batch.keys, batch.labels.tolist()):
            assert manifest.classes[label] == truth[key]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_key_once_per_epoch_across_ranks(folder, world):
    for epoch in range(2):  # the second epoch reshuffles and still covers everything once
        seen = []
        for rank in range(world):
            loader = ViewLoader(folder, EvalConfig(resize=40, size=32),
                                config(keys=True, last_batch="partial", seed=7), rank=rank, world=world)
            for _ in range(epoch):
                list(loader)
            seen += [key for batch in loader for key in batch.keys]
        assert sorted(seen) == sorted(set(seen)) and len(seen) == 50


@pytest.mark.parametrize("world", [2, 3])
def test_training_epochs_have_equal_steps_on_every_rank_and_disjoint_slices(folder, world):
    steps, keys = [], []
    for rank in range(world):
        loader = ViewLoader(folder, v2(size=16), config(keys=True, batch_size=4), rank=rank, world=world)
        batches = list(loader)
        steps.append(len(batches))
        keys.append({k for b in batches for k in b.keys})
        assert len(loader) == len(batches) == (50 // world) // 4 and loader.epoch == 1
        assert len(list(loader)) == len(batches)  # and again next epoch
    assert len(set(steps)) == 1
    assert all(not (a & b) for i, a in enumerate(keys) for b in keys[i + 1:])


def test_checkpoint_and_restore_give_identical_batches(folder):
    loader = ViewLoader(folder, v2(size=16), config(keys=True, batch_size=4))
    epoch = iter(loader)
    for _ in range(3):
        next(epoch)
    state = loader.state_dict()
    expected = [next(epoch) for _ in range(4)]
    resumed = ViewLoader(folder, v2(size=16), config(keys=True, batch_size=4), state=state)
    assert (resumed.epoch, resumed.step_in_epoch) == (0, 3)
    got = list(zip(range(4), iter(resumed)))
    for (_, batch), want in zip(got, expected):
        assert batch.keys == want.keys
        assert torch.equal(batch.view_q, want.view_q) and torch.equal(batch.view_k, want.view_k)
        assert torch.equal(batch.labels, want.labels)


def test_clear_errors(tmp_path, folder):
    with pytest.raises(ShardError, match="no manifest"):
        ViewLoader(tmp_path, v2())
    with pytest.raises(ShardError, match="batch of 64 is larger than rank 1's slice of 16 samples"):
        ViewLoader(folder, v2(size=16), config(batch_size=64), rank=1, world=3)
    with pytest.raises(ValueError, match="dtype must be one of"):
        config(dtype="int8")
    with pytest.raises(ValueError, match="last_batch must be"):
        config(last_batch="wrap")
    with pytest.raises(ValueError, match="hw_decoder_load"):
        config(hw_decoder_load=2.0)
    with pytest.raises(ValueError, match="rank 3 is not in 0..2"):
        ViewLoader(folder, v2(), config(), rank=3, world=3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            ViewLoader(folder, v2(), config(), device_id=0)
    with pytest.raises(ValueError, match="unknown augmentation fields: colour"):
        custom(colour=1)
    with pytest.raises(ValueError, match="crop_scale"):
        custom(crop_scale=(0.9, 0.2))
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        preset("v3")


def test_missing_and_stale_indexes_are_refused(tmp_path):
    folder = make_folder(tmp_path, 12, width=32, height=32)
    idx = sorted(folder.glob("*.idx"))[1]
    text = idx.read_text()
    idx.unlink()
    with pytest.raises(ShardError, match="index of shard .* is missing"):
        ViewLoader(folder, v2(size=16), config(batch_size=2))
    lines = text.splitlines(keepends=True)
    idx.write_text(shards.index_header(len(lines) - 2) + "".join(lines[1:-1]))  # one sample short
    with pytest.raises(ShardError, match="stale index"):
        ViewLoader(folder, v2(size=16), config(batch_size=2))


def test_a_sample_that_fails_to_decode_is_named(tmp_path):
    folder = make_folder(tmp_path, 12, width=32, height=32)
    manifest = shards.load_manifest(folder)
    tar = folder / manifest.shards[1].tar
    _, offset, _, name = shards.read_index(tar.with_suffix(".idx"))[2][0]
    data = bytearray(tar.read_bytes())
    data[offset:offset + 4] = b"JUNK"
    tar.write_bytes(bytes(data))
    loader = ViewLoader(folder, v2(size=16), config(batch_size=2, shuffle=False))
    with pytest.raises(ShardError, match=f"{tar.name}: key {name.split('.')[0]}: does not decode"):
        list(loader)


@pytest.mark.gpu
def test_gpu_mode_hands_over_cuda_tensors(folder):
    loader = ViewLoader(folder, v2(size=32), config(), device_id=0)
    batch = next(iter(loader))
    assert batch.view_q.is_cuda and batch.view_q.is_contiguous(memory_format=torch.channels_last)
    assert batch.labels.is_cuda


def test_yiq_hue_mode_runs(folder):
    batch = next(iter(ViewLoader(folder, custom(v2(size=16), hue_space="yiq"), config())))
    assert batch.view_q.shape == (8, 3, 16, 16)
    with pytest.raises(ValueError, match="hue_space"):
        custom(hue_space="lab")
