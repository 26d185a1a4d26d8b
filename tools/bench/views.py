"""``moco-bench views``: what each view operator costs, from the pipeline timed with one left out at a time.

The first GPU record found the view pipeline at 5,371 pairs/s where its decoder alone
gives 18,631 images/s: the operators after decoding are the limit, and this says
which. Variants of the same recipe, each a DALI loader over the same shards, built
once and alternating (as ``pipeline`` times its contenders): the whole recipe, then
without the colour jitter, the grayscale, the blur, the flip (each one's probability
set to 0, which leaves the operator out of the graph when it is built), and the crop
alone. An operator's cost is the time per pair it adds: 1/rate(whole) - 1/rate(without
it), and its share of the whole recipe's time per pair. Operators the recipe already
leaves out have no variant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import torch

from ...pipeline import shards as shard_format
from ...pipeline.config import VIEW_BRANCHES, LoaderConfig
from ...pipeline.loader import ViewLoader
from .common import Feed, rates, shards_for, timed_window, warm_up, window_batches, windows
from .epochs import Epochs, draws, view_folder

__all__ = ["bench_views", "print_views", "variants"]

# The probability that turns each operator off; "crop only" turns off all of them.
OPERATORS = {"jitter": "jitter_p", "grayscale": "gray_p", "blur": "blur_p", "flip": "flip_p"}


def variants(cfg) -> dict:
    """The recipe, the recipe without each operator it applies, and the crop alone."""
    present = {name: field for name, field in OPERATORS.items() if getattr(cfg, field) > 0}
    out = {"whole recipe": cfg}
    out.update({f"without {name}": replace(cfg, **{field: 0.0}) for name, field in present.items()})
    if len(present) > 1:
        out["crop only"] = replace(cfg, **{field: 0.0 for field in present.values()})
    return out


def bench_views(args) -> dict:
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    shards, _ = shards_for(args)
    original = shard_format.load_manifest(shards)
    cfg = args.tree.data.views
    dtype = args.views_dtype
    loader_config = LoaderConfig(
        batch_size=args.tree.data.batch_size, dtype=dtype, labels=False, read=args.tree.data.read
    )
    view, view_info = view_folder(
        shards, draws(args, loader_config.read.prefetch) * args.tree.data.batch_size
    )
    recipes = variants(cfg)
    # The whole recipe on the other view graph too (data.view_branches): the choice a device's
    # run makes between DALI conditionals and per-sample blends.
    branches = args.tree.data.read.view_branches
    other = next(b for b in VIEW_BRANCHES if b != branches)
    graphs = {name: (recipe, loader_config) for name, recipe in recipes.items()}
    other_read = replace(loader_config.read, view_branches=other)
    graphs[f"whole recipe, {other}"] = (cfg, replace(loader_config, read=other_read))
    feeds, epochs = {}, {}
    for name, (recipe, config) in graphs.items():
        loader = ViewLoader(view, recipe, config, device_id=device.index or 0 if gpu else None)
        epochs[name] = Epochs(loader, lambda b: (b.view_q, b.view_k))
        feeds[name] = Feed(iter(epochs[name]), backlog=loader_config.read.prefetch)

    warm_up(feeds.values(), args.options.warmup, device)
    # One window size for every variant (the whole recipe's), so they alternate on equal terms.
    count = window_batches(1, 1 / feeds["whole recipe"].batches_per_s, args.options)
    opened = sum(e.opened for e in epochs.values())
    timed = windows(
        {
            name: (feed, lambda n, f=feed: (timed_window(f, n, device), 0.0))
            for name, feed in feeds.items()
        },
        [list(feeds)],
        args.options.reps,
        dict.fromkeys(feeds, count),
    )
    pairs = count * args.tree.data.batch_size
    results = {name: rates(pairs, [s for s, _ in ts], "pairs") for name, ts in timed.items()}
    whole_us = 1e6 / results["whole recipe"]["pairs_per_s"]
    costs = {}  # what leaving a part out saves is what it costs
    parts = {f"without {name}": name for name in OPERATORS} | {"crop only": "all but the crop"}
    for variant, part in parts.items():
        if variant in results:
            cost = whole_us - 1e6 / results[variant]["pairs_per_s"]
            costs[part] = {"us_per_pair": cost, "share": cost / whole_us}
    graph_ratio = results[f"whole recipe, {other}"]["pairs_per_s"] / (1e6 / whole_us)
    return {
        "mode": "views",
        "config": {
            "shards": str(shards),
            "samples": original.samples,
            "preset": args.tree.data.preset,
            "size": args.tree.data.views.size,
            "augment": dataclasses.asdict(cfg),
            "batch": args.tree.data.batch_size,
            "batches": args.options.batches,
            "warmup": args.options.warmup,
            "reps": args.options.reps,
            "dtype": dtype,
            "dali_threads": args.tree.data.read.threads or "default",
            "hw_decoder_load": args.tree.data.read.hw_decoder_load if gpu else None,
            "device": str(device),
            "decoder": "mixed (nvJPEG)" if gpu else "cpu (libjpeg-turbo)",
            "dali_data": view_info,
            "variants": {name: dataclasses.asdict(r) for name, r in recipes.items()},
            "batches_per_window": count,
        },
        "dali_pipelines_opened_while_timing": sum(e.opened for e in epochs.values()) - opened,
        "results": results,
        "whole_us_per_pair": whole_us,
        "costs": costs,
        "view_branches": branches,
        "other_branches": {"name": other, "over_whole": graph_ratio},
    }


def print_views(r: dict) -> None:
    c = r["config"]
    print(
        f"view operators, {c['preset']} at {c['size']} px, batch {c['batch']}, {c['batches']} batches x "
        f"{c['reps']} reps, {c['device']} ({c['decoder']}), {c['samples']} samples"
    )
    print(f"{'variant':20s} {'pairs/s':>10s} {'min':>10s} {'max':>10s}")
    for name, s in r["results"].items():
        print(
            f"{name:20s} {s['pairs_per_s']:10.0f} {s['pairs_per_s_min']:10.0f} {s['pairs_per_s_max']:10.0f}"
        )
    print(f"the whole recipe: {r['whole_us_per_pair']:.1f} us per pair, of which:")
    for name, cost in r["costs"].items():
        print(f"  {name:18s} {cost['us_per_pair']:8.1f} us  {100 * cost['share']:5.1f}%")
    o = r["other_branches"]
    print(
        f"view branches: {r['view_branches']} (configured); {o['name']} makes "
        f"{o['over_whole']:.2f}x its pairs/s"
    )
