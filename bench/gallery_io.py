"""Gallery I/O benchmark (issue 18, item 1): what the embedding column's encoding costs, against the disk.

One process, one thread, no Ray: the store alone. One generated gallery (seeded random unit float32 rows), shards of
``--rows-per-shard`` rows, in a temporary folder under ``--workdir``. Measured in the same run, for each encoding of
the embedding column (``bict_ray.core.embedding_column.ENCODINGS``):

- Parquet alone: ``pq.write_table`` of one shard's table into memory and ``pq.read_table`` back to an (n, dim)
  array, as GB/s of embedding bytes: what the column's encoding costs without a disk;
- the store: ``GalleryWriter.write_shard`` of every shard plus ``commit`` (writing), ``read_shard`` with its checksum
  check of every shard (reading), and the identity loop ``read_shard`` -> ``write_shard`` -> ``commit``: an upgrade's
  I/O in one process, as rows/s;

and, as the bounds those are read against:

- raw disk: the encoding's shard files copied as raw bytes (each read whole, then written by temp file + rename as
  the store writes), right after the identity pass and with its output still on disk, so that both write into a
  page cache in the same state; ``disk_bound_rows_per_s`` is its rows/s, what an identity pass would reach if
  encoding, checks and hashing were free;
- BLAKE3 (the store's checksum) and sha256 (format 1's) of the same bytes: the store hashes every shard when writing
  and when reading it verified.

``identity_fraction_of_disk_bound`` = identity rows/s / disk_bound_rows_per_s, one process each (the Ray pipeline's
own figures are bench/upgrade.py's). The OS's page cache holds the files: reads come from memory, as they do in an
upgrade that reads shards just written, and writes go to the cache as the store's do (no fsync). Every timed write
starts after an ``os.sync()``, so that none pays for the dirty pages an earlier one left.

Prints a table, then one JSON line, the last line.

    python bench/gallery_io.py              # 1M rows x 256: 1 GB of embeddings, about a minute
    python bench/gallery_io.py --quick      # 16k rows x 64: seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine_info, print_rows  # noqa: E402

FULL = dict(rows=1_000_000, dim=256)
QUICK = dict(rows=16_384, dim=64)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load_start = os.getloadavg()
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from blake3 import blake3

    from bict_ray.storage.gallery import _PARQUET_OPTIONS, ENCODINGS, GalleryWriter, embeddings_from_column, write_gallery

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows, dim, per_shard = args.rows, args.dim, args.rows_per_shard
    embeddings = rng.standard_normal((rows, dim), dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    ids, labels = np.arange(rows, dtype=np.int64), rng.integers(0, 100, rows)
    row_bytes = 16 + 4 * dim
    work = Path(tempfile.mkdtemp(prefix="bict-gallery-io-", dir=args.workdir))
    report = {"rows": rows, "dim": dim, "rows_per_shard": per_shard, "encodings": {}}
    try:
        for encoding in ENCODINGS:
            figures = {}
            # Parquet alone, on one shard in memory
            version = write_gallery(str(work / f"sample-{encoding}"), ids[:per_shard], labels[:per_shard],
                                    embeddings[:per_shard], rows_per_shard=per_shard, lineage=["phi_1"],
                                    space="phi_1", encoding=encoding)
            table = pq.read_table(version.shard_paths[0])
            shard_gb = embeddings[:per_shard].nbytes / 1e9
            write_s = _best(lambda: pq.write_table(table, pa.BufferOutputStream(), **_PARQUET_OPTIONS))
            data = _parquet_bytes(table, pq, pa, _PARQUET_OPTIONS)
            read_s = _best(lambda: embeddings_from_column(pq.read_table(pa.BufferReader(data)).column("embedding")))
            figures["parquet_write_gb_per_s"] = shard_gb / write_s
            figures["parquet_read_gb_per_s"] = shard_gb / read_s
            # the store, every shard
            os.sync()
            started = time.perf_counter()
            source = write_gallery(str(work / f"v1-{encoding}"), ids, labels, embeddings, rows_per_shard=per_shard,
                                   lineage=["phi_1"], space="phi_1", encoding=encoding)
            figures["store_write_rows_per_s"] = rows / (time.perf_counter() - started)
            started = time.perf_counter()
            for index in range(source.num_shards):
                source.read_shard(index)
            figures["store_read_rows_per_s"] = rows / (time.perf_counter() - started)
            os.sync()
            started = time.perf_counter()
            writer = GalleryWriter(str(work / f"v2-{encoding}"), dim=dim, lineage=["phi_1", "identity"],
                                   space="phi_1", encoding=encoding)
            records = []
            for index in range(source.num_shards):
                shard, origins = source.read_rows(index)
                records.append(writer.write_shard(index, shard.ids, shard.labels, shard.embeddings,
                                                  **origins._asdict()))
            identity = writer.commit(num_shards=source.num_shards, records=records)
            figures["identity_rows_per_s"] = rows / (time.perf_counter() - started)
            figures["identity_equals_input"] = all(
                np.array_equal(identity.read_shard(i).embeddings, source.read_shard(i).embeddings)
                for i in (0, source.num_shards - 1))
            figures["shard_bytes_per_row"] = sum(s["bytes"] for s in source.manifest["shards"]) / rows
            # the bound: the same shard files copied as raw bytes (read whole, written by temp file + rename), with
            # the identity's output still on disk, so that both write into a page cache in the same state
            raw = work / f"raw-{encoding}"
            raw.mkdir()
            os.sync()
            read_s = write_s = 0.0
            for path in source.shard_paths:
                started = time.perf_counter()
                data = Path(path).read_bytes()
                read_s += time.perf_counter() - started
                started = time.perf_counter()
                _write_atomic(raw / Path(path).name, data)
                write_s += time.perf_counter() - started
            gigabytes = sum(s["bytes"] for s in source.manifest["shards"]) / 1e9
            figures["disk_read_gb_per_s"], figures["disk_write_gb_per_s"] = gigabytes / read_s, gigabytes / write_s
            figures["disk_bound_rows_per_s"] = rows / (read_s + write_s)
            figures["identity_fraction_of_disk_bound"] = figures["identity_rows_per_s"] / figures["disk_bound_rows_per_s"]
            report["encodings"][encoding] = figures
            for folder in (f"v1-{encoding}", f"v2-{encoding}", f"raw-{encoding}"):
                shutil.rmtree(work / folder)
        payload = np.random.default_rng(1).bytes(per_shard * row_bytes)
        report["sha256_gb_per_s"] = len(payload) / 1e9 / _best(lambda: hashlib.sha256(payload).digest())
        report["blake3_gb_per_s"] = len(payload) / 1e9 / _best(lambda: blake3(payload).digest())
        binary, tensor = report["encodings"]["binary"], report["encodings"]["tensor"]
        report["binary_vs_tensor_identity"] = binary["identity_rows_per_s"] / tensor["identity_rows_per_s"]
        report["identity_fraction_of_disk_bound"] = binary["identity_fraction_of_disk_bound"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["machine"] = machine_info(load_start, numpy=np.__version__, pyarrow=pa.__version__)
    table_rows = []
    for encoding, f in report["encodings"].items():
        table_rows += [
            (f"{encoding}: Parquet write / read (GB/s)", None,
             f"{f['parquet_write_gb_per_s']:.2f} / {f['parquet_read_gb_per_s']:.2f}"),
            (f"{encoding}: store write / read verified (rows/s)", None,
             f"{f['store_write_rows_per_s']:,.0f} / {f['store_read_rows_per_s']:,.0f}"),
            (f"{encoding}: identity read->write->commit (rows/s)", None,
             f"{f['identity_rows_per_s']:,.0f} = {f['identity_fraction_of_disk_bound']:.2f} of the disk bound"),
            (f"{encoding}: raw copy of its shards, read / write (GB/s)", None,
             f"{f['disk_read_gb_per_s']:.2f} / {f['disk_write_gb_per_s']:.2f} = "
             f"{f['disk_bound_rows_per_s']:,.0f} rows/s (the disk bound)"),
        ]
    table_rows.append(("checksum: BLAKE3 / sha256 (GB/s)", None,
                       f"{report['blake3_gb_per_s']:.2f} / {report['sha256_gb_per_s']:.2f}"))
    print(f"gallery I/O: {rows:,} rows x {dim}, shards of {per_shard}, one process, one thread")
    print_rows(table_rows)
    print(json.dumps(report))
    return report


def _best(run, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def _parquet_bytes(table, pq, pa, options):
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, **options)
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['rows']:,} rows x {QUICK['dim']}")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--dim", type=int)
    parser.add_argument("--rows-per-shard", type=int, default=4096)
    parser.add_argument("--workdir", default=None, help="folder for the temporary galleries (default: the system's)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    args.rows = args.rows or sizes["rows"]
    args.dim = args.dim or sizes["dim"]
    if args.rows < 1 or args.dim < 1 or args.rows_per_shard < 1:
        parser.error("--rows, --dim and --rows-per-shard must be positive")
    return args


if __name__ == "__main__":
    main()
