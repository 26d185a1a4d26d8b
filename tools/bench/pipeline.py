"""``moco-bench pipeline``: view pairs per second delivered by the DALI pipeline and by the reference loader.

Both read the same shards, alternating after a warm-up; the ceiling is the same
reader and decoder with nothing after them; peak memory is reported (host RSS; on a
GPU torch's and NVML's per-process figure, which includes DALI's pools). Each loader
is built once and repeats; before each timed window the other one has refilled its
prefetch and this one's is drained, so each window measures a steady rate. The DALI
loader reads one long epoch spanning every window (``tools.bench.epochs``); what a
new epoch costs it is measured apart and reported beside the rates.
"""

from __future__ import annotations

import dataclasses

import torch

from ...pipeline import shards as shard_format
from ...pipeline.config import LoaderConfig
from ...pipeline.graph import decode_pipeline
from ...pipeline.loader import ViewLoader
from .common import (
    Feed,
    peak_memory,
    rates,
    reference_feed,
    settle,
    shards_for,
    sync,
    timed_window,
    warm_up,
    window_batches,
    windows,
)
from .epochs import Epochs, draws, epoch_reopens, view_folder

__all__ = ["bench_pipeline", "print_pipeline", "print_reopen", "TIMING"]

TIMING = (
    "persistent loaders: DALI reads one epoch spanning every timed window (each shard listed "
    "dali_data.copies times under linked names), the reference DataLoader's workers loop over "
    "the shards; each contender's windows run back to back after its backlog is drained once "
    "(the reference's last, so nothing waits for its refills), sized by --window-s; a new DALI "
    "epoch's cost is measured apart (dali_epoch_reopen_s)"
)


def bench_pipeline(args) -> dict:
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    shards, photoset = shards_for(args)
    original = shard_format.load_manifest(
        shards
    )  # what the record describes, whatever the DALI view lists
    cfg = args.tree.data.views
    dtype = args.views_dtype
    loader_config = LoaderConfig(
        batch_size=args.tree.data.batch_size, dtype=dtype, labels=False, read=args.tree.data.read
    )

    def make_loader(folder):
        return ViewLoader(folder, cfg, loader_config, device_id=device.index or 0 if gpu else None)

    # Both loaders are built and started here, once, and repeat for the whole run; DALI's
    # one epoch holds every batch the run draws, so that no window pays for a new epoch.
    view, view_info = view_folder(
        shards, draws(args, loader_config.read.prefetch) * args.tree.data.batch_size
    )
    dali = make_loader(view)
    epochs = Epochs(dali, lambda b: (b.view_q, b.view_k))
    reference, reference_config = reference_feed(
        shards, cfg, args.tree.data.batch_size, args.options.workers, device
    )
    contenders = {
        "dali": Feed(iter(epochs), backlog=loader_config.read.prefetch),
        "reference": reference,
    }

    warm_up(contenders.values(), args.options.warmup, device)
    batches = {
        name: window_batches(1, 1 / feed.batches_per_s, args.options)
        for name, feed in contenders.items()
    }
    opened = epochs.opened
    timed = windows(
        {
            name: (feed, lambda n, f=feed: (timed_window(f, n, device), 0.0))
            for name, feed in contenders.items()
        },
        [["dali"], ["reference"]],
        args.options.reps,
        batches,
    )
    opened_while_timing = epochs.opened - opened
    results = {
        name: {
            **rates(batches[name] * args.tree.data.batch_size, [s for s, _ in ts], "pairs"),
            "batches": batches[name],
        }
        for name, ts in timed.items()
    }
    memory = peak_memory(device)  # before the decode-only pipeline adds its own buffers

    # What a new epoch costs, which the timed windows above no longer include.
    settle(None, contenders.values())
    reopen = epoch_reopens(
        make_loader,
        shards,
        args.tree.data.batch_size,
        loader_config.read.prefetch,
        lambda: sync(device),
    )

    # The ceiling: the same reader and decoder with nothing after them. Timed after the
    # contenders, so that its memory does not count as theirs.
    settle(None, contenders.values())
    decoder = decode_pipeline(
        shards,
        args.tree.data.batch_size,
        threads=args.tree.data.read.threads,
        hw_decoder_load=args.tree.data.read.hw_decoder_load,
        device_id=(device.index or 0) if gpu else None,
    )
    decoded = Feed(iter(decoder.run, None), backlog=2)
    timed_window(decoded, args.options.warmup, device)
    decode_batches = window_batches(1, 1 / decoded.batches_per_s, args.options)
    decode_s = []
    for _ in range(args.options.reps):
        settle(decoded, [decoded])
        decode_s.append(timed_window(decoded, decode_batches, device))
    return {
        "mode": "pipeline",
        "config": {
            "shards": str(shards),
            "samples": original.samples,
            "shard_files": len(original.counts),
            "preset": args.tree.data.preset,
            "size": args.tree.data.views.size,
            "augment": dataclasses.asdict(cfg),
            "batch": args.tree.data.batch_size,
            "batches": args.options.batches,
            "warmup": args.options.warmup,
            "reps": args.options.reps,
            "dtype": dtype,
            "dali_threads": args.tree.data.read.threads or "default",
            **reference_config,
            "hw_decoder_load": args.tree.data.read.hw_decoder_load if gpu else None,
            "device": str(device),
            "decoder": "mixed (nvJPEG)" if gpu else "cpu (libjpeg-turbo)",
            "timing": TIMING,
            "dali_data": {**view_info, "epoch_batches": len(dali)},
        },
        "dali_pipelines_opened_while_timing": opened_while_timing,
        "dali_epoch_reopen_s": reopen.pop("dali_epoch_reopen_s"),
        "dali_epoch_reopen": reopen,
        "photoset": photoset,
        "results": results,
        "dali_over_reference": results["dali"]["pairs_per_s"] / results["reference"]["pairs_per_s"],
        "decode_ceiling": rates(decode_batches * args.tree.data.batch_size, decode_s, "images"),
        "memory": memory,
        "goals": {
            "gpu_pairs_per_s": 8000,
            "gpu_dali_over_reference": 5.0,
            "cpu_dali_over_reference": 1.0,
        },
    }


def print_pipeline(r: dict) -> None:
    c = r["config"]
    print(
        f"view pipeline, {c['preset']} (hue in {c['augment']['hue_space']}) at {c['size']} px, "
        f"batch {c['batch']}, {c['batches']} batches x {c['reps']} reps, {c['device']} ({c['decoder']}), "
        f"{c['samples']} samples in {c['shards']}"
    )
    print(f"{'loader':12s} {'pairs/s':>10s} {'min':>10s} {'max':>10s}")
    for name, s in r["results"].items():
        print(
            f"{name:12s} {s['pairs_per_s']:10.0f} {s['pairs_per_s_min']:10.0f} {s['pairs_per_s_max']:10.0f}"
        )
    d = r.get("decode_ceiling")
    if d:
        print(
            f"{'decode only':12s} {d['images_per_s']:10.0f} {d['images_per_s_min']:10.0f} "
            f"{d['images_per_s_max']:10.0f}   (images/s: the ceiling of the pairs above)"
        )
    print_reopen(r)
    print(
        f"DALI / reference: {r['dali_over_reference']:.2f}x; memory: "
        + ", ".join(
            f"{k} {v:.0f}" if isinstance(v, (int, float)) else f"{k} {v}"
            for k, v in r["memory"].items()
        )
    )


def print_reopen(r: dict) -> None:
    """The cost of a new DALI epoch, and whether one fell in a timed window."""
    if "dali_epoch_reopen_s" not in r:  # records from before it was measured
        return
    e, opened = r["dali_epoch_reopen"], r["dali_pipelines_opened_while_timing"]
    print(
        f"a new DALI epoch costs {r['dali_epoch_reopen_s']:.3f} s more than a steady batch "
        f"({e['dali_steady_batch_s']:.3f} s; median of {len(e['dali_epoch_first_batch_s'])} epochs of "
        f"{e['batches_per_epoch']} batches), once per epoch; "
        + (
            f"{opened} new epochs fell in the timed windows"
            if opened
            else "none fell in a timed window"
        )
    )
