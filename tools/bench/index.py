"""``moco-bench index``: ``moco-shards index`` against ``moco-shards build`` on the same tars.

img2dataset-shaped tars (``KEY.jpg``, ``.txt``, ``.json``, 500 samples each) are made once from
the photos; then, alternating, each contender runs in a fresh interpreter on one core:
``index``, ``build`` (``--reencode auto``: a clean JPEG stored byte for byte after a strict
decode, the ``.txt`` and ``.json`` rejected as not images) and ``rebuild`` (``--reencode
always``: every image decoded and encoded again, the rewrite issue 27's goal is stated
against). Per contender, medians of ``--reps``: images/s of its one process, images per
CPU-second, and its peak RSS beside a process that only imported the same modules.
``--growth 1e4,1e5,1e6`` adds index's peak RSS as the samples grow (tiny JPEGs, 1,000 a tar).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from ..shards.build import build
from ..shards.imageprep import PrepSettings
from ..shards.index import IndexCommand, index
from ..shards.settings import BuildSettings
from ..shards.tar import ustar_header

__all__ = ["bench_index", "print_index"]

PER_TAR = 500
GROWTH_PER_TAR = 1000


def make_tars(photos: list[Path], out: Path) -> list[str]:
    """The photos as img2dataset writes them: a caption and a metadata record beside each."""
    import webdataset  # here, in the parent only: it imports torch, which a child must not count

    out.mkdir(parents=True, exist_ok=True)
    with webdataset.ShardWriter(str(out / "%05d.tar"), maxcount=PER_TAR, verbose=0) as sink:
        for i, path in enumerate(photos):
            key = f"{i:09d}"
            meta = {"key": key, "status": "success", "url": f"https://example.org/{path.name}"}
            sink.write(
                {
                    "__key__": key,
                    "jpg": path.read_bytes(),
                    "txt": f"a photograph, {path.stem}",
                    "json": json.dumps(meta).encode(),
                }
            )
    return sorted(str(p) for p in out.glob("*.tar"))


def _contender(kind: str, out: str, tars: list[str]) -> dict:
    """One run in this process: its wall and CPU time and its peak RSS."""
    cpu = time.process_time()
    wall = time.perf_counter()
    if kind == "index":
        images = index(IndexCommand(sources=tars, out=out)).samples
    elif kind in ("build", "rebuild"):
        reencode = "auto" if kind == "build" else "always"
        settings = BuildSettings(max_count=PER_TAR, prep=PrepSettings(reencode=reencode))
        images = build(tars, out, settings, workers=0, progress=False).samples
    else:  # "idle": the imports alone, the floor under both peaks
        images = 0
    return {
        "images": images,
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _peak_rss_mb() -> float:
    # The address space's high-water mark, which exec resets. getrusage's ru_maxrss is not: it
    # keeps what the forked copy of moco-bench (torch loaded, ~800 MB) held before the exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# A fresh interpreter that imports this module only (not moco-bench's torch): its peak is the run's.
_CHILD = (
    "import json, sys; from moco_dali.tools.bench.index import _contender; "
    "print(json.dumps(_contender(sys.argv[1], sys.argv[2], sys.argv[3:])))"
)


def _run(kind: str, tars: list[str], scratch: Path) -> dict:
    out = scratch / f"{kind}-out"
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, kind, str(out), *tars],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
        raise RuntimeError(f"the {kind} run failed: {lines[-1]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["images"]:
        result["img_per_s"] = result["images"] / result["wall_s"]
        result["img_per_cpu_s"] = result["images"] / result["cpu_s"]
    return result


def tiny_tars(samples: int, out: Path, jpeg: bytes) -> list[str]:
    """``samples`` copies of one small JPEG under distinct keys, ``GROWTH_PER_TAR`` to a tar.

    Written block by block with this project's ustar header (tarfile's would take minutes at
    a million members); what index reads is the headers, so the image's size does not matter.
    """
    out.mkdir(parents=True, exist_ok=True)
    pad = b"\0" * (-len(jpeg) % 512)
    tars = []
    for first in range(0, samples, GROWTH_PER_TAR):
        path = out / f"{first // GROWTH_PER_TAR:06d}.tar"
        with open(path, "wb") as f:
            for i in range(first, min(first + GROWTH_PER_TAR, samples)):
                f.write(ustar_header(f"{i:09d}.jpg", len(jpeg)) + jpeg + pad)
            f.write(b"\0" * 1024)
        tars.append(str(path))
    return tars


def tiny_jpeg() -> bytes:
    """A 16 x 16 JPEG of a smooth gradient (a few hundred bytes): a million of them are a
    gigabyte of tars, where the photos would be a hundred."""
    import numpy as np
    import simplejpeg

    ramp = np.linspace(0, 255, 16, dtype=np.uint8)
    image = np.stack(
        [np.tile(ramp, (16, 1)), np.tile(ramp[:, None], (1, 16)), 255 - np.tile(ramp, (16, 1))], -1
    )
    return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=90)


def bench_growth(counts: list[int], jpeg: bytes) -> list[dict]:
    """Index's peak RSS and time at each sample count, each in a fresh interpreter."""
    rows = []
    for samples in counts:
        scratch = Path(tempfile.mkdtemp(prefix="indexgrowth-"))
        try:
            tars = tiny_tars(samples, scratch / "tars", jpeg)
            listing = scratch / "tars.txt"  # a list file: the command line would not hold 1e3 tars
            listing.write_text("".join(t + "\n" for t in tars))
            run = _run("index", [str(listing)], scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if run["images"] != samples:
            raise RuntimeError(f"index of {samples} samples indexed {run['images']}")
        rows.append({"samples": samples, "tars": len(tars), **run})
        print(
            f"growth {samples:>9,d} samples: peak {run['peak_rss_mb']:.1f} MB, {run['wall_s']:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return rows


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def bench_index(
    photos: Path, reps: int, photoset: Optional[dict] = None, growth: Optional[list[int]] = None
) -> dict:
    """Index against build over the same tars made of the JPEGs in ``photos``, alternating;
    with ``growth``, index's memory at each of those sample counts."""
    files = sorted(photos.glob("*.jpg"))
    if not files:
        raise ValueError(f"{photos}: no *.jpg files to make tars of")
    scratch = Path(tempfile.mkdtemp(prefix="indexbench-"))
    try:
        tars = make_tars(files, scratch / "tars")
        tar_bytes = sum(os.path.getsize(t) for t in tars)
        for tar in tars:  # page cache, so both read from memory
            Path(tar).read_bytes()
        runs: dict[str, list] = {"idle": [], "index": [], "build": [], "rebuild": []}
        for rep in range(reps):
            for kind in runs:
                runs[kind].append(_run(kind, tars, scratch))
                rate = runs[kind][-1].get("img_per_s", 0.0)
                print(f"rep {rep} {kind:6s} {rate:8.0f} img/s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results = {
        kind: {
            "img_per_s": _median(r, "img_per_s"),
            "img_per_s_min": min(x["img_per_s"] for x in r),
            "img_per_s_max": max(x["img_per_s"] for x in r),
            "img_per_cpu_s": _median(r, "img_per_cpu_s"),
            "peak_rss_mb": _median(r, "peak_rss_mb"),
            "runs": r,
        }
        for kind, r in runs.items()
        if kind != "idle"
    }
    idle_mb = _median(runs["idle"], "peak_rss_mb")
    jpeg = tiny_jpeg()
    grown = bench_growth(growth, jpeg) if growth else []
    figures = {}
    if len(grown) > 1:
        figures["index_growth_rss_mb"] = grown[-1]["peak_rss_mb"] - grown[0]["peak_rss_mb"]
    return {
        "mode": "index",
        "benchmark": "index_vs_build",
        "photos": {"count": len(files), "folder": str(photos)},
        "photoset": photoset,
        "tars": {"count": len(tars), "samples_per_tar": PER_TAR, "bytes": tar_bytes},
        "reps": reps,
        "ours": "moco-shards index TARS --out DIR (one process)",
        "baseline": f"moco-shards build TARS --out DIR --max-count {PER_TAR} --workers 0 "
        "(--reencode auto: pass-through after a strict decode)",
        "baseline_rebuild": "the same with --reencode always (every image decoded and encoded)",
        "results": results,
        "idle_peak_rss_mb": idle_mb,
        "figures": {
            "index_vs_build_img_per_s": results["index"]["img_per_s"]
            / results["build"]["img_per_s"],
            "index_vs_rebuild_img_per_s": results["index"]["img_per_s"]
            / results["rebuild"]["img_per_s"],
            "index_extra_rss_mb": results["index"]["peak_rss_mb"] - idle_mb,
            "build_extra_rss_mb": results["build"]["peak_rss_mb"] - idle_mb,
            **figures,
        },
        "growth": grown,
        "growth_jpeg_bytes": len(jpeg),
        # The machine is shared: other work's load over the last 1, 5 and 15 minutes, at the end.
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def print_index(record: dict) -> None:
    results, tars = record["results"], record["tars"]
    print(
        f"index vs build, {record['photos']['count']} photos in {tars['count']} tars "
        f"({tars['bytes'] / 1e6:.0f} MB), one process each ({record['machine']['cpu']}), "
        f"median of {record['reps']}"
    )
    print(f"{'contender':10s} {'img/s':>8s} {'img/cpu-s':>10s} {'peak MB':>8s} {'over idle':>10s}")
    for name, r in results.items():
        extra = r["peak_rss_mb"] - record["idle_peak_rss_mb"]
        print(
            f"{name:10s} {r['img_per_s']:8.0f} {r['img_per_cpu_s']:10.0f} "
            f"{r['peak_rss_mb']:8.0f} {extra:10.1f}"
        )
    figures = record["figures"]
    print(
        f"index / build: {figures['index_vs_build_img_per_s']:.1f}x images/s; "
        f"index / rebuild: {figures['index_vs_rebuild_img_per_s']:.1f}x"
    )
    for row in record.get("growth") or []:
        print(
            f"index of {row['samples']:>9,d} samples in {row['tars']:>5,d} tars: "
            f"peak {row['peak_rss_mb']:.1f} MB, {row['wall_s']:.1f} s"
        )
