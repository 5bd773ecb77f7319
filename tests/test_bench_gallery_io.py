"""The gallery I/O benchmark's quick mode runs end to end (no Ray) and reports sane figures as its last line."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_benchmark_prints_its_figures_as_json_last(tmp_path):
    run = subprocess.run([sys.executable, "bench/gallery_io.py", "--quick", "--workdir", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = run.stdout.strip().splitlines()
    assert any("identity read->write->commit" in line for line in lines[:-1]), "a table comes before the JSON"
    report = json.loads(lines[-1])
    assert set(report["encodings"]) == {"binary", "tensor"}
    for figures in report["encodings"].values():
        for key in ("parquet_write_gb_per_s", "parquet_read_gb_per_s", "store_write_rows_per_s",
                    "store_read_rows_per_s", "identity_rows_per_s", "identity_fraction_of_disk_bound"):
            assert figures[key] > 0, key
        assert figures["identity_equals_input"] is True
        assert figures["disk_bound_rows_per_s"] > 0
        # a row costs its embedding's bytes and little more, whichever the encoding (id, label, origins, footer)
        assert 4 * report["dim"] <= figures["shard_bytes_per_row"] < 4 * report["dim"] + 64
    for key in ("sha256_gb_per_s", "blake3_gb_per_s", "binary_vs_tensor_identity",
                "identity_fraction_of_disk_bound"):
        assert report[key] > 0, key
    assert list(tmp_path.iterdir()) == []  # its galleries are removed
