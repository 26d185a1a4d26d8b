"""Archives of per-class archives (``--labels archive``: ImageNet's training archive), streamed.

Owns reading an outer ``.tar`` whose ``CLASS.tar`` members each hold one class's images: the
inner archives are walked in place, header by header, through the outer file (nothing is
unpacked, no listing held), so an inner member is an input read at its absolute offset, as a flat
archive's member is. An input is named ``CLASS.tar/MEMBER`` within its source (naming rule 2)
and dealt to a part by a hash of that name, so every part holds every class. Must not decide
classes' indices or read any image bytes.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from typing import Iterator, NamedTuple, Optional, Sequence, Union

from . import BuildError
from .inputs import ORDER, InputRef, printable, source_kind

__all__ = [
    "INNER_SUFFIX",
    "archive_classes",
    "iter_archive_part",
    "nested_members",
    "refuse_other_source",
]

INNER_SUFFIX = ".tar"


class _Slice:
    """The bytes ``[start, end)`` of an open file, at the file's own offsets.

    An inner archive is handed to ``tarfile`` as this: its member offsets are then absolute in
    the outer file (what an input is read at), and a damaged inner archive cannot read on into
    the next outer member's header and take it for one of its own.
    """

    def __init__(self, f, start: int, end: int):
        self._f, self._end = f, end
        f.seek(start)

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(position, whence)

    def read(self, size: int = -1) -> bytes:
        left = max(0, self._end - self._f.tell())
        return self._f.read(left if size is None or size < 0 else min(size, left))


def _link_kind(member: tarfile.TarInfo) -> str:
    return "symlink" if member.issym() else "hard link" if member.islnk() else "special file"


def _class_of(member_name: str) -> Optional[str]:
    """``n01440764`` for ``n01440764.tar`` (or ``train/n01440764.tar``); None for other names."""
    base = member_name.rpartition("/")[2]
    if base.lower().endswith(INNER_SUFFIX) and len(base) > len(INNER_SUFFIX):
        return base[: -len(INNER_SUFFIX)]
    return None


class _Damaged(NamedTuple):
    """Where an archive stops being readable, and why."""

    at: int
    reason: str


def _walk(fileobj, end: int, inner: bool = False) -> Iterator[Union[tarfile.TarInfo, _Damaged]]:
    """Each member of the archive in ``fileobj`` (from its position to ``end``) and, last, a
    ``_Damaged`` when the archive is damaged; only one header is held at a time. An ``inner``
    archive's member running past its end is damage (its bytes would be the next archive's); an
    outer one's is read up to the file's end, so a cut download keeps its last class's start.

    Raises:
        tarfile.TarError: the first header is none (only an archive at the file's start says so;
            elsewhere the walk ends with a ``_Damaged`` at its start).
    """
    archive = tarfile.TarFile(fileobj=fileobj, mode="r")
    while True:
        try:
            member = archive.next()
        except tarfile.TarError as exc:  # a header after the first is cut short or malformed
            yield _Damaged(archive.offset, f"damaged archive: {exc} at byte {archive.offset}")
            return
        archive.members.clear()  # tarfile keeps every header it has read otherwise
        if member is None:
            break
        if inner and member.isfile() and member.offset_data + member.size > end:
            yield _Damaged(
                member.offset,
                f"damaged archive: member {printable(member.name)} runs past the archive's end",
            )
            return
        yield member
    # tarfile ends quietly at a damaged header after the first; what follows would vanish unseen.
    if archive.offset < end:
        archive.fileobj.seek(archive.offset)
        if archive.fileobj.read(tarfile.BLOCKSIZE).strip(b"\0"):
            yield _Damaged(
                archive.offset,
                f"damaged archive: no valid header at byte {archive.offset}, "
                "the members after it cannot be read",
            )


def nested_members(
    path: str, part: int = 0, num_parts: int = 1, src: Optional[int] = None
) -> Iterator[InputRef]:
    """Part ``part`` of ``num_parts``'s inputs of the archive of class archives at ``path``.

    Every inner archive's member is an input of its class; a member of the outer archive that is
    no archive is an input without a class (the build rejects it); links, special files and an
    archive's damaged tail are inputs rejected with their reason, as a flat archive's are.
    Every part reads every header (outer and inner), never a member's data.

    Raises:
        BuildError: the outer archive cannot be read at all.
    """
    outer_name = printable(path)

    def ref(inside: str, *, offset=-1, size=-1, label=None, rejected=None) -> Optional[InputRef]:
        """The input named ``inside`` within the source, or None when another part owns it."""
        name = inside if src is not None else f"{outer_name}:{inside}"
        found = InputRef(f"{outer_name}:{inside}", path, offset, size, label, rejected, name, src)
        # Dealt by a hash of the name, as a folder's files are: an inner archive is one class,
        # and a part holding whole inner archives would hold only some classes.
        if num_parts > 1 and zlib.crc32(found.key()) % num_parts != part:
            return None
        return found

    try:
        with open(path, "rb") as outer, open(path, "rb") as inner:
            size = os.fstat(outer.fileno()).st_size
            for member in _walk(outer, size):
                if isinstance(member, _Damaged):
                    if found := ref(f"@{member.at}", rejected=member.reason):
                        yield found
                else:
                    yield from _outer_member(member, inner, size, ref)
    except (tarfile.TarError, OSError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise BuildError(f"{outer_name}: cannot read tar archive: {why}") from None


def _outer_member(member: tarfile.TarInfo, inner, size: int, ref) -> Iterator[InputRef]:
    """The inputs of one member of the outer archive: an inner archive's members, or itself."""
    outer_member = printable(member.name)
    label = _class_of(outer_member)
    if not member.isfile():
        if not member.isdir():
            why = f"not a regular file (archive {_link_kind(member)})"
            if found := ref(outer_member, rejected=why):
                yield found
        return
    if label is None:  # an image beside the class archives: no class to give it
        if found := ref(outer_member, offset=member.offset_data, size=member.size):
            yield found
        return
    end = min(member.offset_data + member.size, size)
    try:
        entries = _walk(_Slice(inner, member.offset_data, end), end, inner=True)
        for entry in entries:
            if isinstance(entry, _Damaged):
                found = ref(f"{outer_member}/@{entry.at}", label=label, rejected=entry.reason)
            elif entry.isfile():
                name = f"{outer_member}/{printable(entry.name)}"
                found = ref(name, offset=entry.offset_data, size=entry.size, label=label)
            elif not entry.isdir():
                found = ref(
                    f"{outer_member}/{printable(entry.name)}",
                    label=label,
                    rejected=f"not a regular file (archive {_link_kind(entry)})",
                )
            else:
                continue
            if found:
                yield found
    except tarfile.TarError as exc:  # the inner archive's first header (not at byte 0: rare)
        if found := ref(
            f"{outer_member}/@{member.offset_data}",
            label=label,
            rejected=f"damaged archive: {exc}",
        ):
            yield found


def iter_archive_part(
    sources: Sequence[str], part: int = 0, num_parts: int = 1, order: int = ORDER
) -> Iterator[InputRef]:
    """``inputs.iter_part`` for a ``--labels archive`` build: part ``part`` of ``num_parts``'s
    inputs of archives of class archives, in enumeration order.

    Raises:
        BuildError: a source is no ``.tar`` archive, or cannot be read.
    """
    for position, path in enumerate(sources):
        refuse_other_source(path, source_kind(path))
        yield from nested_members(path, part, num_parts, None if order == 1 else position)


def refuse_other_source(path: str, kind: str) -> None:
    """Raises BuildError when a source of a ``--labels archive`` build is no ``.tar`` archive."""
    if kind != "tar":
        raise BuildError(
            f"{printable(path)}: --labels archive reads .tar archives of CLASS.tar archives, "
            f"not a {kind}; for class folders use --labels folder"
        )


def archive_classes(sources: Sequence[str]) -> list[str]:
    """The sorted classes of archives of class archives: their ``CLASS.tar`` members' names, from
    the outer archives' headers only (an inner archive is never opened).

    Raises:
        BuildError: a source is no ``.tar`` archive, cannot be read, or holds no class archive.
    """
    found: set[str] = set()
    for path in sources:
        refuse_other_source(path, source_kind(path))
        held = 0
        try:
            with open(path, "rb") as f:
                for member in _walk(f, os.fstat(f.fileno()).st_size):
                    if not isinstance(member, _Damaged) and member.isfile():
                        label = _class_of(printable(member.name))
                        if label is not None:
                            found.add(label)
                            held += 1
        except (tarfile.TarError, OSError) as exc:
            why = getattr(exc, "strerror", None) or exc
            raise BuildError(f"{printable(path)}: cannot read tar archive: {why}") from None
        if not held:
            raise BuildError(
                f"{printable(path)}: holds no CLASS.tar archive for --labels archive; "
                "a flat archive of class folders takes --labels folder"
            )
    return sorted(found)
