"""Build one part of a shard folder from an image dump: normalise and pack, resumably, in bounded
memory.

Owns the lock on the output folder, the blocks (``max_count`` consecutive positions of the
packing order) handed to the worker pool, the resume records that let a killed build finish
without redoing a block, the rejected-input log and the manifest. The order is a pure function
of the inputs and the seed and a block's bytes of its inputs, so the output is byte-identical
whatever ``workers`` is; nothing held grows with the inputs.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from tqdm import tqdm

from ...common.files import read_json, write_json_atomic
from ...common.lock import FolderInUse, FolderLock
from ...pipeline import shards
from ...pipeline.schema import MAX_MANIFEST_BYTES, ManifestSchema
from . import BuildError
from .classes import find_classes
from .folder import naming_rule, prepare_folder, remove_temporaries
from .inputs import InputRef, iter_part, printable, source_kind
from .labelfile import read_labels, with_labels
from .nested import iter_archive_part
from .order import PackingOrder
from .parquet import TableInputs, TableRows, in_table_order
from .settings import NO_CLASS, NO_CLASS_ARCHIVE, NO_LABEL, BuildReport, BuildSettings
from .writer import BlockRecord, process_input, reason_kind, write_block

__all__ = ["build"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- workers

_worker_settings: Optional[BuildSettings] = None


def _init_worker(settings: BuildSettings) -> None:
    global _worker_settings
    _worker_settings = settings


def _build_block(task: tuple) -> dict:
    """Worker: one block of inputs -> its shards on disk and its resume record."""
    out, stem, block, first_input, items = task
    settings = _worker_settings
    items = in_table_order(items)  # a table's rows: each row group read once, one at a time
    read = TableRows(settings.image_column)
    process = functools.partial(
        process_input, prep=settings.prep, max_input_bytes=settings.max_input_bytes, read=read
    )
    return write_block(Path(out), stem, block, first_input, items, process, settings.max_bytes)


def _records(tasks: Iterator[tuple], settings: BuildSettings, workers: int) -> Iterator[dict]:
    """Each block's record, in block order, with at most two blocks per worker in flight."""
    if workers == 0:
        _init_worker(settings)
        yield from map(_build_block, tasks)
        return
    # fork keeps worker start-up to milliseconds; the workers touch no threads or GPU.
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(
        workers, initializer=_init_worker, initargs=(settings,), maxtasksperchild=None
    ) as pool:
        window: collections.deque = collections.deque()
        for task in tasks:
            window.append(pool.apply_async(_build_block, (task,)))
            if len(window) >= 2 * workers:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()


def _state_dir(out: Path, settings: BuildSettings) -> Path:
    part = "" if settings.num_parts == 1 else f"-part{settings.part:04d}"
    return out / f".moco-build-{settings.name}{part}"


def _part_names(settings: BuildSettings) -> tuple[str, str]:
    if settings.num_parts == 1:
        return shards.MANIFEST_NAME, shards.rejected_name()
    return (
        shards.part_manifest_name(settings.part, settings.num_parts),
        shards.rejected_name(settings.part, settings.num_parts),
    )


_MAX_STATE_BYTES = MAX_MANIFEST_BYTES
"""The largest resume record or build state read back: a block's record (its shards and its
rejected inputs) and the build's identity are far smaller than a manifest."""


def _read_record(path: Path) -> dict:
    return read_json(
        path, "resume record", max_bytes=_MAX_STATE_BYTES, schema=BlockRecord, error=BuildError
    )


def _load_records(state: Path, out: Path, identity: dict) -> dict[int, dict]:
    """Resume records of blocks whose shards are all finished and intact, by block."""
    ident_path = state / "build.json"
    if not ident_path.is_file():
        return {}
    try:
        previous = read_json(
            ident_path, "build state", max_bytes=_MAX_STATE_BYTES, error=BuildError
        )
    except BuildError:
        previous = None
    if isinstance(previous, dict):
        previous.setdefault("order", 1)  # written before the naming rule was recorded
    if previous != identity:
        raise BuildError(
            f"{out}: holds an unfinished build with other inputs or settings; "
            f"use another --out or delete {state}"
        )
    records = {}
    for path in sorted(state.glob("shard-*.json")):
        try:
            record = _read_record(path)
        except BuildError:  # damaged: its block is built again
            continue
        entries = [shards.ShardEntry.from_json(e) for e in record["shards"]]
        block = record["block"]
        if all(
            (out / e.index).is_file()
            and (out / e.tar).is_file()
            and (out / e.tar).stat().st_size == e.bytes
            for e in entries
        ):
            records[block] = record
    return records


# --------------------------------------------------------------------------- build


def _manifest(
    settings: BuildSettings,
    identity: dict,
    records: list[dict],
    rejected: int,
    reasons: dict[str, int],
    rejected_file: str,
) -> dict:
    classes = identity["classes"]
    class_counts = [0] * len(classes)
    for record in records:
        for k, v in record["class_counts"].items():
            class_counts[int(k)] += v
    entries = [entry for record in records for entry in record["shards"]]
    samples = sum(e["samples"] for e in entries)
    copied = sum(r["copied"] for r in records)
    inputs = identity["inputs"]
    if samples + rejected != inputs:
        raise AssertionError(
            f"accounting broke: {samples} samples + {rejected} rejected != {inputs} inputs"
        )
    return {
        "format": shards.FORMAT,
        "version": shards.FORMAT_VERSION,
        "name": settings.name,
        "inputs": inputs,
        "samples": samples,
        "copied": copied,
        "reencoded": samples - copied,
        "classes": classes,
        "class_counts": dict(zip(classes, class_counts)),
        "shards": entries,
        "rejected": rejected,
        "rejected_reasons": dict(sorted(reasons.items())),
        "rejected_file": rejected_file,
        "settings": settings.fingerprint(),
        "sources": identity["sources"],
        "input_digest": identity["input_digest"],
        "order": identity["order"],
        "parts": [
            {
                "part": settings.part,
                "num_parts": settings.num_parts,
                "inputs": inputs,
                "samples": samples,
                "rejected": rejected,
                "input_digest": identity["input_digest"],
            }
        ],
    }


def build(
    sources: Sequence[str],
    out: str | os.PathLike,
    settings: BuildSettings,
    *,
    workers: Optional[int] = None,
    progress: bool = True,
    classes: Optional[Sequence[str]] = None,
) -> BuildReport:
    """Build (or finish building) part ``settings.part`` of the shards of ``sources`` into ``out``.

    Args:
        sources: folders, list files and tar archives.
        out: the shard folder; created if missing; locked while the build runs.
        settings: everything that decides the output bytes.
        workers: worker processes (default: all cores); 0 processes in this process.
        progress: show a progress bar on stderr (when it is a terminal).
        classes: the class names in index order (``--classes``); default: found in
            the sources (``--labels folder``).

    Raises:
        BuildError: a bad source, option or output folder, a folder in use, or an
            output that cannot be written (nothing half-written is left; run again
            to resume).
    """
    started = time.monotonic()
    if not sources:
        raise BuildError("give at least one SRC folder, list file or tar archive")
    for src in sources:
        source_kind(src)
    out = Path(out)
    prepare_folder(out)
    state = _state_dir(out, settings)
    try:
        with FolderLock(out / f"{state.name}.lock", "moco-shards build", "--out"):
            prepare_folder(out)  # again, now that no other build can be writing here
            return _build_locked(
                list(sources), out, state, settings, workers, progress, classes, started
            )
    except FolderInUse as exc:
        raise BuildError(str(exc)) from None
    except OSError as exc:
        where = printable(exc.filename) if getattr(exc, "filename", None) else str(out)
        raise BuildError(
            f"{where}: cannot write: {exc.strerror or exc}; nothing half-written was left, "
            f"run the same command again to resume"
        ) from None


def _build_locked(
    sources: list[str],
    out: Path,
    state: Path,
    settings: BuildSettings,
    workers: Optional[int],
    progress: bool,
    classes: Optional[Sequence[str]],
    started: float,
) -> BuildReport:
    columns = (settings.labels_file, settings.label_column)
    class_list = (
        list(classes)
        if classes is not None
        else find_classes(sources, settings.labels, [str(out)], *columns)
    )
    manifest_name, rejected_name = _part_names(settings)
    manifest_path = out / manifest_name
    rule = naming_rule(out, state, manifest_path, settings)
    state.mkdir(exist_ok=True)
    order, parts = None, (settings.part, settings.num_parts)
    try:
        if settings.labels == "archive":
            refs = iter_archive_part(sources, settings.part, settings.num_parts, rule)
        else:
            tables = TableInputs(settings.image_column, settings.label_column)
            refs = iter_part(sources, settings.labels, *parts, [str(out)], rule, tables)
        if settings.labels_file is not None:
            refs = with_labels(refs, read_labels(settings.labels_file))
        order = PackingOrder(refs, state / "order", settings.shuffle_seed)
        if order.count == 0 and settings.num_parts == 1:
            raise BuildError(f"no input files found in {', '.join(map(printable, sources))}")
        identity = {
            "settings": settings.fingerprint(),
            "input_digest": order.digest,
            "classes": class_list,
            "sources": [printable(s) for s in sources],
            "inputs": order.count,
            "order": rule,
        }
        if manifest_path.is_file():
            try:
                existing = read_json(
                    manifest_path,
                    "manifest",
                    max_bytes=MAX_MANIFEST_BYTES,
                    schema=ManifestSchema,
                    error=BuildError,
                )
            except BuildError:
                existing = None
            if isinstance(existing, dict) and all(
                existing.get(k, 1 if k == "order" else None) == identity[k]
                for k in ("settings", "input_digest", "classes", "order")
            ):
                log.info("%s: build already complete", manifest_path)
                return _report(
                    out,
                    manifest_path,
                    existing,
                    time.monotonic() - started,
                    len(existing["shards"]),
                )
            raise BuildError(f"{manifest_path}: the folder holds another build; use another --out")
        return _pack(
            out,
            state,
            settings,
            identity,
            order,
            workers,
            progress,
            manifest_path,
            rejected_name,
            started,
        )
    finally:
        if order is not None:
            order.close()
        if state.is_dir() and not any(state.iterdir()):
            state.rmdir()


def _pack(
    out: Path,
    state: Path,
    settings: BuildSettings,
    identity: dict,
    order: PackingOrder,
    workers: Optional[int],
    progress: bool,
    manifest_path: Path,
    rejected_name: str,
    started: float,
) -> BuildReport:
    done = _load_records(state, out, identity)
    if done:
        log.info("resuming: %d finished blocks of %d inputs kept", len(done), settings.max_count)
    write_json_atomic(state / "build.json", identity)
    remove_temporaries(out, settings.name, None if settings.num_parts == 1 else settings.part)
    part = None if settings.num_parts == 1 else settings.part
    class_of = {name: i for i, name in enumerate(identity["classes"])}

    no_class = {"archive": NO_CLASS_ARCHIVE, "file": NO_LABEL}.get(settings.labels, NO_CLASS)

    def label_of(ref: InputRef):
        if settings.labels == "none" or ref.rejected:
            return None  # a reason already known (a damaged archive) says more than its class
        if ref.label is None:
            return no_class
        index = class_of.get(ref.label)
        return index if index is not None else f"class not in --classes: {ref.label}"

    def tasks() -> Iterator[tuple]:
        """Blocks of --max-count consecutive positions of the packing order, those not finished yet."""
        items, block = [], 0
        for pos, ref in enumerate(order):
            if block not in done:
                items.append(
                    (f"{pos:010d}" if part is None else f"{part:04d}{pos:010d}", ref, label_of(ref))
                )
            if (pos + 1) % settings.max_count == 0 or pos + 1 == order.count:
                if block not in done:
                    first = pos + 1 - len(items)
                    yield (
                        str(out),
                        shards.shard_stem(settings.name, block, part),
                        block,
                        first,
                        items,
                    )
                items, block = [], block + 1

    workers = (os.cpu_count() or 1) if workers is None else workers
    bar = tqdm(
        total=order.count,
        unit="img",
        desc="build",
        disable=not progress or None,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    bar.update(sum(r["end_input"] - r["first_input"] for r in done.values()))
    try:
        for record in _records(tasks(), settings, workers):
            write_json_atomic(state / f"shard-{record['block']:06d}.json", record)
            bar.update(record["end_input"] - record["first_input"])
    except BaseException:
        remove_temporaries(
            out, settings.name, None if settings.num_parts == 1 else settings.part
        )  # the pool is gone: what its other workers had begun
        raise
    finally:
        bar.close()

    # Every block has its record now; read them back in order, one at a time.
    records, rejected, reasons = [], 0, collections.Counter()
    log_tmp = out / f".{rejected_name}.tmp"
    try:
        with open(log_tmp, "wb") as log_file:
            for path in sorted(state.glob("shard-*.json")):
                record = _read_record(path)
                for entry in record.pop("rejected"):
                    log_file.write(json.dumps(entry).encode() + b"\n")
                    reasons[reason_kind(entry["reason"])] += 1
                    rejected += 1
                records.append(record)
            log_file.flush()
            os.fsync(log_file.fileno())
        manifest = _manifest(settings, identity, records, rejected, reasons, rejected_name)
        os.replace(log_tmp, out / rejected_name)
    except BaseException:
        log_tmp.unlink(missing_ok=True)
        raise
    write_json_atomic(manifest_path, manifest)
    shutil.rmtree(state, ignore_errors=True)
    return _report(out, manifest_path, manifest, time.monotonic() - started, len(done))


def _report(
    out: Path, manifest_path: Path, manifest: dict, seconds: float, resumed: int
) -> BuildReport:
    rejected = manifest["rejected"]
    return BuildReport(
        out=out,
        manifest_path=manifest_path,
        inputs=manifest["inputs"],
        samples=manifest["samples"],
        rejected=rejected if isinstance(rejected, int) else len(rejected),
        copied=manifest["copied"],
        reencoded=manifest["reencoded"],
        shards=len(manifest["shards"]),
        seconds=seconds,
        resumed_shards=resumed,
    )
