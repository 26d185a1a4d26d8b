"""The two files a build appends to: one shard (tar and its index) and the log of rejected inputs.

Owns crash safety at the file level: a shard is written under a temporary name and
published (index first, then tar) only when complete, so a file under a shard's
final name is always whole; the rejected log is synced before each resume record
that points into it, and cut back to that point on resume.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from moco_dali.pipeline import shards

__all__ = ["ShardWriter", "RejectedLog", "reason_kind"]


def reason_kind(reason: str) -> str:
    """The kind of a rejection, as counted in the manifest: ``"corrupt JPEG data: ..."`` -> ``"corrupt JPEG data"``."""
    return reason.split(":")[0]


class ShardWriter:
    """Appends encoded samples to one shard; publishes tar and index only when closed."""

    def __init__(self, out: Path, stem: str, first_input: int):
        self.out, self.stem, self.first_input = out, stem, first_input
        self.tar_tmp = out / f".{stem}.tar.tmp"
        self.idx_tmp = out / f".{stem}.idx.tmp"
        self.file = open(self.tar_tmp, "wb")
        self.sha = hashlib.sha256()
        self.lines: list[str] = []
        self.bytes = 0
        self.copied = 0
        self.class_counts: dict[int, int] = {}

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
        try:
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
        }

    def abandon(self) -> None:
        """Remove what an unfinished shard left (a full disk or a kill must leave no temporary file)."""
        try:
            self.file.close()
        except OSError:
            pass  # closing flushes, and the disk may still be full
        self.tar_tmp.unlink(missing_ok=True)
        self.idx_tmp.unlink(missing_ok=True)


class RejectedLog:
    """Rejected inputs streamed as JSONL lines (``{"input": ..., "reason": ...}``), with running counts."""

    def __init__(self, path: Path, offset: int, count: int, reasons: dict[str, int]):
        self.path = path
        self.count = count
        self.reasons = collections.Counter(reasons)
        self.file = open(path, "ab")
        self.file.truncate(offset)  # lines after the last finished shard are written again
        self.file.seek(offset)

    def add(self, source: str, reason: str) -> None:
        self.file.write(json.dumps({"input": source, "reason": reason}).encode() + b"\n")
        self.count += 1
        self.reasons[reason_kind(reason)] += 1

    def sync(self) -> int:
        """Make what was added durable; the file's length, for a resume record."""
        self.file.flush()
        os.fsync(self.file.fileno())
        return self.file.tell()

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
