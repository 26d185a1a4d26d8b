"""``moco-eval``: measure and move pretrained features.

    moco-eval knn    --checkpoint CKPT --train SHARDS --val SHARDS [--k 200 --t 0.1]
    moco-eval linear --checkpoint CKPT --train SHARDS --val SHARDS [--epochs 100 --lr 30]
    moco-eval export --checkpoint CKPT --format torchvision|detectron2 --out FILE

Reads moco-train checkpoints and the reference MoCo code's (never running code a file
carries). Exit codes: 0 done, 2 a bad checkpoint, shard folder, option or output (one line
naming it). Each subcommand's options are a dataclass below; their rules are its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ...common.commandline import Parser, add_flags, from_flags
from ...common.files import unwritable, write_json_atomic
from ...common.options import FLAT, OptionError, option
from ...pipeline.cache import load_manifest
from ...pipeline.shards import ShardError
from .protocol import EvalViews, LinearConfig

__all__ = ["main", "Source", "Inputs", "KnnOptions", "LinearOptions", "ExportOptions"]

log = logging.getLogger("moco-eval")


@dataclass
class Source:
    """The checkpoint whose query encoder is measured or exported."""

    checkpoint: Path = option(required=True)
    """moco-train or reference MoCo checkpoint."""
    arch: Optional[str] = None
    """Expected architecture (an error if the checkpoint's differs)."""


@dataclass
class Inputs:
    """The labelled shard folders a measurement reads, and where it runs."""

    train: str = option(required=True)
    """Labelled shard folder (features / training)."""
    val: str = option(required=True)
    """Labelled shard folder to classify."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    amp: str = option("auto", choices=["auto", "bf16", "fp16", "none"])
    """Autocast dtype of the backbone."""
    random_init: bool = False
    """The run's encoder at step 0 instead of the trained one (a baseline)."""
    json: Optional[Path] = None
    """Also write the result as JSON here."""

    def __post_init__(self) -> None:
        if self.json is not None and self.json.is_dir():
            raise ValueError(f"--json {self.json}: a folder; give the file to write")


@dataclass
class KnnOptions:
    source: Source = option(factory=Source, **FLAT)
    inputs: Inputs = option(factory=Inputs, **FLAT)
    views: EvalViews = option(factory=EvalViews, **FLAT)
    k: int = 200
    """Neighbours that vote."""
    t: float = 0.1
    """Temperature of the exp(similarity / t) votes."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"--k must be at least 1, got {self.k}")
        if not (math.isfinite(self.t) and self.t > 0):
            raise ValueError(f"--t must be a positive number, got {self.t}")


@dataclass
class LinearOptions:
    source: Source = option(factory=Source, **FLAT)
    inputs: Inputs = option(factory=Inputs, **FLAT)
    probe: LinearConfig = option(factory=LinearConfig, **FLAT)
    out: Optional[Path] = None
    """Folder for checkpoints and logs (default CKPT_DIR/linear)."""
    restart: bool = False
    """Ignore a probe already in --out and start over."""


@dataclass
class ExportOptions:
    source: Source = option(factory=Source, **FLAT)
    format: str = option(required=True, choices=["torchvision", "detectron2"])
    """The layout to write."""
    out: Path = option(required=True)
    """The file to write."""


def _device(name: str):
    import torch  # deliberately late: --help and a refused option answer before torch loads

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU here")
    return torch.device(name)


def _amp(name: str, device):
    from ..step import amp_dtype  # lazily, as torch: after the command line is checked

    if name == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA GPU")
    return amp_dtype(name, device)


def _sizes(views: EvalViews, info) -> EvalViews:
    """Crop and resize: given, or the pretraining run's (224 / 256 for a reference checkpoint)."""
    data = (info.config or {}).get("data", {})
    size = views.size or data.get("views", {}).get("size") or data.get("size", 224)
    resize = views.resize or data.get("eval_resize", max(size, round(size * 256 / 224)))
    return dataclasses.replace(views, size=size, resize=resize)


def _labelled(inputs: Inputs, mode: str) -> None:
    """Both folders hold labelled shards, known from their manifests alone: an unlabelled folder
    is refused before a checkpoint is loaded or a pipeline built."""
    for name, folder in (("--train", inputs.train), ("--val", inputs.val)):
        if not load_manifest(folder).classes:
            raise ValueError(
                f"{name} {folder}: the shards have no labels (its manifest names no class); "
                f"moco-eval {mode} needs labelled shards (build with --labels folder or archive, "
                "or --labels-file)"
            )


def _knn(opts: KnnOptions) -> dict:
    _labelled(opts.inputs, "knn")
    # Imported lazily: torch and DALI load after the command line is checked.
    import torch

    from ...pipeline.recipes import EvalConfig
    from .knn import extract_features, knn_classify
    from .pretrained import load_encoder

    source, inputs = opts.source, opts.inputs
    device = _device(inputs.device)
    amp = _amp(inputs.amp, device)
    encoder, info = load_encoder(source.checkpoint, source.arch, random_init=inputs.random_init)
    encoder = encoder.to(device).to(memory_format=torch.channels_last)
    views = _sizes(opts.views, info)
    view = EvalConfig(resize=views.resize, size=views.size)
    started = time.perf_counter()
    common = dict(batch_size=views.batch_size, device=device, amp_dtype=amp, threads=views.threads)
    train_f, train_y, classes = extract_features(encoder, inputs.train, view, **common)
    val_f, val_y, val_classes = extract_features(encoder, inputs.val, view, **common)
    if val_classes != classes:
        raise ValueError(f"--val {inputs.val}: {val_classes} classes, --train has {classes}")
    result = knn_classify(train_f, train_y, val_f, val_y, classes, k=opts.k, t=opts.t)
    record = {
        "mode": "knn",
        "checkpoint": str(source.checkpoint),
        "random_init": inputs.random_init,
        "arch": info.arch,
        "step": info.step,
        "k": opts.k,
        "t": opts.t,
        "size": views.size,
        "resize": views.resize,
        "train": str(inputs.train),
        "val": str(inputs.val),
        "train_samples": len(train_y),
        "val_samples": len(val_y),
        **result,
        "seconds": time.perf_counter() - started,
        "device": str(device),
    }
    when = "at initialisation" if inputs.random_init else f"at step {info.step}"
    print(
        f"moco-eval knn: {info.arch} {when}: top-1 {result['top1']:.2f}% top-5 "
        f"{result['top5']:.2f}% (k={opts.k}, T={opts.t}, {len(train_y)} train / {len(val_y)} "
        f"val images, {views.size} px)"
    )
    return record


def _linear(opts: LinearOptions) -> dict:
    _labelled(opts.inputs, "linear")
    # Imported lazily: torch and DALI load after the command line is checked.
    from .linear import linear_probe
    from .pretrained import load_encoder

    source, inputs = opts.source, opts.inputs
    device = _device(inputs.device)
    amp = _amp(inputs.amp, device)
    encoder, info = load_encoder(source.checkpoint, source.arch, random_init=inputs.random_init)
    probe = dataclasses.replace(opts.probe, views=_sizes(opts.probe.views, info))
    out = opts.out or Path(source.checkpoint).parent / "linear"
    result = linear_probe(
        encoder, inputs.train, inputs.val, probe, out, device, amp, resume=not opts.restart
    )
    when = "at initialisation" if inputs.random_init else f"at step {info.step}"
    print(
        f"moco-eval linear: {info.arch} {when}: top-1 {result['top1']:.2f}% "
        f"top-5 {result['top5']:.2f}% after {probe.epochs} epochs (best top-1 "
        f"{result['best_top1']:.2f}%); backbone unchanged; {out / 'linear.json'}"
    )
    return {
        "mode": "linear",
        "checkpoint": str(source.checkpoint),
        "arch": info.arch,
        "step": info.step,
        **result,
    }


def _export(opts: ExportOptions) -> dict:
    from .pretrained import export, load_encoder  # lazily: torch, after the checks

    encoder, info = load_encoder(opts.source.checkpoint, opts.source.arch)
    out = export(encoder, opts.format, opts.out)
    stem = (
        " (small-image stem: replace conv1 with a 3x3/1 conv and maxpool with Identity before "
        "loading)"
        if info.small_stem
        else ""
    )
    print(
        f"moco-eval export: {info.arch} query backbone of {opts.source.checkpoint} as "
        f"{opts.format} -> {out}{stem}"
    )
    return {
        "mode": "export",
        "checkpoint": str(opts.source.checkpoint),
        "format": opts.format,
        "out": str(out),
    }


COMMANDS = {
    "knn": (KnnOptions, _knn, "weighted kNN top-1/top-5 of the frozen query backbone"),
    "linear": (LinearOptions, _linear, "the paper's linear classification protocol"),
    "export": (ExportOptions, _export, "the query backbone for torchvision or detectron2"),
}


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="moco-eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name, (options, _, summary) in COMMANDS.items():
        add_flags(
            sub.add_parser(
                name, help=summary, formatter_class=argparse.ArgumentDefaultsHelpFormatter
            ),
            options,
        )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="moco-eval: %(message)s")
    try:
        args = _parser().parse_args(argv)
    except OptionError as exc:
        print(f"{exc.prog}: error: {exc}", file=sys.stderr)
        return 2
    options, run, _ = COMMANDS[args.mode]
    from .pretrained import CheckpointError  # lazily: torch, once the command line is good

    try:
        opts = from_flags(options, args)
        record = run(opts)
        json_path = getattr(getattr(opts, "inputs", None), "json", None)
        if json_path is not None:
            _write_json(json_path, record)
    except (CheckpointError, ShardError, ValueError) as exc:
        print(f"moco-eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _write_json(path: Path, record: dict) -> None:
    why = unwritable("--json", path, folder=False)
    if why:
        raise ValueError(why)
    try:
        write_json_atomic(path, record, sort_keys=False)
    except OSError as error:
        raise ValueError(f"--json {path}: cannot write ({error.strerror or error})") from None


if __name__ == "__main__":
    sys.exit(main())
