"""The shard folder's contract: file names, DALI's index lines, the manifest, and the checks a
reader makes before it trusts a shard.

The builder (``tools/shards``) writes through these names and the reader (``pipeline``) reads
through them, so the two cannot drift apart. ``load_manifest`` and ``open_shard`` are what a
training rank uses (a few small reads per shard it opens); ``discover`` parses every index,
O(samples), for ``moco-shards verify`` and ``inspect``.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import msgspec
import numpy as np

from ..common.files import check_schema, read_json
from .schema import MAX_MANIFEST_BYTES, ManifestSchema, ShardEntry

__all__ = [
    "FORMAT",
    "STORED_FORMATS",
    "MAX_PIXELS",
    "FORMAT_VERSION",
    "INDEXED_VERSION",
    "INDEX_VERSION",
    "MANIFEST_NAME",
    "ShardError",
    "ShardEntry",
    "Manifest",
    "shard_stem",
    "part_manifest_name",
    "rejected_name",
    "index_header",
    "index_line",
    "label_digits",
    "read_index",
    "iter_members",
    "load_manifest",
    "tar_size_for_index",
    "index_fits_tar",
    "TAR_BLOCK",
    "TAR_END",
    "open_shard",
    "check_whole",
    "discover",
]

FORMAT = "moco-dali-shards"
# 2: ``rejected`` is a count (with ``rejected_reasons`` and ``rejected_file``) instead
# of a list of every rejected input; shards, counts and classes are as in 1.
FORMAT_VERSION = 2
# 3: written by ``moco-shards index`` only (``indexed: true``): the shards are tars other tools
# wrote, indexed where they lie. Their size is not fixed by their index (tarfile pads to
# 10 KiB records; members the index leaves out may follow the last sample), so a reader checks
# that the index ends inside the tar instead. A reader of version 2 would call every such shard
# stale; the version makes it refuse the folder in one line instead.
INDEXED_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
# The index layout that DALI's fn.readers.webdataset reads (the one its wds2idx writes):
# a header "v1.2 N", then per sample "ext data_offset size member_name" repeated for
# each of the sample's files.
INDEX_VERSION = "v1.2"
MANIFEST_NAME = "manifest.json"
STORED_FORMATS = ("JPEG",)
"""What Pillow may open a stored sample as (its ``formats=``): every ``KEY.jpg`` is a JPEG, and no
other plugin (EPS's hands the file to Ghostscript, which runs it) is reached from a shard."""
MAX_PIXELS = 89_478_485
"""The most pixels (width x height) a stored image may declare: Pillow's decompression-bomb
limit and the builder's default ``--max-pixels``. Readers refuse a larger one before any decode
(a 65500 x 65500 header asks for 12 GB)."""
REJECTED_NAME = "rejected.jsonl"
PART_MANIFEST_RE = re.compile(r"^manifest\.part-(\d{4})-of-(\d{4})\.json$")


class ShardError(ValueError):
    """A shard folder, shard, index or manifest is missing, stale or malformed."""


def shard_stem(name: str, index: int, part: int | None = None) -> str:
    """File stem of shard ``index`` of data set ``name`` (of build part ``part``)."""
    if part is None:
        return f"{name}-{index:06d}"
    return f"{name}-part{part:04d}-{index:06d}"


def part_manifest_name(part: int, num_parts: int) -> str:
    """Name of the manifest that one part of a multi-part build writes."""
    return f"manifest.part-{part:04d}-of-{num_parts:04d}.json"


def rejected_name(part: int | None = None, num_parts: int | None = None) -> str:
    """Name of the JSONL file of rejected inputs (``{"input": ..., "reason": ...}`` per line)."""
    if part is None:
        return REJECTED_NAME
    return f"rejected.part-{part:04d}-of-{num_parts:04d}.jsonl"


def index_header(num_samples: int) -> str:
    return f"{INDEX_VERSION} {num_samples}\n"


def index_line(members: Iterable[tuple[str, int, int, str]]) -> str:
    """One sample's index line from its ``(ext, data_offset, size, member_name)``."""
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members) + "\n"


def label_digits(raw: bytes, pointer: bool) -> bytes:
    """The ASCII digits that give a sample its class, from its ``cls`` component's bytes: all of
    them, or for a label pointer the digits they end in (empty bytes when there are none).

    A label pointer (a manifest with ``label_key``) is a ``cls`` component whose bytes are those of
    the sample's ``KEY.json`` from its start up to the end of the label field's value, and whose
    name is ``KEY.json``: DALI's reader takes a component at a 512-byte aligned offset only
    (``dali/operators/reader/loader/webdataset_loader.cc``, ``ParseSampleDesc``), so a component
    cannot start at the digits, but it may end anywhere and share bytes with another component.
    The loader's ``_ascii_to_int`` takes the same digits from a batch at once.
    """
    if not pointer:
        return raw if raw.isdigit() else b""
    return raw[len(raw.rstrip(b"0123456789")) :]


_WHOLE = re.compile(r"[0-9]{1,18}")
"""A count or offset in an index: ASCII digits (``str.isdigit`` and ``int`` take '١' too), at most
18 of them, so that it fits in the 64 bits a seek takes."""


def _whole(text: str) -> int | None:
    return int(text) if _WHOLE.fullmatch(text) else None


def read_index(path: str | os.PathLike) -> list[list[tuple[str, int, int, str]]]:
    """Parse a DALI WebDataset index into per-sample lists of members.

    Raises:
        ShardError: naming the file and line when the index is malformed.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ShardError(f"{path}: cannot read index: {exc.strerror or exc}") from None
    try:
        lines = raw.decode().splitlines()
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ShardError(f"{path}: line {line}: not UTF-8 text (byte {exc.start})") from None
    if not lines:
        raise ShardError(f"{path}: empty index")
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION or _whole(head[1]) is None:
        raise ShardError(f"{path}: line 1: expected '{INDEX_VERSION} N', got {lines[0][:80]!r}")
    samples = [
        _index_sample(path, f"line {lineno}", line)
        for lineno, line in enumerate(lines[1:], start=2)
    ]
    if len(samples) != int(head[1]):
        raise ShardError(f"{path}: header says {head[1]} samples, index lists {len(samples)}")
    return samples


def _index_sample(path: Path, where: str, line: str) -> list[tuple[str, int, int, str]]:
    fields = line.split()
    if not fields or len(fields) % 4:
        raise ShardError(f"{path}: {where}: expected groups of 'ext offset size name'")
    members = []
    for i in range(0, len(fields), 4):
        offset, size = _whole(fields[i + 1]), _whole(fields[i + 2])
        if offset is None or size is None:
            raise ShardError(f"{path}: {where}: offset and size must be integers")
        if offset < TAR_BLOCK:  # a member's data follows its 512-byte header
            raise ShardError(f"{path}: {where}: offset {offset} is inside the tar's first header")
        members.append((fields[i], offset, size, fields[i + 3]))
    return members


def iter_members(
    pairs: Iterable[tuple[Path, Path]], ext: str
) -> Iterator[tuple[Path, str, int, int]]:
    """``(tar, key, data offset, size)`` of every sample's ``ext`` file, in index order."""
    for tar, idx in pairs:
        for members in read_index(idx):
            _, offset, size, name = next(m for m in members if m[0] == ext)
            yield tar, name.split(".")[0], offset, size


@dataclass
class Manifest:
    """A parsed ``manifest.json`` (checked against ``schema.ManifestSchema``) and its folder."""

    root: Path
    data: dict[str, Any]
    url: str | None = None
    """``s3://bucket/prefix`` of a folder in object storage (``cache.load_manifest``); its shards
    are read through a ``cache.ShardCache``."""

    @property
    def name(self) -> str:
        """The folder as its user named it: the path, or the store's address."""
        return self.url or str(self.root)

    @property
    def shards(self) -> list[ShardEntry]:
        return [ShardEntry.from_json(s) for s in self.data["shards"]]

    @property
    def classes(self) -> list[str]:
        return list(self.data.get("classes") or [])

    @property
    def samples(self) -> int:
        return int(self.data["samples"])

    @functools.cached_property
    def counts(self) -> np.ndarray:
        """Samples per shard, in manifest order: all a rank holds about the whole folder."""
        return np.array([s["samples"] for s in self.data["shards"]], dtype=np.int64)

    @property
    def label_key(self) -> str | None:
        """The ``KEY.json`` field the classes are read from (``label_digits``), or None."""
        return self.data.get("label_key")

    @property
    def indexed(self) -> bool:
        """Whether the shards are tars written elsewhere and indexed in place (``moco-shards index``)."""
        return bool(self.data.get("indexed"))

    def entry(self, index: int) -> ShardEntry:
        """Shard ``index`` of the manifest, without building the whole list."""
        try:
            return ShardEntry.from_json(self.data["shards"][index])
        except msgspec.ValidationError as exc:  # a manifest changed after it was loaded
            raise ShardError(f"{self.root / MANIFEST_NAME}: shard entry {index}: {exc}") from None

    def path(self, relative: str) -> Path:
        """A shard's file: paths are relative to the manifest's folder (``../`` for an indexed tar)."""
        return self.root / relative


def load_manifest(folder: str | os.PathLike, name: str = MANIFEST_NAME) -> Manifest:
    """Read and sanity-check ``folder/name``.

    Raises:
        ShardError: the folder or manifest is missing, unreadable or not ours.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"{folder}: not a folder")
    path = folder / name
    if not path.is_file():
        parts = sorted(p.name for p in folder.iterdir() if PART_MANIFEST_RE.match(p.name))
        hint = (
            f" (found {len(parts)} part manifests: run 'moco-shards merge {folder}')"
            if parts
            else ""
        )
        raise ShardError(
            f"{path}: no manifest; is this a folder written by 'moco-shards build'?{hint}"
        )
    data = read_json(path, "manifest", max_bytes=MAX_MANIFEST_BYTES, error=ShardError)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ShardError(f"{path}: not a {FORMAT} manifest")
    if data.get("version") not in READABLE_VERSIONS:
        raise ShardError(
            f"{path}: manifest version {data.get('version')}, this tool reads {FORMAT_VERSION}"
        )
    # What every reader relies on, checked once, before any value is used.
    check_schema(data, ManifestSchema, path, "manifest", ShardError)
    return Manifest(root=folder, data=data)


TAR_BLOCK = 512
TAR_END = b"\0" * (2 * TAR_BLOCK)


def index_fits_tar(samples: list, size: int, indexed: bool) -> bool:
    """Whether an index (its samples, or its last one) can belong to a tar of ``size`` bytes.

    A tar this project wrote has exactly ``tar_size_for_index``'s size; an indexed tar (written
    elsewhere, maybe without end-of-archive blocks) only holds the index's last member.
    """
    if not indexed:
        return tar_size_for_index(samples) == size
    return tar_size_for_index(samples) - len(TAR_END) <= size


def tar_size_for_index(samples: list[list[tuple[str, int, int, str]]]) -> int:
    """The size a tar written by this project must have, given its index.

    Members are padded to 512-byte blocks and the archive ends with two zero blocks,
    with no further record padding, so the last member's end fixes the file size.
    """
    if not samples:
        return len(TAR_END)
    end = max(offset + size for members in samples for _, offset, size, _ in members)
    return -(-end // TAR_BLOCK) * TAR_BLOCK + len(TAR_END)


_INDEX_END_BYTES = 1 << 16  # an index line is about 40 bytes per member; both ends of an index fit


def _index_ends(path: Path) -> tuple[int, list, list]:
    """The sample count an index declares and its first and last sample lines, from its two ends."""
    try:
        with open(path, "rb") as f:
            head = f.read(_INDEX_END_BYTES)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _INDEX_END_BYTES))
            tail = f.read()
    except OSError as exc:
        raise ShardError(f"{path}: cannot read index: {exc.strerror or exc}") from None
    parts = head.split(b"\n", 2)
    header = _text(path, "line 1", parts[0])
    fields = header.split()
    count = _whole(fields[1]) if len(fields) == 2 and fields[0] == INDEX_VERSION else None
    if count is None:
        raise ShardError(f"{path}: line 1: expected '{INDEX_VERSION} N', got {header[:80]!r}")
    if count == 0:
        return 0, [], []
    if len(parts) < 2 or (len(parts) == 2 and size > len(head)):
        raise ShardError(
            f"{path}: header says {count} samples, the index ends before its first line"
        )
    first = _text(path, "line 2", parts[1])
    last = _text(path, "last line", tail.rstrip(b"\n").rsplit(b"\n", 1)[-1])
    return count, _index_sample(path, "line 2", first), _index_sample(path, "last line", last)


def _text(path: Path, where: str, line: bytes) -> str:
    try:
        return line.decode()
    except UnicodeDecodeError:
        raise ShardError(f"{path}: {where}: not UTF-8 text") from None


def _tar_member_header(
    f, tar: Path, member: tuple[str, int, int, str], pointer: bool = False
) -> None:
    """Check that the tar holds the member the index names where it says (the ustar header before
    its data); a label ``pointer`` (``label_digits``) holds the start of that member's data."""
    ext, offset, size, name = member
    key = name.split(".")[0]
    header = b""
    if offset >= TAR_BLOCK:  # read_index's rule; a seek before the start would be an OSError
        f.seek(offset - TAR_BLOCK)
        header = f.read(TAR_BLOCK)
    try:
        found_name = header[:100].rstrip(b"\0").decode()
        found_size = int(header[124:136].rstrip(b"\0 ") or b"-1", 8)
    except ValueError:
        found_name, found_size = repr(header[:20]), -1
    fits = 0 < size <= found_size if pointer else size == found_size
    if len(header) != TAR_BLOCK or found_name != name or not fits:
        raise ShardError(
            f"{tar}: key {key}: the index says {name} ({size} bytes) at {offset}, the tar holds "
            f"{found_name or 'no member'} ({found_size} bytes) there; stale index or changed shard"
        )


def open_shard(
    manifest: Manifest, entry: ShardEntry, files: tuple[Path, Path] | None = None
) -> tuple[Path, Path]:
    """A shard's ``(tar, index)`` after the checks that cost a few small reads, whatever the shard's size.

    ``files`` are the shard's local copies when they are not in the manifest's folder (a cache).

    Both files exist; the tar has the manifest's size; the index declares the
    manifest's sample count and ends where the tar's last member ends; the tar's
    headers of the first and the last member are the ones the index names (of a label
    pointer, the ``KEY.json`` it lies in, holding all of its bytes). What this
    cannot see (a flipped byte inside a sample) is ``moco-shards verify``'s job: it
    recomputes every hash and compares every index line with the tar.

    Raises:
        ShardError: naming the shard or index at fault.
    """
    tar, idx = files or (manifest.path(entry.tar), manifest.path(entry.index))
    if not tar.is_file():
        raise ShardError(f"{tar}: shard listed in the manifest is missing")
    if not idx.is_file():
        raise ShardError(f"{idx}: index of shard {entry.tar} is missing")
    size = tar.stat().st_size
    if size != entry.bytes:
        raise ShardError(
            f"{tar}: {size} bytes, the manifest says {entry.bytes}; the shard changed after the "
            f"{'indexing' if manifest.indexed else 'build'}"
        )
    count, first, last = _index_ends(idx)
    if count != entry.samples or not index_fits_tar(
        [last] if count else [], size, manifest.indexed
    ):
        raise ShardError(f"{idx}: stale index, it does not match its shard {entry.tar}")
    if count and first[0][1] + first[0][2] > size:
        raise ShardError(
            f"{idx}: line 2: {first[0][3]} ends at byte {first[0][1] + first[0][2]}, past the end "
            f"of its shard {entry.tar} ({size} bytes)"
        )
    if count:
        with open(tar, "rb") as f:
            _tar_member_header(f, tar, first[0])
            # A label pointer is its line's last component (the index writes it there).
            pointer = manifest.label_key is not None and last[-1][0] == "cls"
            _tar_member_header(f, tar, last[-1], pointer)
    return tar, idx


def check_whole(
    manifest: Manifest, entry: ShardEntry, files: tuple[Path, Path]
) -> tuple[Path, Path]:
    """``files`` (an opened shard's tar and index) once every line of the index is parsed and
    the index fits its tar: ``discover``'s check of each shard."""
    tar, idx = files
    samples = read_index(idx)
    if len(samples) != entry.samples or not index_fits_tar(samples, entry.bytes, manifest.indexed):
        raise ShardError(f"{idx}: stale index, it does not match its shard {entry.tar}")
    return tar, idx


def discover(folder: str | os.PathLike) -> tuple[Manifest, list[tuple[Path, Path]]]:
    """The manifest of a shard folder and every shard's ``(tar, index)``, in manifest order, all checked.

    Parses every index: O(samples), for ``moco-shards verify`` and ``inspect``;
    training and evaluation open only their share with ``open_shard``. Never
    rebuilds an index. A shard without its index, or whose size no longer matches the
    manifest and its index (a rewritten tar beside a stale index, which would make
    DALI read garbage offsets), is an error.

    Raises:
        ShardError: naming the folder or shard at fault.
    """
    manifest = load_manifest(folder)
    pairs = [check_whole(manifest, entry, open_shard(manifest, entry)) for entry in manifest.shards]
    if not pairs:
        raise ShardError(f"{Path(folder)}: the manifest lists no shards")
    return manifest, pairs
