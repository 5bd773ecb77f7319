"""Ray Train across nodes and through the loss of a worker."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from bict_ray.config import load_config
from bict_ray.train import CHECKPOINT_FILE, train_embedding_model
from conftest import train_subset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_workers_on_two_nodes(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "multinode_train.py"),
                             str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    nodes = [w["node_id"] for w in report["workers"]]
    assert len(set(nodes)) == 2, report
    assert set(nodes) == set(report["worker_nodes"]) and report["head_node"] not in nodes
    assert report["epochs"] == 1


def test_killed_worker_resumes_from_last_checkpoint(ray_session, smoke_data, tmp_path):
    epochs = 8
    config = load_config("configs/smoke.yaml", [f"train.epochs={epochs}", "train.max_failures=1"])
    storage = tmp_path / "ray_results"
    name = f"test-fault-{tmp_path.name}"
    outcome = {}

    def train():
        try:
            outcome["model"] = train_embedding_model(
                config, tmp_path / "models" / "phi_1", 1, train_subset(smoke_data, [0, 1, 2, 3, 4]),
                [0, 1, 2, 3, 4], smoke_data.num_classes, run_name=name)
        except Exception as err:  # surfaced by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=train)
    thread.start()
    victim = _worker_pid_after_checkpoints(storage / name, at_least=2, timeout=240)
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=400)
    assert "error" not in outcome, outcome.get("error")
    history = outcome["model"].card["history"]
    assert [h["epoch"] for h in history] == list(range(epochs))  # every epoch, no gap, none twice
    attempts = [h["attempt"] for h in history]
    assert attempts[0] == 1 and attempts[-1] == 2 and attempts == sorted(attempts)
    assert outcome["model"].card["workers"][0]["pid"] != victim


def _worker_pid_after_checkpoints(folder, at_least: int, timeout: float) -> int:
    """Once the run has saved ``at_least`` checkpoints, the pid of the rank-0 worker that saved the latest."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        checkpoints = sorted(folder.glob("checkpoint_*/" + CHECKPOINT_FILE)) if folder.exists() else []
        if len(checkpoints) >= at_least:
            try:
                saved = torch.load(checkpoints[-1], weights_only=True)
                return saved["workers"][0]["pid"]
            except (EOFError, RuntimeError):  # caught mid-write; the next poll reads it whole
                pass
        time.sleep(0.2)
    pytest.fail(f"no {at_least} checkpoints in {folder} within {timeout}s")
