"""moco-shards verify and inspect: faults are found and named; summaries are right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moco_dali.pipeline import shards
from moco_dali.pipeline.shards import ShardError
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.settings import BuildSettings
from moco_dali.tools.shards.verify import format_inspection, inspect, verify
from tests.tools.shards.test_build import run_cli


@pytest.fixture
def built(tmp_path, labelled_dump) -> Path:
    out = tmp_path / "shards"
    build(
        [str(labelled_dump)],
        out,
        BuildSettings(labels="folder", max_count=8),
        workers=0,
        progress=False,
    )
    return out


def rewrite_manifest_hash(folder: Path, tar_name: str) -> None:
    """Make the manifest agree with a tampered tar, so only decoding can catch it."""
    import hashlib

    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["tar"] == tar_name:
            entry["sha256"] = hashlib.sha256((folder / tar_name).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_verify_passes_a_good_folder(built):
    report = verify(built, batch_size=4, progress=False)
    assert (report.shards, report.samples) == (3, 21)
    result = run_cli("verify", str(built), "--no-progress")
    assert result.returncode == 0 and "OK: 3 shards, 21 samples" in result.stdout


def test_verify_names_the_shard_whose_bytes_changed(built):
    tar = built / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-000001.tar: sha256 differs"):
        verify(built, progress=False)
    result = run_cli("verify", str(built), "--no-progress")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"moco-shards verify: FAILED: {tar}: sha256 differs from the manifest; the shard is corrupt"
    ]


def test_verify_names_shard_and_key_of_an_undecodable_sample(built):
    tar = built / "shard-000002.tar"
    _, offset, size, name = shards.read_index(built / "shard-000002.idx")[3][0]
    data = bytearray(tar.read_bytes())
    data[offset : offset + 4] = b"JUNK"  # no longer a JPEG
    tar.write_bytes(bytes(data))
    rewrite_manifest_hash(built, tar.name)
    with pytest.raises(
        ShardError, match=f"shard-000002.tar: key {name.split('.')[0]}: does not decode"
    ):
        verify(built, batch_size=4, progress=False)


def test_verify_catches_an_index_that_disagrees_with_its_tar(built):
    idx = built / "shard-000000.idx"
    lines = idx.read_text().splitlines(keepends=True)
    lines[1], lines[2] = lines[2], lines[1]  # same size, wrong order
    idx.write_text("".join(lines))
    with pytest.raises(ShardError, match="shard-000000.idx: sha256 differs"):
        verify(built, progress=False)


def test_discover_refuses_missing_and_stale_pieces(tmp_path, built):
    with pytest.raises(ShardError, match="no manifest"):
        shards.discover(tmp_path)
    (built / "shard-000001.idx").unlink()
    with pytest.raises(ShardError, match="index of shard shard-000001.tar is missing"):
        shards.discover(built)


def test_discover_refuses_a_tar_that_changed_size(built):
    with open(built / "shard-000000.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ShardError, match="shard-000000.tar: .* the shard changed after the build"):
        shards.discover(built)


def test_inspect_reports_counts_classes_and_resolutions(built):
    info = inspect(built)
    assert (info["samples"], info["shards"], info["rejected"]) == (21, 3, 0)
    assert info["classes"] == {"cat": 7, "dog": 7, "emu": 7}
    assert info["width"] == {"min": 32, "median": 56, "max": 80}
    assert info["height"] == {"min": 24, "median": 28, "max": 32}
    text = format_inspection(info)
    assert "samples   21 of 21 inputs" in text and "emu" in text
    result = run_cli("inspect", str(built), "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["samples"] == 21


def test_verify_catches_an_index_whose_offsets_do_not_match_the_tar(built):
    import hashlib

    idx = built / "shard-000000.idx"
    lines = idx.read_text().splitlines(keepends=True)
    ext, offset, size, name, *rest = lines[2].split()
    lines[2] = " ".join([ext, str(int(offset) + 512), size, name, *rest]) + "\n"
    idx.write_text("".join(lines))
    manifest = json.loads((built / "manifest.json").read_text())
    manifest["shards"][0]["index_sha256"] = hashlib.sha256(idx.read_bytes()).hexdigest()
    (built / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=f"shard-000000.tar: key {name.split('.')[0]}: index says"):
        verify(built, progress=False)


def test_inspect_reads_the_rejection_reasons_of_new_and_old_manifests(tmp_path, labelled_dump):
    from tests.conftest import broken_inputs, write_files

    write_files(labelled_dump / "dog", broken_inputs())
    out = tmp_path / "out"
    build([str(labelled_dump)], out, BuildSettings(), workers=0, progress=False)
    info = inspect(out)
    assert info["rejected"] == 6 and sum(info["rejected_reasons"].values()) == 6
    assert info["rejected_file"] == str(out / "rejected.jsonl")
    assert "each with its input and reason in" in format_inspection(info)
    manifest = json.loads(
        (out / "manifest.json").read_text()
    )  # as version 1 wrote it: every rejection listed
    manifest.update(
        version=1,
        rejected=[json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()],
    )
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert inspect(out)["rejected_reasons"] == info["rejected_reasons"]
