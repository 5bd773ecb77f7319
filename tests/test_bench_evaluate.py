"""The evaluation benchmark's quick mode runs end to end and reports sane figures as its last line."""

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_benchmark_prints_its_figures_as_json_last():
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "bench/evaluate.py", "--quick"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    elapsed = time.perf_counter() - start
    assert run.returncode == 0, run.stderr
    assert elapsed < 20, f"--quick took {elapsed:.1f} s"
    lines = run.stdout.strip().splitlines()
    assert len(lines) > 1, "a human-readable table comes before the JSON line"
    report = json.loads(lines[-1])
    for key in (
        "queries_per_s", "speedup_vs_numpy_bruteforce", "exact_map_seconds", "map_at_100_seconds",
        "matmul_gflops", "search_gflops", "sharded_exact_seconds", "exact_map_matmul_seconds",
        "exact_map_vs_matmul", "sharded_vs_in_memory",
    ):
        assert report[key] > 0, key
    assert 0 < report["fraction_of_matmul_rate"] < 2
    # The two searches and the two evaluation paths see the same data: their answers must agree (up to
    # scores one float32 ulp apart, whose order a BLAS block shape may flip).
    assert report["topk_agreement"] > 0.9
    assert report["sharded_max_abs_diff"] < 1e-6
    assert 0 < report["mAP"] <= 1 and 0 < report["mAP@100"] <= 1
    assert report["ranking_kernel"] == "compiled"
    assert report["machine"]["cpu_count"] >= 1
    assert report["threads"]["faiss"] >= 1 and report["threads"]["blas"] >= 1
    assert report["quick"] is True and report["queries"] * report["gallery"] <= 10**7


def test_bad_sizes_are_refused():
    run = subprocess.run(
        [sys.executable, "bench/evaluate.py", "--quick", "--k", "5000"], cwd=REPO, capture_output=True, text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "--k and --shards must not exceed --gallery" in run.stderr
