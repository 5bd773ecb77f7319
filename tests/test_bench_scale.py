"""The scale run's quick mode: a synthetic gallery synthesised, upgraded and evaluated, with its memory peaks."""

import json

from conftest import load_bench


def test_quick_scale_run_upgrades_evaluates_and_measures_memory(ray_session, capsys, tmp_path):
    report = load_bench("scale").main(["--quick", "--train-epochs", "1", "--work-dir", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) > 1 and json.loads(lines[-1]) == json.loads(json.dumps(report))
    stages = report["stages"]
    for stage in ("synthesise v1", "upgrade v1 -> v2", "evaluate backward", "evaluate forward"):
        assert stages[stage]["rows"] == report["rows"] and stages[stage]["rows_per_s"] > 0, stage
    for test in ("old_self", "backward", "forward", "backward_exact"):
        assert 0 < report["metrics"][test]["mAP"] <= 1, test
    memory = report["memory"]
    # the driver and the Ray workers that did the work were sampled
    assert memory["driver_peak_uss_mib"] > 0 and memory["workers_sampled"] >= 1
    assert memory["worker_peak_uss_mib"] > 0 and memory["workers_sum_peak_uss_mib"] >= memory["worker_peak_uss_mib"]
    assert report["gallery_bytes_written"] > 2 * report["rows"] * report["dim"] * 4 * 0.9
    assert list(tmp_path.iterdir()) == []  # the versions are removed after the run
