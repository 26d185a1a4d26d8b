"""``moco-bench scale-build``: a shard builder's memory and time per part as the source grows.

For sources of N inputs (a list file of N paths, or a folder of N empty files) it measures, in
a fresh process per run, what one part of a P-part build costs before it opens any image:
enumerating its share and putting it in packing order. Beside it, the design it replaced
(every part holding the whole listing). The growth fitted over N is extrapolated to 1e9 inputs,
with its assumptions in the record.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["bench_scale_build", "print_scale_build"]

_CLASS_SIZE = 1000


def _make_list(path: Path, count: int) -> None:
    with open(path, "w") as f:
        for start in range(0, count, 100_000):
            f.write(
                "".join(
                    f"images/c{i // _CLASS_SIZE:06d}/{i:010d}.jpg\n"
                    for i in range(start, min(count, start + 100_000))
                )
            )


def _make_folder(root: Path, count: int) -> None:
    for start in range(0, count, _CLASS_SIZE):
        folder = root / f"c{start // _CLASS_SIZE:06d}"
        folder.mkdir(parents=True)
        for i in range(start, min(count, start + _CLASS_SIZE)):
            os.close(os.open(folder / f"{i:010d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))


def _child(source: str, part: int, num_parts: int, scratch: str, design: str) -> dict:
    """One measurement, in a fresh process: enumerate and order one part, nothing else."""
    # Imported lazily, in the measured child: the builder's imports, as a real build has them.
    from ..shards import build  # noqa: F401
    from ..shards.inputs import iter_part
    from ..shards.order import PackingOrder

    # ru_maxrss keeps the peak of the process this one was forked from (exec does not
    # reset it), so the peak is read from /proc after resetting it (clear_refs 5).
    base_mb = _rss_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    started = time.perf_counter()
    if design == "streaming":
        order = PackingOrder(iter_part([source], "folder", part, num_parts), Path(scratch), seed=0)
        enumerated = time.perf_counter()
        count = sum(1 for _ in order)
        spilled = sum(p.stat().st_size for p in Path(scratch).rglob("*") if p.is_file())
        order.close()
        inputs = order.count
    else:  # the replaced design: the whole listing, a shuffled list of positions, then this part's slice
        refs = list(iter_part([source], "folder"))
        positions = list(range(len(refs)))
        random.Random(0).shuffle(positions)
        enumerated = time.perf_counter()
        first, end = len(refs) * part // num_parts, len(refs) * (part + 1) // num_parts
        count = sum(1 for p in positions[first:end] if refs[p] is not None)
        spilled, inputs = 0, len(refs)
    done = time.perf_counter()
    return {
        "enumerate_s": enumerated - started,
        "order_s": done - enumerated,
        "total_s": done - started,
        "part_inputs": count,
        "inputs_seen": inputs,
        "spill_bytes": spilled,
        "rss_after_imports_mb": base_mb,
        "peak_rss_mb": _rss_mb("VmHWM"),
    }


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure(source: Path, part: int, num_parts: int, design: str, scratch: Path) -> dict:
    code = (
        "import json, sys; from moco_dali.tools.bench.scale_build import _child; a = sys.argv; "
        "print(json.dumps(_child(a[1], int(a[2]), int(a[3]), a[4], a[5])))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(source), str(part), str(num_parts), str(scratch), design],
        capture_output=True,
        text=True,
    )
    if result.returncode:
        raise RuntimeError(
            f"scale-build: the measuring process failed: {result.stderr.strip()[-2000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _fit(sizes: list[int], values: list[float]) -> dict:
    """Least-squares line value = a + b N, the exponent between the two ends, and the value at 1e9."""
    n = len(sizes)
    mean_x, mean_y = sum(sizes) / n, sum(values) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes, values)) / sum(
        (x - mean_x) ** 2 for x in sizes
    )
    intercept = mean_y - slope * mean_x
    exponent = (
        math.log(values[-1] / values[0]) / math.log(sizes[-1] / sizes[0]) if values[0] > 0 else None
    )
    return {
        "intercept": intercept,
        "per_input": slope,
        "exponent": exponent,
        "at_1e9": intercept + slope * 1e9,
    }


def bench_scale_build(args) -> dict:
    sizes = [int(float(s)) for s in args.options.sizes.split(",")]
    parts = [int(p) for p in args.options.parts.split(",")]
    kinds = args.options.kinds.split(",")
    reps = args.options.reps
    designs = ["streaming", "whole-listing"]
    runs: dict[str, list] = {}
    work = Path(tempfile.mkdtemp(prefix="scale-build-"))
    try:
        for kind in kinds:
            for size in sizes:
                source = work / f"{kind}-{size}"
                made = time.perf_counter()
                if kind == "list":
                    source = source.with_suffix(".txt")
                    _make_list(source, size)
                else:
                    _make_folder(source, size)
                print(
                    f"scale-build: {kind} of {size} inputs made in {time.perf_counter() - made:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
                for rep in range(reps + 1):  # the first pass warms the page cache and is not kept
                    for num_parts in parts:
                        for design in designs:
                            scratch = work / "scratch"
                            record = _measure(source, 0, num_parts, design, scratch)
                            shutil.rmtree(scratch, ignore_errors=True)
                            if rep:
                                runs.setdefault(
                                    f"{kind}/{design}/parts{num_parts}/n{size}", []
                                ).append(record)
                shutil.rmtree(source) if source.is_dir() else source.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = {
        name: {k: statistics.median(r[k] for r in recs) for k in recs[0]} | {"reps": len(recs)}
        for name, recs in runs.items()
    }
    fits = {}
    for kind in kinds:
        for design in designs:
            for num_parts in parts:
                rows = [results[f"{kind}/{design}/parts{num_parts}/n{n}"] for n in sizes]
                fits[f"{kind}/{design}/parts{num_parts}"] = {
                    "time_s": _fit(sizes, [r["total_s"] for r in rows]),
                    "peak_rss_mb": _fit(sizes, [r["peak_rss_mb"] for r in rows]),
                    "memory_growth": rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"],
                    "time_growth": rows[-1]["total_s"] / rows[0]["total_s"],
                }
    return {
        "mode": "scale-build",
        "sizes": sizes,
        "parts": parts,
        "kinds": kinds,
        "reps": reps,
        "measured": "one part (part 0) of each build: enumerate its share, spill it in hash buckets and read it back "
        "in packing order, in a fresh process; no image is opened",
        "baseline": "whole-listing: every part lists the whole source, shuffles range(N) and takes its slice "
        "(the design before the streaming build)",
        "assumptions": "extrapolation to 1e9 inputs is the least-squares line over the measured sizes; the streaming "
        "design's memory is bounded by construction (65,536 inputs buffered before a spill, at most "
        "262,144 sorted at once), so its line is flat; spill bytes grow with the part's share",
        "results": results,
        "fits": fits,
        "goals": {"memory_growth_at_most": 1.15, "time_proportional_to_share": True},
        # The machine is shared: other work's load over the last 1, 5 and 15 minutes, at the end.
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def print_scale_build(record: dict) -> None:
    print(
        f"shard build at scale: one part of P, N inputs, median of {record['reps']} "
        f"({record.get('machine', {}).get('cpu', 'this machine')})"
    )
    print(
        f"{'source / design / parts':36s} {'N':>9s} {'share':>8s} {'time s':>8s} {'enum s':>7s} "
        f"{'peak MB':>8s} {'imports MB':>10s} {'spill MB':>9s}"
    )
    for name, r in record["results"].items():
        kind, design, parts, n = name.split("/")
        print(
            f"{kind + ' / ' + design + ' / ' + parts:36s} {n[1:]:>9s} {r['part_inputs']:8.0f} {r['total_s']:8.2f} "
            f"{r['enumerate_s']:7.2f} {r['peak_rss_mb']:8.0f} {r['rss_after_imports_mb']:10.0f} "
            f"{r['spill_bytes'] / 1e6:9.1f}"
        )
    print("growth from the smallest to the largest N, and the fitted line at 1e9 inputs:")
    for name, fit in record["fits"].items():
        print(
            f"  {name:34s} memory x{fit['memory_growth']:.2f} (at 1e9: {fit['peak_rss_mb']['at_1e9']:,.0f} MB), "
            f"time x{fit['time_growth']:.2f} (at 1e9: {fit['time_s']['at_1e9']:,.0f} s)"
        )
