"""Parquet files and Hugging Face datasets' Arrow folders as build inputs, written here with pyarrow
in the Hugging Face layout (an ``image`` struct of ``bytes`` and ``path``, a ``label`` column named
by ``ClassLabel`` metadata)."""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.classes import find_classes
from moco_dali.tools.shards.cli import main
from moco_dali.tools.shards.merge import merge
from moco_dali.tools.shards.settings import BuildSettings
from tests.conftest import baseline_jpeg, encode, photo_like
from tests.tools.shards.test_build import rejected_lines, shard_bytes

NAMES = ["cat", "dog", "emu"]
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def hf_schema(names=NAMES, metadata: bool = True) -> pa.Schema:
    schema = pa.schema([("image", IMAGE), ("label", pa.int64())])
    if not metadata:
        return schema
    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})


def rows(first: int, count: int) -> list[dict]:
    """Distinct images, labels cycling over the classes."""
    return [
        {"image": {"bytes": baseline_jpeg(24, 16, seed=first + i), "path": None}, "label": i % 3}
        for i in range(first, first + count)
    ]


# What the first file's odd rows hold, and what each costs: row -> reason's start (None: kept).
ODD = {
    1: None,  # a path beside the table instead of bytes
    2: "no image: null in column 'image'",
    3: "truncated JPEG",  # a JPEG cut short
    5: None,  # a PNG: re-encoded
    6: "label out of range: 7",
    7: "no label: null in column 'label'",
    9: "no label: -1 in column 'label'",
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """``data/`` as the hub holds a dataset: two Parquet files, the first of three row groups
    with the odd rows of ``ODD``, the second of one."""
    root = tmp_path_factory.mktemp("hub") / "data"
    (root.parent / "img").mkdir()
    (root.parent / "img" / "side.jpg").write_bytes(baseline_jpeg(20, 20, seed=500))
    root.mkdir()
    first = rows(0, 12)
    first[1]["image"] = {"bytes": None, "path": "../img/side.jpg"}
    first[2]["image"] = None
    first[3]["image"]["bytes"] = first[3]["image"]["bytes"][:200]
    first[5]["image"] = {"bytes": encode(photo_like(18, 14, seed=5), "PNG"), "path": "x.png"}
    first[6]["label"], first[7]["label"], first[9]["label"] = 7, None, -1
    pq.write_table(
        pa.Table.from_pylist(first, schema=hf_schema()),
        root / "train-00000-of-00002.parquet",
        row_group_size=4,
    )
    pq.write_table(
        pa.Table.from_pylist(rows(12, 5), schema=hf_schema()), root / "train-00001-of-00002.parquet"
    )
    return root


def samples(folder: Path) -> dict[str, tuple[int | None, bytes]]:
    """Each sample's source name -> (class, JPEG bytes), read from the tars."""
    found = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[: -len(".json")]
                cls = members.get(f"{key}.cls")
                found[json.loads(data)["source"]] = (
                    int(cls) if cls is not None else None,
                    members[f"{key}.jpg"],
                )
    return found


@pytest.fixture(scope="module")
def whole(hub, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "shards"
    build(
        [str(hub)], out, BuildSettings(label_column="label", max_count=6), workers=0, progress=False
    )
    return out


def test_every_row_is_a_sample_or_rejected_with_its_file_and_row(hub, whole):
    manifest = json.loads((whole / "manifest.json").read_text())
    assert (manifest["inputs"], manifest["samples"], manifest["rejected"]) == (17, 12, 5)
    assert manifest["classes"] == NAMES and manifest["reencoded"] == 1
    assert manifest["settings"]["labels"] == "column"
    rejected = {r["input"].rpartition("/")[2]: r["reason"] for r in rejected_lines(whole)}
    expected = {f"train-00000-of-00002.parquet#{r}": why for r, why in ODD.items() if why}
    assert rejected.keys() == expected.keys()
    assert all(rejected[k].startswith(v) for k, v in expected.items())
    found = samples(whole)
    kept = [r for r in range(12) if not ODD.get(r)] + list(range(12, 17))
    names = [f"train-0000{r // 12}-of-00002.parquet#{r % 12 if r < 12 else r - 12}" for r in kept]
    assert sorted(found) == sorted(names)
    for name, row in zip(names, kept):
        assert found[name][0] == row % 3, name  # the ClassLabel index is the class index


def test_parts_take_whole_row_groups_and_make_the_whole_build(hub, whole, tmp_path):
    out = tmp_path / "parts"
    seen, rejected = [], []
    for part in range(3):
        settings = BuildSettings(label_column="label", max_count=6, num_parts=3, part=part)
        report = build([str(hub)], out, settings, workers=0, progress=False)
        names = {n for n in samples(out) if n not in seen}
        assert report.samples == len(names)  # disjoint: no part repeats another's rows
        seen += names
        rejected += [
            r["input"] for r in rejected_lines(out, f"rejected.part-{part:04d}-of-0003.jsonl")
        ]
        # Row groups of 4, 4 and 4 rows, then 5, dealt round-robin over the tables.
        assert report.inputs == [4 + 5, 4, 4][part]
    merge([str(out)])
    assert sorted(seen) == sorted(samples(whole))
    assert sorted(rejected) == sorted(r["input"] for r in rejected_lines(whole))
    assert json.loads((out / "manifest.json").read_text())["samples"] == 12


def test_the_same_tables_from_another_mount_point_give_the_same_shards(hub, whole, tmp_path):
    moved = tmp_path / "elsewhere" / "hf data"
    shutil.copytree(hub.parent, moved)
    moved = moved / "data"
    out = tmp_path / "again"
    build(
        [str(moved)],
        out,
        BuildSettings(label_column="label", max_count=6),
        workers=2,
        progress=False,
    )
    assert shard_bytes(out) == shard_bytes(whole)


def test_a_save_to_disk_folder_and_an_unlabelled_build(tmp_path):
    """datasets' ``save_to_disk``: Arrow stream files named by ``state.json``, the ClassLabel
    names in ``dataset_info.json`` (not in the files' schema); a plain binary image column."""
    folder = tmp_path / "saved"
    folder.mkdir()
    schema = pa.schema([("img", pa.binary()), ("label", pa.int64())])
    batches = [
        pa.RecordBatch.from_pylist(
            [{"img": baseline_jpeg(16, 16, seed=s), "label": s % 2} for s in range(a, a + 3)],
            schema=schema,
        )
        for a in (0, 3)
    ]
    with pa.ipc.new_stream(folder / "data-00000-of-00001.arrow", schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    features = {"img": {"_type": "Image"}, "label": {"names": ["a", "b"], "_type": "ClassLabel"}}
    (folder / "dataset_info.json").write_text(json.dumps({"features": features}))
    (folder / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    settings = BuildSettings(label_column="label", image_column="img", max_count=4)
    report = build([str(folder)], tmp_path / "out", settings, workers=0, progress=False)
    assert (report.inputs, report.samples, report.rejected) == (6, 6, 0)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["classes"] == ["a", "b"] and manifest["class_counts"] == {"a": 3, "b": 3}
    assert manifest["settings"]["image_column"] == "img"
    found = samples(tmp_path / "out")
    assert {n: c for n, (c, _) in found.items()} == {
        f"data-00000-of-00001.arrow#{r}": r % 2 for r in range(6)
    }
    # --labels none: the same rows, no class (one file given as the source itself).
    report = build(
        [str(folder / "data-00000-of-00001.arrow")],
        tmp_path / "none",
        BuildSettings(image_column="img"),
        workers=0,
        progress=False,
    )
    assert report.samples == 6 and {c for c, _ in samples(tmp_path / "none").values()} == {None}


def test_integer_labels_without_names_are_their_own_classes(tmp_path):
    """No ClassLabel metadata: the classes are "0".."N-1", N from the row groups' statistics
    (Parquet, whose image struct's leaf columns come before the label's) or the labels read
    (Arrow); a label of 0 alone still makes one class."""
    plain = hf_schema(metadata=False)
    pq.write_table(pa.Table.from_pylist(rows(0, 5), schema=plain), tmp_path / "a.parquet")
    assert find_classes([str(tmp_path / "a.parquet")], "column", label_column="label") == [
        "0",
        "1",
        "2",
    ]
    zero = [{"image": r["image"], "label": 0} for r in rows(0, 2)]
    with pa.ipc.new_file(tmp_path / "b.arrow", plain) as writer:
        writer.write_table(pa.Table.from_pylist(zero, schema=plain))
    assert find_classes([str(tmp_path / "b.arrow")], "column", label_column="label") == ["0"]


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main([*argv])
    return code, capsys.readouterr().err.strip()


def test_bad_tables_and_options_end_in_one_line(hub, tmp_path, capsys):
    table = str(hub / "train-00001-of-00002.parquet")
    out = str(tmp_path / "out")
    code, err = run(capsys, "build", table, "--out", out, "--image-column", "picture")
    assert code == 2 and len(err.splitlines()) == 1
    assert "train-00001-of-00002.parquet: no column 'picture'" in err and "--image-column" in err
    code, err = run(capsys, "build", table, "--out", out, "--label-column", "fine_label")
    assert code == 2 and "no column 'fine_label'" in err and "--label-column" in err
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"PAR1 not really")
    code, err = run(capsys, "build", str(fake), "--out", out)
    assert (
        code == 2 and len(err.splitlines()) == 1 and "fake.parquet: not a readable Parquet" in err
    )
    code, err = run(capsys, "build", table, "--out", out, "--labels", "folder")
    assert code == 2 and "its classes are a column" in err
    code, err = run(capsys, "build", str(hub.parent / "img"), "--out", out, "--labels", "column")
    assert code == 2 and "--labels column reads Parquet or Arrow tables, not a folder" in err


def test_moco_train_takes_a_few_steps_from_a_parquet_build(tmp_path, capsys):
    from tests.train.runs import TINY, losses, train_here

    table = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows(0, 64), schema=hf_schema()), table, row_group_size=16)
    out = tmp_path / "shards"
    assert run(capsys, "build", str(table), "--out", str(out), "--labels", "column")[0] == 0
    run_dir = tmp_path / "run"
    assert (
        train_here(*TINY, "--data.train", str(out), "--run.out", str(run_dir), "--run.epochs", "1")
        == 0
    )
    assert sorted(losses(run_dir)) == [1, 2]  # 64 samples, batches of 32, one epoch


def test_the_three_layouts_study_finds_one_data_set_in_each(tmp_path):
    """``benchmarks/studies/three_layouts.py`` on drawn images: the same samples and kNN from
    img2dataset tars indexed, an archive of class archives and Hugging Face Parquet."""
    import numpy as np

    from benchmarks.studies.three_layouts import LAYOUTS, compare

    rng = np.random.default_rng(0)
    splits = {
        split: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10)
        for split, n in (("train", 30), ("val", 10))
    }
    result = compare(splits, tmp_path, workers=0, threads=1)
    assert result["equal"] == {"samples": True, "content_sha256": True, "knn": True}
    first = result["layouts"][LAYOUTS[0]]
    assert first["samples"] == {"train": 30, "val": 10} and first["rejected"] == {
        "train": 0,
        "val": 0,
    }
    # The digests are of what each folder holds: another split's differ.
    assert first["content_sha256"]["train"] != first["content_sha256"]["val"]


def test_without_pyarrow_a_table_source_names_the_extra(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed: import fails
    code, err = run(capsys, "build", str(hub), "--out", str(tmp_path / "out"))
    assert code == 2 and err.endswith("need pyarrow: pip install 'moco-dali[parquet]'")


def test_a_damaged_row_group_costs_its_rows_only(tmp_path):
    """The page header of the second row group's image column overwritten: its rows are rejected
    as unreadable, naming file and row, and the other group's rows are built."""
    table = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows(0, 6), schema=hf_schema()), table, row_group_size=3)
    chunk = pq.ParquetFile(table).metadata.row_group(1).column(0)  # image.bytes
    data = bytearray(table.read_bytes())
    data[chunk.data_page_offset : chunk.data_page_offset + 16] = b"\xff" * 16
    table.write_bytes(bytes(data))
    report = build([str(table)], tmp_path / "out", BuildSettings(labels="column"), workers=0)
    assert (report.inputs, report.samples, report.rejected) == (6, 3, 3)
    rejected = rejected_lines(tmp_path / "out")
    assert sorted(r["input"].rpartition("#")[2] for r in rejected) == ["3", "4", "5"]
    assert all(r["reason"].startswith("unreadable: ") for r in rejected)
    assert all("t.parquet: cannot read row group 1" in r["reason"] for r in rejected)


def test_a_worker_reads_each_row_group_of_its_block_once(hub, monkeypatch):
    """A block's rows come in packing order, spread over every row group; in table order each
    group is read once, and every row gets its own image."""
    from moco_dali.tools.shards import parquet

    table = str(hub / "train-00000-of-00002.parquet")
    tables = parquet.TableInputs("image", None)
    refs = [ref for ref in tables(table, "none", 0, 1, 0)]
    items = [(str(i), ref, None) for i, ref in enumerate(reversed(refs))]
    reads = []
    real = parquet._Table._read
    monkeypatch.setattr(
        parquet._Table, "_read", lambda self, g, c: reads.append(g) or real(self, g, c)
    )
    ordered = parquet.in_table_order(items)
    assert [ref.row for _, ref, _ in ordered] == list(range(12))
    read = parquet.TableRows("image")
    images = {}
    for _, ref, _ in ordered:
        try:
            images[ref.row] = read(ref, 1 << 20)
        except Exception as exc:  # the odd rows' reasons are another test's
            images[ref.row] = str(exc)
    assert reads == [0, 1, 2]
    expected = rows(0, 12)
    assert images[0] == expected[0]["image"]["bytes"]
    assert images[11] == expected[11]["image"]["bytes"]
    assert images[2] == "no image: null in column 'image'"
