"""The classes of a labelled build: read from ``--classes FILE``, or found in the sources (a
folder's first-level sub-folders, the labels of a list's or an archive's entries, the class
archives of an archive of archives)."""

from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

from . import BuildError
from .inputs import iter_part, printable, source_kind
from .labelfile import read_labels
from .nested import archive_classes
from .parquet import table_classes

__all__ = ["read_classes", "find_classes"]


def read_classes(path: str) -> list[str]:
    """Class names from a file, one per line in index order (``--classes FILE``)."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(
            f"--classes {path}: cannot read: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    names = [n for n in names if n and not n.startswith("#")]
    seen = set()
    for name in names:
        if "\0" in name:
            raise BuildError(f"--classes {path}: class {name!r} holds a NUL character")
        if name in seen:
            raise BuildError(f"--classes {path}: class {name!r} is listed twice")
        seen.add(name)
    if not names:
        raise BuildError(f"--classes {path}: lists no class")
    return names


def find_classes(
    sources: Sequence[str],
    labels: str,
    skip: Iterable[str] = (),
    labels_file: Optional[str] = None,
    label_column: Optional[str] = None,
) -> list[str]:
    """The class names of a labelled build (``--labels folder``, ``archive``, a
    ``--labels-file``: sorted; ``--labels column``: in a table's ``ClassLabel`` order).

    A source folder's first-level sub-folders are its classes (one listing); list
    files and archives are read through once, holding only the set of names. A
    multi-part build at scale passes ``--classes`` instead, or lets the Ray
    executor find them once for every part. An archive of class archives costs only its own
    headers (``nested.archive_classes``).
    """
    if labels == "archive":
        return archive_classes(sources)
    if labels == "column":
        return table_classes(sources, label_column or "label")
    if labels_file is not None:  # its classes, whichever the sources hold
        return sorted(set(read_labels(labels_file).values()))
    if labels != "folder":
        return []
    skipped = {os.path.realpath(p) for p in skip}
    found: set[str] = set()
    for src in sources:
        kind = source_kind(src)
        if kind == "folder":
            try:
                with os.scandir(src) as listing:
                    for entry in listing:
                        try:
                            if (
                                not entry.name.startswith(".")
                                and entry.is_dir()
                                and os.path.realpath(entry.path) not in skipped
                            ):
                                found.add(printable(entry.name))
                        except OSError:
                            pass
            except OSError as exc:
                raise BuildError(f"{printable(src)}: cannot list folder: {exc.strerror}") from None
        else:
            found.update(ref.label for ref in iter_part([src], labels) if ref.label is not None)
    return sorted(found)
