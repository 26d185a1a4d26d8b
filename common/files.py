"""Files written whole or not at all, the one check that a path can be written before work, and
the bounded readers of the files the tools read (JSON; TOML and YAML configurations).

A file from outside (a manifest, a record, a configuration) costs what its limits allow and no
more: at most ``max_bytes`` are read, nesting deeper than ``MAX_DEPTH`` is refused, and a schema
(a msgspec type, with its bounds) is checked before anything is allocated from the values.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import msgspec

__all__ = [
    "MAX_DEPTH",
    "write_atomic",
    "write_json_atomic",
    "unwritable",
    "read_bytes",
    "too_deep",
    "read_json",
    "decode_json",
    "check_schema",
    "read_config",
    "sha256_of",
]

MAX_DEPTH = 32
"""The deepest nesting of lists and objects a file may have: the project's files are 3 to 6
levels deep; a parser walking 100,000 levels would exhaust the interpreter's stack."""


def sha256_of(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in blocks (shards are gigabytes)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, rename it.

    The folder is made if it is missing. A reader never sees a half-written file, whatever
    kills the writer; if anything fails (a full disk, a folder in the way) the temporary file
    is removed and ``path`` is as it was.

    Raises:
        OSError: the system refused a write, also when ``write`` wrapped that error in one of
            its own (``torch.save`` turns a full disk into a ``RuntimeError``), so a caller
            names the file and the reason without knowing the writer.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        refused = _system_error(error)
        if refused is not None and refused is not error:
            raise OSError(refused.errno, refused.strerror, str(path)) from error
        raise
    return path


def _system_error(error: BaseException) -> OSError | None:
    """The ``OSError`` behind ``error``: itself, or one it was raised while handling."""
    seen = 0
    while error is not None and seen < 16:
        if isinstance(error, OSError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def write_json_atomic(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True) -> Path:
    """``obj`` as indented JSON (keys sorted unless asked otherwise) through ``write_atomic``."""
    text = json.dumps(obj, indent=1, sort_keys=sort_keys) + "\n"
    return write_atomic(path, lambda f: f.write(text.encode()))


def unwritable(option: str, path: str | os.PathLike, *, folder: bool) -> str | None:
    """Why ``path`` (a folder, or a file) cannot be written, as one line naming ``option``; None
    when it can.

    A file is made and removed in the nearest folder that exists on the way to ``path``, and
    nothing else is left behind (missing folders are not made): a run finds a read-only place,
    a file in the way or a full inode table before it works, not when it writes its first result.
    """
    path = Path(path)
    try:
        if path.exists() and path.is_dir() != folder:
            return (
                f"{option} {path}: {'a file, not a folder' if folder else 'a folder, not a file'}"
            )
        if not folder and path.exists() and not os.access(path, os.W_OK):
            return f"{option} {path}: cannot write there (read-only file)"
        ancestor = path if folder else path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            return f"{option} {path}: {ancestor} is a file, not a folder"
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except (OSError, ValueError) as error:  # ValueError: a NUL in the name
        return f"{option} {path}: cannot write there ({getattr(error, 'strerror', None) or error})"
    return None


def read_bytes(
    path: str | os.PathLike, what: str, *, max_bytes: int, error: Callable[[str], Exception]
) -> bytes:
    """The bytes of the regular file ``path`` (a ``what``: "manifest"), at most ``max_bytes``.

    Raises ``error(message)``, one line naming the file and the limit or the reason: a missing
    file, not a regular file (a FIFO would block, a device never end), unreadable, too large.
    """
    path = Path(path)
    try:
        if not path.is_file():
            reason = "no such file" if not path.exists() else "not a regular file"
            raise error(f"{path}: {reason}")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # read(n) allocates n bytes up front: ask for what the file holds, within the limit
            data = f.read(min(size, max_bytes) + 1)
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise error(
            f"{path}: {what} of {max(size, len(data))} bytes, over the limit of {max_bytes} bytes"
        )
    return data


def too_deep(value: Any, max_depth: int = MAX_DEPTH) -> bool:
    """Whether plain ``value`` nests lists, tuples and dicts deeper than ``max_depth`` levels.

    Level by level, in a loop: the walk itself never runs out of stack.
    """
    containers = (dict, list, tuple)
    level = [value] if isinstance(value, containers) else []
    for _ in range(max_depth):
        below: list = []
        for item in level:
            values = item.values() if isinstance(item, dict) else item
            below += [v for v in values if isinstance(v, containers)]
        level = below
    return bool(level)


def check_schema(
    value: Any,
    schema: Any,
    path: str | os.PathLike,
    what: str,
    error: Callable[[str], Exception],
    *,
    verdict: str = "malformed",
) -> Any:
    """``value`` checked against ``schema`` (a msgspec type) and returned as it is.

    Raises ``error(message)`` naming the file and the field: msgspec's "Expected `int` >= 0 - at
    `$.shards[3].samples`" reads "PATH: malformed WHAT: shards[3].samples: expected `int` >= 0"
    (``verdict`` is the word before WHAT).
    """
    try:
        msgspec.convert(value, schema)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `")
        fault = f"{message[:1].lower()}{message[1:]}"
        where = where.rstrip("`").removeprefix("$").lstrip(".")
        raise error(f"{path}: {verdict} {what}: {where + ': ' if where else ''}{fault}") from None
    return value


def read_json(
    path: str | os.PathLike,
    what: str,
    *,
    max_bytes: int,
    schema: Any = None,
    max_depth: int = MAX_DEPTH,
    error: Callable[[str], Exception] = ValueError,
) -> Any:
    """The JSON file ``path`` as plain values, read with a bounded cost and checked by ``schema``.

    ``what`` names the file's kind in messages ("manifest"); at most ``max_bytes`` are read;
    nesting deeper than ``max_depth`` is refused; ``schema`` (a msgspec type: a ``Struct`` with
    its fields' bounds) is checked on the values, which are returned as decoded (dicts, lists).

    Raises ``error(message)``: one line naming the file, and the limit or the field at fault.
    """
    data = read_bytes(path, what, max_bytes=max_bytes, error=error)
    value = decode_json(data, path, what, max_depth=max_depth, error=error)
    if schema is not None:
        check_schema(value, schema, path, what, error)
    return value


def decode_json(
    data: bytes,
    where: str | os.PathLike,
    what: str,
    *,
    max_depth: int = MAX_DEPTH,
    error: Callable[[str], Exception] = ValueError,
) -> Any:
    """JSON ``data`` (bytes already read within a limit) as plain values, nesting at most
    ``max_depth`` deep: ``read_json``'s parse, for JSON that is not a file of its own (a tar
    member).

    Raises ``error(message)``: one line, "WHERE: unreadable WHAT: msgspec's reason" or the depth.
    """
    try:
        value = msgspec.json.decode(data)
    except RecursionError:
        raise error(f"{where}: {what} nested deeper than {max_depth} levels") from None
    except msgspec.DecodeError as exc:
        raise error(f"{where}: unreadable {what}: {exc}") from None
    if too_deep(value, max_depth):
        raise error(f"{where}: {what} nested deeper than {max_depth} levels")
    return value


def _yaml_fault(text: str) -> str | None:
    """Why YAML ``text`` is not read (an anchor or alias, nesting over ``MAX_DEPTH``), or None.

    Only the parser's events are looked at, before anything is built from them: nine levels of
    nine aliases (a "billion laughs", a few hundred bytes) would expand into gigabytes.
    """
    import yaml

    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            return f"line {line}: YAML anchors and aliases (&name, *name) are not read"
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                return f"line {line}: nested deeper than {MAX_DEPTH} levels"
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
    return None


def read_config(
    path: str | os.PathLike, *, max_bytes: int, error: Callable[[str], Exception] = ValueError
) -> Any:
    """A ``.toml`` or ``.yaml``/``.yml`` file as plain values, read with a bounded cost: at most
    ``max_bytes``, nested at most ``MAX_DEPTH`` levels, YAML anchors and aliases refused.

    Raises ``error(message)``: one line naming the file, and the limit or the parser's reason.
    """
    path = Path(path)
    raw = read_bytes(path, "configuration", max_bytes=max_bytes, error=error)
    fault = data = None
    try:
        text = raw.decode()
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            fault = _yaml_fault(text)
            data = None if fault else (yaml.safe_load(text) or {})
    except RecursionError:
        fault = f"nested deeper than {MAX_DEPTH} levels"
    except Exception as exc:  # noqa: BLE001 - whatever the parser says, as one line
        fault = f"cannot parse: {' '.join(str(exc).split())}"
    if fault is None and too_deep(data):
        fault = f"nested deeper than {MAX_DEPTH} levels"
    if fault is not None:
        raise error(f"{path}: {fault}")
    return data
