"""``moco-bench``: throughput benchmarks, this project's path beside the reference path.

Modes so far:

* ``pipeline``: image pairs per second delivered to the training device by the DALI
  view pipeline and by the reference loader (PIL and torchvision in DataLoader
  workers), over the same shards, alternating, with peak memory.
* ``momentum``: the key encoder's momentum update (fused multi-tensor kernels against
  the reference per-parameter loop and against the memory-bandwidth floor), plus the
  two other per-step dictionary costs at K = 65536: the enqueue and the negative-logit
  matmul.

Every mode warms up, alternates the contenders, reports medians with their spread,
prints a table and writes JSON with the machine and the configuration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from model import momentum
from model.encoders import add_mlp_head, resnet
from model.queue import KeyQueue
from tools.machine import describe

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
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": len(times)}


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

    bandwidth = copy_bandwidth(device, reps=max(5, args.reps // 5), mib=args.copy_mib)
    floor_ms = 3 * param_bytes / bandwidth * 1e3  # read theta_k and theta_q, write theta_k

    # Alternate the implementations, a few calls each round, so drift hits all alike.
    runs: dict[str, list[float]] = {name: [] for name in implementations}
    for name in implementations:
        time_ms(lambda: momentum.momentum_update_(key, query, 0.999, name), device, 1, warmup=3)
    for _ in range(args.rounds):
        for name in implementations:
            runs[name] += time_ms(lambda: momentum.momentum_update_(key, query, 0.999, name), device, args.reps,
                                  warmup=1)
    results = {name: _summary(t) for name, t in runs.items()}

    queue = KeyQueue(args.K, 128).to(device)
    keys = torch.nn.functional.normalize(torch.randn(args.batch, 128, device=device), dim=1)
    q = torch.nn.functional.normalize(torch.randn(args.batch, 128, device=device), dim=1)
    enqueue = _summary(time_ms(lambda: queue.enqueue(keys), device, args.reps * args.rounds))
    negatives = _summary(time_ms(lambda: q @ queue.keys().t(), device, args.reps * args.rounds))

    best = min((n for n in implementations if n != "loop"), key=lambda n: results[n]["median_ms"])
    return {
        "mode": "momentum",
        "config": {"arch": args.arch, "mlp_head": args.mlp, "parameters": sum(p.numel() for p in params),
                   "tensors": len(params), "param_bytes": param_bytes, "K": args.K, "batch": args.batch,
                   "reps": args.reps, "rounds": args.rounds, "device": str(device)},
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


def _synthetic_shards(count: int, work: Path) -> tuple[Path, dict]:
    from tools.build import BuildSettings, build
    from tools.photoset import fetch_debian_photos, make_photoset

    sources = fetch_debian_photos(work / "sources")
    info = make_photoset(sources, work / "photos", count)
    build([str(work / "photos")], work / "shards", BuildSettings(max_count=1000), progress=False)
    return work / "shards", info


def bench_pipeline(args) -> dict:
    import tempfile

    from pipeline.augment import preset
    from pipeline.loader import LoaderConfig, ViewLoader
    from pipeline.reference import reference_loader

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    photoset = None
    if args.shards is None:
        work = Path(tempfile.mkdtemp(prefix="moco-bench-"))
        args.shards, photoset = _synthetic_shards(args.synthetic, work)
    cfg = preset(args.preset, args.size, hue_space=args.hue_space)
    dali = ViewLoader(args.shards, cfg, LoaderConfig(batch_size=args.batch, dtype=args.dtype, threads=args.threads,
                                                     hw_decoder_load=args.hw_decoder_load, labels=False),
                      device_id=device.index or 0 if gpu else None)
    contenders = {
        "dali": _forever(lambda: ((b.view_q, b.view_k) for b in dali)),
        "reference": _forever(lambda: reference_loader(args.shards, cfg, args.batch, workers=args.workers,
                                                       device=device)),
    }

    def run(stream, batches: int) -> float:
        start = time.perf_counter()
        for _ in range(batches):
            view_q, view_k = next(stream)
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
    return {
        "mode": "pipeline",
        "config": {"shards": str(args.shards), "samples": dali.samples, "preset": args.preset, "size": args.size,
                   "augment": cfg.to_dict(), "batch": args.batch, "batches": args.batches, "warmup": args.warmup,
                   "reps": args.reps, "dtype": args.dtype, "dali_threads": args.threads or "default",
                   "reference_workers": args.workers, "hw_decoder_load": args.hw_decoder_load if gpu else None,
                   "device": str(device), "decoder": "mixed (nvJPEG)" if gpu else "cpu (libjpeg-turbo)"},
        "photoset": photoset,
        "results": results,
        "dali_over_reference": results["dali"]["pairs_per_s"] / results["reference"]["pairs_per_s"],
        "memory": _peak_memory(device),
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
    print(f"DALI / reference: {r['dali_over_reference']:.2f}x; memory: "
          + ", ".join(f"{k} {v:.0f}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in r["memory"].items()))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="moco-bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    gpu = torch.cuda.is_available()
    cores = len(__import__("os").sched_getaffinity(0))
    p = sub.add_parser("pipeline", help="view pairs/s of the DALI pipeline beside the reference loader")
    p.add_argument("--shards", type=Path, default=None, help="shard folder (default: --synthetic photos)")
    p.add_argument("--synthetic", type=int, default=2000, metavar="N",
                   help="without --shards: build N ImageNet-like photos from Debian's photographs")
    p.add_argument("--preset", choices=["v1", "v2"], default="v2")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256 if gpu else 32)
    p.add_argument("--batches", type=int, default=100 if gpu else 10, help="timed batches per rep")
    p.add_argument("--warmup", type=int, default=10 if gpu else 2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--hue-space", choices=["hsv", "yiq"], default="hsv",
                   help="DALI hue: exact HSV shift (default) or DALI's cheaper YIQ rotation")
    p.add_argument("--threads", type=int, default=None, help="DALI CPU threads (default: all cores)")
    p.add_argument("--workers", type=int, default=cores, help="reference DataLoader workers")
    p.add_argument("--hw-decoder-load", type=float, default=0.75)
    p.add_argument("--device", default="cuda:0" if gpu else "cpu")
    p.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    m = sub.add_parser("momentum", help="momentum update vs the per-parameter loop and the bandwidth floor")
    m.add_argument("--arch", default="resnet50")
    m.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=True, help="MoCo v2's MLP head")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    m.add_argument("--reps", type=int, default=None, help="timed calls per round (default 20 on GPU, 5 on CPU)")
    m.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    m.add_argument("--K", type=int, default=65536)
    m.add_argument("--batch", type=int, default=256, help="keys enqueued per step (the global batch)")
    m.add_argument("--copy-mib", type=int, default=None, help="size of the bandwidth probe (default 1024 GPU, 256 CPU)")
    m.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    if args.mode == "momentum":
        on_gpu = args.device.startswith("cuda")
        args.reps = args.reps or (20 if on_gpu else 5)
        args.copy_mib = args.copy_mib or (1024 if on_gpu else 256)
        record = bench_momentum(args)
        printer = print_momentum
    else:
        record = bench_pipeline(args)
        printer = print_pipeline
    record.update(date=time.strftime("%Y-%m-%d"), machine=describe())
    printer(record)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
