"""``moco-shards push DIR s3://bucket/prefix``: a finished shard folder into object storage.

Owns the order and the checks of publishing: every shard's tar and index is read and checked
against the manifest's sha256 before it is sent (a file changed since the build is never
published), sent with its sha256 in the object's metadata, and the manifest goes last, once
every object it names is complete in the store, so a reader that finds a manifest finds all it
names. A rerun skips the objects already there with the size and sha256 wanted: an interrupted
push goes on where it stopped. Sends in parallel, with a bounded number of files in flight.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from ...common.files import read_json, sha256_of
from ...common.options import option
from ...common.store import ObjectURL, Store, in_parallel
from ...pipeline import shards
from ...pipeline.schema import MAX_MANIFEST_BYTES
from . import BuildError
from .merge import merge

__all__ = ["PushCommand", "PushReport", "Tally", "push", "publish", "merge_in_store", "shard_files"]


@dataclass
class PushCommand:
    """Send a shard folder to s3://bucket/prefix, the manifest last."""

    folder: str = option(positional=None, metavar="DIR")
    """The shard folder (written by moco-shards build, or merged)."""
    to: str = option(positional=None, metavar="URL")
    """s3://bucket/prefix; the endpoint and credentials come from the standard AWS settings
    (AWS_ENDPOINT_URL for MinIO, Ceph, R2 ...)."""
    jobs: int = option(8, metavar="J")
    """Files sent at once."""

    def __post_init__(self) -> None:
        if not 1 <= self.jobs <= 256:
            raise BuildError(f"--jobs must be in 1..256, got {self.jobs}")
        ObjectURL.parse(self.to)  # a bad address is refused before any file is read


@dataclass
class Tally:
    """Files moved and files found already in place (push and pull)."""

    moved: int = 0
    kept: int = 0
    bytes: int = 0
    seconds: float = 0.0
    manifest: str = ""

    def add(self, moved: Optional[int]) -> None:
        """Count one file: its bytes moved, or None when it was already in place."""
        if moved is None:
            self.kept += 1
        else:
            self.moved += 1
            self.bytes += moved

    def _amount(self) -> str:
        rate = self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0
        return f"{self.bytes / 1e6:.1f} MB, {rate:.0f} MB/s"


class PushReport(Tally):
    def summary(self) -> str:
        return f"{self.moved} files sent ({self._amount()}), {self.kept} already there; {self.manifest}"


def shard_files(
    manifest: shards.Manifest, exists: Callable[[str], bool]
) -> Iterator[tuple[str, Optional[int], Optional[str]]]:
    """``(name, size, sha256)`` of each file a folder holds beside its manifest, in manifest
    order (None: not recorded there): every shard's tar and index, then the rejected log
    where ``exists`` finds it."""
    for entry in manifest.shards:
        yield entry.tar, entry.bytes, entry.sha256
        yield entry.index, None, entry.index_sha256
    rejected = manifest.data.get("rejected_file")
    if rejected and exists(rejected):
        yield rejected, None, None


def _send(store: Store, folder: Path, name: str, size, sha256, url: ObjectURL) -> Optional[int]:
    """Bytes sent; None when the object is already there as wanted."""
    path = folder / name
    if not path.is_file():
        raise BuildError(f"{path}: listed in the manifest, missing")
    held = path.stat().st_size
    if size is not None and held != size:
        raise BuildError(f"{path}: {held} bytes, the manifest says {size}; changed after the build")
    found = sha256_of(path)
    if sha256 is not None and found != sha256:
        raise BuildError(f"{path}: its sha256 is not the manifest's; changed after the build")
    there = store.head(url)
    if there is not None and there["size"] == held and there["sha256"] == found:
        return None
    store.upload(path, url, found)
    return held


def push(cmd: PushCommand, store: Optional[Store] = None) -> PushReport:
    """Send ``cmd.folder`` to ``cmd.to``.

    Raises:
        ShardError: the folder is not a shard folder.
        BuildError: a file missing or changed since the build; an indexed folder.
        StoreError: an object that cannot be written (retries spent, access denied ...).
    """
    return publish(Path(cmd.folder), ObjectURL.parse(cmd.to), cmd.jobs, store=store)


def publish(
    folder: Path,
    base: ObjectURL,
    jobs: int,
    manifest_name: str = shards.MANIFEST_NAME,
    store: Optional[Store] = None,
) -> PushReport:
    """The files ``folder/manifest_name`` names, then that manifest (a build's part manifest
    for one part of a build into the store), under ``base``."""
    started = time.monotonic()
    manifest = shards.load_manifest(folder, manifest_name)
    if manifest.indexed:
        raise BuildError(
            f"{folder}: an index of tars that lie elsewhere; push the tars' folder and index it "
            "there, or build shards from them"
        )
    store = store or Store()
    report = PushReport()
    files = shard_files(manifest, lambda name: manifest.path(name).is_file())
    calls = ((_send, (store, folder, n, size, sha, base.child(n))) for n, size, sha in files)
    for sent in in_parallel(jobs, calls):  # the first failure ends it, the manifest unsent
        report.add(sent)
    # Last: a reader that finds the manifest finds every object it names, complete.
    url = base.child(manifest_name)
    report.add(_send(store, folder, manifest_name, None, None, url))
    report.manifest = str(url)
    report.seconds = time.monotonic() - started
    return report


def merge_in_store(prefix: str, store: Optional[Store] = None) -> str:
    """``moco-shards merge`` of the part manifests under ``prefix``, in the store: the parts'
    manifests and rejected logs are fetched (verified by the sha256 each was sent with), merged
    here, and the merged rejected log and manifest sent, the manifest last."""
    base = ObjectURL.parse(prefix)
    store = store or Store()
    with tempfile.TemporaryDirectory(prefix="moco-merge-") as scratch:
        folder = Path(scratch)
        for key, _ in store.list(base):
            name = key[len(base.key) :].lstrip("/")
            if not shards.PART_MANIFEST_RE.match(name):
                continue
            (folder / name).write_bytes(store.read(base.child(name), MAX_MANIFEST_BYTES))
            log = read_json(folder / name, "part manifest", max_bytes=MAX_MANIFEST_BYTES)
            rejected = log.get("rejected_file") if isinstance(log, dict) else None
            if isinstance(rejected, str) and rejected and "/" not in rejected:
                _fetch(store, base.child(rejected), folder / rejected)
        merged = merge([scratch])  # a part missing or damaged ends here, nothing sent
        store.upload(folder / shards.REJECTED_NAME, base.child(shards.REJECTED_NAME))
        store.upload(merged, base.child(shards.MANIFEST_NAME))
    return str(base.child(shards.MANIFEST_NAME))


def _fetch(store: Store, url: ObjectURL, dest: Path) -> None:
    """An object ``publish`` sent, checked against the sha256 it was sent with."""
    found = store.head(url)
    if found is None or found["sha256"] is None:
        raise BuildError(f"{url}: missing, or not sent by moco-shards; build that part again")
    store.download(url, dest, found["size"], found["sha256"])
