"""Table formats against the gallery's own commit (issue 17, item 2): write, read, and what a killed writer's rerun
leaves, for the same rows in the same shards.

The gallery store writes each shard as its own Parquet file and publishes a version with a manifest written last
(on S3 by a conditional put). Delta Lake (``deltalake``) and Lance (``pylance``) solve the same problem with a
transaction log or a versioned manifest. Each format writes ``--shards`` shards of ``--rows-per-shard`` rows of
256-d float32 (ids, labels, embeddings), one process, local disk:

- write: ours = ``GalleryWriter.write_shard`` per shard, then ``commit`` (the manifest); Delta and Lance as a
  pipeline would use them with one commit for the whole version (all shards' tables in one ``write_deltalake`` /
  ``lance.write_dataset``) and as shard-by-shard appends (a commit per shard, what a resumable writer would need);
- read: every row back as an (N, 256) float32 array with its ids (ours checks each shard's BLAKE3 on the way);
- rerun: the writer is "killed" after half the shards and run again from the start, as a rerun of an upgrade
  does. Ours skips the shards already staged and commits the same bytes; appends commit every shard again unless
  the writer keeps its own record of what was committed. The rows each format then holds are counted.

Prints a table, then one JSON line, the last line.

    python bench/table_formats.py            # 16 shards of 65,536 rows (1M rows, 1 GiB): about a minute
    python bench/table_formats.py --quick    # 4 shards of 2,048 rows
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import log, machine_info, parse_with_presets  # noqa: E402

FULL = dict(shards=16, rows_per_shard=65_536)
QUICK = dict(shards=4, rows_per_shard=2_048)
DIM = 256


def main(argv: list[str] | None = None) -> dict:
    args = parse_with_presets(_parser(), argv, QUICK, FULL)
    os.environ.setdefault("LANCE_LOG", "error")  # Lance warns on stderr that each new dataset will be created
    import deltalake
    import lance
    import numpy as np
    import pyarrow as pa

    load_start = os.getloadavg()
    rng = np.random.default_rng(args.seed)
    rows = args.shards * args.rows_per_shard
    embeddings = rng.standard_normal((rows, DIM), dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    ids = np.arange(rows, dtype=np.int64)
    labels = rng.integers(0, 100, rows).astype(np.int64)
    parts = [slice(i * args.rows_per_shard, (i + 1) * args.rows_per_shard) for i in range(args.shards)]

    def table(part):
        return pa.table({"id": ids[part], "label": labels[part],
                         "embedding": pa.FixedSizeListArray.from_arrays(embeddings[part].ravel(), DIM)})

    formats = {}
    work = Path(tempfile.mkdtemp(prefix="bict-bench-formats-", dir=args.work_dir))
    try:
        formats["ours (manifest last)"] = measure(work / "ours", rows, **ours(ids, labels, embeddings, parts))
        formats["Delta Lake, one commit"] = measure(work / "delta1", rows, **delta(deltalake, table, parts, True))
        formats["Delta Lake, a commit a shard"] = measure(work / "delta", rows, **delta(deltalake, table, parts, False))
        formats["Lance, one commit"] = measure(work / "lance1", rows, **lance_format(lance, table, parts, True))
        formats["Lance, a commit a shard"] = measure(work / "lance", rows, **lance_format(lance, table, parts, False))
        for name, result in formats.items():
            got_ids = result.pop("ids")
            # the read is the version: the same ids, each once
            result["read_ok"] = bool(len(got_ids) == rows and np.array_equal(np.sort(got_ids), ids))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"benchmark": "table_formats", "quick": args.quick, "shards": args.shards,
              "rows_per_shard": args.rows_per_shard, "rows": rows, "dim": DIM, "formats": formats,
              "machine": machine_info(load_start, deltalake=deltalake.__version__, lance=lance.__version__,
                                      pyarrow=pa.__version__)}
    print_table(report)
    print(json.dumps(report))
    return report


def measure(folder: Path, rows: int, write, read, rerun) -> dict:
    """Write a version into ``folder``, read it back, then in a fresh folder write half, "kill", rerun whole."""
    log(f"{folder.name} ...")
    started = time.perf_counter()
    write(str(folder), None)
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    ids = read(str(folder))
    read_s = time.perf_counter() - started
    again = str(folder) + "-rerun"
    rewritten = rerun(again)
    held = len(read(again))
    return {"write_rows_per_s": rows / write_s, "read_rows_per_s": rows / read_s, "write_seconds": write_s,
            "read_seconds": read_s, "rows_after_killed_rerun": held, "rerun_duplicates": held - rows,
            "shards_written_by_rerun": rewritten, "ids": ids}


def ours(ids, labels, embeddings, parts):
    from bict_ray.storage.gallery import GalleryWriter, open_gallery

    def write(out, stop_after) -> int:
        writer = GalleryWriter(out, dim=DIM, lineage=["phi_1"], space="phi_1")
        records = []
        for index, part in enumerate(parts):
            if stop_after is not None and index == stop_after:
                return len(records)  # killed: the staged shards stay, nothing is committed
            if writer.has_shard(index, expected_rows=part.stop - part.start):
                continue  # what a rerun does: shard i is a function of shard i, staged already
            records.append(writer.write_shard(index, ids[part], labels[part], embeddings[part]))
        writer.commit(num_shards=len(parts), records=records)
        return len(records)

    def read(out):
        version = open_gallery(out)
        return np_concat([shard.ids for shard in version.iter_shards()])

    def rerun(out) -> int:
        write(out, len(parts) // 2)
        return write(out, None)

    return dict(write=write, read=read, rerun=rerun)


def delta(deltalake, table, parts, one_commit: bool):
    def commit(out, tables):
        deltalake.write_deltalake(out, tables, mode="append")

    def read(out):
        return deltalake.DeltaTable(out).to_pyarrow_table(columns=["id", "embedding"]).column("id").to_numpy()

    return _appending(commit, read, table, parts, one_commit)


def lance_format(lance, table, parts, one_commit: bool):
    def commit(out, tables):
        lance.write_dataset(tables, out, mode="append")

    def read(out):
        return lance.dataset(out).to_table(columns=["id", "embedding"]).column("id").to_numpy()

    return _appending(commit, read, table, parts, one_commit)


def _appending(commit, read, table, parts, one_commit: bool) -> dict:
    """A format's writer: the version in one commit (a killed write leaves no version, and a rerun writes every
    shard again), or a commit a shard (a rerun appends every shard again)."""

    def write(out, stop_after) -> int:
        chosen = parts if stop_after is None else parts[:stop_after]
        if one_commit:
            if stop_after is None:
                commit(out, _concat([table(part) for part in chosen]))
                return len(chosen)
            return 0  # killed before its commit: its files, if any, belong to no version
        for part in chosen:
            commit(out, table(part))
        return len(chosen)

    def rerun(out) -> int:
        write(out, len(parts) // 2)
        return write(out, None)

    return dict(write=write, read=read, rerun=rerun)


def _concat(tables):
    import pyarrow as pa

    return pa.concat_tables(tables)


def np_concat(arrays):
    import numpy as np

    return np.concatenate(arrays)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 shards of 2,048 rows (the smoke test)")
    parser.add_argument("--shards", type=int, help="shards of the version (16; --quick 4)")
    parser.add_argument("--rows-per-shard", type=int, help="rows a shard (65,536; --quick 2,048)")
    parser.add_argument("--work-dir", default=None, help="where the tables are written (a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def print_table(report: dict) -> None:
    print(f"table formats: {report['rows']:,} rows x {report['dim']} in {report['shards']} shards of "
          f"{report['rows_per_shard']:,}, one process, local disk")
    print(f"  {'format':<30} {'write rows/s':>13} {'read rows/s':>12}   a rerun after a kill at half the shards")
    for name, run in report["formats"].items():
        held = f"{run['rerun_duplicates']:+,} rows duplicated" if run["rerun_duplicates"] else "the version exact"
        print(f"  {name:<30} {run['write_rows_per_s']:13,.0f} {run['read_rows_per_s']:12,.0f}   "
              f"wrote {run['shards_written_by_rerun']} of {report['shards']} shards, {held}")


if __name__ == "__main__":
    main()
