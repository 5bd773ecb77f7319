"""The embedding column: how a gallery stores its float32 rows in Arrow, and how any vector column a user brings is
read back as an (N, dim) array. Plain pyarrow and numpy; the gallery format (``bict_ray.storage.gallery``) and the
configuration (``gallery.embedding_encoding``) both take their choices from here.

``"binary"`` (the default) stores each row as ``fixed_size_binary(4 * dim)``, its float32 values little-endian:
Parquet writes and reads it several times faster than a list type, which it writes with a definition level per value
(measured: BENCHMARKS.md, section "Gallery I/O"). ``"tensor"`` stores Arrow's ``fixed_shape_tensor``, which plain
pyarrow and Ray Data read back as (N, dim) arrays without this package.
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bict_ray.errors import GalleryError

ENCODINGS = ("binary", "tensor")
"""How the embedding column is stored: ``fixed_size_binary(4 * dim)`` of little-endian float32 (fast), or Arrow's
``fixed_shape_tensor`` (read back as (N, dim) arrays by plain pyarrow and Ray Data)."""
DEFAULT_ENCODING = "binary"
# The metadata of a binary embedding column: what its bytes are, for a reader who finds the file alone.
_BINARY_METADATA = {b"bict_ray.embedding": b"float32 little-endian, dim values a row"}


def embedding_field(dim: int, encoding: str = DEFAULT_ENCODING) -> pa.Field:
    """The ``embedding`` field of a gallery shard of ``dim``-dimensional rows stored with ``encoding``."""
    if encoding == "binary":
        return pa.field("embedding", pa.binary(4 * dim), nullable=False, metadata=_BINARY_METADATA)
    if encoding == "tensor":
        return pa.field("embedding", pa.fixed_shape_tensor(pa.float32(), [dim]), nullable=False)
    raise GalleryError(f"embedding encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")


def embedding_array(embeddings: np.ndarray, encoding: str = DEFAULT_ENCODING) -> pa.Array:
    """(n, dim) C-contiguous float32 rows as an Arrow array of ``embedding_field(dim, encoding)``'s type."""
    n, dim = embeddings.shape
    if encoding == "binary":
        # the rows' bytes as they are in memory, no copy; little-endian whatever the machine
        values = embeddings if sys.byteorder == "little" else embeddings.astype("<f4")
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(4 * dim), n, [None, pa.py_buffer(values)])
    if encoding == "tensor":
        return pa.FixedShapeTensorArray.from_numpy_ndarray(embeddings)
    raise GalleryError(f"embedding encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")


def embeddings_from_column(column) -> np.ndarray:
    """An embedding column as an (n, d) float32 C-contiguous array.

    Accepts a gallery's binary column (``fixed_size_binary(4 * d)``, little-endian float32: a view of its
    bytes, not a copy), Arrow's ``fixed_shape_tensor``, Ray's tensor extension types, ``fixed_size_list``,
    ``list`` / ``large_list`` with rows of equal length (Arrow arrays or chunked arrays), and numpy
    arrays: numeric (n, d) or object (n,) arrays of 1-D vectors (as Ray Data hands out list columns).
    Raises ``GalleryError`` for nulls, ragged rows, multi-dimensional tensors or non-float values.
    """
    if isinstance(column, np.ndarray):
        return _embeddings_from_numpy(column)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if not isinstance(column, pa.Array):
        raise GalleryError(f"embedding column must be an Arrow or numpy array, got {type(column).__name__}")
    if column.null_count:
        raise GalleryError(f"embedding column has {column.null_count} null rows")
    if pa.types.is_fixed_size_binary(column.type):
        width = column.type.byte_width
        if width % 4:
            raise GalleryError(f"binary embedding column of {width} bytes a row: not a whole number of float32s")
        values = np.frombuffer(column.buffers()[1], dtype="<f4", count=len(column) * width // 4,
                               offset=column.offset * width)
        return values.reshape(len(column), width // 4).astype(np.float32, copy=False)
    if isinstance(column.type, pa.BaseExtensionType):
        shape = getattr(column.type, "shape", None)
        if shape is not None and len(shape) != 1:
            raise GalleryError(f"embedding column holds tensors of shape {list(shape)}, expected 1-D vectors")
        column = column.storage
    kind = column.type
    if not (pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        raise GalleryError(f"embedding column type {column.type} is not a vector type")
    if not pa.types.is_floating(column.type.value_type):
        raise GalleryError(f"embedding values must be floating point, got {column.type.value_type}")
    n = len(column)
    if n == 0:
        return np.zeros((0, getattr(column.type, "list_size", 0)), dtype=np.float32)
    lengths = pc.list_value_length(column)
    d = pc.min(lengths).as_py()
    if pc.max(lengths).as_py() != d:
        raise GalleryError(f"embedding rows have mixed dims ({d} to {pc.max(lengths).as_py()})")
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values.reshape(n, d), dtype=np.float32)


def _embeddings_from_numpy(array: np.ndarray) -> np.ndarray:
    if array.dtype == object:
        rows = [np.asarray(row) for row in array]
        dims = {row.shape for row in rows}
        if len(dims) > 1 or any(len(shape) != 1 for shape in dims):
            raise GalleryError(f"embedding rows have mixed or non-vector shapes {sorted(dims)}")
        array = np.stack(rows) if rows else np.zeros((0, 0))
    if array.ndim != 2:
        raise GalleryError(f"embeddings must be (n, d), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise GalleryError(f"embedding values must be floating point, got {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)
