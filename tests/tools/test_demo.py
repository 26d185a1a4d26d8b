"""moco-demo: the README's main job on its generated fallback: shards, the measured run, its JSON, picture and verdict."""

import gzip
import json

import numpy as np
import pytest

from moco_dali.pipeline import shards
from moco_dali.tools.demo import cli, data, report


def test_idx_reader_reads_images_and_labels(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    labels = np.array([7, 3], np.uint8)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\0\0\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + images.tobytes())
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\0\0\x08\x01" + (2).to_bytes(4, "big") + labels.tobytes())
    got_images, got_labels = data.load_fashion_mnist(tmp_path, "train")
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)


def test_demo_builds_verified_labelled_shards(tmp_path, capsys):
    assert cli.main(["--generated", "--limit", "100", "--out", str(tmp_path), "--workers", "2", "--train-steps", "0",
                     "--bank", "50"]) == 0
    out = capsys.readouterr().out
    assert "verify train: OK" in out and "verify test: OK" in out and "verify bank: OK" in out
    root = tmp_path / "generated-shapes" / "shards"
    assert shards.load_manifest(root / "train").samples == 100 and len(shards.load_manifest(root / "train").classes) == 10
    bank = shards.load_manifest(root / "bank")
    assert bank.samples == 50 and len(bank.classes) == 10  # a spread subset: every class


FIGURES = ("knn_top1", "linear_top1")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same short demo twice with one seed (and the data built once)."""
    root = tmp_path_factory.mktemp("demo")
    results = []
    for run in ("a", "b"):
        argv = ["--generated", "--limit", "300", "--out", str(root), "--workers", "0", "--train-steps", "40",
                "--bank", "100", "--json", str(root / f"{run}.json"), "--png", str(root / f"{run}.png")]
        assert cli.main(argv) == 0
        results.append(json.loads((root / f"{run}.json").read_text()))
    return root, results


def test_demo_json_holds_every_printed_figure_and_a_computed_verdict(two_runs, capsys):
    root, (result, _) = two_runs
    assert {"pixels", "init", "after"} <= set(result["features"])
    for row in ("pixels", "init", "after"):
        assert all(0 <= result["features"][row][name] <= 100 for name in FIGURES)
    p = result["pretext"]
    assert p["chance_top1"] == pytest.approx(100 / (result["config"]["model"]["K"] + 1))
    # The window starts once real keys have replaced the queue's random start.
    assert p["first"]["step"] * result["config"]["data"]["batch_size"] >= result["config"]["model"]["K"]
    assert result["steps"] == 40 and result["images_per_s"] > 0 and [p["step"] for p in result["curve"]] == [10, 20, 30, 40]
    assert result["verdict"] == report.verdict(result)
    assert (root / "a.png").stat().st_size > 10_000


def test_a_second_run_with_the_same_seed_gives_the_same_figures(two_runs):
    """Exactly the same, on the CPU: same shards, same seeds, same steps (timings aside)."""
    _, (a, b) = two_runs
    assert a["features"] == b["features"] and a["curve"] == b["curve"] and a["verdict"] == b["verdict"]


def _result(init, after, first=2.0, last=9.0):
    return {"pretext": {"chance_top1": 0.02, "first": {"pretext_top1": first}, "last": {"pretext_top1": last}},
            "features": {"init": dict(zip(FIGURES, init)), "after": dict(zip(FIGURES, after))}, "epochs_seen": 0.4}


def test_the_verdict_is_computed_from_the_figures():
    assert report.verdict(_result((80, 83), (76, 82))).startswith("learning: pretext top-1 2.0% -> 9.0%")
    assert "features not yet better than a random ResNet-18" in report.verdict(_result((80, 83), (76, 82)))
    assert "features better than a random ResNet-18" in report.verdict(_result((80, 83), (85, 86)))
    assert "features partly better" in report.verdict(_result((80, 83), (79, 86)))
    assert report.verdict(_result((80, 83), (80, 83), first=2.0, last=2.5)).startswith("not learning yet")
