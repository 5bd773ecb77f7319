"""Image tables in Parquet, as Hugging Face ``datasets`` and Ray Data write them: one row per image, holding its
encoded bytes (PNG, JPEG or any format PIL reads), its integer class and, optionally, its integer id.

:func:`read_image_table` reads and checks the rows of one or more files; it decodes nothing. The images stay
encoded in memory, as Arrow read them, until ``core.data`` decodes them with the ImageFolder loader's code, so no
file is ever unpacked to disk. A problem raises ``DataError`` naming the file, the row (its index within that file)
and the column, in the words of ``storage.tables``' checks of embedding tables (``core.columns``, shared by both).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bict_ray.core.columns import as_int64, first_null
from bict_ray.core.columns import where as _where
from bict_ray.errors import DataError
# the schema metadata key under which Hugging Face `datasets` records a table's features (a ClassLabel's names)
HF_METADATA_KEY = b"huggingface"


class RowNames:
    """Where the rows of a run of files are: row i of them all is (file, row within that file), for a message."""

    def __init__(self, files: list[str], rows_per_file: list[int]):
        self.files = files
        self._starts = _starts(rows_per_file)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def where(self, index: int, column: str) -> str:
        file, row = _locate(self._starts, index)
        return _where(self.files[file], row, column)


class EncodedImages:
    """The encoded images of a table's rows, in the Arrow arrays the files were read into (not copied, nor joined: a
    file may hold more than one binary array's 2 GiB): ``self[i]`` is row i's bytes, ``where(i)`` names its file,
    its row within that file and the column, for a message."""

    def __init__(self, columns: list[pa.ChunkedArray], rows: RowNames, column: str):
        self._chunks = [chunk for values in columns for chunk in values.chunks]
        self._chunk_starts = _starts([len(chunk) for chunk in self._chunks])
        self._rows, self._column = rows, column

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> bytes:
        chunk, row = _locate(self._chunk_starts, index)
        return self._chunks[chunk][row].as_py()

    def where(self, index: int) -> str:
        return self._rows.where(index, self._column)


def _starts(lengths: list[int]) -> np.ndarray:
    return np.cumsum([0] + list(lengths))


def _locate(starts: np.ndarray, index: int) -> tuple[int, int]:
    """(part, position within it) of item ``index`` of parts beginning at ``starts`` (their total last)."""
    if not 0 <= index < starts[-1]:
        raise IndexError(index)
    part = int(np.searchsorted(starts, index, side="right")) - 1
    return part, index - int(starts[part])


@dataclass
class ImageTable:
    """The rows of the files, in order: the files as given, each one's rows as stored.

    labels: (N,) int64 class ids >= 0. ids: (N,) int64 >= 0 and unique: the id column's, or without one each row's
    position 0 … N−1. class_names: the label column's ClassLabel names where the files' Hugging Face metadata gives
    them, else None. rows_per_file: how many of the rows each file holds.
    """

    images: EncodedImages
    labels: np.ndarray
    ids: np.ndarray
    class_names: list[str] | None
    rows_per_file: list[int]


@dataclass
class _File:
    """What one file contributes: its display name, schema, encoded images, labels and ids (None: no id column)."""

    display: str
    schema: pa.Schema
    images: pa.ChunkedArray
    labels: np.ndarray
    ids: np.ndarray | None


def read_image_table(files: list[Path], image_column: str, label_column: str, id_column: str | None, *,
                     id_optional: bool = False,
                     keys: tuple[str, str, str] = ("data.image_column", "data.label_column", "data.id_column"),
                     ) -> ImageTable:
    """Read and check ``files``' image, label and id columns.

    id_column None: the ids are the rows' positions. id_optional: so too when no file has ``id_column`` (the default
    name, which a table without ids simply lacks); a file without it beside one with it is refused either way.
    keys: how the caller names the three columns (config keys), for the message of a missing one.

    Raises ``DataError`` for an unreadable file, a missing column (listing those the file has), a column of the wrong
    type, a null image, a null or negative label, a null or negative id, an id on two rows, and a label beyond the
    ClassLabel names of the metadata.
    """
    schemas = [_schema(file) for file in files]
    with_ids = [id_column is not None and id_column in schema.names for schema in schemas]
    if id_column is not None and not all(with_ids) and (any(with_ids) or not id_optional):
        missing = with_ids.index(False)
        beside = (f" ({files[with_ids.index(True)]} has one: the files of a dataset either all have ids or none has)"
                  if any(with_ids) else "")
        raise DataError(f"{files[missing]}: no column {id_column!r} ({keys[2]}); columns are: "
                        f"{', '.join(schemas[missing].names)}{beside}")
    parts = [_read_file(file, schema, image_column, label_column, id_column if has_id else None, keys)
             for file, schema, has_id in zip(files, schemas, with_ids)]

    rows_per_file = [len(part.labels) for part in parts]
    rows = RowNames([part.display for part in parts], rows_per_file)
    labels = np.concatenate([part.labels for part in parts]) if parts else np.empty(0, np.int64)
    if parts and all(with_ids):
        ids = np.concatenate([part.ids for part in parts])
        _check_unique(ids, rows, id_column)
    else:  # positions: what a row is called when the table names it by nothing else
        ids = np.arange(len(labels), dtype=np.int64)
    class_names = _agreed_class_names(parts, label_column)
    if class_names is not None and len(labels) and labels.max() >= len(class_names):
        row = int(np.flatnonzero(labels >= len(class_names))[0])
        raise DataError(f"{rows.where(row, label_column)}: label {labels[row]}, but the Hugging Face metadata names "
                        f"{len(class_names)} classes (the ClassLabel names of column {label_column!r})")
    images = EncodedImages([part.images for part in parts], rows, image_column)
    return ImageTable(images, labels, ids, class_names, rows_per_file)


def _schema(file: Path) -> pa.Schema:
    try:
        return pq.read_schema(file)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{file}: not a readable Parquet file ({err})") from None


def _read_file(file: Path, schema: pa.Schema, image_column: str, label_column: str, id_column: str | None,
               keys: tuple[str, str, str]) -> _File:
    display = str(file)
    for key, name in zip(keys, (image_column, label_column)):
        if name not in schema.names:
            raise DataError(f"{display}: no column {name!r} ({key}); columns are: {', '.join(schema.names)}")
    field = require_bytes_field(schema.field(image_column).type, display, image_column)
    label_type = schema.field(label_column).type
    if not (pa.types.is_integer(label_type) or pa.types.is_null(label_type)):  # null: every label is (row 0 says)
        raise DataError(f"{display}, column {label_column!r}: type {label_type}; labels must be integers (class "
                        "ids 0, 1, ...)")
    if id_column is not None and not pa.types.is_integer(schema.field(id_column).type):
        raise DataError(f"{display}, column {id_column!r}: type {schema.field(id_column).type}; ids must be "
                        "integers")
    columns = [image_column, label_column] + ([id_column] if id_column is not None else [])
    try:
        table = pq.read_table(file, columns=columns)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{display}: cannot read columns {', '.join(columns)} ({err})") from None
    images = image_bytes(table.column(image_column), field, display, image_column)
    labels = _integers(table.column(label_column), display, label_column, "label")
    ids = None if id_column is None else _integers(table.column(id_column), display, id_column, "id")
    return _File(display, schema, images, labels, ids)


def bytes_field(kind: pa.DataType) -> str | None:
    """'' for a binary column; the field's name for a struct with a binary ``bytes`` field; None for another type."""
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return ""
    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        inner = kind.field(index).type if index >= 0 else None
        if inner is not None and (pa.types.is_binary(inner) or pa.types.is_large_binary(inner)):
            return "bytes"
    return None


def require_bytes_field(kind: pa.DataType, display: str, name: str) -> str:
    """``bytes_field(kind)``; a DataError naming the file (``display``) and column for a type that holds no images."""
    field = bytes_field(kind)
    if field is None:
        raise DataError(f"{display}, column {name!r}: type {kind}; images must be encoded bytes (binary), or a "
                        "struct with a 'bytes' field as Hugging Face datasets writes them")
    return field


def image_bytes(values: pa.ChunkedArray, field: str, display: str, name: str) -> pa.ChunkedArray:
    """The column's encoded images, binary; raises for a row without bytes."""
    paths = None
    if field:
        # flatten applies the struct's own nulls to its fields: a null struct is a null image
        fields = dict(zip((values.type.field(i).name for i in range(values.type.num_fields)), values.flatten()))
        values, paths = fields[field], fields.get("path")
    row = first_null(values)
    if row is not None:
        path = None if paths is None else paths[row].as_py()
        if path is not None:  # Hugging Face's form of an image kept in a file beside the table
            raise DataError(f"{_where(display, row, name)}: no image bytes, only a path ({path!r}); the loader "
                            "decodes the images a table holds and reads no other file: store the bytes in the table")
        raise DataError(f"{_where(display, row, name)}: null image")
    return values


def _integers(column: pa.ChunkedArray, display: str, name: str, what: str) -> np.ndarray:
    """An integer column as int64; raises naming the row of a null, of a value beyond int64, or of a negative one."""
    row = first_null(column)
    if row is not None:
        raise DataError(f"{_where(display, row, name)}: null {what}; every row needs one")
    values = as_int64(column, display, 0, name, what, error=DataError)
    negative = np.flatnonzero(values < 0)
    if len(negative):
        row = int(negative[0])
        # a label of -1 is how Hugging Face datasets marks an unlabelled row; -1 is the id of no image in search
        # results
        why = ("labels are class ids 0, 1, ...; training needs every row labelled" if what == "label"
               else "ids must be >= 0 (search results use -1 for no image)")
        raise DataError(f"{_where(display, row, name)}: {what} {values[row]}; {why}")
    return values


def _check_unique(ids: np.ndarray, rows: RowNames, column: str) -> None:
    """Raise naming both rows (file, row, column) of the smallest id that is on two."""
    order = np.argsort(ids, kind="stable")
    repeated = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(repeated):
        first, second = int(order[repeated[0]]), int(order[repeated[0] + 1])
        raise DataError(f"id {ids[first]} is on two rows, {rows.where(first, column)} and "
                        f"{rows.where(second, column)}: ids must be unique, each names one image")


def _agreed_class_names(parts: list[_File], label_column: str) -> list[str] | None:
    """The ClassLabel names the files' metadata gives the label column; refused where two files disagree."""
    found = None
    for part in parts:
        names = hf_class_names(part.schema, label_column)
        if names is None:
            continue
        if found is None:
            found = (part.display, names)
        elif names != found[1]:
            raise DataError(f"{found[0]} and {part.display} give column {label_column!r} different class names "
                            "(Hugging Face ClassLabel metadata): their labels would mean different classes")
    return None if found is None else found[1]


def hf_class_names(schema: pa.Schema, label_column: str) -> list[str] | None:
    """The names of ``label_column``'s ClassLabel in the Hugging Face metadata ``datasets`` writes into a Parquet
    schema (``{"info": {"features": {column: {"_type": "ClassLabel", "names": [...]}}}}``); None where there are
    none. Metadata of another shape is someone else's and is not read."""
    raw = (schema.metadata or {}).get(HF_METADATA_KEY)
    if raw is None:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][label_column]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return None
    return names

