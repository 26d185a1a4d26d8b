"""Checkpoints: written atomically, the last K kept, the newest complete one found.

A checkpoint is written to a temporary name, flushed to disk and renamed, so a crash
at any moment (SIGKILL included) never leaves a truncated file under a checkpoint's
name: the newest ``ckpt-*.pt`` is always complete.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import torch

__all__ = ["save", "latest", "load", "write_atomic"]

_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save(out: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write ``state`` as ``out/ckpt-STEP.pt`` atomically; delete all but the newest ``keep_last``."""
    path = write_atomic(out / f"ckpt-{step:09d}.pt", lambda f: torch.save(state, f))
    for old in sorted(p for p in out.iterdir() if _NAME.match(p.name))[:-keep_last]:
        old.unlink()
    return path


def latest(out: Path) -> Optional[Path]:
    """The newest complete checkpoint in ``out``, or None."""
    if not out.is_dir():
        return None
    found = sorted(p for p in out.iterdir() if _NAME.match(p.name))
    return found[-1] if found else None


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)
