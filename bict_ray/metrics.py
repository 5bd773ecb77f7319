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

`sharded_retrieval_metrics` runs those passes in one process; `retrieval_metrics` is the in-memory path.
Both give the same numbers. In mAP@k mode the scores come from faiss, which scores a pair identically in
any block or shard. In exact mode they come from a BLAS matmul, whose last bit can depend on the block
shape, so two items within one float32 ulp of each other may swap between the two paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from bict_ray.search import (
    check_embeddings,
    check_ids,
    check_integer_vector,
    check_positive_int,
    exact_search,
    merge_order,
    query_blocks,
    rows_per_block,
)

# Best rank of a query none of whose positives is within reach (beyond the top-k list).
NO_HIT = np.iinfo(np.int64).max
# Query rows x gallery items per score block: about 70 MB of working memory in exact mode.
_BLOCK_ELEMENTS = 1 << 22

Shard = tuple[np.ndarray, np.ndarray, np.ndarray]


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
    ks, map_at = _check_cutoffs(ks, map_at)
    query_labels, query_ids = _check_queries(query, query_labels, query_ids)
    if query_ids is not None and gallery_ids is None:
        raise ValueError("query_ids need gallery_ids: self-exclusion compares the two")
    if gallery_ids is None:
        gallery_ids = np.arange(len(gallery), dtype=np.int64)
    shard = _ShardIndex.checked(query.shape[1], gallery, gallery_labels, gallery_ids, "gallery")
    if map_at is not None:
        topk = _shard_topk(query, query_labels, query_ids, shard, _depth(ks, map_at), None)
        return _summarise(*_per_query_from_topk(topk, query_labels, map_at), topk.num_positives, ks)
    ap, best_rank, num_positives = [], [], []
    for block in query_blocks(len(query), rows_per_block(shard.size, _BLOCK_ELEMENTS)):
        own = _own_entries(shard, query_ids, block)
        scores = _block_scores(query[block], shard, own)
        rows, cols = _block_positives(scores, query_labels[block], shard, own)
        above = _ranked_above(scores, shard.ids, rows, scores[rows, cols], shard.ids[cols], cols)
        offsets = _offsets(np.bincount(rows, minlength=scores.shape[0]))
        block_ap, block_best_rank = _per_query_from_ranks(offsets, above + 1, None)
        ap.append(block_ap)
        best_rank.append(block_best_rank)
        num_positives.append(np.diff(offsets))
    return _summarise(np.concatenate(ap), np.concatenate(best_rank), np.concatenate(num_positives), ks)


def sharded_retrieval_metrics(
    query: np.ndarray,
    query_labels: np.ndarray,
    shards: Callable[[], Iterable[Shard]],
    query_ids: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
    map_at: int | None = None,
) -> dict:
    """`retrieval_metrics` over a gallery given as shards, holding one shard in memory at a time.

    shards: a zero-argument callable returning an iterable of (embeddings (G_s, D) float32,
        labels (G_s,) int, ids (G_s,) int) shards; ids are unique across all shards. It is called once
        per pass: once for mAP@k, twice for exact mAP.
    Other arguments and the result as in `retrieval_metrics`; errors name the shard by its position.
    """
    ks, map_at = _check_cutoffs(ks, map_at)
    query_labels, query_ids = _check_queries(query, query_labels, query_ids)
    if map_at is not None:
        depth = _depth(ks, map_at)
        merged = None
        for i, (emb, labels, ids) in enumerate(shards()):
            part = _in_shard(i, shard_topk, query, query_labels, emb, labels, ids, depth, query_ids)
            merged = part if merged is None else merge_shard_topk([merged, part], depth)
        if merged is None:
            raise ValueError("shards() yielded no shard")
        return metrics_from_topk(merged, query_labels, ks, map_at)
    parts = [
        _in_shard(i, shard_positives, query, query_labels, emb, labels, ids, query_ids)
        for i, (emb, labels, ids) in enumerate(shards())
    ]
    if not parts:
        raise ValueError("shards() yielded no shard")
    positives = merge_positives(parts)
    above = np.zeros(len(positives.ids), dtype=np.int64)
    for i, (emb, _, ids) in enumerate(shards()):
        above += _in_shard(i, shard_rank_counts, query, positives, emb, ids, query_ids)
    return metrics_from_ranks(positives, above, ks)


def shard_topk(
    query: np.ndarray,
    query_labels: np.ndarray,
    shard_emb: np.ndarray,
    shard_labels: np.ndarray,
    shard_ids: np.ndarray,
    k: int,
    query_ids: np.ndarray | None = None,
    *,
    threads: int | None = None,
) -> ShardTopK:
    """mAP@k pass over one shard: each query's top-k in the shard (self excluded) and its positive count.

    query (Q, D) float32; shard_emb (G_s, D) float32; labels and ids integer vectors; k >= max(ks, map_at).
    threads: faiss threads (see `exact_search`).
    """
    query_labels, query_ids = _check_queries(query, query_labels, query_ids)
    shard = _ShardIndex.checked(query.shape[1], shard_emb, shard_labels, shard_ids, "shard")
    return _shard_topk(query, query_labels, query_ids, shard, check_positive_int("k", k), threads)


def merge_shard_topk(parts: Sequence[ShardTopK], k: int) -> ShardTopK:
    """Merge per-shard `ShardTopK` results (same queries) into the top-k over all their shards."""
    if not parts:
        raise ValueError("merge_shard_topk needs at least one part")
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
    ks, map_at = _check_cutoffs(ks, map_at)
    if map_at is None:
        raise ValueError(
            "exact mAP needs every positive's rank: use shard_positives/shard_rank_counts, or set map_at"
        )
    if topk.depth < _depth(ks, map_at):
        raise ValueError(
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
    query_ids: np.ndarray | None = None,
) -> QueryPositives:
    """Exact-mAP pass 1 over one shard: each query's positives in it (self excluded) with their scores."""
    query_labels, query_ids = _check_queries(query, query_labels, query_ids)
    shard = _ShardIndex.checked(query.shape[1], shard_emb, shard_labels, shard_ids, "shard")
    counts, scores, ids = [], [], []
    for block in query_blocks(len(query), rows_per_block(shard.size, _BLOCK_ELEMENTS)):
        own = _own_entries(shard, query_ids, block)
        block_scores = _block_scores(query[block], shard, own)
        rows, cols = _block_positives(block_scores, query_labels[block], shard, own)
        counts.append(np.bincount(rows, minlength=block_scores.shape[0]))
        scores.append(block_scores[rows, cols])
        ids.append(shard.ids[cols])
    return QueryPositives(
        offsets=_offsets(np.concatenate(counts)),
        scores=np.concatenate(scores).astype(np.float32, copy=False),
        ids=np.concatenate(ids).astype(np.int64, copy=False),
    )


def merge_positives(parts: Sequence[QueryPositives]) -> QueryPositives:
    """Concatenate per-shard positives query by query (the order within a query does not matter)."""
    if not parts:
        raise ValueError("merge_positives needs at least one part")
    num_queries = parts[0].num_queries
    if any(p.num_queries != num_queries for p in parts):
        raise ValueError(f"positives cover different query counts: {[p.num_queries for p in parts]}")
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
    return QueryPositives(offsets=offsets, scores=scores, ids=ids)


def shard_rank_counts(
    query: np.ndarray,
    positives: QueryPositives,
    shard_emb: np.ndarray,
    shard_ids: np.ndarray,
    query_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Exact-mAP pass 2 over one shard: for each merged positive, how many of the shard's items rank
    above it (higher score, or equal score and smaller id; self excluded). Returns (P,) int64; summed
    over shards, plus one, it is the positive's rank in the whole gallery."""
    check_embeddings("query", query)
    if positives.num_queries != len(query):
        raise ValueError(f"positives cover {positives.num_queries} queries, query has {len(query)}")
    if query_ids is not None:
        query_ids = check_integer_vector("query_ids", query_ids, len(query))
    shard = _ShardIndex.checked(query.shape[1], shard_emb, None, shard_ids, "shard")
    above = np.empty(len(positives.ids), dtype=np.int64)
    for block in query_blocks(len(query), rows_per_block(shard.size, _BLOCK_ELEMENTS)):
        scores = _block_scores(query[block], shard, _own_entries(shard, query_ids, block))
        entries = slice(positives.offsets[block.start], positives.offsets[block.stop])
        rows = np.repeat(np.arange(scores.shape[0]), np.diff(positives.offsets[block.start : block.stop + 1]))
        pos_scores = positives.scores[entries] + np.float32(0)
        pos_ids = positives.ids[entries]
        # A positive stored in this shard is compared by the score this pass computes for it, so that it
        # never outranks itself even if a BLAS block shape changed its last bit since pass 1.
        cols = shard.find(pos_ids)
        mine = cols >= 0
        pos_scores[mine] = scores[rows[mine], cols[mine]]
        above[entries] = _ranked_above(scores, shard.ids, rows, pos_scores, pos_ids, cols)
    return above


def metrics_from_ranks(
    positives: QueryPositives,
    ranks_above: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    map_at: int | None = None,
) -> dict:
    """Exact mAP (mAP@map_at if set) and R@k from each positive's count of gallery items ranked above it
    (`shard_rank_counts` summed over shards). See the module doc for the result."""
    ks, map_at = _check_cutoffs(ks, map_at)
    ranks_above = check_integer_vector("ranks_above", ranks_above, len(positives.ids))
    ap, best_rank = _per_query_from_ranks(positives.offsets, ranks_above + 1, map_at)
    return _summarise(ap, best_rank, np.diff(positives.offsets), ks)


class _ShardIndex:
    """A validated gallery shard with its ids sorted for lookups (labels None where not needed)."""

    def __init__(self, emb: np.ndarray, labels: np.ndarray | None, ids: np.ndarray):
        self.emb, self.labels, self.ids = emb, labels, ids
        self.size = len(ids)
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]

    @classmethod
    def checked(cls, dim: int, emb, labels, ids, name: str) -> _ShardIndex:
        check_embeddings(name, emb)
        if emb.shape[1] != dim:
            raise ValueError(f"{name} dim {emb.shape[1]} does not match query dim {dim}")
        if labels is not None:
            labels = check_integer_vector(f"{name} labels", labels, len(emb))
        return cls(emb, labels, check_ids(f"{name} ids", ids, len(emb)))

    def find(self, wanted: np.ndarray) -> np.ndarray:
        """Shard positions of the wanted ids, -1 where an id is not in the shard."""
        if self.size == 0:
            return np.full(len(wanted), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._sorted_ids, wanted), self.size - 1)
        return np.where(self._sorted_ids[pos] == wanted, self._order[pos], -1)


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


def _own_entries(shard: _ShardIndex, query_ids, block: slice) -> tuple[np.ndarray, np.ndarray]:
    """Block rows and shard columns where a query meets its own entry (none without query ids)."""
    if query_ids is None:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    cols = shard.find(query_ids[block])
    rows = np.flatnonzero(cols >= 0)
    return rows, cols[rows]


def _block_scores(query_block: np.ndarray, shard: _ShardIndex, own) -> np.ndarray:
    """(B, G_s) float32 scores with each query's own entry at -inf (never above a real score)."""
    scores = query_block @ shard.emb.T
    scores += np.float32(0)  # -0.0 becomes +0.0: the two must rank as one score
    scores[own] = -np.inf
    return scores


def _block_positives(scores, block_labels, shard: _ShardIndex, own) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of every positive in a score block, row-major (rows ascending)."""
    mask = shard.labels[None, :] == block_labels[:, None]
    mask[own] = False
    return np.nonzero(mask)


def _ranked_above(scores, shard_ids, rows, pos_scores, pos_ids, own_cols) -> np.ndarray:
    """For each positive (its block row, score, id and shard column or -1), the number of shard items
    ranked above it. Sorts each score row once, then counts higher scores by binary search; items tied
    with a positive's score (rare unless embeddings repeat) are then resolved by id."""
    num_rows, width = scores.shape
    if len(rows) == 0 or width == 0:
        return np.zeros(len(rows), dtype=np.int64)
    keys = _sortable(scores)
    keys.sort(axis=1)
    # Row r's sorted keys shifted into [r * 2**32 - 2**31, r * 2**32 + 2**31): one sorted flat array
    # that a single vectorised searchsorted serves for every row.
    flat = (keys.astype(np.int64) + (np.arange(num_rows, dtype=np.int64) << 32)[:, None]).ravel()
    needles = (rows.astype(np.int64) << 32) + _sortable(pos_scores)
    # Searching in ascending needle order walks `flat` once instead of jumping around it; the needles
    # come grouped by row, which suits the stable sort (timsort merges runs).
    order = np.argsort(needles, kind="stable")
    right = np.empty_like(order)
    right[order] = np.searchsorted(flat, needles[order], side="right")
    above = (rows.astype(np.int64) + 1) * width - right
    # Equal keys sit just before `right`; seeing two of them is enough to know whether some item other
    # than the positive itself shares its score (rows never share keys, so no row check is needed).
    equal = np.zeros(len(rows), dtype=np.int64)
    for back in (1, 2):
        at = right - back
        equal += (at >= 0) & (flat[np.maximum(at, 0)] == needles)
    tied = np.flatnonzero(equal > (own_cols >= 0))
    if tied.size:
        above[tied] += _tied_with_smaller_id(scores, shard_ids, rows[tied], pos_scores[tied], pos_ids[tied])
    return above


def _tied_with_smaller_id(scores, shard_ids, rows, pos_scores, pos_ids) -> np.ndarray:
    counts = np.empty(len(rows), dtype=np.int64)
    for chunk in query_blocks(len(rows), rows_per_block(scores.shape[1], _BLOCK_ELEMENTS)):
        same = scores[rows[chunk]] == pos_scores[chunk, None]
        counts[chunk] = (same & (shard_ids[None, :] < pos_ids[chunk, None])).sum(axis=1)
    return counts


def _sortable(x: np.ndarray) -> np.ndarray:
    """int32 keys ordered like the float32 values (finite or infinite, -0.0 already turned into +0.0)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.int32)
    return bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))


def _per_query_from_ranks(offsets, ranks, map_at) -> tuple[np.ndarray, np.ndarray]:
    """(Q,) AP (or AP@map_at) and best rank from each positive's 1-based rank (CSR by query)."""
    num_queries = len(offsets) - 1
    num_positives = np.diff(offsets)
    rows = np.repeat(np.arange(num_queries, dtype=np.int64), num_positives)
    # Put each query's positives in rank order: the j-th of them then has precision j / rank_j.
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
        raise ValueError(f"none of the {len(num_positives)} queries has a positive in the gallery")
    result = {"mAP": float(ap[evaluated].mean())}
    for k in ks:
        result[f"R@{k}"] = float((best_rank[evaluated] <= k).mean())
    result["num_queries"] = num_evaluated
    result["num_queries_without_positive"] = len(num_positives) - num_evaluated
    return result


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _depth(ks: tuple[int, ...], map_at: int) -> int:
    return max(max(ks, default=1), map_at)


def _check_cutoffs(ks, map_at) -> tuple[tuple[int, ...], int | None]:
    ks = tuple(sorted({check_positive_int("each of ks", k) for k in ks}))
    return ks, (None if map_at is None else check_positive_int("map_at", map_at))


def _check_queries(query, query_labels, query_ids):
    check_embeddings("query", query)
    if len(query) == 0:
        raise ValueError("query is empty")
    query_labels = check_integer_vector("query_labels", query_labels, len(query))
    if query_ids is not None:
        query_ids = check_integer_vector("query_ids", query_ids, len(query))
    return query_labels, query_ids


def _in_shard(index: int, fn, *args):
    try:
        return fn(*args)
    except ValueError as err:
        raise ValueError(f"shard {index}: {err}") from err
