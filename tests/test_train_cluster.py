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
from bict_ray.distributed.train import CHECKPOINT_FILE, train_embedding_model
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


@pytest.mark.parametrize("single_worker", ["task", "ray_train"])
def test_killed_worker_resumes_from_last_checkpoint(ray_session, smoke_data, tmp_path, single_worker):
    # the one worker is a Ray task by default, a Ray Train worker group on request: both come back from a SIGKILL
    epochs = 30  # long enough (about 0.3 s each on a quiet machine) to kill the worker mid-run
    config = load_config("configs/smoke.yaml", [f"train.epochs={epochs}", "train.max_failures=1",
                                                f"train.single_worker={single_worker}"])
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
    # the controller registers a checkpoint when it next polls the worker: kill a few epochs in, not at the first
    victim, epoch_at_kill = _worker_after_checkpoints(storage / name, min_epoch=5, timeout=240)
    os.kill(victim, signal.SIGKILL)
    assert epoch_at_kill < epochs - 2, "the run finished before the worker could be killed"
    thread.join(timeout=400)
    assert "error" not in outcome, outcome.get("error")
    history = outcome["model"].card.training["history"]
    assert [h["epoch"] for h in history] == list(range(epochs))  # every epoch, no gap, none twice
    attempts = [h["attempt"] for h in history]
    assert attempts[0] == 1 and attempts[-1] == 2 and attempts == sorted(attempts)
    assert attempts.index(2) >= 1  # resumed from a checkpoint, not from scratch
    assert outcome["model"].card.training["workers"][0]["pid"] != victim


def _worker_after_checkpoints(folder, min_epoch: int, timeout: float) -> tuple[int, int]:
    """Once the run has checkpointed epoch ``min_epoch`` or later: the rank-0 worker's pid and that epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        checkpoints = sorted(folder.glob("checkpoint_*/" + CHECKPOINT_FILE)) if folder.exists() else []
        if checkpoints:
            try:
                saved = torch.load(checkpoints[-1], weights_only=True)
                if saved["epoch"] >= min_epoch:
                    return saved["workers"][0]["pid"], saved["epoch"]
            except (EOFError, RuntimeError, FileNotFoundError):  # mid-write, or deleted as old: poll again
                pass
        time.sleep(0.2)
    pytest.fail(f"no checkpoint of epoch {min_epoch} in {folder} within {timeout}s")
