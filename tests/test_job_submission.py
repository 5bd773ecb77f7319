"""A real local Ray cluster started with the `ray start` CLI (head + one more node), the smoke sequence submitted
with `ray job submit`, and the cluster stopped through its own process groups (never a machine-wide `ray stop`)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_ports() -> list[str]:
    """Per-node agent ports of our own: the test session's Ray instance already holds the default ones, and a
    job agent that cannot bind its port leaves the job server answering 'No available agent'."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


@pytest.fixture
def local_cluster(tmp_path_factory):
    temp = Path(f"/tmp/bict-{os.getpid()}")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    gcs, dashboard = free_port(), free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=1", *agent_ports(),
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp}",
         "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes = [head]
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for(lambda: _job_server_up(address, env), 120, "the head's job server")
        worker = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", f"--address=127.0.0.1:{gcs}", "--num-cpus=1", *agent_ports(),
             "--disable-usage-stats"],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(worker)
        yield address, env
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        # `ray start --block` stops its node's processes on SIGTERM; a node still up after a few seconds is waiting
        # on its own shutdown timeouts (about 30 s here), and its process group goes down with SIGKILL instead
        deadline = time.monotonic() + 5
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=60)


def test_submitted_smoke_sequence_succeeds(local_cluster, tmp_path):
    address, env = local_cluster
    out = tmp_path / "run"
    command = [str(BIN / "ray"), "job", "submit", f"--address={address}", f"--working-dir={ROOT}", "--",
               "python", "-m", "jobs.sequence", "--config", "configs/smoke.yaml", "--out", str(out),
               "--set", "train.epochs=1", "--set", "eval.matrix=false"]
    for _ in range(30):  # the job server answers before the head's job agent has registered
        submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in submit.stdout + submit.stderr:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout.lower()
    results = json.loads((out / "results.json").read_text())
    assert [s["step"] for s in results["steps"]] == [2]
    assert all(0 <= m["mAP"] <= 1 for m in results["steps"][0]["tests"].values())


def _job_server_up(address: str, env: dict) -> bool:
    probe = subprocess.run([str(BIN / "ray"), "job", "list", f"--address={address}"], env=env,
                           capture_output=True, text=True, timeout=60)
    return probe.returncode == 0


def _wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(2)
    pytest.fail(f"{what} did not come up within {timeout}s")
