"""Retrieval evaluation against a committed gallery version, its shards searched in parallel on Ray Data.

Gallery shard *indices* are mapped through Ray Data tasks (a run of shards each, ``bict_ray.distributed.shards``); a
task reads its shards one at a time (``GalleryVersion.read_shard``, checksum verified) and returns for each the
small per-shard result of ``bict_ray.retrieval.metrics`` (top-k lists, positives or rank counts), which the driver combines.
Rows never pass through the object store; the queries do, once (``ray.put``).
The result equals ``retrieval_metrics`` on the whole gallery in memory:

- mAP@k (``map_at`` set), one pass: ``shard_topk`` -> ``merge_shard_topk`` -> ``metrics_from_topk``.
- exact mAP, two passes: ``shard_positives`` -> ``merge_positives``; then ``shard_rank_counts``, summed ->
  ``metrics_from_ranks``. The merged positives (12 bytes per query-positive pair) go to the second pass by ref.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import ray

from bict_ray.distributed.shards import map_shard_tasks, project_errors
from bict_ray.retrieval.metrics import (
    merge_positives,
    merge_shard_topk,
    metrics_from_ranks,
    metrics_from_topk,
    shard_positives,
    shard_rank_counts,
    shard_topk,
)
from bict_ray.errors import InputError
from bict_ray.retrieval.search import check_embeddings, check_integer_vector, check_positive_int
from bict_ray.storage.gallery import GalleryVersion, open_gallery


def evaluate_gallery(
    query: np.ndarray,
    query_labels: np.ndarray,
    query_ids: np.ndarray | None,
    gallery: str | GalleryVersion,
    *,
    ks: Sequence[int] = (1, 5, 10),
    map_at: int | None = None,
    concurrency: int = 1,
    cpus_per_task: float = 0.5,
) -> dict:
    """mAP and R@k of ``query`` (Q, D) float32, L2-normalised, against a committed gallery version.

    query_labels (Q,) int; query_ids (Q,) int or None: a gallery row with the query's id is excluded from that
    query's ranking (the same image embedded by another model). gallery: a version path/URI or an open version.
    ks, map_at: as in ``retrieval_metrics`` (map_at None = exact mAP over the whole gallery, two passes).
    concurrency: shards searched at once; cpus_per_task: Ray CPUs each search task holds (fractional, so the
    tasks fit beside Ray Data's own on a small machine).
    Returns ``retrieval_metrics``'s dict: {"mAP", "R@<k>", "num_queries", "num_queries_without_positive"}.
    """
    version = gallery if isinstance(gallery, GalleryVersion) else open_gallery(gallery)
    query_labels, query_ids = _check_queries(query, query_labels, query_ids, version)
    ks = [check_positive_int("each of ks", k) for k in ks]
    if map_at is not None:
        map_at = check_positive_int("map_at", map_at)
    check_positive_int("concurrency", concurrency)
    if cpus_per_task <= 0:
        raise InputError(f"cpus_per_task must be > 0, got {cpus_per_task}")
    queries = ray.put((query, query_labels, query_ids))

    def run(pass_fn, **kwargs) -> Iterator:
        return _map_shards(version, queries, pass_fn, kwargs, concurrency, cpus_per_task)

    if map_at is not None:
        depth = max(max(ks, default=1), map_at)
        merged = None
        for part in run(_topk_pass, depth=depth):
            merged = part if merged is None else merge_shard_topk([merged, part], depth)
        return metrics_from_topk(merged, query_labels, ks, map_at)
    positives = merge_positives(list(run(_positives_pass)))
    above = np.zeros(len(positives.ids), dtype=np.int64)
    for counts in run(_rank_pass, positives=ray.put(positives)):
        above += counts
    return metrics_from_ranks(positives, above, ks)


def _map_shards(version: GalleryVersion, queries, pass_fn: Callable, kwargs: dict, concurrency: int,
                cpus_per_task: float) -> Iterator:
    """Yield ``pass_fn(query, labels, ids, shard, **kwargs)`` for every shard of ``version``, in any order."""
    num_shards = version.num_shards
    dataset = map_shard_tasks(version.num_shards, concurrency, _shard_pass,
                              dict(version=version, queries=queries, pass_fn=pass_fn, **kwargs), num_cpus=cpus_per_task)
    with project_errors():
        for row in dataset.iter_rows():
            # per-shard results are numpy-holding dataclasses: they travel as one pickled value each
            yield pickle.loads(row["result"])


def _shard_pass(batch: dict[str, np.ndarray], *, version: GalleryVersion, queries, pass_fn: Callable,
               **kwargs) -> dict[str, np.ndarray]:
    """One Ray Data task: ``pass_fn`` over each shard index of ``batch``, each result pickled."""
    query, labels, ids = ray.get(queries)
    results = []
    for index in batch["id"].tolist():
        shard = version.read_shard(index)
        results.append(pickle.dumps(pass_fn(query, labels, ids, shard, **kwargs), protocol=5))
    return {"result": np.array(results, dtype=object)}


def _topk_pass(query, labels, ids, shard, *, depth: int):
    shard_ids, shard_labels, emb = shard
    # one search thread: the tasks already run side by side on the machine's cores
    return shard_topk(query, labels, emb, shard_labels, shard_ids, depth, ids, threads=1)


def _positives_pass(query, labels, ids, shard):
    shard_ids, shard_labels, emb = shard
    return shard_positives(query, labels, emb, shard_labels, shard_ids, ids)


def _rank_pass(query, labels, ids, shard, *, positives):
    shard_ids, _, emb = shard
    return shard_rank_counts(query, ray.get(positives), emb, shard_ids, ids)


def _check_queries(query, query_labels, query_ids, version: GalleryVersion):
    check_embeddings("query", query)
    if len(query) == 0:
        raise InputError("query is empty")
    if query.shape[1] != version.dim:
        raise InputError(f"query dim {query.shape[1]} does not match gallery {version.path} dim {version.dim} "
                         f"(space {version.space})")
    query_labels = check_integer_vector("query_labels", query_labels, len(query))
    if query_ids is not None:
        query_ids = check_integer_vector("query_ids", query_ids, len(query))
    return query_labels, query_ids
