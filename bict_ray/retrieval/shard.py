"""A gallery shard, and the shard sources sharded evaluation reads (numpy only: the gallery store imports it).

A shard is ``Shard(embeddings (n, D) float32, labels (n,) int64, ids (n,) int64)``, in that order everywhere: what
``GalleryVersion.read_shard`` returns, what the per-shard passes of ``bict_ray.retrieval.metrics`` take, what a
``ShardSource`` serves. A *shard source* is anything with ``num_shards`` and ``read_shard(index)`` returning a
``Shard`` (ids unique across all its shards): a committed gallery version, ``ShardList`` (arrays in memory), or
``bict_ray.retrieval.protocol.PartialRefresh`` (two versions mixed).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, Protocol

import numpy as np

from bict_ray.errors import InputError

# Largest | ||e|| - 1 | accepted for an embedding that should be L2-normalised, by the search and by a gallery
# declared normalised: float32 rounding of a unit row stays far below it, a row never normalised far above it.
NORM_TOLERANCE = 1e-3


class Shard(NamedTuple):
    """One gallery shard: embeddings (n, D) float32, labels (n,) int64, ids (n,) int64, row-aligned."""

    embeddings: np.ndarray
    labels: np.ndarray
    ids: np.ndarray


class ShardSource(Protocol):
    """What sharded evaluation reads: ``num_shards`` shards, each read on its own (one in memory at a time).

    A source must pickle (the Ray Data executor sends it to its tasks) and ``read_shard`` must give the same shard
    wherever it runs.
    """

    @property
    def num_shards(self) -> int: ...

    def read_shard(self, index: int) -> Shard: ...


class ShardList:
    """Shards held in memory, served as a shard source (views of the caller's arrays; nothing is copied)."""

    def __init__(self, shards: Iterable[Shard | tuple[np.ndarray, np.ndarray, np.ndarray]]):
        self.shards = [Shard(*shard) for shard in shards]

    @classmethod
    def split(cls, embeddings: np.ndarray, labels: np.ndarray, ids: np.ndarray, rows_per_shard: int) -> ShardList:
        """Rows in their order, cut into shards of ``rows_per_shard`` (the last one shorter; one empty shard for
        no rows), as a gallery stores them."""
        if isinstance(rows_per_shard, bool) or not isinstance(rows_per_shard, (int, np.integer)) or rows_per_shard < 1:
            raise InputError(f"rows_per_shard must be a positive integer, got {rows_per_shard!r}")
        starts = range(0, max(len(embeddings), 1), int(rows_per_shard))
        return cls(Shard(embeddings[s : s + rows_per_shard], labels[s : s + rows_per_shard],
                         ids[s : s + rows_per_shard]) for s in starts)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def shard_rows(self) -> list[int]:
        """Rows of every shard, in shard order."""
        return [len(shard.ids) for shard in self.shards]

    def read_shard(self, index: int) -> Shard:
        return self.shards[index]

    def __repr__(self) -> str:
        return f"ShardList({self.num_shards} shards, rows={sum(self.shard_rows)})"
