"""The one driver of sharded evaluation: mAP and R@k over a gallery read shard by shard, its shards mapped by an
injected executor.

``sharded_retrieval_metrics(query, query_labels, source, query_ids=..., executor=...)`` reads the gallery from a
shard source (``bict_ray.retrieval.shard``: a committed gallery version, ``ShardList``, a partial refresh) and
combines the per-shard passes of ``bict_ray.retrieval.metrics``:

- mAP@k (map_at set), one pass: ``shard_topk`` per shard -> ``merge_shard_topk`` -> ``metrics_from_topk``.
- exact mAP, two passes: ``shard_positives`` per shard -> ``merge_positives``; then ``shard_rank_counts`` per shard,
  given the merged positives, summed -> ``metrics_from_ranks``.

The result equals ``retrieval_metrics`` on the whole gallery in memory (exact mode: up to a swap of two items within
one float32 ulp, see ``bict_ray.retrieval.metrics``), and does not depend on the executor or on the order in which
it yields the shards' results (every merge above ranks by score, then id).

An executor maps one pass over every shard of a source (``ShardExecutor``): ``IN_PROCESS`` here reads the shards in
this process one after the other, one in memory at a time (``InProcess(gather_bytes=...)``: a gallery that fits is
read whole and scored in one pass); ``bict_ray.distributed.evaluate.RayDataExecutor`` runs
them in Ray Data tasks. Either calls ``run_pass`` for each shard, so that both name a shard in the same errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from bict_ray.errors import InputError
from bict_ray.retrieval.metrics import (
    QueryPositives,
    ShardTopK,
    check_cutoffs,
    check_queries,
    merge_positives,
    merge_shard_topk,
    metrics_from_ranks,
    metrics_from_topk,
    retrieval_metrics,
    shard_positives,
    shard_rank_counts,
    shard_topk,
    topk_depth,
)
from bict_ray.retrieval.shard import Shard, ShardSource


class Queries(NamedTuple):
    """The query set every pass of one evaluation shares: embeddings (Q, D) float32, labels (Q,) int64, ids (Q,)
    int64 or None (a gallery row with the query's id is left out of that query's ranking)."""

    embeddings: np.ndarray
    labels: np.ndarray
    ids: np.ndarray | None


# A pass: pass_fn(queries, shard, **inputs) -> a small picklable per-shard result. Module-level functions, so that
# an executor can send them to other processes.
PassFn = Callable[..., Any]


class ShardExecutor(Protocol):
    """Maps one pass over every shard of a source."""

    #: threads one pass's top-k search may use (None: as many as the process has); passes that run side by side
    #: on one machine want 1
    search_threads: int | None

    def map(self, source: ShardSource, pass_fn: PassFn, queries: Queries, **inputs) -> Iterable[Any]:
        """``run_pass(source, i, pass_fn, queries, inputs)`` for every shard index i, in any order; the results of
        a pass in ``COMBINE`` may come folded, each one the combination of several shards' (``run_passes``)."""
        ...


def run_pass(source: ShardSource, index: int, pass_fn: PassFn, queries: Queries, inputs: dict) -> Any:
    """One pass over shard ``index`` of ``source``; a refused shard is named by its index."""
    shard = source.read_shard(index)
    try:
        return pass_fn(queries, shard, **inputs)
    except InputError as err:
        raise InputError(f"shard {index}: {err}") from err


def run_passes(source: ShardSource, indices: Sequence[int], pass_fn: PassFn, queries: Queries, inputs: dict) -> list:
    """``run_pass`` over shards ``indices``, for an executor that hands a task several shards. A pass whose results
    combine (``COMBINE``: exact mAP's rank counts add up, top-k lists merge) is folded shard by shard into one
    result, so a task holds one running result, not one per shard: a rank count is 8 bytes per merged positive, and
    a task of many shards returned them all at once (BENCHMARKS.md, "A 10M-row gallery"). The combined result is
    the one the driver would reach folding the same shards, since its own fold is a sum or an order-free merge."""
    combine = COMBINE.get(pass_fn)
    if combine is None:
        return [run_pass(source, index, pass_fn, queries, inputs) for index in indices]
    folded = None
    for index in indices:
        part = run_pass(source, index, pass_fn, queries, inputs)
        folded = part if folded is None else combine(folded, part, inputs)
    return [] if folded is None else [folded]


class InProcess:
    """The executor in this process: shard after shard, one in memory at a time.

    gather_bytes: a gallery whose embeddings take at most this many bytes is read whole and scored in one pass of the
    in-memory metrics instead (0: never). Exact mAP over shards needs two passes and a rank count per positive;
    over a gallery that fits in memory one pass gives the same numbers (up to the float32 ulp swaps the module doc
    describes) several times faster, and the driver then holds at most ``gather_bytes`` of gallery.
    """

    search_threads = None

    def __init__(self, gather_bytes: int = 0):
        self.gather_bytes = int(gather_bytes)

    def map(self, source: ShardSource, pass_fn: PassFn, queries: Queries, **inputs) -> Iterator[Any]:
        for index in range(source.num_shards):
            yield run_pass(source, index, pass_fn, queries, inputs)

    def gather(self, source: ShardSource, dim: int) -> Shard | None:
        """The whole gallery as one shard when it is known to fit ``gather_bytes`` (its ``shard_rows``), else None."""
        rows = getattr(source, "shard_rows", None)
        if not self.gather_bytes or rows is None or sum(rows) * dim * 4 > self.gather_bytes:
            return None
        shards = []
        for index in range(source.num_shards):
            shard = source.read_shard(index)
            if shard.embeddings.ndim != 2 or shard.embeddings.shape[1] != dim:
                raise InputError(f"shard {index}: shard dim {shard.embeddings.shape[1:]} does not match query dim {dim}")
            shards.append(shard)
        return Shard(*(np.concatenate(column) for column in zip(*shards)))

    def __repr__(self) -> str:
        return f"InProcess(gather_bytes={self.gather_bytes})" if self.gather_bytes else "IN_PROCESS"


IN_PROCESS = InProcess()
# what the upgrade sequence evaluates with when it does not spread evaluation over Ray Data: galleries up to 256 MB
# (a million 64-d rows) in one pass, larger ones shard by shard
IN_PROCESS_GATHERING = InProcess(gather_bytes=256 << 20)


def sharded_retrieval_metrics(
    query: np.ndarray,
    query_labels: np.ndarray,
    source: ShardSource,
    *,
    query_ids: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
    map_at: int | None = None,
    executor: ShardExecutor = IN_PROCESS,
) -> dict:
    """``retrieval_metrics`` of ``query`` against the gallery that ``source`` serves shard by shard.

    query (Q, D) float32, L2-normalised; query_labels (Q,) int; query_ids (Q,) int or None: a gallery row with the
    query's id is excluded from that query's ranking (the same image embedded by another model).
    source: a shard source (``num_shards``, ``read_shard(i)`` -> ``Shard``; ids unique across its shards); where it
        has a ``dim``, queries of another dim are refused before any shard is read.
    ks, map_at: as in ``retrieval_metrics`` (map_at None: exact mAP, two passes over the shards; else one pass).
    executor: how the passes are mapped over the shards (``IN_PROCESS``, or the Ray Data one).
    Returns ``retrieval_metrics``'s dict: {"mAP", "R@<k>", "num_queries", "num_queries_without_positive"}; errors
    in a shard's data name the shard by its index.
    """
    ks, map_at = check_cutoffs(ks, map_at)
    query_labels, query_ids = check_queries(query, query_labels, query_ids)
    queries = Queries(query, query_labels, query_ids)
    if source.num_shards < 1:
        raise InputError(f"{source!r} has no shard")
    dim = getattr(source, "dim", None)
    if dim is not None and dim != query.shape[1]:
        raise InputError(f"query dim {query.shape[1]} does not match gallery {source!r} dim {dim}")
    gather = getattr(executor, "gather", None)
    whole = gather(source, query.shape[1]) if gather is not None else None
    if whole is not None:
        return retrieval_metrics(query, query_labels, whole.embeddings, whole.labels, query_ids=query_ids,
                                 gallery_ids=whole.ids, ks=ks, map_at=map_at)
    if map_at is not None:
        depth = topk_depth(ks, map_at)
        merged = None
        for part in executor.map(source, topk_pass, queries, depth=depth, threads=executor.search_threads):
            merged = part if merged is None else merge_shard_topk([merged, part], depth)
        return metrics_from_topk(merged, query_labels, ks, map_at)
    positives = merge_positives(list(executor.map(source, positives_pass, queries)))
    above = np.zeros(len(positives.ids), dtype=np.int64)
    for counts in executor.map(source, rank_pass, queries, positives=positives):
        above += counts
    return metrics_from_ranks(positives, above, ks)


# ---- the passes ------------------------------------------------------------------------------------------------


def topk_pass(queries: Queries, shard: Shard, *, depth: int, threads: int | None) -> ShardTopK:
    """mAP@k's one pass: each query's top ``depth`` in the shard."""
    return shard_topk(queries.embeddings, queries.labels, shard.embeddings, shard.labels, shard.ids, depth,
                      query_ids=queries.ids, threads=threads)


def positives_pass(queries: Queries, shard: Shard) -> QueryPositives:
    """Exact mAP's first pass: each query's positives in the shard, with their scores."""
    return shard_positives(queries.embeddings, queries.labels, shard.embeddings, shard.labels, shard.ids,
                           query_ids=queries.ids)


def rank_pass(queries: Queries, shard: Shard, *, positives: QueryPositives) -> np.ndarray:
    """Exact mAP's second pass: for each merged positive, the shard's items ranked above it."""
    return shard_rank_counts(queries.embeddings, positives, shard.embeddings, shard.ids, query_ids=queries.ids)


# how two results of a pass combine into one, where they do (the drivers' own folds above: a merge, a sum)
COMBINE: dict[PassFn, Callable[[Any, Any, dict], Any]] = {
    topk_pass: lambda a, b, inputs: merge_shard_topk([a, b], inputs["depth"]),
    rank_pass: lambda a, b, inputs: a + b,
}
