"""Pretraining on unlabelled shards (``--labels none``): moco-train runs, its kNN monitor only on a
separate labelled pair of folders."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from moco_dali.tools.demo.data import generated_dump
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.settings import BuildSettings
from moco_dali.train.cli import main
from tests.train.runs import TINY, losses, metrics, train_here


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unlabelled")
    generated_dump(root / "raw", per_class=8, seed=0)  # 80 images: 2 steps of 32 an epoch
    generated_dump(root / "raw-val", per_class=3, seed=1)
    for name, raw, labels in (
        ("unlabelled", "raw", "none"),
        ("knn_train", "raw", "folder"),
        ("knn_val", "raw-val", "folder"),
    ):
        build(
            [str(root / raw)],
            root / name,
            BuildSettings(labels=labels, max_count=40),
            workers=0,
            progress=False,
        )
    return {name: root / name for name in ("unlabelled", "knn_train", "knn_val")}


def test_moco_train_runs_on_unlabelled_shards_with_the_knn_monitor_off(folders, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="moco-train")
    out = tmp_path / "run"
    code = train_here(
        *TINY,
        "--run.knn_every",
        "1",  # asked for, but there is no labelled pair to run it on
        "--data.train",
        str(folders["unlabelled"]),
        "--run.out",
        str(out),
        "--run.max_steps",
        "3",
    )
    assert code == 0
    assert sorted(losses(out)) == [1, 2, 3]
    assert not [r for r in metrics(out) if r["kind"] == "knn"]
    assert "kNN monitor off" in caplog.text


def test_the_knn_monitor_runs_on_a_labelled_pair_beside_unlabelled_training_shards(
    folders, tmp_path
):
    out = tmp_path / "run"
    code = train_here(
        *TINY,
        "--run.knn_every",
        "1",
        "--run.epochs",
        "1",
        "--data.train",
        str(folders["unlabelled"]),
        "--data.knn_train",
        str(folders["knn_train"]),
        "--data.knn_val",
        str(folders["knn_val"]),
        "--run.out",
        str(out),
    )
    assert code == 0
    (knn,) = [r for r in metrics(out) if r["kind"] == "knn"]
    assert 0 <= knn["top1"] <= 100 and knn["top1"] <= knn["top5"]


def test_an_unlabelled_folder_as_the_knn_monitors_is_refused_before_a_step(
    folders, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = [*TINY, "--data.train", str(folders["unlabelled"]), "--run.out", str(out)]
    argv += ["--run.knn_every", "1", "--data.knn_train", str(folders["unlabelled"])]
    argv += ["--data.knn_val", str(folders["knn_val"])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moco-train: error: data.knn_train ") and "\n" not in err
    assert str(folders["unlabelled"]) in err and "needs labelled shards" in err
    assert not (out / "metrics.jsonl").exists()
