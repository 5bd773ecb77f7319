"""The old model's embeddings, as a service kept them: what stands for phi_old when the model itself is gone.

``old_model.kind: embeddings`` (``bict_ray.config.OldModelConfig``) names one Parquet file with an id column and an
embedding column (``list<float>``, ``list<double>``, ``large_list``, ``fixed_size_list`` or Arrow's
``fixed_shape_tensor``). A run reads it whole (``read_old_embeddings``) into ``bict_ray.core.external.OldEmbeddings``,
the table phi_1's embeddings of an image are looked up in by id; ``load_old_embeddings(cfg, ids)`` gives the rows of
some images, in their order. With no model there is nothing to embed a new image with, so no image outside the
file has a phi_old embedding.

Only the two columns are read, in batches. Rows are checked as ``bict_ray.distributed.import_gallery`` checks an
imported gallery (``bict_ray.storage.tables``), and scaled to unit length (the service's may not be).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bict_ray.errors import InputError
from bict_ray.storage.gallery import first_duplicate
from bict_ray.storage.tables import check_columns, check_embeddings, check_ids, first_row_dim

if TYPE_CHECKING:
    from bict_ray.config import OldModelConfig

# Rows per read batch: what bounds the memory beside the (len(ids), D) result
READ_BATCH_ROWS = 65536
# Missing ids shown in a message (with the count of all of them)
SHOWN_IDS = 5


def load_old_embeddings(cfg: OldModelConfig, ids: np.ndarray) -> np.ndarray:
    """phi_old's embeddings of the training images ``ids`` (``ImageSet.ids``) from ``cfg.path``:
    (len(ids), D) float32, L2-normalised, row i that of ``ids[i]``.

    Raises ``InputError`` naming the file, and the column and row where there is one: a missing file or column
    (listing the columns that exist), a column of the wrong type, a training id with no row (how many, and the first
    few), an id on two rows, a null, a row of another dim, NaN/Inf or a zero vector. Rows for ids beyond the
    training set are fine.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"ids must be a 1-D integer array (the training set's ids), got {ids.dtype} {ids.shape}")
    # each training id's slot in ``wanted`` (sorted, unique), so a file row finds its slot by binary search
    wanted, slot_of = np.unique(ids.astype(np.int64), return_inverse=True)
    _, rows = _scan(cfg, wanted)
    return rows[slot_of]


def read_old_embeddings(cfg: OldModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Every row of ``cfg.path``: (ids (N,) int64 sorted, embeddings (N, D) float32 L2-normalised), checked as
    ``load_old_embeddings`` checks them. What a run whose old model is only its embeddings looks images up in
    (``bict_ray.core.external.OldEmbeddings``): all of the file is held in memory."""
    return _scan(cfg, None)


def _scan(cfg: OldModelConfig, wanted: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, rows) of the file's rows whose id is in ``wanted`` (sorted, unique; each must have a row), or of every
    row (None), sorted by id; every row of the file is checked either way."""
    if cfg.kind != "embeddings":
        raise InputError(f"old_model.kind={cfg.kind!r}: the old model's embeddings are read for "
                         "old_model.kind=embeddings")
    display = os.path.abspath(cfg.path)
    if not os.path.isfile(display):
        raise InputError(f"old_model.path {display}: no such file")
    try:
        file = pq.ParquetFile(display)
        schema = file.schema_arrow
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"old_model.path {display}: not a readable Parquet file ({err})") from None
    dim = check_columns(display, schema, cfg.id_column, cfg.embedding_column, None,
                        keys=("old_model.id_column", "old_model.embedding_column", None))
    reference = f"{display}, column {cfg.embedding_column!r} (type {schema.field(cfg.embedding_column).type})"

    found = None if wanted is None else np.zeros(len(wanted), dtype=bool)
    rows: np.ndarray | None = None
    kept: list[np.ndarray] = []  # every row's embedding, when all are wanted
    file_ids, start = [], 0
    try:
        batches = file.iter_batches(batch_size=READ_BATCH_ROWS, columns=[cfg.id_column, cfg.embedding_column],
                                    use_threads=False)
        for batch in batches:
            vectors = batch.column(cfg.embedding_column)
            if dim is None:  # a list column: its first row sets the dim
                dim, reference = first_row_dim(vectors, display, cfg.embedding_column), f"{display}, row 0"
            batch_ids = check_ids(batch.column(cfg.id_column), display, start, cfg.id_column)
            embeddings = check_embeddings(vectors, display, start, cfg.embedding_column, dim=dim,
                                          reference=reference, normalise=True)
            if wanted is None:
                kept.append(embeddings)
            else:
                if rows is None:
                    rows = np.zeros((len(wanted), dim), dtype=np.float32)
                slot = np.searchsorted(wanted, batch_ids).clip(max=max(len(wanted) - 1, 0))
                hit = wanted[slot] == batch_ids if len(wanted) else np.zeros(len(batch_ids), dtype=bool)
                rows[slot[hit]] = embeddings[hit]
                found[slot[hit]] = True
            file_ids.append(batch_ids)
            start += batch.num_rows
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"old_model.path {display}: cannot read rows from {start} ({err})") from None

    all_ids = np.concatenate(file_ids) if file_ids else np.empty(0, np.int64)
    pair = first_duplicate(all_ids)
    if pair is not None:
        raise InputError(f"{display}, column {cfg.id_column!r}: id {int(all_ids[pair[0]])} is on rows {pair[0]} and "
                         f"{pair[1]}; each image needs one old embedding")
    if wanted is None:
        order = np.argsort(all_ids, kind="stable")
        embeddings = np.concatenate(kept) if kept else np.zeros((0, dim or 0), dtype=np.float32)
        return all_ids[order], embeddings[order]
    missing = wanted[~found]
    if len(missing):
        shown = ", ".join(str(int(i)) for i in missing[:SHOWN_IDS]) + (", ..." if len(missing) > SHOWN_IDS else "")
        raise InputError(f"{display}, column {cfg.id_column!r}: {len(missing)} of the {len(wanted)} training images "
                         f"have no row (ids {shown}); the file must hold an old embedding of every training image")
    if rows is None:  # an empty file and no training ids
        rows = np.zeros((0, dim or 0), dtype=np.float32)
    return wanted, rows
