"""Which inputs a build has, their classes, and which part owns each: streamed, never listed whole.

An input is a file, a list entry, an archive member, or something the build must account for
as rejected (a symlink loop, an unreadable folder, a damaged archive's tail). A part reads only
its own share where the source allows it: a list file in byte blocks dealt to the parts, an
archive whole to one part, folder files by a hash of their path. The packing order is
``order``'s.
"""

from __future__ import annotations

import csv
import os
import tarfile
import zlib
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence

from . import BuildError

__all__ = [
    "LIST_SUFFIXES",
    "CSV_SUFFIXES",
    "TAR_SUFFIXES",
    "InputRef",
    "printable",
    "source_kind",
    "find_classes",
    "read_classes",
    "iter_part",
]

LIST_SUFFIXES = (".txt", ".lst", ".list")
CSV_SUFFIXES = (".csv",)
TAR_SUFFIXES = (".tar",)

# A part's share of a list file is dealt in blocks of about 1/256 of its fair share,
# so a class-sorted list gives every part each class in close to its share (a block
# is one class's or two); a block costs a seek and half a line read twice.
_BLOCKS_PER_PART = 256
_MIN_BLOCK_BYTES = 256
_MAX_BLOCK_BYTES = 1 << 20
_MAX_LINE_BYTES = 1 << 16
"""The longest line of a list file read as an entry; a longer one is rejected, read in pieces."""


class InputRef(NamedTuple):
    """One input: ``source`` names it for people; ``path``/``offset``/``size`` read it.

    ``path`` is what the operating system gave (bytes that are not UTF-8 kept as
    surrogate escapes, so the file can be opened); ``source`` and ``label`` are
    printable (those bytes shown as ``\\xNN``). ``rejected`` is a reason already
    known while enumerating (a symlink loop, an unreadable folder).
    """

    source: str
    path: str
    offset: int = -1
    size: int = -1
    label: Optional[str] = None
    rejected: Optional[str] = None


def printable(name: str) -> str:
    """``name`` with bytes that are not UTF-8 shown as ``\\xNN``, so JSON and terminals can carry it."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def source_kind(src: str) -> str:
    """``folder``, ``list``, ``csv``, ``tar`` or ``file``.

    Raises:
        BuildError: the source does not exist or is not a regular file or folder.
    """
    if os.path.isdir(src):
        return "folder"
    if os.path.isfile(src):
        lower = src.lower()
        if lower.endswith(TAR_SUFFIXES):
            return "tar"
        if lower.endswith(LIST_SUFFIXES):
            return "list"
        if lower.endswith(CSV_SUFFIXES):
            return "csv"
        return "file"
    if os.path.lexists(src):
        raise BuildError(f"{printable(src)}: not a regular file or folder")
    raise BuildError(f"{printable(src)}: no such file or folder")


def _owner(name: str, num_parts: int) -> int:
    return zlib.crc32(name.encode("utf-8", "surrogateescape")) % num_parts


def _first_folder(relative: str) -> Optional[str]:
    head, sep, _ = relative.partition("/")
    return head if sep and head else None


# --------------------------------------------------------------------------- sources


def _folder(
    root: str, labels: str, part: int, num_parts: int, skip: frozenset
) -> Iterator[InputRef]:
    """Files below ``root`` (sorted per folder, hidden names skipped); folder symlinks followed, loops refused."""

    def owned(path: str) -> bool:
        return num_parts == 1 or _owner(path, num_parts) == part

    top = os.stat(root)
    stack = [(root, None, frozenset({(top.st_dev, top.st_ino)}))]
    while stack:
        folder, label, ancestors = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(
                    (e for e in listing if not e.name.startswith(".")), key=lambda e: e.name
                )
        except OSError as exc:
            if owned(folder):
                yield InputRef(
                    printable(folder),
                    folder,
                    label=label,
                    rejected=f"unreadable folder: {exc.strerror or exc}",
                )
            continue
        below = []
        for entry in entries:
            path = entry.path
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False  # reading it will say why
            if not is_dir:
                if owned(path):
                    yield InputRef(printable(path), path, label=label)
                continue
            sub_label = printable(entry.name) if folder == root and labels == "folder" else label
            try:
                st = entry.stat()
            except OSError as exc:
                if owned(path):
                    yield InputRef(
                        printable(path),
                        path,
                        label=sub_label,
                        rejected=f"unreadable folder: {exc.strerror}",
                    )
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in skip:
                continue  # the build's own output folder
            if ident in ancestors:
                if owned(path):
                    yield InputRef(
                        printable(path),
                        path,
                        label=sub_label,
                        rejected="symlink loop: this folder contains itself",
                    )
                continue
            below.append((path, sub_label, ancestors | {ident}))
        stack.extend(reversed(below))


def _list_blocks(size: int, part: int, num_parts: int) -> Iterator[tuple[int, int]]:
    if num_parts == 1:
        yield 0, size
        return
    block = min(max(size // (num_parts * _BLOCKS_PER_PART), _MIN_BLOCK_BYTES), _MAX_BLOCK_BYTES)
    for start in range(part * block, size, num_parts * block):
        yield start, min(start + block, size)


def _line_length(f, start: bytes) -> int:
    """The length of the line whose first bytes ``start`` were read; the rest of it is read in
    pieces of at most ``_MAX_LINE_BYTES`` and dropped, so a line of gigabytes is never held."""
    length, piece = len(start), start
    while piece and not piece.endswith(b"\n"):
        piece = f.readline(_MAX_LINE_BYTES)
        length += len(piece)
    return length


def _list_entry(
    raw: bytes, kind: str, prefix: str, labels: str, length: int = 0
) -> Optional[InputRef]:
    # Plain string work rather than os.path: this runs once per line of lists of billions.
    text = raw.decode("utf-8", "surrogateescape").strip()
    if not text or text[0] == "#":
        return None
    label = None
    if length > _MAX_LINE_BYTES:  # ``raw`` is its start; no path is this long (PATH_MAX: 4096)
        return InputRef(
            printable(text[:200]) + f"... ({length} bytes)",
            text[:200],
            rejected=f"malformed list line (over {_MAX_LINE_BYTES} bytes)",
        )
    if "\0" in text:  # no path holds one; nor may a class name taken from it
        return InputRef(printable(text), text, rejected="malformed list line (a NUL character)")
    if kind == "csv":
        try:
            row = next(csv.reader([text]))
        except csv.Error as exc:  # a quoted field over csv's field limit, a stray quote
            return InputRef(printable(text), text, rejected=f"malformed list line (csv: {exc})")
        if len(row) != 2 or not row[0]:
            return InputRef(
                printable(text), text, rejected="malformed list line (expected PATH,LABEL)"
            )
        entry, label = row[0], row[1].strip() or None
    else:
        entry = text
    path = entry if entry[0] == "/" else prefix + entry
    if labels != "folder":
        label = None
    elif kind != "csv":
        label = path.rpartition("/")[0].rpartition("/")[2] or None
    source = path if path.isascii() else printable(path)
    return InputRef(
        source, path, -1, -1, label if label is None or label.isascii() else printable(label), None
    )


def _list_entries(
    src: str, kind: str, labels: str, part: int, num_parts: int
) -> Iterator[InputRef]:
    """Entries of a list file; a part reads only its blocks (a line belongs to the block it starts in)."""
    base = os.path.dirname(src)
    prefix = base + "/" if base else ""
    try:
        with open(src, "rb") as f:
            for start, end in _list_blocks(os.fstat(f.fileno()).st_size, part, num_parts):
                position = start
                if start > 0:  # the line running into this block belongs to the one before
                    f.seek(start - 1)
                    position = start - 1 + _line_length(f, f.readline(_MAX_LINE_BYTES))
                else:
                    f.seek(0)
                while position < end:
                    raw = f.readline(_MAX_LINE_BYTES + 1)
                    if not raw:
                        break
                    length = _line_length(f, raw)
                    position += length
                    ref = _list_entry(raw, kind, prefix, labels, length)
                    if ref is not None:
                        yield ref
    except OSError as exc:
        raise BuildError(
            f"{printable(src)}: cannot read list file: {exc.strerror or exc}"
        ) from None


def _tar_members(src: str, labels: str) -> Iterator[InputRef]:
    """Members of an uncompressed archive, read in place; only one header is held at a time."""
    name = printable(src)
    try:
        with tarfile.open(src, "r:") as archive:
            while (member := archive.next()) is not None:
                archive.members.clear()  # tarfile keeps every header it has read otherwise
                member_name = printable(member.name)
                label = _first_folder(member_name) if labels == "folder" else None
                if member.isfile():
                    yield InputRef(
                        f"{name}:{member_name}", src, member.offset_data, member.size, label
                    )
                elif not member.isdir():
                    kind = (
                        "symlink"
                        if member.issym()
                        else "hard link"
                        if member.islnk()
                        else "special file"
                    )
                    yield InputRef(
                        f"{name}:{member_name}",
                        src,
                        label=label,
                        rejected=f"not a regular file (archive {kind})",
                    )
            # tarfile ends quietly at a damaged header after the first; what follows would vanish unseen.
            archive.fileobj.seek(archive.offset)
            if archive.fileobj.read(tarfile.BLOCKSIZE).strip(b"\0"):
                yield InputRef(
                    f"{name}:@{archive.offset}",
                    src,
                    rejected=f"damaged archive: no valid header at byte {archive.offset}, "
                    f"the members after it cannot be read",
                )
    except (tarfile.TarError, OSError) as exc:
        raise BuildError(f"{name}: cannot read tar archive: {exc}") from None


def iter_part(
    sources: Sequence[str],
    labels: str = "none",
    part: int = 0,
    num_parts: int = 1,
    skip: Iterable[str] = (),
) -> Iterator[InputRef]:
    """Part ``part`` of ``num_parts``'s inputs of ``sources``, in enumeration order.

    A folder contributes its files recursively (sorted per folder, hidden names
    skipped, folder symlinks followed, loops rejected); a ``.txt``/``.lst``/``.list``
    file lists paths one per line and a ``.csv`` file ``PATH,LABEL`` rows (relative
    to the list's folder; blank lines and ``#`` comments skipped); a ``.tar``
    archive contributes its regular members; any other file is one image.

    With ``labels="folder"`` an input's class is its first-level sub-folder below a
    source folder or archive root, a CSV row's label, and for list entries and
    single files the folder that holds the image.

    ``skip`` names folders never to enter (the build's output folder).

    Raises:
        BuildError: a source does not exist or cannot be read.
    """
    skipped = frozenset(
        (st.st_dev, st.st_ino) for st in (os.stat(p) for p in skip if os.path.isdir(p))
    )
    archives = 0
    for src in sources:
        kind = source_kind(src)
        if kind == "folder":
            yield from _folder(src, labels, part, num_parts, skipped)
        elif kind in ("list", "csv"):
            yield from _list_entries(src, kind, labels, part, num_parts)
        elif kind == "tar":
            # An archive is read header by header from its start, so it belongs whole to one part.
            if archives % num_parts == part:
                yield from _tar_members(src, labels)
            archives += 1
        elif num_parts == 1 or _owner(src, num_parts) == part:
            label = (
                (os.path.basename(os.path.dirname(os.path.abspath(src))) or None)
                if labels == "folder"
                else None
            )
            yield InputRef(printable(src), src, label=printable(label) if label else None)


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


def find_classes(sources: Sequence[str], labels: str, skip: Iterable[str] = ()) -> list[str]:
    """The sorted class names of a ``--labels folder`` build.

    A source folder's first-level sub-folders are its classes (one listing); list
    files and archives are read through once, holding only the set of names. A
    multi-part build at scale passes ``--classes`` instead, or lets the Ray
    executor find them once for every part.
    """
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
