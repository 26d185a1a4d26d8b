"""A build's output folder: who may write in it, and what a build may find there.

Owns the rules that keep builds from mixing or losing data in one folder (the lock a build
holds for its whole life is ``common.lock``'s): the names a build writes (a folder holding
anything else is someone else's and is refused), and the removal of the temporary files an
interrupted or failed build left.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from . import BuildError
from .inputs import printable

__all__ = ["prepare_folder", "remove_temporaries"]

# What a build may find in its output folder: its own files and those of other parts
# or an interrupted run. Anything else means --out points at someone else's folder.
BUILD_FILE_RE = re.compile(
    r"^(?:[^./\s]+-(?:part\d{4}-)?\d{6}(?:-\d{3})?\.(?:tar|idx)"
    r"|manifest(?:\.part-\d{4}-of-\d{4})?\.json"
    r"|rejected(?:\.part-\d{4}-of-\d{4})?\.jsonl"
    r"|\.moco-build-.+"
    r"|\..+\.tmp)$"
)


def prepare_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise BuildError(f"--out {out}: not a folder") from None
    except OSError as exc:
        raise BuildError(f"--out {out}: cannot create: {exc.strerror}") from None
    names = [p.name for p in out.iterdir()]
    # Shard-like names alone do not make a folder ours: it must also hold a manifest or a build's state.
    ours = any(n.startswith((".moco-build-", "manifest")) for n in names)
    foreign = [n for n in names if not (ours and BUILD_FILE_RE.match(n))]
    if foreign:
        raise BuildError(
            f"--out {out}: holds files moco-shards build did not write ({printable(min(foreign))}"
            f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); use a new or empty folder"
        )


def remove_temporaries(out: Path, name: str, part: Optional[int]) -> None:
    """Unfinished shards of one part (a killed or failed run's, or other workers' after a failure)."""
    infix = "" if part is None else f"part{part:04d}-"
    pattern = re.compile(rf"^\.{re.escape(name)}-{infix}\d{{6}}(?:-\d{{3}})?\.(?:tar|idx)\.tmp$")
    for path in out.iterdir():
        if pattern.match(path.name):
            path.unlink(missing_ok=True)
