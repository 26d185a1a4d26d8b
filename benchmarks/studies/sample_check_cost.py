"""What the loader's per-sample check costs: view pairs/s with it and without it, and its own time per image.

The check (``pipeline/samplecheck.py``) parses every JPEG header and ``.cls`` inside
the DALI pipeline before the decoder sees them, so a header DALI 2.4 cannot parse
ends in a message instead of a segfault. Measured here two ways, on the same shards
of ImageNet-like photographs (``tools/bench/synthetic.py``): the v2 view pipeline's
pairs/s with this checkout's loader beside the loader of ``--before`` (a checkout
without the check, e.g. the commit before it), alternating fresh processes, median
of the repetitions after a warm-up; and ``simplejpeg.decode_jpeg_header`` alone per
image, the check's CPU time per sample whatever the decoder (on a GPU it runs on a
DALI CPU thread, holding the GIL).

    python -m benchmarks.studies.sample_check_cost --before DIR --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
spec = json.loads(sys.argv[1])
if spec["before"]:
    from moco_dali.tools.bench.scale import _use_pipeline_from
    _use_pipeline_from(spec["before"])
import torch
from moco_dali.pipeline.loader import ViewLoader
try:  # this checkout's data path
    from moco_dali.pipeline.config import LoaderConfig, ReadConfig
    from moco_dali.pipeline.recipes import v2
    config = LoaderConfig(batch_size=spec["batch"], dtype="float32",
                          read=ReadConfig(threads=spec["threads"] or 0))
except ImportError:  # a --before checkout older than pipeline/config.py
    from moco_dali.pipeline.augment import v2
    from moco_dali.pipeline.loader import LoaderConfig
    config = LoaderConfig(batch_size=spec["batch"], dtype="float32", threads=spec["threads"])
loader = ViewLoader(spec["shards"], v2(size=spec["size"]), config)
batches = iter(loader)
for _ in range(spec["warmup"]):
    next(batches)
started = time.perf_counter()
for _ in range(spec["batches"]):
    next(batches)
print(json.dumps({"pairs_per_s": spec["batches"] * spec["batch"] / (time.perf_counter() - started)}))
"""


def pairs_per_s(shards: Path, before: str, args) -> float:
    spec = {
        "shards": str(shards),
        "before": before,
        "size": args.size,
        "batch": args.batch,
        "threads": args.threads,
        "warmup": 2,
        "batches": args.batches,
    }
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["pairs_per_s"]


def header_us(jpegs: list[bytes], reps: int) -> float:
    import simplejpeg

    times = []
    for _ in range(reps + 1):
        started = time.perf_counter()
        for jpeg in jpegs:
            simplejpeg.decode_jpeg_header(jpeg)
        times.append((time.perf_counter() - started) / len(jpegs) * 1e6)
    return statistics.median(times[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--before", required=True, help="a checkout whose pipeline/ has no sample check"
    )
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from moco_dali.tools.bench.machine import describe
    from moco_dali.tools.bench.synthetic import generate
    from moco_dali.tools.shards.build import build
    from moco_dali.tools.shards.settings import BuildSettings

    work = Path(tempfile.mkdtemp(prefix="sample-check-"))
    generate(work / "photos", args.photos, seed=0)
    build(
        [str(work / "photos")],
        work / "shards",
        BuildSettings(max_count=50),
        workers=0,
        progress=False,
    )
    jpegs = [p.read_bytes() for p in sorted((work / "photos").rglob("*.jpg"))]
    runs = {"with_check": [], "before": []}
    pairs_per_s(work / "shards", "", args)  # warm-up: page cache, imports
    for _ in range(args.reps):
        runs["with_check"].append(pairs_per_s(work / "shards", "", args))
        runs["before"].append(pairs_per_s(work / "shards", args.before, args))
    medians = {k: statistics.median(v) for k, v in runs.items()}
    record = {
        "what": "v2 view pairs/s on the CPU, this loader (with the sample check) beside --before, alternating "
        "fresh processes; and decode_jpeg_header alone per image",
        "config": {
            k: getattr(args, k) for k in ("photos", "size", "batch", "batches", "threads", "reps")
        },
        "pairs_per_s": runs,
        "median_pairs_per_s": medians,
        "ratio": medians["with_check"] / medians["before"],
        "header_parse_us_per_image": header_us(jpegs, args.reps),
        "mean_jpeg_KB": sum(map(len, jpegs)) / len(jpegs) / 1e3,
        "date": time.strftime("%Y-%m-%d"),
        "machine": describe(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"with the check {medians['with_check']:.1f} pairs/s, before {medians['before']:.1f} "
        f"({record['ratio']:.3f}x); header parse {record['header_parse_us_per_image']:.1f} us per "
        f"{record['mean_jpeg_KB']:.0f} KB image"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
