"""One sequential pass over a tar written by any tool: its members' headers, hashed as they pass.

Owns the reading of foreign tars for ``moco-shards index``: ustar headers (with the pax and GNU
long-name records other writers add), each member's data offset and size, the bytes of the few
members the caller asks for, and the sha256 and size of the whole file, all in one read from
start to end. Must not write anything, nor hold more than one asked-for member in memory.
Python's ``tarfile`` resolves names but hides the raw header; the index needs to know whether
the 512-byte header before a member's data names it alone, which is what every shard reader
compares (``pipeline.shards.open_shard``), so the headers are read here.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Optional

from ...pipeline.shards import TAR_BLOCK

__all__ = ["BadTar", "Member", "TarWalk"]

MAX_RECORD_BYTES = 1 << 20
"""The largest pax or GNU long-name record read (a name is at most a few KiB)."""
_CHUNK = 1 << 22
_KINDS = {
    b"1": "hard link",
    b"2": "symlink",
    b"3": "character device",
    b"4": "block device",
    b"5": "folder",
    b"6": "FIFO",
    b"7": "contiguous file",
}


class BadTar(ValueError):
    """The file is not a tar, or is damaged or truncated (one line naming the file and byte)."""


@dataclass
class Member:
    """One member as the tar holds it."""

    name: str
    """Its full name (a pax or GNU long name applied); bytes that are not UTF-8 as surrogates."""
    kind: str
    """``"file"`` for a regular file, else what it is (``"symlink"``, ``"folder"``, ...)."""
    offset: int
    """Where its data starts."""
    size: int
    plain_header: bool
    """Whether the ustar header right before the data holds the whole name and an octal size,
    which is what a shard reader compares with the index."""
    data: Optional[bytes] = None
    """Its bytes, when the caller asked for them."""


class TarWalk:
    """Iterate the members of ``path``; afterwards ``size`` and ``sha256`` describe the whole file.

    Args:
        path: the tar.
        wanted: called with a regular member's name, the most of its bytes to keep (0: none); a
            larger member is passed over (``data`` stays None).

    Raises (while iterating):
        BadTar: not a tar, a damaged header, a member running past the end of the file.
        OSError: the file cannot be read.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        wanted: Callable[[str], int],
    ) -> None:
        # Kept as given: a str per tar does not grow pathlib's table of interned names.
        self.path, self.wanted = path, wanted
        self.size = 0
        self.sha256 = ""
        self._hash = hashlib.sha256()
        self._pos = 0
        self._file: Optional[BinaryIO] = None

    # ------------------------------------------------------------------ bytes

    def _read(self, n: int) -> bytes:
        data = self._file.read(n)
        self._hash.update(data)
        self._pos += len(data)
        return data

    def _skip(self, n: int, to_end: bool = False) -> None:
        while n > 0:
            got = self._read(min(n, _CHUNK))
            if not got:
                if to_end:
                    return
                raise self._fail(f"truncated: the file ends at byte {self._pos}, inside a member")
            n -= len(got)

    def _fail(self, what: str) -> BadTar:
        return BadTar(f"{self.path}: {what}")

    # ------------------------------------------------------------------ members

    def __iter__(self) -> Iterator[Member]:
        with open(self.path, "rb") as self._file:
            file_size = os.fstat(self._file.fileno()).st_size
            long_name: Optional[str] = None
            pax_size: Optional[int] = None
            while True:
                start = self._pos
                header = self._read(TAR_BLOCK)
                if not header and start:
                    break  # ends without end-of-archive blocks, as some writers leave it
                if len(header) < TAR_BLOCK:
                    if start == 0:
                        raise self._fail(f"not a tar archive ({len(header)} bytes)")
                    raise self._fail(f"truncated: the file ends inside a header at byte {start}")
                if header == bytes(TAR_BLOCK):
                    break
                if not _checksum_ok(header):
                    if start == 0:
                        raise self._fail("not a tar archive (its first header does not check)")
                    raise self._fail(f"damaged tar header at byte {start}")
                kind = header[156:157]
                size, octal = _size(header)
                if size is None:
                    raise self._fail(f"damaged tar header at byte {start}: its size field")
                if kind not in (b"x", b"L", b"g") and pax_size is not None:
                    size, octal = pax_size, False
                offset = start + TAR_BLOCK
                padding = -size % TAR_BLOCK
                if offset + size + padding > file_size:
                    raise self._fail(
                        f"truncated: the member at byte {start} ends at byte {offset + size + padding}, "
                        f"past the end of the file ({file_size} bytes)"
                    )
                if kind in (b"x", b"L", b"g"):
                    if size > MAX_RECORD_BYTES:
                        raise self._fail(f"a {size}-byte pax or long-name record at byte {start}")
                    record = self._read(size)
                    self._skip(padding)
                    if kind == b"L":
                        long_name = _text(record.split(b"\0", 1)[0])
                    elif kind == b"x":
                        fields = _pax(record)
                        if "path" in fields:
                            long_name = fields["path"]
                        if "size" in fields:
                            pax_size = _whole(fields["size"])
                            if pax_size is None:
                                raise self._fail(f"pax record at byte {start}: size not a number")
                    continue
                field = header[:100]
                name = field.split(b"\0", 1)[0]
                plain = octal and long_name is None and field.rstrip(b"\0") == name
                if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
                    name = header[345:500].split(b"\0", 1)[0] + b"/" + name
                    plain = False
                member = Member(
                    name=long_name if long_name is not None else _text(name),
                    kind="file" if kind in (b"0", b"\0") else _KINDS.get(kind, f"type {kind!r}"),
                    offset=offset,
                    size=size,
                    plain_header=plain,
                )
                long_name = pax_size = None
                if member.kind in ("hard link", "symlink", "character device", "block device"):
                    size = padding = 0  # these hold no data whatever the size field says
                if member.kind == "file" and size <= self.wanted(member.name):
                    member.data = self._read(size)
                    self._skip(padding)
                else:
                    self._skip(size + padding)
                yield member
            self._skip(
                file_size, to_end=True
            )  # the end blocks and any padding: all of the file is hashed
        self.size = self._pos
        self.sha256 = self._hash.hexdigest()


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = int(header[148:156].strip(b"\0 ") or b"x", 8)
    except ValueError:
        return False
    blanked = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(blanked)  # summed in C; the signed form (old writers) only when it fails
    if stored == unsigned:
        return True
    return stored == unsigned - 256 * sum(1 for b in blanked if b > 127)


def _size(header: bytes) -> tuple[Optional[int], bool]:
    """The size field, and whether it is the octal a shard reader parses."""
    field = header[124:136]
    if field[0] & 0x80:  # GNU base-256, for members of 8 GiB and more
        return int.from_bytes(field[1:], "big"), False
    try:
        return int(field.rstrip(b"\0 ") or b"0", 8), True
    except ValueError:
        return None, False


def _pax(record: bytes) -> dict[str, str]:
    """``"LEN key=value\\n"`` records; a malformed one ends the parse (tarfile's rule)."""
    fields, pos = {}, 0
    while pos < len(record):
        space = record.find(b" ", pos)
        length = _whole(record[pos:space].decode("ascii", "replace")) if space > 0 else None
        if not length or pos + length > len(record):
            break
        key, _, value = record[space + 1 : pos + length - 1].partition(b"=")
        fields[_text(key)] = _text(value)
        pos += length
    return fields


def _whole(text: str) -> Optional[int]:
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")
