"""moco-bench store: the view pipeline from a local S3 endpoint (moto in a process of its own,
behind a shaped link) through the cache, beside the same windows from local disk, one record."""

import json

from moco_dali.pipeline import cache, shards
from moco_dali.tools.bench import cli as bench
from moco_dali.tools.bench.report import headline, load
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.settings import BuildSettings
from tests.conftest import baseline_jpeg, write_files

TINY = ["--data.batch_size", "4", "--data.views.size", "32", "--data.threads", "1"]


def test_store_mode_reads_the_same_windows_both_ways_within_the_cache_limit(tmp_path, capsys):
    write_files(
        tmp_path / "photos", {f"{i:03d}.jpg": baseline_jpeg(48, 40, seed=i) for i in range(32)}
    )
    folder = tmp_path / "shards"
    build([str(tmp_path / "photos")], folder, BuildSettings(max_count=4), workers=0, progress=False)
    entries = shards.load_manifest(folder).shards
    largest = max(e.bytes + cache.index_bound(e.samples) for e in entries)
    limit = 8 * largest + 100  # windows of 4 of the 8 shards: 2 windows an epoch
    out = tmp_path / "store.json"
    argv = ["store", "--shards", str(folder), "--reps", "1", "--out", str(out), *TINY]
    argv += ["--data.cache_limit", str(limit), "--bandwidth-mb-s", "50", "--latency-ms", "5"]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "store/local" in printed and "50 MB/s, 5 ms to first byte" in printed
    record = json.loads(out.read_text())
    held = record["cache"]
    assert held["shards_per_window"] == 4 and held["windows_timed"] == 2
    assert 0 < held["peak_bytes"] <= held["limit_bytes"] == limit and held["within_limit"]
    for side in ("local", "store"):  # whole epochs: every sample of the folder, both ways
        assert [e["pairs"] for e in record[side]["epochs"]] == [32]
    assert (
        record["store_vs_local"] == record["store"]["pairs_per_s"] / record["local"]["pairs_per_s"]
    )
    assert record["goal"]["met"] == (record["store_vs_local"] >= 0.95)
    load(out)  # the declared schema, as --compare reads it
    assert [row["labels"] for row in headline(record)] == [["store", "local disk"]]


def test_store_options_are_checked_before_any_work(tmp_path, capsys):
    assert bench.main(["store", "--store", "http://example.com/x"]) == 2
    assert "--store http://example.com/x: not an s3:// address" in capsys.readouterr().err
    assert bench.main(["store", "--bandwidth-mb-s", "0"]) == 2
    assert "--bandwidth-mb-s must be in (0, 1e6]" in capsys.readouterr().err
