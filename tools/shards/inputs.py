"""Which inputs a build has and in what order: enumeration of folders, list files and tar archives.

Owns the build's inputs: what counts as one (a file, a list entry, an archive member),
its class under ``--labels folder``, the order inputs are listed in, the seeded
packing order that mixes classes across shards, and which block of that order one
part of a multi-part build takes.
"""

from __future__ import annotations

import hashlib
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from moco_dali.tools.shards import BuildError

__all__ = ["LIST_SUFFIXES", "TAR_SUFFIXES", "InputRef", "enumerate_inputs", "input_digest", "packing_order",
           "part_range"]

LIST_SUFFIXES = (".txt", ".lst", ".list")
TAR_SUFFIXES = (".tar",)


@dataclass(frozen=True)
class InputRef:
    """One input image: ``source`` names it for people; ``path``/``offset``/``size`` read it."""

    source: str
    path: str
    offset: int = -1
    size: int = -1
    label: Optional[str] = None


def _walk(root: Path) -> Iterator[Path]:
    """Regular files under ``root`` in a stable order, hidden names skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _first_folder(relative: str) -> Optional[str]:
    head, sep, _ = relative.partition("/")
    return head if sep and head else None


def enumerate_inputs(sources: Iterable[str], labels: str = "none") -> list[InputRef]:
    """Every input of ``sources`` in build order.

    A folder contributes its files recursively (sorted, hidden names skipped); a
    ``.txt``/``.lst``/``.list`` file lists image paths one per line (relative to the
    list's folder; blank lines and ``#`` comments skipped); a ``.tar`` archive
    contributes its regular members; any other file is one image.

    With ``labels="folder"`` the class of an input is its first-level sub-folder
    below a source folder or archive root, and for list entries and single files the
    folder that holds the image.

    Raises:
        BuildError: a source does not exist or cannot be read.
    """
    refs: list[InputRef] = []
    for src in sources:
        path = Path(src)
        if path.is_dir():
            for file in _walk(path):
                rel = file.relative_to(path).as_posix()
                label = _first_folder(rel) if labels == "folder" else None
                refs.append(InputRef(str(file), str(file), label=label))
        elif path.is_file() and path.name.lower().endswith(TAR_SUFFIXES):
            try:
                with tarfile.open(path, "r:") as archive:
                    for member in archive:
                        if member.isfile():
                            label = _first_folder(member.name) if labels == "folder" else None
                            refs.append(InputRef(f"{src}:{member.name}", str(path), member.offset_data,
                                                 member.size, label))
            except (tarfile.TarError, OSError) as exc:
                raise BuildError(f"{src}: cannot read tar archive: {exc}") from None
        elif path.is_file() and path.name.lower().endswith(LIST_SUFFIXES):
            try:
                lines = path.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise BuildError(f"{src}: cannot read list file: {exc}") from None
            for line in lines:
                entry = line.strip()
                if not entry or entry.startswith("#"):
                    continue
                file = Path(entry) if os.path.isabs(entry) else path.parent / entry
                label = (file.parent.name or None) if labels == "folder" else None
                refs.append(InputRef(str(file), str(file), label=label))
        elif path.is_file():
            label = (path.resolve().parent.name or None) if labels == "folder" else None
            refs.append(InputRef(str(path), str(path), label=label))
        else:
            raise BuildError(f"{src}: no such file or folder")
    return refs


def input_digest(refs: list[InputRef]) -> str:
    h = hashlib.sha256()
    for ref in refs:
        h.update(f"{ref.source}\0{ref.label or ''}\n".encode())
    return h.hexdigest()


def packing_order(total: int, seed: Optional[int]) -> list[int]:
    """Input indices in the order they are packed.

    Dumps are usually sorted by class (ImageNet's folders), so packing in listing
    order gives shards of one or two classes, and a reader's shuffle buffer cannot
    mix what lies in different shards: MoCo would see single-class batches for long
    stretches. A seeded shuffle mixes every shard and stays deterministic.
    """
    order = list(range(total))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return order


def part_range(total: int, part: int, num_parts: int) -> tuple[int, int]:
    # Contiguous blocks keep each machine's reads local to its share of the dump.
    return total * part // num_parts, total * (part + 1) // num_parts
