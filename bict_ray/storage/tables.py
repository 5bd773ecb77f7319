"""Checks of an embedding table made outside bict-ray: its columns' types, its ids, labels and vectors.

An imported gallery (``bict_ray.distributed.import_gallery``) and an old model's embeddings of the training images
(``bict_ray.storage.old_embeddings``) come from a service's own files; both read them through these checks, so both
accept the same column types (``list<float>``, ``large_list``, ``fixed_size_list`` or Arrow's ``fixed_shape_tensor``,
of float32 or float64) and refuse bad rows with the same messages. Each check takes one run of consecutive rows of one
file and raises ``InputError`` naming the file, the row (its index within that file) and the column. Pure: no reads.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bict_ray.core.columns import as_int64, first_null
from bict_ray.core.columns import where as _where
from bict_ray.errors import GalleryError, InputError
from bict_ray.retrieval.shard import NORM_TOLERANCE
from bict_ray.storage.gallery import UNLABELLED, embeddings_from_column


def check_columns(display: str, schema: pa.Schema, id_column: str, embedding_column: str,
                  label_column: str | None,
                  keys: tuple[str, str, str] = ("--id-column", "--embedding-column", "--label-column")) -> int | None:
    """Check that ``schema`` (of the file ``display``) has the columns with usable types; return the embedding dim
    where the type fixes it, else None (a ``list`` column: checked row by row). ``keys``: how the caller asked for
    the id, embedding and label columns (a command-line flag, a config key), for the message of a missing one."""
    names = schema.names
    for flag, name in zip(keys, (id_column, embedding_column, label_column)):
        if name is not None and name not in names:
            raise InputError(f"{display}: no column {name!r} ({flag}); columns are: {', '.join(names)}")
    id_type = schema.field(id_column).type
    if not pa.types.is_integer(id_type):
        raise InputError(f"{display}, column {id_column!r}: type {id_type}, ids must be integers")
    if label_column is not None:
        label_type = schema.field(label_column).type
        if not (pa.types.is_integer(label_type) or pa.types.is_null(label_type)):
            raise InputError(f"{display}, column {label_column!r}: type {label_type}, labels must be integers")
    dim, problem = vector_type(schema.field(embedding_column).type)
    if problem is not None:
        raise InputError(f"{display}, column {embedding_column!r}: {problem}")
    return dim


def vector_type(kind: pa.DataType) -> tuple[int | None, str | None]:
    """``(dim or None, problem or None)`` of an embedding column type: the dim where the type fixes it (fixed-size
    list, tensor types), None for a ``list``; a problem for any other type or non-float values."""
    if isinstance(kind, pa.BaseExtensionType):
        shape = getattr(kind, "shape", None)
        if shape is None or len(shape) != 1:
            return None, f"type {kind} holds tensors of shape {shape}, expected 1-D vectors"
        dim = int(shape[0])
        value = getattr(kind, "value_type", None) or getattr(kind.storage_type, "value_type", None)
    elif pa.types.is_fixed_size_list(kind):
        dim, value = kind.list_size, kind.value_type
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        dim, value = None, kind.value_type
    else:
        return None, (f"type {kind} is not a vector type (list<float>, fixed_size_list<float>[d] or "
                      "fixed_shape_tensor)")
    if value is None or not pa.types.is_floating(value):
        return None, f"type {kind}: embedding values must be float32 or float64, got {value}"
    if dim == 0:
        return None, f"type {kind}: empty vectors"
    return dim, None


def first_row_dim(values, display: str, column: str) -> int:
    """The dim of a ``list`` column, whose type does not fix it, as its first row (row 0 of ``display``) has it:
    the rows after it are checked against that."""
    storage = vector_storage(values)
    if storage.null_count and storage.is_null()[0].as_py():
        raise InputError(f"{_where(display, 0, column)}: null embedding")
    dim = int(pc.list_value_length(storage)[0].as_py())
    if dim == 0:
        raise InputError(f"{_where(display, 0, column)}: empty embedding (0 values)")
    return dim


def check_ids(values, display: str, first_row: int, column: str) -> np.ndarray:
    """Ids (an Arrow or numpy integer column of rows ``first_row ...`` of ``display``) as int64; raises for a
    null id or one beyond int64."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        row = first_null(values)
        if row is not None:
            raise InputError(f"{_where(display, first_row + row, column)}: null id")
    return as_int64(values, display, first_row, column, "id")


def check_labels(values, display: str, first_row: int, column: str) -> np.ndarray:
    """Labels as int64, null -> ``UNLABELLED``; raises for a label below -1."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        if pa.types.is_null(values.type):
            return np.full(len(values), UNLABELLED, dtype=np.int64)
        values = pc.fill_null(values, UNLABELLED).to_numpy()
    values = as_int64(values, display, first_row, column, "label")
    bad = np.flatnonzero(values < UNLABELLED)
    if len(bad):
        raise InputError(f"{_where(display, first_row + int(bad[0]), column)}: label {values[bad[0]]}; labels "
                         f"must be >= 0, or {UNLABELLED} or null for unlabelled")
    return values


def check_embeddings(values, display: str, first_row: int, column: str, *, dim: int, reference: str,
                     normalise: bool) -> np.ndarray:
    """The rows' embeddings (an Arrow vector column or an (n, d) numpy array) as (n, dim) float32 unit rows.

    Raises naming the first bad row: a null, a row of another dim than ``dim`` (found at ``reference``), NaN or Inf,
    a zero vector, or (without ``normalise``) a norm further than ``NORM_TOLERANCE`` from 1. With ``normalise``
    each row is scaled to unit length."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        storage = vector_storage(values)
        row = first_null(storage)
        if row is not None:
            raise InputError(f"{_where(display, first_row + row, column)}: null embedding")
        lengths = pc.list_value_length(storage).to_numpy()
        wrong = np.flatnonzero(lengths != dim)
        if len(wrong):
            row = int(wrong[0])
            raise InputError(f"{_where(display, first_row + row, column)}: embedding has {lengths[row]} values, "
                             f"expected {dim} (the dim of {reference})")
    elif np.ndim(values) != 2 or np.shape(values)[1] != dim:
        raise InputError(f"{display}, rows from {first_row}, column {column!r}: embeddings of shape "
                         f"{np.shape(values)}, expected (n, {dim})")
    try:
        embeddings = embeddings_from_column(values)  # float64 -> float32
    except GalleryError as err:
        raise InputError(f"{display}, rows from {first_row}, column {column!r}: {err}") from None
    finite = np.isfinite(embeddings).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise InputError(f"{_where(display, first_row + row, column)}: embedding holds NaN or Inf (or a value "
                         "beyond float32's range)")
    norms = np.linalg.norm(embeddings.astype(np.float64), axis=1)
    zero = np.flatnonzero(norms == 0)
    if len(zero):
        raise InputError(f"{_where(display, first_row + int(zero[0]), column)}: zero vector (it has no direction "
                         "to retrieve by)")
    if normalise:
        return (embeddings / norms[:, None]).astype(np.float32)
    # as GalleryWriter checks a normalised gallery's rows: float32 norms
    off = np.flatnonzero(np.abs(np.linalg.norm(embeddings, axis=1) - 1) > NORM_TOLERANCE)
    if len(off):
        row = int(off[0])
        raise InputError(f"{_where(display, first_row + row, column)}: embedding has L2 norm {norms[row]:.6g}, "
                         f"not 1 (tolerance {NORM_TOLERANCE}); pass --normalise (normalise=True) to scale every row "
                         "to unit length")
    return embeddings


def vector_storage(values) -> pa.Array:
    """An Arrow vector column as one list-typed array (extension types by their storage)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if isinstance(values.type, pa.BaseExtensionType):
        values = values.storage
    return values
