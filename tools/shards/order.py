"""The order a part's inputs are packed in: an external sort on a seeded hash of their names.

Owns the packing order. Dumps are usually sorted by class (ImageNet's folders), so
packing in listing order gives shards of one or two classes, and a reader's shuffle
buffer cannot mix what lies in different shards. Ordering by a seeded 64-bit hash of
each input's name (``InputRef.key``: its name within its source) mixes every shard as a
uniform shuffle would, is a pure function of the set of names and the seed (whatever
the listing order, the worker count or where the dump is mounted),
and needs no listing in memory: inputs are spilled to disk in buckets by the hash's
top bits and read back one sorted bucket at a time (a bucket too large is split
again by the next bits). A part smaller than one spill is sorted in memory.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator, Optional

from .inputs import InputRef

__all__ = ["PackingOrder"]

# The external sort: inputs buffered before a spill, and the most inputs sorted in
# memory at once (a larger bucket is split again by the hash's next bits).
_FLUSH_ITEMS = 1 << 16
_SORT_ITEMS = 1 << 18
_BUCKET_BITS = 8


def _records(path: Path) -> Iterator[tuple]:
    """A spill file's records, one pickled chunk at a time."""
    with open(path, "rb") as f:
        while True:
            try:
                yield from pickle.load(f)
            except EOFError:
                return


class PackingOrder:
    """A part's inputs, enumerated once into spill files, read back in packing order.

    The order is that of a seeded 64-bit hash of each input's name: a pure
    function of the set of inputs and the seed, whatever the listing order, and
    for a folder-per-class dump as mixed as a uniform shuffle. ``seed=None`` keeps
    the enumeration order. ``count`` and ``digest`` (of the names and labels, in
    enumeration order) are known once constructed.
    """

    def __init__(self, refs: Iterable[InputRef], scratch: Path, seed: Optional[int]):
        self.scratch, self.seed = Path(scratch), seed
        if self.scratch.exists():
            shutil.rmtree(self.scratch)
        self.scratch.mkdir(parents=True)
        self._in_memory: Optional[list] = None
        digest = hashlib.sha256()
        key = str(seed).encode()
        count = 0

        def hashed() -> Iterator[tuple]:
            nonlocal count
            names: list[bytes] = []
            blake2b, from_bytes = hashlib.blake2b, int.from_bytes
            for ref in refs:
                name = ref.key()
                names.append(b"%s\0%s\n" % (name, (ref.label or "").encode()))
                if len(names) == 4096:
                    digest.update(b"".join(names))
                    names.clear()
                h = (
                    count
                    if seed is None
                    else from_bytes(blake2b(name, digest_size=8, key=key).digest(), "big")
                )
                yield (h, count, *ref)
                count += 1
            digest.update(b"".join(names))

        shift = 64 - _BUCKET_BITS
        try:
            self.counts = self._spill(hashed(), self.scratch, None if seed is None else shift)
        except BaseException:  # an unreadable source or a full disk: leave no spill behind
            self.close()
            raise
        self.count, self.digest = count, digest.hexdigest()
        self._shift = shift

    def _spill(self, items: Iterator[tuple], folder: Path, shift: Optional[int]) -> dict[int, int]:
        buffers: dict[int, list] = defaultdict(list)
        counts: dict[int, int] = defaultdict(int)
        buffered, spilled = 0, False

        def flush() -> None:
            for bucket, chunk in buffers.items():
                with open(folder / f"{bucket:03d}.spill", "ab") as f:
                    pickle.dump(chunk, f, protocol=pickle.HIGHEST_PROTOCOL)
            buffers.clear()

        for item in items:
            bucket = 0 if shift is None else (item[0] >> shift) & ((1 << _BUCKET_BITS) - 1)
            buffers[bucket].append(item)
            counts[bucket] += 1
            buffered += 1
            if buffered >= _FLUSH_ITEMS:
                flush()
                buffered, spilled = 0, True
        if spilled or folder != self.scratch:
            flush()
        else:  # fewer inputs than one spill: sorted in memory, no bucket files
            self._in_memory = sorted(item for chunk in buffers.values() for item in chunk)
        return dict(counts)

    def _sorted(
        self, folder: Path, counts: dict[int, int], shift: Optional[int]
    ) -> Iterator[tuple]:
        for bucket in sorted(counts):
            path = folder / f"{bucket:03d}.spill"
            if shift is None:  # enumeration order: one spill file, read back in chunks
                yield from _records(path)
            elif counts[bucket] > _SORT_ITEMS and shift >= _BUCKET_BITS:
                sub = folder / f"{bucket:03d}"
                sub.mkdir()
                sub_counts = self._spill(
                    _records(path), sub, shift - _BUCKET_BITS
                )  # always to files
                path.unlink()
                yield from self._sorted(sub, sub_counts, shift - _BUCKET_BITS)
            else:
                chunk = list(_records(path))
                chunk.sort()  # (hash, enumeration index): no ties
                yield from chunk
                del chunk

    def __iter__(self) -> Iterator[InputRef]:
        shift = None if self.seed is None else self._shift
        items = (
            self._in_memory
            if self._in_memory is not None
            else self._sorted(self.scratch, self.counts, shift)
        )
        for item in items:
            yield InputRef(*item[2:])

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
