"""Training ingest benchmark (issue 17, item 1): the training split in memory against streamed through Ray Data.

One embedding stage is trained three ways on the same images, with the same model, batch size and threads, each
through ``train_embedding_model`` with the task launcher (one worker), reporting and checkpointing every epoch:

- memory (``train.ingest=memory``): the whole split through the object store to the worker, a torch DataLoader;
- stream (``train.ingest=stream``, an in-memory data kind): the driver's split in object-store blocks, the worker
  iterating its Ray Data stream;
- stream from Parquet (``train.ingest=stream``, ``data.kind=parquet``): the split's PNGs read from a Parquet table
  and decoded in Ray Data tasks beside the worker, every epoch.

For each: images/s over the epochs after the first (a warm-up), and the worker's peak memory as its epochs report
it: private (``peak_uss_mib``, sampled: what the worker holds of its own) and resident (``peak_rss_mib``, the
kernel's ``ru_maxrss``, which also counts the object store's shared pages the worker has mapped). When this
benchmark starts Ray itself it starts a fresh instance for each way, so that no worker process carries another way's
resident peak; on a running instance (the test suite's) those are upper bounds.

The images are random RGB (the throughput of the model does not depend on the pixels; PNG keeps noise at about its
raw size, so decoding is not flattered). Prints a table, then one JSON line, the last line.

    python bench/ingest.py            # 20,000 images of 3x48x48 (138 MB) x 3 epochs: about 6 minutes here
    python bench/ingest.py --quick    # 768 images of 3x16x16 x 3 epochs: under a minute
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import log, machine_info, machine_line, parse_with_presets, start_ray  # noqa: E402

FULL = dict(images=20_000, size=48, epochs=3, batch_size=128)
QUICK = dict(images=768, size=16, epochs=3, batch_size=64)
WAYS = ("memory", "stream", "stream_parquet")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import torch

    from bict_ray.config import load_config
    from bict_ray.core.data import ImageSet, load_dataset

    load_start = os.getloadavg()
    rng = np.random.default_rng(args.seed)
    images = rng.integers(0, 256, (args.images, 3, args.size, args.size), dtype=np.uint8)
    labels = rng.integers(0, args.classes, args.images).astype(np.int64)
    ids = np.arange(args.images, dtype=np.int64)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bict-bench-ingest-") as work:
        table = Path(work) / "table"
        table.mkdir()
        log(f"writing {args.images} PNGs to a Parquet table ...")
        for part, rows in enumerate(np.array_split(np.arange(args.images), 4)):
            pq.write_table(pa.table({"image": [png(images[i]) for i in rows], "label": labels[rows], "id": ids[rows]}),
                           table / f"part-{part}.parquet")
        for way in args.ways:
            started_ray, _ = start_ray(args.threads)
            overrides = [f"train.ingest={'memory' if way == 'memory' else 'stream'}", "model.backbone=small_cnn",
                         f"model.embedding_dim={args.embedding_dim}", f"train.epochs={args.epochs}",
                         f"train.batch_size={args.batch_size}", f"train.torch_threads={args.threads}",
                         f"train.cpus_per_worker={args.cpus_per_worker}", "train.max_failures=0"]
            if way == "stream_parquet":
                overrides += ["data.kind=parquet", f"data.root={table}", "data.val_fraction=0",
                              "data.test_fraction=0.01", f"data.image_size={args.size}", "data.channels=3"]
            config = load_config(None, overrides)
            if way == "stream_parquet":
                # the split the driver loads from the table: the stream reads these rows, decoded again in its tasks
                split = load_dataset(config.data).train
            else:
                split = ImageSet(images, labels, ids)
            log(f"{way}: {len(split)} images ...")
            runs[way] = train(config, split, args.classes, Path(work) / way)
            log(f"  {runs[way]['images_per_s']:,.0f} images/s, worker peak {runs[way]['peak_uss_mib']:,.0f} MiB "
                f"private, {runs[way]['peak_rss_mib']:,.0f} MiB resident")
            if started_ray:
                ray.shutdown()
    memory = runs.get("memory")
    report = {
        "benchmark": "ingest", "quick": args.quick, "images": args.images, "image_shape": [3, args.size, args.size],
        "split_mib": round(images.nbytes / 2**20, 1), "epochs": args.epochs, "batch_size": args.batch_size,
        "threads": args.threads, "ways": runs, "fresh_ray_per_way": not ray.is_initialized(),
        "machine": machine_info(load_start, torch=torch.__version__, ray=ray.__version__),
    }
    if memory:
        for way in ("stream", "stream_parquet"):
            if way in runs:
                report[f"{way}_vs_memory_images_per_s"] = runs[way]["images_per_s"] / memory["images_per_s"]
                report[f"{way}_peak_uss_saving_mib"] = memory["peak_uss_mib"] - runs[way]["peak_uss_mib"]
    print_table(report)
    print(json.dumps(report))
    return report


def png(pixels) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def train(config, split, num_classes: int, out: Path) -> dict:
    """One fit: images/s over the epochs after the first, the worker's peak memory, and the fit's wall time."""
    from bict_ray.distributed.train import train_embedding_model

    started = time.perf_counter()
    model = train_embedding_model(config, out / "models" / "phi_1", 1, split, list(range(num_classes)), num_classes,
                                  run_name=f"bench-ingest-{out.name}-{time.time_ns()}")
    seconds = time.perf_counter() - started
    history = model.card.training["history"]
    steady = history[1:]
    return {"images_per_s": statistics.mean(h["samples_per_s"] for h in steady),
            "epoch_seconds": statistics.mean(h["seconds"] for h in steady),
            "first_epoch_seconds": history[0]["seconds"],
            "peak_uss_mib": max(h["peak_uss_mib"] for h in history),
            "peak_rss_mib": max(h["peak_rss_mib"] for h in history), "fit_seconds": seconds,
            "samples_per_epoch": history[-1]["samples"]}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run (the smoke test)")
    parser.add_argument("--images", type=int, help="training images (20000; --quick 768)")
    parser.add_argument("--size", type=int, help="image side, RGB (48; --quick 16)")
    parser.add_argument("--epochs", type=int, help="epochs per way, the first a warm-up (3)")
    parser.add_argument("--batch-size", type=int, help="batch size (128; --quick 64)")
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS), help="which ways to run (all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPUs of the Ray instance, and torch "
                        "threads of the worker (all cores)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0,
                        help="the worker's CPUs; the rest is left to the stream's tasks (1)")
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parse_with_presets(parser, argv, QUICK, FULL)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first is a warm-up")
    if args.images < args.batch_size * 2:
        parser.error("--images must give at least two batches per epoch")
    return args


def print_table(report: dict) -> None:
    machine = report["machine"]
    shape = "x".join(map(str, report["image_shape"]))
    print(f"ingest: {report['images']} images of {shape} ({report['split_mib']} MiB) x {report['epochs']} epochs, "
          f"batch {report['batch_size']}, one worker, {report['threads']} threads")
    print(machine_line(machine))
    print(f"  {'way':<16} {'images/s':>9} {'s/epoch':>8} {'vs memory':>10} {'peak private':>13} "
          f"{'peak resident':>14}")
    memory = report["ways"].get("memory")
    for way, run in report["ways"].items():
        ratio = f"{run['images_per_s'] / memory['images_per_s']:.2f}x" if memory else ""
        print(f"  {way:<16} {run['images_per_s']:9,.0f} {run['epoch_seconds']:8.2f} {ratio:>10} "
              f"{run['peak_uss_mib']:9,.0f} MiB {run['peak_rss_mib']:10,.0f} MiB")
    if not report["fresh_ray_per_way"]:
        print("  (one Ray instance for all ways: a worker's peak may be an earlier way's)")


if __name__ == "__main__":
    main()
