"""``moco-shards index``: WebDataset tars written by other tools, made trainable where they lie.

Owns the indexing of foreign tars (img2dataset's LAION, DataComp, COYO output: ``KEY.jpg`` or
``KEY.webp`` beside ``KEY.txt`` and ``KEY.json``): one sequential read of each tar
(``tarwalk``), a DALI index per tar and a manifest (version 3, ``indexed``) in ``--out``, and
every sample the pipeline cannot take left out of the index with its reason in
``rejected.jsonl``. Must not write beside the tars nor change a byte of them; no image is
decoded (a ``.jpg``'s header is parsed, as the training pipeline's sample check parses it).

A sample is what DALI's reader takes as one: consecutive members whose names agree up to the
first dot of the file name. ``samples + rejected = samples found`` holds for every tar.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from ...common.files import write_atomic
from ...common.lock import FolderInUse, FolderLock
from ...common.options import option
from ...pipeline import shards
from . import BuildError
from .folder import prepare_folder
from .indextar import index_tar
from .inputs import printable
from .jsonlabel import parse_field
from .writer import reason_kind

__all__ = ["IndexCommand", "IndexReport", "index"]

LIST_SUFFIXES = (".txt", ".lst", ".list")


@dataclass
class IndexCommand:
    """Index WebDataset tars in place: DALI index files and a manifest in --out, no tar rewritten."""

    sources: list[str] = option(factory=list, positional="+", metavar="SRC")
    """.tar files, or list files (.txt/.lst/.list) naming one tar per line (relative to the list)."""
    out: str = option(required=True, metavar="DIR")
    """Folder for the index files and the manifest (not the tars' folder)."""
    name: str = "shard"
    """Index file prefix: NAME-000000.idx."""
    labels: str = option("none", choices=["none", "cls"])
    """'cls': the class is each sample's KEY.cls member (ASCII digits); samples without one are
    rejected."""
    label_key: Optional[str] = option(None, metavar="FIELD")
    """The class is field FIELD of each sample's KEY.json (an integer; keys joined by dots for
    nested objects: meta.label), read there by the index's label pointer; samples without one
    are rejected. Not with --labels cls."""
    num_parts: int = option(1, metavar="P")
    """Split the tars into P disjoint parts (tar i goes to part i mod P)."""
    part: int = option(0, metavar="I")
    """Index part I of P (0-based); 'moco-shards merge' makes one manifest of the parts."""
    executor: str = option("local", choices=["local", "ray"])
    """'local': this process indexes one part; 'ray': every part as a Ray task (--out on a
    shared file system), then merged."""
    ray_address: Optional[str] = option(None, metavar="ADDR")
    """With --executor ray: the cluster to join (default: start Ray on this machine)."""
    strict: bool = False
    """Exit 1 if any sample was rejected."""

    def __post_init__(self) -> None:
        if self.executor == "ray" and self.part:
            raise BuildError("--part: --executor ray indexes every part; give --num-parts only")
        if self.executor == "local" and self.ray_address:
            raise BuildError("--ray-address needs --executor ray")
        if self.label_key is not None:
            if self.labels == "cls":
                raise BuildError(
                    "--label-key takes the class from KEY.json, --labels cls from KEY.cls: give one"
                )
            try:
                parse_field(self.label_key)
            except ValueError as exc:
                raise BuildError(f"--label-key {exc}") from None
        if not self.name or any(c in self.name for c in "./ \t"):
            raise BuildError(f"--name {self.name!r}: use a name without dots, slashes or spaces")
        if not 1 <= self.num_parts <= 9999:
            raise BuildError(f"--num-parts must be in 1..9999, got {self.num_parts}")
        if not 0 <= self.part < self.num_parts:
            raise BuildError(f"--part must be in 0..{self.num_parts - 1}, got {self.part}")

    @property
    def is_part(self) -> bool:
        return self.num_parts > 1

    @property
    def label_source(self) -> str:
        """Where classes come from: ``"none"``, ``"cls"`` or ``"json"`` (``--label-key``)."""
        return "json" if self.label_key is not None else self.labels


@dataclass
class IndexReport:
    tars: int = 0
    shards: int = 0
    inputs: int = 0
    samples: int = 0
    rejected: int = 0
    bytes: int = 0
    seconds: float = 0.0
    manifest_path: Path = field(default_factory=Path)
    bytes_read: int = 0
    """Of ``bytes``, what this run read (the rest is resumed)."""
    resumed: int = 0
    """Tars an interrupted run had finished, taken from its journal rather than read again."""

    def summary(self) -> str:
        rate = self.bytes_read / self.seconds / 1e6 if self.seconds > 0 else 0.0
        resumed = ""
        if self.resumed:
            resumed = f" ({self.resumed} tar{'s' if self.resumed != 1 else ''} resumed)"
        return (
            f"{self.tars} tars, {self.inputs} samples found -> {self.samples} indexed in "
            f"{self.shards} shards, {self.rejected} rejected{resumed}; {self.seconds:.1f} s, "
            f"{rate:.0f} MB/s read; {self.manifest_path}"
        )


# --------------------------------------------------------------------------- sources


def _tars(sources: list[str], num_parts: int, part: int) -> Iterator[str]:
    """The tars of this part, in source order; a list file is read a line at a time.

    Paths per tar are strings: ``pathlib`` interns every name it parses, and the interned table
    would grow with the number of tars.
    """
    position = 0
    for src in sources:
        if Path(src).suffix.lower() in LIST_SUFFIXES:
            entries = _list_entries(Path(src))
        else:
            entries = iter([src])
        for tar in entries:
            if position % num_parts == part:
                if not os.path.isfile(tar):
                    raise BuildError(f"{printable(tar)}: no such tar file")
                yield tar
            position += 1


def _list_entries(path: Path) -> Iterator[str]:
    try:
        with open(path, "rb") as lines:
            for lineno, raw in enumerate(lines, start=1):
                line = raw.strip()
                if line and not line.startswith(b"#"):
                    if b"\0" in line:
                        raise BuildError(f"{path}: line {lineno}: a NUL character")
                    yield os.path.join(path.parent, os.fsdecode(line))
    except OSError as exc:
        raise BuildError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _check_sources(sources: list[str], out: Path) -> None:
    if not sources:
        raise BuildError("give at least one SRC: a .tar file or a list of tars")
    for src in sources:
        path = Path(src)
        if path.is_dir():
            raise BuildError(
                f"{src}: a folder; give its tars ({src}/*.tar) or a list of them, one per line"
            )
        if not path.is_file():
            raise BuildError(f"{src}: no such file")
        if path.suffix.lower() not in (".tar", *LIST_SUFFIXES):
            raise BuildError(f"{src}: not a .tar file nor a list of tars (.txt/.lst/.list)")
        if Path(os.path.abspath(path)).parent == Path(os.path.abspath(out)):
            raise BuildError(f"--out {out}: holds the source {src}; index into another folder")


def index(cmd: IndexCommand) -> IndexReport:
    """Index ``cmd.sources``'s tars (this part's share) into ``cmd.out``, resuming after the
    last tar an interrupted run with the same options finished.

    Raises:
        BuildError: a missing or unreadable source, a file that is not a tar, a damaged or
            truncated tar (named with the byte), an ``--out`` in use, not ours or unwritable.
    """
    started = time.monotonic()
    out = Path(cmd.out)
    _check_sources(cmd.sources, out)
    prepare_folder(out)
    part = cmd.part if cmd.is_part else None
    staging = out / f".moco-build-index-{cmd.name}{'' if part is None else f'-{part:04d}'}"
    finished = False
    try:
        with FolderLock(out / f"{staging.name}.lock", "moco-shards index", "--out"):
            prepare_folder(out)  # again, now that no other run can be writing here
            report = _index_locked(cmd, out, staging, part, started)
            finished = True
            return report
    except FolderInUse as exc:
        raise BuildError(str(exc)) from None
    except OSError as exc:
        where = printable(exc.filename) if getattr(exc, "filename", None) else str(out)
        raise BuildError(f"{where}: cannot write: {exc.strerror or exc}") from None
    finally:
        # Kept for a rerun when it holds a finished tar; with nothing to resume, --out is left
        # as it was.
        journal = staging / JOURNAL
        if finished or not (journal.is_file() and journal.stat().st_size):
            shutil.rmtree(staging, ignore_errors=True)


JOURNAL = ".journal.jsonl"
"""One line per finished tar: what it added up to, and where the logs ended after it."""
IDENTITY = "identity.json"
_MAX_JOURNAL_LINE = 1 << 20


def _identity(cmd: IndexCommand) -> dict:
    """What must be the same for a run to resume another: the tars are checked one by one."""
    return {
        "version": 1,
        "sources": [os.path.abspath(s) for s in cmd.sources],
        "name": cmd.name,
        "labels": cmd.labels,
        "label_key": cmd.label_key,
        "num_parts": cmd.num_parts,
        "part": cmd.part,
    }


@dataclass
class _Progress:
    """The sums over the tars indexed so far, restored from the journal on a resume."""

    report: IndexReport
    reasons: dict[str, int] = field(default_factory=dict)
    classes: dict[int, int] = field(default_factory=dict)

    def add(self, line: dict) -> None:
        report = self.report
        report.tars += 1
        report.inputs += line["found"]
        report.bytes += line["size"]
        for kind, count in line["reasons"].items():
            self.reasons[kind] = self.reasons.get(kind, 0) + count
            report.rejected += count
        if line["shard"] is not None:
            report.shards += 1
            report.samples += line["shard"]["samples"]
        for label, count in line["classes"].items():
            self.classes[int(label)] = self.classes.get(int(label), 0) + count


def _unchanged(line: dict, tar: str, staging: Path) -> bool:
    """Whether a journal line still stands for ``tar``: the same file (size and modification
    time) and, where it made one, its index file as written (its sha256)."""
    try:
        stat = os.stat(tar)
        if (line["tar"], line["size"], line["mtime_ns"]) != (tar, stat.st_size, stat.st_mtime_ns):
            return False
        if line["shard"] is None:
            return True
        written = (staging / line["shard"]["index"]).read_bytes()
    except (OSError, KeyError, TypeError):
        return False
    return hashlib.sha256(written).hexdigest() == line["shard"]["index_sha256"]


def _resume(cmd: IndexCommand, staging: Path, files: list[Path], progress: _Progress) -> int:
    """How many tars of this part an earlier run finished and still stand (0 for a fresh
    start, which clears ``staging``); the logs in ``files`` are cut back to where they ended.

    Reads the journal and the tars in step, a line at a time: memory does not grow with the
    number of tars. The first line that does not stand ends the resume (a tar changed or
    removed since, a line cut short by a kill): from there on every tar is read again.
    """
    identity = staging / IDENTITY
    try:
        same = json.loads(identity.read_bytes()) == _identity(cmd)
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        identity.write_text(json.dumps(_identity(cmd)))
        for path in files:
            path.touch()
        return 0
    done, journal_end, ends = 0, 0, [0] * len(files)
    sizes = [path.stat().st_size if path.is_file() else -1 for path in files]
    with open(staging / JOURNAL, "a+b") as journal:
        journal.seek(0)
        for tar in _tars(cmd.sources, cmd.num_parts, cmd.part):
            raw = journal.readline(_MAX_JOURNAL_LINE)
            try:
                line = json.loads(raw) if raw.endswith(b"\n") else None
            except ValueError:
                line = None
            if not (
                isinstance(line, dict)
                and _unchanged(line, tar, staging)
                and all(0 <= end <= size for end, size in zip(line["ends"], sizes))
            ):
                break
            progress.add(line)
            done, journal_end, ends = done + 1, journal.tell(), line["ends"]
        journal.truncate(journal_end)
    for path, end in zip(files, ends):
        path.touch()
        os.truncate(path, end)
    return done


def _index_locked(
    cmd: IndexCommand, out: Path, staging: Path, part: Optional[int], started: float
) -> IndexReport:
    # Index files wait in a staging folder until every tar has been read, so a run that stops
    # at a damaged tar leaves --out as it was; a rerun goes on from the tars it finished.
    staging.mkdir(exist_ok=True)
    rejected_file = shards.rejected_name(part, cmd.num_parts if cmd.is_part else None)
    # Shard entries go to disk as they come, as rejected samples do: memory does not grow with
    # the number of tars (the manifest is written from this file, a line at a time).
    entries = staging / ".shards.jsonl"
    progress = _Progress(IndexReport())
    done = _resume(cmd, staging, [staging / rejected_file, entries], progress)
    report, reasons, class_counts = progress.report, progress.reasons, progress.classes
    report.resumed, resumed_bytes = done, report.bytes
    with (
        open(staging / rejected_file, "ab") as log,
        open(entries, "ab") as entry_log,
        open(staging / JOURNAL, "ab") as journal,
    ):
        tar_reasons: dict[str, int] = {}

        def reject(what: str, reason: str) -> None:
            log.write(json.dumps({"input": printable(what), "reason": reason}).encode() + b"\n")
            tar_reasons[reason_kind(reason)] = tar_reasons.get(reason_kind(reason), 0) + 1

        for tar in itertools.islice(_tars(cmd.sources, cmd.num_parts, cmd.part), done, None):
            stat = os.stat(tar)  # before the read: a change during it shows at the next resume
            stem = shards.shard_stem(cmd.name, report.shards, part)
            tar_reasons.clear()
            shard, found = index_tar(
                tar, os.path.join(staging, f"{stem}.idx"), cmd.label_source, reject, cmd.label_key
            )
            if shard is not None:
                shard.entry["tar"] = os.path.relpath(os.path.abspath(tar), os.path.abspath(out))
                shard.entry["index"] = f"{stem}.idx"
                entry_log.write(json.dumps(shard.entry, sort_keys=True).encode() + b"\n")
            line = {
                "tar": tar,
                "size": stat.st_size,  # read whether it holds a sample or not
                "mtime_ns": stat.st_mtime_ns,
                "found": found,
                "shard": shard.entry if shard is not None else None,
                "classes": {str(k): v for k, v in shard.class_counts.items()} if shard else {},
                "reasons": dict(tar_reasons),
            }
            log.flush()
            entry_log.flush()
            line["ends"] = [log.tell(), entry_log.tell()]
            journal.write(json.dumps(line).encode() + b"\n")
            journal.flush()
            progress.add(line)
    if not report.tars:
        raise BuildError(f"part {cmd.part} of {cmd.num_parts} holds no tar; give more tars")
    classes = [str(i) for i in range(max(class_counts) + 1)] if class_counts else []
    manifest = {
        "format": shards.FORMAT,
        "version": shards.INDEXED_VERSION,
        "indexed": True,
        "name": cmd.name,
        "inputs": report.inputs,
        "samples": report.samples,
        "copied": report.samples,
        "reencoded": 0,
        "classes": classes,
        "class_counts": {c: class_counts.get(i, 0) for i, c in enumerate(classes)},
        **({"label_key": cmd.label_key} if cmd.label_key is not None else {}),
        "rejected": report.rejected,
        "rejected_reasons": dict(sorted(reasons.items())),
        "rejected_file": rejected_file,
        "settings": {
            "command": "index",
            "name": cmd.name,
            "labels": cmd.label_source,
            "label_key": cmd.label_key,
            "num_parts": cmd.num_parts,
            "part": cmd.part,
        },
        "sources": [printable(s) for s in cmd.sources],
        "input_digest": "",
        "parts": [
            {
                "part": cmd.part,
                "num_parts": cmd.num_parts,
                "inputs": report.inputs,
                "samples": report.samples,
                "rejected": report.rejected,
                "input_digest": "",
            }
        ],
    }
    if report.samples + report.rejected != report.inputs:
        raise AssertionError("accounting broke: samples + rejected != samples found")
    for number in range(report.shards):
        index_file = f"{shards.shard_stem(cmd.name, number, part)}.idx"
        os.replace(os.path.join(staging, index_file), os.path.join(out, index_file))
    os.replace(staging / rejected_file, out / rejected_file)
    name = shards.part_manifest_name(part, cmd.num_parts) if cmd.is_part else shards.MANIFEST_NAME
    report.manifest_path = write_atomic(out / name, lambda f: _write_manifest(f, manifest, entries))
    report.seconds = time.monotonic() - started
    report.bytes_read = report.bytes - resumed_bytes
    return report


def _write_manifest(f, manifest: dict, entries: Path) -> None:
    """The manifest as indented JSON with its ``shards`` last, one entry a line, read from disk."""
    head = json.dumps(manifest, indent=1, sort_keys=True)
    f.write(head[: head.rindex("\n")].encode() + b',\n "shards": [')
    with open(entries, "rb") as lines:
        for i, line in enumerate(lines):
            f.write((b",\n  " if i else b"\n  ") + line.rstrip(b"\n"))
    f.write(b"\n ]\n}\n")
