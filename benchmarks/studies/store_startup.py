"""A rank's start-up with the manifest in the store, as the data set grows to 1e9 samples.

What grows with the data set at a rank's start is the manifest: read from the store, checked,
and dealt (the rank's shards of the epoch, its windows, the steps). The first window's fetch
that follows is bounded by ``data.cache_limit`` (half of it at the link's bandwidth), whatever
the data set. For 1e3, 1e4 and 1e5 shards of 10,000 samples (1e9 samples at 1e5 shards, the
scale goal's target), a manifest is sent to a local S3 endpoint (moto in a process of its own,
``tools.bench.endpoint``) and a fresh process per measurement times the last rank of 64 from
``ViewLoader``'s first step (the manifest's read) to the deal, with its peak memory; the same
from the manifest on local disk beside it. Goal (``moco-bench scale``): <= 60 s and <= 2 GB.

    python benchmarks/studies/store_startup.py --out benchmarks/results/DATE-MACHINE-store_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARDS = (1_000, 10_000, 100_000)
PER_SHARD = 10_000
WORLD, RANK = 64, 63


def _manifest(folder: Path, shards: int) -> None:
    """A manifest of ``shards`` entries of PER_SHARD samples, cloned from a real small folder's."""
    from moco_dali.common.files import write_json_atomic
    from moco_dali.pipeline import shards as fmt
    from moco_dali.tools.bench.scale import write_folder

    template = folder / f"template-{shards}"
    write_folder(template, 20, 2)
    data = json.loads((template / fmt.MANIFEST_NAME).read_text())
    entry = data["shards"][0]
    data["shards"] = [
        dict(entry, tar=f"s-{i:07d}.tar", index=f"s-{i:07d}.idx", samples=PER_SHARD)
        for i in range(shards)
    ]
    data["samples"] = data["inputs"] = shards * PER_SHARD
    classes = len(data["classes"])
    data["class_counts"] = {str(c): shards * PER_SHARD // classes for c in range(classes)}
    out = folder / f"m{shards}"
    out.mkdir()
    write_json_atomic(out / fmt.MANIFEST_NAME, data)


def _status_MB(field: str) -> float:
    """A /proc/self/status figure in MB: VmHWM is this program's peak since its exec (getrusage's
    maxrss keeps the forking parent's, which here holds a whole manifest)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(where: str) -> dict:
    """One rank's start: the manifest read and checked, its windows and the epoch's deal."""
    import numpy as np  # noqa: F401  (imports are not the start-up being measured)

    from moco_dali.pipeline import cache, partition
    from moco_dali.pipeline.config import ReadConfig

    read = ReadConfig()
    baseline = _status_MB("VmRSS")
    started = time.perf_counter()
    manifest = cache.load_manifest(where)
    loaded = time.perf_counter()
    counts = manifest.counts
    per_window = cache.shards_per_window(manifest, read)
    order = partition.epoch_order(counts, 0, 0, True)
    mine = partition.rank_shards(order, WORLD, RANK)
    steps = partition.steps_per_epoch(counts, WORLD, 256 // WORLD, per_window)
    first_window = [manifest.entry(int(i)) for i in mine[:per_window]]
    dealt = time.perf_counter()
    return {
        "manifest_s": loaded - started,
        "startup_s": dealt - started,
        "peak_rss_MB": _status_MB("VmHWM"),
        "baseline_rss_MB": baseline,
        "shards_per_window": per_window,
        "first_window_bytes": sum(e.bytes for e in first_window),
        "steps_per_epoch": steps,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child)))
        return 0
    from moco_dali.common.store import ObjectURL, Store
    from moco_dali.pipeline import shards as fmt
    from moco_dali.tools.bench.store import _local_endpoint

    rows = []
    with tempfile.TemporaryDirectory(prefix="moco-store-startup-") as tmp:
        with _local_endpoint(1000.0, 50.0):  # 1 GB/s, 50 ms to first byte
            store = Store()
            for shards in SHARDS:
                _manifest(Path(tmp), shards)
                local = Path(tmp) / f"m{shards}"
                url = f"s3://moco-bench/m{shards}"
                store.upload(
                    local / fmt.MANIFEST_NAME, ObjectURL.parse(url).child(fmt.MANIFEST_NAME)
                )
                for where, name in ((url, "store"), (str(local), "local")):
                    runs = []
                    for _ in range(args.reps):
                        child = subprocess.run(
                            [sys.executable, __file__, "--out", "-", "--child", where],
                            capture_output=True,
                            text=True,
                            check=True,
                            env=os.environ,
                        )
                        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
                    rows.append(
                        {
                            "shards": shards,
                            "samples": shards * PER_SHARD,
                            "manifest_bytes": (local / fmt.MANIFEST_NAME).stat().st_size,
                            "from": name,
                            "startup_s": statistics.median(r["startup_s"] for r in runs),
                            "manifest_s": statistics.median(r["manifest_s"] for r in runs),
                            "peak_rss_MB": max(r["peak_rss_MB"] for r in runs),
                            "baseline_rss_MB": runs[0]["baseline_rss_MB"],
                            "shards_per_window": runs[0]["shards_per_window"],
                            "first_window_bytes": runs[0]["first_window_bytes"],
                            "runs": runs,
                        }
                    )
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "runs"}))
    from moco_dali.tools.bench.machine import describe

    record = {
        "study": "store_startup",
        "date": time.strftime("%Y-%m-%d"),
        "machine": describe(),
        "what": (
            f"rank {RANK} of {WORLD}: the manifest read (from a local S3 endpoint, moto behind "
            "a 1 GB/s link with 50 ms to first byte, or from local disk) and checked, the "
            "epoch's deal and the first window's entries; a fresh process per run, median of "
            f"{args.reps}; {PER_SHARD} samples per shard"
        ),
        "goal": {"startup_s": 60.0, "peak_rss_GB": 2.0, "at": "1e9 samples, 1e5 shards"},
        "rows": rows,
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
