"""Which inputs a build has, their names and classes, and which part owns each: streamed.

An input is a file, a list entry, an archive member, or something the build must account for
as rejected (a symlink loop, an unreadable folder, a damaged archive's tail). Its name is what
it is within its source (``ORDER`` says which rule), so the build of a dump is the same from
any mount point. A part reads only its own share where the source allows it: a list file in
byte blocks dealt to the parts, an archive whole to one part, folder files by a hash of their
name. The packing order is ``order``'s. Never lists a source whole.
"""

from __future__ import annotations

import csv
import os
import tarfile
import zlib
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

from . import BuildError

__all__ = [
    "ORDER",
    "LIST_SUFFIXES",
    "CSV_SUFFIXES",
    "TAR_SUFFIXES",
    "TABLE_SUFFIXES",
    "InputRef",
    "printable",
    "source_kind",
    "iter_part",
]

LIST_SUFFIXES = (".txt", ".lst", ".list")
CSV_SUFFIXES = (".csv",)
TAR_SUFFIXES = (".tar",)
TABLE_SUFFIXES = (".parquet", ".arrow")

ORDER = 2
"""The naming rule a new build uses: what the packing order hashes, what a part's share of a
folder is dealt by and what each sample's ``KEY.json`` records as its ``source``. 2: the input's
name within its source (a folder's files by their path below it, a list's entries as written, an
archive's members by name, a single file by its file name) with the source's position among the
sources. 1 (builds begun before it; still resumed and finished by it): the input's path as the
build was given it, so the same dump under another mount point packed in another order."""

# A part's share of a list file is dealt in blocks of about 1/256 of its fair share,
# so a class-sorted list gives every part each class in close to its share (a block
# is one class's or two); a block costs a seek and half a line read twice.
_BLOCKS_PER_PART = 256
_MIN_BLOCK_BYTES = 256
_MAX_BLOCK_BYTES = 1 << 20
# A flat archive's .tar member would be rejected as "not an image": say what reads its members.
_NESTED = "an archive in an archive: --labels archive reads SRC.tar holding CLASS.tar archives"
_MAX_LINE_BYTES = 1 << 16
"""The longest line of a list file read as an entry; a longer one is rejected, read in pieces."""


class InputRef(NamedTuple):
    """One input: ``source`` names it for people; ``path``/``offset``/``size`` read it;
    ``name`` and ``src`` name it within the dump.

    ``path`` is what the operating system gave (bytes that are not UTF-8 kept as
    surrogate escapes, so the file can be opened); ``source``, ``label`` and ``name`` are
    printable (those bytes shown as ``\\xNN``). ``rejected`` is a reason already
    known while enumerating (a symlink loop, an unreadable folder). ``src`` is the
    source's position among the build's sources (None under naming rule 1, where ``name``
    is ``source``). ``row`` is a table row's position in its file at ``path`` (``offset`` its
    row group, ``size`` its position there); -1 for every other input.
    """

    source: str
    path: str
    offset: int = -1
    size: int = -1
    label: Optional[str] = None
    rejected: Optional[str] = None
    name: str = ""
    src: Optional[int] = None
    row: int = -1

    def key(self) -> bytes:
        """What the packing order hashes and a folder's files are dealt to the parts by."""
        if self.src is None:
            return self.name.encode()
        return b"%d:%s" % (self.src, self.name.encode())


def printable(name: str) -> str:
    """``name`` with bytes that are not UTF-8 shown as ``\\xNN``, so JSON and terminals can carry it."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def source_kind(src: str) -> str:
    """``folder``, ``list``, ``csv``, ``tar``, ``table`` or ``file``.

    A table is a ``.parquet`` or ``.arrow`` file, a folder holding only such files (metadata
    files aside), or a ``datasets`` ``save_to_disk`` folder (``state.json`` beside its files).

    Raises:
        BuildError: the source does not exist or is not a regular file or folder.
    """
    if os.path.isdir(src):
        return "table" if _is_table_folder(src) else "folder"
    if os.path.isfile(src):
        lower = src.lower()
        if lower.endswith(TAR_SUFFIXES):
            return "tar"
        if lower.endswith(TABLE_SUFFIXES):
            return "table"
        if lower.endswith(LIST_SUFFIXES):
            return "list"
        if lower.endswith(CSV_SUFFIXES):
            return "csv"
        return "file"
    if os.path.lexists(src):
        raise BuildError(f"{printable(src)}: not a regular file or folder")
    raise BuildError(f"{printable(src)}: no such file or folder")


def _is_table_folder(path: str) -> bool:
    """Whether a folder is tables: ``state.json`` and Arrow files, or table files only at its top
    (a sub-folder or any other file says it is a dump; the listing stops there)."""
    tables = False
    with os.scandir(path) as listing:
        for entry in listing:
            lower = entry.name.lower()
            if lower == "state.json" or lower.endswith(TABLE_SUFFIXES):
                tables = True
            elif not entry.name.startswith(".") and not lower.endswith((".json", ".md")):
                return False
    return tables


def _owner(key: bytes, num_parts: int) -> int:
    return zlib.crc32(key) % num_parts


def _share_key(path: str, name: str, src: Optional[int]) -> bytes:
    """What a folder's file or a single file is dealt to a part by: ``InputRef.key`` under rule
    2; under rule 1 the path as the operating system gave it."""
    if src is None:
        return path.encode("utf-8", "surrogateescape")
    return b"%d:%s" % (src, name.encode())


def _first_folder(relative: str) -> Optional[str]:
    head, sep, _ = relative.partition("/")
    return head if sep and head else None


# --------------------------------------------------------------------------- sources


def _folder(
    root: str, labels: str, part: int, num_parts: int, skip: frozenset, src: Optional[int]
) -> Iterator[InputRef]:
    """Files below ``root`` (sorted per folder, hidden names skipped); folder symlinks followed, loops refused."""

    def ref(path: str, relative: str, label: Optional[str], rejected: Optional[str] = None):
        """The input at ``path`` (``relative`` below ``root``), or None when another part owns it."""
        source = printable(path)
        name = source if src is None else printable(relative)
        if num_parts > 1 and _owner(_share_key(path, name, src), num_parts) != part:
            return None
        return InputRef(source, path, -1, -1, label, rejected, name, src)

    top = os.stat(root)
    stack = [(root, "", None, frozenset({(top.st_dev, top.st_ino)}))]
    while stack:
        folder, relative, label, ancestors = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(
                    (e for e in listing if not e.name.startswith(".")), key=lambda e: e.name
                )
        except OSError as exc:
            found = ref(folder, relative, label, f"unreadable folder: {exc.strerror or exc}")
            if found:
                yield found
            continue
        below = []
        for entry in entries:
            path = entry.path
            name = f"{relative}/{entry.name}" if relative else entry.name
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False  # reading it will say why
            if not is_dir:
                if found := ref(path, name, label):
                    yield found
                continue
            sub_label = printable(entry.name) if folder == root and labels == "folder" else label
            try:
                st = entry.stat()
            except OSError as exc:
                if found := ref(path, name, sub_label, f"unreadable folder: {exc.strerror}"):
                    yield found
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in skip:
                continue  # the build's own output folder
            if ident in ancestors:
                loop = "symlink loop: this folder contains itself"
                if found := ref(path, name, sub_label, loop):
                    yield found
                continue
            below.append((path, name, sub_label, ancestors | {ident}))
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
    raw: bytes, kind: str, prefix: str, labels: str, src: Optional[int], length: int = 0
) -> Optional[InputRef]:
    # Plain string work rather than os.path: this runs once per line of lists of billions.
    text = raw.decode("utf-8", "surrogateescape").strip()
    if not text or text[0] == "#":
        return None
    label = None
    if length > _MAX_LINE_BYTES:  # ``raw`` is its start; no path is this long (PATH_MAX: 4096)
        shown = printable(text[:200]) + f"... ({length} bytes)"
        return InputRef(
            shown,
            text[:200],
            rejected=f"malformed list line (over {_MAX_LINE_BYTES} bytes)",
            name=shown,
            src=src,
        )
    if "\0" in text:  # no path holds one; nor may a class name taken from it
        shown = printable(text)
        return InputRef(
            shown, text, rejected="malformed list line (a NUL character)", name=shown, src=src
        )
    if kind == "csv":
        try:
            row = next(csv.reader([text]))
        except csv.Error as exc:  # a quoted field over csv's field limit, a stray quote
            shown = printable(text)
            return InputRef(
                shown, text, rejected=f"malformed list line (csv: {exc})", name=shown, src=src
            )
        if len(row) != 2 or not row[0]:
            shown = printable(text)
            return InputRef(
                shown,
                text,
                rejected="malformed list line (expected PATH,LABEL)",
                name=shown,
                src=src,
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
    if src is None:
        name = source
    else:
        name = entry if entry.isascii() else printable(entry)
    label = label if label is None or label.isascii() else printable(label)
    return InputRef(source, path, -1, -1, label, None, name, src)


def _list_entries(
    path: str, kind: str, labels: str, part: int, num_parts: int, src: Optional[int]
) -> Iterator[InputRef]:
    """Entries of a list file; a part reads only its blocks (a line belongs to the block it starts in)."""
    base = os.path.dirname(path)
    prefix = base + "/" if base else ""
    try:
        with open(path, "rb") as f:
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
                    ref = _list_entry(raw, kind, prefix, labels, src, length)
                    if ref is not None:
                        yield ref
    except OSError as exc:
        raise BuildError(
            f"{printable(path)}: cannot read list file: {exc.strerror or exc}"
        ) from None


def _tar_members(path: str, labels: str, src: Optional[int]) -> Iterator[InputRef]:
    """Members of an uncompressed archive, read in place; only one header is held at a time."""
    name = printable(path)

    def named(inside: str) -> str:
        return f"{name}:{inside}" if src is None else inside

    try:
        with tarfile.open(path, "r:") as archive:
            while (member := archive.next()) is not None:
                archive.members.clear()  # tarfile keeps every header it has read otherwise
                member_name = printable(member.name)
                label = _first_folder(member_name) if labels == "folder" else None
                source = f"{name}:{member_name}"
                if member.isfile():
                    yield InputRef(
                        source,
                        path,
                        member.offset_data,
                        member.size,
                        label,
                        _NESTED if member_name.lower().endswith(TAR_SUFFIXES) else None,
                        named(member_name),
                        src,
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
                        source,
                        path,
                        label=label,
                        rejected=f"not a regular file (archive {kind})",
                        name=named(member_name),
                        src=src,
                    )
            # tarfile ends quietly at a damaged header after the first; what follows would vanish unseen.
            archive.fileobj.seek(archive.offset)
            if archive.fileobj.read(tarfile.BLOCKSIZE).strip(b"\0"):
                yield InputRef(
                    f"{name}:@{archive.offset}",
                    path,
                    rejected=f"damaged archive: no valid header at byte {archive.offset}, "
                    f"the members after it cannot be read",
                    name=named(f"@{archive.offset}"),
                    src=src,
                )
    except (tarfile.TarError, OSError) as exc:
        raise BuildError(f"{name}: cannot read tar archive: {exc}") from None


def iter_part(
    sources: Sequence[str],
    labels: str = "none",
    part: int = 0,
    num_parts: int = 1,
    skip: Iterable[str] = (),
    order: int = ORDER,
    tables: Optional[Callable[..., Iterator[InputRef]]] = None,
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

    ``skip`` names folders never to enter (the build's output folder). ``order`` is the
    naming rule (``ORDER``; 1 for a build begun under the old one). ``tables`` reads a table
    source's rows (``parquet.TableInputs``: it is called ``(source, labels, part, num_parts,
    src)``); without it a table source is refused.

    Raises:
        BuildError: a source does not exist or cannot be read.
    """
    skipped = frozenset(
        (st.st_dev, st.st_ino) for st in (os.stat(p) for p in skip if os.path.isdir(p))
    )
    if order not in (1, 2):
        raise BuildError(f"naming rule {order}: this moco-shards knows rules 1 and 2")
    archives = 0
    for position, path in enumerate(sources):
        kind = source_kind(path)
        src = None if order == 1 else position
        if kind == "folder":
            yield from _folder(path, labels, part, num_parts, skipped, src)
        elif kind in ("list", "csv"):
            yield from _list_entries(path, kind, labels, part, num_parts, src)
        elif kind == "table":
            if tables is None:
                raise BuildError(
                    f"{printable(path)}: a Parquet or Arrow table: its classes are a column "
                    "(--labels column or --label-column NAME)"
                )
            yield from tables(path, labels, part, num_parts, src)
        elif kind == "tar":
            # An archive is read header by header from its start, so it belongs whole to one part.
            if archives % num_parts == part:
                yield from _tar_members(path, labels, src)
            archives += 1
        else:
            source = printable(path)
            name = source if src is None else printable(os.path.basename(path))
            if num_parts > 1 and _owner(_share_key(path, name, src), num_parts) != part:
                continue
            label = (
                (os.path.basename(os.path.dirname(os.path.abspath(path))) or None)
                if labels == "folder"
                else None
            )
            yield InputRef(
                source, path, -1, -1, printable(label) if label else None, None, name, src
            )
