"""The table-format comparison's quick mode: every format reads its version back; what a killed writer's rerun
leaves is what docs/STORAGE.md says of each."""

import json

from conftest import load_bench


def test_quick_comparison_reads_back_and_counts_what_a_rerun_leaves(capsys, tmp_path):
    report = load_bench("table_formats").main(["--quick", "--work-dir", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) > 1 and json.loads(lines[-1]) == json.loads(json.dumps(report))
    formats, shards, half = report["formats"], report["shards"], report["rows"] // 2
    assert all(run["read_ok"] and run["write_rows_per_s"] > 0 for run in formats.values())
    # ours resumes: the rerun writes only the shards the killed writer had not staged, and the version is exact
    assert (formats["ours (manifest last)"]["shards_written_by_rerun"], formats["ours (manifest last)"]
            ["rerun_duplicates"]) == (shards - shards // 2, 0)
    for name in ("Delta Lake", "Lance"):
        # one commit: nothing was published before the kill, and the rerun writes every shard again
        assert (formats[f"{name}, one commit"]["shards_written_by_rerun"],
                formats[f"{name}, one commit"]["rerun_duplicates"]) == (shards, 0)
        # a commit a shard: the shards committed before the kill are committed twice
        assert formats[f"{name}, a commit a shard"]["rerun_duplicates"] == half
    assert list(tmp_path.iterdir()) == []
