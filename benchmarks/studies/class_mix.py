"""How evenly a build mixes classes: per-shard class counts of Fashion-MNIST built from its class folders.

Writes Fashion-MNIST's training set as a folder-per-class dump (``DUMP/CLASS/N.png``,
as ``moco-demo`` does), builds it with ``--labels folder`` shuffled (the default)
and with ``--no-shuffle``, in one part and in ``--parts`` parts, and records each
shard's count of every class against its share (samples / classes).

    python -m benchmarks.studies.class_mix --out RESULT.json [--max-count 2500] [--parts 4]
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from moco_dali.pipeline import shards
from moco_dali.tools.bench.machine import describe
from moco_dali.tools.demo.data import FASHION_MNIST_CLASSES, load_fashion_mnist, write_dump
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.merge import merge
from moco_dali.tools.shards.settings import BuildSettings


def per_shard(folder: Path) -> list[dict]:
    manifest = shards.load_manifest(folder)
    rows = []
    for entry in manifest.shards:
        with tarfile.open(manifest.path(entry.tar)) as tar:
            counts = collections.Counter(
                int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")
            )
        share = entry.samples / len(FASHION_MNIST_CLASSES)
        ratios = [counts[c] / share for c in range(len(FASHION_MNIST_CLASSES))]
        rows.append(
            {
                "shard": entry.tar,
                "samples": entry.samples,
                "counts": [counts[c] for c in range(10)],
                "min_over_share": min(ratios),
                "max_over_share": max(ratios),
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-count", type=int, default=2500)
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="class-mix-"))
    try:
        images, labels = load_fashion_mnist()
        write_dump(images, labels, FASHION_MNIST_CLASSES, work / "dump")
        base = BuildSettings(labels="folder", max_count=args.max_count)
        runs = {}
        for name, settings, parts in (
            ("shuffled, 1 part", base, 1),
            (f"shuffled, {args.parts} parts", replace(base, num_parts=args.parts), args.parts),
            ("--no-shuffle, 1 part", replace(base, shuffle_seed=None), 1),
        ):
            out = work / name.replace(" ", "").replace(",", "-")
            started = time.perf_counter()
            for part in range(parts):
                build(
                    [str(work / "dump")],
                    out,
                    replace(settings, part=part),
                    workers=args.workers,
                    progress=False,
                )
            if parts > 1:
                merge([str(out)])
            rows = per_shard(out)
            runs[name] = {
                "seconds": time.perf_counter() - started,
                "shards": rows,
                "worst_min_over_share": min(r["min_over_share"] for r in rows),
                "worst_max_over_share": max(r["max_over_share"] for r in rows),
            }
            print(
                f"{name:24s} {len(rows):3d} shards, each class in every shard between "
                f"{runs[name]['worst_min_over_share']:.2f} and {runs[name]['worst_max_over_share']:.2f} of its share",
                file=sys.stderr,
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {
        "benchmark": "class_mix",
        "date": time.strftime("%Y-%m-%d"),
        "machine": describe(),
        "data": "Fashion-MNIST train (60,000 images, 10 class folders of 6,000)",
        "max_count": args.max_count,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
