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
* ``views``: what each view operator costs: the DALI pipeline timed with one left
  out at a time (not part of ``all`` unless ``--modes`` names it).
* ``scale``: a training rank's start-up time and host memory as the data set grows
  (synthetic shard folders of 1e4 to 1e6 samples, up to 1e5 shards; world 1, 8, 64),
  fitted and extrapolated to 1e9 samples (not part of ``all``).
* ``scale-build``: one part of a shard build, its memory and time to enumerate and
  order its share as the source grows (1e5 and 1e6 inputs), beside the design that
  held the whole listing, extrapolated to 1e9 inputs (not part of ``all``).
* ``all``: every mode in one run, one JSON (``--modes`` picks some). A mode that
  fails is recorded with its error and the others still run (exit 1).
  ``--compare A.json B.json`` sets the headline figures of two records side by side;
  ``--chart FILE.png`` draws them.

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

from ...model.encoders import ARCHS
from .common import shards_for, synthetic_photos
from .machine import describe
from .momentum import bench_momentum, print_momentum
from .pipeline import bench_pipeline, print_pipeline
from .report import chart, compare, headline

__all__ = ["main", "positive_int"]

MODES = ("pipeline", "momentum", "step", "e2e", "shards")
OPTIONAL_MODES = ("views",)  # ``all --modes`` may name them; plain ``all`` leaves them out


class UsageError(ValueError):
    """A user mistake on the command line, found before any work: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``moco-bench MODE: error: ...``), exit 2, and no usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (counts, sizes, repetitions)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _parser(gpu: bool, cores: int) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moco-bench",
        description=__doc__.split("\n\n")[0],
        epilog="moco-bench --compare A.json B.json: two records side by side",
    )
    sub = parser.add_subparsers(dest="mode", required=True)

    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--device", default="cuda:0" if gpu else "cpu")
    out.add_argument(
        "--reps", type=positive_int, default=3, help="alternating repetitions (median reported)"
    )
    out.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    out.add_argument(
        "--chart", type=Path, default=None, help="draw the headline figures as a PNG here"
    )

    data = argparse.ArgumentParser(add_help=False)
    data.add_argument(
        "--shards", type=Path, default=None, help="shard folder (default: --synthetic photos)"
    )
    data.add_argument(
        "--synthetic",
        type=positive_int,
        default=2000 if gpu else 200,
        metavar="N",
        help="without --shards: generate N ImageNet-like JPEGs (~500x375, ~110 KB) and shard them",
    )
    data.add_argument("--batch", type=positive_int, default=256 if gpu else 16)
    data.add_argument(
        "--size", type=positive_int, default=224 if gpu else 112, help="view size in px"
    )
    data.add_argument(
        "--batches", type=positive_int, default=50 if gpu else 3, help="timed batches per rep"
    )
    data.add_argument("--warmup", type=positive_int, default=10 if gpu else 1)
    data.add_argument(
        "--hue-space",
        choices=["hsv", "yiq"],
        default="hsv",
        help="DALI hue: exact HSV shift (default) or DALI's cheaper YIQ rotation",
    )
    data.add_argument(
        "--threads", type=positive_int, default=None, help="DALI CPU threads (default: all cores)"
    )
    data.add_argument(
        "--workers", type=positive_int, default=cores, help="reference DataLoader workers"
    )
    data.add_argument("--hw-decoder-load", type=_fraction, default=0.75)

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--arch", choices=ARCHS, default="resnet50" if gpu else "resnet18")
    model.add_argument("--K", type=positive_int, default=65536 if gpu else 4096, help="queue size")

    train = argparse.ArgumentParser(add_help=False)
    train.add_argument(
        "--amp",
        choices=["auto", "bf16", "fp16", "none"],
        default="auto",
        help="ours: autocast dtype",
    )
    train.add_argument("--compile", action="store_true", help="ours: torch.compile the encoders")

    pipe = argparse.ArgumentParser(add_help=False)
    pipe.add_argument("--preset", choices=["v1", "v2"], default="v2")
    pipe.add_argument("--dtype", choices=["float16", "float32"], default="float16")

    mom = argparse.ArgumentParser(add_help=False)
    mom.add_argument(
        "--mlp", action=argparse.BooleanOptionalAction, default=True, help="MoCo v2's MLP head"
    )
    mom.add_argument(
        "--calls", type=positive_int, default=20 if gpu else 5, help="timed calls per rep"
    )

    shards = argparse.ArgumentParser(add_help=False)
    shards.add_argument(
        "--photos",
        type=Path,
        default=None,
        help="shards mode: folder of *.jpg to build from (default: the --synthetic photos)",
    )
    shards.add_argument(
        "--build-workers",
        default=None,
        help="shards mode: comma-separated worker counts (default 1, 2, 4, ... cores)",
    )

    sub.add_parser(
        "pipeline",
        parents=[out, data, pipe],
        help="view pairs/s of the DALI pipeline beside the reference loader",
    )
    sub.add_parser(
        "views",
        parents=[out, data, pipe],
        help="what each view operator costs: the DALI pipeline with one left out at a time",
    )
    m = sub.add_parser(
        "momentum",
        parents=[out, mom],
        help="momentum update vs the per-parameter loop and the floor",
    )
    m.add_argument("--arch", choices=ARCHS, default="resnet50")
    m.add_argument("--K", type=positive_int, default=65536)
    m.add_argument(
        "--batch", type=positive_int, default=256, help="keys enqueued per step (the global batch)"
    )
    sub.add_parser(
        "step",
        parents=[out, data, model, train],
        help="training step on synthetic tensors, ours vs reference",
    )
    sub.add_parser(
        "e2e", parents=[out, data, model, train], help="shards through the pipeline into the step"
    )
    s = sub.add_parser(
        "shards", parents=[out, shards], help="moco-shards build vs PIL + webdataset.ShardWriter"
    )
    s.add_argument("--synthetic", type=positive_int, default=2000 if gpu else 200, metavar="N")
    sb = sub.add_parser(
        "scale-build",
        parents=[out],
        help="shard builder memory and time per part as the source grows",
    )
    sb.add_argument("--sizes", default="1e5,1e6", help="comma-separated input counts")
    sb.add_argument(
        "--parts", default="1,100", help="comma-separated part counts (part 0 is measured)"
    )
    sb.add_argument(
        "--kinds",
        default="list",
        help="comma-separated sources: list (a list file), folder (empty files)",
    )
    every = sub.add_parser(
        "all", parents=[out, data, model, train, pipe, mom, shards], help="every mode, one record"
    )
    every.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated, from {','.join(MODES + OPTIONAL_MODES)} (default {','.join(MODES)})",
    )
    from .scale import add_arguments as scale_arguments

    scale_arguments(
        sub.add_parser(
            "scale", parents=[out], help="per-rank start-up and memory as the data grows"
        )
    )
    return parser


def _write_atomic(path: Path, record: dict) -> None:
    from ...pipeline.shards import write_atomic

    data = (json.dumps(record, indent=1) + "\n").encode()
    write_atomic(path, lambda f: f.write(data))


def _write_partial(path: Path, record: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, record)
    except OSError:
        pass  # the final write reports an unwritable --out; this copy is only insurance


def _run_one(mode: str, args) -> dict:
    """One mode of ``all``: a failure is recorded with its error, so the modes after it still run.

    A first run on new hardware (a GPU never used before) is where a mode breaks;
    losing every other mode's figures with it would waste the machine's time.
    """
    try:
        return _run(mode, args)
    except Exception as exc:  # noqa: BLE001 - any failure of one mode, reported in its record
        import traceback

        traceback.print_exc()
        return {"mode": mode, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}


def _run(mode: str, args) -> dict:
    if mode == "pipeline":
        return bench_pipeline(args)
    if mode == "momentum":
        return bench_momentum(args)
    if mode == "views":
        from .views import bench_views

        return bench_views(args)
    if mode in ("step", "e2e"):
        from .step import bench_e2e, bench_step

        return bench_step(args) if mode == "step" else bench_e2e(args, str(shards_for(args)[0]))
    if mode == "scale":
        from .scale import bench_scale

        return bench_scale(args)
    if mode == "shards":
        from .shards import bench_shards

        photos, info = (args.photos, None) if args.photos else synthetic_photos(args)
        workers = [int(w) for w in args.build_workers.split(",")] if args.build_workers else None
        return bench_shards(photos, args.reps, workers, photoset=info)
    if mode == "scale-build":
        from .scale_build import bench_scale_build

        return bench_scale_build(args)
    raise ValueError(mode)


def _print(record: dict) -> None:
    from .scale import print_scale
    from .scale_build import print_scale_build
    from .shards import print_shards
    from .step import print_e2e, print_step
    from .views import print_views

    printers = {
        "pipeline": print_pipeline,
        "views": print_views,
        "momentum": print_momentum,
        "step": print_step,
        "e2e": print_e2e,
        "shards": print_shards,
        "scale": print_scale,
        "scale-build": print_scale_build,
    }
    if record["mode"] == "all":
        for sub in record["records"].values():
            if "error" in sub:
                print(f"{sub['mode']}: FAILED: {sub['error']}")
            else:
                printers[sub["mode"]](sub)
            print()
    else:
        printers[record["mode"]](record)


def _writable(option: str, path: Path) -> None:
    """Find an ``--out``/``--chart`` that cannot be written before the run, leaving nothing behind."""
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{option} {path}: cannot write: read-only file")
    missing, parent = [], path.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: {parent} is not a folder")
    probe = path.with_name(f".{path.name}.{os.getpid()}.probe")
    try:
        for folder in reversed(missing):
            folder.mkdir()
        probe.touch(exist_ok=False)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write: {exc.strerror or exc}") from None
    finally:
        probe.unlink(missing_ok=True)
        for folder in missing:  # deepest first: the run makes them again when it writes
            try:
                folder.rmdir()
            except OSError:
                pass


def _counts(option: str, text: str, parse=int) -> list[int]:
    """A comma-separated list of counts of at least 1 (``--build-workers 1,2``, ``--sizes 1e5,1e6``)."""
    try:
        values = [parse(part) for part in str(text).split(",")]
    except ValueError:
        raise UsageError(f"{option} {text}: expected comma-separated whole numbers") from None
    if not all(value >= 1 for value in values):
        raise UsageError(f"{option} {text}: every value must be at least 1")
    return values


def _validate(args, gpu: bool) -> None:
    """Every check of the parsed arguments that argparse's types cannot make, before any work.

    Raises:
        UsageError: naming the option (and file) at fault.
    """
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(
            f"--device {args.device}: not a device; give cpu, cuda or cuda:N"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: moco-bench measures on cpu or cuda")
    if device.type == "cuda" and not gpu:
        raise UsageError(f"--device {args.device}: no CUDA GPU here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(
            f"--device {args.device}: this machine has {torch.cuda.device_count()} GPU(s)"
        )
    mode = args.mode
    if getattr(args, "shards", None) is not None:
        from ...pipeline.shards import ShardError, discover

        try:  # the pipeline's own reading: manifest, every shard present, no stale index
            discover(args.shards)
        except ShardError as exc:
            where = str(exc) if str(exc).startswith(str(args.shards)) else f"{args.shards}: {exc}"
            raise UsageError(f"--shards {where}") from None
    if getattr(args, "photos", None) is not None and mode in ("shards", "all"):
        if not args.photos.is_dir():
            raise UsageError(f"--photos {args.photos}: no such folder")
        if next(args.photos.glob("*.jpg"), None) is None:
            raise UsageError(f"--photos {args.photos}: no *.jpg files to build shards from")
    if mode == "all":
        unknown = [m for m in args.modes.split(",") if m not in MODES + OPTIONAL_MODES]
        if unknown or not args.modes:
            raise UsageError(
                f"--modes {args.modes}: choose from {','.join(MODES + OPTIONAL_MODES)}"
            )
    if getattr(args, "build_workers", None):
        _counts("--build-workers", args.build_workers)
    if mode in ("momentum", "step", "e2e", "all") and args.K < args.batch:
        # the queue's rule (KeyQueue.enqueue): a step enqueues the whole batch
        raise UsageError(
            f"--K {args.K}: the queue must hold at least one batch (--batch {args.batch})"
        )
    if mode in ("step", "e2e", "all"):
        from ...train.config import preset

        splits = preset(
            "v2"
        ).model.num_splits  # the step measures split-BN over this many sub-batches
        if args.batch % splits or args.batch < 2 * splits:
            raise UsageError(
                f"--batch {args.batch}: split batch norm needs a multiple of {splits} with at least "
                f"2 samples per split (e.g. {2 * splits})"
            )
    if mode == "scale":
        if args.batch < 1 or args.threads < 1:
            option, value = (
                ("--batch", args.batch) if args.batch < 1 else ("--threads", args.threads)
            )
            raise UsageError(f"{option} {value}: must be at least 1")
        _counts("--worlds", args.worlds)
        for folder in args.folders.split(",") if args.folders else []:
            samples, _, shards = folder.partition(":")
            counts = _counts("--folders", f"{samples},{shards}", lambda t: int(float(t)))
            if counts[1] > counts[0]:
                raise UsageError(f"--folders {folder}: more shards than samples")
        if args.root is not None and args.root.exists() and not args.root.is_dir():
            raise UsageError(f"--root {args.root}: not a folder")
        if (
            args.pipeline_from is not None
            and not (args.pipeline_from / "pipeline" / "__init__.py").is_file()
        ):
            raise UsageError(f"--pipeline-from {args.pipeline_from}: no pipeline/ package in it")
    if mode == "scale-build":
        _counts("--sizes", args.sizes, lambda t: int(float(t)))
        _counts("--parts", args.parts)
        unknown = set(args.kinds.split(",")) - {"list", "folder"}
        if unknown:
            raise UsageError(
                f"--kinds {args.kinds}: unknown source {sorted(unknown)[0]!r}; choose list or folder"
            )
    for option, path in (("--out", args.out), ("--chart", args.chart)):
        if path is not None:
            _writable(option, path)


def _record(path: Path) -> None:
    """Check that ``path`` holds a moco-bench record whose headline figures ``compare`` can set side by side."""
    try:
        record = json.loads(Path(path).read_text())
        rows = headline(record)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise UsageError(f"{path}: not a moco-bench record ({type(exc).__name__}: {exc})") from None
    for row in rows:
        for key in ("ours", "reference"):
            value = row.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise UsageError(
                    f"{path}: not a moco-bench record ({row.get('figure')}: {key} is {value!r})"
                )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``moco-bench``: 0 when the record is made; 1 when ``all`` made it but a mode failed (its error is in
    the record); 2 for a user mistake, in one line, before any work."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--compare"]:
        if len(argv) != 3:
            print(
                "moco-bench: error: --compare takes two JSON records: --compare A.json B.json",
                file=sys.stderr,
            )
            return 2
        try:
            _record(Path(argv[1]))
            _record(Path(argv[2]))
            compare(Path(argv[1]), Path(argv[2]))
        except ValueError as exc:
            print(f"moco-bench: error: --compare {exc}", file=sys.stderr)
            return 2
        return 0
    gpu = torch.cuda.is_available()
    parser = _parser(gpu, len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
    try:
        _validate(args, gpu)
    except UsageError as exc:
        print(f"moco-bench {args.mode}: error: {exc}", file=sys.stderr)
        return 2
    machine = describe()
    try:
        if args.mode == "all":
            records = {}
            # views last: it only explains the pipeline's figure, the others are the goals
            for mode in [m for m in MODES + OPTIONAL_MODES if m in args.modes.split(",")]:
                print(f"moco-bench all: {mode}", file=sys.stderr, flush=True)
                records[mode] = _run_one(mode, args)
                records[mode].update(date=time.strftime("%Y-%m-%d"))
                if args.out:  # a run stopped part-way still leaves the modes that finished
                    _write_partial(
                        args.out,
                        {
                            "mode": "all",
                            "records": records,
                            "partial": True,
                            "date": time.strftime("%Y-%m-%d"),
                            "machine": machine,
                        },
                    )
            record = {"mode": "all", "records": records}
        else:
            record = _run(args.mode, args)
    except ValueError as exc:
        print(f"moco-bench: error: {exc}", file=sys.stderr)
        return 2
    record.update(date=time.strftime("%Y-%m-%d"), machine=machine)
    if record["mode"] == "all":
        for sub in record["records"].values():
            sub["machine"] = record["machine"]
    _print(record)
    if args.out:
        try:  # checked before the run; this is a disk that filled or a folder that went meanwhile
            args.out.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(
                args.out, record
            )  # a run stopped while writing leaves the last whole record
        except OSError as exc:
            print(
                f"moco-bench: error: --out {args.out}: cannot write: {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 2
        print(f"wrote {args.out}")
    if args.chart and not headline(record):
        print(f"no chart: no mode made a figure ({args.chart} not written)", file=sys.stderr)
    elif args.chart:
        try:
            print(f"wrote {chart(record, args.chart)}")
        except (ValueError, OSError) as exc:
            print(f"moco-bench: error: --chart {args.chart}: {exc}", file=sys.stderr)
            return 2
    failed = [sub["mode"] for sub in record.get("records", {}).values() if "error" in sub]
    if failed:
        print(
            f"moco-bench all: {', '.join(failed)} failed (their errors are in the record)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
