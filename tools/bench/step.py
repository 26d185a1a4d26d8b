"""``moco-bench step`` and ``e2e``: images/s of the training step, this project's against the reference's.

``step`` times the step on synthetic tensors already on the device (its ceiling); ``e2e`` feeds
it real shards through the data path, beside the synthetic step, and gives the data-wait share
and a verdict. "Ours" is ``moco-train``'s step (``train.step``) on the measured tree, fed by
DALI; "reference" is the original code's configuration (float32, NCHW, the momentum loop,
PyTorch's default SGD) fed by the torchvision loader. Same model, batch, queue, split BN.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from ...model.momentum import resolve_implementation
from ...pipeline import shards as shard_format
from ...pipeline.config import LoaderConfig
from ...pipeline.loader import ViewLoader
from ...train.step import (
    amp_dtype,
    backward_step,
    build_model,
    build_optimizer,
    forward_loss,
    views_dtype,
)
from .common import Feed, rates, reference_feed, settle, sync
from .epochs import Epochs, draws, epoch_reopens, view_folder
from .pipeline import TIMING, print_reopen

__all__ = ["Contender", "bench_step", "bench_e2e", "print_step", "print_e2e"]


class Contender:
    """A model, optimizer and input layout: ours (``reference=False``) or the reference configuration."""

    def __init__(self, args, reference: bool):
        self.device = torch.device(args.device)
        self.name = "reference" if reference else "ours"
        # The tree being measured, on one device: split BN stands for shuffle-BN across GPUs.
        config = copy.deepcopy(args.tree)
        config.model.shuffle = "split"
        if reference:
            config.run.amp, config.run.channels_last, config.run.compile = "none", False, False
        self.config = config
        self.amp = amp_dtype(config.run.amp, self.device)
        self.channels_last = config.run.channels_last
        # What the data path hands over, by the engine's rule.
        self.views_dtype = views_dtype(config.data.dtype, self.amp)
        self.input_dtype = {"float16": torch.float16, "float32": torch.float32}[self.views_dtype]
        torch.manual_seed(0)
        self.model = build_model(config, self.device, momentum_impl="loop" if reference else "auto")
        if config.run.compile:
            self.model.encoder_q = torch.compile(self.model.encoder_q)
            self.model.encoder_k = torch.compile(self.model.encoder_k)
        self.optimizer = build_optimizer(config, self.model, self.device, fast=not reference)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.peak_MB = 0.0

    def describe(self) -> dict:
        return {
            "amp": str(self.amp).replace("torch.", "") if self.amp else "none",
            "channels_last": self.channels_last,
            "input_dtype": str(self.input_dtype).replace("torch.", ""),
            "momentum_impl": resolve_implementation(self.model.momentum_impl),
            "optimizer": type(self.optimizer).__name__
            + (
                " (fused)"
                if self.optimizer.defaults.get("fused")
                else " (foreach)"
                if self.optimizer.defaults.get("foreach")
                else " (torch default)"
            ),
            "compile": self.config.run.compile,
        }

    def layout(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, self.input_dtype, non_blocking=True)
        return images.contiguous(
            memory_format=torch.channels_last if self.channels_last else torch.contiguous_format
        )

    def synthetic(self, batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(device=self.device).manual_seed(1)
        return tuple(
            self.layout(torch.randn(batch, 3, size, size, device=self.device, generator=g))
            for _ in range(2)
        )

    def step(self, view_q: torch.Tensor, view_k: torch.Tensor) -> None:
        loss, _, _ = forward_loss(self.model, view_q, view_k, self.amp)
        self.optimizer.zero_grad(set_to_none=True)
        backward_step(loss, self.optimizer, self.scaler, skip_nonfinite=self.name == "ours")

    def timed(self, batches: Feed, steps: int) -> tuple[float, float]:
        """Seconds for ``steps`` steps over ``batches``, and the seconds spent waiting for them."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        sync(self.device)
        wait = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            ready = time.perf_counter()
            view_q, view_k = next(batches)
            wait += time.perf_counter() - ready
            self.step(view_q, view_k)
        sync(self.device)
        seconds = time.perf_counter() - start
        batches.consumed(steps, seconds)
        if self.device.type == "cuda":
            self.peak_MB = max(self.peak_MB, torch.cuda.max_memory_allocated(self.device) / 2**20)
        return seconds, wait


def _repeat(pair) -> Feed:
    return Feed(itertools.repeat(pair))


def _alternate(
    runs: dict[str, tuple[Contender, Feed]], args, timing_starts: Callable[[], None] = lambda: None
) -> dict[str, dict]:
    feeds = [feed for _, feed in runs.values()]
    for contender, feed in runs.values():
        for _ in range(feed.backlog):  # every worker started and delivering
            next(feed)
        contender.timed(feed, args.options.warmup)
    seconds = {name: [] for name in runs}
    waits = {name: [] for name in runs}
    timing_starts()
    for _ in range(args.options.reps):
        for name, (contender, feed) in runs.items():
            settle(feed, feeds)
            s, w = contender.timed(feed, args.options.batches)
            seconds[name].append(s)
            waits[name].append(w)
    images = args.options.batches * args.tree.data.batch_size
    return {
        name: {
            **rates(images, ts, "images"),
            "data_wait": statistics.median(w / s for w, s in zip(waits[name], ts)),
        }
        for name, ts in seconds.items()
    }


def _config_record(args, contenders: list[Contender]) -> dict:
    return {
        "arch": args.tree.model.arch,
        "batch": args.tree.data.batch_size,
        "size": args.tree.data.views.size,
        "K": args.tree.model.K,
        "batches": args.options.batches,
        "warmup": args.options.warmup,
        "reps": args.options.reps,
        "device": args.device,
        "preset": args.tree.data.preset,
        "shuffle_bn": "split",
        **{c.name: c.describe() for c in contenders},
    }


def bench_step(args) -> dict:
    contenders = [Contender(args, reference=False), Contender(args, reference=True)]
    runs = {
        c.name: (c, _repeat(c.synthetic(args.tree.data.batch_size, args.tree.data.views.size)))
        for c in contenders
    }
    results = _alternate(runs, args)
    for c in contenders:
        results[c.name]["peak_memory_MB"] = c.peak_MB or None
    return {
        "mode": "step",
        "config": _config_record(args, contenders),
        "results": results,
        "ours_over_reference": results["ours"]["images_per_s"]
        / results["reference"]["images_per_s"],
        "goals": {"gpu_images_per_s": 3500},
    }


def _verdict(e2e: dict, ceiling: dict, device: torch.device) -> tuple[str, str]:
    fraction = e2e["images_per_s"] / ceiling["images_per_s"]
    if fraction >= 0.95:
        return "compute-bound", (
            f"the data path keeps up ({100 * fraction:.0f}% of the synthetic step); "
            "look at the step: AMP, torch.compile, batch size"
        )
    if e2e["data_wait"] >= 0.1:
        return "input-bound", (
            f"steps wait {100 * e2e['data_wait']:.0f}% of the time for their batch "
            f"({100 * fraction:.0f}% of the synthetic step); look at the data path with "
            "`moco-bench pipeline`: decoder load, threads, prefetch, the CPU stages"
        )
    if device.type == "cpu":
        return "input-bound", (
            f"{100 * fraction:.0f}% of the synthetic step with little data wait "
            f"({100 * e2e['data_wait']:.0f}%): on a CPU the pipeline's threads run on the cores "
            "the step uses, so the time lost is most likely their decoding and augmentation; "
            "`moco-bench pipeline` measures it alone"
        )
    return "overhead-bound", (
        f"{100 * fraction:.0f}% of the synthetic step with little data wait "
        f"({100 * e2e['data_wait']:.0f}%): the time goes between the two, in host "
        "copies or synchronisation; profile the loop"
    )


def bench_e2e(args, shards: str) -> dict:
    contenders = [Contender(args, reference=False), Contender(args, reference=True)]
    ours, reference = contenders
    device = torch.device(args.device)
    cfg = args.tree.data.views
    loader_config = LoaderConfig(
        batch_size=args.tree.data.batch_size,
        labels=False,
        dtype=ours.views_dtype,
        read=args.tree.data.read,
    )

    def make_loader(folder):
        return ViewLoader(
            folder,
            cfg,
            loader_config,
            device_id=(device.index or 0) if device.type == "cuda" else None,
        )

    # Both loaders are built and started here, once, and repeat for the whole run; DALI's
    # one epoch holds every batch the run draws, so that no window pays for a new epoch.
    view, view_info = view_folder(
        Path(shards), draws(args, loader_config.read.prefetch) * args.tree.data.batch_size
    )
    loader = make_loader(view)
    epochs = Epochs(loader, lambda b: (ours.layout(b.view_q), ours.layout(b.view_k)))
    dali = Feed(iter(epochs), backlog=loader_config.read.prefetch)
    torchvision, reference_config = reference_feed(
        Path(shards),
        cfg,
        args.tree.data.batch_size,
        args.options.workers,
        device,
        layout=reference.layout,
    )
    runs = {
        "step_ours": (
            ours,
            _repeat(ours.synthetic(args.tree.data.batch_size, args.tree.data.views.size)),
        ),
        "step_reference": (
            reference,
            _repeat(reference.synthetic(args.tree.data.batch_size, args.tree.data.views.size)),
        ),
        "e2e_ours": (ours, dali),
        "e2e_reference": (reference, torchvision),
    }
    opened = {}
    results = _alternate(runs, args, timing_starts=lambda: opened.update(before=epochs.opened))
    opened_while_timing = epochs.opened - opened["before"]
    # What a new epoch costs, which the timed windows above no longer include.
    settle(None, [feed for _, feed in runs.values()])
    reopen = epoch_reopens(
        make_loader,
        Path(shards),
        args.tree.data.batch_size,
        loader_config.read.prefetch,
        lambda: sync(device),
    )
    results["e2e_ours"]["peak_memory_MB"] = ours.peak_MB or None
    results["e2e_reference"]["peak_memory_MB"] = reference.peak_MB or None
    verdict, advice = _verdict(results["e2e_ours"], results["step_ours"], device)
    config = _config_record(args, contenders)
    original = shard_format.load_manifest(
        shards
    )  # what the record describes, whatever the DALI view lists
    config.update(
        shards=str(shards),
        samples=original.samples,
        shard_files=len(original.counts),
        dali_data={**view_info, "epoch_batches": len(loader)},
        hue_space=args.tree.data.views.hue_space,
        dali_threads=args.tree.data.read.threads or "default",
        **reference_config,
        decoder="mixed (nvJPEG)" if device.type == "cuda" else "cpu (libjpeg-turbo)",
        timing=TIMING,
    )
    return {
        "mode": "e2e",
        "config": config,
        "results": results,
        "e2e_over_step": results["e2e_ours"]["images_per_s"] / results["step_ours"]["images_per_s"],
        "ours_over_reference": results["e2e_ours"]["images_per_s"]
        / results["e2e_reference"]["images_per_s"],
        "verdict": verdict,
        "advice": advice,
        "dali_pipelines_opened_while_timing": opened_while_timing,
        "dali_epoch_reopen_s": reopen.pop("dali_epoch_reopen_s"),
        "dali_epoch_reopen": reopen,
        "goals": {"e2e_over_step": 0.95, "ours_over_reference": 8.0},
    }


def _table(results: dict[str, dict]) -> None:
    print(
        f"{'run':16s} {'images/s':>10s} {'min':>9s} {'max':>9s} {'data wait':>10s} {'peak MB':>9s}"
    )
    for name, r in results.items():
        peak = r.get("peak_memory_MB")
        print(
            f"{name:16s} {r['images_per_s']:10.1f} {r['images_per_s_min']:9.1f} {r['images_per_s_max']:9.1f} "
            f"{100 * r['data_wait']:9.1f}% {'-' if peak is None else str(round(peak)):>9s}"
        )


def _heading(mode: str, c: dict) -> str:
    return (
        f"{mode}, {c['arch']} v2 at {c['size']} px, batch {c['batch']}, K {c['K']}, {c['batches']} steps x "
        f"{c['reps']} reps, {c['device']}; ours: {c['ours']['amp']}, "
        f"{'channels-last' if c['ours']['channels_last'] else 'NCHW'}, {c['ours']['optimizer']}, "
        f"momentum {c['ours']['momentum_impl']}{', compiled' if c['ours']['compile'] else ''}; "
        f"reference: fp32, NCHW, {c['reference']['optimizer']}, momentum loop"
    )


def print_step(r: dict) -> None:
    print(_heading("training step (synthetic inputs)", r["config"]))
    _table(r["results"])
    print(f"ours / reference: {r['ours_over_reference']:.2f}x")


def print_e2e(r: dict) -> None:
    print(
        _heading("end to end", r["config"])
        + f"; {r['config']['samples']} samples in {r['config']['shards']}"
    )
    _table(r["results"])
    print(
        f"e2e / step (ours): {r['e2e_over_step']:.2f} (goal 0.95); ours / reference e2e: "
        f"{r['ours_over_reference']:.2f}x (goal 8)"
    )
    print(f"verdict: {r['verdict']}: {r['advice']}")
    print_reopen(r)
