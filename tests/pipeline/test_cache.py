"""A shard folder read straight from S3 (moto's server on 127.0.0.1 behind a fault proxy) through
a rank's bounded cache: the same batches as from local disk, the cache never over its limit,
faults retried or named in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moco_dali.pipeline import cache, shards
from moco_dali.pipeline.loader import ViewLoader
from moco_dali.pipeline.recipes import v2
from moco_dali.pipeline.shards import ShardError
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.cli import main as shards_main
from moco_dali.tools.shards.settings import BuildSettings
from tests.conftest import baseline_jpeg, loader_config, write_files


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    # 7 shards of 6 samples: 4 windows per epoch when the cache holds 2 windows of 2 shards
    root = tmp_path_factory.mktemp("cache")
    for i in range(42):
        write_files(root / "dump" / f"c{i % 3}", {f"{i:04d}.jpg": baseline_jpeg(40, 32, seed=i)})
    out = root / "shards"
    build(
        [str(root / "dump")],
        out,
        BuildSettings(labels="folder", max_count=6),
        workers=0,
        progress=False,
    )
    return out


def _pushed(folder: Path, bucket: str) -> str:
    url = f"s3://{bucket}/train"
    assert shards_main(["push", str(folder), url]) == 0
    return url


def _limit(folder: Path, per_window: int) -> int:
    """The cache limit that makes windows of ``per_window`` of the folder's largest shards."""
    m = shards.load_manifest(folder)
    largest = max(e.bytes + cache.index_bound(e.samples) for e in m.shards)
    return 2 * per_window * largest + largest // 2


def config(**kw):
    return loader_config(**{"batch_size": 4, "threads": 2, "shuffle_buffer": 8, "keys": True, **kw})


def _epochs(loader, epochs: int, watch: Path | None = None) -> list:
    batches = []
    for _ in range(epochs):
        for batch in loader:
            batches.append(batch)
            if watch is not None:  # what the cache holds on disk, at every step
                held = sum(p.stat().st_size for p in watch.rglob("*") if p.is_file())
                assert held <= loader.cache.limit
    return batches


def test_a_folder_in_the_store_gives_the_local_folders_batches_through_a_bounded_cache(
    s3, folder, tmp_path
):
    bucket, faults = s3
    url = _pushed(folder, bucket)
    limit = _limit(folder, 2)
    cfg = config(cache_limit=limit, cache_dir=str(tmp_path / "cache"), max_window_samples=12)
    (tmp_path / "cache").mkdir()
    local = _epochs(ViewLoader(folder, v2(size=16), cfg), 2)
    faults.log.clear()
    faults.throttle, faults.cut = 3, 3  # the store slows down and drops bodies: all retried
    remote = ViewLoader(url, v2(size=16), cfg)
    assert remote.manifest.url == url and remote.cache is not None
    got = _epochs(remote, 2, watch=tmp_path / "cache")
    assert [b.keys for b in got] == [b.keys for b in local] and len(got) == 2 * len(remote)
    assert all(
        torch.equal(a.view_q, b.view_q)
        and torch.equal(a.view_k, b.view_k)
        and torch.equal(a.labels, b.labels)
        for a, b in zip(got, local)
    )
    stats = remote.cache.stats
    assert 0 < stats.peak_bytes <= limit
    # Every shard fetched once per epoch (the next epoch's first window while the last trains).
    tars = [p for m, p in faults.log if m == "GET" and p.endswith(".tar")]
    assert len(set(tars)) == 7 and len(tars) - 3 <= 2 * 7 + 2
    remote.cache.close()
    assert not list((tmp_path / "cache").iterdir())


def test_a_resume_from_the_store_gives_identical_batches(s3, folder, tmp_path):
    bucket, _ = s3
    url = _pushed(folder, bucket)
    cfg = config(cache_limit=_limit(folder, 1), max_window_samples=12)
    loader = ViewLoader(url, v2(size=16), cfg)
    epoch = iter(loader)
    for _ in range(5):
        next(epoch)
    state = loader.state_dict()
    assert state["window"] >= 1 and state["per_window"] == 1
    expected = list(epoch)
    got = list(ViewLoader(url, v2(size=16), cfg, state=state))
    assert [b.keys for b in got] == [b.keys for b in expected]
    assert all(torch.equal(a.view_q, b.view_q) for a, b in zip(got, expected))
    # Another cache limit makes other windows: the saved position is refused, not misread.
    with pytest.raises(ShardError, match="windows of 1 shards, this one 2.*data.cache_limit"):
        ViewLoader(url, v2(size=16), config(cache_limit=_limit(folder, 2)), state=state)


def test_a_corrupted_object_is_refused_by_name_and_nothing_partial_stays(s3, folder, tmp_path):
    bucket, faults = s3
    url = _pushed(folder, bucket)
    (tmp_path / "cache").mkdir()
    cfg = config(cache_limit=_limit(folder, 1), cache_dir=str(tmp_path / "cache"))
    faults.corrupt = True
    with pytest.raises(ShardError) as caught:
        list(ViewLoader(url, v2(size=16), cfg))
    message = str(caught.value)
    assert message.startswith(f"{url}/") and "do not match" in message and "\n" not in message
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name[0] == "."]


def test_refusals_name_the_store_object_or_the_limit_in_one_line(s3, folder):
    bucket, faults = s3
    url = _pushed(folder, bucket)
    with pytest.raises(ShardError, match=r"data.cache_limit 1000 bytes cannot hold two"):
        ViewLoader(url, v2(size=16), config(cache_limit=1000))
    with pytest.raises(ShardError, match=rf"^s3://{bucket}/elsewhere/manifest.json: no such"):
        ViewLoader(f"s3://{bucket}/elsewhere", v2(size=16), config())
    faults.deny = True
    with pytest.raises(
        ShardError, match=r"manifest.json: access denied \(403\); check the credentials$"
    ):
        ViewLoader(url, v2(size=16), config())


def test_a_local_folder_reads_no_store(folder, monkeypatch):
    monkeypatch.setattr(cache, "Store", None)  # any use of the store would fail
    loader = ViewLoader(folder, v2(size=16), config(cache_limit=1))
    assert loader.cache is None and loader.manifest.url is None and next(iter(loader))
    assert os.fspath(loader.manifest.root) == os.fspath(folder)
