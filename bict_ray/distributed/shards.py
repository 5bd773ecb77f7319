"""The one way gallery work is spread over a cluster: shard *indices* mapped through Ray Data tasks.

Extraction, upgrades and sharded evaluation all hand each task a run of consecutive shard indices; the task reads
and writes its shards itself, so rows never pass through the object store and a task's output for shard i depends
on shard i alone (what makes an upgrade resumable to identical bytes).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import ray

from bict_ray.errors import BictError, StorageError, last_line

# Tasks per concurrent slot: each task takes an equal run of consecutive shards. Few and long, because Ray Data
# notices a finished task only at its next poll and a task's start costs too: fewer tasks a slot upgraded faster
# (measured: BENCHMARKS.md, section "Gallery upgrade", step 4). Two, so that a slow slot can hand its
# second task to a faster one. A task lost with its node costs little either way: its shards already staged
# are skipped when it runs again.
TASKS_PER_SLOT = 2


def map_shards(num_shards: int, concurrency: int, fn: Callable, fn_kwargs: dict, num_cpus: float,
               num_gpus: float = 0) -> Iterator[Any]:
    """Yield the results of ``fn(indices, **fn_kwargs)`` (a list of shard indices in, one picklable result per index
    out), run in tasks as ``map_shard_tasks`` runs them, in no particular order.

    A bict-ray error that ``fn`` raises comes back as data and is raised here as itself: the caller gets the check's
    own error and message (a corrupt shard, a version committed meanwhile), where Ray would deliver it wrapped in a
    remote traceback and log it as a failed task. So does a failed store (an OSError from pyarrow or the OS: an
    object store gone, a full disk), as a ``StorageError`` with the store's message. Any other exception fails the
    task as usual.
    """
    dataset = map_shard_tasks(num_shards, concurrency, _reporting, {"fn": fn, "fn_kwargs": fn_kwargs},
                              num_cpus=num_cpus, num_gpus=num_gpus)
    for row in dataset.iter_rows():
        value = pickle.loads(row["result"])
        if isinstance(value, BictError):
            raise value
        yield value


def _reporting(batch: dict[str, np.ndarray], *, fn: Callable, fn_kwargs: dict) -> dict[str, np.ndarray]:
    """One task of ``map_shards``: its results, or the bict-ray error it raised, each pickled (results may be
    numpy-holding dataclasses: one pickled value each travels whole)."""
    try:
        results = fn(batch["id"].tolist(), **fn_kwargs)
    except BictError as err:
        results = [err]
    except OSError as err:
        results = [StorageError(last_line(err))]
    return {"result": np.array([pickle.dumps(r, protocol=5) for r in results], dtype=object)}


def map_shard_tasks(num_shards: int, concurrency: int, fn: Callable, fn_kwargs: dict, num_cpus: float,
                    num_gpus: float = 0) -> ray.data.Dataset:
    """``fn(batch, **fn_kwargs)`` over the shard indices 0 .. num_shards-1 in Ray Data tasks, at most
    ``concurrency`` at once: TASKS_PER_SLOT tasks a slot, each called once with a run of consecutive shard indices
    (``batch["id"]``).

    The indices come from the driver (``from_items``), not from a read task (``ray.data.range``): such a task holds
    a whole CPU, and on nodes of 1 CPU it deadlocks beside map tasks that need more than the rest of its node.
    """
    slots = max(1, min(concurrency, num_shards))
    per_task = -(-num_shards // (TASKS_PER_SLOT * slots))
    indices = ray.data.from_items([{"id": i} for i in range(num_shards)],
                                  override_num_blocks=-(-num_shards // per_task))
    _start_all_slots_at_once(indices.context)
    return indices.map_batches(fn, fn_kwargs=fn_kwargs, batch_size=None, compute=ray.data.TaskPoolStrategy(size=slots),
                               num_cpus=num_cpus, num_gpus=num_gpus)


def _start_all_slots_at_once(context: ray.data.DataContext) -> None:
    """Let a shard pipeline start all its tasks at once: without its object-store budget policy.

    Ray Data's ResourceBudget backpressure policy sizes each operator's budget from the resources its cluster
    autoscaler has reserved for the dataset, read once a second (``ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S``);
    at a pipeline's start that reservation holds one task's CPU, so the second slot started one update later than
    the first, every time (also with ``RAY_DATA_CLUSTER_AUTOSCALER=V2``), and, all tasks being equally long, the
    last one ended as much later than the others, leaving a core idle for a good part of a short upgrade
    (measured: BENCHMARKS.md, section "Gallery upgrade"; the Ray version it was seen with: docs/RAY.md). A shard
    pipeline needs no object-store budget (its blocks are shard indices in and one record per shard out; rows go
    from file to file inside the tasks), and ``TaskPoolStrategy(size=...)`` and Ray's own CPU accounting still
    bound how many tasks run. ``context`` is the dataset's own copy (``from_items`` copies the
    driver's), so other datasets keep every policy. Left as it is if this Ray names its policies otherwise."""
    try:
        from ray.data._internal.execution.backpressure_policy import (
            ENABLED_BACKPRESSURE_POLICIES,
            ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
        )
    except ImportError:
        return
    enabled = context.get_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, ENABLED_BACKPRESSURE_POLICIES)
    context.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
                       [p for p in enabled if p.__name__ != "ResourceBudgetBackpressurePolicy"])
