"""How ``moco-bench`` measures (``BenchOptions``), and what each mode measures when not told.

What is measured is the training tree itself (``--preset``, ``--config``, ``--data.batch_size``
...: the same keys as ``moco-train``), so a run's own configuration can be benchmarked as it
is. ``mode_defaults`` holds the configurations each mode's goal is stated for, and the smaller
ones a CPU can measure in minutes; keys the user gives, on the command line or in a file,
always win.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ...common.options import option
from ...train.config import Config
from ...train.step import amp_dtype, views_dtype

__all__ = [
    "MODES",
    "OPTIONAL_MODES",
    "BenchOptions",
    "Measure",
    "mode_defaults",
    "machine_defaults",
]

MODES = ("pipeline", "momentum", "step", "e2e", "shards")
"""What ``all`` runs."""
OPTIONAL_MODES = ("views",)
"""``all --modes`` may name them; plain ``all`` leaves them out."""


@dataclass
class BenchOptions:
    """How a benchmark measures; a value left None takes the machine's default (GPU or CPU)."""

    device: Optional[str] = None
    """Where to measure (default: cuda:0 where a GPU is, else cpu)."""
    reps: int = 3
    """Alternating repetitions (the median is reported)."""
    out: Optional[Path] = None
    """Write the JSON record here."""
    chart: Optional[Path] = None
    """Draw the headline figures as a PNG here."""
    shards: Optional[Path] = None
    """Shard folder to read (default: --synthetic photos)."""
    synthetic: Optional[int] = option(None, metavar="N")
    """Without --shards: generate N ImageNet-like JPEGs (~500x375, ~110 KB) and shard them
    (default 2000 on a GPU, 200 on a CPU)."""
    batches: Optional[int] = None
    """Timed batches per repetition (default 50 on a GPU, 3 on a CPU); with --window-s, the most."""
    window_s: Optional[float] = None
    """Size each timed window to about this many seconds of its contender's warm-up rate (at
    least 3 batches, at most --batches), so a slow reference cannot stretch a mode past its
    time (default 4 on a GPU; on a CPU windows are --batches long)."""
    warmup: Optional[int] = None
    """Untimed batches first (default 10 on a GPU, 1 on a CPU)."""
    workers: Optional[int] = None
    """Reference DataLoader workers (default: the cores)."""
    calls: Optional[int] = None
    """momentum: timed calls per repetition (default 20 on a GPU, 5 on a CPU)."""
    photos: Optional[Path] = None
    """shards: folder of *.jpg to build from (default: the --synthetic photos)."""
    build_workers: Optional[str] = None
    """shards: comma-separated worker counts (default 1, 2, 4, ... cores)."""
    modes: str = ",".join(MODES)
    """all: comma-separated modes to run, in this order, from pipeline, momentum, step, e2e, shards,
    views."""
    growth: Optional[str] = option(None, metavar="N,...")
    """index: also index's peak memory at these sample counts (e.g. 1e4,1e5,1e6: tiny JPEGs,
    1,000 to a tar)."""
    store: Optional[str] = option(None, metavar="URL")
    """store: s3://bucket/prefix holding a push of --shards (default: a local endpoint with the
    link below, moto in a process of its own)."""
    bandwidth_mb_s: float = 100.0
    """store: the local endpoint's bandwidth for this rank, all its connections together."""
    latency_ms: float = 50.0
    """store: the local endpoint's wait before each GET's first byte."""
    root: Optional[Path] = None
    """scale: where to write the folders (default: a temporary folder)."""
    folders: Optional[str] = option(None, metavar="N:S,...")
    """scale: samples:shards per folder (default 1e4:100,1e5:1e3,1e6:1e3,1e6:1e5)."""
    worlds: str = "1,8,64"
    """scale: world sizes; rank 0 and the last rank of each are measured."""
    pipeline_from: Optional[Path] = option(None, metavar="DIR")
    """scale: measure DIR/pipeline (another checkout) instead of this one's."""
    sizes: str = "1e5,1e6"
    """scale-build: comma-separated input counts."""
    parts: str = "1,100"
    """scale-build: comma-separated part counts (part 0 is measured)."""
    kinds: str = "list"
    """scale-build: comma-separated sources: list (a list file), folder (empty files)."""

    def __post_init__(self) -> None:
        for name in ("reps", "synthetic", "batches", "warmup", "workers", "calls"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1, got {value}")
        if not 0 < self.bandwidth_mb_s <= 1e6:
            raise ValueError(f"--bandwidth-mb-s must be in (0, 1e6], got {self.bandwidth_mb_s}")
        if not 0 <= self.latency_ms <= 60_000:
            raise ValueError(f"--latency-ms must be in [0, 60000], got {self.latency_ms}")
        if self.window_s is not None and not 0 < self.window_s <= 600:
            raise ValueError(f"--window-s must be in (0, 600] seconds, got {self.window_s}")


def machine_defaults(options: BenchOptions, gpu: bool) -> BenchOptions:
    """``options`` with every None filled for this machine (``--batches`` given alone keeps
    windows of exactly that many batches)."""
    cores = len(os.sched_getaffinity(0))
    fixed_batches = options.batches is not None
    filled = {
        "device": "cuda:0" if gpu else "cpu",
        "synthetic": 2000 if gpu else 200,
        "batches": 50 if gpu else 3,
        "warmup": 10 if gpu else 1,
        "workers": cores,
        "calls": 20 if gpu else 5,
        "window_s": 4.0 if gpu else None,
    }
    for name, value in filled.items():
        if getattr(options, name) is None and not (name == "window_s" and fixed_batches):
            setattr(options, name, value)
    return options


def mode_defaults(mode: str, gpu: bool) -> dict[str, Any]:
    """The keys a mode measures unless told otherwise, under the preset's (v2 by default).

    On a GPU the goals' own configuration: ResNet-50, batch 256, 224 px, K 65536. On a CPU,
    where that would take hours, ResNet-18 at 112 px in batches of 16 with K 4096. The momentum
    update is always ResNet-50's (its goal is a ratio, measurable anywhere); the pipeline hands
    over float16 views as on a GPU; the scale mode's ranks take batches of 64 on two threads.
    """
    keys: dict[str, Any] = {}
    if mode in ("pipeline", "views", "store"):
        keys["data.dtype"] = "float16"
    if mode == "scale":
        return {"data.batch_size": 64, "data.threads": 2}
    if not gpu and mode in ("pipeline", "views", "step", "e2e", "store"):
        keys.update(
            {
                "data.batch_size": 16,
                "data.views.size": 112,
                "model.arch": "resnet18",
                "model.K": 4096,
            }
        )
    return keys


@dataclass
class Measure:
    """One mode's measurement: what (``tree``), how (``options``), and what the modes of one run
    share (the generated photos and their shards, made once)."""

    options: BenchOptions
    tree: Config
    shared: dict = field(default_factory=dict)

    @property
    def device(self) -> str:
        return self.options.device

    @property
    def views_dtype(self) -> str:
        """The views' dtype the tree asks for on this device (``data.dtype``, by the engine's rule)."""
        amp = amp_dtype(self.tree.run.amp, torch.device(self.device))
        return views_dtype(self.tree.data.dtype, amp)
