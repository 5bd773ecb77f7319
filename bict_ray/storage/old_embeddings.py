"""The old model's embeddings of the training images, as a service kept them, aligned to the training set.

A service that cannot hand over phi_old itself can still hand over what phi_old computed: ``old_model.kind:
embeddings`` (``bict_ray.config.OldModelConfig``) names one Parquet file with an id column and an embedding column
(``list<float>``, ``list<double>``, ``large_list``, ``fixed_size_list`` or Arrow's ``fixed_shape_tensor``). The
training pipeline will use ``load_old_embeddings(cfg, train.ids)`` where it would run phi_1 on the training
images: the rows, in the training set's order, are the ``ref_emb`` of the compat losses and the samples of
``bict_ray.core.external.class_mean_classifier``. With no model there is nothing to embed a new image with, so the
run has no phi_old for anything but these images.

Only the two columns are read, in batches, so the file may hold the service's whole catalogue: rows whose id is not a
training image's are checked and dropped. Rows are checked as ``bict_ray.distributed.import_gallery`` checks an
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
    if cfg.kind != "embeddings":
        raise InputError(f"old_model.kind={cfg.kind!r}: load_old_embeddings reads old_model.kind=embeddings")
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"ids must be a 1-D integer array (the training set's ids), got {ids.dtype} {ids.shape}")
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

    # each training id's slot in ``wanted`` (sorted, unique), so a file row finds its slot by binary search
    wanted, slot_of = np.unique(ids.astype(np.int64), return_inverse=True)
    found = np.zeros(len(wanted), dtype=bool)
    rows: np.ndarray | None = None
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
                         f"{pair[1]}; each training image needs one old embedding")
    missing = wanted[~found]
    if len(missing):
        shown = ", ".join(str(int(i)) for i in missing[:SHOWN_IDS]) + (", ..." if len(missing) > SHOWN_IDS else "")
        raise InputError(f"{display}, column {cfg.id_column!r}: {len(missing)} of the {len(wanted)} training images "
                         f"have no row (ids {shown}); the file must hold an old embedding of every training image")
    if rows is None:  # an empty file and no training ids
        return np.zeros((0, dim or 0), dtype=np.float32)
    return rows[slot_of]
