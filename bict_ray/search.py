"""Exact inner-product search (faiss) and the merge of per-shard top-k lists.

Embeddings are (N, D) float32 and L2-normalised, so the inner product is the cosine similarity.
Every ranking here follows one rule: score descending, ties broken by gallery id ascending (by gallery
position when no ids are given). faiss alone leaves tied items in arbitrary order and may keep any of the
items tied at the k-th place; `exact_search` repairs both, so that per-shard top-k lists merged with
`merge_topk` equal the top-k over the whole gallery.

Scores come from faiss's exhaustive search (the kernel behind `IndexFlatIP`), called without building an
index so that the gallery is not copied. On this stack faiss gives a pair the same float32 score whatever
the block or shard it is searched in, which is what makes sharded and in-memory results agree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import faiss
import numpy as np


def exact_search(
    query: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    gallery_ids: np.ndarray | None = None,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery items of each query by inner product, exactly.

    query: (Q, D) float32, L2-normalised. gallery: (G, D) float32, L2-normalised.
    k: wanted list length; clamped to G (a gallery of G items has no k-th item beyond G).
    gallery_ids: (G,) integer, unique; only decides the order of tied scores (position when None).
    threads: faiss OpenMP threads for this call (the previous setting is restored afterwards). Set it
        when Ray workers or torch share the cores: competing thread pools run slower than one thread.
    Returns scores (Q, min(k, G)) float32, best first, and indices (Q, min(k, G)) int64, positions in
    `gallery`.
    """
    check_embeddings("query", query)
    check_embeddings("gallery", gallery)
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query dim {query.shape[1]} does not match gallery dim {gallery.shape[1]}"
        )
    check_positive_int("k", k)
    if threads is not None:
        check_positive_int("threads", threads)
    tie_key = np.arange(len(gallery), dtype=np.int64)
    if gallery_ids is not None:
        tie_key = check_ids("gallery_ids", gallery_ids, len(gallery))
    with _faiss_threads(threads), _faiss_blocks():
        return _search_tie_exact(query, gallery, min(int(k), len(gallery)), tie_key)


def merge_topk(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists into the global top-k.

    parts: (scores (Q, k_i) float32, ids (Q, k_i) int64) per shard, ids global gallery ids. A padding
        entry has score -inf and sorts last.
    Returns scores (Q, min(k, sum k_i)) float32 and ids (Q, min(k, sum k_i)) int64, ranked by score
    descending and id ascending: the same lists as one search over the union of the shards.
    """
    if not parts:
        raise ValueError("merge_topk needs at least one part")
    scores, ids, order = merge_order([s for s, _ in parts], [i for _, i in parts], k)
    return (
        np.take_along_axis(scores, order, axis=1),
        np.take_along_axis(ids, order, axis=1),
    )


def query_blocks(num_queries: int, rows_per_block: int) -> Iterator[slice]:
    """Consecutive row slices of at most `rows_per_block` rows covering `num_queries` queries."""
    for start in range(0, num_queries, rows_per_block):
        yield slice(start, min(start + rows_per_block, num_queries))


def rows_per_block(num_gallery: int, max_elements: int) -> int:
    """How many query rows keep a (rows, num_gallery) score block within `max_elements` (at least 1)."""
    return max(1, max_elements // max(1, num_gallery))


def merge_order(
    scores_parts: Sequence[np.ndarray], ids_parts: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate per-shard lists and rank them: returns scores (Q, n), ids (Q, n) and the column
    order (Q, min(k, n)) of the merged top-k (score descending, id ascending)."""
    check_positive_int("k", k)
    num_queries = scores_parts[0].shape[0]
    for i, (s, ids) in enumerate(zip(scores_parts, ids_parts, strict=True)):
        if s.ndim != 2 or s.shape[0] != num_queries or s.shape != ids.shape:
            raise ValueError(
                f"part {i}: scores {s.shape} and ids {ids.shape} must both be ({num_queries}, k_i)"
            )
    scores = np.concatenate(scores_parts, axis=1)
    ids = np.concatenate(ids_parts, axis=1)
    order = _rank_rows(scores, ids)[:, : min(int(k), scores.shape[1])]
    return scores, ids, order


def check_positive_int(name: str, value) -> int:
    """Refuse anything but an integer >= 1 (bools included), naming `name`; returns it as int."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_embeddings(name: str, x: np.ndarray) -> None:
    """Refuse anything but a finite (N, D) float32 array (D >= 1), naming `name` in the error."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N, D) with D >= 1, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def check_ids(name: str, ids: np.ndarray, length: int) -> np.ndarray:
    """Validate unique integer ids of the given length; returns them as an int64 array."""
    ids = check_integer_vector(name, ids, length)
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{name} must be unique")
    return ids


def check_integer_vector(name: str, values: np.ndarray, length: int) -> np.ndarray:
    """Validate a (length,) integer array; returns it as int64."""
    values = np.asarray(values)
    if values.ndim != 1 or len(values) != length:
        raise ValueError(f"{name} must have shape ({length},), got {values.shape}")
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got {values.dtype}")
    return values.astype(np.int64, copy=False)


def _search_tie_exact(
    query: np.ndarray, gallery: np.ndarray, k: int, tie_key: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    num_queries, num_gallery = len(query), len(gallery)
    scores = np.empty((num_queries, k), dtype=np.float32)
    indices = np.empty((num_queries, k), dtype=np.int64)
    if k == 0:
        return scores, indices
    gallery = np.ascontiguousarray(gallery)
    rows = np.arange(num_queries)
    depth = min(k + 1, num_gallery)
    while rows.size:
        sub_scores, sub_indices = faiss.knn(
            np.ascontiguousarray(query[rows]),
            gallery,
            depth,
            metric=faiss.METRIC_INNER_PRODUCT,
        )
        # The list settles the top k only when it holds every item tied with the k-th score: its last
        # score must be lower, or it must hold the whole gallery. Rows with a tie across the cut are
        # searched again, deeper (rare outside duplicated embeddings).
        settled = (
            np.ones(len(rows), dtype=bool)
            if depth == num_gallery
            else sub_scores[:, depth - 1] < sub_scores[:, k - 1]
        )
        order = _rank_rows(sub_scores[settled], tie_key[sub_indices[settled]])[:, :k]
        scores[rows[settled]] = np.take_along_axis(sub_scores[settled], order, axis=1)
        indices[rows[settled]] = np.take_along_axis(sub_indices[settled], order, axis=1)
        rows = rows[~settled]
        depth = min(2 * depth, num_gallery)
    return scores, indices


def _rank_rows(scores: np.ndarray, tie_key: np.ndarray) -> np.ndarray:
    """Per-row column order: score descending, then tie_key ascending. (Q, n) -> (Q, n) int64."""
    return np.lexsort((tie_key, -scores), axis=-1)


# faiss scores a block of queries against a block of gallery rows with one sgemm, then keeps each query's top k.
# Its default gallery block (1,024 rows) leaves the sgemm short: 10k queries x 100k x 256 on 2 cores reached
# 0.69-0.71 of the machine's sgemm rate; 4,096 rows (a 64 MB score block with 4,096 queries) reached 0.78-0.80.
FAISS_DATABASE_BLOCK = 4096


@contextlib.contextmanager
def _faiss_blocks() -> Iterator[None]:
    previous = faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_database_bs = FAISS_DATABASE_BLOCK
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_database_bs = previous


@contextlib.contextmanager
def _faiss_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)
