"""moco-shards push: a shard folder into S3 (moto's server on 127.0.0.1 behind a fault proxy):
every object verified before it is sent, the manifest last, an interrupted push resumed."""

from __future__ import annotations

import json

from moco_dali.common.store import ObjectURL, Store, StoreError
from moco_dali.pipeline import shards
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
