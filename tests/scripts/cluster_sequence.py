"""Drivers for tests/test_cluster_sequence.py, each on its own 3-node ray.cluster_utils.Cluster.

Usage: cluster_sequence.py sequence OUT | node-loss OUT | train-node-loss OUT. They run in a subprocess because the test session holds
an in-process Ray instance of its own. The head has no CPUs and each worker node one CPU, so two Train workers
(1 CPU each) and two gallery tasks (0.6 CPU each) can only be placed one per node. The last line printed is a JSON
report of where things ran (after REPORT_PREFIX); the artifacts stay in OUT for the test to check.

sequence: the smoke sequence (train phi_1, extract v1, train phi_2 and psi_1_2, upgrade v2, evaluate) with Train
workers and Ray Data tasks spread over the two worker nodes.

node-loss: a gallery upgrade during which one worker node is removed (its processes killed) once a few shards are
staged, and a replacement node added; the test compares the result with psi applied in-process.

train-node-loss: phi_1 trained by two Ray Train workers, one a node, during which one worker node is removed once
the run has checkpointed a few epochs, and a replacement added; the model card says where each attempt ran.
"""

import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

import numpy as np
import ray
import torch
from ray.cluster_utils import Cluster

WORKER_NODES = 2
GALLERY_CPUS = 0.6  # > 0.5: two gallery tasks never fit on one 1-CPU node
# node-loss: shards costly enough (a wide psi) that the upgrade is still running when a node goes away
SHARDS, ROWS_PER_SHARD, DIM, HIDDEN = 40, 2000, 16, 1024
REMOVE_AFTER_SHARDS = 4
# train-node-loss: epochs enough (under a second each here) that the run is still training when the node goes
TRAIN_EPOCHS, REMOVE_AFTER_EPOCH = 20, 3
REPORT_PREFIX = "REPORT "  # Ray's own log lines may follow the report on stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(attempts: int = 3) -> Cluster:
    """Head (0 CPUs) plus WORKER_NODES 1-CPU nodes, connected. The head's dashboard agent gets a free port of its
    own (the default one may be held by another Ray instance on this machine); a failed start is retried."""
    for attempt in range(1, attempts + 1):
        cluster = None
        try:
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 0, "include_dashboard": False, "dashboard_port": free_port(),
                "dashboard_agent_listen_port": free_port(),
                # notice a killed node within about a second (the default is about 15 s)
                "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
            for _ in range(WORKER_NODES):
                cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            return cluster
        except Exception as err:  # noqa: BLE001 - a port taken between free_port() and bind: start again
            print(f"cluster start attempt {attempt} failed: {err!r}", file=sys.stderr, flush=True)
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
            if attempt == attempts:
                raise
            time.sleep(2)


def run_smoke_sequence(cluster: Cluster, out: str) -> dict:
    from bict_ray.config import load_config
    from bict_ray.pipeline.sequence import run_sequence

    config = load_config("configs/smoke.yaml", [
        "train.num_workers=2", "train.cpus_per_worker=1", "train.ingest=stream", "train.epochs=1", "transform.epochs=1",
        "gallery.concurrency=2", f"gallery.cpus_per_task={GALLERY_CPUS}", "gallery.rows_per_shard=50",
        "eval.embed=tasks"])
    run_sequence(config, out, log=lambda line: print(line, file=sys.stderr, flush=True))
    return {}


def run_node_loss(cluster: Cluster, out: str) -> dict:
    from bict_ray.config import GalleryConfig
    from bict_ray.core.models import UpgradeTransform
    from bict_ray.distributed import shards
    from bict_ray.distributed.pipelines import upgrade_gallery
    from bict_ray.storage.artifacts import ModelCard, load_artifact, save_artifact
    from bict_ray.storage.gallery import write_gallery

    rng = np.random.default_rng(0)
    n = SHARDS * ROWS_PER_SHARD
    embeddings = rng.normal(size=(n, DIM)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    source = write_gallery(f"{out}/v1", rng.permutation(10 * n)[:n].astype(np.int64), rng.integers(0, 10, n),
                           embeddings, rows_per_shard=ROWS_PER_SHARD, lineage=["phi_1"], space="phi_1")
    torch.manual_seed(0)
    psi = UpgradeTransform(DIM, DIM, hidden=HIDDEN, layers=2)
    torch.nn.init.normal_(psi.mlp[-1].weight, std=0.05)  # a residual psi starts as the identity
    save_artifact(f"{out}/psi_1_2", psi, ModelCard("transform", "psi_1_2", source="phi_1", target="phi_2"))
    transform = load_artifact(f"{out}/psi_1_2")
    config = GalleryConfig(rows_per_shard=ROWS_PER_SHARD, concurrency=2, cpus_per_task=GALLERY_CPUS)
    # one shard a task: a task reports its shards when it ends, so the victim's work shows in the stats only if
    # some of its tasks ended before the crash
    shards.TASKS_PER_SLOT = SHARDS

    outcome = {}

    def upgrade():
        try:
            outcome["stats"] = upgrade_gallery(source, transform, f"{out}/v2", config=config)[1]
        except BaseException as err:  # noqa: BLE001 - reported to the test
            outcome["error"] = repr(err)

    staging = f"{out}/v2.staging"
    started = time.perf_counter()
    thread = threading.Thread(target=upgrade, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while staged(staging) < REMOVE_AFTER_SHARDS and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    crash = crash_and_replace(cluster, thread, outcome, "upgrade", 240, lambda: staged(staging))
    stats = outcome.get("stats")
    return {"error": outcome.get("error"), "victim": crash["victim"], "replacement": crash["replacement"],
            "staged_before_removal": crash["before"], "staged_after_removal": crash["after"],
            "running_after_removal": crash["running_after_removal"],
            "removed_at_s": round(crash["removed_at"] - started, 2),
            "upgrade_s": round(time.perf_counter() - started, 2),
            "stats": None if stats is None else {"rows": stats.rows, "shards": stats.shards,
                                                 "skipped_shards": stats.skipped_shards,
                                                 "nodes": sorted(stats.nodes)}}


def run_train_node_loss(cluster: Cluster, out: str) -> dict:
    import glob

    from bict_ray.config import load_config
    from bict_ray.core.data import load_dataset
    from bict_ray.distributed.train import CHECKPOINT_FILE, train_embedding_model

    config = load_config("configs/smoke.yaml", [f"train.epochs={TRAIN_EPOCHS}", "train.num_workers=2",
                                                "train.cpus_per_worker=1", "train.max_failures=1",
                                                "train.ingest=stream"])
    data = load_dataset(config.data, config.eval, config.scenario)
    classes = config.scenario.classes[0]
    train = data.train.subset(np.flatnonzero(np.isin(data.train.labels, classes)))
    outcome = {}

    def fit():
        try:
            outcome["card"] = train_embedding_model(config, f"{out}/models/phi_1", 1, train, classes,
                                                    data.num_classes, run_name="train-node-loss").card
        except BaseException as err:  # noqa: BLE001 - reported to the test
            outcome["error"] = repr(err)

    def checkpointed() -> int:
        epochs = []
        for path in glob.glob(f"{out}/ray_results/train-node-loss/checkpoint_*/{CHECKPOINT_FILE}"):
            try:
                epochs.append(torch.load(path, weights_only=True)["epoch"])
            except (EOFError, RuntimeError, FileNotFoundError):  # caught mid-write, or deleted as an old one
                pass
        return max(epochs, default=-1)

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    deadline = time.monotonic() + 240
    while checkpointed() < REMOVE_AFTER_EPOCH and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    crash = crash_and_replace(cluster, thread, outcome, "training", 400, checkpointed)
    card = outcome.get("card")
    return {"error": outcome.get("error"), "victim": crash["victim"], "replacement": crash["replacement"],
            "epoch_at_removal": crash["before"], "running_after_removal": crash["running_after_removal"],
            "history": None if card is None else [{k: h[k] for k in ("epoch", "attempt", "samples")}
                                                  for h in card.training["history"]],
            "ingest": None if card is None else card.training["ingest"], "split_rows": len(train),
            "workers": None if card is None else card.training["workers"]}


def crash_and_replace(cluster: Cluster, thread: threading.Thread, outcome: dict, what: str, timeout: float,
                      progress) -> dict:
    """Crash the first worker node (its raylet, object store and workers killed) while ``thread`` runs ``what``,
    add a replacement node and wait for ``thread``. ``progress()`` is read just before and just after the crash."""
    victim = sorted(cluster.worker_nodes, key=lambda node: node.node_id)[0]
    before = progress()
    cluster.remove_node(victim, allow_graceful=False)
    after, removed_at, running_after = progress(), time.perf_counter(), thread.is_alive()
    replacement = cluster.add_node(num_cpus=1)
    thread.join(timeout=timeout)
    if thread.is_alive():
        outcome["error"] = f"the {what} did not finish within {timeout:.0f} s of the node's removal"
    return {"victim": victim.node_id, "replacement": replacement.node_id, "before": before, "after": after,
            "removed_at": removed_at, "running_after_removal": running_after}


def staged(folder: str) -> int:
    return len([n for n in os.listdir(folder) if n.endswith(".parquet")]) if os.path.isdir(folder) else 0


def main(mode: str, out: str) -> None:
    run = {"sequence": run_smoke_sequence, "node-loss": run_node_loss, "train-node-loss": run_train_node_loss}[mode]
    # A Ray temp dir of our own (read when the cluster starts; inherited by its nodes): a Cluster writes its address
    # to <temp>/ray/ray_current_cluster, where any other process's plain ray.init() on this machine would find and
    # join it, and its shutdown deletes that file.
    private_tmp = None if "RAY_TMPDIR" in os.environ else tempfile.mkdtemp(prefix="bict-cs-", dir="/tmp")
    if private_tmp:
        os.environ["RAY_TMPDIR"] = private_tmp
    cluster = start_cluster()
    try:
        worker_nodes = sorted(node.node_id for node in cluster.worker_nodes)
        report = run(cluster, out)
        report = {"worker_nodes": worker_nodes, "head_node": cluster.head_node.node_id, **report}
        print(REPORT_PREFIX + json.dumps(report), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    if private_tmp:  # kept after a failure: the session logs are in it
        shutil.rmtree(private_tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
