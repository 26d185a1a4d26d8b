"""A worker's side of a build: one input read safely, one shard written crash-safely, one block of shards.

Owns crash safety at the file level: a shard is written under a temporary name and
published (index first, then tar) only when complete, so a file under a shard's
final name is always whole. Owns the unit of work too: a block of consecutive
positions of the packing order (``--max-count`` of them) is read, normalised and
written by one worker process, which returns only a small record, so no image's
bytes travel between processes and workers never wait on a common writer. Inputs
are read as regular files only and never past a size cap, so a FIFO or a symlink to
``/dev/zero`` costs one rejected input, not a hung build.
"""

from __future__ import annotations

import collections
import hashlib
import os
import stat
from pathlib import Path
from typing import Annotated, Callable, Optional

import msgspec

from ...pipeline import shards
from ...pipeline.schema import Count
from .imageprep import PrepSettings, Rejected, prepare, sample_metadata
from .inputs import InputRef
from .tar import encode_sample

__all__ = [
    "read_input",
    "process_input",
    "ShardWriter",
    "write_block",
    "BlockRecord",
    "reason_kind",
]


def reason_kind(reason: str) -> str:
    """The kind of a rejection, as counted in the manifest: ``"corrupt JPEG data: ..."`` -> ``"corrupt JPEG data"``."""
    return reason.split(":")[0]


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "folder"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return kind
    return "special file"


def read_input(ref: InputRef, max_bytes: int) -> bytes:
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
            raise Rejected(
                f"unreadable: archive member cut short ({len(data)} of {ref.size} bytes)"
            )
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
        # Ask for the size the file says it has (and one byte more, to see it grew):
        # os.read allocates what it is asked for before it reads.
        chunks, left = [], max_bytes + 1
        while left and (
            chunk := os.read(fd, min(left, info.st_size + 1 if not chunks else 1 << 24))
        ):
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


def process_input(
    item: tuple[str, InputRef, object],
    prep: PrepSettings,
    max_input_bytes: int,
    read: Callable[[InputRef, int], bytes] = read_input,
):
    """One input -> ``("ok", blob, members, copied, class)`` or ``("rejected", reason)``.

    ``item`` is ``(key, ref, label)``; a ``str`` label is a reason to reject known beforehand.
    ``read`` gives its bytes (``parquet.block_reader``'s for a block holding table rows).
    """
    key, ref, label = item
    if isinstance(label, str):
        return ("rejected", label)
    if ref.rejected:
        return ("rejected", ref.rejected)
    try:
        prepared = prepare(read(ref, max_input_bytes), prep)
    except Rejected as exc:
        return ("rejected", str(exc))
    except Exception as exc:  # a decoder bug must cost one input, not the build
        return ("rejected", f"failed to process: {type(exc).__name__}: {exc}")
    files = [("jpg", prepared.jpeg)]
    if label is not None:
        files.append(("cls", str(label).encode()))
    files.append(("json", sample_metadata(ref.name, prepared, ref.src)))
    blob, members = encode_sample(key, files)
    return ("ok", blob, members, prepared.copied, label)


class ShardWriter:
    """Appends encoded samples to one shard; publishes tar and index only when closed."""

    def __init__(self, out: Path, stem: str):
        self.out, self.stem = out, stem
        self.tar_tmp = out / f".{stem}.tar.tmp"
        self.idx_tmp = out / f".{stem}.idx.tmp"
        self.file = open(self.tar_tmp, "wb")
        self.sha = hashlib.sha256()
        self.lines: list[str] = []
        self.bytes = 0

    @property
    def samples(self) -> int:
        return len(self.lines)

    def add(self, blob: bytes, members) -> None:
        self.file.write(blob)
        self.sha.update(blob)
        self.lines.append(shards.index_line((e, self.bytes + o, s, n) for e, o, s, n in members))
        self.bytes += len(blob)

    def close(self) -> dict:
        """Publish the shard (index first, then tar) and return its manifest entry."""
        try:
            self.file.write(shards.TAR_END)
            self.sha.update(shards.TAR_END)
            self.bytes += len(shards.TAR_END)
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            index_text = shards.index_header(self.samples) + "".join(self.lines)
            with open(self.idx_tmp, "w") as f:
                f.write(index_text)
                f.flush()
                os.fsync(f.fileno())
            # The tar is renamed last: a tar under its final name always has its index.
            os.replace(self.idx_tmp, self.out / f"{self.stem}.idx")
            os.replace(self.tar_tmp, self.out / f"{self.stem}.tar")
        except BaseException:
            self.abandon()
            raise
        return shards.ShardEntry(
            tar=f"{self.stem}.tar",
            index=f"{self.stem}.idx",
            samples=self.samples,
            bytes=self.bytes,
            sha256=self.sha.hexdigest(),
            index_sha256=hashlib.sha256(index_text.encode()).hexdigest(),
        ).to_json()

    def abandon(self) -> None:
        """Remove what an unfinished shard left (a full disk or a kill must leave no temporary file)."""
        try:
            self.file.close()
        except OSError:
            pass  # closing flushes, and the disk may still be full
        self.tar_tmp.unlink(missing_ok=True)
        self.idx_tmp.unlink(missing_ok=True)


class BlockRecord(msgspec.Struct):
    """A block's resume record, as ``write_block`` returns it and the build stores and reads it
    back (a record that does not hold to this costs its block, built again on resume)."""

    block: Count
    first_input: Count
    end_input: Count
    shards: list[shards.ShardEntry]
    copied: Count
    class_counts: dict[Annotated[str, msgspec.Meta(pattern="^[0-9]{1,9}$")], Count]
    """Samples per class index (its digits)."""
    rejected: list[dict[str, str]]
    """``{"input": ..., "reason": ...}`` per rejected input."""

    def __post_init__(self) -> None:
        if self.end_input < self.first_input:
            raise ValueError(f"end_input {self.end_input} is before first_input {self.first_input}")
        if any(set(r) != {"input", "reason"} for r in self.rejected):
            raise ValueError("a rejected entry is not {input, reason}")


def write_block(
    out: Path,
    stem: str,
    block: int,
    first_input: int,
    items: list,
    process: Callable,
    max_bytes: Optional[int],
) -> dict:
    """Turn one block of inputs into its shard (or shards, when ``max_bytes`` splits it).

    Args:
        items: ``(key, ref, label)`` per input, in packing order.
        process: one item -> ``("ok", blob, members, copied, class)`` or ``("rejected", reason)``.

    Returns:
        The block's resume record: its shards' manifest entries, counts and rejected inputs.
    """
    limit = max_bytes or float("inf")
    entries, rejected = [], []
    copied = 0
    class_counts: collections.Counter = collections.Counter()
    writer: Optional[ShardWriter] = None
    try:
        for item in items:
            result = process(item)
            if result[0] == "rejected":
                rejected.append({"input": item[1].source, "reason": result[1]})
                continue
            _, blob, members, was_copied, class_index = result
            if writer is not None and writer.bytes + len(blob) + len(shards.TAR_END) > limit:
                entries.append(writer.close())
                writer = None
            if (
                writer is None
            ):  # a block split by --max-bytes names its further shards STEM-001, ...
                writer = ShardWriter(out, stem if not entries else f"{stem}-{len(entries):03d}")
            writer.add(blob, members)
            copied += was_copied
            if class_index is not None:
                class_counts[class_index] += 1
        if writer is not None:
            entries.append(writer.close())
            writer = None
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    return {
        "block": block,
        "first_input": first_input,
        "end_input": first_input + len(items),
        "shards": entries,
        "copied": copied,
        "class_counts": {str(k): v for k, v in sorted(class_counts.items())},
        "rejected": rejected,
    }
