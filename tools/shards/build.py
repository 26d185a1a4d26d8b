"""Build WebDataset shards from an image dump: normalise and pack, resumably, in bounded memory.

Owns one part's build: the lock on the output folder, where shard boundaries fall,
the worker pool, the resume records that make a killed build finish without redoing
finished shards, the stream of rejected inputs and the manifest. Which inputs there
are and in what order is ``inputs``'s; per-image work is ``imageprep``'s; the file
format is ``moco_dali.pipeline.shards``'.

Determinism: the packing order is a pure function of the inputs and the seed;
results are consumed in that order by one writer, so the same inputs and flags give
byte-identical output whatever ``workers`` is. Nothing held grows with the inputs:
the order is an external sort, rejected inputs stream to a JSONL file, and at most a
window of tasks is in flight.
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import multiprocessing
import os
import re
import shutil
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from tqdm import tqdm

from moco_dali.pipeline import shards
from moco_dali.tools.shards import BuildError
from moco_dali.tools.shards.imageprep import PrepSettings, Rejected, prepare, sample_metadata
from moco_dali.tools.shards.inputs import InputRef, PackingOrder, find_classes, iter_part, printable, source_kind
from moco_dali.tools.shards.writer import RejectedLog, ShardWriter

__all__ = ["BuildSettings", "BuildReport", "build", "DEFAULT_MAX_INPUT_BYTES"]

log = logging.getLogger(__name__)

NO_CLASS = "no class folder (--labels folder needs SRC/CLASS/...)"
DEFAULT_MAX_INPUT_BYTES = 256 * 1024**2

# What a build may find in its output folder: its own files and those of other parts
# or an interrupted run. Anything else means --out points at someone else's folder.
_BUILD_FILE_RE = re.compile(
    r"^(?:[^./\s]+-(?:part\d{4}-)?\d{6}\.(?:tar|idx)"
    r"|manifest(?:\.part-\d{4}-of-\d{4})?\.json"
    r"|rejected(?:\.part-\d{4}-of-\d{4})?\.jsonl"
    r"|\.moco-build-.+"
    r"|\..+\.tmp)$"
)


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
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    """Inputs larger than this are rejected unread (a symlink to /dev/zero never ends)."""
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
        if not 1 <= self.num_parts <= 9999:
            raise BuildError(f"--num-parts must be in 1..9999, got {self.num_parts}")
        if not 0 <= self.part < self.num_parts:
            raise BuildError(f"--part must be in 0..{self.num_parts - 1} for --num-parts {self.num_parts}, got {self.part}")
        if self.max_input_bytes < 1:
            raise BuildError(f"--max-input-bytes must be positive, got {self.max_input_bytes}")

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

_worker_settings: Optional[BuildSettings] = None


def _init_worker(settings: BuildSettings) -> None:
    global _worker_settings
    _worker_settings = settings


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def _read(ref: InputRef, max_bytes: int) -> bytes:
    """The input's bytes: regular files only, never more than ``max_bytes``."""
    too_large = f"too large: over --max-input-bytes ({max_bytes} bytes)"
    if ref.offset >= 0:  # an archive member, read in place
        if ref.size > max_bytes:
            raise Rejected(too_large)
        try:
            with open(ref.path, "rb") as f:
                f.seek(ref.offset)
                data = f.read(ref.size)
        except OSError as exc:
            raise Rejected(f"unreadable: {exc.strerror or exc}") from None
        if len(data) != ref.size:
            raise Rejected(f"unreadable: archive member cut short ({len(data)} of {ref.size} bytes)")
        return data
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer that never comes.
        fd = os.open(ref.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise Rejected(f"unreadable: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Rejected(f"not a regular file ({_file_kind(info.st_mode)})")
        if info.st_size > max_bytes:
            raise Rejected(too_large)
        chunks, left = [], max_bytes + 1
        while left and (chunk := os.read(fd, min(left, 1 << 24))):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise Rejected(f"unreadable: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise Rejected(too_large)  # it grew while being read
    return data


def _process(task: tuple[str, InputRef, object]):
    """Worker: one input -> ("ok", blob, members, copied, class) or ("rejected", reason)."""
    key, ref, label = task
    if isinstance(label, str):
        return ("rejected", label)
    if ref.rejected:
        return ("rejected", ref.rejected)
    try:
        prepared = prepare(_read(ref, _worker_settings.max_input_bytes), _worker_settings.prep)
    except Rejected as exc:
        return ("rejected", str(exc))
    except Exception as exc:  # a decoder bug must cost one input, not the build
        return ("rejected", f"failed to process: {type(exc).__name__}: {exc}")
    files = [("jpg", prepared.jpeg)]
    if label is not None:
        files.append(("cls", str(label).encode()))
    files.append(("json", sample_metadata(ref.source, prepared)))
    blob, members = shards.encode_sample(key, files)
    return ("ok", blob, members, prepared.copied, label)


def _process_many(tasks: list) -> list:
    return [_process(t) for t in tasks]


def _results(tasks: Iterator, settings: BuildSettings, workers: int, chunk: int = 16):
    """Results of ``tasks`` in order, with at most a window of chunks in flight."""
    if workers == 0:
        _init_worker(settings)
        yield from map(_process, tasks)
        return
    # fork keeps worker start-up to milliseconds; the workers touch no threads or GPU.
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(settings,)) as pool:
        window: collections.deque = collections.deque()
        while True:
            batch = [t for _, t in zip(range(chunk), tasks)]
            if batch:
                window.append(pool.apply_async(_process_many, (batch,)))
            if window and (len(window) > 4 * workers or not batch):
                yield from window.popleft().get()
            if not batch and not window:
                return


# --------------------------------------------------------------------------- the output folder

class _FolderLock:
    """An exclusive ``flock`` on the part's lock file in the output folder, for the build's whole life."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def __enter__(self) -> "_FolderLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise BuildError(f"{self.path.parent}: in use by another moco-shards build (it holds {self.path.name}); "
                                 f"wait for it to end or use another --out") from None
            try:  # the holder before us may have removed the file between our open and our lock
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self.fd = fd
                    return self
            except FileNotFoundError:
                pass
            os.close(fd)

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)  # still ours: removed before the lock is let go
        os.close(self.fd)


def _prepare_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise BuildError(f"--out {out}: not a folder") from None
    except OSError as exc:
        raise BuildError(f"--out {out}: cannot create: {exc.strerror}") from None
    names = [p.name for p in out.iterdir()]
    # Shard-like names alone do not make a folder ours: it must also hold a manifest or a build's state.
    ours = any(n.startswith((".moco-build-", "manifest")) for n in names)
    foreign = [n for n in names if not (ours and _BUILD_FILE_RE.match(n))]
    if foreign:
        raise BuildError(f"--out {out}: holds files moco-shards build did not write ({printable(min(foreign))}"
                         f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); use a new or empty folder")


def _state_dir(out: Path, settings: BuildSettings) -> Path:
    part = "" if settings.num_parts == 1 else f"-part{settings.part:04d}"
    return out / f".moco-build-{settings.name}{part}"


def _part_names(settings: BuildSettings) -> tuple[str, str]:
    if settings.num_parts == 1:
        return shards.MANIFEST_NAME, shards.rejected_name()
    return (shards.part_manifest_name(settings.part, settings.num_parts),
            shards.rejected_name(settings.part, settings.num_parts))


def _load_records(state: Path, out: Path, identity: dict) -> list[dict]:
    """Resume records of shards that are finished and intact, in order."""
    ident_path = state / "build.json"
    if not ident_path.is_file():
        return []
    try:
        previous = json.loads(ident_path.read_text())
    except ValueError:
        previous = None
    if previous != identity:
        raise BuildError(f"{out}: holds an unfinished build with other inputs or settings; "
                         f"use another --out or delete {state}")
    records, expected_start = [], 0
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

def _manifest(settings: BuildSettings, identity: dict, records: list[dict], rejected: RejectedLog,
              rejected_file: str) -> dict:
    classes = identity["classes"]
    class_counts = [0] * len(classes)
    for record in records:
        for k, v in record["class_counts"].items():
            class_counts[int(k)] += v
    samples = sum(r["shard"]["samples"] for r in records)
    copied = sum(r["copied"] for r in records)
    inputs = identity["inputs"]
    if samples + rejected.count != inputs:
        raise AssertionError(f"accounting broke: {samples} samples + {rejected.count} rejected != {inputs} inputs")
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
        "rejected": rejected.count,
        "rejected_reasons": dict(sorted(rejected.reasons.items())),
        "rejected_file": rejected_file,
        "settings": settings.fingerprint(),
        "sources": identity["sources"],
        "input_digest": identity["input_digest"],
        "parts": [{"part": settings.part, "num_parts": settings.num_parts, "inputs": inputs, "samples": samples,
                   "rejected": rejected.count, "input_digest": identity["input_digest"]}],
    }


def build(sources: Sequence[str], out: str | os.PathLike, settings: BuildSettings, *,
          workers: Optional[int] = None, progress: bool = True,
          classes: Optional[Sequence[str]] = None) -> BuildReport:
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
    _prepare_folder(out)
    state = _state_dir(out, settings)
    try:
        with _FolderLock(out / f"{state.name}.lock"):
            _prepare_folder(out)  # again, now that no other build can be writing here
            return _build_locked(list(sources), out, state, settings, workers, progress, classes, started)
    except OSError as exc:
        where = printable(exc.filename) if getattr(exc, "filename", None) else str(out)
        raise BuildError(f"{where}: cannot write: {exc.strerror or exc}; nothing half-written was left, "
                         f"run the same command again to resume") from None


def _build_locked(sources: list[str], out: Path, state: Path, settings: BuildSettings, workers: Optional[int],
                  progress: bool, classes: Optional[Sequence[str]], started: float) -> BuildReport:
    class_list = list(classes) if classes is not None else find_classes(sources, settings.labels)
    manifest_name, rejected_name = _part_names(settings)
    manifest_path = out / manifest_name
    state.mkdir(exist_ok=True)
    order = PackingOrder(iter_part(sources, settings.labels, settings.part, settings.num_parts, skip=[str(out)]),
                         state / "order", settings.shuffle_seed)
    try:
        if order.count == 0 and settings.num_parts == 1:
            raise BuildError(f"no input files found in {', '.join(map(printable, sources))}")
        identity = {"settings": settings.fingerprint(), "input_digest": order.digest, "classes": class_list,
                    "sources": [printable(s) for s in sources], "inputs": order.count}
        if manifest_path.is_file():
            try:
                existing = json.loads(manifest_path.read_text())
            except ValueError:
                existing = None
            if existing and all(existing.get(k) == identity[k] for k in ("settings", "input_digest", "classes")):
                log.info("%s: build already complete", manifest_path)
                return _report(out, manifest_path, existing, time.monotonic() - started, len(existing["shards"]))
            raise BuildError(f"{manifest_path}: the folder holds another build; use another --out")
        return _pack(out, state, settings, identity, order, workers, progress, manifest_path, rejected_name, started)
    finally:
        order.close()
        if state.is_dir() and not any(state.iterdir()):
            state.rmdir()


def _pack(out: Path, state: Path, settings: BuildSettings, identity: dict, order: PackingOrder,
          workers: Optional[int], progress: bool, manifest_path: Path, rejected_name: str,
          started: float) -> BuildReport:
    records = _load_records(state, out, identity)
    resumed = len(records)
    if resumed:
        log.info("resuming: %d finished shards kept, continuing at input %d", resumed, records[-1]["end_input"])
    shards.write_json_atomic(state / "build.json", identity)
    for stale in state.glob("shard-*.json"):
        if int(stale.stem.split("-")[1]) >= resumed:
            stale.unlink()
    log_path = state / "rejected.jsonl"
    if not log_path.exists() and (out / rejected_name).exists():
        os.replace(out / rejected_name, log_path)  # killed between publishing it and writing the manifest
    last = records[-1] if records else None
    rejected = RejectedLog(log_path, last["rejected_offset"] if last else 0, last["rejected_count"] if last else 0,
                           last["rejected_reasons"] if last else {})

    part = None if settings.num_parts == 1 else settings.part
    class_of = {name: i for i, name in enumerate(identity["classes"])}
    position = last["end_input"] if last else 0

    def label_of(ref: InputRef):
        if settings.labels != "folder":
            return None
        if ref.label is None:
            return NO_CLASS
        index = class_of.get(ref.label)
        return index if index is not None else f"class not in --classes: {ref.label}"

    refs: collections.deque = collections.deque()  # sources of the tasks in flight, for rejection lines

    def tasks():
        for pos, ref in enumerate(order):
            if pos >= position:
                refs.append(ref.source)
                key = f"{pos:010d}" if part is None else f"{part:04d}{pos:010d}"
                yield key, ref, label_of(ref)

    writer: Optional[ShardWriter] = None

    def finish_shard(end_input: int) -> None:
        nonlocal writer
        offset = rejected.sync()
        record = writer.close(end_input) | {"rejected_offset": offset, "rejected_count": rejected.count,
                                            "rejected_reasons": dict(rejected.reasons)}
        shards.write_json_atomic(state / f"shard-{len(records):06d}.json", record)
        records.append(record)
        writer = None

    max_bytes = settings.max_bytes or float("inf")
    workers = (os.cpu_count() or 1) if workers is None else workers
    shard_start = position
    bar = tqdm(total=order.count, initial=position, unit="img", desc="build", disable=not progress or None,
               dynamic_ncols=True, smoothing=0.1)
    try:
        for index, result in zip(range(position, order.count), _results(tasks(), settings, workers)):
            bar.update(1)
            source = refs.popleft()
            if result[0] == "rejected":
                rejected.add(source, result[1])
                continue
            _, blob, members, copied, class_index = result
            if writer is not None and (writer.samples + 1 > settings.max_count
                                       or writer.bytes + len(blob) + len(shards.TAR_END) > max_bytes):
                finish_shard(index)
                shard_start = index
            if writer is None:
                writer = ShardWriter(out, shards.shard_stem(settings.name, len(records), part), shard_start)
            writer.add(blob, members, copied, class_index)
        if writer is not None:
            finish_shard(order.count)
        rejected.sync()
    except BaseException:
        if writer is not None:
            writer.abandon()
        rejected.close()
        raise
    finally:
        bar.close()
    rejected.close()

    manifest = _manifest(settings, identity, records, rejected, rejected_name)
    os.replace(log_path, out / rejected_name)
    shards.write_json_atomic(manifest_path, manifest)
    shutil.rmtree(state, ignore_errors=True)
    return _report(out, manifest_path, manifest, time.monotonic() - started, resumed)


def _report(out: Path, manifest_path: Path, manifest: dict, seconds: float, resumed: int) -> BuildReport:
    rejected = manifest["rejected"]
    return BuildReport(
        out=out, manifest_path=manifest_path, inputs=manifest["inputs"], samples=manifest["samples"],
        rejected=rejected if isinstance(rejected, int) else len(rejected), copied=manifest["copied"],
        reencoded=manifest["reencoded"], shards=len(manifest["shards"]), seconds=seconds, resumed_shards=resumed,
    )
