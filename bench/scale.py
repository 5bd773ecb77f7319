"""Scale run (issue 17, item 3): a synthetic gallery of millions of rows upgraded and evaluated, with the driver's
and every worker's peak memory.

The models come from a small run on the smoke slice of Fashion-MNIST (phi_1 on classes 0-4, phi_2 on all ten,
backward-compatible with phi_1, and psi_1_2; ``model.embedding_dim`` 256), trained here in a minute. The gallery
does not come from images: its rows are drawn around phi_1's class means with each class's spread
(``bict_ray.core.synthetic``, written by ``synthesize_gallery`` in Ray Data tasks). Then, as a sequence's step 2 does:

1. synthesise gallery v1 (``--rows`` rows in phi_1's space);
2. upgrade it with psi_1_2 into v2 (``upgrade_gallery``);
3. evaluate the test split's queries, sharded on Ray Data (``evaluate_gallery``): old_self (phi_1 against v1),
   backward (phi_2 against v1) and forward (phi_2 against v2), mAP@``--map-at`` and R@1/5/10; and exact mAP of
   backward for the first ``--exact-queries`` queries, whose positive lists (12 bytes per query and positive:
   every row of its class) must fit in memory.

Memory, sampled every second by a thread in this process: the driver's private memory (USS) and the private
memory of every Ray worker process on this machine (their ``ray::`` processes), the peak of each and the peak of
their sum. Private memory leaves out the object store's shared pages; the object store's own peak is reported
beside it. The mAP figures are those of Gaussian blobs around class means, not of real images: this run measures
time and memory.

    python bench/scale.py                 # 10,000,000 rows x 256 (about 20 GB of Parquet written): ~15 minutes here
    python bench/scale.py --quick         # 20,000 rows: under a minute after the small run's training
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import log, machine_info, machine_line, parse_with_presets, require_positive, start_ray  # noqa: E402

FULL = dict(rows=10_000_000, exact_queries=8)
QUICK = dict(rows=20_000, exact_queries=4)
OLD_CLASSES = [0, 1, 2, 3, 4]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import ray
    import torch

    from bict_ray.config import GalleryConfig, load_config
    from bict_ray.core.data import load_dataset
    from bict_ray.core.embed import embed_images
    from bict_ray.core.synthetic import class_structure
    from bict_ray.distributed.evaluate import evaluate_gallery
    from bict_ray.distributed.pipelines import synthesize_gallery, upgrade_gallery
    from bict_ray.distributed.train import train_embedding_model, train_upgrade_transform

    load_start = os.getloadavg()
    start_ray(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bict-bench-scale-", dir=args.work_dir))
    sampler = MemorySampler()
    stages, metrics = {}, {}
    try:
        log("training the small run's models (phi_1, phi_2, psi_1_2) ...")
        config = load_config("configs/smoke.yaml", ["model.embedding_dim=256", f"train.epochs={args.train_epochs}"])
        data = load_dataset(config.data, config.eval, config.scenario)
        started = time.perf_counter()
        old_split = data.train.subset(np.flatnonzero(np.isin(data.train.labels, OLD_CLASSES)))
        name = f"bench-scale-{time.time_ns()}"
        phi_1 = train_embedding_model(config, work / "models" / "phi_1", 1, old_split, OLD_CLASSES,
                                      data.num_classes, run_name=f"{name}-phi_1")
        phi_2 = train_embedding_model(config, work / "models" / "phi_2", 2, data.train, list(range(10)),
                                      data.num_classes, parent=phi_1, run_name=f"{name}-phi_2")
        psi = train_upgrade_transform(config, work / "transforms" / "psi_1_2", 1, phi_2, data.train, [phi_1],
                                      run_name=f"{name}-psi")
        stages["train the small run"] = {"seconds": time.perf_counter() - started}
        structure = class_structure(embed_images(phi_1.module, data.train.images), data.train.labels)
        query = data.test
        queries = {t: embed_images(m.module, query.images) for t, m in ((1, phi_1), (2, phi_2))}

        gallery = GalleryConfig(rows_per_shard=args.rows_per_shard, concurrency=args.concurrency,
                                cpus_per_task=args.threads / args.concurrency / 2)
        sampler.start()

        def timed(stage: str, rows: int, run):
            log(f"{stage} ...")
            sampler.mark(stage)
            begun = time.perf_counter()
            result = run()
            seconds = time.perf_counter() - begun
            stages[stage] = {"seconds": seconds, "rows": rows, "rows_per_s": rows / seconds,
                             **sampler.stage_peaks(stage)}
            log(f"  {seconds:.1f} s, {rows / seconds:,.0f} rows/s")
            return result

        v1, _ = timed("synthesise v1", args.rows, lambda: synthesize_gallery(
            structure, args.rows, str(work / "gallery" / "v1"), space="phi_1", seed=args.seed, config=gallery,
            progress=log))
        v2, _ = timed("upgrade v1 -> v2", args.rows, lambda: upgrade_gallery(
            v1, psi, str(work / "gallery" / "v2"), config=gallery, progress=log))
        evaluation = dict(map_at=args.map_at, concurrency=args.concurrency,
                          cpus_per_task=args.threads / args.concurrency / 2)
        # the synthetic rows' ids are 0 ... rows-1, not images': no query is excluded from a gallery by id
        for test, t, version in (("old_self", 1, v1), ("backward", 2, v1), ("forward", 2, v2)):
            metrics[test] = timed(f"evaluate {test}", args.rows, lambda t=t, version=version: evaluate_gallery(
                queries[t], query.labels, version, **evaluation))
        few = slice(0, args.exact_queries)
        metrics["backward_exact"] = timed(f"exact mAP, backward, {args.exact_queries} queries", args.rows,
                                          lambda: evaluate_gallery(queries[2][few], query.labels[few], v1,
                                                                   map_at=None, concurrency=args.concurrency,
                                                                   cpus_per_task=evaluation["cpus_per_task"]))
        gallery_bytes = sum(s["bytes"] for v in (v1, v2) for s in v.manifest["shards"])
    finally:
        sampler.stop()
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "scale", "quick": args.quick, "rows": args.rows, "dim": 256, "queries": len(query),
        "exact_queries": args.exact_queries, "rows_per_shard": args.rows_per_shard, "concurrency": args.concurrency,
        "map_at": args.map_at, "gallery_bytes_written": gallery_bytes, "stages": stages,
        "metrics": {test: {k: v for k, v in m.items() if k in ("mAP", "R@1", "R@5", "R@10")}
                    for test, m in metrics.items()},
        "memory": sampler.summary(), "object_store_peak_mib": sampler.object_store_peak_mib,
        "machine": machine_info(load_start, torch=torch.__version__, ray=ray.__version__),
    }
    print_table(report)
    print(json.dumps(report))
    return report


class MemorySampler:
    """Every second: this process's private memory, and that of every Ray worker process on this machine."""

    def __init__(self, every: float = 1.0):
        self.every = every
        self.driver_peak = 0.0
        self.worker_peaks: dict[int, float] = {}
        self.sum_peak = 0.0
        self.object_store_peak_mib = 0.0
        self.stage = None
        self.by_stage: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="memory-sampler")

    def start(self) -> None:
        self._thread.start()

    def mark(self, stage: str) -> None:
        self.stage = stage
        self.by_stage[stage] = {"driver_peak_uss_mib": 0.0, "worker_peak_uss_mib": 0.0}

    def stage_peaks(self, stage: str) -> dict[str, float]:
        self.sample()
        return dict(self.by_stage[stage])

    def stop(self) -> None:
        self._stop.set()

    def summary(self) -> dict:
        return {"driver_peak_uss_mib": self.driver_peak,
                "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "worker_peak_uss_mib": max(self.worker_peaks.values(), default=0.0),
                "workers_sampled": len(self.worker_peaks), "workers_sum_peak_uss_mib": self.sum_peak}

    def sample(self) -> None:
        from bict_ray.distributed.memory import private_mib

        driver = private_mib() or 0.0
        workers = {pid: private_mib(pid) for pid in ray_worker_pids()}
        workers = {pid: mib for pid, mib in workers.items() if mib is not None}
        self.driver_peak = max(self.driver_peak, driver)
        for pid, mib in workers.items():
            self.worker_peaks[pid] = max(self.worker_peaks.get(pid, 0.0), mib)
        self.sum_peak = max(self.sum_peak, sum(workers.values()))
        if self.stage is not None:
            peaks = self.by_stage[self.stage]
            peaks["driver_peak_uss_mib"] = max(peaks["driver_peak_uss_mib"], driver)
            peaks["worker_peak_uss_mib"] = max(peaks["worker_peak_uss_mib"], max(workers.values(), default=0.0))
        self.object_store_peak_mib = max(self.object_store_peak_mib, object_store_used_mib())

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()


def ray_worker_pids() -> list[int]:
    """Ray's worker processes on this machine: their titles start with ``ray::`` (ray::IDLE, ray::<task>)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if f.read(5) == b"ray::":
                    pids.append(int(name))
        except OSError:
            continue
    return pids


def object_store_used_mib() -> float:
    import ray

    try:
        total = ray.cluster_resources().get("object_store_memory", 0.0)
        free = ray.available_resources().get("object_store_memory", total)
    except Exception:  # noqa: BLE001 - a sample missed while Ray is busy is not a failure
        return 0.0
    return (total - free) / 2**20


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 rows (the smoke test)")
    parser.add_argument("--rows", type=int, help="synthetic gallery rows (10,000,000; --quick 20,000)")
    parser.add_argument("--exact-queries", type=int, help="queries of the exact-mAP pass (8; --quick 4)")
    parser.add_argument("--map-at", type=int, default=100, help="k of mAP@k (100)")
    parser.add_argument("--rows-per-shard", type=int, default=65_536)
    parser.add_argument("--concurrency", type=int, default=2, help="Ray Data tasks at once (2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPUs of the Ray instance (all cores)")
    parser.add_argument("--train-epochs", type=int, default=2, help="epochs of each small-run model (2)")
    parser.add_argument("--work-dir", default=None, help="where the gallery versions go (a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_with_presets(parser, argv, QUICK, FULL)
    require_positive(parser, args, ("rows", "exact_queries", "map_at", "rows_per_shard", "concurrency", "threads",
                                    "train_epochs"))
    return args


def print_table(report: dict) -> None:
    machine = report["machine"]
    print(f"scale: {report['rows']:,} synthetic rows x {report['dim']}, {report['queries']} queries, "
          f"{report['rows_per_shard']:,} rows a shard, {report['concurrency']} tasks at once")
    print(machine_line(machine))
    print(f"  {'stage':<36} {'seconds':>8} {'rows/s':>11} {'driver peak':>12} {'worker peak':>12}")
    for stage, run in report["stages"].items():
        if "rows" not in run:
            print(f"  {stage:<36} {run['seconds']:8.1f}")
            continue
        print(f"  {stage:<36} {run['seconds']:8.1f} {run['rows_per_s']:11,.0f} "
              f"{run['driver_peak_uss_mib']:8,.0f} MiB {run['worker_peak_uss_mib']:8,.0f} MiB")
    memory = report["memory"]
    print(f"  peaks (private memory): driver {memory['driver_peak_uss_mib']:,.0f} MiB, a worker "
          f"{memory['worker_peak_uss_mib']:,.0f} MiB, all {memory['workers_sampled']} workers together "
          f"{memory['workers_sum_peak_uss_mib']:,.0f} MiB; object store {report['object_store_peak_mib']:,.0f} MiB")
    for test, m in report["metrics"].items():
        print(f"  {test:<16} " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))


if __name__ == "__main__":
    main()
