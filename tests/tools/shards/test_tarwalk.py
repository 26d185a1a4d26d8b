"""The tar reader's header checksum: the unsigned sum POSIX writes, and the signed one of old
writers, both taken; anything else is a damaged header."""

from __future__ import annotations

import tarfile

from moco_dali.tools.shards.tarwalk import _checksum_ok


def _header(name: bytes) -> bytes:
    info = tarfile.TarInfo("x")
    info.size = 10
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    header[: len(name)] = name  # bytes over 127: the two sums differ
    return bytes(header)


def _with_checksum(header: bytes, value: int) -> bytes:
    return header[:148] + b"%06o\0 " % value + header[156:]


def test_unsigned_and_signed_checksums_are_taken_and_damage_is_not():
    header = _header("caf\xe9-\xff.jpg".encode("latin-1"))
    blanked = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(blanked)
    signed = sum(b - 256 if b > 127 else b for b in blanked)
    assert signed != unsigned
    assert _checksum_ok(_with_checksum(header, unsigned))
    assert _checksum_ok(_with_checksum(header, signed))
    assert not _checksum_ok(_with_checksum(header, unsigned + 1))
    damaged = _with_checksum(header, unsigned)
    damaged = damaged[:20] + b"?" + damaged[21:]
    assert not _checksum_ok(damaged)
    assert not _checksum_ok(header[:148] + b"garbage!" + header[156:])
