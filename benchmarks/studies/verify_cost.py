"""What running DALI in a child process costs ``moco-shards verify``.

``verify`` walks the shards through DALI in a child process, so that a decoder crash
costs the child and the sample can still be named. Against it, alternating, the same
walk in this process (what verify did before), each with the per-sample size check.
Median of ``--reps`` after a warm-up.

    python -m benchmarks.studies.verify_cost --shards DIR --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from moco_dali.pipeline import shards
from moco_dali.tools.bench.machine import describe
from moco_dali.tools.shards.verify import _decoded


def in_process(folder: Path, batch_size: int) -> int:
    """The DALI walk and the per-sample checks in this process, as verify did before."""
    from moco_dali.pipeline.scan import scan_shards

    manifest, pairs = shards.discover(folder)
    seen = 0
    for sample in scan_shards([p[0] for p in pairs], [p[1] for p in pairs], batch_size=batch_size):
        size = json.loads(sample.metadata)["size"]
        assert [sample.width, sample.height] == size and sample.channels == 3
        seen += 1
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    samples = shards.load_manifest(args.shards).samples

    _, pairs = shards.discover(args.shards)

    def child_walk() -> None:
        walk, seen = _decoded(pairs, args.batch_size, None, None), 0
        for height, width, channels, metadata, _ in walk:
            assert [width, height] == json.loads(metadata)["size"] and channels == 3
            seen += 1
        assert seen == samples

    def own_walk() -> None:
        assert in_process(args.shards, args.batch_size) == samples

    contenders = {
        "DALI walk in a child process (verify now)": child_walk,
        "DALI walk in this process (verify before)": own_walk,
    }
    for fn in contenders.values():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.reps):
        for name, fn in contenders.items():
            started = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - started)
    results = {
        name: {
            "seconds": statistics.median(s),
            "samples_per_s": samples / statistics.median(s),
            "runs": s,
        }
        for name, s in seconds.items()
    }
    record = {
        "benchmark": "verify_cost",
        "date": time.strftime("%Y-%m-%d"),
        "machine": describe(),
        "samples": samples,
        "reps": args.reps,
        "results": results,
        "note": "only the DALI walk and the per-sample size check; verify's hashing and index checks "
        "are the same either way",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    for name, r in results.items():
        print(f"{name:36s} {r['seconds']:6.2f} s  {r['samples_per_s']:7.0f} samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
