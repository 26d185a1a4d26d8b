"""Build WebDataset shards from an image dump: normalise and pack, resumably.

Owns the build: where shard boundaries fall, the worker pool, the resume records that
make a killed build finish without redoing finished shards, and the manifest. Which
inputs there are and in what order is ``inputs``'s; per-image work is
``imageprep``'s; the file format is ``moco_dali.pipeline.shards``'.

Determinism: inputs are enumerated in a stable order, processed by a worker pool
whose results are consumed in input order, and packed by one writer, so the same
inputs and flags give byte-identical output whatever ``workers`` is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from moco_dali.pipeline import shards
from moco_dali.tools.shards import BuildError
from moco_dali.tools.shards.imageprep import PrepSettings, Rejected, prepare, sample_metadata
from moco_dali.tools.shards.inputs import InputRef, enumerate_inputs, input_digest, packing_order, part_range

__all__ = ["BuildSettings", "BuildReport", "build"]

log = logging.getLogger(__name__)

NO_CLASS = "no class folder (--labels folder needs SRC/CLASS/...)"
_NO_CLASS = -1


@dataclass(frozen=True)
class BuildSettings:
    """Everything that decides the bytes of a build (``workers`` does not)."""

    name: str = "shard"
    labels: str = "none"
    max_count: int = 10000
    max_bytes: Optional[int] = None
    num_parts: int = 1
    part: int = 0
    shuffle_seed: Optional[int] = 0
    """Pack inputs in an order shuffled with this seed (None: in enumeration order)."""
    prep: PrepSettings = field(default_factory=PrepSettings)

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "./ \t"):
            raise BuildError(f"--name {self.name!r}: use a name without dots, slashes or spaces")
        if self.labels not in ("none", "folder"):
            raise BuildError(f"--labels must be 'none' or 'folder', got {self.labels!r}")
        if self.max_count < 1:
            raise BuildError(f"--max-count must be at least 1, got {self.max_count}")
        if self.max_bytes is not None and self.max_bytes < 4096:
            raise BuildError(f"--max-bytes must be at least 4096, got {self.max_bytes}")
        if self.num_parts < 1 or not 0 <= self.part < self.num_parts:
            raise BuildError(f"--part must be in 0..{self.num_parts - 1} for --num-parts {self.num_parts}, got {self.part}")

    def fingerprint(self) -> dict:
        """The settings as recorded in manifests and compared on resume and merge."""
        d = asdict(self)
        d.update(d.pop("prep"))
        return d


@dataclass
class BuildReport:
    out: Path
    manifest_path: Path
    inputs: int
    samples: int
    rejected: int
    copied: int
    reencoded: int
    shards: int
    seconds: float
    resumed_shards: int = 0

    def summary(self) -> str:
        rate = self.inputs / self.seconds if self.seconds > 0 else 0.0
        resumed = f", {self.resumed_shards} shards kept from an earlier run" if self.resumed_shards else ""
        return (
            f"{self.inputs} inputs -> {self.samples} samples in {self.shards} shards "
            f"({self.copied} copied, {self.reencoded} re-encoded), {self.rejected} rejected{resumed}; "
            f"{self.seconds:.1f} s, {rate:.0f} img/s; {self.manifest_path}"
        )


# --------------------------------------------------------------------------- workers

_worker_prep: Optional[PrepSettings] = None


def _init_worker(prep: PrepSettings) -> None:
    global _worker_prep
    _worker_prep = prep


def _read(ref: InputRef) -> bytes:
    with open(ref.path, "rb") as f:
        if ref.offset >= 0:
            f.seek(ref.offset)
            data = f.read(ref.size)
            if len(data) != ref.size:
                raise OSError(f"archive member cut short ({len(data)} of {ref.size} bytes)")
            return data
        return f.read()


def _process(task: tuple[int, InputRef, Optional[int]]):
    """Worker: one input -> ("ok", blob, members, copied, class) or ("rejected", reason)."""
    index, ref, class_index = task
    if class_index == _NO_CLASS:
        return ("rejected", NO_CLASS)
    try:
        try:
            data = _read(ref)
        except OSError as exc:
            raise Rejected(f"unreadable: {exc.strerror or exc}") from None
        prepared = prepare(data, _worker_prep)
    except Rejected as exc:
        return ("rejected", str(exc))
    except Exception as exc:  # a decoder bug must cost one input, not the build
        return ("rejected", f"failed to process: {type(exc).__name__}: {exc}")
    files = [("jpg", prepared.jpeg)]
    if class_index is not None:
        files.append(("cls", str(class_index).encode()))
    files.append(("json", sample_metadata(ref.source, prepared)))
    blob, members = shards.encode_sample(f"{index:010d}", files)
    return ("ok", blob, members, prepared.copied, class_index)


# --------------------------------------------------------------------------- writer

class _ShardWriter:
    """Appends encoded samples to one shard; publishes tar and index only when closed."""

    def __init__(self, out: Path, stem: str, first_input: int):
        self.out, self.stem, self.first_input = out, stem, first_input
        self.tar_tmp = out / f".{stem}.tar.tmp"
        self.file = open(self.tar_tmp, "wb")
        self.sha = hashlib.sha256()
        self.lines: list[str] = []
        self.bytes = 0
        self.copied = 0
        self.class_counts: dict[int, int] = {}
        self.rejected: list[dict] = []

    @property
    def samples(self) -> int:
        return len(self.lines)

    def add(self, blob: bytes, members, copied: bool, class_index: Optional[int]) -> None:
        self.file.write(blob)
        self.sha.update(blob)
        self.lines.append(shards.index_line((e, self.bytes + o, s, n) for e, o, s, n in members))
        self.bytes += len(blob)
        self.copied += copied
        if class_index is not None:
            self.class_counts[class_index] = self.class_counts.get(class_index, 0) + 1

    def close(self, end_input: int) -> dict:
        """Publish the shard (index first, then tar) and return its resume record."""
        self.file.write(shards.TAR_END)
        self.sha.update(shards.TAR_END)
        self.bytes += len(shards.TAR_END)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        index_text = shards.index_header(self.samples) + "".join(self.lines)
        idx_tmp = self.out / f".{self.stem}.idx.tmp"
        with open(idx_tmp, "w") as f:
            f.write(index_text)
            f.flush()
            os.fsync(f.fileno())
        # The tar is renamed last: a tar under its final name always has its index.
        os.replace(idx_tmp, self.out / f"{self.stem}.idx")
        os.replace(self.tar_tmp, self.out / f"{self.stem}.tar")
        entry = shards.ShardEntry(
            tar=f"{self.stem}.tar", index=f"{self.stem}.idx", samples=self.samples, bytes=self.bytes,
            sha256=self.sha.hexdigest(), index_sha256=hashlib.sha256(index_text.encode()).hexdigest(),
        )
        return {
            "shard": asdict(entry),
            "first_input": self.first_input,
            "end_input": end_input,
            "copied": self.copied,
            "class_counts": {str(k): v for k, v in sorted(self.class_counts.items())},
            "rejected": self.rejected,
        }

    def abandon(self) -> None:
        self.file.close()
        self.tar_tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- resume

def _state_dir(out: Path, settings: BuildSettings) -> Path:
    part = "" if settings.num_parts == 1 else f"-part{settings.part:04d}"
    return out / f".moco-build-{settings.name}{part}"


def _manifest_name(settings: BuildSettings) -> str:
    if settings.num_parts == 1:
        return shards.MANIFEST_NAME
    return shards.part_manifest_name(settings.part, settings.num_parts)


def _load_records(state: Path, out: Path, identity: dict, start: int) -> list[dict]:
    """Resume records of shards that are finished and intact, in order."""
    ident_path = state / "build.json"
    if not ident_path.is_file():
        return []
    try:
        previous = json.loads(ident_path.read_text())
    except ValueError:
        previous = None
    if previous != identity:
        raise BuildError(
            f"{out}: holds an unfinished build with other inputs or settings; "
            f"use another --out or delete {state}"
        )
    records = []
    expected_start = start
    for path in sorted(state.glob("shard-*.json")):
        try:
            record = json.loads(path.read_text())
            entry = shards.ShardEntry.from_json(record["shard"])
        except (ValueError, KeyError, TypeError):
            break
        tar, idx = out / entry.tar, out / entry.index
        if (record["first_input"] != expected_start or not tar.is_file() or not idx.is_file()
                or tar.stat().st_size != entry.bytes):
            break
        records.append(record)
        expected_start = record["end_input"]
    return records


# --------------------------------------------------------------------------- build

def _manifest(settings: BuildSettings, digest: str, classes: list[str], records: list[dict],
              trailing_rejected: list[dict], inputs: int) -> dict:
    class_counts = [0] * len(classes)
    rejected = []
    for record in records:
        for k, v in record["class_counts"].items():
            class_counts[int(k)] += v
        rejected.extend(record["rejected"])
    rejected.extend(trailing_rejected)
    samples = sum(r["shard"]["samples"] for r in records)
    copied = sum(r["copied"] for r in records)
    if samples + len(rejected) != inputs:
        raise AssertionError(f"accounting broke: {samples} samples + {len(rejected)} rejected != {inputs} inputs")
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
        "shards": [r["shard"] for r in records],
        "rejected": rejected,
        "settings": settings.fingerprint(),
        "input_digest": digest,
        "parts": [{"part": settings.part, "num_parts": settings.num_parts, "inputs": inputs}],
    }


def build(sources: list[str], out: str | os.PathLike, settings: BuildSettings, *,
          workers: Optional[int] = None, progress: bool = True) -> BuildReport:
    """Build (or finish building) the shards of ``sources`` into ``out``.

    Args:
        sources: folders, list files and tar archives, in the order to pack them.
        out: the shard folder; created if missing.
        settings: everything that decides the output bytes.
        workers: worker processes (default: all cores); 0 processes in this process.
        progress: show a progress bar on stderr (when it is a terminal).

    Raises:
        BuildError: before any work, for bad sources, options or a conflicting folder.
    """
    started = time.monotonic()
    if not sources:
        raise BuildError("give at least one SRC folder, list file or tar archive")
    out = Path(out)
    all_refs = enumerate_inputs(sources, settings.labels)
    if not all_refs:
        raise BuildError(f"no input files found in {', '.join(sources)}")
    classes = sorted({r.label for r in all_refs if r.label is not None})
    class_of = {name: i for i, name in enumerate(classes)}
    digest = input_digest(all_refs)
    first, end = part_range(len(all_refs), settings.part, settings.num_parts)
    inputs = end - first
    identity = {"settings": settings.fingerprint(), "input_digest": digest, "sources": list(sources)}

    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / _manifest_name(settings)
    if manifest_path.is_file():
        try:
            existing = json.loads(manifest_path.read_text())
        except ValueError:
            existing = None
        if existing and existing.get("settings") == identity["settings"] and existing.get("input_digest") == digest:
            log.info("%s: build already complete", manifest_path)
            return _report(out, manifest_path, existing, time.monotonic() - started, len(existing["shards"]))
        raise BuildError(f"{manifest_path}: the folder holds another build; use another --out")

    state = _state_dir(out, settings)
    records = _load_records(state, out, identity, first)
    resumed = len(records)
    if resumed:
        log.info("resuming: %d finished shards kept, continuing at input %d", resumed, records[-1]["end_input"])
    state.mkdir(exist_ok=True)
    shards.write_json_atomic(state / "build.json", identity)
    for stale in state.glob("shard-*.json"):
        if int(stale.stem.split("-")[1]) >= resumed:
            stale.unlink()

    # Positions in the packing order; records and part ranges are in positions.
    order = packing_order(len(all_refs), settings.shuffle_seed)
    position = records[-1]["end_input"] if records else first
    unlabelled = _NO_CLASS if settings.labels == "folder" else None
    tasks = (
        (i, all_refs[i], class_of[all_refs[i].label] if all_refs[i].label is not None else unlabelled)
        for i in (order[p] for p in range(position, end))
    )
    part = None if settings.num_parts == 1 else settings.part
    writer: Optional[_ShardWriter] = None
    pending_rejected: list[dict] = []  # rejected before the first sample of the next shard

    def reject(position: int, reason: str) -> None:
        entry = {"input": all_refs[order[position]].source, "reason": reason}
        (writer.rejected if writer is not None else pending_rejected).append(entry)

    def open_shard(start_input: int) -> _ShardWriter:
        w = _ShardWriter(out, shards.shard_stem(settings.name, len(records), part), start_input)
        w.rejected.extend(pending_rejected)
        pending_rejected.clear()
        return w

    def finish_shard(end_input: int) -> None:
        nonlocal writer
        record = writer.close(end_input)
        shards.write_json_atomic(state / f"shard-{len(records):06d}.json", record)
        records.append(record)
        writer = None

    max_bytes = settings.max_bytes or float("inf")
    if workers is None:
        workers = os.cpu_count() or 1
    shard_start = position
    bar = tqdm(total=inputs, initial=position - first, unit="img", desc="build", disable=not progress or None,
               dynamic_ncols=True, smoothing=0.1)
    try:
        for index, result in zip(range(position, end), _results(tasks, settings.prep, workers)):
            bar.update(1)
            if result[0] == "rejected":
                reject(index, result[1])
                continue
            _, blob, members, copied, class_index = result
            if writer is not None and (writer.samples + 1 > settings.max_count
                                       or writer.bytes + len(blob) + len(shards.TAR_END) > max_bytes):
                finish_shard(index)
                shard_start = index
            if writer is None:
                writer = open_shard(shard_start)
            writer.add(blob, members, copied, class_index)
        if writer is not None:
            finish_shard(end)
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    finally:
        bar.close()

    # Inputs after the last shard that were all rejected belong to no shard record.
    manifest = _manifest(settings, digest, classes, records, pending_rejected, inputs)
    manifest["sources"] = list(sources)
    shards.write_json_atomic(manifest_path, manifest)
    for path in state.glob("*.json"):
        path.unlink()
    state.rmdir()
    return _report(out, manifest_path, manifest, time.monotonic() - started, resumed)


def _results(tasks, prep: PrepSettings, workers: int):
    if workers == 0:
        _init_worker(prep)
        yield from map(_process, tasks)
        return
    # fork keeps worker start-up to milliseconds; the workers touch no threads or GPU.
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(prep,)) as pool:
        yield from pool.imap(_process, tasks, chunksize=8)


def _report(out: Path, manifest_path: Path, manifest: dict, seconds: float, resumed: int) -> BuildReport:
    return BuildReport(
        out=out, manifest_path=manifest_path, inputs=manifest["inputs"], samples=manifest["samples"],
        rejected=len(manifest["rejected"]), copied=manifest["copied"], reencoded=manifest["reencoded"],
        shards=len(manifest["shards"]), seconds=seconds, resumed_shards=resumed,
    )


