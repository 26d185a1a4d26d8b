"""``moco-bench shards``: ``moco-shards build`` against a plain PIL + webdataset.ShardWriter loop.

On a folder of ImageNet-like photographs, alternating after a warm-up: the baseline (PIL open,
convert, save at quality 90, ``ShardWriter``), the builder's re-encode path and its
pass-through path with one worker, then both with 1, 2, 4, ... workers up to the cores; per
core as images/s with one worker and as images per CPU-second over every process.
"""

from __future__ import annotations

import io
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import webdataset
from PIL import Image

from ..shards.build import build
from ..shards.imageprep import PrepSettings
from ..shards.settings import BuildSettings


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# Workers build whole blocks of --max-count inputs, so a build spreads over at most as
# many workers as it has shards: 100 per shard gives a 1,500-photo set 15 of them.
MAX_COUNT = 100


def baseline(files: list[Path], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with webdataset.ShardWriter(str(out / "base-%06d.tar"), maxcount=MAX_COUNT, verbose=0) as sink:
        for i, path in enumerate(files):
            buf = io.BytesIO()
            # JPEG only (the photos are): no Pillow plugin that runs a program is reached.
            Image.open(path, formats=["JPEG"]).convert("RGB").save(buf, "JPEG", quality=90)
            sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue()})


def ours(folder: Path, out: Path, reencode: str, workers: int) -> None:
    settings = BuildSettings(max_count=MAX_COUNT, prep=PrepSettings(quality=90, reencode=reencode))
    report = build([str(folder)], out, settings, workers=workers, progress=False)
    assert report.rejected == 0, report.summary()


def measure(fn, count: int) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="shardbench-"))
    try:
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        fn(scratch / "out")
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    finally:
        shutil.rmtree(scratch)
    return {"wall_s": wall, "cpu_s": cpu, "img_per_s": count / wall, "img_per_cpu_s": count / cpu}


def summarise(runs: list[dict]) -> dict:
    rates = [r["img_per_s"] for r in runs]
    return {
        "img_per_s": statistics.median(rates),
        "img_per_s_min": min(rates),
        "img_per_s_max": max(rates),
        "img_per_cpu_s": statistics.median(r["img_per_cpu_s"] for r in runs),
        "runs": runs,
    }


def bench_shards(
    photos: Path,
    reps: int,
    worker_counts: Optional[list[int]] = None,
    photoset: Optional[dict] = None,
) -> dict:
    """The builder's two paths against the baseline over the JPEGs in ``photos``, alternating."""
    files = sorted(photos.glob("*.jpg"))
    count = len(files)
    if not count:
        raise ValueError(f"{photos}: no *.jpg files to build shards from")
    cores = len(os.sched_getaffinity(0))
    worker_counts = worker_counts or sorted(
        {1, cores} | {w for w in (2, 4, 8, 16, 32, 64) if w < cores}
    )
    for f in files:  # page cache, so every contender reads from memory
        f.read_bytes()
    mean_kb = sum(f.stat().st_size for f in files) / count / 1000

    contenders = {
        "baseline": lambda out: baseline(files, out),
        **{
            f"reencode_w{w}": (lambda out, w=w: ours(photos, out, "always", w))
            for w in worker_counts
        },
        **{
            f"passthrough_w{w}": (lambda out, w=w: ours(photos, out, "auto", w))
            for w in worker_counts
        },
    }
    warm = files[: max(50, count // 20)]
    with tempfile.TemporaryDirectory() as tmp:
        warm_dir = Path(tmp) / "warm"
        warm_dir.mkdir()
        for f in warm:
            (warm_dir / f.name).symlink_to(f.resolve())
        baseline(warm, Path(tmp) / "b")
        ours(warm_dir, Path(tmp) / "o1", "always", 1)
        ours(warm_dir, Path(tmp) / "o2", "auto", 1)

    runs: dict[str, list] = {name: [] for name in contenders}
    for rep in range(reps):
        for name, fn in contenders.items():
            runs[name].append(measure(fn, count))
            print(
                f"rep {rep} {name:16s} {runs[name][-1]['img_per_s']:8.0f} img/s",
                file=sys.stderr,
                flush=True,
            )
    results = {name: summarise(r) for name, r in runs.items()}

    base = results["baseline"]
    one = {p: results[f"{p}_w1"] for p in ("reencode", "passthrough")}
    figures = (
        {f"{p}_vs_baseline_one_worker": one[p]["img_per_s"] / base["img_per_s"] for p in one}
        | {
            f"{p}_vs_baseline_per_cpu_s": one[p]["img_per_cpu_s"] / base["img_per_cpu_s"]
            for p in one
        }
        | {
            f"{p}_scaling_w{w}": results[f"{p}_w{w}"]["img_per_s"] / (w * one[p]["img_per_s"])
            for p in one
            for w in worker_counts
        }
    )
    return {
        "mode": "shards",
        "benchmark": "shard_build",
        "photos": {"count": count, "mean_kb": round(mean_kb, 1), "folder": str(photos)},
        "photoset": photoset,
        "reps": reps,
        "worker_counts": worker_counts,
        "baseline": "PIL open + convert('RGB') + save JPEG q90 + webdataset.ShardWriter, one process",
        "ours": f"moco-shards build --max-count {MAX_COUNT} --quality 90, --reencode always / auto",
        "results": results,
        "figures": figures,
        "goals": {"reencode_vs_baseline": 1.5, "passthrough_vs_baseline": 3.0, "scaling": 0.8},
        # The machine is shared: other work's load over the last 1, 5 and 15 minutes, at the end.
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def print_shards(record: dict) -> None:
    results, photos = record["results"], record["photos"]
    base = results["baseline"]
    print(
        f"shard build, {photos['count']} photos of {photos['mean_kb']:.0f} KB, {record['machine']['cores']} cores "
        f"({record['machine']['cpu']}), median of {record['reps']}"
    )
    print(f"{'contender':18s} {'img/s':>8s} {'img/cpu-s':>10s} {'vs base':>8s} {'scaling':>8s}")
    for name, r in results.items():
        ratio = r["img_per_s"] / base["img_per_s"]
        path, _, w = name.partition("_w")
        one = results.get(f"{path}_w1")
        scale = f"{r['img_per_s'] / (int(w) * one['img_per_s']):.2f}" if w else ""
        print(
            f"{name:18s} {r['img_per_s']:8.0f} {r['img_per_cpu_s']:10.0f} {ratio:8.2f} {scale:>8s}"
        )
