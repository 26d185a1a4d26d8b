"""One tar's indexing pass for ``moco-shards index``: its members grouped into samples as DALI's
reader groups them, each sample judged (what the pipeline cannot take is named with its reason),
and the DALI index of what it can.

Reads the tar once, sequentially (``tarwalk``): headers, each ``.jpg``'s header and the ``.cls``
or ``.json`` the labels come from, and the sha256 of every byte; decodes no image and writes
nothing but the index file it is given. With labels from a ``.json`` field, a sample's line ends
in a label pointer (``jsonlabel``) instead of naming a ``.cls``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Optional

import simplejpeg

from ...pipeline import shards
from . import BuildError
from .inputs import printable
from .jsonlabel import MAX_JSON_BYTES, JsonLabel, find_label, parse_field
from .tarwalk import BadTar, Member, TarWalk

__all__ = ["Shard", "index_tar", "split_name", "IMAGE_EXTS", "MAX_JPEG_BYTES", "MAX_CLASS"]

IMAGE_EXTS = {"webp", "png", "jpeg", "jpe", "gif", "bmp", "tif", "tiff", "avif", "heic", "ppm"}
"""Image members the pipeline does not read (it reads ``.jpg`` only): named as such when rejected."""
MAX_JPEG_BYTES = 256 << 20
"""A ``.jpg`` member larger than this is rejected unread (build's ``--max-input-bytes``)."""
MAX_CLASS = 1 << 20
"""Classes are below this (a ``.cls`` or a ``.json`` field): the manifest lists a class name for
every index up to the largest."""


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


def _json_class(members: list[Member], label_path: list[str]) -> JsonLabel:
    """The class in field ``label_path`` of a sample's ``.json``, judged (``_judge`` passed it)."""
    exts = [split_name(m.name)[1] for m in members]
    if "json" not in exts:
        return JsonLabel("no class: no .json member")
    meta = members[exts.index("json")]
    if meta.data is None:
        return JsonLabel(f"too large: {meta.size} bytes of .json, over {MAX_JSON_BYTES}")
    return find_label(meta.data, label_path, MAX_CLASS)


# --------------------------------------------------------------------------- the pass


@dataclass
class Shard:
    entry: dict
    samples: int
    class_counts: dict[int, int]


def index_tar(
    tar: str, idx_tmp: str, labels: str, reject, label_key: Optional[str] = None
) -> tuple[Optional[Shard], int]:
    """Index one tar into ``idx_tmp``: the shard (None when it holds no sample the pipeline can
    read) and the number of samples found in it.

    ``labels``: ``"none"``, ``"cls"`` (a ``.cls`` member) or ``"json"`` (field ``label_key`` of
    the ``.json``, keys joined by dots).
    """
    limits = {"jpg": MAX_JPEG_BYTES}
    if labels == "cls":
        limits["cls"] = MAX_JPEG_BYTES
    elif labels == "json":
        limits["json"] = MAX_JSON_BYTES
        label_path = parse_field(label_key)
    walk = TarWalk(tar, lambda name: limits.get(split_name(name)[1], 0))
    lines, seen, counts, found = [], set(), {}, 0
    try:
        for members in _samples(walk):
            found += 1
            reason, label = _judge(members, labels, seen)
            if reason is None and labels == "json":
                judged = _json_class(members, label_path)
                reason, label = judged.reason, judged.value
            if reason is not None:
                reject(f"{tar}:{split_name(members[0].name)[0]}", reason)
                continue
            line = [(split_name(m.name)[1], m.offset, m.size, m.name) for m in members]
            if labels == "json":
                # The pointer is the line's only cls (DALI takes the first of two) and its last
                # component, where readers look for it (shards.open_shard).
                line = [m for m in line if m[0] != "cls"]
                _, offset, _, name = next(m for m in line if m[0] == "json")
                line.append(("cls", offset, judged.end, name))
            lines.append(shards.index_line(line))
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
    return Shard(entry, len(lines), counts), found
