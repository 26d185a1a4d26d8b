"""``moco-bench``: throughput benchmarks, this project's path beside the reference path.

What is measured is the training tree, set as for ``moco-train`` (``--preset``, ``--config``,
``--data.batch_size 256`` ...); how it is measured is ``BenchOptions``. Modes: ``pipeline``
(view pairs/s, DALI against the torchvision loader), ``momentum`` (the update against the loop
and the bandwidth floor), ``step`` and ``e2e`` (the training step on synthetic tensors, and end
to end from shards), ``shards`` (the builder), ``index`` (index against build), ``store`` (reading
from S3 through the cache against local disk), ``views`` (each view operator's cost), ``scale``
and ``scale-build`` (start-up and the builder as the data grows), ``all`` (one record); modes
are modules of their own, docs/benchmarks.md says what each measures. Exit: 0 the record is
made; 1 ``all`` made it but a mode failed (its error is in the record); 2 a user mistake, in
one line, before any work.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

import torch

from ...common.commandline import Parser, add_flags, from_flags, parse_known
from ...common.files import unwritable, write_json_atomic
from ...common.options import OptionError
from ...common.store import ObjectURL, StoreError
from ...pipeline.shards import ShardError, discover
from ...train.cli import add_tree_arguments, tree_from_arguments
from ...train.config import Config, ConfigError, check_batch
from ...train.step import build_model, build_optimizer
from .common import shards_for, synthetic_photos
from .index import bench_index, print_index
from .machine import describe
from .momentum import bench_momentum, print_momentum
from .options import MODES, OPTIONAL_MODES, BenchOptions, Measure, machine_defaults, mode_defaults
from .pipeline import bench_pipeline, print_pipeline
from .report import chart, compare, headline
from .report import load as load_record
from .scale import bench_scale, print_scale
from .scale_build import bench_scale_build, print_scale_build
from .shards import bench_shards, print_shards
from .step import bench_e2e, bench_step, print_e2e, print_step
from .store import bench_store, print_store
from .views import bench_views, print_views

__all__ = ["main"]

COMMON = ("device", "reps", "out", "chart")
DATA = ("shards", "synthetic", "batches", "warmup", "workers")
OPTIONS = {
    "pipeline": COMMON + DATA,
    "views": COMMON + DATA,
    "momentum": COMMON + ("calls",),
    "step": COMMON + DATA,
    "e2e": COMMON + DATA,
    "shards": COMMON + ("synthetic", "photos", "build_workers"),
    "index": COMMON + ("synthetic", "photos", "growth"),
    "store": COMMON + ("shards", "synthetic", "store", "bandwidth_mb_s", "latency_ms"),
    "scale": COMMON + ("root", "folders", "worlds", "pipeline_from"),
    "scale-build": COMMON + ("sizes", "parts", "kinds"),
    "all": COMMON + DATA + ("calls", "photos", "build_workers", "modes"),
}
"""The options each mode takes (all of them ``BenchOptions`` fields)."""
HELP = {
    "pipeline": "view pairs/s of the DALI pipeline beside the reference loader",
    "views": "what each view operator costs: the DALI pipeline with one left out at a time",
    "momentum": "momentum update vs the per-parameter loop and the bandwidth floor",
    "step": "training step on synthetic tensors, ours vs reference",
    "e2e": "shards through the pipeline into the step",
    "shards": "moco-shards build vs PIL + webdataset.ShardWriter",
    "index": "moco-shards index vs build on the same img2dataset-shaped tars",
    "store": "view pairs/s from S3 through the cache vs from local disk",
    "scale": "per-rank start-up and memory as the data grows",
    "scale-build": "shard builder memory and time per part as the source grows",
    "all": "every mode, one record",
}
PRINT = {
    "pipeline": print_pipeline,
    "views": print_views,
    "momentum": print_momentum,
    "step": print_step,
    "e2e": print_e2e,
    "shards": print_shards,
    "index": print_index,
    "store": print_store,
    "scale": print_scale,
    "scale-build": print_scale_build,
}


def _shards(measure: Measure) -> dict:
    options = measure.options
    photos, info = (options.photos, None) if options.photos else synthetic_photos(measure)
    workers = [int(w) for w in options.build_workers.split(",")] if options.build_workers else None
    return bench_shards(photos, options.reps, workers, photoset=info)


def _index(measure: Measure) -> dict:
    options = measure.options
    photos, info = (options.photos, None) if options.photos else synthetic_photos(measure)
    growth = _counts("--growth", options.growth, _whole) if options.growth else None
    return bench_index(photos, options.reps, photoset=info, growth=growth)


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moco-bench",
        description=__doc__.split("\n\n")[0],
        epilog="moco-bench --compare A.json B.json: two records side by side",
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode, names in OPTIONS.items():
        p = sub.add_parser(mode, help=HELP[mode], error_prefix="")
        add_flags(p, BenchOptions, only=names)
        if mode not in ("shards", "index", "scale-build"):  # what they measure is not training
            add_tree_arguments(p)
    return parser


MAX_GROWTH = 10**8


def _whole(text: str) -> int:
    """``1e6`` or ``1000000``: a float's spelling of a whole number, as ``--sizes`` takes."""
    value = float(text)
    if not value.is_integer():
        raise ValueError(text)
    return int(value)


def _counts(option: str, text: str, parse=int) -> list[int]:
    """A comma-separated list of counts of at least 1 (``--build-workers 1,2``, ``--sizes 1e5,1e6``)."""
    try:
        values = [parse(part) for part in str(text).split(",")]
    except ValueError:
        raise OptionError(f"{option} {text}: expected comma-separated whole numbers") from None
    if not all(value >= 1 for value in values):
        raise OptionError(f"{option} {text}: every value must be at least 1")
    return values


def _check(mode: str, options: BenchOptions, trees: dict[str, Config], gpu: bool) -> None:
    """Every check that argparse's types and the classes cannot make, before any work.

    Raises ``OptionError`` naming the option, key or file at fault.
    """
    try:
        device = torch.device(options.device)
    except RuntimeError:
        raise OptionError(
            f"--device {options.device}: not a device; give cpu, cuda or cuda:N"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise OptionError(f"--device {options.device}: moco-bench measures on cpu or cuda")
    if device.type == "cuda" and not gpu:
        raise OptionError(f"--device {options.device}: no CUDA GPU here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise OptionError(
            f"--device {options.device}: this machine has {torch.cuda.device_count()} GPU(s)"
        )
    if options.shards is not None:
        try:  # the pipeline's own reading: manifest, every shard present, no stale index
            discover(options.shards)
        except ShardError as exc:
            where = (
                str(exc) if str(exc).startswith(str(options.shards)) else f"{options.shards}: {exc}"
            )
            raise OptionError(f"--shards {where}") from None
    if options.photos is not None and mode in ("shards", "index", "all"):
        if not options.photos.is_dir():
            raise OptionError(f"--photos {options.photos}: no such folder")
        if next(options.photos.glob("*.jpg"), None) is None:
            raise OptionError(f"--photos {options.photos}: no *.jpg files to build shards from")
    if mode == "store" and options.store is not None:
        try:
            ObjectURL.parse(options.store)
        except StoreError as exc:
            raise OptionError(f"--store {exc}") from None
    if options.build_workers:
        _counts("--build-workers", options.build_workers)
    if options.growth:
        for samples in _counts("--growth", options.growth, _whole):
            if samples > MAX_GROWTH:  # a tiny JPEG is ~1 KB of tar: 1e8 is 100 GB of scratch
                raise OptionError(f"--growth {options.growth}: at most {MAX_GROWTH:,} samples")
    meta = torch.device("meta")
    for name, tree in trees.items():
        if name in ("step", "e2e", "momentum"):  # what the measured step is built from
            check_batch(tree, world=1)
            build_optimizer(tree, build_model(tree, meta), meta)
    if mode == "scale":
        _counts("--worlds", options.worlds)
        for folder in options.folders.split(",") if options.folders else []:
            samples, _, shards = folder.partition(":")
            counts = _counts("--folders", f"{samples},{shards}", _whole)
            if counts[1] > counts[0]:
                raise OptionError(f"--folders {folder}: more shards than samples")
        if options.root is not None and options.root.exists() and not options.root.is_dir():
            raise OptionError(f"--root {options.root}: not a folder")
        pipeline_from = options.pipeline_from
        if pipeline_from is not None and not (pipeline_from / "pipeline" / "__init__.py").is_file():
            raise OptionError(f"--pipeline-from {pipeline_from}: no pipeline/ package in it")
    if mode == "scale-build":
        _counts("--sizes", options.sizes, _whole)
        _counts("--parts", options.parts)
        unknown = set(options.kinds.split(",")) - {"list", "folder"}
        if unknown:
            raise OptionError(
                f"--kinds {options.kinds}: unknown source {sorted(unknown)[0]!r}; choose list or folder"
            )
    for flag, path in (("--out", options.out), ("--chart", options.chart)):
        if path is not None and (why := unwritable(flag, path, folder=False)):
            raise OptionError(why)


def _modes(mode: str, options: BenchOptions) -> list[str]:
    if mode != "all":
        return [mode]
    asked = options.modes.split(",")
    unknown = [m for m in asked if m not in MODES + OPTIONAL_MODES]
    if unknown or not options.modes:
        raise OptionError(
            f"--modes {options.modes}: choose from {','.join(MODES + OPTIONAL_MODES)}"
        )
    # In the order asked (the GPU session puts e2e first: the figure users read first);
    # without --modes, views (which only explains the pipeline's figure) is left out.
    return list(dict.fromkeys(asked))


def _run(mode: str, measure: Measure) -> dict:
    runs = {
        "pipeline": bench_pipeline,
        "views": bench_views,
        "momentum": bench_momentum,
        "step": bench_step,
        "e2e": lambda m: bench_e2e(m, str(shards_for(m)[0])),
        "scale": bench_scale,
        "scale-build": bench_scale_build,
        "shards": _shards,
        "index": _index,
        "store": bench_store,
    }
    return runs[mode](measure)


def _run_one(mode: str, measure: Measure) -> dict:
    """One mode of ``all``: a failure is recorded with its error, so the modes after it still run.

    A first run on new hardware (a GPU never used before) is where a mode breaks; losing every
    other mode's figures with it would waste the machine's time.
    """
    try:
        return _run(mode, measure)
    except Exception as exc:  # noqa: BLE001 - any failure of one mode, reported in its record
        traceback.print_exc()
        return {"mode": mode, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}


def _print(record: dict) -> None:
    if record["mode"] != "all":
        PRINT[record["mode"]](record)
        return
    for sub in record["records"].values():
        if "error" in sub:
            print(f"{sub['mode']}: FAILED: {sub['error']}")
        else:
            PRINT[sub["mode"]](sub)
        print()


def _compare(argv: list[str]) -> int:
    if len(argv) != 3:
        print(
            "moco-bench: error: --compare takes two JSON records: --compare A.json B.json",
            file=sys.stderr,
        )
        return 2
    try:
        load_record(Path(argv[1]))  # both checked before any is printed
        load_record(Path(argv[2]))
        compare(Path(argv[1]), Path(argv[2]))
    except ValueError as exc:
        print(f"moco-bench: error: --compare {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--compare"]:
        return _compare(argv)
    gpu = torch.cuda.is_available()
    mode = argv[0] if argv and not argv[0].startswith("-") else "moco-bench"
    try:
        args = parse_known(_parser(), argv, Config)
        mode = args.mode
        options = machine_defaults(from_flags(BenchOptions, args), gpu)
        trees = {
            m: tree_from_arguments(args, defaults=mode_defaults(m, gpu))
            for m in _modes(mode, options)
            if m not in ("shards", "index", "scale-build")
        }
        _check(mode, options, trees, gpu)
    except (OptionError, ValueError) as exc:
        prefix = getattr(exc, "prog", None) or (
            f"moco-bench {mode}" if mode != "moco-bench" else "moco-bench"
        )
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return 2
    machine, shared = describe(), {}
    measures = {m: Measure(options, trees.get(m, Config()), shared) for m in _modes(mode, options)}
    if mode == "all":
        records = {}
        for name, measure in measures.items():
            print(f"moco-bench all: {name}", file=sys.stderr, flush=True)
            started = time.monotonic()
            records[name] = _run_one(name, measure)
            # What the mode took in all, set-up included: each must fit its budget on a GPU.
            records[name].update(date=time.strftime("%Y-%m-%d"), mode_s=time.monotonic() - started)
            if options.out:  # a run stopped part-way still leaves the modes that finished
                partial = {"mode": "all", "records": records, "partial": True, "machine": machine}
                _write(options.out, {**partial, "date": time.strftime("%Y-%m-%d")}, quiet=True)
        record = {"mode": "all", "records": records}
    else:
        started = time.monotonic()
        try:
            record = _run(mode, measures[mode])
            record["mode_s"] = time.monotonic() - started
        except (ValueError, ConfigError) as exc:
            print(f"moco-bench: error: {exc}", file=sys.stderr)
            return 2
    record.update(date=time.strftime("%Y-%m-%d"), machine=machine)
    for sub in record.get("records", {}).values():
        sub["machine"] = machine
    _print(record)
    if options.out:
        try:  # checked before the run; this is a disk that filled or a folder that went meanwhile
            _write(options.out, record)
        except OSError as exc:
            print(
                f"moco-bench: error: --out {options.out}: cannot write: {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 2
        print(f"wrote {options.out}")
    if options.chart and not headline(record):
        print(f"no chart: no mode made a figure ({options.chart} not written)", file=sys.stderr)
    elif options.chart:
        try:
            print(f"wrote {chart(record, options.chart)}")
        except (ValueError, OSError) as exc:
            print(f"moco-bench: error: --chart {options.chart}: {exc}", file=sys.stderr)
            return 2
    failed = [sub["mode"] for sub in record.get("records", {}).values() if "error" in sub]
    if failed:
        print(
            f"moco-bench all: {', '.join(failed)} failed (their errors are in the record)",
            file=sys.stderr,
        )
        return 1
    return 0


def _write(path: Path, record: dict, quiet: bool = False) -> None:
    """The record, written whole (a run stopped while writing leaves the last whole record)."""
    try:
        write_json_atomic(path, record, sort_keys=False)
    except OSError:
        if not quiet:
            raise  # the partial copies are only insurance; the final write reports


if __name__ == "__main__":
    sys.exit(main())
