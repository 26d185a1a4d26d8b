"""Parquet files and Hugging Face datasets' Arrow files as build inputs: one input per row, streamed.

Owns reading tables: which files a table source holds (a ``.parquet`` or ``.arrow`` file, a
folder of them, a ``datasets`` ``save_to_disk`` folder), their image and label columns (the
Hugging Face layout by default: an ``image`` struct of ``bytes`` and ``path``, a ``label`` column
whose ``ClassLabel`` names are the classes), the rows a part owns (whole row groups, or record
batches of an Arrow file, dealt round-robin over the build's tables) and, in a worker, a block's
images read in file order, a row group at a time. A row is named ``FILE#ROW`` within its source
(naming rule 2), so the build is the same from any mount point. Nothing reads a table whole: a part holds one row
group's labels at a time, a worker one row group's images. pyarrow is imported only here, when a
table is read (``pip install 'moco-dali[parquet]'``). Must not decide the packing order.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator, Optional, Sequence

from . import BuildError
from .imageprep import Rejected
from .inputs import TABLE_SUFFIXES, InputRef, printable, source_kind
from .writer import read_input

__all__ = [
    "MAX_CLASSES",
    "TableInputs",
    "TableRows",
    "in_table_order",
    "table_classes",
    "table_files",
]

MAX_CLASSES = 1 << 20
"""The most classes integer labels without names make (``"0"``..``"N-1"``), as ``index``'s."""

_STATE = "state.json"
"""A ``Dataset.save_to_disk`` folder's list of its Arrow files (``_data_files``), in row order."""
_INFO = "dataset_info.json"
_MAX_META_BYTES = 64 * 1024**2


def _pyarrow():
    """pyarrow's modules, imported on first use: only a build over tables needs the package."""
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise BuildError(
            "Parquet and Arrow sources need pyarrow: pip install 'moco-dali[parquet]'"
        ) from None
    return pyarrow


def table_files(path: str) -> list[tuple[str, str]]:
    """``(file, name within the source)`` of each table file of a table source, in row order.

    Raises:
        BuildError: a ``save_to_disk`` folder's ``state.json`` is unreadable or lists no file.
    """
    if not os.path.isdir(path):
        return [(path, printable(os.path.basename(path)))]
    state = os.path.join(path, _STATE)
    if os.path.isfile(state):
        try:
            with open(state, "rb") as f:
                names = [d["filename"] for d in json.loads(f.read(_MAX_META_BYTES))["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BuildError(f"{printable(state)}: cannot read its _data_files: {exc}") from None
        if not names or any(not isinstance(n, str) or "/" in n for n in names):
            raise BuildError(f"{printable(state)}: _data_files names no Arrow file")
        return [(os.path.join(path, n), printable(n)) for n in names]
    with os.scandir(path) as listing:
        names = sorted(e.name for e in listing if e.name.lower().endswith(TABLE_SUFFIXES))
    return [(os.path.join(path, n), printable(n)) for n in names]


class _Table:
    """One open table file: its schema and its row groups (record batches of an Arrow file)."""

    def __init__(self, path: str):
        pa = _pyarrow()
        self.path, self.shown = path, printable(path)
        self._parquet = None
        try:
            if path.lower().endswith(".parquet"):
                self._parquet = pa.parquet.ParquetFile(path)
                self.schema = self._parquet.schema_arrow
            else:
                source = pa.memory_map(path)  # an Arrow file's batches are read without a copy
                try:
                    self._stream = pa.ipc.open_stream(source)
                except pa.ArrowInvalid:  # the IPC file format (with a footer) rather than a stream
                    self._stream = pa.ipc.open_file(source)
                self.schema = self._stream.schema
        except (OSError, pa.ArrowException) as exc:
            kind = "Parquet" if path.lower().endswith(".parquet") else "Arrow"
            raise BuildError(f"{self.shown}: not a readable {kind} file: {exc}") from None

    def groups(self, columns: Sequence[str]) -> Iterator[tuple[int, int, int, Callable]]:
        """``(group, first row, rows, read)`` per row group; ``read()`` gives its ``columns``.

        Raises:
            BuildError: the file cannot be read on (from the iteration), or a row group cannot
                be (from its ``read()``).
        """
        pa, first = _pyarrow(), 0
        try:
            if self._parquet is not None:
                meta = self._parquet.metadata
                for group in range(meta.num_row_groups):
                    rows = meta.row_group(group).num_rows
                    yield group, first, rows, lambda g=group: self._read(g, columns)
                    first += rows
                return
            batches = (
                iter(self._stream)
                if isinstance(self._stream, pa.ipc.RecordBatchStreamReader)
                else (self._stream.get_batch(i) for i in range(self._stream.num_record_batches))
            )
            for group, batch in enumerate(batches):
                yield group, first, batch.num_rows, lambda b=batch: b.select(columns)
                first += batch.num_rows
        except (OSError, pa.ArrowException) as exc:
            raise BuildError(f"{self.shown}: cannot read on: {exc}") from None

    def _read(self, group: int, columns: Sequence[str]):
        pa = _pyarrow()
        try:
            return self._parquet.read_row_group(group, columns)
        except (OSError, pa.ArrowException) as exc:
            raise BuildError(f"{self.shown}: cannot read row group {group}: {exc}") from None

    def column(self, name: str, option: str, kinds: str):
        """The type of column ``name``; a one-line error naming ``option`` when there is none."""
        if name not in self.schema.names:
            raise BuildError(
                f"{self.shown}: no column {name!r} (it has {', '.join(self.schema.names)}); "
                f"name the {kinds} column with {option}"
            )
        return self.schema.field(name).type

    def class_names(self, label_column: str, info: Optional[str]) -> Optional[list[str]]:
        """The ``ClassLabel`` names of ``label_column``, from the schema's ``huggingface``
        metadata or else the folder's ``dataset_info.json``; None when neither has them."""
        meta = (self.schema.metadata or {}).get(b"huggingface")
        try:
            if meta is not None:
                features = json.loads(meta).get("info", {}).get("features", {})
            elif info is not None and os.path.isfile(info):
                with open(info, "rb") as f:
                    features = json.loads(f.read(_MAX_META_BYTES)).get("features", {})
            else:
                return None
            feature = features.get(label_column) or {}
        except (OSError, ValueError, AttributeError) as exc:
            raise BuildError(f"{self.shown}: cannot read its features' metadata: {exc}") from None
        names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
        if names is not None and not all(isinstance(n, str) and n for n in names):
            raise BuildError(f"{self.shown}: ClassLabel {label_column!r} names are not strings")
        return names


def _info(source: str) -> Optional[str]:
    return os.path.join(source, _INFO) if os.path.isdir(source) else None


def _refuse_other(path: str, kind: str) -> None:
    if kind != "table":
        raise BuildError(
            f"{printable(path)}: --labels column reads Parquet or Arrow tables, not a {kind}"
        )


def table_classes(sources: Sequence[str], label_column: str) -> list[str]:
    """The classes of a ``--labels column`` build, in index order: the ``ClassLabel`` names when
    the tables have them (every table the same), else ``"0"``..``"N-1"`` for integer labels (N
    from Parquet's row group statistics where written), else the sorted string labels.

    Raises:
        BuildError: a source is no table, lacks the column, or the tables disagree on names.
    """
    pa = _pyarrow()
    names: Optional[list[str]] = None
    top, strings = -1, set()
    for source in sources:
        _refuse_other(source, source_kind(source))
        for path, _ in table_files(source):
            table = _Table(path)
            kind = table.column(label_column, "--label-column", "label")
            found = table.class_names(label_column, _info(source))
            if found is not None:
                if names is not None and found != names:
                    raise BuildError(f"{table.shown}: its ClassLabel names differ from another's")
                names = found
                continue
            if pa.types.is_integer(kind) and table._parquet is not None:
                stats = _statistics(table._parquet.metadata, label_column)
                if all(s is not None and s.has_min_max for s in stats):
                    top = max([top] + [s.max for s in stats])
                    continue
            for _, _, _, read in table.groups([label_column]):
                values = read().column(0)
                if pa.types.is_integer(kind):
                    found = pa.compute.max(values).as_py()
                    top = top if found is None else max(top, found)
                elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
                    strings.update(v for v in values.unique().to_pylist() if v)
                else:
                    raise BuildError(
                        f"{table.shown}: column {label_column!r} holds {kind}; "
                        "labels are integers or strings"
                    )
    if names is not None:
        return names
    if strings and top >= 0:
        raise BuildError(
            f"--label-column {label_column}: integers in one table, strings in another"
        )
    if top >= MAX_CLASSES:
        raise BuildError(
            f"--label-column {label_column}: a label of {top}, over {MAX_CLASSES} classes; "
            "give the classes with --classes FILE"
        )
    return sorted(strings) if strings else [str(i) for i in range(top + 1)]


def _statistics(meta, column: str) -> list:
    """A top-level column's statistics in each row group (None where a group has none)."""
    at = next((i for i in range(meta.num_columns) if meta.schema.column(i).path == column), None)
    if at is None:  # not a leaf column: no statistics of its own
        return [None]
    return [meta.row_group(g).column(at).statistics for g in range(meta.num_row_groups)]


class TableInputs:
    """``inputs.iter_part``'s reader of table sources, for one enumeration: each row an input,
    whole row groups dealt round-robin to the parts over every table of the build."""

    def __init__(self, image_column: str, label_column: Optional[str]):
        self.image_column, self.label_column = image_column, label_column
        self._groups = 0

    def __call__(
        self, source: str, labels: str, part: int, num_parts: int, src: Optional[int]
    ) -> Iterator[InputRef]:
        """Part ``part`` of ``num_parts``'s rows of the table source ``source``.

        Raises:
            BuildError: a table cannot be read or lacks a column, or ``labels`` is not a table's.
        """
        if labels not in ("none", "column"):
            raise BuildError(
                f"{printable(source)}: a table's labels are a column: --labels column "
                f"(or --label-column NAME), not --labels {labels}"
            )
        pa = _pyarrow()
        label_column = self.label_column if labels == "column" else None
        for path, name in table_files(source):
            table = _Table(path)
            image = table.column(self.image_column, "--image-column", "image")
            if not (_is_struct_image(pa, image) or _is_bytes(pa, image) or _is_path(pa, image)):
                raise BuildError(
                    f"{table.shown}: column {self.image_column!r} holds {image}; an image is "
                    "a struct of bytes and path, binary, or a path"
                )
            names = None
            if label_column is not None:
                table.column(label_column, "--label-column", "label")
                names = table.class_names(label_column, _info(source))
            for group, first, rows, read in table.groups([label_column] if label_column else []):
                mine = self._groups % num_parts == part
                self._groups += 1
                if not mine:
                    continue
                values, unreadable = [None] * rows, None
                if label_column:
                    try:
                        values = read().column(0).to_pylist()
                    except BuildError as exc:  # its rows are rejected, the build goes on
                        unreadable = f"unreadable: {exc}"
                for index, value in enumerate(values):
                    row = first + index
                    label, why = (
                        _label(value, names, label_column) if label_column else (None, None)
                    )
                    why = unreadable or why
                    yield InputRef(
                        f"{table.shown}#{row}",
                        path,
                        group,
                        index,
                        label,
                        why,
                        f"{name}#{row}" if src is not None else f"{table.shown}#{row}",
                        src,
                        row,
                    )


def _label(value, names: Optional[list[str]], column: str) -> tuple[Optional[str], Optional[str]]:
    """A row's class name, or the reason it has none."""
    if value is None:
        return None, f"no label: null in column {column!r}"
    if isinstance(value, str):
        return (value, None) if value else (None, f"no label: empty in column {column!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        return None, f"no label: {value!r} in column {column!r} is no class"
    if value < 0:  # datasets' ClassLabel writes -1 for "no label" (a test split)
        return None, f"no label: {value} in column {column!r}"
    if names is None:
        return str(value), None
    if value >= len(names):
        return None, f"label out of range: {value} (column {column!r} names {len(names)} classes)"
    return names[value], None


def _is_struct_image(pa, kind) -> bool:
    return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0


def _is_bytes(pa, kind) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _is_path(pa, kind) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def in_table_order(items: list) -> list:
    """A block's items, its table rows in file and row order after its other inputs (kept in
    their order), so that a worker reads each row group once and holds one at a time. Which
    shard an input lands in is still the packing order's; only its place in the shard moves."""
    if not any(ref.row >= 0 for _, ref, _ in items):
        return items
    return sorted(items, key=lambda item: (item[1].row >= 0, item[1].path, max(item[1].row, 0)))


class TableRows:
    """``writer.read_input`` for a block in ``in_table_order``: a table row's image from its row
    group's image column, read when the block reaches the group and dropped when it leaves it;
    other inputs as ``read_input`` reads them."""

    def __init__(self, image_column: str):
        self.image_column = image_column
        self._path: Optional[str] = None
        self._groups: Iterator = iter(())
        self._group = -1
        self._column: object = None

    def __call__(self, ref: InputRef, max_bytes: int) -> bytes:
        if ref.row < 0:
            return read_input(ref, max_bytes)
        if (ref.path, ref.offset) != (self._path, self._group):
            self._seek(ref.path, ref.offset)
        if isinstance(self._column, Rejected):
            raise self._column
        found = _image(self._column, ref.size, ref.path, self.image_column)
        if isinstance(found, Rejected):
            raise found
        if isinstance(found, InputRef):  # a path beside the table
            return read_input(found, max_bytes)
        if len(found) > max_bytes:
            raise Rejected(f"too large: over --max-input-bytes ({max_bytes} bytes)")
        return found

    def _seek(self, path: str, group: int) -> None:
        """Read row group ``group`` of ``path``: on from the last one read (table order never goes
        back within a file), or from the start of a file not read yet."""
        self._column = Rejected(
            "unreadable: the table has no such row group now (changed since it was listed)"
        )
        try:
            if path != self._path or group < self._group:
                self._path, self._groups = path, _Table(path).groups([self.image_column])
            self._group = group
            for at, _, _, read in self._groups:
                if at == group:
                    self._column = read().column(0)
                    return
        except BuildError as exc:  # the file changed or went since it was listed
            self._column = Rejected(f"unreadable: {exc}")


def _image(column, index: int, path: str, name: str):
    """Row ``index``'s image: its bytes, an ``InputRef`` of the file it names, or ``Rejected``."""
    if index >= len(column):
        return Rejected("unreadable: the table has no such row now (changed since it was listed)")
    value = column[index].as_py()
    where = None
    if isinstance(value, dict):
        where = value.get("path")
        value = value.get("bytes")
        if value is None and where is None:
            return Rejected(f"no image: null in column {name!r}")
    elif isinstance(value, str):
        value, where = None, value
    if value is not None:
        return value
    if where is None:
        return Rejected(f"no image: null in column {name!r}")
    # A path is relative to the table's folder, as datasets writes one beside its files.
    full = where if os.path.isabs(where) else os.path.join(os.path.dirname(path), where)
    return InputRef(printable(full), full, name=printable(where))
