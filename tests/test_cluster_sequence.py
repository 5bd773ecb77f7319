"""The whole smoke sequence on a 3-node cluster with its run directory on S3, and a gallery upgrade that loses a worker
node halfway.

Each test drives its own ray.cluster_utils.Cluster from tests/scripts/cluster_sequence.py in a subprocess (the
session's ``ray_session`` fixture holds an in-process Ray instance), in a process group of its own so that a
timed-out run leaves no Ray processes behind.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bict_ray.core.embed import upgrade_embeddings
from bict_ray.storage.artifacts import load_artifact
from bict_ray.storage.gallery import open_gallery
from bict_ray.storage.rundir import RunDir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "cluster_sequence.py")
_spec = importlib.util.spec_from_file_location("cluster_sequence", SCRIPT)
script = importlib.util.module_from_spec(_spec)  # its constants: shard counts, report prefix
_spec.loader.exec_module(script)

TESTS = ("old_self", "new_self", "backward", "backward_prev", "forward", "deployed_before")


def run_script(mode: str, out, timeout: float) -> dict:
    """Run the script's ``mode`` on OUT; its report (where things ran). On a timeout its whole group is killed."""
    process = subprocess.Popen([sys.executable, SCRIPT, mode, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        stdout, stderr = process.communicate()
        pytest.fail(f"{mode} did not finish within {timeout} s:\n{stderr[-4000:]}")
    finally:
        if process.poll() is None:
            _kill_group(process)
        _reap_session(process.pid)
    assert process.returncode == 0, stderr[-4000:]
    reports = [line for line in stdout.splitlines() if line.startswith(script.REPORT_PREFIX)]
    assert reports, f"no report on stdout:\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return json.loads(reports[-1][len(script.REPORT_PREFIX):])


def _kill_group(process) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=30)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _reap_session(sid: int, grace: float = 10.0) -> None:
    """Kill what is left of the script's session (it leads one: start_new_session). Ray worker processes may
    outlive a cluster's shutdown in process groups of their own (a Train controller did, for minutes), but they
    keep the session id."""
    deadline = time.monotonic() + grace
    while True:
        left = _session_members(sid)
        if not left:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _session_members(sid: int) -> list[int]:
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
        except OSError:
            continue
        if int(fields[3]) == sid and int(name) != os.getpid():
            members.append(int(name))
    return members


def test_smoke_sequence_spreads_train_and_data_over_two_nodes(bucket, tmp_path, monkeypatch):
    # the run directory is on the tests' S3 server, as a cluster's would be on object storage: the nodes share it
    # through the bucket (galleries written there by the Ray Data tasks on both workers, checkpoints by Train)
    uri = f"s3://{bucket}/run"
    report = run_script("sequence", uri, timeout=900)
    workers = set(report["worker_nodes"])
    assert len(workers) == 2 and report["head_node"] not in workers

    monkeypatch.setenv("BICT_CACHE_DIR", str(tmp_path / "reader"))  # what another machine reads from the bucket
    out = RunDir(uri).path
    results = json.loads((out / "results.json").read_text())
    (step,) = results["steps"]
    assert step["step"] == 2 and set(step["tests"]) == set(TESTS)
    for name, metrics in step["tests"].items():
        for key in ("mAP", "R@1", "R@5", "R@10"):
            assert 0.0 <= metrics[key] <= 1.0, (name, key)

    # Ray Train: rank 0 and rank 1 of every fit on the two worker nodes
    for card in (out / "models" / "phi_1", out / "models" / "phi_2", out / "transforms" / "psi_1_2"):
        placed = json.loads((card / "model.json").read_text())["training"]["workers"]
        assert sorted(w["rank"] for w in placed) == [0, 1], card
        assert {w["node_id"] for w in placed} == workers, card
    # the embedding models trained on a Ray Data stream of their split, each worker on its half
    for card in (out / "models" / "phi_1", out / "models" / "phi_2"):
        training = json.loads((card / "model.json").read_text())["training"]
        assert training["ingest"] == "stream", card
        batch = 64  # configs/smoke.yaml's train.batch_size
        assert training["history"][0]["samples"] == 2 * (training["num_train"] // 2 // batch) * batch, card

    # Ray Data: both pipelines had shards processed on both worker nodes
    assert results["gallery_nodes"] == {"v1": sorted(workers), "v2": sorted(workers)}
    ids = [open_gallery(f"{uri}/gallery/{v}").read_all().ids for v in ("v1", "v2")]
    np.testing.assert_array_equal(np.sort(ids[0]), np.sort(ids[1]))


def test_upgrade_survives_losing_a_worker_node(tmp_path):
    report = run_script("node-loss", tmp_path, timeout=600)
    assert report["error"] is None, report
    # the node went away mid-upgrade, while shards were still to do
    assert report["running_after_removal"], report
    assert report["staged_before_removal"] >= script.REMOVE_AFTER_SHARDS, report
    assert report["staged_after_removal"] < script.SHARDS, report
    stats = report["stats"]
    assert (stats["shards"], stats["rows"]) == (script.SHARDS, script.SHARDS * script.ROWS_PER_SHARD), report
    # the replacement took over: the tasks lost with the victim (their outputs too, which lived in its object
    # store) ran again there, skipping the shards the victim had staged
    assert report["replacement"] in stats["nodes"], report

    source = open_gallery(str(tmp_path / "v1"))
    upgraded = open_gallery(str(tmp_path / "v2"))  # checks every shard's sha256 against the manifest on read
    assert upgraded.lineage == ["phi_1", "psi_1_2"] and upgraded.num_shards == source.num_shards
    source_embeddings, source_labels, source_ids = source.read_all()
    embeddings, labels, ids = upgraded.read_all()
    assert len(ids) == len(np.unique(ids)) == len(source_ids)  # every id once, none lost, none twice
    np.testing.assert_array_equal(ids, source_ids)
    np.testing.assert_array_equal(labels, source_labels)
    psi = load_artifact(tmp_path / "psi_1_2").module
    np.testing.assert_allclose(embeddings, upgrade_embeddings([psi], source_embeddings), rtol=0, atol=1e-5)


def test_training_survives_losing_a_worker_node(tmp_path):
    report = run_script("train-node-loss", tmp_path, timeout=600)
    assert report["error"] is None, report
    assert report["running_after_removal"] and report["epoch_at_removal"] >= script.REMOVE_AFTER_EPOCH, report
    history = report["history"]
    # every epoch once, resumed in a second attempt from a checkpoint, not from scratch (from the last one Ray Train
    # had registered: it takes up a checkpoint when it next polls the workers, so it may be one behind the files)
    assert [h["epoch"] for h in history] == list(range(script.TRAIN_EPOCHS)), report
    attempts = [h["attempt"] for h in history]
    assert attempts[0] == 1 and attempts[-1] == 2 and attempts == sorted(attempts), report
    assert attempts.index(2) >= 1, report
    # the second attempt's two workers: on the surviving node and the replacement, none on the lost one
    nodes = {w["node_id"] for w in report["workers"]}
    assert report["victim"] not in nodes and report["replacement"] in nodes and len(nodes) == 2, report
    # trained on a stream of the split, split again across the new worker group: every epoch, before the loss and
    # after it, one pass over the split between the two workers
    assert report["ingest"] == "stream", report
    share = report["split_rows"] // 2 // 64 * 64
    assert [h["samples"] for h in history] == [2 * share] * script.TRAIN_EPOCHS, report
