"""moco-shards push: a shard folder into S3 (moto's server on 127.0.0.1 behind a fault proxy):
every object verified before it is sent, the manifest last, an interrupted push resumed."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from moco_dali.common.store import ObjectURL, Store, StoreError
from moco_dali.pipeline import cache, shards
from moco_dali.pipeline.config import ReadConfig
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.cli import main
from moco_dali.tools.shards.settings import BuildSettings


def _built(labelled_dump, tmp_path):
    out = tmp_path / "shards"
    build([str(labelled_dump)], out, BuildSettings(max_count=6), workers=0, progress=False)
    return out


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    said = capsys.readouterr()
    return code, said.out.strip(), said.err.strip()


def test_a_pushed_folder_is_every_file_with_the_manifest_last(s3, labelled_dump, tmp_path, capsys):
    bucket, faults = s3
    out = _built(labelled_dump, tmp_path)
    faults.throttle = 2  # the store asks to slow down: the push goes on
    code, said, err = _run(capsys, "push", str(out), f"s3://{bucket}/ds", "--jobs", "3")
    assert code == 0, err
    local = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    store = Store()
    assert dict((k.split("/", 1)[1], n) for k, n in store.list(ObjectURL(bucket, "ds"))) == local
    puts = [path for method, path in faults.log if method == "PUT"]
    assert puts[-1] == f"/{bucket}/ds/manifest.json" and len(set(puts)) == len(local)
    assert (
        said.startswith(f"moco-shards push: {len(local)} files sent") and "0 already there" in said
    )
    # What a reader fetches is what the build wrote, checked against the manifest.
    manifest = shards.load_manifest(out)
    entry = manifest.entry(0)
    got = tmp_path / "got.tar"
    store.download(ObjectURL(bucket, f"ds/{entry.tar}"), got, entry.bytes, entry.sha256)
    assert got.read_bytes() == (out / entry.tar).read_bytes()


def test_an_interrupted_push_sends_no_manifest_and_a_rerun_finishes_it(
    s3, labelled_dump, tmp_path, capsys, monkeypatch
):
    bucket, faults = s3
    out = _built(labelled_dump, tmp_path)
    real, sent = Store.upload, []

    def failing(self, path, url, sha256=None):
        if len(sent) == 3:
            raise StoreError(f"{url}: SlowDown: Please reduce your request rate. (after 8 tries)")
        sent.append(url)
        return real(self, path, url, sha256)

    monkeypatch.setattr(Store, "upload", failing)
    code, _, err = _run(capsys, "push", str(out), f"s3://{bucket}/ds", "--jobs", "1")
    assert code == 2 and err.startswith(f"moco-shards push: error: s3://{bucket}/ds/")
    assert "\n" not in err
    names = [k for k, _ in Store().list(ObjectURL(bucket, "ds"))]
    assert len(names) == 3 and f"ds/{shards.MANIFEST_NAME}" not in names
    monkeypatch.setattr(Store, "upload", real)
    code, said, err = _run(capsys, "push", str(out), f"s3://{bucket}/ds")
    assert code == 0, err
    files = sum(1 for p in out.iterdir() if p.is_file())
    assert f"{files - 3} files sent" in said and "3 already there" in said
    code, said, _ = _run(capsys, "push", str(out), f"s3://{bucket}/ds")  # nothing left to send
    assert (
        code == 0
        and said.startswith("moco-shards push: 0 files sent")
        and f"{files} already" in said
    )


def test_a_shard_changed_after_the_build_is_never_sent(s3, labelled_dump, tmp_path, capsys):
    bucket, faults = s3
    out = _built(labelled_dump, tmp_path)
    tar = out / shards.load_manifest(out).entry(1).tar
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    code, _, err = _run(capsys, "push", str(out), f"s3://{bucket}/ds", "--jobs", "1")
    assert code == 2 and err == (
        f"moco-shards push: error: {tar}: its sha256 is not the manifest's; changed after the build"
    )
    assert f"/{bucket}/ds/manifest.json" not in [p for m, p in faults.log if m == "PUT"]


def test_bad_addresses_folders_and_a_store_that_refuses_end_in_one_line(
    s3, labelled_dump, tmp_path, capsys
):
    bucket, faults = s3
    out = _built(labelled_dump, tmp_path)
    for argv, message in (
        ([str(out), "/local/path"], "/local/path: not an s3:// address"),
        ([str(out), "s3://No_Such/x"], "is not an S3 bucket name"),
        ([str(tmp_path / "none"), f"s3://{bucket}/x"], "no such folder"),
        ([str(labelled_dump), f"s3://{bucket}/x"], "no manifest"),
        ([str(out), f"s3://{bucket}/x", "--jobs", "0"], "--jobs must be in 1..256"),
    ):
        code, _, err = _run(capsys, "push", *argv)
        assert code == 2 and message in err and "\n" not in err, (argv, err)
    faults.deny = True
    code, _, err = _run(capsys, "push", str(out), f"s3://{bucket}/x")
    assert code == 2 and "access denied" in err and "\n" not in err
    assert json.loads((out / "manifest.json").read_text())["samples"] == 21


def _fetch_all(bucket: str, prefix: str, into):
    """Every object the store's manifest names, fetched and checked, as a reader would."""
    store = Store()
    into.mkdir()
    base = ObjectURL(bucket, prefix)
    (into / "manifest.json").write_bytes(store.read(base.child("manifest.json"), 1 << 20))
    for entry in shards.load_manifest(into).shards:
        store.download(base.child(entry.tar), into / entry.tar, entry.bytes, entry.sha256)
        there = store.head(base.child(entry.index))
        store.download(base.child(entry.index), into / entry.index, there["size"], there["sha256"])
    return into


def test_parts_built_into_the_store_merge_there(s3, labelled_dump, tmp_path, capsys, monkeypatch):
    bucket, faults = s3
    url = f"s3://{bucket}/ds"
    common = ["build", str(labelled_dump), "--out", url, "--max-count", "4", "--num-parts", "2"]
    real, calls = Store.upload, []

    def failing(self, path, target, sha256=None):
        calls.append(target)
        if len(calls) == 2:  # part 0's push stops: its stage is built, part of it sent
            raise StoreError(
                f"{target}: SlowDown: Please reduce your request rate. (after 8 tries)"
            )
        return real(self, path, target, sha256)

    # Part 1 holds the inputs here (inputs are dealt to parts in blocks; 21 make one).
    code, _, err = _run(capsys, *common, "--part", "0", "--stage", str(tmp_path / "stage0"))
    assert code == 0, err
    monkeypatch.setattr(Store, "upload", failing)
    stage1 = ["--part", "1", "--stage", str(tmp_path / "stage1")]
    code, _, err = _run(capsys, *common, *stage1)
    assert code == 2 and err.startswith(f"moco-shards build: error: {url}/") and "\n" not in err
    monkeypatch.setattr(Store, "upload", real)
    code, said, err = _run(capsys, *common, *stage1)  # the same command finishes it
    assert code == 0, err
    sent, there = map(int, re.search(r"sent (\d+) files sent .*, (\d+) already", said).groups())
    part = shards.load_manifest(tmp_path / "stage1", shards.part_manifest_name(1, 2))
    files = 2 * len(part.shards) + 2  # tars and indexes, the rejected log, the part manifest
    # What the first run sent before it stopped (in parallel: at least the first) is kept; the
    # one that failed and the manifest are sent now.
    assert len(part.shards) >= 3 and there >= 1 and sent >= 2 and sent + there == files
    assert _run(capsys, "merge", url)[0] == 0

    local = tmp_path / "local"
    for part in (0, 1):
        argv = ["build", str(labelled_dump), "--out", str(local), "--max-count", "4"]
        assert _run(capsys, *argv, "--num-parts", "2", "--part", str(part))[0] == 0
    assert _run(capsys, "merge", str(local))[0] == 0
    fetched = _fetch_all(bucket, "ds", tmp_path / "fetched")
    ours, theirs = shards.load_manifest(fetched), shards.load_manifest(local)
    assert ours.samples == theirs.samples == 21
    assert [s.sha256 for s in ours.shards] == [s.sha256 for s in theirs.shards]
    assert len(shards.discover(fetched)[1]) == len(ours.shards)  # every shard with its index


def test_build_into_the_store_needs_a_stage_and_refuses_ray(labelled_dump, tmp_path, capsys):
    base = ["build", str(labelled_dump), "--out", "s3://bucket/x"]
    for extra, message in (
        ([], "--out s3://bucket/x: give --stage DIR"),
        (
            ["--stage", str(tmp_path / "s"), "--executor", "ray"],
            "--executor ray writes to a shared",
        ),
    ):
        code, _, err = _run(capsys, *base, *extra)
        assert code == 2 and message in err, err
    code, _, err = _run(
        capsys, "build", str(labelled_dump), "--out", str(tmp_path / "o"), "--stage", "s"
    )
    assert code == 2 and "--stage is for an s3:// --out" in err
    code, _, err = _run(capsys, "merge", "s3://bucket/x", str(tmp_path))
    assert code == 2 and "give one s3:// prefix holding every part" in err


def test_pull_fetches_a_pushed_folder_checked_and_resumes(
    s3, labelled_dump, tmp_path, capsys, monkeypatch
):
    bucket, faults = s3
    out = _built(labelled_dump, tmp_path)
    url = f"s3://{bucket}/ds"
    assert _run(capsys, "push", str(out), url)[0] == 0
    local = tmp_path / "local"
    faults.cut = 2  # two bodies cut off mid-object: read on from where they broke
    code, said, err = _run(capsys, "pull", url, str(local), "--jobs", "2")
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    assert sorted(p.name for p in local.iterdir()) == names  # nothing of the pull's own left
    assert all((local / n).read_bytes() == (out / n).read_bytes() for n in names)
    assert said.startswith(f"moco-shards pull: {len(names) - 1} files fetched")
    assert _run(capsys, "verify", str(local), "--no-progress")[0] == 0

    # A pull cut short leaves no manifest; the rerun checks what is there and fetches the rest.
    again = tmp_path / "again"
    real, calls = Store.download, []

    def failing(self, url, dest, size, sha256):
        calls.append(url)
        if len(calls) == 3:
            raise StoreError(f"{url}: SlowDown: Please reduce your request rate. (after 8 tries)")
        return real(self, url, dest, size, sha256)

    monkeypatch.setattr(Store, "download", failing)
    code, _, err = _run(capsys, "pull", url, str(again), "--jobs", "1")
    assert code == 2 and "SlowDown" in err and not (again / "manifest.json").exists()
    monkeypatch.setattr(Store, "download", real)
    tar = again / shards.load_manifest(out).entry(0).tar
    tar.write_bytes(tar.read_bytes()[:100])  # a file that is not what the manifest says
    code, said, err = _run(capsys, "pull", url, str(again))
    assert code == 0, err
    fetched, kept = map(
        int, re.search(r"(\d+) files fetched .*, (\d+) already here", said).groups()
    )
    # What the cut pull had fetched and checked is kept (the index after the damaged tar at
    # least; a fetch under way when it stopped may have finished too); the damaged tar is not.
    assert kept >= 1 and fetched + kept == len(names) - 1 and fetched >= len(names) - 4
    assert all((again / n).read_bytes() == (out / n).read_bytes() for n in names)

    faults.corrupt = True  # the store's bytes are not the manifest's: refused by name
    code, _, err = _run(capsys, "pull", url, str(tmp_path / "other"))
    assert code == 2 and err.startswith(f"moco-shards pull: error: {url}/") and "damaged" in err
    assert not (tmp_path / "other" / "manifest.json").exists()


def _verify(folder: str) -> tuple[int, str, str]:
    """moco-shards verify in a process of its own: verify forks its DALI reader, and this one
    runs the store's server threads (a fork beside them can hang)."""
    done = subprocess.run(
        [sys.executable, "-m", "moco_dali.tools.shards.cli", "verify", folder, "--no-progress"],
        capture_output=True,
        text=True,
    )
    return done.returncode, done.stdout.strip(), done.stderr.strip()


def test_verify_inspect_and_preview_read_a_folder_in_the_store(s3, labelled_dump, tmp_path, capsys):
    bucket, faults = s3
    out = _built(labelled_dump, tmp_path)
    url = f"s3://{bucket}/ds"
    assert _run(capsys, "push", str(out), url)[0] == 0
    local = _verify(str(out))
    code, said, err = _verify(url)
    assert code == 0, err
    assert said.split(" verified")[0] == local[1].split(" verified")[0]  # shards, samples, MB
    # A cache of two shards: groups of two (no fetch runs beside one), every shard once, in order.
    manifest = shards.load_manifest(out)
    largest = max(e.bytes + cache.index_bound(e.samples) for e in manifest.shards)
    groups = list(cache.shard_groups(url, ReadConfig(cache_limit=2 * largest)))
    assert [len(g[1]) for g in groups] == [2, 2] and len(manifest.counts) == 4
    assert [e.tar for g in groups for e in g[1]] == [e.tar for e in manifest.shards]
    # inspect and preview read the store as they read a folder
    code, said, err = _run(capsys, "inspect", url, "--json")
    assert code == 0, err
    local_info = json.loads(_run(capsys, "inspect", str(out), "--json")[1])
    info = json.loads(said)
    assert info.pop("folder") == url and info.pop("rejected_file") == f"{url}/rejected.jsonl"
    assert info == {k: v for k, v in local_info.items() if k not in ("folder", "rejected_file")}
    png = tmp_path / "views.png"
    argv = ["preview", url, "--out", str(png), "--count", "2", "--data.views.size", "16"]
    assert _run(capsys, *argv)[0] == 0 and png.read_bytes()[:4] == b"\x89PNG"
    faults.corrupt = True  # what the store holds is not the manifest's: the check fails by name
    code, _, err = _verify(url)
    assert code == 1 and err.startswith(f"moco-shards verify: FAILED: {url}/") and "match" in err
