"""A build's output folder: who may write in it, and what a build may find there.

Owns the rules that keep builds from mixing or losing data in one folder (the lock a build
holds for its whole life is ``common.lock``'s): the names a build writes (a folder holding
anything else is someone else's and is refused), the naming rule of a build found there (so
one begun by an older moco-shards finishes as it began), and the removal of the temporary
files an interrupted or failed build left.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from ...pipeline import shards
from . import BuildError
from .inputs import ORDER, printable
from .settings import BuildSettings

__all__ = ["prepare_folder", "naming_rule", "remove_temporaries"]

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


def naming_rule(out: Path, state: Path, manifest_path: Path, settings: BuildSettings) -> int:
    """The naming rule (``inputs.ORDER``) of the build this one continues: its resume state's,
    its manifest's, or (a part starting beside parts already begun) theirs; a new build's is
    ``ORDER``. A record without one was written under rule 1."""
    found = [state / "build.json", manifest_path]
    if settings.num_parts > 1:  # the other parts of this build, in this folder
        found += sorted(out.glob(f".moco-build-{settings.name}-part*/build.json"))
        found += sorted(p for p in out.iterdir() if shards.PART_MANIFEST_RE.match(p.name))
    for path in found:
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
        except ValueError:
            continue  # a damaged record is refused where it is read for itself
        if (
            not isinstance(record, dict)
            or path.parent != state
            and not _same_build(record, settings)
        ):
            continue
        rule = record.get("order", 1)
        if rule not in (1, ORDER):
            raise BuildError(
                f"{path}: written under naming rule {rule!r}; this moco-shards knows rules 1 and "
                f"{ORDER}: use the moco-shards that began the build, or another --out"
            )
        return rule
    return ORDER


def _same_build(record: dict, settings: BuildSettings) -> bool:
    """Whether a part's record (manifest or resume state) belongs to the build of ``settings``."""
    theirs = record.get("settings")
    if not isinstance(theirs, dict):
        return False
    mine = settings.fingerprint()
    return all(theirs.get(k) == v for k, v in mine.items() if k != "part")


def remove_temporaries(out: Path, name: str, part: Optional[int]) -> None:
    """Unfinished shards of one part (a killed or failed run's, or other workers' after a failure)."""
    infix = "" if part is None else f"part{part:04d}-"
    pattern = re.compile(rf"^\.{re.escape(name)}-{infix}\d{{6}}(?:-\d{{3}})?\.(?:tar|idx)\.tmp$")
    for path in out.iterdir():
        if pattern.match(path.name):
            path.unlink(missing_ok=True)
