"""Joining Ray: the same code runs as a local script, a test, and a job submitted to a cluster."""

from __future__ import annotations

import os

import ray

from bict_ray.config import RayConfig


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
        ray.init(address="local", num_cpus=cfg.num_cpus, dashboard_host="127.0.0.1", log_to_driver=True)
