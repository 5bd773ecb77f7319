"""The one way gallery work is spread over a cluster: shard *indices* mapped through Ray Data tasks.

Extraction, upgrades and sharded evaluation all hand each task a run of consecutive shard indices; the task reads
and writes its shards itself, so rows never pass through the object store and a task's output for shard i depends
on shard i alone (what makes an upgrade resumable to identical bytes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import ray

from bict_ray.errors import project_error

# Tasks per concurrent slot: each task takes an equal run of consecutive shards. Few and long, because Ray Data
# notices a finished task only every 0.1 s and a task's start costs too: upgrading 524k x 256 rows with 2 slots
# on 2 cores ran at 56k rows/s in 8 tasks a slot, 69k in 2, 75k in 1. Two, so that a slow slot can hand its
# second task to a faster one. A task lost with its node costs little either way: its shards already staged
# are skipped when it runs again.
TASKS_PER_SLOT = 2


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
    at a pipeline's start that reservation holds one task's CPU, so the second slot started 1.0 s after the first,
    every time (Ray 2.60, 2 CPUs, warm workers; the same with ``RAY_DATA_CLUSTER_AUTOSCALER=V2``), and, all tasks
    being equally long, the last one ended 1.0 s after the others: a 1M-row identity upgrade left a core idle for
    2 of its 6 s. A shard pipeline needs no object-store budget (its blocks are shard indices in and one record
    per shard out; rows go from file to file inside the tasks), and ``TaskPoolStrategy(size=...)`` and Ray's own
    CPU accounting still bound how many tasks run. ``context`` is the dataset's own copy (``from_items`` copies the
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


@contextlib.contextmanager
def project_errors() -> Iterator[None]:
    """Re-raise a bict-ray error raised inside a task as itself, not wrapped in Ray's task errors.

    Ray delivers it as a ``RayTaskError`` (or Ray Data's ``UserCodeException``) whose message is the whole remote
    traceback, with the message that names the problem (a corrupt shard, a version committed meanwhile) at its end;
    the caller gets the same error type and message as if the check had run in the driver.
    """
    try:
        yield
    except Exception as err:
        known = project_error(err)
        if known is None or known is err:
            raise
        raise type(known)(*known.args) from err
