"""The training-ingest benchmark's quick mode runs all three ways end to end on the session's Ray instance."""

import json

from conftest import load_bench


def test_quick_benchmark_trains_in_memory_and_streamed(ray_session, capsys):
    report = load_bench("ingest").main(["--quick"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) > 1, "a human-readable table comes before the JSON line"
    assert json.loads(lines[-1]) == json.loads(json.dumps(report))
    assert set(report["ways"]) == {"memory", "stream", "stream_parquet"}
    for way, run in report["ways"].items():
        # every way trained whole epochs of its split, and its worker reported its memory
        assert run["images_per_s"] > 0 and run["samples_per_epoch"] >= report["batch_size"], way
        assert run["peak_rss_mib"] >= run["peak_uss_mib"] > 0, way
    assert report["fresh_ray_per_way"] is False  # the session's instance: the resident peaks are upper bounds
    assert report["stream_vs_memory_images_per_s"] > 0 and "stream_parquet_peak_uss_saving_mib" in report
