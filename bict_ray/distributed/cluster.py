"""Joining Ray: the same code runs as a local script, a test, and a job submitted to a cluster."""

from __future__ import annotations

import os

import ray

from bict_ray.config import RayConfig

# Ray Train's controller polls its workers every 2 s by default, so every fit() idles up to 2 s after its last epoch
# before it returns (its finish measured 5.0 s -> 1.5 s at 0.5 s: BENCHMARKS.md, "The demo's fixed costs"), and a
# sequence runs 2T - 1 fits. A poll is one small call per worker. A value set in the environment wins.
TRAIN_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def set_train_env_defaults() -> None:
    """Call before starting a local Ray instance: the processes it starts inherit this process's environment.
    (On a cluster the nodes' `ray start` sets the same: cluster.yaml.)"""
    for key, value in TRAIN_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def ensure_ray(cfg: RayConfig) -> None:
    """Connect once: to ``cfg.address`` (``auto``: the cluster running on this machine), else to the cluster a
    submitted job runs in ($RAY_ADDRESS), else start a local instance of this process's own.

    The local instance is started even when another Ray runs on the machine (``address="local"``): without it,
    ray.init would join that one and refuse ``num_cpus``. It binds its dashboard to 127.0.0.1 only;
    ``num_cpus`` applies only to it.
    """
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        set_train_env_defaults()
        ray.init(address="local", num_cpus=cfg.num_cpus, dashboard_host="127.0.0.1", log_to_driver=True)
