"""moco-shards build never loses and never mixes: locks, foreign folders, odd files, full disks."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from moco_dali.pipeline import shards
from moco_dali.pipeline.scan import scan_shards
from moco_dali.tools.shards import BuildError
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.settings import BuildSettings
from tests.conftest import baseline_jpeg, broken_inputs, write_files
from tests.tools.shards.test_build import REPO, folder_bytes, rejected_lines, run_cli, run_here


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def stored_sources(folder: Path) -> list[str]:
    return sorted(
        json.loads(s.metadata)["source"] for s in scan_shards(*zip(*shards.discover(folder)[1]))
    )


def test_a_second_build_into_a_folder_in_use_exits_2(tmp_path, labelled_dump):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".moco-build-shard.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running build holds
        second = run_cli("build", str(labelled_dump), "--out", str(out), "--no-progress")
    assert second.returncode == 2
    assert "in use by another moco-shards build" in one_line(second)
    assert not list(out.glob("shard-*")) and not (out / "manifest.json").exists()
    assert run_cli("build", str(labelled_dump), "--out", str(out), "--no-progress").returncode == 0
    assert not lock.exists()  # released and removed at the end


def test_an_out_holding_files_the_build_did_not_write_is_refused(tmp_path, labelled_dump):
    out = tmp_path / "photos"
    theirs = write_files(out, {"shard-000000.tar": b"someone else's archive", "notes.txt": b"mine"})
    result = run_cli("build", str(labelled_dump), "--out", str(out), "--no-progress")
    assert result.returncode == 2 and "did not write" in one_line(result)
    assert [p.read_bytes() for p in theirs] == [b"someone else's archive", b"mine"]
    # Shard names alone, with no manifest or build state beside them, are not ours either.
    theirs[1].unlink()
    assert run_cli("build", str(labelled_dump), "--out", str(out), "--no-progress").returncode == 2
    assert theirs[0].read_bytes() == b"someone else's archive"


def test_symlinked_class_folders_are_followed_and_loops_accounted_for(tmp_path):
    dump = tmp_path / "dump"
    write_files(dump / "cat", {f"{i}.jpg": baseline_jpeg(seed=i) for i in range(3)})
    write_files(
        tmp_path / "elsewhere" / "dog", {f"{i}.jpg": baseline_jpeg(seed=10 + i) for i in range(4)}
    )
    (dump / "dog").symlink_to(tmp_path / "elsewhere" / "dog")
    (dump / "cat" / "again").symlink_to(dump)  # a loop
    report = build(
        [str(dump)], tmp_path / "out", BuildSettings(labels="folder"), workers=0, progress=False
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["class_counts"] == {"cat": 3, "dog": 4}
    assert (report.inputs, report.samples, report.rejected) == (8, 7, 1)
    (loop,) = rejected_lines(tmp_path / "out")
    assert loop["input"] == str(dump / "cat" / "again") and "symlink loop" in loop["reason"]


def test_odd_names_fifos_and_endless_files_are_kept_or_rejected_and_the_build_goes_on(tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    odd = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not UTF-8
    (dump / odd).write_bytes(baseline_jpeg(seed=1))
    os.mkfifo(dump / "pipe.jpg")
    (dump / "zero.jpg").symlink_to("/dev/zero")
    (dump / "huge.jpg").write_bytes(baseline_jpeg(seed=2) + b"\0" * 100_000)
    archive = tmp_path / "odd.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tar:
        data = baseline_jpeg(seed=3)
        info = tarfile.TarInfo(os.fsdecode(b"\xff\xfe.jpg"))
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "moco_dali.tools.shards.cli",
            "build",
            str(dump),
            str(archive),
            "--out",
            str(tmp_path / "out"),
            "--max-input-bytes",
            "50KB",
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    reasons = {r["input"]: r["reason"] for r in rejected_lines(tmp_path / "out")}
    assert reasons == {
        str(dump / "pipe.jpg"): "not a regular file (FIFO)",
        str(dump / "zero.jpg"): "not a regular file (character device)",
        str(dump / "huge.jpg"): "too large: over --max-input-bytes (50000 bytes)",
    }
    assert stored_sources(tmp_path / "out") == ["\\xff\\xfe.jpg", "caf\\xe9.jpg"]  # within SRC


def test_a_full_disk_ends_in_one_line_leaves_no_temporary_file_and_resumes(tmp_path, labelled_dump):
    write_files(labelled_dump / "dog", broken_inputs())
    out = tmp_path / "out"
    args = [
        "build",
        str(labelled_dump),
        "--out",
        str(out),
        "--max-count",
        "4",
        "--workers",
        "1",
        "--no-progress",
    ]

    # Files over 10 KB cannot be written, as on a full disk (Python ignores SIGXFSZ): the third
    # shard (12.5 KB) cannot, the state and manifests can. No size here depends on where the
    # test runs (the stored metadata names each input within its source, not by its path).
    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))

    full = subprocess.run(
        [sys.executable, "-m", "moco_dali.tools.shards.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        preexec_fn=small_disk,
        timeout=120,
    )
    assert full.returncode == 2
    assert "cannot write: File too large" in one_line(full)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not (out / "manifest.json").exists()
    assert run_cli(*args).returncode == 0
    assert run_cli(*args[:3], str(tmp_path / "clean"), *args[4:]).returncode == 0
    assert folder_bytes(out) == folder_bytes(tmp_path / "clean")


def test_a_read_only_output_ends_in_one_error_and_a_rerun_finishes(
    tmp_path, labelled_dump, monkeypatch
):
    from moco_dali.tools.shards import writer

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(writer, "open", read_only, raising=False)
    with pytest.raises(BuildError, match="cannot write: Read-only file system"):
        build(
            [str(labelled_dump)],
            tmp_path / "out",
            BuildSettings(max_count=4),
            workers=0,
            progress=False,
        )
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.undo()
    build(
        [str(labelled_dump)],
        tmp_path / "out",
        BuildSettings(max_count=4),
        workers=0,
        progress=False,
    )
    build(
        [str(labelled_dump)],
        tmp_path / "clean",
        BuildSettings(max_count=4),
        workers=0,
        progress=False,
    )
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "clean")


def test_an_out_inside_the_source_is_never_taken_as_input(tmp_path, labelled_dump):
    args = [
        "build",
        str(labelled_dump),
        "--out",
        str(labelled_dump / "shards"),
        "--labels",
        "folder",
        "--no-progress",
    ]
    first = run_cli(*args)
    assert first.returncode == 0 and "21 inputs -> 21 samples" in first.stdout
    again = run_cli(*args)
    assert again.returncode == 0 and "21 inputs -> 21 samples" in again.stdout
    assert all("/shards/" not in s for s in stored_sources(labelled_dump / "shards"))
    assert shards.load_manifest(labelled_dump / "shards").classes == ["cat", "dog", "emu"]


def test_a_build_that_rejects_every_input_exits_1_and_says_so(tmp_path):
    write_files(tmp_path / "dump", broken_inputs())
    result = run_cli(
        "build", str(tmp_path / "dump"), "--out", str(tmp_path / "out"), "--no-progress"
    )
    assert result.returncode == 1
    assert "every input was rejected (6)" in one_line(result)
    assert len(rejected_lines(tmp_path / "out")) == 6


def test_verify_names_the_sample_that_crashes_dalis_decoder(tmp_path, labelled_dump):
    # A JPEG whose Huffman table is garbage but whose shard hashes match: DALI's CPU
    # decoder segfaulted on it (exit 139, no output) before verify ran DALI in a child.
    out = tmp_path / "out"
    build([str(labelled_dump)], out, BuildSettings(max_count=100), workers=0, progress=False)
    tar = out / "shard-000000.tar"
    _, offset, size, name = shards.read_index(out / "shard-000000.idx")[7][0]
    data = bytearray(tar.read_bytes())
    table = data.find(b"\xff\xc4", offset)
    data[table + 4 : table + 40] = b"\xff" * 36
    tar.write_bytes(bytes(data))
    from tests.tools.shards.test_verify import rewrite_manifest_hash

    rewrite_manifest_hash(out, tar.name)
    result = run_cli("verify", str(out), "--no-progress")
    assert result.returncode == 1
    assert one_line(result).startswith(
        f"moco-shards verify: FAILED: {tar}: key {name.split('.')[0]}: does not decode"
    )


def test_verify_a_bad_tar_header_merge_a_broken_part_and_preview_bad_values_end_in_one_line(
    tmp_path, labelled_dump, capfd, caplog
):
    out = tmp_path / "out"
    build([str(labelled_dump)], out, BuildSettings(max_count=8), workers=0, progress=False)
    tar = out / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[148:156] = b"garbage!"  # the first header's checksum
    tar.write_bytes(bytes(data))
    from tests.tools.shards.test_verify import rewrite_manifest_hash

    rewrite_manifest_hash(out, tar.name)
    bad_header = run_cli("verify", str(out), "--no-progress")
    assert bad_header.returncode == 1 and f"{tar}: not a readable tar archive" in one_line(
        bad_header
    )

    parts = tmp_path / "parts"
    for part in (0, 1):
        build(
            [str(labelled_dump)],
            parts,
            BuildSettings(num_parts=2, part=part),
            workers=0,
            progress=False,
        )
    part1 = parts / "manifest.part-0001-of-0002.json"
    for damage in (b"", b'{"format": "moco-dali-shar'):
        part1.write_bytes(damage)
        merged = run_cli("merge", str(parts))
        assert merged.returncode == 2 and f"{part1}: unreadable part manifest" in one_line(merged)

    for flags, message in (
        (["--count", "0"], "--count must be at least 1"),
        (["--data.views.size", "4"], "data.views.size must be at least 8 px for a preview"),
        (["--out", str(tar / "p.png")], "is a file, not a folder"),
    ):
        # The last --out counts. In this process: nothing here is large enough to allocate.
        result = run_here(
            capfd, caplog, "preview", str(out), "--out", str(tmp_path / "p.png"), *flags
        )
        assert result.returncode == 2 and message in one_line(result), flags


def test_a_damaged_archive_is_accounted_for_and_an_unreadable_one_ends_in_one_line(
    tmp_path, labelled_dump
):
    archive = tmp_path / "cut.tar"
    with tarfile.open(archive, "w") as tar:
        for i in range(3):
            tar.add(labelled_dump / "cat" / f"00{i}.jpg", arcname=f"cat/00{i}.jpg")
    with tarfile.open(archive) as tar:
        second = tar.getmembers()[1].offset
    data = bytearray(archive.read_bytes())
    data[second : second + 512] = (
        b"\x01" * 512
    )  # the second header is garbage: tarfile would stop there quietly
    archive.write_bytes(bytes(data))
    result = run_cli("build", str(archive), "--out", str(tmp_path / "out"), "--no-progress")
    assert result.returncode == 0 and "2 inputs -> 1 samples" in result.stdout
    (damage,) = rejected_lines(tmp_path / "out")
    assert damage["input"] == f"{archive}:@{second}" and damage["reason"].startswith(
        "damaged archive"
    )

    data[0:512] = b"\x01" * 512  # now the first one too: nothing can be read
    archive.write_bytes(bytes(data))
    result = run_cli(
        "build", str(labelled_dump), str(archive), "--out", str(tmp_path / "out2"), "--no-progress"
    )
    assert result.returncode == 2 and f"{archive}: cannot read tar archive" in one_line(result)
    assert not list((tmp_path / "out2").iterdir())


def test_an_eps_in_a_dump_is_rejected_by_format_and_ghostscript_never_runs(
    tmp_path, labelled_dump, monkeypatch
):
    """The old variant: Pillow handed the EPS to Ghostscript, which ran its PostScript program."""
    from PIL import EpsImagePlugin

    from tests.tools.shards.test_imageprep import EPS

    reached = []

    def record(*args, **kwargs):
        reached.append(args[:1])
        raise OSError("recorded, not run")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", record)
    monkeypatch.setattr(subprocess, "check_call", record)
    monkeypatch.setattr(subprocess, "Popen", record)
    (labelled_dump / "cat" / "drawing.jpg").write_bytes(EPS)  # its name says nothing
    report = build(
        [str(labelled_dump)], tmp_path / "out", BuildSettings(), workers=0, progress=False
    )
    assert reached == []
    assert (report.inputs, report.samples, report.rejected) == (22, 21, 1)
    (line,) = rejected_lines(tmp_path / "out")
    assert line == {
        "input": str(labelled_dump / "cat" / "drawing.jpg"),
        "reason": "format not read: EPS (read: JPEG, PNG, WEBP, BMP, GIF, TIFF, PPM)",
    }
    manifest = shards.load_manifest(tmp_path / "out").data
    assert manifest["rejected_reasons"] == {"format not read": 1}


def test_a_csv_list_with_a_200_kb_field_rejects_that_row_and_builds_the_rest(tmp_path):
    """The old variant: csv's field limit (131072) ended the build in _csv.Error."""
    dump = write_files(tmp_path / "dump", {"a.jpg": baseline_jpeg(seed=1)})[0].parent
    listing = tmp_path / "list.csv"
    wide = '"' + "x" * 200_000 + '"'
    listing.write_text(f"{dump / 'a.jpg'},cat\n{wide},dog\nnul\0here.jpg,cat\n")
    report = build([str(listing)], tmp_path / "out", BuildSettings(), workers=0, progress=False)
    assert (report.inputs, report.samples, report.rejected) == (3, 1, 2)
    reasons = sorted(r["reason"] for r in rejected_lines(tmp_path / "out"))
    assert reasons == [
        "malformed list line (a NUL character)",
        "malformed list line (over 65536 bytes)",
    ]


def test_merge_refuses_part_manifests_with_lists_or_strings_for_numbers(tmp_path, labelled_dump):
    """The old variant: merge added up whatever it found and ended in a TypeError."""
    parts = tmp_path / "parts"
    for part in (0, 1):
        build(
            [str(labelled_dump)],
            parts,
            BuildSettings(num_parts=2, part=part),
            workers=0,
            progress=False,
        )
    path = parts / "manifest.part-0001-of-0002.json"
    good = json.loads(path.read_text())
    for damage, field in (
        ({"samples": [1, 2]}, "samples: expected `int`, got `array`"),
        ({"inputs": "21"}, "inputs: expected `int`, got `str`"),
        ({"class_counts": {"cat": "7"}}, "class_counts[...]: expected `int`, got `str`"),
        (
            {"settings": dict(good["settings"], part="1")},
            "settings.part: expected `int`, got `str`",
        ),
        ({"shards": "all"}, "shards: expected `array`, got `str`"),
    ):
        path.write_text(json.dumps({**good, **damage}))
        merged = run_cli("merge", str(parts))
        assert merged.returncode == 2, merged.stderr
        assert one_line(merged) == (
            f"moco-shards merge: error: {path}: malformed part manifest: {field}; "
            "build that part again"
        )
    path.write_text("[" * 100_000 + "]" * 100_000)
    merged = run_cli("merge", str(parts))
    assert merged.returncode == 2 and "nested deeper than 32 levels" in one_line(merged)


def test_sizes_nobody_bounded_are_refused_in_one_line(tmp_path, labelled_dump):
    """The old variants: preview and verify set out to allocate what was asked; --max-bytes
    with 400 digits ended in OverflowError. Commands, not ``run_here``: an allocation of
    what is asked here would end this process, not a test."""
    out = tmp_path / "out"
    build([str(labelled_dump)], out, BuildSettings(max_count=8), workers=0, progress=False)
    png = str(tmp_path / "p.png")
    for argv, message in (
        (["preview", str(out), "--out", png, "--count", "1000000"], "at most 256 samples"),
        (["preview", str(out), "--out", png, "--data.views.size", "60000"], "at most 1024 px"),
        (
            ["preview", str(out), "--out", png, "--count", "200", "--data.views.size", "512"],
            "a grid",
        ),
        (["verify", str(out), "--batch-size", "1000000"], "--batch-size must be in 1..1024"),
        (["verify", str(out), "--threads", "1000000"], "--threads must be in 0..1024"),
        (
            ["build", str(labelled_dump), "--out", str(tmp_path / "o"), "--max-bytes", "9" * 400],
            "is not a size (at most 9223372036854775807 bytes)",
        ),
    ):
        result = run_cli(*argv)
        assert result.returncode == 2, result.stderr
        assert message in one_line(result), argv
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "o").exists()
