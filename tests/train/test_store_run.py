"""moco-train on a shard folder in S3 (moto's server on 127.0.0.1 behind a fault proxy): a store
that throttles and drops connections gives the losses of a run from local disk; a store that is
gone ends the run in one line, its last checkpoint intact."""

from __future__ import annotations

from pathlib import Path

import pytest

from moco_dali.pipeline import cache
from moco_dali.tools.demo.data import generated_dump
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.cli import main as shards_main
from moco_dali.tools.shards.settings import BuildSettings
from moco_dali.train import checkpoint
from moco_dali.train.cli import main
from tests.train.runs import TINY, losses

# Windows of one shard, from the store as from local disk (the cache limit holds two of them):
# shards of 32, 32 and 16 samples, 2 steps of 32 per epoch.
WINDOWS = ["--data.max_window_samples", "32", "--data.cache_limit", str(3 << 20)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store-run")
    generated_dump(root / "raw", per_class=8, seed=0)
    build(
        [str(root / "raw")],
        root / "train",
        BuildSettings(labels="none", max_count=32),
        workers=0,
        progress=False,
    )
    return root / "train"


def test_a_run_from_the_store_gives_the_local_runs_losses_and_an_outage_one_line(
    s3, folder, tmp_path, capsys, monkeypatch
):
    bucket, faults = s3
    url = f"s3://{bucket}/train"
    assert shards_main(["push", str(folder), url]) == 0
    local, remote = tmp_path / "local", tmp_path / "remote"
    argv = [*TINY, *WINDOWS, "--run.ckpt_every", "1"]
    assert (
        main([*argv, "--run.epochs", "1", "--data.train", str(folder), "--run.out", str(local)])
        == 0
    )
    capsys.readouterr()

    # The store slows down and drops bodies (retried: the same batches), then, once the first
    # epoch's last window is in, goes away: the second epoch's first window never comes.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")  # a store gone is known sooner
    faults.throttle, faults.cut = 2, 2
    real, calls = cache.ShardCache.pairs, []

    def pairs(self, window):
        got = real(self, window)
        calls.append(window)
        if len(calls) == 2:
            faults.throttle = 1 << 30
        return got

    monkeypatch.setattr(cache.ShardCache, "pairs", pairs)
    argv += ["--run.epochs", "2", "--data.train", url, "--run.out", str(remote)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the run's log lines, then its end
    assert err[-1].startswith(f"moco-train: error: {url}/shard-") and "SlowDown" in err[-1]
    assert not any("Traceback" in line for line in err) and len(calls) == 2
    assert losses(remote) == losses(local) and len(losses(local)) == 2
    assert checkpoint.load(checkpoint.latest(remote))["step"] == 2
