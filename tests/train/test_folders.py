"""The folder a run writes is its own: locked for the run's life, on one process or several."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moco_dali.common.lock import FolderLock
from moco_dali.tools.demo.data import generated_dump
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.settings import BuildSettings
from moco_dali.train import checkpoint
from moco_dali.train.cli import main
from moco_dali.train.folders import LOCK_NAME
from tests.conftest import free_port
from tests.train.runs import REPO, TINY


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lock")
    generated_dump(
        root / "raw", per_class=4, seed=0
    )  # 40 images: one batch of 32, 16 per rank of 2
    settings = BuildSettings(max_count=20)
    build([str(root / "raw")], root / "train", settings, workers=0, progress=False)
    return root / "train"


def in_use(out: Path) -> str:
    return (
        f"moco-train: error: run.out {out}: in use by another moco-train run (process "
        f"{os.getpid()} on {socket.gethostname()} holds {LOCK_NAME}); wait for it to end or use "
        "another run.out"
    )


def test_a_second_run_into_a_folder_in_use_exits_2_and_writes_nothing(shards, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--data.train", str(shards), "--run.out", str(out), "--run.max_steps", "1"]
    with FolderLock(out / LOCK_NAME, "moco-train run", "run.out", create=True):  # a running run
        assert main(args) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == in_use(out)
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    assert checkpoint.latest(out).name == "ckpt-000000001.pt"
    assert not (out / LOCK_NAME).exists()  # let go, and removed, at the end


def test_every_rank_of_a_refused_run_exits_2_none_waits_for_rank_0(shards, tmp_path):
    """Rank 0 alone takes the lock; the others learn it was refused and stop with it."""
    out = tmp_path / "run"
    port = str(free_port())
    command = [
        sys.executable,
        "-m",
        "moco_dali.train",
        *TINY,
        "--data.train",
        str(shards),
        "--run.out",
        str(out),
        "--run.max_steps",
        "1",
        "--run.dist_timeout_s",
        "120",
    ]
    with FolderLock(out / LOCK_NAME, "moco-train run", "run.out", create=True):
        ranks = [
            subprocess.Popen(
                command,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={
                    **os.environ,
                    "OMP_NUM_THREADS": "1",
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port,
                    "WORLD_SIZE": "2",
                    "RANK": str(rank),
                    "LOCAL_RANK": str(rank),
                },
            )
            for rank in range(2)
        ]
        try:
            ended = [rank.communicate(timeout=150) for rank in ranks]
        finally:
            for rank in ranks:
                rank.kill()
    for rank, (_, stderr) in zip(ranks, ended):
        assert rank.returncode == 2, stderr[-2000:]
        assert stderr.strip().splitlines()[-1] == in_use(out)
    assert not out.exists()  # nothing written: the folder was made for the held lock alone
