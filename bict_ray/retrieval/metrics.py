"""Retrieval metrics: mAP and Recall@k (CMC top-k), over a gallery in memory or in shards.

Conventions shared by every function here:

- Embeddings are (N, D) float32, L2-normalised; a query scores a gallery item by inner product.
- Ranking: score descending, ties broken by gallery id ascending (gallery position when no ids are given).
- Self-exclusion: a gallery item whose id equals the query's id (the same image, embedded by another
  model) is removed from that query's ranking entirely.
- A positive is a remaining gallery item with the query's label; P is their number. Queries with P = 0
  are left out of every mean and counted in "num_queries_without_positive".
- AP = (1/P) * sum_j j / rank_j over the positives in rank order: exact, over the whole gallery.
  AP@k = sum_{i<=k} precision(i) * rel(i) / min(P, k): mAP@k, for galleries too large for exact AP.
- R@k: the fraction of queries with at least one positive among their top k (CMC top-k).
- Results are a dict of fractions in [0, 1]: "mAP" (mAP@map_at when map_at is set), "R@<k>" for each k,
  plus "num_queries" (evaluated) and "num_queries_without_positive".

Sharded evaluation. The gallery is split into shards (embeddings, labels, ids; ids unique across the
whole gallery) that never need to be in memory together. Each function below takes one shard and
returns a small picklable result; the driver combines them:

- mAP@k (map_at set), one pass: `shard_topk` per shard -> `merge_shard_topk` -> `metrics_from_topk`.
- exact mAP (map_at None), two passes: `shard_positives` per shard -> `merge_positives`; then
  `shard_rank_counts` per shard, given the merged positives -> sum -> `metrics_from_ranks`.
  The merged positives hold every (query, positive) pair, 12 bytes each: that bounds where exact mAP fits.

The one driver of those passes is `bict_ray.retrieval.sharded.sharded_retrieval_metrics` (in this process, or on
Ray Data through `bict_ray.distributed.evaluate`); `retrieval_metrics` is the in-memory path.
Both give the same numbers. In mAP@k mode the scores come from `exact_search`, which scores a pair
identically in any block or shard. In exact mode they come from a BLAS matmul, whose last bit can depend on the block
shape, so two items within one float32 ulp of each other may swap between the two paths.

Exact mode ranks with a compiled kernel (`_ranks.cpp`, built at install): per score row it sorts the row's
positives, not the row, into fine score buckets and places every item among them in one pass, comparing scores and
ids exactly only inside a positive's bucket (O(W + P) a row). Pass 1 over shards scores only the pairs of one class.
Where the kernel was not built, numpy sorts every score row by integer keys by radix (`_sort_order`): one pass over
a 16-bit score bucket, or two over the exact score for rows too wide for 16 bits, comparing scores and ids only
between entries that share a key (`_key_corrections`). Both give the same numbers.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from bict_ray.retrieval.search import (
    check_embeddings,
    check_ids,
    check_integer_vector,
    check_positive_int,
    default_threads,
    exact_search,
    merge_order,
    query_blocks,
    rows_per_block,
)
from bict_ray.errors import InputError

# Best rank of a query none of whose positives is within reach (beyond the top-k list).
NO_HIT = np.iinfo(np.int64).max
# Query rows x gallery items per score block: about 20 MB of working memory in exact mode, small enough
# to stay in cache while a block is ranked.
_BLOCK_ELEMENTS = 1 << 20
# Exact mode scores up to this many rows per matmul, within _MATMUL_ELEMENTS (64 MB of scores): BLAS
# needs some hundred rows to run near its peak once the gallery spills the cache.
_MATMUL_ROWS = 256
_MATMUL_ELEMENTS = 1 << 24
# Rows up to this width sort in one radix pass over a 16-bit score bucket; wider rows would crowd the
# buckets (and their exact comparisons) and sort in two passes over the exact score instead.
_ONE_PASS_WIDTH = 1 << 15
# Entries sharing a score bucket are compared pairwise. A block where most positives share their bucket,
# or one's bucket runs on past _MAX_RUN entries on a side (exact ties: duplicates, collapsed embeddings),
# is sorted by exact keys instead.
_MAX_RUN = 16


def _dense_id_span(size: int) -> int:
    """The widest id range that `_ShardIndex` looks up through a table of positions (8 bytes an id of the range):
    16 per item, or 8 MB, whichever is larger; sparser ids are found by binary search."""
    return max(16 * size, 1 << 20)


@dataclass(frozen=True, eq=False)
class ShardTopK:
    """Each query's top-k gallery items in one shard, or merged over shards.

    scores (Q, n) float32, best first; -inf marks padding where fewer than `depth` items exist.
    ids (Q, n) int64 and labels (Q, n) int64 of those items (-1 in padding).
    num_positives (Q,) int64: the query's positives in the whole shard(s), self excluded.
    depth: the k the lists were asked for (n <= depth when the gallery is smaller).
    """

    scores: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    num_positives: np.ndarray
    depth: int


@dataclass(frozen=True, eq=False)
class QueryPositives:
    """Every query's positives as a CSR table: query q owns entries offsets[q]:offsets[q + 1].

    offsets (Q + 1,) int64; scores (P,) float32 query-positive scores; ids (P,) int64 gallery ids.
    """

    offsets: np.ndarray
    scores: np.ndarray
    ids: np.ndarray

    @property
    def num_queries(self) -> int:
        return len(self.offsets) - 1


def retrieval_metrics(
    query: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    *,
    query_ids: np.ndarray | None = None,
    gallery_ids: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
    map_at: int | None = None,
) -> dict:
    """mAP and R@k of `query` (Q, D) float32 against `gallery` (G, D) float32, both L2-normalised.

    query_labels (Q,), gallery_labels (G,): integer class labels.
    query_ids (Q,), gallery_ids (G,): integer sample ids. A gallery item with the query's id is excluded
        from that query's ranking; query_ids therefore need gallery_ids. gallery_ids (unique) also break
        score ties; without them the gallery position does.
    ks: cut-offs for R@k. map_at: None for exact mAP over the whole gallery, else mAP@map_at.
    Returns {"mAP", "R@<k>" per k, "num_queries", "num_queries_without_positive"} (see module doc).
    Works on query blocks, so memory stays bounded for large Q x G.
    """
    ks, map_at = check_cutoffs(ks, map_at)
    query_labels, query_ids = check_queries(query, query_labels, query_ids)
    if query_ids is not None and gallery_ids is None:
        raise InputError("query_ids need gallery_ids: self-exclusion compares the two")
    if gallery_ids is None:
        gallery_ids = np.arange(len(gallery), dtype=np.int64)
    shard = _ShardIndex.checked(query.shape[1], gallery, gallery_labels, gallery_ids, "gallery")
    if map_at is not None:
        topk = _shard_topk(query, query_labels, query_ids, shard, topk_depth(ks, map_at), None)
        return _summarise(*_per_query_from_topk(topk, query_labels, map_at), topk.num_positives, ks)
    query_codes, shard_codes = _label_codes(query_labels, shard.labels)
    kernel = _rank_kernel()
    if kernel is None:
        parts = [
            _exact_block(scores, query_codes[block], shard_codes, shard, _own_columns(shard, query_ids, block))
            for block, scores in _score_blocks(query, shard.emb)
        ]
    else:
        query_codes, shard_codes = query_codes.astype(np.int32), shard_codes.astype(np.int32)
        parts = [
            kernel.exact_ap(scores, shard.ids, shard_codes, query_codes[block], _own_columns(shard, query_ids, block))
            for block, scores in _score_blocks(query, shard.emb, ranked_in_cache=False)
        ]
    return _summarise(*(np.concatenate(column) for column in zip(*parts)), ks)


def shard_topk(
    query: np.ndarray,
    query_labels: np.ndarray,
    shard_emb: np.ndarray,
    shard_labels: np.ndarray,
    shard_ids: np.ndarray,
    k: int,
    *,
    query_ids: np.ndarray | None = None,
    threads: int | None = None,
) -> ShardTopK:
    """mAP@k pass over one shard: each query's top-k in the shard (self excluded) and its positive count.

    query (Q, D) float32; shard_emb (G_s, D) float32; labels and ids integer vectors; k >= max(ks, map_at).
    threads: search threads (see `exact_search`).
    """
    query_labels, query_ids = check_queries(query, query_labels, query_ids)
    shard = _ShardIndex.checked(query.shape[1], shard_emb, shard_labels, shard_ids, "shard")
    return _shard_topk(query, query_labels, query_ids, shard, check_positive_int("k", k), threads)


def merge_shard_topk(parts: Sequence[ShardTopK], k: int) -> ShardTopK:
    """Merge per-shard `ShardTopK` results (same queries) into the top-k over all their shards."""
    if not parts:
        raise InputError("merge_shard_topk needs at least one part")
    scores, ids, order = merge_order([p.scores for p in parts], [p.ids for p in parts], k)
    labels = np.concatenate([p.labels for p in parts], axis=1)
    return ShardTopK(
        scores=np.take_along_axis(scores, order, axis=1),
        ids=np.take_along_axis(ids, order, axis=1),
        labels=np.take_along_axis(labels, order, axis=1),
        num_positives=np.sum([p.num_positives for p in parts], axis=0),
        depth=min([int(k)] + [p.depth for p in parts]),
    )


def metrics_from_topk(
    topk: ShardTopK, query_labels: np.ndarray, ks: Sequence[int] = (1, 5, 10), map_at: int | None = None
) -> dict:
    """mAP@map_at and R@k from merged top-k lists (see module doc for the result)."""
    ks, map_at = check_cutoffs(ks, map_at)
    if map_at is None:
        raise InputError(
            "exact mAP needs every positive's rank: use shard_positives/shard_rank_counts, or set map_at"
        )
    if topk.depth < topk_depth(ks, map_at):
        raise InputError(
            f"top-k lists of depth {topk.depth} cannot give R@{max(ks, default=1)} and mAP@{map_at}"
        )
    query_labels = check_integer_vector("query_labels", query_labels, len(topk.scores))
    return _summarise(*_per_query_from_topk(topk, query_labels, map_at), topk.num_positives, ks)


def shard_positives(
    query: np.ndarray,
    query_labels: np.ndarray,
    shard_emb: np.ndarray,
    shard_labels: np.ndarray,
    shard_ids: np.ndarray,
    *,
    query_ids: np.ndarray | None = None,
) -> QueryPositives:
    """Exact-mAP pass 1 over one shard: each query's positives in it (self excluded) with their scores.

    Only pairs of one class are scored: the queries of each class against the shard's items of that class, a
    tenth of the full matmul with ten classes and less with more (pass 2 scores every pair)."""
    query_labels, query_ids = check_queries(query, query_labels, query_ids)
    shard = _ShardIndex.checked(query.shape[1], shard_emb, shard_labels, shard_ids, "shard")
    offsets = _offsets(_positive_counts(query_labels, query_ids, shard))
    scores = np.empty(offsets[-1], dtype=np.float32)
    ids = np.empty(offsets[-1], dtype=np.int64)
    own = _own_columns(shard, query_ids, slice(0, len(query)))
    classes, item_class = np.unique(shard.labels, return_inverse=True)
    item_order = np.argsort(item_class, kind="stable")
    item_bounds = _offsets(np.bincount(item_class, minlength=len(classes)))
    emb_by_class, ids_by_class = shard.emb[item_order], shard.ids[item_order]
    query_class = np.searchsorted(classes, query_labels)
    query_class[~np.isin(query_labels, classes)] = -1
    query_order = np.argsort(query_class, kind="stable")
    query_bounds = np.searchsorted(query_class[query_order], np.arange(len(classes) + 1))
    for c in np.flatnonzero(np.diff(query_bounds)):
        items = slice(item_bounds[c], item_bounds[c + 1])
        class_emb, class_ids, class_columns = emb_by_class[items], ids_by_class[items], item_order[items]
        class_queries = query_order[query_bounds[c] : query_bounds[c + 1]]
        for block in query_blocks(len(class_queries), rows_per_block(len(class_ids), _MATMUL_ELEMENTS)):
            rows = class_queries[block]
            block_scores = query[rows] @ class_emb.T
            keep = class_columns[None, :] != own[rows][:, None]
            flat = np.flatnonzero(keep)
            row = flat // len(class_ids)
            kept = keep.sum(axis=1)
            dest = offsets[rows][row] + np.arange(len(flat)) - (np.cumsum(kept) - kept)[row]
            scores[dest] = block_scores.ravel()[flat]
            ids[dest] = class_ids[flat - row * len(class_ids)]
    return QueryPositives(offsets=offsets, scores=scores, ids=ids)


def merge_positives(parts: Sequence[QueryPositives]) -> QueryPositives:
    """Concatenate per-shard positives query by query. The order within a query does not matter to the result;
    with the compiled ranking it is rank order (score descending, id ascending), which spares pass 2 and
    `metrics_from_ranks` their sorts."""
    if not parts:
        raise InputError("merge_positives needs at least one part")
    num_queries = parts[0].num_queries
    if any(p.num_queries != num_queries for p in parts):
        raise InputError(f"positives cover different query counts: {[p.num_queries for p in parts]}")
    counts = np.stack([np.diff(p.offsets) for p in parts])
    offsets = _offsets(counts.sum(axis=0))
    earlier = np.cumsum(counts, axis=0) - counts
    scores = np.empty(offsets[-1], dtype=np.float32)
    ids = np.empty(offsets[-1], dtype=np.int64)
    for part, part_counts, part_earlier in zip(parts, counts, earlier):
        rows = np.repeat(np.arange(num_queries), part_counts)
        within = np.arange(len(part.ids)) - part.offsets[rows]
        dest = offsets[rows] + part_earlier[rows] + within
        scores[dest] = part.scores
        ids[dest] = part.ids
    merged = QueryPositives(offsets=offsets, scores=scores, ids=ids)
    kernel = _rank_kernel()
    if kernel is not None:
        kernel.sort_positives(merged)
    return merged


def shard_rank_counts(
    query: np.ndarray,
    positives: QueryPositives,
    shard_emb: np.ndarray,
    shard_ids: np.ndarray,
    *,
    query_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Exact-mAP pass 2 over one shard: for each merged positive, how many of the shard's items rank
    above it (higher score, or equal score and smaller id; self excluded). Returns (P,) int64; summed
    over shards, plus one, it is the positive's rank in the whole gallery."""
    check_embeddings("query", query)
    if positives.num_queries != len(query):
        raise InputError(f"positives cover {positives.num_queries} queries, query has {len(query)}")
    if query_ids is not None:
        query_ids = check_integer_vector("query_ids", query_ids, len(query))
    shard = _ShardIndex.checked(query.shape[1], shard_emb, None, shard_ids, "shard")
    above = np.empty(len(positives.ids), dtype=np.int64)
    kernel = _rank_kernel()
    if kernel is not None:
        # A positive stored in this shard is compared by the score this pass computes for it (see count_above).
        columns = shard.find(positives.ids)
    for block, scores in _score_blocks(query, shard.emb, ranked_in_cache=kernel is None):
        entries = slice(positives.offsets[block.start], positives.offsets[block.stop])
        own_cols = _own_columns(shard, query_ids, block)
        if kernel is not None:
            above[entries] = kernel.count_above(
                scores, shard.ids, own_cols, positives.offsets[block.start : block.stop + 1],
                positives.scores[entries], positives.ids[entries], columns[entries],
            )
            continue
        rows = np.repeat(np.arange(scores.shape[0]), np.diff(positives.offsets[block.start : block.stop + 1]))
        pos_scores = positives.scores[entries].copy()
        pos_ids = positives.ids[entries]
        # A positive stored in this shard is compared by the score this pass computes for it, so that it
        # never outranks itself even if a BLAS block shape changed its last bit since pass 1.
        cols = shard.find(pos_ids)
        mine = cols >= 0
        pos_scores[mine] = scores[rows[mine], cols[mine]]
        above[entries] = _ranked_above(scores, shard.ids, own_cols, rows, pos_scores, pos_ids)
    return above


def metrics_from_ranks(
    positives: QueryPositives,
    ranks_above: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    map_at: int | None = None,
) -> dict:
    """Exact mAP (mAP@map_at if set) and R@k from each positive's count of gallery items ranked above it
    (`shard_rank_counts` summed over shards). See the module doc for the result."""
    ks, map_at = check_cutoffs(ks, map_at)
    ranks_above = check_integer_vector("ranks_above", ranks_above, len(positives.ids))
    ap, best_rank = _per_query_from_ranks(positives.offsets, ranks_above + 1, map_at)
    return _summarise(ap, best_rank, np.diff(positives.offsets), ks)


class _RankKernel:
    """The compiled exact ranking (`bict_ray/retrieval/_ranks.cpp`) behind a small Python face. Each call ranks a
    block of score rows on `default_threads()` threads; ties and self-exclusion as in the module doc."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        lib.bict_count_above.argtypes = [pointer, size, size, size] + [pointer] * 7 + [size]
        lib.bict_count_above.restype = ctypes.c_int
        lib.bict_exact_ap.argtypes = [pointer, size, size, size] + [pointer] * 4 + [size] + [pointer] * 3 + [size]
        lib.bict_exact_ap.restype = ctypes.c_int
        lib.bict_sort_positives.argtypes = [size] + [pointer] * 3 + [size]
        lib.bict_sort_positives.restype = ctypes.c_int
        self.lib = lib

    def exact_ap(self, scores, ids, codes, query_codes, own_cols) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B,) exact AP, best rank and positive count of each score row (the positives: items of its code)."""
        rows, width = scores.shape
        ap = np.empty(rows, dtype=np.float64)
        best_rank = np.empty(rows, dtype=np.int64)
        counts = np.empty(rows, dtype=np.int64)
        self._check(self.lib.bict_exact_ap(
            scores.ctypes.data, rows, width, _row_stride(scores), ids.ctypes.data, codes.ctypes.data,
            np.ascontiguousarray(query_codes).ctypes.data, np.ascontiguousarray(own_cols).ctypes.data, NO_HIT,
            ap.ctypes.data, best_rank.ctypes.data, counts.ctypes.data, default_threads(),
        ))
        return ap, best_rank, counts

    def count_above(self, scores, ids, own_cols, offsets, needle_scores, needle_ids, needle_cols) -> np.ndarray:
        """For each needle (CSR by score row: ``offsets`` (B + 1,)), the number of items ranked above it; a needle
        with a column (needle_cols >= 0) is compared by the block's score for it."""
        counts = np.empty(len(needle_ids), dtype=np.int64)
        needle_scores, needle_ids, needle_cols = (
            np.ascontiguousarray(a, dtype=t) for a, t in
            ((needle_scores, np.float32), (needle_ids, np.int64), (needle_cols, np.int64))
        )
        self._check(self.lib.bict_count_above(
            scores.ctypes.data, scores.shape[0], scores.shape[1], _row_stride(scores), ids.ctypes.data,
            np.ascontiguousarray(own_cols).ctypes.data, np.ascontiguousarray(offsets).ctypes.data,
            needle_scores.ctypes.data, needle_ids.ctypes.data, needle_cols.ctypes.data, counts.ctypes.data,
            default_threads(),
        ))
        return counts

    def sort_positives(self, positives: QueryPositives) -> None:
        """Put each query's positives into rank order (score descending, id ascending), in place."""
        self._check(self.lib.bict_sort_positives(
            positives.num_queries, positives.offsets.ctypes.data, positives.scores.ctypes.data,
            positives.ids.ctypes.data, default_threads(),
        ))

    @staticmethod
    def _check(code: int) -> None:
        if code == -2:
            raise InputError("scores overflow float32 (NaN): embeddings must be L2-normalised")
        if code != 0:
            raise RuntimeError(f"bict_ray.retrieval._ranks refused its arguments (code {code}): a bug in bict_ray.retrieval.metrics")


def _row_stride(scores: np.ndarray) -> int:
    """The row stride of a (B, W) float32 block in floats; its rows must be contiguous."""
    if scores.size == 0:
        return scores.shape[1]
    if scores.dtype != np.float32 or scores.strides[1] != 4:
        raise RuntimeError("the compiled ranking needs float32 score rows with contiguous columns")
    return scores.strides[0] // 4


@functools.cache
def _rank_kernel() -> _RankKernel | None:
    """The compiled exact ranking, or None where the install could not build it."""
    spec = importlib.util.find_spec("bict_ray.retrieval._ranks")
    if spec is None or not spec.origin:
        logging.getLogger(__name__).warning(
            "bict_ray.retrieval._ranks is not built (no C++ compiler at install?): exact mAP ranks with numpy, "
            "several times slower; reinstall the package with g++ available to build it"
        )
        return None
    return _RankKernel(spec.origin)


class _ShardIndex:
    """A validated gallery shard with its ids sorted for lookups (labels None where not needed).
    id_order: the item positions in ascending id order."""

    def __init__(self, emb: np.ndarray, labels: np.ndarray | None, ids: np.ndarray):
        self.emb, self.labels, self.ids = emb, labels, ids
        self.size = len(ids)
        self.id_order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self.id_order]
        # Ids within a moderate span (image indices, split into shards) are looked up in a table of positions,
        # one read per id: exact mAP looks up every positive of every query in every shard, and a binary
        # search over the sorted ids cost 30-40 ns each (a quarter of a sharded exact evaluation).
        self._first_id, self._table = 0, None
        if self.size and int(self._sorted_ids[-1]) - int(self._sorted_ids[0]) < _dense_id_span(self.size):
            self._first_id = int(self._sorted_ids[0])
            # one entry past the span holds -1: an id outside it is clipped onto that entry (from either side,
            # since index -1 reads it too), which spares the lookup its range masks
            self._table = np.full(int(self._sorted_ids[-1]) - self._first_id + 2, -1, dtype=np.min_scalar_type(-self.size))
            self._table[ids - self._first_id] = np.arange(self.size)

    @classmethod
    def checked(cls, dim: int, emb, labels, ids, name: str) -> _ShardIndex:
        check_embeddings(name, emb)
        if emb.shape[1] != dim:
            raise InputError(f"{name} dim {emb.shape[1]} does not match query dim {dim}")
        if labels is not None:
            labels = check_integer_vector(f"{name} labels", labels, len(emb))
        return cls(emb, labels, check_ids(f"{name} ids", ids, len(emb)))

    def find(self, wanted: np.ndarray) -> np.ndarray:
        """Shard positions of the wanted ids, -1 where an id is not in the shard."""
        if self.size == 0:
            return np.full(len(wanted), -1, dtype=np.int64)
        if self._table is not None:
            offset = np.asarray(wanted, dtype=np.int64) - self._first_id
            np.clip(offset, -1, len(self._table) - 1, out=offset)
            return self._table[offset].astype(np.int64)
        pos = np.minimum(np.searchsorted(self._sorted_ids, wanted), self.size - 1)
        return np.where(self._sorted_ids[pos] == wanted, self.id_order[pos], -1)


def _shard_topk(query, query_labels, query_ids, shard: _ShardIndex, k: int, threads) -> ShardTopK:
    # One extra item leaves room to drop the query's own entry and still hold k.
    depth = k if query_ids is None else k + 1
    scores, idx = exact_search(query, shard.emb, depth, gallery_ids=shard.ids, threads=threads)
    ids, labels = shard.ids[idx], shard.labels[idx]
    num_positives = _positive_counts(query_labels, query_ids, shard)
    if query_ids is not None:
        is_self = ids == query_ids[:, None]
        scores[is_self], ids[is_self], labels[is_self] = -np.inf, -1, -1
        # stable sort on the flag moves the self entry to the end, keeping the rest in rank order
        order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
        scores, ids, labels = (np.take_along_axis(a, order, axis=1) for a in (scores, ids, labels))
    return ShardTopK(scores=scores, ids=ids, labels=labels, num_positives=num_positives, depth=k)


def _positive_counts(query_labels, query_ids, shard: _ShardIndex) -> np.ndarray:
    """(Q,) number of shard items with the query's label, the query's own entry excluded."""
    values, counts = np.unique(shard.labels, return_counts=True)
    pos = np.searchsorted(values, query_labels)
    found = pos < len(values)
    found[found] = values[pos[found]] == query_labels[found]
    result = np.zeros(len(query_labels), dtype=np.int64)
    result[found] = counts[pos[found]]
    if query_ids is not None:
        own = shard.find(query_ids)
        mine = own >= 0
        result[mine] -= shard.labels[own[mine]] == query_labels[mine]
    return result


def _score_blocks(query: np.ndarray, emb: np.ndarray, ranked_in_cache: bool = True
                  ) -> Iterator[tuple[slice, np.ndarray]]:
    """Query row blocks with their scores (B, G) float32, computed by matmuls of up to _MATMUL_ROWS rows. Blocks of
    at most _BLOCK_ELEMENTS scores where ranked_in_cache (numpy's sorts), else the matmul's own blocks (the
    compiled ranking reads one row at a time)."""
    rows = rows_per_block(len(emb), _BLOCK_ELEMENTS)
    matmul_rows = max(rows, min(_MATMUL_ROWS, rows_per_block(len(emb), _MATMUL_ELEMENTS)))
    if not ranked_in_cache:
        rows = matmul_rows
    for outer in query_blocks(len(query), matmul_rows):
        scores = query[outer] @ emb.T
        for inner in query_blocks(outer.stop - outer.start, rows):
            yield slice(outer.start + inner.start, outer.start + inner.stop), scores[inner]


def _own_columns(shard: _ShardIndex, query_ids, block: slice) -> np.ndarray:
    """(B,) shard column of each block query's own entry, -1 where it has none (or no ids are given)."""
    if query_ids is None:
        return np.full(block.stop - block.start, -1, dtype=np.int64)
    return shard.find(query_ids[block])


def _label_codes(query_labels, gallery_labels) -> tuple[np.ndarray, np.ndarray]:
    """Labels as the smallest integers that tell the gallery's classes apart (-1: a query class the
    gallery lacks): looking one up per sorted entry costs less than an int64 label."""
    classes, gallery_codes = np.unique(gallery_labels, return_inverse=True)
    query_codes = np.searchsorted(classes, query_labels)
    query_codes[~np.isin(query_labels, classes)] = -1
    dtype = np.min_scalar_type(-len(classes) - 1)
    return query_codes.astype(dtype), gallery_codes.astype(dtype)


def _exact_block(scores, block_codes, shard_codes, shard: _ShardIndex, own_cols) -> tuple[np.ndarray, ...]:
    """Exact AP, best rank and positive count, each (B,), of a block of queries over the whole shard.

    scores (B, G) float32; block_codes (B,) and shard_codes (G,) label codes (`_label_codes`).
    """
    num_rows, width = scores.shape
    if width == 0:
        return np.zeros(num_rows), np.full(num_rows, NO_HIT), np.zeros(num_rows, dtype=np.int64)
    exact = width > _ONE_PASS_WIDTH
    ranked = _positive_ranks(scores, block_codes, shard_codes, shard, own_cols, exact)
    if ranked is None:
        ranked = _positive_ranks(scores, block_codes, shard_codes, shard, own_cols, exact=True)
    rows, ranks = ranked
    counts = np.bincount(rows, minlength=num_rows)
    offsets = _offsets(counts)
    # The j-th positive of a query, at rank r, adds j / r to its AP.
    precision = (np.arange(1, len(ranks) + 1) - offsets[rows]) / ranks
    ap = np.bincount(rows, weights=precision, minlength=num_rows) / np.maximum(counts, 1)
    best_rank = np.full(num_rows, NO_HIT, dtype=np.int64)
    best_rank[counts > 0] = ranks[offsets[:-1][counts > 0]]
    return ap, best_rank, counts


def _positive_ranks(scores, block_codes, shard_codes, shard: _ShardIndex, own_cols, exact: bool):
    """Every positive's row and rank (1-based), rows ascending and ranks ascending within a row, from
    one sort of each row by its keys (`_sort_order`): with exact keys and ties in id order the sort is
    the ranking. Score buckets leave the order inside a bucket to `_key_corrections`; None if a bucket
    is too crowded for it (`_MAX_RUN`)."""
    width = scores.shape[1]
    keys, order = _sort_order(scores, own_cols, exact, shard.id_order if exact else None)
    sorted_positive = np.take(shard_codes, order) == block_codes[:, None]
    # The own entry sorts last in its row (see _sort_order).
    sorted_positive[own_cols >= 0, -1] = False
    flat = np.flatnonzero(sorted_positive)
    rows = flat // width
    ranks = flat - rows * width + 1
    if exact:
        return rows, ranks
    corrections = _key_corrections(
        flat, rows, scores, shard.ids, order, keys, sorted_positive.ravel(), max_run=_MAX_RUN
    )
    if corrections is None:
        return None
    crowded, rank_fix, outranked_fix = corrections
    # A crowded positive may change places with another one of its key: put each rank where its
    # positive really stands, so that ranks ascend in every row.
    ranks[crowded + outranked_fix] = ranks[crowded] + rank_fix
    return rows, ranks


def _ranked_above(scores, shard_ids, own_cols, rows, pos_scores, pos_ids) -> np.ndarray:
    """For each positive (its block row, rows ascending; its score and id), the number of shard items
    ranked above it in its row: a higher score, or an equal one and a smaller id. Each row's own entry
    (own_cols, -1 for none) never counts.

    The positives join their rows as extra columns and each row is sorted by its keys (`_sort_order`):
    before a positive come the items of smaller keys and every item of its own key (items have the
    smaller columns), which `_key_corrections` then compares exactly.
    """
    num_rows, width = scores.shape
    above = np.zeros(len(rows), dtype=np.int64)
    if len(rows) == 0 or width == 0:
        return above
    counts = np.bincount(rows, minlength=num_rows)
    first = _offsets(counts)[:-1]
    extra = int(counts.max())
    full = width + extra
    combined = np.empty((num_rows, full), dtype=np.float32)
    combined[:, :width] = scores
    # Padding repeats an item's score, so that it cannot widen the row's score range.
    combined[:, width:] = scores[:, :1]
    combined[rows, width + np.arange(len(rows)) - first[rows]] = pos_scores
    keys, order = _sort_order(combined, own_cols, exact=full > _ONE_PASS_WIDTH)
    # Each row has `extra` columns past its items (positives, then padding), wherever they sort; what
    # sorts before a positive and is none of those is an item.
    extras = np.flatnonzero(order >= width)
    extra_rows = extras // full
    columns = order.ravel()[extras] - width
    wanted = np.flatnonzero(columns < counts[extra_rows])
    flat, rows = extras[wanted], extra_rows[wanted]
    which = first[rows] + columns[wanted]
    above[which] = flat - rows * full - (wanted - rows * extra)
    crowded, rank_fix, _ = _key_corrections(
        flat, rows, scores, shard_ids, order, keys, None, None, pos_scores[which], pos_ids[which]
    )
    above[which[crowded]] += rank_fix
    return above


def _sort_order(scores, own_cols, exact: bool, tie_order=None) -> tuple[np.ndarray, np.ndarray]:
    """Integer sort keys of a block's entries, and each row's columns in key order.

    scores (B, W) float32; own_cols (B,) the column of each row's own entry, -1 for none; tie_order
    (W,): the column order that equal exact keys keep (None: by column).
    Returns keys (B, W) and order (B, W) int64: each row's columns by key, then tie order. A key never
    decreases as the score falls, so an entry of a smaller key scores strictly higher. Exact keys are
    equal only for equal scores; 16-bit score buckets (exact=False) may hold different scores. The own
    entry alone takes the largest key and sorts last. numpy sorts 16-bit keys by radix, several times
    faster than float32 scores: exact 32-bit keys take two such passes.
    """
    mine = np.flatnonzero(own_cols >= 0)
    own = (mine, own_cols[mine])
    # The own entry sorts last whatever its score (often the row's highest): keep it out of the range.
    own_scores = scores[own]
    scores[own] = -np.inf
    highest = scores.max(axis=1)
    scores[own] = np.inf
    lowest = scores.min(axis=1)
    scores[own] = own_scores
    if np.isnan(highest).any() or np.isnan(own_scores).any():
        raise InputError("scores overflow float32 (NaN): embeddings must be L2-normalised")
    if not exact:
        keys = _score_buckets(scores, highest, lowest, own)
        keys[own] = np.iinfo(np.uint16).max
        return keys, np.argsort(keys, axis=1, kind="stable")
    keys = _exact_keys(scores)
    keys[own] = np.iinfo(np.uint32).max
    # Radix sorts are stable: start from the tie order, sort by the lower half, then by the upper half.
    tied = keys if tie_order is None else np.take(keys, tie_order, axis=1)
    offsets = scores.shape[1] * np.arange(len(scores))[:, None]
    first = np.argsort((tied & 0xFFFF).astype(np.uint16), axis=1, kind="stable") + offsets
    upper = np.take((tied >> 16).astype(np.uint16), first)
    order = np.take(first, np.argsort(upper, axis=1, kind="stable") + offsets) - offsets
    return keys, order if tie_order is None else np.take(tie_order, order)


def _score_buckets(scores, highest, lowest, own) -> np.ndarray:
    """(B, W) uint16: 0 at a row's highest score, 65534 at its lowest (highest, lowest (B,)), linear in
    between and monotone, since each float step rounds monotonically. own: (rows, columns) of entries
    outside that range, left at 0 for the caller to overwrite."""
    score_range = highest - lowest
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        scale = np.minimum(65534 / score_range.astype(np.float64), np.finfo(np.float32).max)
        steps = highest[:, None] - scores
    # The own entries' steps may fall outside 0..65534, and casting those to uint16 is undefined.
    steps[own] = 0
    # A row whose range overflows float32 (embeddings far from unit length) goes into one bucket: it is
    # then ranked by exact comparisons alone.
    unbounded = ~np.isfinite(score_range)
    if unbounded.any():
        steps[unbounded] = 0
    buckets = np.empty(scores.shape, dtype=np.uint16)
    np.multiply(steps, scale.astype(np.float32)[:, None], out=buckets, casting="unsafe")
    return buckets


def _exact_keys(scores) -> np.ndarray:
    """(B, W) uint32 keys ascending as the scores descend, equal exactly for equal scores."""
    bits = (scores + np.float32(0)).view(np.int32)  # + 0 makes -0.0 into +0.0: one score
    # A non-negative float's bits ascend with it: flip them below the sign bit. A negative float's
    # bits, sign bit set, already ascend as it descends.
    return (bits ^ (~(bits >> 31) & 0x7FFFFFFF)).view(np.uint32)


def _key_corrections(
    flat, rows, scores, ids, order, keys, sorted_positive, max_run=None, needle_scores=None, needle_ids=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Exact order among entries that share a sort key, for entries at positions `flat` of rows in key
    order (`_sort_order`).

    flat (P,): positions in the row-major layout of `order`; rows (P,): their rows. scores (B, W) and
    ids (W,): the block's items, columns < W of order (B, F) and keys (B, F); columns >= W are no items
    and never count. sorted_positive: (B * F,) bool in the layout of `order`, marking positives, or None.
    needle_scores, needle_ids (P,): the entries' scores and ids; None reads them from the block.
    An entry whose neighbours have other keys needs nothing; the others ("crowded") are compared with
    every entry of their key. Returns crowded (indices into flat) and, for those, what to add to the
    count of items before them to get the items ranked above them, and the same for positives. With a
    max_run: None if most entries are crowded or one's key runs on past max_run entries on a side.
    """
    width = scores.shape[1]
    full = order.shape[1]
    order, keys, scores = order.ravel(), keys.ravel(), scores.ravel()
    row_start = rows * full
    key = np.take(keys, row_start + np.take(order, flat))
    crowded = np.flatnonzero(
        (np.take(keys, row_start + np.take(order, flat - 1, mode="clip")) == key)
        | (np.take(keys, row_start + np.take(order, flat + 1, mode="clip")) == key)
    )
    if max_run is not None and 2 * len(crowded) > len(flat):
        return None
    start, row_start, key = flat[crowded], row_start[crowded], key[crowded]
    if needle_scores is None:
        columns = order[start]
        score, ident = scores[rows[crowded] * width + columns], ids[columns]
    else:
        score, ident = needle_scores[crowded], needle_ids[crowded]
    runs = _key_run(start, row_start, key, order, keys, full, max_run)
    if runs is None:
        return None
    first, last = runs
    rank_fix = np.zeros(len(crowded), dtype=np.int64)
    positive_fix = np.zeros(len(crowded), dtype=np.int64)
    # Each crowded entry meets every entry of its run, in chunks of about _BLOCK_ELEMENTS meetings.
    sizes = last - first + 1
    bounds = np.searchsorted(np.cumsum(sizes), np.arange(_BLOCK_ELEMENTS, sizes.sum(), _BLOCK_ELEMENTS))
    for chunk in np.split(np.arange(len(crowded)), bounds):
        chunk_sizes = sizes[chunk]
        owner = np.repeat(chunk, chunk_sizes)
        run_offsets = np.cumsum(chunk_sizes) - chunk_sizes
        at = np.repeat(first[chunk] - run_offsets, chunk_sizes) + np.arange(len(owner))
        column = order[at]
        item = column < width
        owner, at, column = owner[item], at[item], column[item]
        other = scores[rows[crowded[owner]] * width + column]
        ahead = (other > score[owner]) | ((other == score[owner]) & (ids[column] < ident[owner]))
        # An item before the entry was counted: take it back unless it ranks above. One after it was
        # not: add it if it does. The entry itself is neither.
        change = ahead.astype(np.int64) - (at < start[owner])
        rank_fix += np.bincount(owner, weights=change, minlength=len(crowded)).astype(np.int64)
        if sorted_positive is not None:
            positive_fix += np.bincount(
                owner, weights=change * sorted_positive[at], minlength=len(crowded)
            ).astype(np.int64)
    return crowded, rank_fix, positive_fix


def _key_run(start, row_start, key, order, keys, full, max_steps=None):
    """(first, last) flat positions of the run of entries, in key order, that share each start entry's
    key: walked outwards one step at a time, all runs together; None after max_steps steps."""
    n = len(start)
    ends = np.concatenate([start, start])  # walker k < n finds the first position, n + k the last
    step = np.repeat([-1, 1], n)
    limit = np.concatenate([row_start, row_start + full - 1])
    walker_start, walker_key = np.concatenate([row_start, row_start]), np.concatenate([key, key])
    live = np.flatnonzero(ends != limit)
    steps = 0
    while live.size:
        if steps == max_steps:
            return None
        steps += 1
        next_at = ends[live] + step[live]
        same = np.take(keys, walker_start[live] + np.take(order, next_at)) == walker_key[live]
        live = live[same]
        ends[live] = next_at[same]
        live = live[ends[live] != limit[live]]
    return ends[:n], ends[n:]


def _per_query_from_ranks(offsets, ranks, map_at) -> tuple[np.ndarray, np.ndarray]:
    """(Q,) AP (or AP@map_at) and best rank from each positive's 1-based rank (CSR by query)."""
    num_queries = len(offsets) - 1
    num_positives = np.diff(offsets)
    rows = np.repeat(np.arange(num_queries, dtype=np.int64), num_positives)
    # Put each query's positives in rank order: the j-th of them then has precision j / rank_j. Positives merged
    # in rank order (merge_positives) come with their ranks ascending already.
    falls = np.flatnonzero(np.diff(ranks) <= 0) + 1
    if not np.isin(falls, offsets).all():
        width = int(ranks.max()) + 1 if len(ranks) else 1
        ranks = np.sort(rows * width + ranks) - rows * width
    precision = (np.arange(1, len(ranks) + 1) - offsets[rows]) / ranks
    denominator = num_positives
    if map_at is not None:
        precision = np.where(ranks <= map_at, precision, 0.0)
        denominator = np.minimum(num_positives, map_at)
    ap = np.bincount(rows, weights=precision, minlength=num_queries) / np.maximum(denominator, 1)
    best_rank = np.full(num_queries, NO_HIT, dtype=np.int64)
    has = num_positives > 0
    best_rank[has] = ranks[offsets[:-1][has]]
    return ap, best_rank


def _per_query_from_topk(topk: ShardTopK, query_labels, map_at: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q,) AP@map_at and best rank (NO_HIT beyond the list) from top-k lists."""
    relevant = (topk.labels == query_labels[:, None]) & (topk.scores > -np.inf)
    best_rank = np.where(relevant.any(axis=1), relevant.argmax(axis=1) + 1, NO_HIT)
    top = relevant[:, :map_at]
    precision = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    ap = (precision * top).sum(axis=1) / np.maximum(np.minimum(topk.num_positives, map_at), 1)
    return ap, best_rank


def _summarise(ap, best_rank, num_positives, ks) -> dict:
    evaluated = num_positives > 0
    num_evaluated = int(evaluated.sum())
    if num_evaluated == 0:
        raise InputError(f"none of the {len(num_positives)} queries has a positive in the gallery")
    result = {"mAP": float(ap[evaluated].mean())}
    for k in ks:
        result[f"R@{k}"] = float((best_rank[evaluated] <= k).mean())
    result["num_queries"] = num_evaluated
    result["num_queries_without_positive"] = len(num_positives) - num_evaluated
    return result


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def topk_depth(ks: tuple[int, ...], map_at: int) -> int:
    """The depth of top-k lists that gives R@k for every k of ``ks`` and mAP@map_at."""
    return max(max(ks, default=1), map_at)


def check_cutoffs(ks, map_at) -> tuple[tuple[int, ...], int | None]:
    """ks (sorted, without repeats) and map_at (None: exact mAP), each checked a positive integer."""
    ks = tuple(sorted({check_positive_int("each of ks", k) for k in ks}))
    return ks, (None if map_at is None else check_positive_int("map_at", map_at))


def check_queries(query, query_labels, query_ids) -> tuple[np.ndarray, np.ndarray | None]:
    """Check a query set: (Q, D) float32 finite embeddings, Q >= 1; returns (labels, ids or None) as int64."""
    check_embeddings("query", query)
    if len(query) == 0:
        raise InputError("query is empty")
    query_labels = check_integer_vector("query_labels", query_labels, len(query))
    if query_ids is not None:
        query_ids = check_integer_vector("query_ids", query_ids, len(query))
    return query_labels, query_ids
