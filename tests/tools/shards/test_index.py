"""moco-shards index: img2dataset-shaped tars made trainable where they lie, bytes untouched."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from moco_dali.pipeline import shards
from moco_dali.pipeline.loader import ViewLoader
from moco_dali.pipeline.recipes import v2
from moco_dali.pipeline.shards import ShardError
from moco_dali.tools.shards.cli import main
from moco_dali.tools.shards.indextar import split_name
from moco_dali.tools.shards.jsonlabel import MAX_JSON_BYTES
from tests.conftest import baseline_jpeg, loader_config

# What each odd sample of the first tar is rejected for (the reason's kind, as the manifest counts).
ODD = {
    "0000000001": "not a JPEG",  # a .webp, as img2dataset writes with --output_format webp
    "0000000002": "not a JPEG the decoder accepts",  # a broken JPEG header
    "0000000003": "not a JPEG the decoder accepts",  # a PNG named .jpg
    "a": "key split at a dot",  # key 'a.b': DALI reads a.b.jpg as key 'a', extension 'b.jpg'
    "0000000005": "no image member",  # only the caption and the metadata
}


def webp() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(out, "WEBP")
    return out.getvalue()


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, "PNG")
    return out.getvalue()


def json_label(i: int) -> int:
    """Sample i's class in its .json: unlike its .cls (i % 3), and of one or two digits."""
    return i * 7 % 13


def img2dataset_tar(path: Path, first: int, count: int, odd: bool = False, size: int = 32) -> list:
    """A tar as img2dataset writes it (KEY.jpg, KEY.txt, KEY.json; a .cls and the .json's
    ``label`` and ``meta.label`` for the label tests); returns the keys a reader should find."""
    good = []
    with wds.TarWriter(str(path)) as writer:
        for i in range(first, first + count):
            key = f"{i:010d}"
            meta = {"key": key, "caption": "x", "label": json_label(i), "status": "success"}
            sample = {
                "__key__": key,
                "txt": f"a photo number {i}",
                "json": json.dumps({**meta, "meta": {"label": i % 2}}).encode(),
                "cls": str(i % 3),
            }
            image = baseline_jpeg(size, size, seed=i)
            if odd and i == 1:
                sample["webp"] = webp()
            elif odd and i == 2:
                sample["jpg"] = b"\xff\xd8\xff\xe0 not a header"
            elif odd and i == 3:
                sample["jpg"] = png()
            elif odd and i == 4:
                sample["__key__"] = "a.b"
                sample["jpg"] = image
            elif odd and i == 5:
                pass
            else:
                sample["jpg"] = image
                good.append(key)
            writer.write(sample)
    return good


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> tuple[Path, list[str]]:
    """Two tars of 12 samples, the first with the odd ones among them."""
    root = tmp_path_factory.mktemp("laion") / "data"
    root.mkdir()
    keys = img2dataset_tar(root / "00000.tar", 0, 12, odd=True)
    keys += img2dataset_tar(root / "00001.tar", 12, 12)
    return root, keys


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([*argv])
    said = capsys.readouterr()
    return code, said.out.strip(), said.err.strip()


def read_keys(folder: Path, labels: bool = False) -> list[tuple[str, int]]:
    cfg = loader_config(
        batch_size=5, threads=1, shuffle_buffer=8, keys=True, last_batch="partial", labels=labels
    )
    found = []
    for batch in ViewLoader(folder, v2(size=16), cfg):
        labels_seen = batch.labels.tolist() if labels else [-1] * len(batch)
        found += zip(batch.keys, labels_seen)
    return sorted(found)


def test_keys_split_as_dali_splits_them():
    """DALI's webdataset reader splits at the first dot of the file name (``split_name``)."""
    assert split_name("0001.jpg") == ("0001", "jpg")
    assert split_name("a.b.jpg") == ("a", "b.jpg")
    assert split_name("dir.v2/0001.seg.png") == ("dir.v2/0001", "seg.png")
    assert split_name("README") == ("README", "")


def test_index_accounts_for_every_sample_and_leaves_the_tars_untouched(dump, tmp_path, capsys):
    data, keys = dump
    before = digest(data)
    out = tmp_path / "index"
    code, said, err = run(
        capsys, "index", str(data / "00000.tar"), str(data / "00001.tar"), "--out", str(out)
    )
    assert code == 0, err
    assert said.startswith("moco-shards index: 2 tars, 24 samples found -> 19 indexed in 2 shards")
    assert digest(data) == before  # not a byte of the tars changed, nothing was written beside them
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == shards.INDEXED_VERSION and manifest["indexed"]
    assert manifest["inputs"] == 24 == manifest["samples"] + manifest["rejected"]
    assert manifest["samples"] == len(keys) == 19
    # Named relative to the manifest's folder, as built shards are.
    assert [(out / s["tar"]).resolve() for s in manifest["shards"]] == [
        data / "00000.tar",
        data / "00001.tar",
    ]
    assert all(s["tar"].startswith("../") for s in manifest["shards"])
    assert [s["sha256"] for s in manifest["shards"]] == [before["00000.tar"], before["00001.tar"]]
    assert manifest["rejected_reasons"] == {
        "key split at a dot": 1,
        "no image member": 1,
        "not a JPEG": 1,
        "not a JPEG the decoder accepts": 2,
    }
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {r["input"].rsplit(":", 1)[1]: r["reason"].split(":")[0] for r in rejected} == ODD
    assert all(r["input"].startswith(str(data / "00000.tar")) for r in rejected)
    # The index lists every member of a sample, where the tar holds it.
    with tarfile.open(data / "00001.tar") as archive:
        where = {m.name: (m.offset_data, m.size) for m in archive}
    lines = shards.read_index(out / "shard-000001.idx")
    assert [(name, (offset, size)) for ln in lines for _, offset, size, name in ln] == [
        (name, where[name]) for name in where
    ]


@pytest.fixture(scope="module")
def indexed(dump, tmp_path_factory) -> Path:
    data, _ = dump
    out = tmp_path_factory.mktemp("indexed") / "out"
    assert main(["index", str(data / "00000.tar"), str(data / "00001.tar"), "--out", str(out)]) == 0
    return out


def test_verify_and_inspect_pass_on_an_index(indexed, capsys):
    code, said, err = run(capsys, "verify", str(indexed), "--no-progress")
    assert code == 0 and said.startswith("moco-shards verify: OK: 2 shards, 19 samples"), err
    code, said, _ = run(capsys, "inspect", str(indexed), "--json")
    info = json.loads(said)
    assert code == 0 and info["samples"] == 19 and info["rejected"] == 5
    assert info["common_sizes"] == [
        ["32x32", 19]
    ]  # from the JPEG headers: img2dataset's .json has no size


def test_the_loader_reads_every_indexed_sample_once(dump, indexed):
    assert read_keys(indexed) == [(key, -1) for key in sorted(dump[1])]


def test_labels_come_from_the_cls_members(dump, tmp_path, capsys):
    data, keys = dump
    out = tmp_path / "labelled"
    code, _, err = run(
        capsys, "index", str(data / "00001.tar"), "--out", str(out), "--labels", "cls"
    )
    assert code == 0, err
    manifest = shards.load_manifest(out)
    assert manifest.classes == ["0", "1", "2"]
    assert manifest.data["class_counts"] == {"0": 4, "1": 4, "2": 4}
    assert read_keys(out, labels=True) == [(f"{i:010d}", i % 3) for i in range(12, 24)]


def json_members(tar: Path) -> dict[str, dict]:
    """Each sample's .json as a reference reads it: tarfile and json, not the indexer's walk."""
    with tarfile.open(tar) as archive:
        return {
            m.name.split(".")[0]: json.loads(archive.extractfile(m).read())
            for m in archive
            if m.name.endswith(".json")
        }


def pointers(out: Path, number: int = 0) -> dict[str, bytes]:
    """Key -> the bytes of the tar its label pointer (its line's last component) covers."""
    manifest = shards.load_manifest(out)
    tar, idx = shards.open_shard(manifest, manifest.entry(number))
    raw = tar.read_bytes()
    found = {}
    for line in shards.read_index(idx):
        ext, offset, size, name = line[-1]
        assert (
            ext == "cls"
            and name.endswith(".json")
            and ("json", offset) in {(m[0], m[1]) for m in line[:-1]}
        )
        assert not any(m[3].endswith(".cls") for m in line)  # the tar's own .cls is left out
        found[name.split(".")[0]] = raw[offset : offset + size]
    return found


def test_labels_come_from_a_json_field_through_a_pointer_into_it(dump, tmp_path, capsys):
    data, keys = dump
    tars = [data / "00000.tar", data / "00001.tar"]
    before = digest(data)
    out = tmp_path / "json-labels"
    argv = [*map(str, tars), "--out", str(out), "--label-key", "label"]
    code, said, err = run(capsys, "index", *argv)
    assert code == 0 and "24 samples found -> 19 indexed" in said, err
    assert digest(data) == before
    truth = {k: v["label"] for t in tars for k, v in json_members(t).items() if k in keys}
    assert sorted(truth) == sorted(keys) and len(set(truth.values())) == 13
    manifest = shards.load_manifest(out)
    assert manifest.label_key == "label" and manifest.data["settings"]["labels"] == "json"
    counts = Counter(truth.values())
    assert manifest.data["class_counts"] == {str(c): counts[c] for c in range(13)}
    # Each pointer covers its .json up to the end of the field's digits, nothing after them.
    for number in (0, 1):
        for key, covered in pointers(out, number).items():
            assert covered.endswith(b'"label": %d' % truth[key]), key
    # An elastic resume keeps a piece's lines by parsing and writing them again (pieces.py).
    idx = out / "shard-000001.idx"
    lines = idx.read_text().split("\n", 1)[1]
    assert "".join(shards.index_line(s) for s in shards.read_index(idx)) == lines
    assert read_keys(out, labels=True) == sorted(truth.items())
    code, said, _ = run(capsys, "inspect", str(out), "--json")
    assert code == 0 and json.loads(said)["classes"] == manifest.data["class_counts"]
    code, said, err = run(capsys, "verify", str(out), "--no-progress")
    assert code == 0 and said.startswith("moco-shards verify: OK: 2 shards, 19 samples"), err


def test_a_dotted_label_key_reads_a_nested_field(dump, tmp_path, capsys):
    data, _ = dump
    out = tmp_path / "nested"
    argv = [str(data / "00001.tar"), "--out", str(out), "--label-key", "meta.label"]
    assert run(capsys, "index", *argv)[0] == 0
    assert shards.load_manifest(out).data["class_counts"] == {"0": 6, "1": 6}
    assert {k: shards.label_digits(v, True) for k, v in pointers(out).items()} == {
        f"{i:010d}": b"%d" % (i % 2) for i in range(12, 24)
    }


def test_each_json_label_fault_is_rejected_with_its_reason(tmp_path, capsys):
    jpeg = baseline_jpeg(16, 16)
    jsons = {
        # The field's name as a string value, in a nested object and quoted inside a caption,
        # all before the field itself.
        "k00": b'{"caption": "label", "meta": {"label": 98}, "text": "a \\"label\\": 99",'
        b' "label": 12}',
        "k01": None,
        "k02": b'{"label": 3',
        "k03": b'{"caption": "no label"}',
        "k04": b'{"label": 3.0}',
        "k05": b'{"label": -3}',
        "k06": b'{"label": 1048576}',
        "k07": b'{"label": true}',
        "k08": b'{"label": "3"}',
        "k09": b'{"label": 3, "label": 4}',
        "k10": b'{"label": 1, "deep": ' + b"[" * 40 + b"]" * 40 + b"}",
        "k11": b'{"label": 7}',  # beside a .cls that says 2
        "k12": b'{"label": 5, "pad": "' + b"x" * MAX_JSON_BYTES + b'"}',
    }
    members = []
    for key, meta in jsons.items():
        members.append((f"{key}.jpg", None, jpeg))
        members += [(f"{key}.cls", None, b"2")] if key == "k11" else []
        members += [(f"{key}.json", None, meta)] if meta is not None else []
    tar = tar_with(tmp_path / "labels.tar", members)
    out = tmp_path / "out"
    code, said, err = run(capsys, "index", str(tar), "--out", str(out), "--label-key", "label")
    assert code == 0 and "13 samples found -> 2 indexed" in said, err
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    reasons = {r["input"].rsplit(":", 1)[1]: r["reason"] for r in rejected}
    assert {k: r.split(":")[0] for k, r in reasons.items()} == {
        "k01": "no class",
        "k02": "unreadable .json",
        "k03": "no class",
        "k04": "not a class index",
        "k05": "not a class index",
        "k06": "not a class index",
        "k07": "not a class index",
        "k08": "not a class index",
        "k09": "class given twice",
        "k10": "unreadable .json",
        "k12": "too large",
    }
    assert reasons["k01"] == "no class: no .json member"
    assert reasons["k03"] == "no class: .json has no field 'label'"
    assert reasons["k04"] == (
        "not a class index: .json field 'label' is 3.0, not a whole number in 0..1048575"
    )
    assert reasons["k09"] == "class given twice: .json has 2 fields 'label'"
    assert reasons["k10"] == "unreadable .json: JSON nested deeper than 32 levels"
    manifest = shards.load_manifest(out)
    assert manifest.data["rejected_reasons"] == {
        "class given twice": 1,
        "no class": 2,
        "not a class index": 5,
        "too large": 1,
        "unreadable .json": 2,
    }
    assert manifest.samples + manifest.data["rejected"] == manifest.data["inputs"] == 13
    assert {k: shards.label_digits(v, True) for k, v in pointers(out).items()} == {
        "k00": b"12",
        "k11": b"7",
    }
    assert read_keys(out, labels=True) == [("k00", 12), ("k11", 7)]


def test_parts_with_a_label_key_merge_into_the_index_of_one_run(dump, tmp_path, capsys):
    data, _ = dump
    tars = [str(data / "00000.tar"), str(data / "00001.tar")]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run(capsys, "index", *tars, "--out", str(whole), "--label-key", "label")[0] == 0
    for part in ("0", "1"):
        argv = ["--out", str(parts), "--label-key", "label", "--num-parts", "2", "--part", part]
        assert run(capsys, "index", *tars, *argv)[0] == 0
    assert run(capsys, "merge", str(parts))[0] == 0
    merged, one = shards.load_manifest(parts), shards.load_manifest(whole)
    assert merged.label_key == "label" and merged.data["class_counts"] == one.data["class_counts"]
    for number in (0, 1):  # the readers' checks take the pointers as such
        tar, idx = shards.open_shard(merged, merged.entry(number))
        assert idx.read_bytes() == (whole / f"shard-00000{number}.idx").read_bytes()


def moved_digits(meta: bytes, end: int, value: int) -> bytes:
    """``meta`` rewritten to as many bytes whose field ``label`` is ``value``, with the digits its
    pointer ends in (its first ``end`` bytes) kept where they were, inside a string."""
    head = b'{"label": %d, "c": "' % value
    digits = shards.label_digits(meta[:end], True)
    moved = head + b"x" * (end - len(digits) - len(head)) + digits + b'"'
    moved += b" " * (len(meta) - len(moved) - 1) + b"}"
    assert json.loads(moved)["label"] == value and moved[:end].endswith(digits)
    return moved


def test_readers_catch_a_json_changed_under_its_label_pointer(dump, tmp_path, capsys):
    data, _ = dump
    copy = tmp_path / "copy"
    copy.mkdir()
    tar = copy / "00001.tar"
    shutil.copyfile(data / "00001.tar", tar)
    out = tmp_path / "out"
    assert run(capsys, "index", str(tar), "--out", str(out), "--label-key", "label")[0] == 0
    first, *_, last = shards.read_index(out / "shard-000000.idx")
    _, offset, size, name = next(m for m in first if m[0] == "json")
    end = first[-1][2]
    raw = bytearray(tar.read_bytes())
    meta = bytes(raw[offset : offset + size])
    # A digit changed: the tar's sha256 says so.
    raw[offset + end - 1] = ord("0") + (raw[offset + end - 1] - ord("0") + 1) % 10
    tar.write_bytes(bytes(raw))
    code, _, err = run(capsys, "verify", str(out), "--no-progress")
    assert code == 1 and err.endswith("sha256 differs from the manifest; the shard is corrupt")
    # The field now holds 0, the pointer's bytes still end in the old digits (so the class
    # counts hold), and the manifest's digest is made to agree: only the pointer check is left.
    raw[offset : offset + size] = moved_digits(meta, end, 0)
    tar.write_bytes(bytes(raw))
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["sha256"] = hashlib.sha256(raw).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    code, _, err = run(capsys, "verify", str(out), "--no-progress")
    key = name.split(".")[0]
    assert code == 1 and (
        f"key {key}: the label pointer ends at byte {end} of {key}.json" in err
    ), err
    # A pointer running past its .json: readers refuse the shard before DALI opens it.
    idx = out / "shard-000000.idx"
    _, offset, size, name = next(m for m in last if m[0] == "json")
    text = idx.read_text()
    tail = f"cls {offset} {last[-1][2]} {name}\n"
    assert text.endswith(tail)
    idx.write_text(text[: -len(tail)] + f"cls {offset} {size + 1} {name}\n")
    with pytest.raises(ShardError, match=f"the index says {name} \\({size + 1} bytes\\)"):
        shards.open_shard(shards.load_manifest(out), shards.load_manifest(out).entry(0))


def test_a_list_file_names_the_tars_and_parts_merge_into_one_folder(dump, tmp_path, capsys):
    data, keys = dump
    small = tmp_path / "small"
    small.mkdir()
    keys = keys + img2dataset_tar(small / "00002.tar", 24, 2)  # classes 0 and 1 only
    listing = tmp_path / "tars.txt"
    listing.write_text(
        f"# img2dataset output\n{data / '00000.tar'}\n\n{data / '00001.tar'}\nsmall/00002.tar\n"
    )
    out = tmp_path / "parts"
    parts = []
    for part in range(3):
        argv = ["--out", str(out), "--labels", "cls", "--num-parts", "3", "--part", str(part)]
        code, _, err = run(capsys, "index", str(listing), *argv)
        assert code == 0, err
        parts.append(json.loads((out / f"manifest.part-000{part}-of-0003.json").read_text()))
    assert [p["samples"] for p in parts] == [7, 12, 2]
    assert [p["classes"] for p in parts] == [["0", "1", "2"]] * 2 + [["0", "1"]]
    assert parts[2]["shards"][0]["index"] == "shard-part0002-000000.idx"
    code, said, err = run(capsys, "merge", str(out))
    assert code == 0, err
    merged = shards.load_manifest(out)
    assert merged.indexed and merged.samples == 21 and merged.data["inputs"] == 26
    assert merged.classes == ["0", "1", "2"]
    assert merged.data["class_counts"] == {"0": 8, "1": 7, "2": 6}
    assert run(capsys, "verify", str(out), "--no-progress")[0] == 0
    assert read_keys(out, labels=True) == sorted((k, int(k) % 3) for k in keys)


def test_a_tar_changed_after_indexing_is_refused_by_readers(dump, tmp_path, capsys):
    data, _ = dump
    copy = tmp_path / "copy"
    copy.mkdir()
    tar = copy / "00001.tar"
    tar.write_bytes((data / "00001.tar").read_bytes())
    out = tmp_path / "out"
    assert run(capsys, "index", str(tar), "--out", str(out))[0] == 0
    # A flipped byte inside an image: the size holds, the digest does not.
    raw = bytearray(tar.read_bytes())
    offset = shards.read_index(out / "shard-000000.idx")[0][1][1]  # the first sample's .jpg
    raw[offset + 200] ^= 0xFF
    tar.write_bytes(bytes(raw))
    code, _, err = run(capsys, "verify", str(out), "--no-progress")
    named = out / ".." / "copy" / tar.name  # as the manifest names it
    assert code == 1 and err == (
        f"moco-shards verify: FAILED: {named}: sha256 differs from the manifest; the shard is corrupt"
    )
    # Another size: every reader refuses it before DALI opens it.
    tar.write_bytes(bytes(raw) + bytes(512))
    with pytest.raises(ShardError, match="the shard changed after the indexing"):
        read_keys(out)


def tar_with(path: Path, members: list[tuple[str, bytes | None, bytes]]) -> Path:
    """A tar of ``(name, type, data)`` members written by Python's tarfile (type None: a file)."""
    with tarfile.open(path, "w") as archive:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind is None:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                info.type, info.linkname = kind, "elsewhere.jpg"
                archive.addfile(info)
    return path


def huge_jpeg() -> bytes:
    """A JPEG whose header declares 20000 x 20000 pixels (its SOF0 edited), 400 M > MAX_PIXELS."""
    data = bytearray(baseline_jpeg(16, 16))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (20000).to_bytes(2, "big") * 2
    return bytes(data)


def test_each_kind_of_unreadable_sample_is_rejected_with_its_reason(tmp_path, capsys):
    jpeg = baseline_jpeg(16, 16)
    tar = tar_with(
        tmp_path / "odd.tar",
        [
            ("k1.jpg", None, jpeg),
            ("k1.txt", tarfile.SYMTYPE, b""),
            ("k2.jpg", None, huge_jpeg()),
            ("k3.jpg", None, jpeg),
            ("k4.jpg", None, jpeg),
            ("k3.txt", None, b"apart from its image"),
            ("._k5.jpg", None, jpeg),
            ("k6.jpg", None, jpeg),
            ("k6.cls", None, b"seven"),
            ("k7.jpg", None, jpeg),
            ("k8.jpg", None, jpeg),
            ("k8.cls", None, b"2"),
            ("d" * 120 + ".jpg", None, jpeg),
            ("dir.v2/k9.jpg", None, jpeg),
        ],
    )
    out = tmp_path / "out"
    code, said, err = run(capsys, "index", str(tar), "--out", str(out), "--labels", "cls")
    assert code == 0, err
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    reasons = {r["input"].rsplit(":", 1)[1]: r["reason"] for r in rejected}
    assert {k: r.split(":")[0] for k, r in reasons.items()} == {
        "k1": "not a regular file",
        "k2": "too many pixels",
        "k3": "key repeats",  # its .txt comes after k4: DALI and WebDataset read two samples
        "k4": "no class",
        "": "no key",
        "k6": "no class",
        "k7": "no class",
        "d" * 120: "name not in its tar header",
        "dir.v2/k9": "key split at a dot",  # DALI keeps it whole; a shard reader would not
    }
    assert (
        reasons["k2"]
        == f"too many pixels: declares 20000x20000 = 400000000, over {shards.MAX_PIXELS}"
    )
    assert said.startswith("moco-shards index: 1 tars, 11 samples found -> 1 indexed")
    manifest = shards.load_manifest(out)
    assert manifest.samples + manifest.data["rejected"] == manifest.data["inputs"] == 11
    assert [m[3] for m in shards.read_index(out / "shard-000000.idx")[0]] == ["k8.jpg", "k8.cls"]


def damaged(tmp_path: Path, how: str) -> Path:
    good = tmp_path / "good.tar"
    img2dataset_tar(good, 0, 3)
    raw = good.read_bytes()
    bad = tmp_path / f"{how}.tar"
    if how == "truncated":
        bad.write_bytes(raw[:2000])  # inside the first sample's image
    elif how == "cut-at-a-header":
        bad.write_bytes(raw[: 2048 + 100])  # inside the header of the second member
    elif how == "not-a-tar":
        bad.write_bytes(b"PK\x03\x04 a zip file, not a tar" + bytes(600))
    elif how == "damaged-header":
        second = 512 * (1 + -(-len(b"0000000000.cls") // 512))  # past the first member's data
        bad.write_bytes(raw[:second] + b"garbage" + raw[second + 7 :])
    return bad


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", "truncated: the member at byte 1024 ends at byte 2048, past the end"),
        ("cut-at-a-header", "truncated: the file ends inside a header at byte 2048"),
        ("not-a-tar", "not a tar archive (its first header does not check)"),
        ("damaged-header", "damaged tar header at byte 1024"),
    ],
)
def test_a_hostile_tar_ends_in_one_line_and_writes_nothing(tmp_path, capsys, how, message):
    bad = damaged(tmp_path, how)
    out = tmp_path / "out"
    code, said, err = run(capsys, "index", str(bad), "--out", str(out))
    assert code == 2 and err.startswith(f"moco-shards index: error: {bad}: {message}"), err
    assert "\n" not in err and said == ""
    assert sorted(p.name for p in out.iterdir()) == []  # no index, no manifest, no staging left


def test_bad_sources_and_options_end_in_one_line(dump, tmp_path, capsys):
    data, _ = dump
    tar = str(data / "00000.tar")
    out = str(tmp_path / "out")
    listing = tmp_path / "tars.txt"
    listing.write_text("missing.tar\n")
    for argv, message in (
        ([str(tmp_path / "none.tar"), "--out", out], f"{tmp_path / 'none.tar'}: no such file"),
        ([str(data), "--out", out], f"{data}: a folder; give its tars"),
        ([str(listing), "--out", out], f"{tmp_path / 'missing.tar'}: no such tar file"),
        ([tar, "--out", str(data)], f"--out {data}: holds the source {tar}"),
        ([tar, "--out", out, "--num-parts", "2", "--part", "2"], "--part must be in 0..1"),
        ([tar, "--out", out, "--name", "a.b"], "--name 'a.b': use a name without dots"),
    ):
        code, _, err = run(capsys, "index", *argv)
        assert code == 2 and err.startswith("moco-shards index: error: ") and message in err, err
        assert "\n" not in err
    for argv, message in (
        (["--labels", "cls", "--label-key", "label"], "--label-key takes the class from KEY.json"),
        (["--label-key", "meta..label"], "--label-key 'meta..label': give a key, or keys joined"),
    ):
        code, _, err = run(capsys, "index", tar, "--out", out, *argv)
        assert code == 2 and err.startswith(f"moco-shards index: error: {message}"), err
        assert "\n" not in err


def test_every_sample_rejected_exits_1_and_strict_any(dump, tmp_path, capsys):
    tar = tar_with(tmp_path / "webp.tar", [("k.webp", None, webp()), ("k.txt", None, b"x")])
    code, _, err = run(capsys, "index", str(tar), "--out", str(tmp_path / "out"))
    assert code == 1 and "every sample was rejected" in err
    odd, good = (str(dump[0] / name) for name in ("00000.tar", "00001.tar"))
    code, _, err = run(capsys, "index", odd, "--out", str(tmp_path / "strict"), "--strict")
    assert code == 1 and err.startswith("moco-shards index: --strict: 5 samples rejected (see ")
    assert run(capsys, "index", good, "--out", str(tmp_path / "clean"), "--strict")[0] == 0


def test_moco_train_and_moco_eval_run_from_an_index(tmp_path, capsys):
    from moco_dali.train.checkpoint import latest
    from moco_dali.train.eval.cli import main as moco_eval
    from tests.train.runs import TINY, losses, train_here

    data = tmp_path / "data"
    data.mkdir()
    for number, first, count in ((0, 0, 40), (1, 40, 40), (2, 80, 18)):
        img2dataset_tar(data / f"{number:05d}.tar", first, count)
    out, val = tmp_path / "index", tmp_path / "index-val"
    tars = [str(data / "00000.tar"), str(data / "00001.tar")]
    assert run(capsys, "index", *tars, "--out", str(out), "--labels", "cls")[0] == 0
    assert (
        run(capsys, "index", str(data / "00002.tar"), "--out", str(val), "--labels", "cls")[0] == 0
    )
    run_dir = tmp_path / "run"
    assert (
        train_here(*TINY, "--data.train", str(out), "--run.out", str(run_dir), "--run.epochs", "2")
        == 0
    )
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]  # 80 samples, batches of 32, 2 epochs
    report = tmp_path / "knn.json"
    argv = ["knn", "--checkpoint", str(latest(run_dir)), "--train", str(out), "--val", str(val)]
    options = ["--threads", "1", "--batch-size", "16", "--device", "cpu", "--json", str(report)]
    assert moco_eval([*argv, *options]) == 0, capsys.readouterr().err
    knn = json.loads(report.read_text())
    # Every indexed sample read with its .cls label (three classes, 80 and 18 samples).
    assert (knn["train_samples"], knn["val_samples"], knn["step"]) == (80, 18, 4)
    assert 0 <= knn["top1"] <= knn["top5"] <= 100


def test_the_reference_pipeline_reads_what_dali_reads(indexed):
    """moco-bench's torchvision baseline reads the tars through webdataset, not the index: it
    must still leave out what the index leaves out (PIL would meet the .webp and the PNG)."""
    from moco_dali.pipeline.reference import reference_loader

    batches = list(reference_loader(indexed, v2(size=16), batch_size=19, workers=0))
    assert [tuple(view.shape) for view in batches[0]] == [(19, 3, 16, 16)] * 2
    assert len(batches) == 1


def test_parts_on_ray_give_the_index_of_parts_made_one_by_one(dump, tmp_path, capsys):
    pytest.importorskip("ray")
    data, keys = dump
    tars = [str(data / "00000.tar"), str(data / "00001.tar")]
    for argv, message in (
        (["--num-parts", "2", "--part", "1", "--executor", "ray"], "--executor ray indexes every"),
        (["--ray-address", "auto"], "--ray-address needs --executor ray"),
    ):
        code, _, err = run(capsys, "index", *tars, "--out", str(tmp_path / "x"), *argv)
        assert code == 2 and message in err
    out = tmp_path / "ray"
    code, said, err = run(
        capsys, "index", *tars, "--out", str(out), "--num-parts", "2", "--executor", "ray"
    )
    assert code == 0, err
    assert said.startswith(
        "moco-shards index: 2 parts on Ray: 2 tars, 24 samples found -> 19 indexed"
    )
    local = tmp_path / "local"
    for part in range(2):
        assert (
            run(
                capsys, "index", *tars, "--out", str(local), "--num-parts", "2", "--part", str(part)
            )[0]
            == 0
        )
    assert run(capsys, "merge", str(local))[0] == 0
    for name in (
        "manifest.json",
        "rejected.jsonl",
        "shard-part0000-000000.idx",
        "shard-part0001-000000.idx",
    ):
        assert (out / name).read_bytes() == (local / name).read_bytes(), name
    assert read_keys(out) == [(key, -1) for key in sorted(keys)]


def test_memory_does_not_grow_with_the_number_of_tars(tmp_path):
    """A listing read a line at a time, shard entries and rejections streamed to disk: ten times
    the tars cost no more memory (the old variant held every entry and the manifest's text,
    about 2.5 KB per tar)."""
    import tracemalloc

    from moco_dali.tools.shards.index import IndexCommand, index

    jpeg = baseline_jpeg(16, 16)
    peaks = []
    for count in (300, 3000):
        listing = tmp_path / f"tars{count}.txt"
        with open(listing, "w") as names:
            for i in range(count):
                names.write(
                    str(tar_with(tmp_path / f"{count}-{i}.tar", [(f"{i:09d}.jpg", None, jpeg)]))
                    + "\n"
                )
        tracemalloc.start()
        report = index(IndexCommand(sources=[str(listing)], out=str(tmp_path / f"out{count}")))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert report.shards == report.samples == count
    assert peaks[1] - peaks[0] < 512 * 1024, peaks


def test_an_interrupted_index_resumes_after_the_tars_it_finished(tmp_path, capsys, monkeypatch):
    from moco_dali.tools.shards import index as indexing

    data = tmp_path / "data"
    data.mkdir()
    tars = [data / f"{n:05d}.tar" for n in range(4)]
    for n, tar in enumerate(tars):
        img2dataset_tar(tar, 6 * n, 6, odd=n == 0)
    listing = tmp_path / "tars.txt"
    listing.write_text("".join(f"{t}\n" for t in tars))
    assert run(capsys, "index", str(listing), "--out", str(tmp_path / "clean"))[0] == 0

    real, read = indexing.index_tar, []

    def counting(tar, *args, stop_at=None):
        read.append(Path(tar).name)
        if len(read) == stop_at:
            raise KeyboardInterrupt  # as a kill would stop it, inside a tar
        return real(tar, *args)

    def interrupted(out: Path, stop_at: int, **options) -> None:
        read.clear()
        monkeypatch.setattr(indexing, "index_tar", lambda *a: counting(*a, stop_at=stop_at))
        with pytest.raises(KeyboardInterrupt):
            indexing.index(indexing.IndexCommand(sources=[str(listing)], out=str(out), **options))
        monkeypatch.setattr(indexing, "index_tar", counting)
        read.clear()
        assert not (out / "manifest.json").exists()

    out = tmp_path / "out"
    interrupted(out, stop_at=3)  # two tars finished
    code, said, _ = run(capsys, "index", str(listing), "--out", str(out))
    assert code == 0 and "(2 tars resumed)" in said and read == ["00002.tar", "00003.tar"]
    assert digest(out) == digest(tmp_path / "clean")  # manifest, indexes, rejected log

    # A tar changed since, and a journal line cut short by the kill: read again from there.
    for how in ("touched", "cut"):
        out = tmp_path / how
        interrupted(out, stop_at=4)  # three tars finished
        if how == "touched":
            os.utime(tars[1], ns=(0, 0))
        else:
            journal = next(out.glob(".moco-build-index-*")) / indexing.JOURNAL
            journal.write_bytes(journal.read_bytes()[:-2])
        code, said, _ = run(capsys, "index", str(listing), "--out", str(out))
        assert code == 0 and digest(out) == digest(tmp_path / "clean")
        assert read == [t.name for t in tars[1 if how == "touched" else 2 :]], how

    # Other options index afresh: a resume never mixes two kinds of run.
    for number, (options, argv, again) in enumerate(
        (
            ({}, ["--labels", "cls"], 4),
            ({"label_key": "label"}, ["--label-key", "meta.label"], 4),
            ({"label_key": "label"}, ["--label-key", "label"], 2),
        )
    ):
        out = tmp_path / f"options-{number}"
        interrupted(out, stop_at=3, **options)
        assert run(capsys, "index", str(listing), "--out", str(out), *argv)[0] == 0
        assert len(read) == again, argv
