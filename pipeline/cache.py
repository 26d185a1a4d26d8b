"""Shard folders in object storage (``s3://bucket/prefix``) read through a rank's bounded local
cache: the manifest read from the store, the windows sized so that two fit the cache, and the
shards of the next window fetched in the background while the current one trains.

A rank holds at most two windows: the one DALI reads and the next, fetched by a pool of threads
while the first trains. Each file is checked against the manifest (the tar's size and sha256,
the index's sha256) before it gets its name, so DALI never opens a partial or wrong file; a
window's files are deleted once its reader is closed. The cache's bytes are reserved before a
fetch starts, so they never exceed ``cache_limit``: windows hold at most half of it (an index
counts at its bound, ``index_bound``). Local folders pass through ``load_manifest`` unchanged.
"""

from __future__ import annotations

import concurrent.futures
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from ..common.store import ObjectURL, Store, StoreError, is_url
from . import partition, shards
from .config import ReadConfig
from .schema import MAX_MANIFEST_BYTES
from .shards import Manifest, ShardEntry, ShardError

__all__ = [
    "load_manifest",
    "shards_per_window",
    "shard_groups",
    "index_bound",
    "ShardCache",
    "is_url",
]


def index_bound(samples):
    """The most bytes a shard's index may have in the cache (of a count, or of an array of
    them): a line is some 40 bytes per member, so 2 KiB per sample leaves room for long names
    and many members."""
    return 65536 + 2048 * samples


def load_manifest(folder: str, workdir: Optional[str] = None) -> Manifest:
    """The manifest of a local folder, or of ``s3://bucket/prefix`` (read from the store into
    ``workdir``, a scratch folder if None), checked as ``shards.load_manifest`` checks it.

    Raises:
        ShardError: the manifest is missing, unreadable or not ours, or the store refuses it.
    """
    if not is_url(folder):
        return shards.load_manifest(folder)
    try:
        base = ObjectURL.parse(str(folder))
        data = Store().read(base.child(shards.MANIFEST_NAME), MAX_MANIFEST_BYTES)
    except StoreError as error:
        raise ShardError(str(error)) from None
    with tempfile.TemporaryDirectory(prefix="moco-manifest-", dir=workdir) as scratch:
        (Path(scratch) / shards.MANIFEST_NAME).write_bytes(data)
        try:
            manifest = shards.load_manifest(scratch)
        except ShardError as error:
            raise ShardError(str(error).replace(scratch, str(base), 1)) from None
    if manifest.indexed:
        raise ShardError(
            f"{base}: an index of tars that lie elsewhere; read it from a local folder, or push "
            "the tars with moco-shards build"
        )
    manifest.url = str(base)
    return manifest


def shards_per_window(manifest: Manifest, read: ReadConfig) -> int:
    """Shards per DALI reader: ``partition.shards_per_window``'s, and for a folder in the store,
    as many of its largest shards (with their index bounds) as fit half of ``read.cache_limit``.

    Raises:
        ShardError: the cache cannot hold two of the largest shards.
    """
    counts = manifest.counts
    per = partition.shards_per_window(counts, read.max_window_samples, read.max_window_shards)
    if manifest.url is None or not len(counts):
        return per
    sizes = np.array([s["bytes"] for s in manifest.data["shards"]], dtype=np.int64)
    largest = int((sizes + index_bound(counts)).max())
    if 2 * largest > read.cache_limit:
        raise ShardError(
            f"{manifest.name}: data.cache_limit {read.cache_limit} bytes cannot hold two of its "
            f"largest shards ({largest} bytes each with its index); give it at least "
            f"{2 * largest}"
        )
    return min(per, read.cache_limit // 2 // largest)


def _background() -> None:
    """A fetching thread yields the CPU to the pipeline's (Linux schedules threads by their own
    niceness): fetches run one window ahead, so they have the time; decoding has none to spare."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: the default priority
        pass


def shard_groups(
    folder: str, read: Optional[ReadConfig] = None
) -> Iterator[tuple[Manifest, list[ShardEntry], list[tuple[Path, Path]]]]:
    """Every shard of a folder with its files, each checked as ``shards.discover`` checks it
    (every index line parsed): all at once from a local folder, a window at a time from one in
    the store, through a cache that holds one window (nothing is fetched while a group is in
    use, so a caller may fork)."""
    if not is_url(folder):
        manifest, pairs = shards.discover(folder)
        yield manifest, manifest.shards, pairs
        return
    read = read or ReadConfig()
    manifest = load_manifest(folder)
    per = max(1, shards_per_window(manifest, read) * 2)  # one window in use, none fetched
    fetched = ShardCache(manifest, read)
    try:
        for start in range(0, len(manifest.counts), per):
            window = list(range(start, min(start + per, len(manifest.counts))))
            entries = [manifest.entry(i) for i in window]
            pairs = fetched.pairs(window)
            yield (
                manifest,
                entries,
                [shards.check_whole(manifest, e, p) for e, p in zip(entries, pairs)],
            )
    finally:
        fetched.close()


@dataclass
class _Held:
    """A shard in the cache, or on its way: its files, reserved bytes and fetch."""

    files: tuple[Path, Path]
    reserved: int
    fetch: concurrent.futures.Future


@dataclass
class CacheStats:
    """What a rank's cache did: for ``moco-bench store`` and the run's log."""

    fetched_bytes: int = 0
    peak_bytes: int = 0
    window_stalls: list[float] = field(default_factory=list)
    """Seconds each window waited for its files."""


class ShardCache:
    """A rank's local copies of the shards of its current and next windows.

    ``pairs(window)`` returns the window's ``(tar, index)`` once both are in and checked (the
    wait is counted as a stall), having evicted every other shard; ``prefetch(window)`` starts
    fetching the next window when the cache has room for it. The files live in a private
    folder under ``cache_dir`` (the system's temporary folder if empty), removed with the cache.
    """

    def __init__(self, manifest: Manifest, read: ReadConfig, store: Optional[Store] = None):
        self.manifest, self.limit = manifest, read.cache_limit
        self._base = ObjectURL.parse(manifest.url)
        self._store = store or Store()
        self._dir = tempfile.TemporaryDirectory(prefix="moco-cache-", dir=read.cache_dir or None)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            read.cache_jobs, thread_name_prefix="moco-cache", initializer=_background
        )
        self._held: dict[int, _Held] = {}
        self._evicting: list[_Held] = []  # evicted while their fetch ran: their bytes come back
        self._fetches = 0  # numbers each fetch's files: a shard evicted and wanted again
        self._lock = threading.Lock()
        self.bytes = 0
        self.stats = CacheStats()

    # ------------------------------------------------------------------ the window's files

    def pairs(self, window: Iterable[int]) -> list[tuple[Path, Path]]:
        """The checked ``(tar, index)`` of each shard of ``window``, in its order."""
        window = [int(s) for s in window]
        self._evict(set(window))
        need = sum(self._cost(s) for s in window if s not in self._held)
        started = time.monotonic()
        while self.bytes + need > self.limit and self._wait_for_evicted():
            pass
        if not self._reserve(window):
            raise ShardError(
                f"{self.manifest.name}: a window of {len(window)} shards needs {need} bytes more "
                f"than the cache holds ({self.bytes} of data.cache_limit {self.limit})"
            )
        try:
            for shard in window:
                self._held[shard].fetch.result()
        except StoreError as error:
            raise ShardError(str(error)) from None
        except OSError as error:
            raise ShardError(
                f"{self._dir.name}: the cache (data.cache_dir) cannot hold a shard: "
                f"{error.strerror or error}"
            ) from None
        self.stats.window_stalls.append(time.monotonic() - started)
        return [
            shards.open_shard(self.manifest, self.manifest.entry(s), self._held[s].files)
            for s in window
        ]

    def prefetch(self, window: Iterable[int]) -> bool:
        """Start fetching ``window`` beside what is held, if it fits; whether it was started."""
        return self._reserve([int(s) for s in window])

    def close(self) -> None:
        """Stop fetching and delete the cache's folder."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._held.clear()
        self._dir.cleanup()

    # ------------------------------------------------------------------ bytes

    def _cost(self, shard: int) -> int:
        entry = self.manifest.data["shards"][shard]
        return int(entry["bytes"]) + index_bound(int(entry["samples"]))

    def _reserve(self, window: list[int]) -> bool:
        missing = [s for s in dict.fromkeys(window) if s not in self._held]
        with self._lock:
            need = sum(self._cost(s) for s in missing)
            if self.bytes + need > self.limit:
                return False
            self.bytes += need
            self.stats.peak_bytes = max(self.stats.peak_bytes, self.bytes)
        for shard in missing:
            entry = self.manifest.entry(shard)
            self._fetches += 1
            files = (self._local(entry.tar), self._local(entry.index))
            self._held[shard] = _Held(
                files, self._cost(shard), self._pool.submit(self._fetch, shard, files)
            )
        return True

    def _evict(self, keep: set[int]) -> None:
        for shard in [s for s in self._held if s not in keep]:
            held = self._held.pop(shard)
            if held.fetch.cancel():
                self._release(held)
            else:  # under way or done: its files go when it ends
                held.fetch.add_done_callback(lambda _, h=held: self._release(h))
                self._evicting.append(held)

    def _wait_for_evicted(self) -> bool:
        """Wait for a fetch of an evicted shard to end (its bytes come back); False when none runs."""
        self._evicting = [h for h in self._evicting if not h.fetch.done()]
        running = [h.fetch for h in self._evicting]
        if not running:
            return False
        concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
        return True

    def _release(self, held: _Held) -> None:
        for path in held.files:
            path.unlink(missing_ok=True)
        with self._lock:
            self.bytes -= held.reserved
            held.reserved = 0

    # ------------------------------------------------------------------ fetching

    def _local(self, name: Path) -> Path:
        return Path(self._dir.name) / f"{self._fetches:08d}-{Path(name).name}"

    def _fetch(self, shard: int, files: tuple[Path, Path]) -> None:
        entry = self.manifest.entry(shard)
        tar, index = files
        self._store.download(self._base.file(str(entry.tar)), tar, entry.bytes, entry.sha256)
        self._store.download(
            self._base.file(str(entry.index)),
            index,
            None,
            entry.index_sha256,
            limit=index_bound(entry.samples),
        )
        with self._lock:
            self.stats.fetched_bytes += entry.bytes + index.stat().st_size
