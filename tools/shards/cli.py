"""``moco-shards``: build, verify, inspect, preview and merge shard folders.

The only place that turns the library's errors into one-line messages and exit
codes: 0 success; 1 a check failed (``verify`` found a fault, or ``build`` rejected
inputs under ``--strict``, or rejected every input); 2 bad arguments or input (a
missing or unreadable source, a folder in use or not ours, an output that cannot be
written, a folder that is not a shard folder for ``inspect``/``preview``/``merge``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from ...pipeline.shards import ShardError
from ...train.config import ViewsConfig
from . import BuildError
from .build import DEFAULT_MAX_INPUT_BYTES, BuildSettings, build
from .imageprep import DEFAULT_MAX_PIXELS, PrepSettings
from .inputs import read_classes
from .merge import merge

__all__ = ["main", "parse_bytes"]

VIEW_KEYS = tuple(leaf.name for leaf in dataclasses.fields(ViewsConfig))

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def parse_bytes(text: str) -> int:
    """``"500MB"``, ``"1.5GiB"`` or ``"1000000"`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 500MB, 1GiB, 1000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moco-shards", description="Turn image dumps into DALI-ready WebDataset shards."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser(
        "build",
        help="pack images into shards",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    b.add_argument(
        "sources",
        nargs="+",
        metavar="SRC",
        help="folders (recursive), list files (.txt/.lst/.list: one path per line; .csv: PATH,LABEL) "
        "or .tar archives",
    )
    b.add_argument("--out", required=True, metavar="DIR", help="shard folder to write")
    b.add_argument("--name", default="shard", help="shard file prefix: NAME-000000.tar")
    b.add_argument(
        "--labels",
        choices=["none", "folder"],
        default="none",
        help="'folder': first-level sub-folder names (or a .csv list's labels) are the classes (KEY.cls)",
    )
    b.add_argument(
        "--classes",
        default=None,
        metavar="FILE",
        help="class names, one per line, in index order (default: found in the sources)",
    )
    b.add_argument(
        "--max-count", type=int, default=10000, metavar="N", help="samples per shard at most"
    )
    b.add_argument(
        "--max-bytes",
        type=parse_bytes,
        default=None,
        metavar="SIZE",
        help="bytes per shard at most (e.g. 1GB)",
    )
    b.add_argument(
        "--max-side",
        type=int,
        default=None,
        metavar="PX",
        help="shrink so the longer side is at most PX",
    )
    b.add_argument(
        "--short-side",
        type=int,
        default=None,
        metavar="PX",
        help="shrink so the shorter side is PX",
    )
    b.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    b.add_argument(
        "--reencode",
        choices=["auto", "always"],
        default="auto",
        help="'auto' stores clean baseline JPEGs byte for byte",
    )
    b.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="reject larger images as decompression bombs",
    )
    b.add_argument(
        "--max-input-bytes",
        type=parse_bytes,
        default=DEFAULT_MAX_INPUT_BYTES,
        metavar="SIZE",
        help="reject larger input files unread",
    )
    b.add_argument(
        "--shuffle-seed",
        type=int,
        default=0,
        metavar="SEED",
        help="pack inputs in an order shuffled with SEED, so class-sorted dumps make mixed shards",
    )
    b.add_argument("--no-shuffle", action="store_true", help="pack inputs in their listing order")
    b.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="W",
        help="worker processes (default: all cores)",
    )
    b.add_argument(
        "--num-parts",
        type=int,
        default=1,
        metavar="P",
        help="split the build into P disjoint parts",
    )
    b.add_argument(
        "--part", type=int, default=None, metavar="I", help="build part I of P (0-based; default 0)"
    )
    b.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="'local': this process and its worker pool build one part; "
        "'ray': every part as a Ray task (--out on a shared file system), then merged",
    )
    b.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="with --executor ray: the cluster to join (default: start Ray on this machine)",
    )
    b.add_argument("--strict", action="store_true", help="exit 1 if any input was rejected")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    v = sub.add_parser(
        "verify", help="read and decode every sample through DALI; check hashes and counts"
    )
    v.add_argument("folder", metavar="DIR")
    v.add_argument("--batch-size", type=int, default=64)
    v.add_argument(
        "--threads", type=int, default=None, help="DALI CPU threads (default: all cores)"
    )
    v.add_argument("--device-id", type=int, default=None, help="decode on this GPU (default: CPU)")
    v.add_argument("--no-progress", action="store_true")

    i = sub.add_parser("inspect", help="print samples, shards, bytes, classes and resolutions")
    i.add_argument("folder", metavar="DIR")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser(
        "preview",
        help="write a PNG of stored images beside their two augmented views",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("folder", metavar="DIR")
    p.add_argument("--out", required=True, metavar="FILE.png")
    p.add_argument(
        "--preset",
        default="v2",
        help="moco-train preset whose views to draw (v1, v2, small, cifar)",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="moco-train's TOML or YAML file: draw the views that run trains on",
    )
    p.add_argument("--count", type=int, default=8, help="samples (rows)")
    p.add_argument(
        "--size", type=int, default=None, metavar="PX", help="view size (default: data.size)"
    )
    for (
        name
    ) in VIEW_KEYS:  # the same keys as moco-train's, so a recipe can be tried before it is run
        p.add_argument(
            f"--data.views.{name}",
            dest=f"view_{name}",
            default=None,
            metavar="VALUE",
            help="as in moco-train (docs/training.md)",
        )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device-id", type=int, default=None, help="run the pipeline on this GPU (default: CPU)"
    )

    m = sub.add_parser(
        "merge", help="merge the part manifests of a multi-part build into one manifest.json"
    )
    m.add_argument("folders", nargs="+", metavar="DIR")
    m.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder for the merged manifest (default: the first DIR)",
    )
    return parser


def _build(args) -> int:
    try:
        prep = PrepSettings(
            quality=args.quality,
            max_side=args.max_side,
            short_side=args.short_side,
            max_pixels=args.max_pixels,
            reencode=args.reencode,
        )
    except ValueError as exc:
        raise BuildError(str(exc)) from None
    if args.executor == "ray" and args.part is not None:
        raise BuildError("--part: --executor ray builds every part; give --num-parts only")
    if args.executor == "local" and args.ray_address:
        raise BuildError("--ray-address needs --executor ray")
    settings = BuildSettings(
        name=args.name,
        labels=args.labels,
        max_count=args.max_count,
        max_bytes=args.max_bytes,
        num_parts=args.num_parts,
        part=args.part or 0,
        prep=prep,
        max_input_bytes=args.max_input_bytes,
        shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
    )
    if args.workers is not None and args.workers < 0:
        raise BuildError(f"--workers must be 0 or more, got {args.workers}")
    classes = read_classes(args.classes) if args.classes else None
    if classes is not None and args.labels != "folder":
        raise BuildError("--classes needs --labels folder")
    if args.executor == "ray":
        from .executor import build_on_ray

        manifest, reports = build_on_ray(
            args.sources,
            args.out,
            settings,
            address=args.ray_address,
            workers_per_part=args.workers or 1,
            classes=classes,
        )
        inputs, samples, rejected = (
            sum(getattr(r, k) for r in reports) for k in ("inputs", "samples", "rejected")
        )
        print(
            f"moco-shards build: {len(reports)} parts on Ray: {inputs} inputs -> {samples} samples in "
            f"{sum(r.shards for r in reports)} shards, {rejected} rejected; {manifest}"
        )
    else:
        report = build(
            args.sources,
            args.out,
            settings,
            workers=args.workers,
            progress=not args.no_progress,
            classes=classes,
        )
        inputs, samples, rejected, manifest = (
            report.inputs,
            report.samples,
            report.rejected,
            report.manifest_path,
        )
        print(f"moco-shards build: {report.summary()}")
    log_name = Path(manifest).parent / (
        json.loads(Path(manifest).read_text()).get("rejected_file") or ""
    )
    if inputs and not samples:
        print(
            f"moco-shards build: every input was rejected ({rejected}); the reasons are in {log_name}",
            file=sys.stderr,
        )
        return 1
    if args.strict and rejected:
        print(
            f"moco-shards build: --strict: {rejected} inputs rejected (see {log_name})",
            file=sys.stderr,
        )
        return 1
    return 0


def _views(args):
    """The ``AugmentConfig`` moco-train would resolve from the same preset, file and view keys."""
    from ...train.cli import parse
    from ...train.config import ConfigError
    from ...train.validation import augment_config

    train_args = ["--preset", args.preset, *(["--config", args.config] if args.config else [])]
    train_args += [
        token
        for name in VIEW_KEYS
        if getattr(args, f"view_{name}") is not None
        for token in (f"--data.views.{name}", getattr(args, f"view_{name}"))
    ]
    if args.size is not None:
        if args.size < 8:
            raise BuildError(f"--size must be at least 8 px, got {args.size}")
        train_args += ["--data.size", str(args.size)]
    try:
        config, _ = parse(train_args)
        return augment_config(config)
    except ConfigError as exc:
        raise BuildError(str(exc)) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="moco-shards: %(message)s")
    try:
        if args.command == "build":
            return _build(args)
        if args.command in ("verify", "inspect", "preview") and not Path(args.folder).is_dir():
            raise BuildError(f"{args.folder}: no such folder")
        if args.command == "verify":
            from .verify import verify

            report = verify(
                args.folder,
                batch_size=args.batch_size,
                num_threads=args.threads,
                device_id=args.device_id,
                progress=not args.no_progress,
            )
            print(f"moco-shards verify: {report.summary()}")
            return 0
        if args.command == "inspect":
            from .verify import format_inspection, inspect

            info = inspect(args.folder)
            print(json.dumps(info, indent=1) if args.json else format_inspection(info))
            return 0
        if args.command == "preview":
            from .preview import preview

            path = preview(
                args.folder,
                args.out,
                recipe=_views(args),
                count=args.count,
                seed=args.seed,
                device_id=args.device_id,
            )
            print(f"moco-shards preview: wrote {path}")
            return 0
        if args.command == "merge":
            print(f"moco-shards merge: wrote {merge(args.folders, args.out)}")
            return 0
    except ShardError as exc:
        if args.command == "verify":  # a fault found in the data: the check failed
            print(f"moco-shards {args.command}: FAILED: {exc}", file=sys.stderr)
            return 1
        print(f"moco-shards {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BuildError as exc:
        print(f"moco-shards {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"moco-shards {args.command}: interrupted; run the same command again to finish",
            file=sys.stderr,
        )
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
