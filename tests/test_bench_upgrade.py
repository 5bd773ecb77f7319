"""The gallery-upgrade benchmark's quick mode runs end to end (its own Ray instance) and reports sane figures
as its last line; bad sizes are refused before anything runs."""

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_benchmark_prints_its_figures_as_json_last(tmp_path):
    start = time.perf_counter()
    # Ray's fixed costs dominate --quick: its start and six short pipelines, 40-70 s on 2 busy cores.
    run = subprocess.run(
        [sys.executable, "bench/upgrade.py", "--quick", "--workdir", str(tmp_path)], cwd=REPO, capture_output=True,
        text=True, timeout=400,
    )
    elapsed = time.perf_counter() - start
    assert run.returncode == 0, run.stderr[-4000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) > 1, "a human-readable table comes before the JSON line"
    assert any(line.startswith("  ours: upgrade_gallery") for line in lines[:-1])
    report = json.loads(lines[-1])
    for key in (
        "speedup_vs_single_process", "fraction_of_identity", "peak_rss_mb", "peak_anon_mb", "rows", "dim",
        "gallery_bytes", "ours_rows_per_s", "single_process_rows_per_s", "memcopy_gb_per_s", "memcopy_rows_per_s",
        "identity_fraction_of_disk_bound", "fraction_of_compute_bound", "fraction_of_shared_cores_bound",
    ):
        assert report[key] > 0, key
    for path in ("ours", "identity", "disk_bound", "compute_bound", "shared_cores_bound"):
        rates = report[f"{path}_rows_per_s_by_concurrency"]
        assert set(rates) == {"1", "2"} and all(rate > 0 for rate in rates.values()), path
    assert all(seconds > 0 for seconds in report["seconds"].values())
    assert report["seconds"]["pipeline_fixed"] > 0 and report["concurrency"] == [1, 2]
    for c in ("1", "2"):  # psi and the pipeline's own work on the same cores: slower than either alone
        bound = report["shared_cores_bound_rows_per_s_by_concurrency"][c]
        assert bound < min(report["identity_rows_per_s_by_concurrency"][c],
                           report["compute_bound_rows_per_s_by_concurrency"][c])
    # correctness of every output, checked by the benchmark itself
    for key in ("rows_equal", "ids_equal", "ray_equals_single_process", "identity_equals_input", "psi_moved_rows"):
        assert report[key] is True, key
    # the bfloat16 run: its own rate, and rows that moved from float32's by bfloat16 rounding only
    fast = report["bfloat16"]
    assert fast["rows_per_s"] > 0 and fast["fraction_of_identity"] > 0 and fast["psi_only_rows_per_s_1_thread"] > 0
    assert 0 < fast["max_abs_diff_vs_float32"] < 0.01 and fast["min_cosine_vs_float32"] > 0.999
    assert report["threads"]["single_process_torch"] >= 1 and report["threads"]["task_torch"] >= 1
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and len(machine["load_avg_start"]) == 3 and len(machine["load_avg_end"]) == 3
    assert report["quick"] is True and report["rows"] <= 10_000
    assert report["ray_started_here"] is True
    assert list(tmp_path.iterdir()) == [], "the benchmark removes its galleries"
    print(f"bench/upgrade.py --quick took {elapsed:.1f} s")


def test_bad_sizes_are_refused():
    run = subprocess.run(
        [sys.executable, "bench/upgrade.py", "--quick", "--dim", "0"], cwd=REPO, capture_output=True, text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "--dim must be at least 1" in run.stderr


def test_a_pool_that_would_hang_is_refused():
    run = subprocess.run(
        [sys.executable, "bench/upgrade.py", "--quick", "--concurrency", "3", "--cpus-per-task", "1",
         "--ray-cpus", "2"], cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 2
    assert "needs more than --ray-cpus 2: the tasks could never run at once" in run.stderr
