"""``moco-bench``: throughput benchmarks, this project's path beside the reference path.

Modes:

* ``pipeline``: image pairs per second delivered to the training device by the DALI
  view pipeline and by the reference loader (PIL and torchvision in DataLoader
  workers), over the same shards, alternating, with peak memory.
* ``momentum``: the key encoder's momentum update (fused multi-tensor kernels against
  the reference per-parameter loop and against the memory-bandwidth floor), plus the
  two other per-step dictionary costs at K = 65536: the enqueue and the negative-logit
  matmul.
* ``step`` and ``e2e`` (``tools/bench_train.py``): images/s of the training step on
  synthetic tensors, and end to end from shards, each beside the reference
  configuration, with the data-wait fraction and an input/compute-bound verdict.
* ``shards`` (``tools/bench_shards.py``): ``moco-shards build`` against PIL plus
  ``webdataset.ShardWriter``.
* ``all``: every mode in one run, one JSON. ``--compare A.json B.json`` sets the
  headline figures of two records side by side; ``--chart FILE.png`` draws them.

Every mode warms up, alternates the contenders, reports medians with their spread,
prints a table and writes JSON with the machine and the configuration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from moco_dali.model import momentum
from moco_dali.model.encoders import add_mlp_head, resnet
from moco_dali.model.queue import KeyQueue
from moco_dali.tools.bench.machine import describe

__all__ = ["main", "time_ms", "copy_bandwidth"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 3) -> list[float]:
    """Wall time of ``fn`` in ms, ``reps`` times after ``warmup`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def copy_bandwidth(device: torch.device, reps: int, mib: int = 1024) -> float:
    """Measured device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = mib * 2**20 // 4
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    src.uniform_()
    ms = statistics.median(time_ms(lambda: dst.copy_(src), device, reps))
    return 2 * n * 4 / (ms / 1e3)


def _summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "calls": len(times)}


def bench_momentum(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    encoders = []
    for _ in range(2):
        encoder = resnet(args.arch)(num_classes=128)
        if args.mlp:
            add_mlp_head(encoder)
        encoders.append(encoder.to(device))
    key, query = encoders
    params = list(key.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    implementations = [i for i in ("loop", "foreach", "foreach_lerp", "apex") if i in momentum.available_implementations()]

    bandwidth = copy_bandwidth(device, reps=max(5, args.calls // 5), mib=args.copy_mib)
    floor_ms = 3 * param_bytes / bandwidth * 1e3  # read theta_k and theta_q, write theta_k

    # Alternate the implementations, a few calls each round, so drift hits all alike.
    runs: dict[str, list[float]] = {name: [] for name in implementations}
    for name in implementations:
        time_ms(lambda: momentum.momentum_update_(key, query, 0.999, name), device, 1, warmup=3)
    for _ in range(args.reps):
        for name in implementations:
            runs[name] += time_ms(lambda: momentum.momentum_update_(key, query, 0.999, name), device, args.calls,
                                  warmup=1)
    results = {name: _summary(t) for name, t in runs.items()}

    queue = KeyQueue(args.K, 128).to(device)
    keys = torch.nn.functional.normalize(torch.randn(args.batch, 128, device=device), dim=1)
    q = torch.nn.functional.normalize(torch.randn(args.batch, 128, device=device), dim=1)
    enqueue = _summary(time_ms(lambda: queue.enqueue(keys), device, args.calls * args.reps))
    negatives = _summary(time_ms(lambda: q @ queue.keys().t(), device, args.calls * args.reps))

    best = min((n for n in implementations if n != "loop"), key=lambda n: results[n]["median_ms"])
    return {
        "mode": "momentum",
        "config": {"arch": args.arch, "mlp_head": args.mlp, "parameters": sum(p.numel() for p in params),
                   "tensors": len(params), "param_bytes": param_bytes, "K": args.K, "batch": args.batch,
                   "calls": args.calls, "reps": args.reps, "device": str(device)},
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "floor_ms": floor_ms,
        "momentum": results,
        "best": best,
        "best_over_floor": results[best]["median_ms"] / floor_ms,
        "loop_over_best": results["loop"]["median_ms"] / results[best]["median_ms"],
        "enqueue": enqueue,
        "negative_logits": negatives,
        "goals": {"best_over_floor": 1.5, "loop_over_best": 10.0},
    }


def print_momentum(r: dict) -> None:
    c = r["config"]
    print(f"momentum update, {c['arch']}{' + MLP head' if c['mlp_head'] else ''}: {c['parameters'] / 1e6:.1f} M "
          f"parameters in {c['tensors']} tensors, {c['device']}; copy bandwidth {r['copy_bandwidth_GBps']:.1f} GB/s")
    print(f"{'implementation':16s} {'median ms':>10s} {'min':>8s} {'max':>8s} {'x floor':>8s}")
    for name, s in r["momentum"].items():
        print(f"{name:16s} {s['median_ms']:10.3f} {s['min_ms']:8.3f} {s['max_ms']:8.3f} "
              f"{s['median_ms'] / r['floor_ms']:8.2f}")
    print(f"{'floor (3 x bytes / bandwidth)':30s} {r['floor_ms']:.3f} ms")
    print(f"best: {r['best']}, {r['best_over_floor']:.2f}x the floor (goal <= 1.5), "
          f"{r['loop_over_best']:.1f}x faster than the loop (goal >= 10)")
    print(f"enqueue of {c['batch']} keys into K={c['K']}: {r['enqueue']['median_ms']:.3f} ms; "
          f"negative logits {c['batch']}x128 @ 128x{c['K']}: {r['negative_logits']['median_ms']:.3f} ms")


def _forever(make_iterator):
    while True:
        yield from make_iterator()


def _peak_memory(device: torch.device) -> dict:
    """Peak memory of this process: GPU (through NVML, which sees DALI's pools too) and host RSS."""
    import resource

    memory = {"host_peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        memory["torch_peak_allocated_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
        try:
            import os

            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            used = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == os.getpid()]
            memory["gpu_process_MB"] = used[0] / 2**20 if used and used[0] else None
        except Exception as exc:  # NVML is optional; say why the figure is missing
            memory["gpu_process_MB"] = f"unavailable: {exc}"
    return memory


def _synthetic_photos(args) -> tuple[Path, dict]:
    """Generated ImageNet-like JPEGs (``moco_dali.tools.bench.synthetic``), made once per run."""
    if getattr(args, "_photos", None) is None:
        from moco_dali.tools.bench.synthetic import generate

        work = Path(tempfile.mkdtemp(prefix="moco-bench-"))
        info = generate(work / "photos", args.synthetic, seed=0)
        args._photos = (work / "photos", info)
    return args._photos


def _shards(args) -> tuple[Path, Optional[dict]]:
    """The user's shards, or shards built from the synthetic photos (once per run)."""
    if args.shards is not None:
        return args.shards, None
    if getattr(args, "_built", None) is None:
        from moco_dali.tools.shards.build import BuildSettings, build

        photos, info = _synthetic_photos(args)
        build([str(photos)], photos.parent / "shards", BuildSettings(max_count=1000), progress=False)
        args._built = (photos.parent / "shards", info)
    return args._built


def bench_pipeline(args) -> dict:
    from moco_dali.pipeline.augment import preset
    from moco_dali.pipeline.loader import LoaderConfig, ViewLoader, decode_pipeline
    from moco_dali.pipeline.reference import reference_loader

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    shards, photoset = _shards(args)
    cfg = preset(args.preset, args.size, hue_space=args.hue_space)
    dali = ViewLoader(shards, cfg, LoaderConfig(batch_size=args.batch, dtype=args.dtype, threads=args.threads,
                                                     hw_decoder_load=args.hw_decoder_load, labels=False),
                      device_id=device.index or 0 if gpu else None)
    contenders = {
        "dali": _forever(lambda: ((b.view_q, b.view_k) for b in dali)),
        "reference": _forever(lambda: reference_loader(shards, cfg, args.batch, workers=args.workers,
                                                       device=device)),
    }

    def run(stream, batches: int) -> float:
        start = time.perf_counter()
        for _ in range(batches):
            next(stream)
        _sync(device)
        return time.perf_counter() - start

    for stream in contenders.values():
        run(stream, args.warmup)
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.reps):
        for name, stream in contenders.items():
            seconds[name].append(run(stream, args.batches))
    pairs = args.batches * args.batch
    results = {name: {"pairs_per_s": statistics.median(pairs / t for t in ts),
                      "pairs_per_s_min": pairs / max(ts), "pairs_per_s_max": pairs / min(ts),
                      "seconds": ts} for name, ts in seconds.items()}
    memory = _peak_memory(device)  # before the decode-only pipeline adds its own buffers

    # The ceiling: the same reader and decoder with nothing after them. Timed after the
    # contenders, so that its memory does not count as theirs.
    decoder = decode_pipeline(shards, args.batch, threads=args.threads, hw_decoder_load=args.hw_decoder_load,
                              device_id=(device.index or 0) if gpu else None)
    decoded = _forever(lambda: iter(decoder.run, None))
    run(decoded, args.warmup)
    decode_s = [run(decoded, args.batches) for _ in range(args.reps)]
    return {
        "mode": "pipeline",
        "config": {"shards": str(shards), "samples": dali.samples, "preset": args.preset, "size": args.size,
                   "augment": cfg.to_dict(), "batch": args.batch, "batches": args.batches, "warmup": args.warmup,
                   "reps": args.reps, "dtype": args.dtype, "dali_threads": args.threads or "default",
                   "reference_workers": args.workers, "hw_decoder_load": args.hw_decoder_load if gpu else None,
                   "device": str(device), "decoder": "mixed (nvJPEG)" if gpu else "cpu (libjpeg-turbo)"},
        "photoset": photoset,
        "results": results,
        "dali_over_reference": results["dali"]["pairs_per_s"] / results["reference"]["pairs_per_s"],
        "decode_ceiling": {"images_per_s": statistics.median(pairs / t for t in decode_s),
                           "images_per_s_min": pairs / max(decode_s), "images_per_s_max": pairs / min(decode_s),
                           "seconds": decode_s},
        "memory": memory,
        "goals": {"gpu_pairs_per_s": 8000, "gpu_dali_over_reference": 5.0, "cpu_dali_over_reference": 1.0},
    }


def print_pipeline(r: dict) -> None:
    c = r["config"]
    print(f"view pipeline, {c['preset']} (hue in {c['augment']['hue_space']}) at {c['size']} px, "
          f"batch {c['batch']}, {c['batches']} batches x {c['reps']} reps, {c['device']} ({c['decoder']}), "
          f"{c['samples']} samples in {c['shards']}")
    print(f"{'loader':12s} {'pairs/s':>10s} {'min':>10s} {'max':>10s}")
    for name, s in r["results"].items():
        print(f"{name:12s} {s['pairs_per_s']:10.0f} {s['pairs_per_s_min']:10.0f} {s['pairs_per_s_max']:10.0f}")
    d = r.get("decode_ceiling")
    if d:
        print(f"{'decode only':12s} {d['images_per_s']:10.0f} {d['images_per_s_min']:10.0f} "
              f"{d['images_per_s_max']:10.0f}   (images/s: the ceiling of the pairs above)")
    print(f"DALI / reference: {r['dali_over_reference']:.2f}x; memory: "
          + ", ".join(f"{k} {v:.0f}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in r["memory"].items()))


# ----------------------------------------------------------------------- headline figures, compare, chart

def headline(record: dict) -> list[dict]:
    """The figures a record is judged by: ours, the reference (or baseline) and, where one applies, the ceiling."""
    mode = record["mode"]
    if mode == "all":
        return [row for r in record["records"].values() for row in headline(r)]
    if mode == "pipeline":
        r = record["results"]
        row = {"figure": "pipeline pairs/s", "ours": r["dali"]["pairs_per_s"],
               "reference": r["reference"]["pairs_per_s"], "higher_is_better": True,
               "labels": ["ours", "reference", "decode only (images/s)"]}
        if "decode_ceiling" in record:  # records before the ceiling was measured lack it
            row["ceiling"] = record["decode_ceiling"]["images_per_s"]
        return [row]
    if mode == "momentum":
        m = record["momentum"]
        return [{"figure": "momentum update ms", "ours": m[record["best"]]["median_ms"],
                 "reference": m["loop"]["median_ms"], "ceiling": record["floor_ms"], "higher_is_better": False,
                 "labels": ["ours", "per-parameter loop", "bandwidth floor"]}]
    if mode == "step":
        r = record["results"]
        return [{"figure": "step images/s", "ours": r["ours"]["images_per_s"],
                 "reference": r["reference"]["images_per_s"], "higher_is_better": True}]
    if mode == "e2e":
        r = record["results"]
        return [{"figure": "e2e images/s", "ours": r["e2e_ours"]["images_per_s"],
                 "reference": r["e2e_reference"]["images_per_s"], "ceiling": r["step_ours"]["images_per_s"],
                 "higher_is_better": True, "labels": ["ours", "reference", "step (synthetic)"]}]
    if mode == "shards":
        r = record["results"]
        return [{"figure": f"shard build {path} img/s (1 worker)", "ours": r[f"{path}_w1"]["img_per_s"],
                 "reference": r["baseline"]["img_per_s"], "higher_is_better": True,
                 "labels": ["ours", "PIL + ShardWriter"]} for path in ("reencode", "passthrough")]
    raise ValueError(f"unknown benchmark mode {mode!r}")


def _load(path: Path) -> dict:
    try:
        record = json.loads(Path(path).read_text())
        headline(record)
        return record
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a moco-bench record ({type(exc).__name__}: {exc})") from None


def _where(record: dict) -> str:
    m = record.get("machine", {})
    gpus = m.get("gpus") or []
    return f"{record.get('date', '?')}, {gpus[0] + ' x' + str(len(gpus)) if gpus else 'no GPU'}, {m.get('cores')} cores"


def compare(a_path: Path, b_path: Path) -> dict:
    """Headline figures of two records side by side, with B over A for ours."""
    a, b = _load(a_path), _load(b_path)
    rows_b = {row["figure"]: row for row in headline(b)}
    rows = []
    for row in headline(a):
        other = rows_b.get(row["figure"])
        if other:
            rows.append({"figure": row["figure"], "a": row["ours"], "b": other["ours"], "b_over_a": other["ours"] / row["ours"],
                         "a_reference": row["reference"], "b_reference": other["reference"]})
    print(f"A: {a_path} ({_where(a)})\nB: {b_path} ({_where(b)})")
    print(f"{'figure':36s} {'A ours':>10s} {'B ours':>10s} {'B / A':>7s} {'A ref':>10s} {'B ref':>10s}")
    for r in rows:
        print(f"{r['figure']:36s} {r['a']:10.2f} {r['b']:10.2f} {r['b_over_a']:7.2f} {r['a_reference']:10.2f} "
              f"{r['b_reference']:10.2f}")
    if not rows:
        print("no figure in common")
    return {"a": str(a_path), "b": str(b_path), "rows": rows}


def chart(record: dict, out: Path) -> Path:
    """One panel per headline figure: ours, the reference and the ceiling where there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = headline(record)
    fig, axes = plt.subplots(len(rows), 1, figsize=(7, 1.1 + 1.0 * len(rows)), squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        names = ["ours", "reference"] + (["ceiling"] if row.get("ceiling") else [])
        values = [row[n] for n in names]
        bars = ax.barh(row.get("labels", names)[:len(names)], values, color=["#2a7ab0", "#b0b0b0", "#e0a030"][:len(names)])
        ax.bar_label(bars, fmt="%.3g", padding=3, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(row["figure"] + ("" if row["higher_is_better"] else " (lower is better)"), fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
        ax.set_xlim(0, max(values) * 1.2)
    fig.suptitle(f"moco-bench {record['mode']}: {_where(record)}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------- command line

MODES = ("pipeline", "momentum", "step", "e2e", "shards")


def _parser(gpu: bool, cores: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moco-bench", description=__doc__.split("\n\n")[0],
                                     epilog="moco-bench --compare A.json B.json: two records side by side")
    sub = parser.add_subparsers(dest="mode", required=True)

    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--device", default="cuda:0" if gpu else "cpu")
    out.add_argument("--reps", type=int, default=3, help="alternating repetitions (median reported)")
    out.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    out.add_argument("--chart", type=Path, default=None, help="draw the headline figures as a PNG here")

    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--shards", type=Path, default=None, help="shard folder (default: --synthetic photos)")
    data.add_argument("--synthetic", type=int, default=2000 if gpu else 200, metavar="N",
                      help="without --shards: generate N ImageNet-like JPEGs (~500x375, ~110 KB) and shard them")
    data.add_argument("--batch", type=int, default=256 if gpu else 16)
    data.add_argument("--size", type=int, default=224 if gpu else 112, help="view size in px")
    data.add_argument("--batches", type=int, default=50 if gpu else 3, help="timed batches per rep")
    data.add_argument("--warmup", type=int, default=10 if gpu else 1)
    data.add_argument("--hue-space", choices=["hsv", "yiq"], default="hsv",
                      help="DALI hue: exact HSV shift (default) or DALI's cheaper YIQ rotation")
    data.add_argument("--threads", type=int, default=None, help="DALI CPU threads (default: all cores)")
    data.add_argument("--workers", type=int, default=cores, help="reference DataLoader workers")
    data.add_argument("--hw-decoder-load", type=float, default=0.75)

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--arch", default="resnet50" if gpu else "resnet18")
    model.add_argument("--K", type=int, default=65536 if gpu else 4096, help="queue size")

    train = argparse.ArgumentParser(add_help=False)
    train.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto", help="ours: autocast dtype")
    train.add_argument("--compile", action="store_true", help="ours: torch.compile the encoders")

    pipe = argparse.ArgumentParser(add_help=False)
    pipe.add_argument("--preset", choices=["v1", "v2"], default="v2")
    pipe.add_argument("--dtype", choices=["float16", "float32"], default="float16")

    mom = argparse.ArgumentParser(add_help=False)
    mom.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=True, help="MoCo v2's MLP head")
    mom.add_argument("--calls", type=int, default=20 if gpu else 5, help="timed calls per rep")
    mom.add_argument("--copy-mib", type=int, default=1024 if gpu else 256, help="size of the bandwidth probe")

    shards = argparse.ArgumentParser(add_help=False)
    shards.add_argument("--photos", type=Path, default=None,
                        help="shards mode: folder of *.jpg to build from (default: the --synthetic photos)")
    shards.add_argument("--build-workers", default=None,
                        help="shards mode: comma-separated worker counts (default 1, 2, 4, ... cores)")

    sub.add_parser("pipeline", parents=[out, data, pipe],
                   help="view pairs/s of the DALI pipeline beside the reference loader")
    m = sub.add_parser("momentum", parents=[out, mom], help="momentum update vs the per-parameter loop and the floor")
    m.add_argument("--arch", default="resnet50")
    m.add_argument("--K", type=int, default=65536)
    m.add_argument("--batch", type=int, default=256, help="keys enqueued per step (the global batch)")
    sub.add_parser("step", parents=[out, data, model, train], help="training step on synthetic tensors, ours vs reference")
    sub.add_parser("e2e", parents=[out, data, model, train], help="shards through the pipeline into the step")
    s = sub.add_parser("shards", parents=[out, shards], help="moco-shards build vs PIL + webdataset.ShardWriter")
    s.add_argument("--synthetic", type=int, default=2000 if gpu else 200, metavar="N")
    sub.add_parser("all", parents=[out, data, model, train, pipe, mom, shards], help="every mode, one record")
    return parser


def _run(mode: str, args) -> dict:
    if mode == "pipeline":
        return bench_pipeline(args)
    if mode == "momentum":
        return bench_momentum(args)
    if mode in ("step", "e2e"):
        from moco_dali.tools.bench.step import bench_e2e, bench_step

        return bench_step(args) if mode == "step" else bench_e2e(args, str(_shards(args)[0]))
    if mode == "shards":
        from moco_dali.tools.bench.shards import bench_shards

        photos, info = (args.photos, None) if args.photos else _synthetic_photos(args)
        workers = [int(w) for w in args.build_workers.split(",")] if args.build_workers else None
        return bench_shards(photos, args.reps, workers, photoset=info)
    raise ValueError(mode)


def _print(record: dict) -> None:
    from moco_dali.tools.bench.shards import print_shards
    from moco_dali.tools.bench.step import print_e2e, print_step

    printers = {"pipeline": print_pipeline, "momentum": print_momentum, "step": print_step, "e2e": print_e2e,
                "shards": print_shards}
    if record["mode"] == "all":
        for sub in record["records"].values():
            printers[sub["mode"]](sub)
            print()
    else:
        printers[record["mode"]](record)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--compare"]:
        if len(argv) != 3:
            print("moco-bench: error: --compare takes two JSON records: --compare A.json B.json", file=sys.stderr)
            return 2
        try:
            compare(Path(argv[1]), Path(argv[2]))
        except ValueError as exc:
            print(f"moco-bench: error: {exc}", file=sys.stderr)
            return 2
        return 0
    gpu = torch.cuda.is_available()
    parser = _parser(gpu, len(__import__("os").sched_getaffinity(0)))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not gpu:
        parser.error("--device cuda: no CUDA GPU here")
    if getattr(args, "shards", None) is not None and not args.shards.is_dir():
        parser.error(f"--shards {args.shards}: no such folder")
    if getattr(args, "photos", None) is not None and not args.photos.is_dir():
        parser.error(f"--photos {args.photos}: no such folder")
    try:
        if args.mode == "all":
            records = {}
            for mode in MODES:
                print(f"moco-bench all: {mode}", file=sys.stderr, flush=True)
                records[mode] = _run(mode, args)
                records[mode].update(date=time.strftime("%Y-%m-%d"))
            record = {"mode": "all", "records": records}
        else:
            record = _run(args.mode, args)
    except ValueError as exc:
        print(f"moco-bench: error: {exc}", file=sys.stderr)
        return 2
    record.update(date=time.strftime("%Y-%m-%d"), machine=describe())
    if record["mode"] == "all":
        for sub in record["records"].values():
            sub["machine"] = record["machine"]
    _print(record)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    if args.chart:
        print(f"wrote {chart(record, args.chart)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
