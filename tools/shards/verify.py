"""Check and describe a finished shard folder: ``moco-shards verify`` and ``inspect``.

``verify`` trusts nothing: it recomputes every hash, compares every index line with
the tar headers, then reads and decodes every sample through DALI exactly as
training will, and stops at the first fault, naming the shard and key. A label pointer
(``shards.label_digits``) is checked against the ``.json`` field it stands for.
``inspect`` reads only the manifest and the small ``KEY.json`` members (in a folder of tars
indexed in place, whose ``.json`` is their writer's, the head of each ``KEY.jpg`` for its size).
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import statistics
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import simplejpeg
from tqdm import tqdm

from ...common.files import sha256_of
from ...pipeline import cache, shards
from ...pipeline.scan import first_undecodable, scan_shards
from ...pipeline.shards import ShardError
from . import BuildError
from .indextar import MAX_CLASS
from .jsonlabel import find_label, parse_field

__all__ = ["VerifyReport", "verify", "inspect", "format_inspection"]

MAX_BATCH = 1024
"""The largest DALI batch verify decodes at once (each image up to ``shards.MAX_PIXELS``)."""
MAX_THREADS = 1024


@dataclass
class VerifyReport:
    shards: int
    samples: int
    bytes: int
    seconds: float

    def summary(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        return (
            f"OK: {self.shards} shards, {self.samples} samples, {self.bytes / 1e6:.1f} MB "
            f"verified in {self.seconds:.1f} s ({rate:.0f} samples/s decoded)"
        )


def _check_index_against_tar(
    tar: Path, idx: Path, samples: list, indexed: bool, pointer: bool = False
) -> None:
    """Every index line against the tar's members; with label ``pointer``s (a manifest with
    ``label_key``) each sample's ``cls`` is the start of its ``.json`` member's data."""
    expected = [m for members in samples for m in members]
    try:
        with tarfile.open(tar, "r:") as archive:
            found = [(m.name, m.offset_data, m.size) for m in archive if m.isfile()]
    except (tarfile.TarError, OSError) as exc:
        raise ShardError(f"{tar}: not a readable tar archive: {exc}") from None
    if indexed:  # a tar written elsewhere: the index names some of its members, in tar order
        at = {offset: (name, offset, size) for name, offset, size in found}
        found = [at.get(offset, ("no member", offset, -1)) for _, offset, _, _ in expected]
    if len(found) != len(expected):
        raise ShardError(
            f"{idx}: lists {len(expected)} files, the tar {tar.name} holds {len(found)}"
        )
    for (ext, offset, size, name), actual in zip(expected, found):
        if pointer and ext == "cls":
            fits = (name, offset) == actual[:2] and 0 < size <= actual[2] and name.endswith(".json")
        else:
            fits = (name, offset, size) == actual
        if not fits:
            raise ShardError(
                f"{tar}: key {name.split('.')[0]}: index says {name} at {offset} ({size} bytes"
                f"{', a label pointer' if pointer and ext == 'cls' else ''}), "
                f"the tar has {actual[0]} at {actual[1]} ({actual[2]} bytes)"
            )
    needed = ({"jpg", "json", "cls"} if pointer else {"jpg"}) if indexed else {"jpg", "json"}
    for members in samples:
        if needed - {m[0] for m in members}:
            raise ShardError(
                f"{tar}: key {members[0][3].split('.')[0]}: sample lacks "
                f"{' or '.join('.' + e for e in sorted(needed))}"
            )


_HEADER_BYTES = 1 << 16
"""What is read of a JPEG for its size: its header, unless metadata segments make it longer."""


def _header_size(tar: Path, key: str, offset: int, size: int) -> list[int]:
    """``[width, height]`` from a stored JPEG's header (its first 64 KiB; the whole if need be)."""
    with open(tar, "rb") as f:
        f.seek(offset)
        head = f.read(min(size, _HEADER_BYTES))
        try:
            height, width = simplejpeg.decode_jpeg_header(head)[:2]
        except ValueError:
            height, width = simplejpeg.decode_jpeg_header(head + f.read(size - len(head)))[:2]
    return [width, height]


def _scan_in_child(conn, tars, indexes, batch_size, num_threads, device_id) -> None:
    """Child process: DALI's walk of the shards, streamed back per batch as plain tuples."""
    # DALI's native decoders print their own complaints; the parent says what failed, in one line.
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)

    try:
        batch = []
        for s in scan_shards(
            tars, indexes, batch_size=batch_size, num_threads=num_threads, device_id=device_id
        ):
            batch.append((s.height, s.width, s.channels, s.metadata, s.label))
            if len(batch) == batch_size:
                conn.send(("samples", batch))
                batch = []
        conn.send(("samples", batch))
        conn.send(("done", None))
    except BaseException as exc:  # DALI reports a decode failure as a RuntimeError
        lines = str(exc).strip().splitlines()
        conn.send(("error", lines[0] if lines else type(exc).__name__))
    finally:
        conn.close()


def _decoded(pairs, batch_size, num_threads, device_id):
    """Every sample as DALI decodes it, from a child process.

    DALI can take the whole process down on some undecodable JPEGs (a segfault, no
    message); in a child, that costs the child, and the caller can still name the
    sample. Yields ``(height, width, channels, metadata, label)``; returns ``None``
    when the walk finished, else what went wrong.
    """
    ctx = multiprocessing.get_context("fork")  # this process has not loaded DALI; the child does
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(
        target=_scan_in_child,
        daemon=True,
        args=(
            sender,
            [str(p[0]) for p in pairs],
            [str(p[1]) for p in pairs],
            batch_size,
            num_threads,
            device_id,
        ),
    )
    child.start()
    sender.close()
    try:
        while True:
            try:
                kind, payload = receiver.recv()
            except EOFError:
                child.join()
                return f"the DALI reader died (exit {child.exitcode})"
            if kind == "samples":
                yield from payload
            elif kind == "done":
                return None
            else:
                return payload
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
        child.join()


def _check_pointer(tar: Path, key: str, field: str, meta: bytes, label: bytes) -> None:
    """That a label pointer's bytes (``label``, as DALI read them) end where the digits of field
    ``field`` of the sample's ``.json`` (``meta``) end: the class is that field's value."""
    found = find_label(meta, parse_field(field), MAX_CLASS)
    if found.reason is not None:
        raise ShardError(f"{tar}: key {key}: {key}.json: {found.reason}; stale index")
    if not meta.startswith(label) or found.end != len(label):
        raise ShardError(
            f"{tar}: key {key}: the label pointer ends at byte {len(label)} of {key}.json "
            f"({label[-20:]!r}), the digits of its field {field!r} ({found.value}) at byte "
            f"{found.end}; stale index"
        )


def verify(
    folder: str | Path,
    *,
    batch_size: int = 64,
    num_threads: Optional[int] = None,
    device_id: Optional[int] = None,
    progress: bool = True,
) -> VerifyReport:
    """Verify a shard folder end to end.

    Raises:
        ShardError: at the first fault, naming the shard (and key where there is one).
    """
    if not 1 <= batch_size <= MAX_BATCH:
        raise BuildError(f"--batch-size must be in 1..{MAX_BATCH}, got {batch_size}")
    if num_threads is not None and not 1 <= num_threads <= MAX_THREADS:
        raise BuildError(f"--threads must be in 0..{MAX_THREADS}, got {num_threads}")
    started = time.monotonic()
    seen = _Seen()
    bar = None
    try:  # a folder in the store a window at a time (pipeline.cache), a local one at once
        for manifest, entries, pairs in cache.shard_groups(str(folder)):
            if bar is None:
                bar = tqdm(
                    total=manifest.samples,
                    unit="img",
                    desc="verify",
                    disable=not progress or None,
                    dynamic_ncols=True,
                )
            _verify_group(manifest, entries, pairs, seen, bar, batch_size, num_threads, device_id)
    finally:
        if bar is not None:
            bar.close()
    if seen.samples != manifest.samples:
        raise ShardError(
            f"{manifest.name}: DALI read {seen.samples} samples, the manifest says {manifest.samples}"
        )
    if manifest.classes and dict(seen.classes) != {
        k: v for k, v in manifest.data["class_counts"].items() if v
    }:
        raise ShardError(f"{manifest.name}: per-class counts differ from the manifest")
    return VerifyReport(
        seen.shards, seen.samples, sum(e.bytes for e in manifest.shards), time.monotonic() - started
    )


@dataclass
class _Seen:
    """What verify has read so far: shards, samples, samples per class."""

    shards: int = 0
    samples: int = 0
    classes: collections.Counter = field(default_factory=collections.Counter)


def _verify_group(
    manifest, entries, pairs, seen: _Seen, bar, batch_size, num_threads, device_id
) -> None:
    """Every check of ``verify`` on one group of shards (``pairs``, with their ``entries``)."""
    pointer = manifest.label_key is not None
    for entry, (tar, idx) in zip(entries, pairs):
        if sha256_of(tar) != entry.sha256:
            raise ShardError(f"{tar}: sha256 differs from the manifest; the shard is corrupt")
        if hashlib.sha256(idx.read_bytes()).hexdigest() != entry.index_sha256:
            raise ShardError(f"{idx}: sha256 differs from the manifest; the index is corrupt")
        _check_index_against_tar(tar, idx, shards.read_index(idx), manifest.indexed, pointer)
    keys = list(shards.iter_members(pairs, "jpg"))  # ordinal -> (tar, key, offset, size)
    classes = manifest.classes
    ordinal = 0
    walk = _decoded(pairs, batch_size, num_threads, device_id)
    try:
        while True:
            try:
                height, width, channels, metadata, label = next(walk)
            except StopIteration as stop:
                failure = stop.value
                break
            if ordinal >= len(keys):
                raise ShardError(
                    f"{manifest.name}: DALI read more samples than the indexes list ({len(keys)})"
                )
            tar, key = keys[ordinal][:2]
            try:
                # An indexed tar's .json is its writer's; the size checked is its JPEG header's.
                size = (
                    _header_size(*keys[ordinal])
                    if manifest.indexed
                    else json.loads(metadata)["size"]
                )
            except (ValueError, KeyError, TypeError):
                raise ShardError(f"{tar}: key {key}: unreadable {key}.json") from None
            if channels != 3 or [width, height] != size:
                raise ShardError(
                    f"{tar}: key {key}: decodes to {width}x{height}x{channels}, "
                    f"metadata says {size[0]}x{size[1]}x3"
                )
            if classes:
                if pointer:
                    _check_pointer(tar, key, manifest.label_key, metadata, label)
                digits = shards.label_digits(label, pointer)
                if not (0 < len(digits) <= 18 and int(digits) < len(classes)):
                    shown = label[-20:] if pointer else label
                    raise ShardError(
                        f"{tar}: key {key}: class {shown!r} is not in 0..{len(classes) - 1}"
                    )
                seen.classes[classes[int(digits)]] += 1
            ordinal += 1
            bar.update(1)
    finally:
        walk.close()
    if failure is not None:
        located = first_undecodable(keys[ordinal:])
        where = keys[min(ordinal, len(keys) - 1)][0] if keys else manifest.name
        raise ShardError(located or f"{where}: {failure} near sample {ordinal}")
    seen.shards += len(pairs)
    seen.samples += ordinal


def _sizes(manifest, pairs, widths: list, heights: list, sizes: collections.Counter) -> None:
    """Each sample's stored size, from its ``.json`` (an indexed tar's: its JPEG header)."""
    for tar, key, offset, size in shards.iter_members(pairs, "jpg" if manifest.indexed else "json"):
        try:
            if manifest.indexed:  # an indexed tar's .json is its writer's: the JPEG header says
                w, h = _header_size(tar, key, offset, size)
            else:
                with open(tar, "rb") as f:
                    f.seek(offset)
                    w, h = json.loads(f.read(size))["size"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ShardError(
                f"{tar}: sample metadata at byte {offset} unreadable ({exc}); run moco-shards verify"
            ) from None
        widths.append(w)
        heights.append(h)
        sizes[(w, h)] += 1


def inspect(folder: str | Path) -> dict:
    """Summary of a shard folder: counts, bytes, classes, rejections and resolutions."""
    widths, heights, sizes = [], [], collections.Counter()
    count = 0
    for manifest, _, pairs in cache.shard_groups(str(folder)):  # the store's a group at a time
        count += len(pairs)
        _sizes(manifest, pairs, widths, heights, sizes)
    rejected = manifest.data["rejected"]
    if isinstance(rejected, list):  # a version 1 manifest listed every rejected input
        reasons = collections.Counter(r["reason"].split(":")[0] for r in rejected)
        rejected = len(rejected)
    else:
        reasons = collections.Counter(manifest.data.get("rejected_reasons") or {})

    def spread(values):
        return (
            {"min": min(values), "median": statistics.median(values), "max": max(values)}
            if values
            else None
        )

    return {
        "folder": manifest.name,
        "name": manifest.data["name"],
        "samples": manifest.samples,
        "inputs": manifest.data["inputs"],
        "shards": count,
        "bytes": sum(e.bytes for e in manifest.shards),
        "copied": manifest.data["copied"],
        "reencoded": manifest.data["reencoded"],
        "rejected": rejected,
        "rejected_file": f"{manifest.name}/{manifest.data['rejected_file']}"
        if "rejected_file" in manifest.data
        else None,
        "rejected_reasons": dict(reasons.most_common()),
        "classes": manifest.data["class_counts"],
        "width": spread(widths),
        "height": spread(heights),
        "common_sizes": [[f"{w}x{h}", n] for (w, h), n in sizes.most_common(5)],
    }


def format_inspection(info: dict) -> str:
    mb = info["bytes"] / 1e6
    lines = [
        f"{info['folder']}  (data set '{info['name']}')",
        f"  samples   {info['samples']} of {info['inputs']} inputs "
        f"({info['copied']} copied, {info['reencoded']} re-encoded, {info['rejected']} rejected)",
        f"  shards    {info['shards']}, {mb:.1f} MB, {mb * 1e6 / max(info['samples'], 1) / 1e3:.1f} KB per sample",
    ]
    if info["rejected_reasons"]:
        lines.append(
            "  rejected  " + ", ".join(f"{k}: {v}" for k, v in info["rejected_reasons"].items())
        )
        if info.get("rejected_file"):
            lines.append(f"            each with its input and reason in {info['rejected_file']}")
    if info["width"]:
        w, h = info["width"], info["height"]
        lines.append(f"  width     min {w['min']}, median {w['median']:g}, max {w['max']} px")
        lines.append(f"  height    min {h['min']}, median {h['median']:g}, max {h['max']} px")
        lines.append("  sizes     " + ", ".join(f"{s} ({n})" for s, n in info["common_sizes"]))
    if info["classes"]:
        lines.append(f"  classes   {len(info['classes'])}")
        width = max(len(c) for c in info["classes"])
        lines.extend(f"    {name:<{width}}  {count}" for name, count in info["classes"].items())
    else:
        lines.append("  classes   none (unlabelled)")
    return "\n".join(lines)
