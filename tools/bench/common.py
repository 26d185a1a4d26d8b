"""What every ``moco-bench`` mode shares: timing, memory, and the data it measures on.

Timing is wall time after a warm-up (CUDA events on a GPU), reported as a median
with its spread; data is the user's shards or generated ImageNet-like photos,
sharded once per run.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch

from ...pipeline import shards as shard_format
from ...pipeline.reference import reference_loader, worker_split
from ..shards.build import build
from ..shards.settings import BuildSettings
from .synthetic import generate

__all__ = [
    "window_batches",
    "windows",
    "sync",
    "time_ms",
    "summary",
    "rates",
    "Feed",
    "timed_window",
    "warm_up",
    "settle",
    "peak_memory",
    "synthetic_photos",
    "shards_for",
    "reference_feed",
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 3
) -> list[float]:
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


def summary(times: list[float]) -> dict:
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "calls": len(times),
    }


def rates(count: int, seconds: list[float], unit: str) -> dict:
    """``count`` items per window of ``seconds``: the median rate with its spread (``{unit}_per_s`` and its min, max)."""
    return {
        f"{unit}_per_s": statistics.median(count / t for t in seconds),
        f"{unit}_per_s_min": count / max(seconds),
        f"{unit}_per_s_max": count / min(seconds),
        "seconds": seconds,
    }


class Feed:
    """A batch source for a timed loop: built once, outside the timing, and repeating for ever.

    ``backlog`` is how many batches it prepares ahead (DataLoader workers x their
    prefetch factor, DALI's prefetch queue). After an idle spell those are ready at
    once, which would make a short timed window look faster than the source is, and
    refilling them takes the CPU from whatever runs meanwhile: ``settle`` deals with both.
    """

    def __init__(self, batches: Iterator, backlog: int = 0):
        self._batches, self.backlog = batches, backlog
        self.batches_per_s: Optional[float] = None  # last measured rate: how long a refill takes
        self.refilling = False

    def __iter__(self) -> "Feed":
        return self

    def __next__(self):
        return next(self._batches)

    def consumed(self, batches: int, seconds: float) -> None:
        """Record a timed window: its rate, and that the backlog now refills."""
        self.batches_per_s = batches / max(seconds, 1e-9)
        self.refilling = self.backlog > 0


def timed_window(feed: Feed, batches: int, device: torch.device) -> float:
    """Seconds for ``feed`` to give ``batches`` batches, the device's queued work included; kept as its rate."""
    start = time.perf_counter()
    for _ in range(batches):
        next(feed)
    sync(device)
    seconds = time.perf_counter() - start
    feed.consumed(batches, seconds)
    return seconds


def warm_up(feeds: Iterable[Feed], batches: int, device: torch.device) -> None:
    """Every feed's workers started and delivering (its backlog taken), then a rate to settle by."""
    for feed in feeds:
        for _ in range(feed.backlog):
            next(feed)
        timed_window(feed, batches, device)


def settle(feed: Optional[Feed], feeds: Iterable[Feed], max_wait_s: float = 30.0) -> float:
    """Bring ``feed`` to its steady state before a timed window; return the seconds spent waiting.

    First wait until every other feed has refilled its backlog after its own last
    window (its workers then sit idle instead of competing for the CPU), then drain
    ``feed``'s backlog untimed, so that the window starts with its workers busy and
    nothing ready: what it then measures is the rate the source sustains.
    """
    others = [f for f in feeds if f is not feed]
    waits = [f.backlog / f.batches_per_s for f in others if f.refilling and f.batches_per_s]
    wait_s = min(max(waits, default=0.0), max_wait_s)
    if wait_s > 0:
        time.sleep(wait_s)
    for f in others:
        f.refilling = False
    if feed is not None:
        for _ in range(feed.backlog):
            next(feed)
    return wait_s


def window_batches(warmup_batches: int, warmup_s: float, options) -> int:
    """Batches in one timed window: ``--batches``, or with ``--window-s`` as many as the warm-up's
    rate fills that many seconds with (at least 3, at most ``--batches``), so that a slow
    contender (the reference loader) does not stretch a run past its time."""
    if not options.window_s:
        return options.batches
    fill = math.ceil(options.window_s * warmup_batches / max(warmup_s, 1e-9))
    return max(3, min(options.batches, fill))


def windows(runs: dict, groups: list[list[str]], reps: int, batches: dict[str, int]) -> dict:
    """Timed windows, ``{name: [(seconds, wait), ...]}``: the names of a group alternate for
    ``reps`` rounds, the groups one after the other.

    ``runs`` maps a name to ``(feed, timed)``; ``timed(batches)`` returns ``(seconds, wait)``.
    A window that follows another of the same feed starts as the steady state left it; any other
    first settles its feed (``settle``: the backlog drained untimed, the other feeds' refills
    waited for). A feed that is slow to refill (the reference loader) is best a group of its
    own: its windows then run back to back, neither starved nor pre-filled, and no other feed
    waits for its refills.
    """
    feeds = [feed for feed, _ in runs.values()]
    timed = {name: [] for name in runs}
    previous = None
    for group in groups:
        for _ in range(reps):
            for name in group:
                feed, window = runs[name]
                if feed is not previous:
                    settle(feed, feeds)
                timed[name].append(window(batches[name]))
                previous = feed
    return timed


def peak_memory(device: torch.device) -> dict:
    """Peak memory of this process: GPU (through NVML, which sees DALI's pools too) and host RSS."""
    memory = {"host_peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        memory["torch_peak_allocated_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
        try:
            import pynvml  # optional: not in the lock, used where the machine has it

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            used = [
                p.usedGpuMemory
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                if p.pid == os.getpid()
            ]
            memory["gpu_process_MB"] = used[0] / 2**20 if used and used[0] else None
        except Exception as exc:  # NVML is optional; say why the figure is missing
            memory["gpu_process_MB"] = f"unavailable: {exc}"
    return memory


def synthetic_photos(args) -> tuple[Path, dict]:
    """Generated ImageNet-like JPEGs (``moco_dali.tools.bench.synthetic``), made once per run."""
    if "photos" not in args.shared:
        work = Path(tempfile.mkdtemp(prefix="moco-bench-"))
        info = generate(work / "photos", args.options.synthetic, seed=0)
        args.shared["photos"] = (work / "photos", info)
    return args.shared["photos"]


def shards_for(args) -> tuple[Path, Optional[dict]]:
    """The user's shards, or shards built from the synthetic photos (once per run).

    Generated photos are cut into at least as many shards as the reference loader has
    workers, so that each of them reads whole shards of its own, as on a real data set.
    """
    if args.options.shards is not None:
        return args.options.shards, None
    if "shards" not in args.shared:
        photos, info = synthetic_photos(args)
        per_shard = max(1, min(1000, args.options.synthetic // max(1, args.options.workers or 1)))
        build(
            [str(photos)],
            photos.parent / "shards",
            BuildSettings(max_count=per_shard),
            progress=False,
        )
        args.shared["shards"] = (photos.parent / "shards", info)
    return args.shared["shards"]


def reference_feed(
    shards: Path,
    cfg,
    batch_size: int,
    workers: int,
    device: torch.device,
    layout: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> tuple[Feed, dict]:
    """The reference loader as a ``Feed`` (started now, repeating), and how it shares the shards.

    ``layout`` is applied to both views of each batch (the step's dtype and memory format).
    """
    loader = reference_loader(shards, cfg, batch_size, workers=workers, device=device, repeat=True)
    if layout is not None:
        loader = ((layout(view_q), layout(view_k)) for view_q, view_k in loader)
    # DataLoader's default prefetch: two batches per worker.
    split = worker_split(len(shard_format.discover(shards)[1]), workers)
    return Feed(loader, backlog=2 * workers), {
        "reference_workers": workers,
        "reference_split": split,
    }
