"""``moco-eval``: measure and move pretrained features.

    moco-eval knn    --checkpoint CKPT --train SHARDS --val SHARDS [--k 200 --t 0.1]
    moco-eval linear --checkpoint CKPT --train SHARDS --val SHARDS [--epochs 100 --lr 30]
    moco-eval export --checkpoint CKPT --format torchvision|detectron2 --out FILE

Reads moco-train checkpoints and the reference MoCo code's (never running code a file
carries). Exit codes: 0 done, 2 a bad checkpoint, shard folder, option or output
(one line naming it).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main"]

log = logging.getLogger("moco-eval")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU here")
    return torch.device(name)


def _amp(name: str, device):
    from ..step import amp_dtype

    if name == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA GPU")
    return amp_dtype(name, device)


def _sizes(args, info) -> tuple[int, int]:
    """Crop and resize: given, or the pretraining run's (224 / 256 for a reference checkpoint)."""
    data = (info.config or {}).get("data", {})
    size = args.size or data.get("size", 224)
    resize = args.resize or data.get("eval_resize", max(size, round(size * 256 / 224)))
    return size, resize


def _knn(args) -> dict:
    import torch

    from ...pipeline.augment import EvalConfig
    from .knn import extract_features, knn_classify
    from .pretrained import load_encoder

    device = _device(args.device)
    amp = _amp(args.amp, device)
    encoder, info = load_encoder(args.checkpoint, args.arch, random_init=args.random_init)
    encoder = encoder.to(device).to(memory_format=torch.channels_last)
    size, resize = _sizes(args, info)
    view = EvalConfig(resize=resize, size=size)
    started = time.perf_counter()
    common = dict(batch_size=args.batch_size, device=device, amp_dtype=amp, threads=args.threads)
    train_f, train_y, classes = extract_features(encoder, args.train, view, **common)
    val_f, val_y, val_classes = extract_features(encoder, args.val, view, **common)
    if val_classes != classes:
        raise ValueError(f"--val {args.val}: {val_classes} classes, --train has {classes}")
    result = knn_classify(train_f, train_y, val_f, val_y, classes, k=args.k, t=args.t)
    record = {
        "mode": "knn",
        "checkpoint": str(args.checkpoint),
        "random_init": args.random_init,
        "arch": info.arch,
        "step": info.step,
        "k": args.k,
        "t": args.t,
        "size": size,
        "resize": resize,
        "train": str(args.train),
        "val": str(args.val),
        "train_samples": len(train_y),
        "val_samples": len(val_y),
        **result,
        "seconds": time.perf_counter() - started,
        "device": str(device),
    }
    when = "at initialisation" if args.random_init else f"at step {info.step}"
    print(
        f"moco-eval knn: {info.arch} {when}: top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% "
        f"(k={args.k}, T={args.t}, {len(train_y)} train / {len(val_y)} val images, {size} px)"
    )
    return record


def _linear(args) -> dict:
    from .linear import LinearConfig, linear_probe
    from .pretrained import load_encoder

    device = _device(args.device)
    amp = _amp(args.amp, device)
    encoder, info = load_encoder(args.checkpoint, args.arch, random_init=args.random_init)
    size, resize = _sizes(args, info)
    cfg = LinearConfig(
        epochs=args.epochs,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        milestones=tuple(args.milestones),
        batch_size=args.batch_size,
        size=size,
        resize=resize,
        seed=args.seed,
        threads=args.threads,
        val_every=args.val_every,
        progress=not args.no_progress,
    )
    out = args.out or Path(args.checkpoint).parent / "linear"
    result = linear_probe(
        encoder, args.train, args.val, cfg, out, device, amp, resume=not args.restart
    )
    when = "at initialisation" if args.random_init else f"at step {info.step}"
    print(
        f"moco-eval linear: {info.arch} {when}: top-1 {result['top1']:.2f}% "
        f"top-5 {result['top5']:.2f}% after {cfg.epochs} epochs (best top-1 {result['best_top1']:.2f}%); "
        f"backbone unchanged; {out / 'linear.json'}"
    )
    return {
        "mode": "linear",
        "checkpoint": str(args.checkpoint),
        "arch": info.arch,
        "step": info.step,
        **result,
    }


def _export(args) -> dict:
    from .pretrained import export, load_encoder

    encoder, info = load_encoder(args.checkpoint, args.arch)
    out = export(encoder, args.format, args.out)
    stem = (
        " (small-image stem: replace conv1 with a 3x3/1 conv and maxpool with Identity before loading)"
        if info.small_stem
        else ""
    )
    print(
        f"moco-eval export: {info.arch} query backbone of {args.checkpoint} as {args.format} -> {out}{stem}"
    )
    return {
        "mode": "export",
        "checkpoint": str(args.checkpoint),
        "format": args.format,
        "out": str(out),
    }


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (a missing option, a bad choice) as one line and exit 2, like every other error."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


_OPTION_RULES = {
    "k": (lambda v: v >= 1, "must be at least 1"),
    "t": (lambda v: math.isfinite(v) and v > 0, "must be a positive number"),
    "batch_size": (lambda v: v >= 1, "must be at least 1"),
    "threads": (lambda v: v is None or v >= 1, "must be at least 1"),
    "size": (lambda v: v is None or v >= 1, "must be at least 1 px"),
    "resize": (lambda v: v is None or v >= 1, "must be at least 1 px"),
    "epochs": (lambda v: v >= 1, "must be at least 1"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "must be a positive number"),
    "momentum": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "must be a number >= 0"),
    "milestones": (lambda v: all(0 <= m <= 1 for m in v), "are fractions of the epochs, in [0, 1]"),
    "val_every": (lambda v: v >= 1, "must be at least 1"),
}
"""The options no later check refuses before work is done (or at all: kNN with T 0 divides by zero)."""


def _check_options(args) -> Optional[str]:
    """The first impossible option value, as the line to print; None when all can run."""
    for name, (valid, rule) in _OPTION_RULES.items():
        if hasattr(args, name) and not valid(getattr(args, name)):
            return f"--{name.replace('_', '-')} {rule}, got {getattr(args, name)}"
    if getattr(args, "json", None) and args.json.is_dir():
        return f"--json {args.json}: a folder; give the file to write"
    if getattr(args, "size", None) and getattr(args, "resize", None) and args.size > args.resize:
        return f"--size {args.size} is larger than --resize {args.resize} (the centre crop is taken after the resize)"
    return None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moco-eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="mode", required=True)

    def common(p, data=True):
        p.add_argument(
            "--checkpoint", type=Path, required=True, help="moco-train or reference MoCo checkpoint"
        )
        p.add_argument(
            "--arch", default=None, help="expected architecture (error if the checkpoint's differs)"
        )
        if data:
            p.add_argument(
                "--train", required=True, help="labelled shard folder (features / training)"
            )
            p.add_argument("--val", required=True, help="labelled shard folder to classify")
            p.add_argument(
                "--size", type=int, default=None, help="crop size (default: the run's data.size)"
            )
            p.add_argument(
                "--resize",
                type=int,
                default=None,
                help="shorter side before the centre crop (default: the run's data.eval_resize)",
            )
            p.add_argument("--batch-size", type=int, default=256)
            p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
            p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto")
            p.add_argument(
                "--threads", type=int, default=None, help="DALI CPU threads (default: all cores)"
            )
            p.add_argument(
                "--random-init",
                action="store_true",
                help="the run's encoder at step 0 instead of the trained one (a baseline)",
            )
            p.add_argument(
                "--json", type=Path, default=None, help="also write the result as JSON here"
            )

    k = sub.add_parser("knn", help="weighted kNN top-1/top-5 of the frozen query backbone")
    common(k)
    k.add_argument("--k", type=int, default=200, help="neighbours")
    k.add_argument(
        "--t", type=float, default=0.1, help="temperature of the exp(similarity / t) votes"
    )
    lin = sub.add_parser("linear", help="the paper's linear classification protocol")
    common(lin)
    lin.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for checkpoints and logs (default CKPT_DIR/linear)",
    )
    lin.add_argument("--epochs", type=int, default=100)
    lin.add_argument("--lr", type=float, default=30.0)
    lin.add_argument("--momentum", type=float, default=0.9)
    lin.add_argument("--weight-decay", type=float, default=0.0)
    lin.add_argument(
        "--milestones",
        type=float,
        nargs="+",
        default=[0.6, 0.8],
        help="fractions of the epochs where the rate drops x0.1",
    )
    lin.add_argument("--val-every", type=int, default=1, help="epochs between validations")
    lin.add_argument("--seed", type=int, default=0)
    lin.add_argument(
        "--restart", action="store_true", help="ignore a probe already in --out and start over"
    )
    lin.add_argument("--no-progress", action="store_true")
    e = sub.add_parser("export", help="the query backbone for torchvision or detectron2")
    common(e, data=False)
    e.add_argument("--format", choices=["torchvision", "detectron2"], required=True)
    e.add_argument("--out", type=Path, required=True)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="moco-eval: %(message)s")
    args = _parser().parse_args(argv)
    from ...pipeline.shards import ShardError
    from .pretrained import CheckpointError

    refused = _check_options(args)
    if refused:
        print(f"moco-eval: error: {refused}", file=sys.stderr)
        return 2
    try:
        record = {"knn": _knn, "linear": _linear, "export": _export}[args.mode](args)
        if getattr(args, "json", None):
            _write_json(args.json, record)
    except (CheckpointError, ShardError, ValueError) as exc:
        print(f"moco-eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _write_json(path: Path, record: dict) -> None:
    from ..checkpoint import write_atomic

    try:
        write_atomic(path, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))
    except OSError as error:
        raise ValueError(f"--json {path}: cannot write ({error.strerror or error})") from None


if __name__ == "__main__":
    sys.exit(main())
