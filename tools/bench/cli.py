"""``moco-bench``: throughput benchmarks, this project's path beside the reference path.

Modes:

* ``pipeline``: image pairs per second delivered to the training device by the DALI
  view pipeline and by the reference loader (PIL and torchvision in DataLoader
  workers), over the same shards, alternating, with peak memory.
* ``momentum``: the key encoder's momentum update (fused multi-tensor kernels against
  the reference per-parameter loop and against the memory-bandwidth floor), plus the
  two other per-step dictionary costs at K = 65536: the enqueue and the negative-logit
  matmul.
* ``step`` and ``e2e``: images/s of the training step on
  synthetic tensors, and end to end from shards, each beside the reference
  configuration, with the data-wait fraction and an input/compute-bound verdict.
* ``shards``: ``moco-shards build`` against PIL plus
  ``webdataset.ShardWriter``.
* ``scale``: a training rank's start-up time and host memory as the data set grows
  (synthetic shard folders of 1e4 to 1e6 samples, up to 1e5 shards; world 1, 8, 64),
  fitted and extrapolated to 1e9 samples (not part of ``all``).
* ``scale-build``: one part of a shard build, its memory and time to enumerate and
  order its share as the source grows (1e5 and 1e6 inputs), beside the design that
  held the whole listing, extrapolated to 1e9 inputs (not part of ``all``).
* ``all``: every mode in one run, one JSON. ``--compare A.json B.json`` sets the
  headline figures of two records side by side; ``--chart FILE.png`` draws them.

Every mode warms up, alternates the contenders, reports medians with their spread,
prints a table and writes JSON with the machine and the configuration. Each mode is a
module of its own (``momentum``, ``pipeline``, ``step``, ``shards``, ``scale``,
``scale_build``); this one parses
the command line, runs them and writes the record.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from moco_dali.tools.bench.common import shards_for, synthetic_photos
from moco_dali.tools.bench.machine import describe
from moco_dali.tools.bench.momentum import bench_momentum, print_momentum
from moco_dali.tools.bench.pipeline import bench_pipeline, print_pipeline
from moco_dali.tools.bench.report import chart, compare

__all__ = ["main"]

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
    sb = sub.add_parser("scale-build", parents=[out], help="shard builder memory and time per part as the source grows")
    sb.add_argument("--sizes", default="1e5,1e6", help="comma-separated input counts")
    sb.add_argument("--parts", default="1,100", help="comma-separated part counts (part 0 is measured)")
    sb.add_argument("--kinds", default="list", help="comma-separated sources: list (a list file), folder (empty files)")
    sub.add_parser("all", parents=[out, data, model, train, pipe, mom, shards], help="every mode, one record")
    from moco_dali.tools.bench.scale import add_arguments as scale_arguments

    scale_arguments(sub.add_parser("scale", parents=[out], help="per-rank start-up and memory as the data grows"))
    return parser


def _run(mode: str, args) -> dict:
    if mode == "pipeline":
        return bench_pipeline(args)
    if mode == "momentum":
        return bench_momentum(args)
    if mode in ("step", "e2e"):
        from moco_dali.tools.bench.step import bench_e2e, bench_step

        return bench_step(args) if mode == "step" else bench_e2e(args, str(shards_for(args)[0]))
    if mode == "scale":
        from moco_dali.tools.bench.scale import bench_scale

        return bench_scale(args)
    if mode == "shards":
        from moco_dali.tools.bench.shards import bench_shards

        photos, info = (args.photos, None) if args.photos else synthetic_photos(args)
        workers = [int(w) for w in args.build_workers.split(",")] if args.build_workers else None
        return bench_shards(photos, args.reps, workers, photoset=info)
    if mode == "scale-build":
        from moco_dali.tools.bench.scale_build import bench_scale_build

        return bench_scale_build(args)
    raise ValueError(mode)


def _print(record: dict) -> None:
    from moco_dali.tools.bench.scale import print_scale
    from moco_dali.tools.bench.scale_build import print_scale_build
    from moco_dali.tools.bench.shards import print_shards
    from moco_dali.tools.bench.step import print_e2e, print_step

    printers = {"pipeline": print_pipeline, "momentum": print_momentum, "step": print_step, "e2e": print_e2e,
                "shards": print_shards, "scale": print_scale, "scale-build": print_scale_build}
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
    parser = _parser(gpu, len(os.sched_getaffinity(0)))
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
        try:
            print(f"wrote {chart(record, args.chart)}")
        except (ValueError, OSError) as exc:
            print(f"moco-bench: error: --chart {args.chart}: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
