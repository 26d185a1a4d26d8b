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
    compile_encoders,
    forward_loss,
    views_dtype,
)
from .common import Feed, rates, reference_feed, settle, sync, window_batches, windows
from .epochs import Epochs, draws, epoch_reopens, view_folder
from .pipeline import TIMING, print_reopen

__all__ = ["Contender", "bench_step", "bench_e2e", "print_step", "print_e2e"]


class Contender:
    """A model, optimizer and input layout: ours (``reference=False``) or the reference configuration."""

    def __init__(self, args, reference: bool, shuffle: str = "split", name: str = ""):
        self.device = torch.device(args.device)
        self.name = name or ("reference" if reference else "ours")
        # The tree being measured, on one device: split BN stands for shuffle-BN across GPUs
        # (``shuffle="none"``: plain BN, what split BN costs is the difference).
        config = copy.deepcopy(args.tree)
        config.model.shuffle = shuffle
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
        compile_encoders(self.model, config)
        self.optimizer = build_optimizer(config, self.model, self.device, fast=not reference)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.peak_MB = 0.0

    def describe(self) -> dict:
        return {
            "amp": str(self.amp).replace("torch.", "") if self.amp else "none",
            "channels_last": self.channels_last,
            "input_dtype": str(self.input_dtype).replace("torch.", ""),
            "momentum_impl": resolve_implementation(
                self.model.momentum_impl, self.model.encoder_k, self.model.encoder_q
            ),
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


def _measure(
    runs: dict[str, tuple[Contender, Feed]],
    args,
    groups: list[list[str]],
    timing_starts: Callable[[], None] = lambda: None,
) -> dict[str, dict]:
    """Warm every run up (a contender's first step apart: with run.compile, the compilation),
    size its windows by ``--window-s``, then time them in ``groups`` (``common.windows``)."""
    first, stepped, batches = {}, set(), {}
    for name, (contender, feed) in runs.items():
        for _ in range(feed.backlog):  # every worker started and delivering
            next(feed)
        first[name] = None if id(contender) in stepped else contender.timed(feed, 1)[0]
        stepped.add(id(contender))
        warm_s, _ = contender.timed(feed, args.options.warmup)
        batches[name] = window_batches(args.options.warmup, warm_s, args.options)
    timing_starts()
    timed = windows(
        {
            name: (feed, lambda n, c=contender, f=feed: c.timed(f, n))
            for name, (contender, feed) in runs.items()
        },
        groups,
        args.options.reps,
        batches,
    )
    results = {}
    for name, pairs in timed.items():
        seconds = [s for s, _ in pairs]
        results[name] = {
            **rates(batches[name] * args.tree.data.batch_size, seconds, "images"),
            "data_wait": statistics.median(w / s for s, w in pairs),
            "batches": batches[name],
            "first_step_s": first[name],
        }
    return results


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
    """Ours, the reference, and ours with plain BN: what split BN (the paper's guarantee on one
    device) costs the step."""
    contenders = [
        Contender(args, reference=False),
        Contender(args, reference=True),
        Contender(args, reference=False, shuffle="none", name="ours_plain_bn"),
    ]
    size = (args.tree.data.batch_size, args.tree.data.views.size)
    runs = {c.name: (c, _repeat(c.synthetic(*size))) for c in contenders}
    results = _measure(runs, args, groups=[list(runs)])
    for c in contenders:
        results[c.name]["peak_memory_MB"] = c.peak_MB or None
    ours = results["ours"]["images_per_s"]
    return {
        "mode": "step",
        "config": _config_record(args, contenders[:2]),
        "results": results,
        "ours_over_reference": ours / results["reference"]["images_per_s"],
        "split_bn_over_plain_bn": ours / results["ours_plain_bn"]["images_per_s"],
        "compile_s": results["ours"]["first_step_s"] if args.tree.run.compile else None,
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
    # Ours, then the reference's step, then the reference loader's windows back to back: no
    # window waits for its 2-batches-per-worker backlog to refill, none starts pre-filled.
    groups = [["step_ours", "e2e_ours"], ["step_reference"], ["e2e_reference"]]
    results = _measure(
        runs, args, groups, timing_starts=lambda: opened.update(before=epochs.opened)
    )
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
    if "split_bn_over_plain_bn" in r:  # records before the plain-BN contender lack it
        print(
            f"split BN over 8 / plain BN: {r['split_bn_over_plain_bn']:.2f}x the images/s "
            "(the cost of the paper's guarantee on one device)"
        )
    if r.get("compile_s") is not None:
        print(f"first step (compilation) {r['compile_s']:.1f} s, apart from the steady rate")


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
