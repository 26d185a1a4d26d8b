"""What every ``moco-bench`` mode shares: timing, memory, and the data it measures on.

Timing is wall time after a warm-up (CUDA events on a GPU), reported as a median
with its spread; data is the user's shards or generated ImageNet-like photos,
sharded once per run.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["sync", "time_ms", "copy_bandwidth", "summary", "forever", "peak_memory", "synthetic_photos",
           "shards_for"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 3) -> list[float]:
    """Wall time of ``fn`` in ms, ``reps`` times after ``warmup`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
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


def summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "calls": len(times)}


def forever(make_iterator):
    while True:
        yield from make_iterator()


def peak_memory(device: torch.device) -> dict:
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


def synthetic_photos(args) -> tuple[Path, dict]:
    """Generated ImageNet-like JPEGs (``moco_dali.tools.bench.synthetic``), made once per run."""
    if getattr(args, "_photos", None) is None:
        from moco_dali.tools.bench.synthetic import generate

        work = Path(tempfile.mkdtemp(prefix="moco-bench-"))
        info = generate(work / "photos", args.synthetic, seed=0)
        args._photos = (work / "photos", info)
    return args._photos


def shards_for(args) -> tuple[Path, Optional[dict]]:
    """The user's shards, or shards built from the synthetic photos (once per run)."""
    if args.shards is not None:
        return args.shards, None
    if getattr(args, "_built", None) is None:
        from moco_dali.tools.shards.build import BuildSettings, build

        photos, info = synthetic_photos(args)
        build([str(photos)], photos.parent / "shards", BuildSettings(max_count=1000), progress=False)
        args._built = (photos.parent / "shards", info)
    return args._built
