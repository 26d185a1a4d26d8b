"""The DALI side of a timed run: one epoch across every timed window, and what a new epoch costs.

``ViewLoader`` builds a new pipeline per epoch (a new deal of shards); over a benchmark folder
of a few batches that rebuild would land inside the timed windows. So DALI reads a view of the
folder listing each shard several times under linked names (the same bytes, the same page
cache), and ``epoch_reopens`` measures a new epoch's cost apart.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from ...common.files import write_json_atomic
from ...pipeline import shards

__all__ = ["draws", "view_folder", "Epochs", "epoch_reopens"]


def draws(args, backlog: int) -> int:
    """Batches a contender's feed gives over a run: the warm-up, then before each window a drained backlog."""
    return backlog + args.options.warmup + args.options.reps * (backlog + args.options.batches) + 1


def view_folder(
    folder: Path, min_samples: int, max_samples: Optional[int] = None
) -> tuple[Path, dict]:
    """``folder`` itself, or a shard folder of links to its shards holding ``min_samples`` or more.

    With more than ``max_samples`` in ``folder``, the view lists its first shards up to
    ``min_samples``; with fewer than ``min_samples``, every shard ``copies`` times.
    """
    manifest = shards.load_manifest(folder)
    counts, entries = manifest.counts, manifest.data["shards"]
    total = int(counts.sum())
    describe = {"view_of": str(folder), "shards": len(entries), "copies": 1, "samples": total}
    if min_samples <= total <= (max_samples or total):
        return Path(folder), describe
    if total > min_samples:  # a prefix of whole shards
        kept = int((counts.cumsum() < min_samples).sum()) + 1
        entries, copies = entries[:kept], 1
    else:
        copies = math.ceil(min_samples / total)
    view = Path(tempfile.mkdtemp(prefix="moco-bench-view-"))
    atexit.register(shutil.rmtree, view, True)
    listed = []
    for copy in range(copies):
        for entry in entries:
            named = dict(
                entry,
                tar=f"c{copy:04d}-{Path(entry['tar']).name}",
                index=f"c{copy:04d}-{Path(entry['index']).name}",
            )
            for key in ("tar", "index"):
                _link(manifest.path(entry[key]), view / named[key])
            listed.append(named)
    samples = sum(int(e["samples"]) for e in listed)
    write_json_atomic(
        view / shards.MANIFEST_NAME,
        {
            **manifest.data,
            "shards": listed,
            "samples": samples,
            "inputs": samples,
            "rejected": 0,
            "rejected_reasons": {},
            "view": {"of": str(folder), "copies": copies},
        },
    )
    return view, {**describe, "shards": len(listed), "copies": copies, "samples": samples}


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        os.symlink(source.resolve(), target)


class Epochs:
    """A ``ViewLoader``'s batches for ever, each pass its next epoch, counting the DALI pipelines it opened."""

    def __init__(self, loader, convert: Callable = lambda batch: batch):
        self.loader, self.convert, self.opened = loader, convert, 0

    def __iter__(self):
        where = None
        while True:
            for batch in self.loader:
                # A new (epoch, window) is a new pipeline, built while this batch was awaited.
                if (self.loader.epoch, self.loader.window) != where:
                    where = (self.loader.epoch, self.loader.window)
                    self.opened += 1
                yield self.convert(batch)


def epoch_reopens(
    make_loader: Callable,
    folder: Path,
    batch: int,
    prefetch: int,
    sync: Callable[[], None],
    reopens: int = 3,
) -> dict:
    """Median wait for an epoch's first batch, less the steady time per batch, over ``reopens`` new epochs.

    ``make_loader(folder)`` builds a ``ViewLoader`` as the benchmark does (its first
    pipeline, built with it, is not counted). Its epochs are short (a view of at most
    50 batches), so that several pass quickly; the steady time is that of the batches
    after the first few of each epoch (those came from the prefetch queue, filled
    while the first was awaited).
    """
    skip = 1 + prefetch
    view, described = view_folder(folder, (skip + 4) * batch, 50 * batch)
    loader = make_loader(view)
    first_s, steady_s = [], []
    for epoch in range(reopens + 1):
        started = time.perf_counter()
        batches = iter(loader)
        next(batches)
        sync()
        last = time.perf_counter()
        if epoch:
            first_s.append(last - started)
        for i, _ in enumerate(batches, start=1):
            sync()
            now = time.perf_counter()
            if i >= skip:
                steady_s.append(now - last)
            last = now
    steady = statistics.median(steady_s)
    return {
        "dali_epoch_reopen_s": statistics.median(first_s) - steady,
        "dali_epoch_first_batch_s": first_s,
        "dali_steady_batch_s": steady,
        "batches_per_epoch": len(loader),
        "folder": described,
    }
