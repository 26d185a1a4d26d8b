"""Classes from a labels file (``--labels-file``), shaped like ImageNet's validation archive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.merge import merge
from moco_dali.tools.shards.settings import BuildSettings
from tests.conftest import baseline_jpeg
from tests.tools.shards.test_build import rejected_lines, run_cli, shard_bytes
from tests.tools.shards.test_nested import CLASSES, stored, tar_bytes

# Image n -> its class; image 6 is in no row, image 7's class is not in the training set's.
TRUTH = {1: "n01484850", 2: "n01440764", 3: "n01443537", 4: "n01440764", 5: "n01484850"}
EXTRA = {7: "n09999999"}


def val_name(n: int) -> str:
    return f"ILSVRC2012_val_{n:08d}"


def write_val_archive(path: Path) -> Path:
    """A flat archive of JPEGs whose names carry no class, as ILSVRC2012_img_val.tar."""
    path.write_bytes(
        tar_bytes([(f"{val_name(n)}.JPEG", baseline_jpeg(32, 24, seed=n)) for n in range(1, 8)])
    )
    return path


def test_a_validation_archive_takes_its_classes_from_a_loc_solution_csv(tmp_path):
    """``LOC_val_solution.csv``'s shape: a header, then the class as the first word of boxes."""
    archive = write_val_archive(tmp_path / "ILSVRC2012_img_val.tar")
    rows = ["ImageId,PredictionString"] + [
        f"{val_name(n)},{wnid} 10 20 30 40 {wnid} 1 2 3 4" for n, wnid in {**TRUTH, **EXTRA}.items()
    ]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")  # the training set's order
    result = run_cli(
        "build",
        str(archive),
        "--out",
        str(tmp_path / "val"),
        "--labels-file",
        str(tmp_path / "LOC_val_solution.csv"),
        "--classes",
        str(tmp_path / "classes.txt"),
        "--workers",
        "0",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "val" / "manifest.json").read_text())
    assert manifest["classes"] == CLASSES and manifest["settings"]["labels"] == "file"
    assert manifest["settings"]["labels_file"] == "LOC_val_solution.csv"
    samples = stored(tmp_path / "val")
    assert {name: CLASSES[label] for name, label in samples.items()} == {
        f"{val_name(n)}.JPEG": wnid for n, wnid in TRUTH.items()
    }
    reasons = {r["input"].rpartition(":")[2]: r["reason"] for r in rejected_lines(tmp_path / "val")}
    assert reasons == {
        f"{val_name(6)}.JPEG": "no label in --labels-file",
        f"{val_name(7)}.JPEG": "class not in --classes: n09999999",
    }
    assert manifest["inputs"] == manifest["samples"] + manifest["rejected"] == 7


def test_a_plain_two_column_file_names_images_with_or_without_their_extension(tmp_path):
    archive = write_val_archive(tmp_path / "val.tar")
    lines = [
        f"{val_name(n)}{'.JPEG' if n % 2 else ''},{wnid}" for n, wnid in TRUTH.items()
    ]  # no header; half the names with their extension
    (tmp_path / "labels.csv").write_text("# ground truth\n\n" + "\n".join(lines) + "\n")
    report = build(
        [str(archive)],
        tmp_path / "val",
        BuildSettings(labels_file=str(tmp_path / "labels.csv")),
        workers=0,
        progress=False,
    )
    manifest = json.loads((tmp_path / "val" / "manifest.json").read_text())
    assert manifest["classes"] == sorted(set(TRUTH.values()))  # the file's classes, sorted
    samples = stored(tmp_path / "val")
    assert {n: manifest["classes"][c] for n, c in samples.items()} == {
        f"{val_name(n)}.JPEG": wnid for n, wnid in TRUTH.items()
    }
    assert (report.samples, report.rejected) == (5, 2)


def test_another_labels_file_is_another_build(tmp_path):
    """The labels are in the input digest: a build is not resumed or kept under other labels."""
    archive = write_val_archive(tmp_path / "val.tar")
    labels = tmp_path / "labels.csv"
    labels.write_text("".join(f"{val_name(n)},{wnid}\n" for n, wnid in TRUTH.items()))
    settings = BuildSettings(labels_file=str(labels))
    build([str(archive)], tmp_path / "val", settings, workers=0, progress=False)
    labels.write_text("".join(f"{val_name(n)},{CLASSES[0]}\n" for n in TRUTH))
    result = run_cli(
        "build", str(archive), "--out", str(tmp_path / "val"), "--labels-file", str(labels)
    )
    assert result.returncode == 2 and "holds another build" in result.stderr


@pytest.mark.parametrize(
    "content, args, message",
    [
        ("a,n1\nb\n", [], "line 2: expected NAME,CLASS"),
        ("a,n1,extra\n", [], "line 1: expected NAME,CLASS"),
        ("a,n1\nb,\n", [], "line 2: expected NAME,CLASS"),
        ("a,n1\na.JPEG,n1\na,n2\n", [], "line 3: 'a' has two classes, 'n1' and 'n2'"),
        ("ImageId,PredictionString\n", [], "labels no image"),
        (b"a,n1\n\xff\xfe,n2\n", [], "not UTF-8 text"),
        ("a,n1\n", ["--labels", "folder"], "--labels-file gives the classes: drop --labels folder"),
        (None, [], "no such file"),
    ],
)
def test_a_bad_labels_file_is_one_line_naming_it(tmp_path, content, args, message):
    archive = write_val_archive(tmp_path / "val.tar")
    labels = tmp_path / "labels.csv"
    if isinstance(content, str):
        labels.write_text(content)
    elif content is not None:
        labels.write_bytes(content)
    result = run_cli(
        "build", str(archive), "--out", str(tmp_path / "out"), "--labels-file", str(labels), *args
    )
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert err.startswith("moco-shards build: error: ") and "\n" not in err
    assert message in err and (str(labels) in err or "--labels" in message)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_labels_file_without_a_file_is_refused():
    with pytest.raises(ValueError, match="--labels file needs --labels-file FILE"):
        BuildSettings(labels="file")


def test_parts_on_ray_take_their_classes_from_the_labels_file(tmp_path):
    """The driver finds the classes once, from the file, and hands them to every part."""
    pytest.importorskip("ray")
    archive = write_val_archive(tmp_path / "val.tar")
    labels = tmp_path / "labels.csv"
    labels.write_text("".join(f"{val_name(n)},{wnid}\n" for n, wnid in TRUTH.items()))
    args = ["--labels-file", str(labels), "--num-parts", "2", "--max-count", "2"]
    result = run_cli(
        "build", str(archive), "--out", str(tmp_path / "ray"), *args, "--executor", "ray"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for part in range(2):
        settings = BuildSettings(labels_file=str(labels), num_parts=2, part=part, max_count=2)
        build([str(archive)], tmp_path / "local", settings, workers=0, progress=False)
    merge([str(tmp_path / "local")])
    assert shard_bytes(tmp_path / "ray") == shard_bytes(tmp_path / "local")
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["class_counts"] == {"n01440764": 2, "n01443537": 1, "n01484850": 2}
