"""``moco-shards pull s3://bucket/prefix DIR``: a shard folder from object storage onto local disk.

Owns fetching a pushed folder for nodes that train from a local copy (an NVMe per node): every
shard's tar and index fetched in parallel and checked against the store's manifest (size and
sha256) before it is named, the manifest written last, so a local folder with a manifest is a
complete one. A rerun re-checks what is there (reading local disk is cheaper than the network;
a resume never trusts an unverified file) and fetches the rest.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ...common.files import sha256_of
from ...common.lock import FolderInUse, FolderLock
from ...common.options import option
from ...common.store import ObjectURL, Store, in_parallel
from ...pipeline import shards
from ...pipeline.schema import MAX_MANIFEST_BYTES
from . import BuildError
from .folder import prepare_folder
from .push import Tally, shard_files

__all__ = ["PullCommand", "PullReport", "pull"]

STATE = ".moco-build-pull"


@dataclass
class PullCommand:
    """Fetch a shard folder from s3://bucket/prefix, every file checked, the manifest last."""

    source: str = option(positional=None, metavar="URL")
    """s3://bucket/prefix holding a manifest.json (sent by moco-shards push or build)."""
    out: str = option(positional=None, metavar="DIR")
    """Local folder to write (new, or a pull of the same prefix to finish)."""
    jobs: int = option(8, metavar="J")
    """Files fetched at once."""

    def __post_init__(self) -> None:
        if not 1 <= self.jobs <= 256:
            raise BuildError(f"--jobs must be in 1..256, got {self.jobs}")
        ObjectURL.parse(self.source)


class PullReport(Tally):
    def summary(self) -> str:
        return (
            f"{self.moved} files fetched ({self._amount()}), {self.kept} already here and "
            f"checked; {self.manifest}"
        )


def _get(store: Store, url: ObjectURL, dest: Path, size: Optional[int], sha256: Optional[str]):
    """Bytes fetched; None when ``dest`` already holds the wanted bytes."""
    if size is None or sha256 is None:  # an index: the manifest has its sha256, not its size
        there = store.head(url)
        if there is None:
            raise BuildError(f"{url}: listed in the manifest, missing from the store")
        size = there["size"] if size is None else size
        sha256 = sha256 or there["sha256"]
        if sha256 is None:
            raise BuildError(f"{url}: no sha256 recorded; send the folder with moco-shards push")
    if dest.is_file() and dest.stat().st_size == size and sha256_of(dest) == sha256:
        return None
    store.download(url, dest, size, sha256)
    return size


def pull(cmd: PullCommand, store: Optional[Store] = None) -> PullReport:
    """Fetch ``cmd.source`` into ``cmd.out``.

    Raises:
        ShardError: the store's manifest is not a shard manifest.
        BuildError: ``--out`` in use or not a shard folder; a file the manifest lists missing.
        StoreError: an object that cannot be read, or whose bytes are not the manifest's.
    """
    started = time.monotonic()
    base, out = ObjectURL.parse(cmd.source), Path(cmd.out)
    store = store or Store()
    prepare_folder(out)
    try:
        with FolderLock(out / f"{STATE}.lock", "moco-shards pull", "--out"):
            return _pull(store, base, out, cmd.jobs, started)
    except FolderInUse as exc:
        raise BuildError(str(exc)) from None


def _pull(store: Store, base: ObjectURL, out: Path, jobs: int, started: float) -> PullReport:
    state = out / STATE
    state.mkdir(exist_ok=True)  # marks the folder as a pull under way (prepare_folder)
    staged = state / shards.MANIFEST_NAME
    staged.write_bytes(store.read(base.child(shards.MANIFEST_NAME), MAX_MANIFEST_BYTES))
    manifest = shards.load_manifest(state)
    if manifest.indexed:
        raise BuildError(f"{base}: an index of tars that lie elsewhere; pull those tars instead")
    # base.file: a name from the store's manifest is a plain file of the folder, here and there
    files = shard_files(manifest, lambda name: store.head(base.file(name)) is not None)
    calls = ((_get, (store, base.file(n), out / n, size, sha)) for n, size, sha in files)
    report = PullReport()
    for got in in_parallel(jobs, calls):  # the first failure ends the pull, no manifest written
        report.add(got)
    os.replace(staged, out / shards.MANIFEST_NAME)  # last: the folder is complete
    shutil.rmtree(state, ignore_errors=True)
    report.manifest = str(out / shards.MANIFEST_NAME)
    report.seconds = time.monotonic() - started
    return report
