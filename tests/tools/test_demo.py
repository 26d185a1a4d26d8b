"""moco-demo: the README's main job on its generated fallback: shards, the measured run, its JSON, picture and verdict."""

import gzip
import json

import numpy as np
import pytest

from moco_dali.common.lock import FolderLock
from moco_dali.pipeline import shards
from moco_dali.tools.demo import cli, data, report


def test_idx_reader_reads_images_and_labels(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    labels = np.array([7, 3], np.uint8)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(
            b"\0\0\x08\x03"
            + (2).to_bytes(4, "big")
            + (28).to_bytes(4, "big") * 2
            + images.tobytes()
        )
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\0\0\x08\x01" + (2).to_bytes(4, "big") + labels.tobytes())
    got_images, got_labels = data.load_fashion_mnist(tmp_path, "train")
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)


def test_demo_builds_verified_labelled_shards(tmp_path, capsys):
    assert (
        cli.main(
            [
                "--generated",
                "--limit",
                "100",
                "--out",
                str(tmp_path),
                "--workers",
                "2",
                "--train-steps",
                "0",
                "--bank",
                "50",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "verify train: OK" in out and "verify test: OK" in out and "verify bank: OK" in out
    root = tmp_path / "generated-shapes" / "shards"
    assert (
        shards.load_manifest(root / "train").samples == 100
        and len(shards.load_manifest(root / "train").classes) == 10
    )
    bank = shards.load_manifest(root / "bank")
    assert bank.samples == 50 and len(bank.classes) == 10  # a spread subset: every class


def test_a_second_demo_into_a_folder_in_use_is_refused_in_one_line(tmp_path, capsys):
    argv = ["--generated", "--limit", "100", "--out", str(tmp_path), "--train-steps", "0"]
    with FolderLock(tmp_path / cli.LOCK_NAME, "moco-demo", "--out"):
        assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moco-demo: error: {tmp_path}: in use by another moco-demo (process ")
    assert err.endswith("holds .moco-demo.lock); wait for it to end or use another --out")
    assert list(tmp_path.iterdir()) == []


FIGURES = ("knn_top1", "linear_top1")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same short demo twice with one seed (and the data built once)."""
    root = tmp_path_factory.mktemp("demo")
    results = []
    for run in ("a", "b"):
        argv = [
            "--generated",
            "--limit",
            "300",
            "--out",
            str(root),
            "--workers",
            "0",
            "--train-steps",
            "40",
            "--bank",
            "100",
            "--json",
            str(root / f"{run}.json"),
            "--png",
            str(root / f"{run}.png"),
        ]
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
    assert (
        p["first"]["steps"][0] * result["config"]["data"]["batch_size"]
        >= result["config"]["model"]["K"]
    )
    assert (
        result["steps"] == 40
        and result["images_per_s"] > 0
        and [p["step"] for p in result["curve"]] == [10, 20, 30, 40]
    )
    assert result["verdict"] == report.verdict(result)
    assert (root / "a.png").stat().st_size > 10_000


def test_a_second_run_with_the_same_seed_gives_the_same_figures(two_runs):
    """Exactly the same, on the CPU: same shards, same seeds, same steps (timings aside)."""
    _, (a, b) = two_runs
    assert (
        a["features"] == b["features"] and a["curve"] == b["curve"] and a["verdict"] == b["verdict"]
    )


def _result(init, after, first=2.0, last=9.0, first_loss=7.0, last_loss=6.9):
    return {
        "pretext": {
            "chance_top1": 0.02,
            "first": {"pretext_top1": first, "loss": first_loss},
            "last": {"pretext_top1": last, "loss": last_loss},
        },
        "features": {"init": dict(zip(FIGURES, init)), "after": dict(zip(FIGURES, after))},
        "epochs_seen": 0.4,
    }


def test_the_verdict_is_computed_from_the_figures():
    assert report.verdict(_result((80, 83), (76, 82))).startswith(
        "learning: pretext top-1 2.0% -> 9.0%"
    )
    assert "features not yet better than a random ResNet-18" in report.verdict(
        _result((80, 83), (76, 82))
    )
    assert "features better than a random ResNet-18" in report.verdict(_result((80, 83), (85, 86)))
    assert "features partly better" in report.verdict(_result((80, 83), (79, 86)))
    assert report.verdict(_result((80, 83), (80, 83), first=2.0, last=2.5)).startswith(
        "not learning yet"
    )
    # a falling loss is learning even when the top-1 drifts down (a later epoch's harder negatives)
    assert report.verdict(
        _result((80, 83), (80, 83), first=3.1, last=2.3, first_loss=7.1, last_loss=5.7)
    ).startswith("learning: pretext top-1 3.1% -> 2.3%")


def test_the_pretext_window_averages_each_end_so_one_noisy_batch_cannot_flip_it():
    # the queue (K 512, batch 64) is full from step 8; a rising curve whose last logged
    # batch happens to read low
    curve = [
        {"step": s, "loss": 7.0 - s / 100, "pretext_top1": 1.0 + s / 10} for s in range(0, 100, 4)
    ]
    curve[-1]["pretext_top1"] = 0.0
    first, last = report.pretext_window(curve, K=512, batch=64)
    assert first["steps"] == [8, 24] and last["steps"] == [80, 96]  # 23 points: windows of 5
    assert first["pretext_top1"] == pytest.approx(1.0 + 16 / 10)
    assert last["pretext_top1"] > first["pretext_top1"] + 2.0
    assert report.pretext_window([], K=512, batch=64) == (None, None)


# ---------------------------------------------------------------- refusals: one line, exit 2, before any work


def _file(tmp_path):
    (tmp_path / "file").write_text("")
    return tmp_path / "file"


@pytest.mark.parametrize(
    "extra, says",
    [
        (
            lambda t: ["--limit", "50", "--train-steps", "2"],
            "--limit 50: pretraining takes batches of 128 images; give at "
            "least 130 (or --train-steps 0 to build the shards only)",
        ),
        (
            lambda t: ["--limit", "5", "--train-steps", "0"],
            "--limit 5: give at least 10 (one image per class)",
        ),
        (lambda t: ["--minutes", "0"], "--minutes 0.0 must be positive"),
        (lambda t: ["--workers", "-1"], "--workers -1 is out of range"),
        (lambda t: ["--out", str(_file(t))], "--out {t}/file: a file, not a folder"),
        (
            lambda t: ["--json", str(_file(t) / "demo.json")],
            "--json {t}/file/demo.json: {t}/file is a file, not a folder",
        ),
        (lambda t: ["--png", str(t)], "--png {t}: a folder, not a file"),
    ],
    ids=[
        "limit below a batch",
        "limit below a class each",
        "minutes",
        "workers",
        "out a file",
        "json under a file",
        "png a folder",
    ],
)
def test_a_bad_command_line_is_refused_in_one_line_before_any_work(tmp_path, capsys, extra, says):
    argv = ["--generated", "--out", str(tmp_path / "out"), *extra(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"moco-demo: error: {says.format(t=tmp_path)}\n"
    assert not (tmp_path / "out" / "generated-shapes").exists()  # nothing drawn, nothing built


def _batch_of_256(monkeypatch):
    from moco_dali.tools.demo import run

    monkeypatch.setattr(
        run, "BATCH_SIZE", 256
    )  # more than the 130 training images: what the loader would refuse


@pytest.mark.parametrize(
    "extra, change, says",
    [
        (
            ["--seed", str(2**31)],
            lambda monkeypatch: None,
            "run.seed must be below 2**31, got 2147483648",
        ),
        (
            [],
            _batch_of_256,
            "data.batch_size 256 is larger than the 130 samples of data.train {root}/shards/train: use a "
            "smaller batch or more samples",
        ),
    ],
    ids=["configuration", "batch larger than the training images"],
)
def test_what_moco_train_would_refuse_is_refused_before_measuring(
    tmp_path, capsys, monkeypatch, extra, change, says
):
    """After the shards (the data's own checks), before the pixels and the initial encoder are measured."""
    from moco_dali.tools.demo import run

    change(monkeypatch)
    measured = []
    monkeypatch.setattr(run, "pixels", lambda config: measured.append("pixels"))
    argv = [
        "--generated",
        "--limit",
        "130",
        "--bank",
        "10",
        "--workers",
        "0",
        "--train-steps",
        "2",
        "--out",
        str(tmp_path),
        *extra,
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"moco-demo: error: {says.format(root=tmp_path / 'generated-shapes')}\n"
    assert not measured


# ---------------------------------------------------------------- a stop before the first logged step


def _stopped_early(tmp_path) -> dict:
    """What the demo measured when ``--minutes`` stopped it at step 3, before the first log at step 10."""
    features = {
        "pixels": {"knn_top1": 50.0, "knn_top5": 90.0, "linear_top1": 60.0},
        "init": {"knn_top1": 40.0, "knn_top5": 80.0, "linear_top1": 45.0},
        "after": {"knn_top1": 41.0, "knn_top5": 81.0, "linear_top1": 46.0},
        "protocol": "kNN",
    }
    first, last = report.pretext_window([], K=4096, batch=128)
    result = {
        "config": {"model": {"K": 4096}, "data": {"batch_size": 128}, "run": {"log_every": 10}},
        "steps": 3,
        "train_samples": 130,
        "epochs_seen": 3 * 128 / 130,
        "pretraining_s": 2.0,
        "images_per_s": None,
        "pretext": {"chance_top1": 100 / 4097, "first": first, "last": last},
        "curve": [],
        "knn_by_epoch": [],
        "features": features,
    }
    result["verdict"] = report.verdict(result)
    return result


def test_a_stop_before_the_first_logged_step_is_reported_as_such(tmp_path, capsys):
    from PIL import Image

    result = _stopped_early(tmp_path)
    assert result["pretext"]["first"] is None and result["pretext"]["last"] is None
    assert result["verdict"].startswith(
        "no step was logged: pretraining stopped (--minutes) at step 3, before its "
        "first log at step 10, so the pretext task and images/s were not measured; "
    )
    assert "kNN 40.00% -> 41.00%" in result["verdict"]  # the features were measured, and are said
    cli._print(result)
    out = capsys.readouterr().out
    assert (
        "pretext task (4097-way instance discrimination, chance 0.024%): not measured, no step was logged"
        in out
    )
    assert (
        "moco-demo: pretraining images/s not measured (no step was logged), 3 steps in 2 s" in out
    )
    Image.new("RGB", (8, 8)).save(tmp_path / "views.png")
    assert report.figure(result, tmp_path / "views.png", tmp_path / "demo.png").stat().st_size > 0
    assert json.loads(json.dumps(result))["images_per_s"] is None


def test_minutes_that_end_before_the_first_logged_step_give_an_honest_report(tmp_path, capsys):
    """The stop (SIGTERM after 60 ms) comes during set-up: one step, a checkpoint, no train record."""
    argv = [
        "--generated",
        "--limit",
        "130",
        "--bank",
        "10",
        "--workers",
        "0",
        "--train-steps",
        "20",
        "--minutes",
        "0.001",
        "--out",
        str(tmp_path),
    ]
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    assert 1 <= result["steps"] < 10 and result["curve"] == [] and result["images_per_s"] is None
    assert result["pretext"]["first"] is None and result["pretext"]["last"] is None
    assert result["verdict"].startswith(
        f"no step was logged: pretraining stopped (--minutes) at step {result['steps']}"
    )
    assert "not measured, no step was logged" in capsys.readouterr().out
