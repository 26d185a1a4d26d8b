"""Classes from a labels file (``--labels-file FILE``) for images whose names carry none.

Owns reading the file (``NAME,CLASS`` rows: ImageNet's validation archive with a plain two-column
CSV or ``LOC_val_solution.csv``) and giving each input the class of its file name. The table is
held whole: a validation set's labels (50,000 rows, a few MB), bounded by ``MAX_LABELS_BYTES``;
a labelled dump at scale belongs in class folders or a ``PATH,LABEL`` list. Must not read images.
"""

from __future__ import annotations

import csv
import io
from typing import Iterable, Iterator

from ...common.files import read_bytes
from . import BuildError
from .inputs import InputRef, printable

__all__ = ["MAX_LABELS_BYTES", "read_labels", "label_of", "with_labels"]

MAX_LABELS_BYTES = 64 * 1024**2
"""The largest labels file read: about a million rows, held in memory as a table."""

_HEADERS = {"imageid", "image_id", "image", "filename", "file", "name", "path"}
"""A first row whose first field is one of these is a header (``ImageId,PredictionString``)."""


def read_labels(path: str) -> dict[str, str]:
    """``NAME -> CLASS`` from a labels file.

    Each row is ``NAME,CLASS`` (CSV quoting allowed): ``NAME`` an image's file name, with or
    without its extension; the class is the first word of the second field, so
    ``LOC_val_solution.csv``'s ``ImageId,PredictionString`` rows (``n01751748 52 101 ...``) read
    as they are. Blank lines and ``#`` comments are skipped, and a first row naming its columns.

    Raises:
        BuildError: the file cannot be read, is over ``MAX_LABELS_BYTES``, or a row is malformed
            (its line named) or names an image twice with two classes.
    """
    what = f"--labels-file {printable(path)}"
    data = read_bytes(path, "labels file", max_bytes=MAX_LABELS_BYTES, error=BuildError)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BuildError(f"{what}: not UTF-8 text (byte {exc.start})") from None
    if "\0" in text:
        raise BuildError(f"{what}: holds a NUL character; a labels file is text")
    table: dict[str, str] = {}
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            line = reader.line_num
            if not table and row[0].strip().lower() in _HEADERS:
                continue
            words = row[1].split() if len(row) == 2 else []
            name = row[0].strip()
            if not name or not words:
                raise BuildError(f"{what}: line {line}: expected NAME,CLASS, got {row!r:.200}")
            if table.setdefault(name, words[0]) != words[0]:
                raise BuildError(
                    f"{what}: line {line}: {name!r} has two classes, "
                    f"{table[name]!r} and {words[0]!r}"
                )
    except csv.Error as exc:  # a stray quote, a field over csv's limit
        raise BuildError(f"{what}: line {reader.line_num}: {exc}") from None
    if not table:
        raise BuildError(f"{what}: labels no image")
    return table


def label_of(name: str, table: dict[str, str]) -> str | None:
    """The class of the input named ``name`` (its path within its source): by its file name, or
    that name without its extension (``ILSVRC2012_val_00000001.JPEG`` or ``..._00000001``)."""
    base = name.rpartition("/")[2]
    found = table.get(base)
    if found is None and "." in base:
        found = table.get(base.rpartition(".")[0])
    return found


def with_labels(refs: Iterable[InputRef], table: dict[str, str]) -> Iterator[InputRef]:
    """``refs``, each with its class from ``table`` (None when the file labels it not: the build
    rejects it, ``settings.NO_LABEL``)."""
    for ref in refs:
        yield ref._replace(label=label_of(ref.name, table))
