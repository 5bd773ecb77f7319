"""The row checks of the tables users bring, shared by the two kinds the project reads: image tables
(``bict_ray.core.image_table``) and embedding tables (``bict_ray.storage.tables``). A problem is named by file, row
and column, in the same words for both. Plain pyarrow and numpy."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from bict_ray.errors import InputError

INT64_MAX = np.iinfo(np.int64).max


def where(display: str, row: int, column: str) -> str:
    """``file, row R, column 'C'``: where a message points."""
    return f"{display}, row {row}, column {column!r}"


def first_null(values: pa.Array | pa.ChunkedArray) -> int | None:
    """The index of the first null of an Arrow column, None when it has none."""
    if not values.null_count:
        return None
    return int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])


def as_int64(values, display: str, first_row: int, column: str, what: str,
             error: type[Exception] = InputError) -> np.ndarray:
    """An integer column (numpy, or Arrow without nulls) of rows ``first_row ...`` of ``display`` as int64; raises
    ``error`` naming the column for a non-integer type, and the row for a value beyond int64 (a uint64 column may
    hold one)."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = values.to_numpy()
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.integer):
        raise error(f"{display}, column {column!r}: {what}s must be integers, got {values.dtype}")
    if values.dtype == np.uint64 and len(values) and values.max() > INT64_MAX:
        row = int(np.flatnonzero(values > INT64_MAX)[0])
        raise error(f"{where(display, first_row + row, column)}: {what} {values[row]} does not fit int64")
    return values.astype(np.int64)
