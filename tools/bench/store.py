"""``moco-bench store``: view pairs per second fed from object storage through a rank's cache,
beside the same shards read from local disk, over whole epochs (window changes, fetch waits and
all), alternating after one warm-up epoch each.

The store is a real one (``--store s3://...`` holding a push of ``--shards``) or, without it, a
local endpoint in a process of its own (``tools.bench.endpoint``: moto behind a link of
``--bandwidth-mb-s`` and ``--latency-ms``). Both loaders read the same windows (the local one
is given the window size the cache limit makes), so the difference is the store's alone. The
record holds the cache's peak bytes against its limit and the wait for each window's files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

from ...common.store import ObjectURL, Store
from ...pipeline import cache
from ...pipeline import shards as shard_format
from ...pipeline.config import LoaderConfig
from ...pipeline.loader import ViewLoader
from ..shards.build import build
from ..shards.push import publish
from ..shards.settings import BuildSettings
from .common import sync, synthetic_photos

__all__ = ["bench_store", "print_store", "GOAL"]

GOAL = 0.95
"""The store's pairs/s over the local disk's, at least."""
_BUCKET = "moco-bench"
_SHARDS_PER_RUN = 16  # generated photos are cut into this many shards: windows to change


def _shards(args) -> tuple[Path, dict | None]:
    if args.options.shards is not None:
        return args.options.shards, None
    photos, info = synthetic_photos(args)
    out = photos.parent / "store-shards"
    if not (out / shard_format.MANIFEST_NAME).is_file():
        per_shard = max(1, args.options.synthetic // _SHARDS_PER_RUN)
        build([str(photos)], out, BuildSettings(max_count=per_shard), progress=False)
    return out, info


def _cpu_s(pid: int) -> float | None:
    """CPU seconds a process has used (Linux's /proc), None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


@contextlib.contextmanager
def _local_endpoint(bandwidth_mb_s: float, latency_ms: float) -> Iterator[int]:
    """A local S3 endpoint in a child process, and this process's AWS settings pointed at it;
    yields the child's pid."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moco_dali.tools.bench.endpoint",
            str(bandwidth_mb_s),
            str(latency_ms),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    saved = dict(os.environ)
    try:
        url = child.stdout.readline().strip()
        if not url.startswith("http://"):
            raise ValueError("the local S3 endpoint did not start (is moto installed?)")
        os.environ.update(
            AWS_ENDPOINT_URL=url,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
        )
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE"):
            os.environ.pop(name, None)
        Store().client.create_bucket(Bucket=_BUCKET)
        yield child.pid
    finally:
        os.environ.clear()
        os.environ.update(saved)
        child.stdin.close()
        child.wait(timeout=30)


def _same_folder(url: str, local: shard_format.Manifest) -> None:
    remote = cache.load_manifest(url)
    digests = [(s["tar"], s["sha256"]) for s in remote.data["shards"]]
    if digests != [(s["tar"], s["sha256"]) for s in local.data["shards"]]:
        raise ValueError(f"--store {url}: not a push of --shards {local.root} (other shards)")


def _epoch(loader: ViewLoader, device: torch.device) -> tuple[float, int]:
    """Seconds and pairs of one whole epoch."""
    start, pairs = time.perf_counter(), 0
    for batch in loader:
        pairs += len(batch)
    sync(device)
    return time.perf_counter() - start, pairs


def bench_store(args) -> dict:
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    o = args.options
    folder, photoset = _shards(args)
    manifest = shard_format.load_manifest(folder)
    data = args.tree.data
    base = LoaderConfig(batch_size=data.batch_size, dtype=args.views_dtype, labels=False)

    def loader(where: str, read) -> ViewLoader:
        config = dataclasses.replace(base, read=read)
        return ViewLoader(where, data.views, config, device_id=device.index or 0 if gpu else None)

    emulated, endpoint = o.store is None, None
    with contextlib.ExitStack() as stack:
        if emulated:
            endpoint = stack.enter_context(_local_endpoint(o.bandwidth_mb_s, o.latency_ms))
            url = f"s3://{_BUCKET}/bench"
            publish(Path(folder), ObjectURL.parse(url), jobs=8)
        else:
            url = o.store
            _same_folder(url, manifest)
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="moco-bench-cache-"))
        read = dataclasses.replace(data.read, cache_dir=data.read.cache_dir or scratch)
        started = time.perf_counter()
        store = loader(url, read)
        first_window_s = time.perf_counter() - started
        per_window = store.per_window
        # The same windows from local disk: the difference is the store's alone.
        largest = int(manifest.counts.max())
        local = loader(
            str(folder), dataclasses.replace(read, max_window_samples=per_window * largest)
        )
        assert local.per_window == per_window, (local.per_window, per_window)
        contenders = {"local": local, "store": store}
        for each in contenders.values():  # warm-up: one epoch each
            _epoch(each, device)
        stalls_before = len(store.cache.stats.window_stalls)
        timed = {name: [] for name in contenders}
        endpoint_cpu = 0.0
        for _ in range(o.reps):
            for name, each in contenders.items():
                before = _cpu_s(endpoint) if endpoint else None
                timed[name].append(_epoch(each, device))
                after = _cpu_s(endpoint) if endpoint else None
                if name == "store" and before is not None and after is not None:
                    endpoint_cpu += after - before
        stalls = store.cache.stats.window_stalls[stalls_before:]
        stats = store.cache.stats
        store.cache.close()
    result = {"mode": "store", "timing": TIMING}
    for name, runs in timed.items():
        rates = [pairs / seconds for seconds, pairs in runs]
        result[name] = {
            "pairs_per_s": statistics.median(rates),
            "pairs_per_s_min": min(rates),
            "pairs_per_s_max": max(rates),
            "epochs": [{"seconds": s, "pairs": p} for s, p in runs],
        }
    ratio = result["store"]["pairs_per_s"] / result["local"]["pairs_per_s"]
    result.update(
        store_vs_local=ratio,
        goal={"store_vs_local_at_least": GOAL, "met": ratio >= GOAL},
        store={
            **result["store"],
            "url": url if not emulated else "local endpoint (moto)",
            "link": (
                {"bandwidth_MB_s": o.bandwidth_mb_s, "first_byte_latency_ms": o.latency_ms}
                if emulated
                else "the real store's"
            ),
            "first_window_s": first_window_s,
            # On one machine the emulated store's own work (moto and the proxy, in Python)
            # takes cores the pipeline would have: CPU seconds per second of its timed epochs.
            "endpoint_cores_busy": (
                endpoint_cpu / sum(s for s, _ in timed["store"]) if emulated else None
            ),
        },
        cache={
            "limit_bytes": read.cache_limit,
            "peak_bytes": stats.peak_bytes,
            "within_limit": stats.peak_bytes <= read.cache_limit,
            "fetched_bytes": stats.fetched_bytes,
            "shards_per_window": per_window,
            "windows_timed": len(stalls),
            "stall_s_per_window_median": statistics.median(stalls) if stalls else 0.0,
            "stall_s_per_window_max": max(stalls, default=0.0),
            "stall_s_total": sum(stalls),
        },
        data={
            "shards": len(manifest.counts),
            "samples": manifest.samples,
            "bytes": int(sum(s["bytes"] for s in manifest.data["shards"])),
            "photoset": photoset,
        },
        config={
            "batch_size": data.batch_size,
            "size": data.views.size,
            "threads": read.threads,
            "device": str(device),
        },
    )
    return result


TIMING = (
    "whole epochs, one untimed each first, then alternating local and store --reps times; the "
    "median epoch's pairs/s; stalls are the waits for a window's files in the timed epochs"
)


def print_store(record: dict) -> None:
    local, store, c = record["local"], record["store"], record["cache"]
    link = store["link"]
    where = (
        f"{link['bandwidth_MB_s']:g} MB/s, {link['first_byte_latency_ms']:g} ms to first byte"
        if isinstance(link, dict)
        else link
    )
    print(f"store ({store['url']}, {where}) vs local disk, the same windows:")
    print(f"  local {local['pairs_per_s']:.1f} pairs/s, store {store['pairs_per_s']:.1f} pairs/s")
    print(
        f"  store/local {record['store_vs_local']:.3f} (goal >= {GOAL}: "
        f"{'met' if record['goal']['met'] else 'missed'})"
    )
    if store.get("endpoint_cores_busy") is not None:
        print(f"  the local endpoint kept {store['endpoint_cores_busy']:.2f} cores busy meanwhile")
    print(
        f"  cache: peak {c['peak_bytes'] / 2**20:.1f} MiB of {c['limit_bytes'] / 2**20:.1f} MiB, "
        f"{c['shards_per_window']} shards a window, wait per window median "
        f"{c['stall_s_per_window_median'] * 1e3:.1f} ms, max {c['stall_s_per_window_max'] * 1e3:.1f} ms"
    )
