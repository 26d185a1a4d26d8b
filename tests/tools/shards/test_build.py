"""moco-shards build: round trip through DALI, accounting, determinism, resume, parts."""

from __future__ import annotations

import io
import json
import logging
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import simplejpeg

from moco_dali.pipeline import shards
from moco_dali.pipeline.scan import scan_shards
from moco_dali.tools.shards import BuildError
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.cli import main as shards_main
from moco_dali.tools.shards.imageprep import PrepSettings
from moco_dali.tools.shards.inputs import iter_part
from moco_dali.tools.shards.merge import merge
from moco_dali.tools.shards.settings import BuildSettings
from tests.conftest import awkward_inputs, baseline_jpeg, broken_inputs, photo_like, write_files

REPO = Path(__file__).resolve().parents[3]


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moco_dali.tools.shards.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=check,
    )


def run_here(capfd, caplog, *args: str) -> subprocess.CompletedProcess:
    """``moco-shards`` run in this process, with what ``run_cli`` would give back: exit code,
    stdout, stderr (its log lines added). For commands that load torch before they read their
    arguments (preview: some 4 s a run as a command), where the process is not under test."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = shards_main(list(args))
    out, err = capfd.readouterr()
    err += "".join(f"moco-shards: {record.getMessage()}\n" for record in caplog.records)
    return subprocess.CompletedProcess(["moco-shards", *args], code, out, err)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def rejected_lines(folder: Path, name: str = "rejected.jsonl") -> list[dict]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def test_round_trip_every_sample_decodes_through_dali_to_its_size_and_class(
    tmp_path, labelled_dump
):
    report = build(
        [str(labelled_dump)],
        tmp_path / "out",
        BuildSettings(labels="folder", max_count=8),
        workers=2,
        progress=False,
    )
    assert (report.inputs, report.samples, report.rejected, report.shards) == (21, 21, 0, 3)
    manifest, pairs = shards.discover(tmp_path / "out")
    assert manifest.classes == ["cat", "dog", "emu"]
    decoded = list(scan_shards([p[0] for p in pairs], [p[1] for p in pairs], batch_size=5))
    assert len(decoded) == 21
    for sample in decoded:
        meta = json.loads(sample.metadata)
        source = labelled_dump / meta["source"]  # its name within its source
        expected = simplejpeg.decode_jpeg_header(source.read_bytes())[:2]  # (height, width)
        assert (sample.height, sample.width, sample.channels) == (*expected, 3)
        assert manifest.classes[int(sample.label)] == source.parent.name


def test_every_input_is_accounted_for(tmp_path):
    good = write_files(tmp_path / "dump" / "good", awkward_inputs())
    bad = write_files(tmp_path / "dump" / "bad", broken_inputs())
    report = build(
        [str(tmp_path / "dump")], tmp_path / "out", BuildSettings(), workers=2, progress=False
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    rejected = rejected_lines(tmp_path / "out")
    assert report.inputs == manifest["inputs"] == len(good) + len(bad)
    assert manifest["samples"] + manifest["rejected"] == manifest["inputs"]
    assert manifest["rejected"] == len(rejected) and manifest["rejected_file"] == "rejected.jsonl"
    assert sorted(r["input"] for r in rejected) == sorted(map(str, bad))
    assert all(r["reason"] for r in rejected)
    assert sum(manifest["rejected_reasons"].values()) == len(bad)
    stored = [
        json.loads(s.metadata)["source"]
        for s in scan_shards(*zip(*shards.discover(tmp_path / "out")[1]))
    ]
    assert sorted(stored) == sorted(str(p.relative_to(tmp_path / "dump")) for p in good)


def test_all_rejected_still_writes_a_manifest(tmp_path):
    write_files(tmp_path / "dump", broken_inputs())
    report = build(
        [str(tmp_path / "dump")], tmp_path / "out", BuildSettings(), workers=0, progress=False
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (report.samples, report.shards, manifest["rejected"]) == (0, 0, len(broken_inputs()))


def test_output_is_byte_identical_whatever_the_worker_count(tmp_path, labelled_dump):
    write_files(labelled_dump / "dog", broken_inputs())
    write_files(labelled_dump / "emu", {f"x{k}": v for k, v in awkward_inputs().items()})
    outputs = []
    for workers in (0, 1, 2):
        out = tmp_path / f"w{workers}"
        build(
            [str(labelled_dump)],
            out,
            BuildSettings(labels="folder", max_count=5),
            workers=workers,
            progress=False,
        )
        outputs.append(folder_bytes(out))
    assert outputs[0] == outputs[1] == outputs[2]
    assert len(outputs[0]) > 5


def test_shard_bounds_by_count_and_bytes(tmp_path, labelled_dump):
    build(
        [str(labelled_dump)],
        tmp_path / "count",
        BuildSettings(max_count=4),
        workers=0,
        progress=False,
    )
    counts = [s.samples for s in shards.load_manifest(tmp_path / "count").shards]
    assert counts == [4, 4, 4, 4, 4, 1]

    build(
        [str(labelled_dump)],
        tmp_path / "bytes",
        BuildSettings(max_bytes=8192),
        workers=0,
        progress=False,
    )
    entries = shards.load_manifest(tmp_path / "bytes").shards
    assert all(e.bytes <= 8192 for e in entries) and sum(e.samples for e in entries) == 21
    for e in entries:
        assert (tmp_path / "bytes" / e.tar).stat().st_size == e.bytes


def test_folders_lists_and_tar_archives_mix(tmp_path, labelled_dump):
    archive = tmp_path / "more.tar"
    with tarfile.open(archive, "w") as tar:
        for name in ("bird/a.jpg", "bird/b.png", "README"):
            data = (
                baseline_jpeg(20, 20)
                if name.endswith(".jpg")
                else (b"read me" if name == "README" else awkward_inputs()["palette.png"])
            )
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    listing = tmp_path / "lists" / "files.txt"
    listing.parent.mkdir()
    listing.write_text(
        f"# two cats and a missing file\n{labelled_dump}/cat/000.jpg\n\n"
        f"../dump/cat/001.jpg\n{tmp_path}/gone/nothing.jpg\n"
    )
    refs = list(
        iter_part([str(labelled_dump / "dog"), str(listing), str(archive)], labels="folder")
    )
    assert [r.label for r in refs] == [None] * 7 + ["cat", "cat", "gone", "bird", "bird", None]
    report = build(
        [str(labelled_dump / "dog"), str(listing), str(archive)],
        tmp_path / "out",
        BuildSettings(),
        workers=2,
        progress=False,
    )
    json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (report.inputs, report.samples) == (13, 11)
    reasons = {r["input"]: r["reason"] for r in rejected_lines(tmp_path / "out")}
    assert reasons == {
        f"{tmp_path}/gone/nothing.jpg": "unreadable: No such file or directory",
        f"{archive}:README": "not an image",
    }


def test_labels_folder_rejects_files_outside_class_folders(tmp_path, labelled_dump):
    write_files(labelled_dump, {"stray.jpg": baseline_jpeg()})
    build(
        [str(labelled_dump)],
        tmp_path / "out",
        BuildSettings(labels="folder"),
        workers=0,
        progress=False,
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["classes"] == ["cat", "dog", "emu"]
    assert manifest["class_counts"] == {"cat": 7, "dog": 7, "emu": 7}
    rejected = rejected_lines(tmp_path / "out")
    assert [r["input"] for r in rejected] == [str(labelled_dump / "stray.jpg")]
    assert "no class folder" in rejected[0]["reason"]


def test_a_finished_build_is_not_redone_and_a_different_one_refused(tmp_path, labelled_dump):
    build([str(labelled_dump)], tmp_path / "out", BuildSettings(), workers=0, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    again = build(
        [str(labelled_dump)], tmp_path / "out", BuildSettings(), workers=0, progress=False
    )
    assert again.samples == 21
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before
    with pytest.raises(BuildError, match="holds another build"):
        build(
            [str(labelled_dump)],
            tmp_path / "out",
            BuildSettings(prep=PrepSettings(quality=80)),
            workers=0,
            progress=False,
        )


def test_resume_after_kill_finishes_without_redoing_finished_shards(tmp_path):
    # Big enough JPEGs, re-encoded one at a time, that the build is still running
    # when the third shard is finished.
    write_files(
        tmp_path / "dump",
        {
            f"{i:03d}.jpg": simplejpeg.encode_jpeg(photo_like(1200, 900, seed=i), 90)
            for i in range(60)
        },
    )
    args = [
        str(tmp_path / "dump"),
        "--max-count",
        "3",
        "--workers",
        "1",
        "--reencode",
        "always",
        "--no-progress",
    ]
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moco_dali.tools.shards.cli", "build", *args, "--out", str(out)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = out / ".moco-build-shard"
    deadline = time.monotonic() + 120
    while (
        len(list(state.glob("shard-*.json"))) < 3
        and time.monotonic() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the build ended before it could be killed mid-way"
    assert not (out / "manifest.json").exists()

    # Whatever carries a shard's final name is complete: its index exists and matches.
    finished = sorted(out.glob("shard-*.tar"))
    assert len(finished) >= 3
    for tar in finished:
        samples = shards.read_index(tar.with_suffix(".idx"))
        assert tar.stat().st_size == shards.tar_size_for_index(samples)
        with tarfile.open(tar) as archive:
            assert len(archive.getmembers()) == 2 * len(samples)
    kept = {p.name: p.stat().st_mtime_ns for p in finished[:3]}

    result = run_cli("build", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "3 shards kept from an earlier run" in result.stdout or "shards kept" in result.stdout
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept

    clean = tmp_path / "clean"
    assert run_cli("build", *args, "--out", str(clean)).returncode == 0
    assert folder_bytes(out) == folder_bytes(clean)
    assert not list(out.glob(".*"))  # no temporary files or resume state left behind


def test_parts_are_disjoint_and_merge_into_one_manifest(tmp_path, labelled_dump):
    write_files(labelled_dump / "dog", {"broken.jpg": b""})
    whole = build(
        [str(labelled_dump)],
        tmp_path / "whole",
        BuildSettings(labels="folder", max_count=4),
        workers=0,
        progress=False,
    )
    # Parts 0 and 1 on "one machine", part 2 on "another", then merged.
    for part, folder in ((0, "a"), (1, "a"), (2, "b")):
        build(
            [str(labelled_dump)],
            tmp_path / folder,
            BuildSettings(labels="folder", max_count=4, num_parts=3, part=part),
            workers=0,
            progress=False,
        )
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "manifest.part-0000-of-0003.json" in names and "shard-part0001-000000.tar" in names
    with pytest.raises(BuildError, match="parts 2 of 3 are missing"):
        merge([str(tmp_path / "a")])
    path = merge([str(tmp_path / "a"), str(tmp_path / "b")])
    merged = shards.load_manifest(tmp_path / "a")
    assert path == tmp_path / "a" / "manifest.json"
    assert (merged.samples, merged.data["inputs"], merged.data["rejected"]) == (
        whole.samples,
        whole.inputs,
        whole.rejected,
    )
    assert (
        merged.data["class_counts"] == shards.load_manifest(tmp_path / "whole").data["class_counts"]
    )
    _, pairs = shards.discover(tmp_path / "a")
    assert any("../b/" in str(t) for t, _ in pairs)
    sources = [json.loads(s.metadata)["source"] for s in scan_shards(*zip(*pairs))]
    assert len(sources) == len(set(sources)) == whole.samples
    keys = [m[0][3] for _, idx in pairs for m in shards.read_index(idx)]
    assert len(keys) == len(set(keys))
    assert run_cli("verify", str(tmp_path / "a"), "--no-progress").returncode == 0


def test_cli_strict_and_one_line_errors(tmp_path, labelled_dump):
    write_files(labelled_dump / "cat", {"zero.jpg": b""})
    ok = run_cli("build", str(labelled_dump), "--out", str(tmp_path / "lenient"), "--no-progress")
    assert ok.returncode == 0 and "1 rejected" in ok.stdout
    strict = run_cli(
        "build", str(labelled_dump), "--out", str(tmp_path / "strict"), "--strict", "--no-progress"
    )
    assert strict.returncode == 1 and "--strict: 1 inputs rejected" in strict.stderr
    missing = run_cli("build", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"moco-shards build: error: {tmp_path / 'nowhere'}: no such file or folder"
    ]
    bad_part = run_cli(
        "build", str(labelled_dump), "--out", str(tmp_path / "y"), "--num-parts", "2", "--part", "2"
    )
    assert bad_part.returncode == 2 and "--part must be in 0..1" in bad_part.stderr
    bad_size = run_cli(
        "build", str(labelled_dump), "--out", str(tmp_path / "z"), "--max-bytes", "lots"
    )
    assert bad_size.returncode == 2 and "is not a size" in bad_size.stderr


def test_inputs_are_packed_in_a_seeded_shuffled_order_unless_asked_not_to(tmp_path, labelled_dump):
    def classes_per_shard(folder):
        _, pairs = shards.discover(folder)
        return [
            len({json.loads(s.metadata)["source"].split("/")[-2] for s in scan_shards([t], [i])})
            for t, i in pairs
        ]

    build(
        [str(labelled_dump)],
        tmp_path / "listing",
        BuildSettings(max_count=7, shuffle_seed=None),
        workers=0,
        progress=False,
    )
    assert classes_per_shard(tmp_path / "listing") == [
        1,
        1,
        1,
    ]  # a class-sorted dump, packed as listed
    build(
        [str(labelled_dump)],
        tmp_path / "mixed",
        BuildSettings(max_count=7),
        workers=0,
        progress=False,
    )
    assert max(classes_per_shard(tmp_path / "mixed")) > 1
    build(
        [str(labelled_dump)],
        tmp_path / "again",
        BuildSettings(max_count=7),
        workers=2,
        progress=False,
    )
    assert folder_bytes(tmp_path / "mixed") == folder_bytes(tmp_path / "again")
    other = BuildSettings(max_count=7, shuffle_seed=1)
    build([str(labelled_dump)], tmp_path / "seed1", other, workers=0, progress=False)
    assert folder_bytes(tmp_path / "mixed") != folder_bytes(tmp_path / "seed1")


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {n: b for n, b in folder_bytes(folder).items() if n.endswith((".tar", ".idx"))}


def test_the_same_dump_from_two_mount_points_gives_byte_identical_shards(tmp_path, labelled_dump):
    """A folder, a list file and an archive, under two parents and through a symlink, into
    --out folders of other names: the same tars and indexes, in one part or in two."""
    mount = tmp_path / "a"
    shutil.copytree(labelled_dump, mount / "dump")
    (mount / "list.txt").write_text("dump/cat/000.jpg\ndump/emu/001.jpg\n")
    with tarfile.open(mount / "archive.tar", "w") as tar:
        for i in range(3):
            tar.add(labelled_dump / "dog" / f"{i:03d}.jpg", arcname=f"bird/{i}.jpg")
    elsewhere = tmp_path / "some" / "much" / "longer" / "parent folder"
    shutil.copytree(mount, elsewhere)
    (tmp_path / "mnt").symlink_to(mount)
    mounts = {"a": mount, "longer": elsewhere, "symlink": tmp_path / "mnt"}
    built = {}
    for label, root in mounts.items():
        sources = [str(root / "dump"), str(root / "list.txt"), str(root / "archive.tar")]
        out = tmp_path / f"out-{label}"
        build(sources, out, BuildSettings(labels="folder", max_count=8), workers=0, progress=False)
        for part in range(2):
            settings = BuildSettings(labels="folder", max_count=4, num_parts=2, part=part)
            build(sources, out / "parts", settings, workers=0, progress=False)
        built[label] = (shard_bytes(out), shard_bytes(out / "parts"))
        assert shards.load_manifest(out).data["sources"] == sources  # where it was, for people
    assert built["a"] == built["longer"] == built["symlink"]
    assert len(built["a"][0]) == 2 * 4 and len(built["a"][1]) >= 2 * 4

    stored = {
        json.loads(s.metadata)["source"]: json.loads(s.metadata)["src"]
        for s in scan_shards(*zip(*shards.discover(tmp_path / "out-a")[1]))
    }
    assert stored["cat/000.jpg"] == 0 and stored["dump/emu/001.jpg"] == 1
    assert stored["bird/2.jpg"] == 2 and len(stored) == 21 + 2 + 3


def test_a_build_begun_under_the_old_naming_rule_finishes_under_it(
    tmp_path, labelled_dump, monkeypatch
):
    """A build interrupted before the naming rule was recorded resumes with the old rule (paths
    as given), so its finished shards and the rest agree; a new build uses the new one."""
    from moco_dali.tools.shards import build as building
    from moco_dali.tools.shards import folder

    sources, settings = [str(labelled_dump)], BuildSettings(max_count=4)
    monkeypatch.setattr(folder, "ORDER", 1)  # what moco-shards did before the rule
    build(sources, tmp_path / "clean", settings, workers=0, progress=False)

    real, blocks = building._build_block, []

    def killed_after_two(task):
        if len(blocks) == 2:
            raise KeyboardInterrupt
        blocks.append(task[2])
        return real(task)

    monkeypatch.setattr(building, "_build_block", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        build(sources, tmp_path / "old", settings, workers=0, progress=False)
    monkeypatch.undo()  # this moco-shards, its rule 2, from here on
    state = tmp_path / "old" / ".moco-build-shard" / "build.json"
    identity = json.loads(state.read_text())
    assert identity.pop("order") == 1
    state.write_text(json.dumps(identity))  # as the old moco-shards wrote it

    report = build(sources, tmp_path / "old", settings, workers=0, progress=False)
    assert report.resumed_shards == 2
    assert shard_bytes(tmp_path / "old") == shard_bytes(tmp_path / "clean")
    manifest = shards.load_manifest(tmp_path / "old").data
    assert manifest["order"] == 1
    stored = [
        json.loads(s.metadata) for s in scan_shards(*zip(*shards.discover(tmp_path / "old")[1]))
    ]
    assert all(s["source"].startswith(str(labelled_dump)) and "src" not in s for s in stored)

    new = build(sources, tmp_path / "new", settings, workers=0, progress=False)
    assert shards.load_manifest(tmp_path / "new").data["order"] == 2 and new.samples == 21
    assert shard_bytes(tmp_path / "new") != shard_bytes(tmp_path / "clean")
