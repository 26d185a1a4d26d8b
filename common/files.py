"""Files written whole or not at all, and the one check that a path can be written before work."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

__all__ = ["write_atomic", "write_json_atomic", "unwritable"]


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
