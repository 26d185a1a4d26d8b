"""A class read from a field of a sample's ``KEY.json`` (``moco-shards index --label-key``): the
field found in the member's raw bytes, its value judged, and where its digits end.

The index does not copy the class anywhere: the sample's ``cls`` component is a label pointer,
the bytes of ``KEY.json`` from its start up to the end of the field's digits
(``pipeline.shards.label_digits`` says how readers take the class from them). So the digits'
exact end in the raw bytes is what this module owns, found by walking the JSON's tokens with
their positions: text that looks like the field inside a string (a caption quoting
``"label": 3``) is inside a string token and never taken for it. Used by ``indextar`` (which
writes the pointer) and ``verify`` (which checks it). Must not read files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Optional

import msgspec

from ...common.files import MAX_DEPTH, decode_json

__all__ = ["MAX_JSON_BYTES", "JsonLabel", "parse_field", "find_label"]

MAX_JSON_BYTES = 1 << 20
"""The largest ``.json`` member read for a label; a label pointer reads at most this much per
sample (img2dataset's are about 1 KB)."""

_SPACE = re.compile(rb"[ \t\n\r]*")
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# A member: its key, then its value whole when a string or a scalar (an object or array is
# walked by _value_end); one match per member keeps the walk at a few microseconds a sample.
_MEMBER = re.compile(
    rb'[ \t\n\r]*("[^"\\]*(?:\\.[^"\\]*)*")[ \t\n\r]*:[ \t\n\r]*'
    rb'("[^"\\]*(?:\\.[^"\\]*)*"|[^ \t\n\r,\]}\[{"]+)?',
    re.DOTALL,
)
_EMPTY = re.compile(rb"[ \t\n\r]*}")
_AFTER = re.compile(rb"[ \t\n\r]*([,}])")
_SCALAR_END = re.compile(rb"[ \t\n\r,\]}]")
_NESTING = re.compile(rb'["\[\]{}]')


def parse_field(field: str) -> list[str]:
    """``"meta.label"`` -> ``["meta", "label"]``: a dotted path of object keys.

    Raises:
        ValueError: an empty path or an empty key in it (``"a..b"``).
    """
    path = field.split(".")
    if not field or not all(path):
        raise ValueError(f"{field!r}: give a key, or keys joined by dots (meta.label)")
    return path


@dataclass(frozen=True)
class JsonLabel:
    """A judged field: ``reason`` None and ``value``, ``end`` set when it is a class index."""

    reason: Optional[str] = None
    value: int = -1
    end: int = 0
    """Where the field's digits end in the raw bytes: the label pointer's size."""


def find_label(raw: bytes, path: list[str], max_class: int) -> JsonLabel:
    """The class at ``path`` in the JSON text ``raw``, or why there is none (a rejection reason,
    its kind before the colon, as the manifest counts it).

    A class is a JSON integer written as plain digits, below ``max_class``; a boolean, a float
    (``3.0``, ``3e0``), a string, a negative number or null is not. A key met twice on the path
    is refused: JSON parsers disagree on which one counts.
    """
    field = ".".join(path)
    try:
        value = decode_json(raw, ".json", "JSON", max_depth=MAX_DEPTH)
    except ValueError as exc:
        detail = str(exc).removeprefix(".json: ").removeprefix("unreadable JSON: ")
        return JsonLabel(f"unreadable .json: {detail[:200]}")
    start = end = _SPACE.match(raw).end()
    for depth, key in enumerate(path):
        where = ".".join(path[: depth + 1])
        if not isinstance(value, dict):  # the walk below reads objects only
            return JsonLabel(f"no class: .json has no field {where!r}")
        spans = [(lo, hi) for name, lo, hi in _members(raw, start) if name == key]
        if len(spans) > 1:
            return JsonLabel(f"class given twice: .json has {len(spans)} fields {where!r}")
        if not spans:
            return JsonLabel(f"no class: .json has no field {where!r}")
        (start, end), value = spans[0], value[key]
    token = raw[start:end]
    if type(value) is not int or not token.isdigit() or not 0 <= value < max_class:
        shown = token[:40].decode(errors="replace")
        return JsonLabel(
            f"not a class index: .json field {field!r} is {shown}, not a whole number "
            f"in 0..{max_class - 1}"
        )
    # The walk and the parser read the same text: a difference is a bug here, not bad input.
    assert int(token) == value, (token, value)
    return JsonLabel(value=value, end=end)


def _members(raw: bytes, start: int) -> Iterator[tuple[str, int, int]]:
    """``(key, value start, value end)`` of each member of the object at ``raw[start]``, whose
    text a parser has accepted (so every token is well formed)."""
    if _EMPTY.match(raw, start + 1):
        return
    pos = start + 1
    while True:
        member = _MEMBER.match(raw, pos)
        text = member.group(1)
        key = msgspec.json.decode(text) if b"\\" in text else text[1:-1].decode()
        start, end = member.start(2), member.end()
        if start < 0:  # an object or an array
            start = end
            end = _value_end(raw, start)
        yield key, start, end
        after = _AFTER.match(raw, end)
        if after.group(1) == b"}":
            return
        pos = after.end()


def _value_end(raw: bytes, pos: int) -> int:
    """Where the value that starts at ``pos`` ends: a string, an object or array, or a scalar."""
    first = raw[pos : pos + 1]
    if first == b'"':
        return _STRING.match(raw, pos).end()
    if first not in (b"{", b"["):
        scalar = _SCALAR_END.search(raw, pos)
        return scalar.start() if scalar else len(raw)
    depth = 0
    while True:
        mark = _NESTING.search(raw, pos)
        char = mark.group()
        if char == b'"':
            pos = _STRING.match(raw, mark.start()).end()
            continue
        pos = mark.end()
        depth += 1 if char in (b"{", b"[") else -1
        if not depth:
            return pos
