"""Sharded evaluation on Ray Data: the executor that maps a pass of ``bict_ray.retrieval.sharded`` over a shard
source's shards in Ray Data tasks, and ``evaluate_gallery`` (that executor + the one driver, on a committed version).

Shard *indices* are mapped through Ray Data tasks (a run of shards each, ``bict_ray.distributed.shards.map_shards``,
which raises a bict-ray error from a task as itself: a shard named by ``run_pass``, a corrupt file); a task
reads its shards one at a time (``read_shard``: for a gallery version, checksum verified) and returns for each the
small per-shard result of the pass (top-k lists, positives or rank counts), which the driver combines. Rows never
pass through the object store; the source, the queries and the pass's inputs (exact mAP's merged positives, 12
bytes per query-positive pair) do, once per pass (``ray.put``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import ray

from bict_ray.distributed.shards import map_shards
from bict_ray.errors import InputError
from bict_ray.retrieval.search import check_positive_int
from bict_ray.retrieval.shard import ShardSource
from bict_ray.retrieval.sharded import PassFn, Queries, run_passes, sharded_retrieval_metrics
from bict_ray.storage.gallery import GalleryVersion, open_gallery


@dataclass(frozen=True)
class RayDataExecutor:
    """Maps a pass over a source's shards in Ray Data tasks (``bict_ray.retrieval.sharded.ShardExecutor``).

    concurrency: shards searched at once; cpus_per_task: Ray CPUs each task holds (fractional, so that the tasks
    fit beside Ray Data's own on a small machine). Each pass searches with one thread: the tasks already run side
    by side on the machine's cores.
    """

    concurrency: int = 1
    cpus_per_task: float = 0.5
    search_threads = 1

    def __post_init__(self):
        check_positive_int("concurrency", self.concurrency)
        if self.cpus_per_task <= 0:
            raise InputError(f"cpus_per_task must be > 0, got {self.cpus_per_task}")

    def map(self, source: ShardSource, pass_fn: PassFn, queries: Queries, **inputs) -> Iterator:
        """Yield ``run_pass(source, i, pass_fn, queries, inputs)`` for every shard i of ``source``, in any order;
        a pass that combines comes folded, one result a task (``run_passes``)."""
        refs = ray.put((source, queries, inputs))
        yield from map_shards(source.num_shards, self.concurrency, _shard_pass, dict(refs=refs, pass_fn=pass_fn),
                              num_cpus=self.cpus_per_task)


def _shard_pass(indices: list[int], *, refs, pass_fn: PassFn) -> list:
    """One Ray Data task: ``pass_fn`` over each of its shards, folded into one result where the pass combines."""
    source, queries, inputs = ray.get(refs)
    return run_passes(source, indices, pass_fn, queries, inputs)


def evaluate_gallery(
    query: np.ndarray,
    query_labels: np.ndarray,
    gallery: str | GalleryVersion,
    *,
    query_ids: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
    map_at: int | None = None,
    concurrency: int = 1,
    cpus_per_task: float = 0.5,
) -> dict:
    """mAP and R@k of ``query`` (Q, D) float32, L2-normalised, against a committed gallery version, its shards
    searched in Ray Data tasks.

    query_labels (Q,) int; query_ids (Q,) int or None: a gallery row with the query's id is excluded from that
    query's ranking (the same image embedded by another model). gallery: a version path/URI or an open version.
    ks, map_at: as in ``retrieval_metrics`` (map_at None = exact mAP over the whole gallery, two passes).
    concurrency, cpus_per_task: as in ``RayDataExecutor``.
    Returns ``retrieval_metrics``'s dict: {"mAP", "R@<k>", "num_queries", "num_queries_without_positive"}.
    """
    version = gallery if isinstance(gallery, GalleryVersion) else open_gallery(gallery)
    return sharded_retrieval_metrics(query, query_labels, version, query_ids=query_ids, ks=ks, map_at=map_at,
                                     executor=RayDataExecutor(concurrency, cpus_per_task))
