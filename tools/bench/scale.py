"""``moco-bench scale``: a training rank's start-up time and host memory as the data set grows.

Writes synthetic shard folders in the project's format in seconds (a shard's bytes written once
and hard-linked under every name), then times rank 0 and the last rank of each world size, each
in a fresh process, to a built ``ViewLoader`` and its first batch, with its peak memory; a fit
against the manifest's shard count and the samples a reader is given extrapolates to 1e9
samples at world 64. ``--pipeline-from DIR`` measures another checkout's ``pipeline``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import simplejpeg

__all__ = ["write_folder", "bench_scale", "print_scale", "FOLDERS"]

# (samples, shards): the sample axis at 100-1,000 per shard, and the shard axis at 10 per shard.
FOLDERS = ((10_000, 100), (100_000, 1_000), (1_000_000, 1_000), (1_000_000, 100_000))
TARGET = {"samples": 10**9, "shards": 100_000, "world": 64}
GOALS = {"startup_s": 60.0, "peak_rss_GB": 2.0}
_LINKS_PER_FILE = 1_000


def _shard_bytes(samples: int, classes: int) -> tuple[bytes, str]:
    # Imported lazily: a measuring child may first swap in another checkout's pipeline
    # (--pipeline-from), which must not find this one's already loaded.
    from ...pipeline import shards
    from ..shards.tar import encode_sample

    rng = np.random.default_rng(0)
    jpegs = [
        simplejpeg.encode_jpeg(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), 90, "RGB", "420")
        for _ in range(16)
    ]
    blob, lines = bytearray(), []
    for i in range(samples):
        key = f"{i:010d}"
        meta = json.dumps({"source": f"synthetic/{key}.jpg", "size": [16, 16]}).encode()
        encoded, members = encode_sample(
            key, [("jpg", jpegs[i % 16]), ("cls", str(i % classes).encode()), ("json", meta)]
        )
        lines.append(shards.index_line((e, len(blob) + o, s, n) for e, o, s, n in members))
        blob += encoded
    blob += shards.TAR_END
    return bytes(blob), shards.index_header(samples) + "".join(lines)


def write_folder(out: Path, samples: int, num_shards: int, classes: int = 10) -> Path:
    """A shard folder of ``samples`` synthetic samples in ``num_shards`` shards, in the project's format."""
    from ...pipeline import shards  # lazily, as above

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base, extra = divmod(samples, num_shards)
    made: dict[tuple[int, int], tuple[Path, Path, int, str, str]] = {}
    entries = []
    for i in range(num_shards):
        count = base + (i < extra)
        slot = (count, i // _LINKS_PER_FILE)
        if slot not in made:
            tar_bytes, index_text = _shard_bytes(count, classes)
            stem = out / f".template-{count}-{slot[1]}"
            stem.with_suffix(".tar").write_bytes(tar_bytes)
            stem.with_suffix(".idx").write_text(index_text)
            made[slot] = (
                stem.with_suffix(".tar"),
                stem.with_suffix(".idx"),
                len(tar_bytes),
                hashlib.sha256(tar_bytes).hexdigest(),
                hashlib.sha256(index_text.encode()).hexdigest(),
            )
        tar, idx, size, sha, index_sha = made[slot]
        name = shards.shard_stem("synthetic", i)
        os.link(tar, out / f"{name}.tar")
        os.link(idx, out / f"{name}.idx")
        entries.append(
            {
                "tar": f"{name}.tar",
                "index": f"{name}.idx",
                "samples": count,
                "bytes": size,
                "sha256": sha,
                "index_sha256": index_sha,
            }
        )
    names = [f"class{c}" for c in range(classes)]
    # every shard holds its samples' classes in turn from class 0: sample i of a shard is class i % classes
    per_class = [
        sum(e["samples"] // classes + (c < e["samples"] % classes) for e in entries)
        for c in range(classes)
    ]
    # The builder's own manifest writer, so that the folder has exactly a build's fields
    # (version 2: a rejected count, its reasons and the log beside it, here empty).
    from ...common.files import write_json_atomic  # lazily, as above
    from ..shards.build import _manifest  # lazily, as above
    from ..shards.inputs import ORDER  # lazily, as above
    from ..shards.settings import BuildSettings  # lazily, as above

    identity = {
        "classes": names,
        "inputs": samples,
        "sources": ["moco-bench scale (generated)"],
        "input_digest": "",
        "order": ORDER,
    }
    record = {"class_counts": dict(enumerate(per_class)), "shards": entries, "copied": samples}
    manifest = _manifest(
        BuildSettings(name="synthetic", labels="folder", max_count=max(base + (extra > 0), 1)),
        identity,
        [record],
        0,
        {},
        shards.rejected_name(),
    )
    manifest["settings"]["generator"] = "moco-bench scale"
    (out / shards.rejected_name()).write_text("")
    write_json_atomic(out / shards.MANIFEST_NAME, manifest)
    return out


# ------------------------------------------------------------------ one rank, in its own process


def _rss_MB() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _use_pipeline_from(root: str) -> None:
    """Import ``moco_dali.pipeline`` from another checkout's ``pipeline/`` folder."""
    folder = Path(root) / "pipeline"
    spec = importlib.util.spec_from_file_location(
        "moco_dali.pipeline", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["moco_dali.pipeline"] = module
    spec.loader.exec_module(module)


def _child(spec: dict) -> dict:
    if spec.get("pipeline_from"):
        _use_pipeline_from(spec["pipeline_from"])
    import torch  # noqa: F401  (the imports are not the start-up being measured)

    try:  # imported lazily: after _use_pipeline_from
        from ...pipeline.config import LoaderConfig, ReadConfig
        from ...pipeline.loader import ViewLoader
        from ...pipeline.recipes import v2

        read = ReadConfig(threads=spec["threads"])
        config = LoaderConfig(batch_size=spec["batch"], dtype="float32", seed=0, read=read)
        cap = read.max_window_samples
    except ImportError:  # --pipeline-from a checkout older than pipeline/config.py
        from ...pipeline.augment import v2  # lazily, as above
        from ...pipeline.loader import LoaderConfig, ViewLoader

        threads = spec["threads"]
        config = LoaderConfig(batch_size=spec["batch"], dtype="float32", threads=threads, seed=0)
        cap = getattr(config, "max_window_samples", None)

    baseline = _rss_MB()
    started = time.perf_counter()
    loader = ViewLoader(spec["folder"], v2(size=16), config, rank=spec["rank"], world=spec["world"])
    built = time.perf_counter()
    next(iter(loader))
    first = time.perf_counter()
    return {
        "construct_s": built - started,
        "first_batch_s": first - started,
        "baseline_rss_MB": baseline,
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "reader_samples": int(loader._pipe.epoch_size("reader")),
        "opened_shards": len(loader.pairs),
        "window_cap": cap,
    }


def _measure(folder: Path, world: int, rank: int, args) -> dict:
    spec = {
        "folder": str(folder),
        "world": world,
        "rank": rank,
        "batch": args.tree.data.batch_size,
        "threads": args.tree.data.read.threads,
        "pipeline_from": str(args.options.pipeline_from) if args.options.pipeline_from else None,
    }
    result = subprocess.run(
        [sys.executable, "-m", "moco_dali.tools.bench.scale", json.dumps(spec)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise ValueError(
            f"scale: world {world} rank {rank} on {folder} failed: "
            f"{(result.stderr.strip().splitlines() or ['?'])[-1]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the fit

_TERMS = {"shards": "per_shard", "reader_samples": "per_reader_sample"}


def _fit(rows: list[dict], key: str) -> dict:
    """``key`` = a + b * S + c * R by least squares, a term dropped while its coefficient comes out negative."""
    terms = list(_TERMS)
    y = np.array([r[key] for r in rows], dtype=float)
    while True:
        x = np.column_stack([np.ones(len(rows))] + [[float(r[t]) for r in rows] for t in terms])
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        negative = [t for t, c in zip(terms, coef[1:]) if c < 0]
        if not negative:
            break
        terms.remove(negative[0])
    predicted = x @ coef
    spread = float(((y - y.mean()) ** 2).sum())
    return {
        "intercept": float(coef[0]),
        **{_TERMS[t]: float(c) for t, c in zip(terms, coef[1:])},
        "r2": 1.0 - float(((y - predicted) ** 2).sum()) / spread if spread else 1.0,
    }


def _predict(fit: dict, shards: float, reader_samples: float) -> float:
    return (
        fit["intercept"]
        + fit.get("per_shard", 0.0) * shards
        + fit.get("per_reader_sample", 0.0) * reader_samples
    )


def _extrapolate(runs: list[dict]) -> dict:
    cap = runs[0]["window_cap"]
    per_shard = TARGET["samples"] // TARGET["shards"]
    share = TARGET["samples"] // TARGET["world"]
    # What the rank's first DALI reader is given at the target: its first window of whole
    # shards (as many of 10,000 as fit the cap), or every sample without windows.
    reader = TARGET["samples"] if cap is None else min(share, max(1, cap // per_shard) * per_shard)
    fits = {key: _fit(runs, key) for key in ("first_batch_s", "peak_rss_MB", "construct_s")}
    predicted = {key: _predict(fit, TARGET["shards"], reader) for key, fit in fits.items()}
    return {
        "fits": fits,
        "target": {**TARGET, "reader_samples": reader},
        "predicted": {
            "first_batch_s": predicted["first_batch_s"],
            "construct_s": predicted["construct_s"],
            "peak_rss_GB": predicted["peak_rss_MB"] / 1024,
        },
        "goals": GOALS,
        "met": {
            "startup_s": predicted["first_batch_s"] <= GOALS["startup_s"],
            "peak_rss_GB": predicted["peak_rss_MB"] / 1024 <= GOALS["peak_rss_GB"],
        },
        "assumptions": [
            "start-up and memory per rank grow with the manifest's shard count S (read whole by every rank) and "
            "with the samples its first DALI reader is given R, and with nothing else: the fit is a + b*S + c*R",
            f"at the target R = {reader:,} ("
            + (
                "no windows: the reader is given every sample"
                if cap is None
                else f"the first window: whole shards of {per_shard:,} up to {cap:,} samples"
            )
            + ")",
            "local disk with the shards in the page cache after a warm-up run; a network file system adds "
            "its latency per opened shard (a few small reads each) and per manifest read",
            "16x16 JPEGs: the first batch's decode is negligible; with ImageNet-sized images add one batch's "
            "decode and the shuffle buffer's fill (4,096 samples read) to the first-batch time",
        ],
    }


# ------------------------------------------------------------------ the benchmark


def bench_scale(args) -> dict:
    root = (
        Path(args.options.root)
        if args.options.root
        else Path(tempfile.mkdtemp(prefix="moco-bench-scale-"))
    )
    folders = (
        [
            (int(float(s)), int(float(n)))
            for s, n in (f.split(":") for f in args.options.folders.split(","))
        ]
        if args.options.folders
        else list(FOLDERS)
    )
    worlds = [int(w) for w in args.options.worlds.split(",")]
    written, runs = [], []
    load_before = os.getloadavg()  # the machine may be shared: say how busy it was
    for samples, num_shards in folders:
        folder = root / f"s{samples}-n{num_shards}"
        started = time.perf_counter()
        if not (folder / "manifest.json").is_file():
            write_folder(folder, samples, num_shards)
        written.append(
            {"samples": samples, "shards": num_shards, "write_s": time.perf_counter() - started}
        )
        print(
            f"moco-bench scale: {samples:,} samples in {num_shards:,} shards ({written[-1]['write_s']:.1f} s to "
            "write); warm-up run",
            file=sys.stderr,
            flush=True,
        )
        _measure(folder, 1, 0, args)  # page cache and the imports' files warm
        for world in worlds:
            for rank in sorted({0, world - 1}):
                reps = [_measure(folder, world, rank, args) for _ in range(args.options.reps)]
                run = {
                    "samples": samples,
                    "shards": num_shards,
                    "world": world,
                    "rank": rank,
                    "reps": len(reps),
                }
                for key in ("construct_s", "first_batch_s", "peak_rss_MB", "baseline_rss_MB"):
                    run[key] = statistics.median(r[key] for r in reps)
                    run[key + "_all"] = [r[key] for r in reps]
                run.update(
                    {k: reps[0][k] for k in ("reader_samples", "opened_shards", "window_cap")}
                )
                runs.append(run)
                print(
                    f"  world {world:3d} rank {rank:3d}: first batch {run['first_batch_s']:.2f} s, peak "
                    f"{run['peak_rss_MB']:.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
    return {
        "mode": "scale",
        "config": {
            "batch_per_rank": args.tree.data.batch_size,
            "threads": args.tree.data.read.threads,
            "worlds": worlds,
            "reps": args.options.reps,
            "pipeline_from": str(args.options.pipeline_from or ""),
            "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
            "what": "ViewLoader(v2 views, shuffled, last_batch drop) to its first "
            "batch, each rank a fresh process, one at a time",
        },
        "folders": written,
        "runs": runs,
        "extrapolation": _extrapolate(runs),
    }


def print_scale(record: dict) -> None:
    print(
        f"{'samples':>10} {'shards':>8} {'world':>5} {'rank':>4} {'reader':>9} {'opened':>7} {'built s':>8} "
        f"{'1st batch s':>11} {'peak MB':>8} {'imports MB':>10}"
    )
    for r in record["runs"]:
        print(
            f"{r['samples']:>10,} {r['shards']:>8,} {r['world']:>5} {r['rank']:>4} {r['reader_samples']:>9,} "
            f"{r['opened_shards']:>7,} {r['construct_s']:>8.2f} {r['first_batch_s']:>11.2f} "
            f"{r['peak_rss_MB']:>8.0f} {r['baseline_rss_MB']:>10.0f}"
        )
    ex = record["extrapolation"]
    for key, fit in ex["fits"].items():
        terms = ", ".join(f"{k} {v:.3g}" for k, v in fit.items())
        print(f"fit {key}: {terms}")
    t, p = ex["target"], ex["predicted"]
    print(
        f"extrapolated to {t['samples']:.0e} samples in {t['shards']:,} shards, world {t['world']}: first batch "
        f"{p['first_batch_s']:.1f} s (goal <= {ex['goals']['startup_s']:.0f}: "
        f"{'met' if ex['met']['startup_s'] else 'MISSED'}), peak {p['peak_rss_GB']:.2f} GB (goal <= "
        f"{ex['goals']['peak_rss_GB']:.0f}: {'met' if ex['met']['peak_rss_GB'] else 'MISSED'})"
    )
    for line in ex["assumptions"]:
        print(f"  assuming {line}")


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
