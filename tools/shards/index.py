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
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import simplejpeg

from ...common.files import write_atomic
from ...common.lock import FolderInUse, FolderLock
from ...common.options import option
from ...pipeline import shards
from . import BuildError
from .folder import prepare_folder
from .inputs import printable
from .tarwalk import BadTar, Member, TarWalk
from .writer import reason_kind

__all__ = ["IndexCommand", "IndexReport", "index"]

LIST_SUFFIXES = (".txt", ".lst", ".list")
IMAGE_EXTS = {"webp", "png", "jpeg", "jpe", "gif", "bmp", "tif", "tiff", "avif", "heic", "ppm"}
"""Image members the pipeline does not read (it reads ``.jpg`` only): named as such when rejected."""
MAX_JPEG_BYTES = 256 << 20
"""A ``.jpg`` member larger than this is rejected unread (build's ``--max-input-bytes``)."""
MAX_CLASS = 1 << 20
"""The largest ``.cls`` taken: the manifest lists a class name for every index up to the largest."""


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
        if not self.name or any(c in self.name for c in "./ \t"):
            raise BuildError(f"--name {self.name!r}: use a name without dots, slashes or spaces")
        if not 1 <= self.num_parts <= 9999:
            raise BuildError(f"--num-parts must be in 1..9999, got {self.num_parts}")
        if not 0 <= self.part < self.num_parts:
            raise BuildError(f"--part must be in 0..{self.num_parts - 1}, got {self.part}")

    @property
    def is_part(self) -> bool:
        return self.num_parts > 1


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

    def summary(self) -> str:
        rate = self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0
        return (
            f"{self.tars} tars, {self.inputs} samples found -> {self.samples} indexed in "
            f"{self.shards} shards, {self.rejected} rejected; {self.seconds:.1f} s, "
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


# --------------------------------------------------------------------------- samples


def split_name(name: str) -> tuple[str, str]:
    """``(key, ext)`` as DALI's webdataset reader splits a member name: at the first dot of the
    file name (``dali/operators/reader/loader/webdataset_loader.cc``, ``split_name``)."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def _samples(walk: TarWalk) -> Iterator[list[Member]]:
    """Consecutive members with one key: a sample, as DALI and WebDataset group them."""
    group: list[Member] = []
    for member in walk:
        if group and split_name(member.name)[0] != split_name(group[0].name)[0]:
            yield group
            group = []
        group.append(member)
    if group:
        yield group


def _judge(members: list[Member], labels: str, seen: set[str]) -> tuple[Optional[str], int]:
    """``(reason, class)`` of one sample: ``reason`` None when the pipeline can read it."""
    key = split_name(members[0].name)[0]
    exts = [split_name(m.name)[1] for m in members]
    for m in members:
        if m.kind != "file":
            return f"not a regular file: {printable(m.name)} is a {m.kind}", -1
    if not key or key.endswith("/"):
        return f"no key: {printable(members[0].name)} begins with a dot", -1
    if key in seen:
        return f"key repeats: {printable(key)} has members apart in the tar", -1
    seen.add(key)
    if "." in key:
        return (
            f"key split at a dot: {printable(key)} holds one in a folder name, and a shard reader "
            f"takes a key up to the first dot",
            -1,
        )
    if "jpg" not in exts and any("." in e for e in exts):
        dotted = [e for e in exts if "." in e] or exts
        ext = next((e for e in dotted if e.endswith(".jpg")), dotted[0])
        return (
            f"key split at a dot: DALI reads {printable(key + '.' + ext)} as key "
            f"{printable(key.split('.')[0])}, extension {printable(ext)}",
            -1,
        )
    for m in members:
        if not m.plain_header:
            return (
                f"name not in its tar header: {printable(m.name)} (a pax or GNU long name, a "
                f"ustar prefix, or a base-256 size; a reader checks the header before the data)",
                -1,
            )
        if any(c.isspace() for c in m.name) or not printable(m.name) == m.name:
            return f"name not indexable: {printable(m.name)} (whitespace or not UTF-8)", -1
    if len(set(exts)) != len(exts):
        return f"key repeats: {printable(key)} has two .{_duplicate(exts)} members", -1
    if "jpg" not in exts:
        images = sorted(e for e in exts if e.lower() in IMAGE_EXTS)
        if images:
            return f"not a JPEG: .{images[0]} (the pipeline decodes .jpg only)", -1
        shown = ", ".join(f".{e}" for e in exts)
        return f"no image member: {printable(key)} has {printable(shown)}", -1
    jpeg = members[exts.index("jpg")]
    if jpeg.data is None:
        return f"too large: {jpeg.size} bytes of JPEG, over {MAX_JPEG_BYTES}", -1
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(jpeg.data)
    except ValueError as exc:
        return f"not a JPEG the decoder accepts: {exc}", -1
    if colorspace in ("CMYK", "YCCK"):
        return f"not a JPEG the decoder accepts: {colorspace}", -1
    if width * height > shards.MAX_PIXELS:
        return (
            f"too many pixels: declares {width}x{height} = {width * height}, over "
            f"{shards.MAX_PIXELS}",
            -1,
        )
    if labels == "cls":
        if "cls" not in exts:
            return "no class: no .cls member", -1
        raw = members[exts.index("cls")].data or b""
        if not (raw.isdigit() and len(raw) <= 7 and int(raw) < MAX_CLASS):
            return f"no class: .cls holds {raw[:20]!r}, not a class index below {MAX_CLASS}", -1
        return None, int(raw)
    return None, -1


def _duplicate(exts: list[str]) -> str:
    return next(e for e in exts if exts.count(e) > 1)


# --------------------------------------------------------------------------- the pass


@dataclass
class _Shard:
    entry: dict
    samples: int
    class_counts: dict[int, int]


def _index_tar(tar: str, idx_tmp: str, labels: str, reject) -> tuple[Optional[_Shard], int]:
    """Index one tar into ``idx_tmp``: the shard (None when it holds no sample the pipeline can
    read) and the number of samples found in it."""
    wanted = ("jpg", "cls") if labels == "cls" else ("jpg",)
    walk = TarWalk(tar, lambda name: split_name(name)[1] in wanted, MAX_JPEG_BYTES)
    lines, seen, counts, found = [], set(), {}, 0
    try:
        for members in _samples(walk):
            found += 1
            reason, label = _judge(members, labels, seen)
            if reason is not None:
                reject(f"{tar}:{split_name(members[0].name)[0]}", reason)
                continue
            lines.append(
                shards.index_line(
                    (split_name(m.name)[1], m.offset, m.size, m.name) for m in members
                )
            )
            if label >= 0:
                counts[label] = counts.get(label, 0) + 1
    except BadTar as exc:
        raise BuildError(f"{printable(str(exc))}; nothing was written to --out") from None
    except OSError as exc:
        raise BuildError(f"{printable(str(tar))}: cannot read: {exc.strerror or exc}") from None
    if not lines:
        return None, found
    text = (shards.index_header(len(lines)) + "".join(lines)).encode()
    with open(idx_tmp, "wb") as f:
        f.write(text)
    entry = {
        "tar": "",  # filled by the caller: it knows where the manifest lies
        "index": "",
        "samples": len(lines),
        "bytes": walk.size,
        "sha256": walk.sha256,
        "index_sha256": hashlib.sha256(text).hexdigest(),
    }
    return _Shard(entry, len(lines), counts), found


def index(cmd: IndexCommand) -> IndexReport:
    """Index ``cmd.sources``'s tars (this part's share) into ``cmd.out``.

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
    try:
        with FolderLock(out / f"{staging.name}.lock", "moco-shards index", "--out"):
            prepare_folder(out)  # again, now that no other run can be writing here
            return _index_locked(cmd, out, staging, part, started)
    except FolderInUse as exc:
        raise BuildError(str(exc)) from None
    except OSError as exc:
        where = printable(exc.filename) if getattr(exc, "filename", None) else str(out)
        raise BuildError(f"{where}: cannot write: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _index_locked(
    cmd: IndexCommand, out: Path, staging: Path, part: Optional[int], started: float
) -> IndexReport:
    # Index files wait in a staging folder until every tar has been read, so a run that stops
    # at a damaged tar leaves --out as it was (a rerun clears the staging folder).
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    report = IndexReport()
    reasons: dict[str, int] = {}
    rejected_file = shards.rejected_name(part, cmd.num_parts if cmd.is_part else None)
    class_counts: dict[int, int] = {}
    # Shard entries go to disk as they come, as rejected samples do: memory does not grow with
    # the number of tars (the manifest is written from this file, a line at a time).
    entries = staging / ".shards.jsonl"
    with (
        open(staging / rejected_file, "w", encoding="utf-8") as log,
        open(entries, "w", encoding="utf-8") as entry_log,
    ):

        def reject(what: str, reason: str) -> None:
            log.write(json.dumps({"input": printable(what), "reason": reason}) + "\n")
            reasons[reason_kind(reason)] = reasons.get(reason_kind(reason), 0) + 1
            report.rejected += 1

        for tar in _tars(cmd.sources, cmd.num_parts, cmd.part):
            report.tars += 1
            stem = shards.shard_stem(cmd.name, report.shards, part)
            idx = os.path.join(staging, f"{stem}.idx")
            shard, found = _index_tar(tar, idx, cmd.labels, reject)
            report.inputs += found
            report.bytes += os.path.getsize(tar)  # read whether it holds a sample or not
            if shard is None:
                continue
            shard.entry["tar"] = os.path.relpath(os.path.abspath(tar), os.path.abspath(out))
            shard.entry["index"] = f"{stem}.idx"
            entry_log.write(json.dumps(shard.entry, sort_keys=True) + "\n")
            report.shards += 1
            for label, count in shard.class_counts.items():
                class_counts[label] = class_counts.get(label, 0) + count
            report.samples += shard.samples
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
        "rejected": report.rejected,
        "rejected_reasons": dict(sorted(reasons.items())),
        "rejected_file": rejected_file,
        "settings": {
            "command": "index",
            "name": cmd.name,
            "labels": cmd.labels,
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
    return report


def _write_manifest(f, manifest: dict, entries: Path) -> None:
    """The manifest as indented JSON with its ``shards`` last, one entry a line, read from disk."""
    head = json.dumps(manifest, indent=1, sort_keys=True)
    f.write(head[: head.rindex("\n")].encode() + b',\n "shards": [')
    with open(entries, "rb") as lines:
        for i, line in enumerate(lines):
            f.write((b",\n  " if i else b"\n  ") + line.rstrip(b"\n"))
    f.write(b"\n ]\n}\n")
