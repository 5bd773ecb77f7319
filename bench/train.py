"""Training benchmark (issues 3 and 7, item 3): Ray Train against a plain torch loop on the same work.

Both paths run the very same stage code (``bict_ray.distributed.train``: model, data loader, optimiser, loss and the epoch
loop), on the same images, batch size and torch threads; the only difference is Ray Train around it:

- plain: ``run_in_process`` trains in this process, no Ray Train, no report, no checkpoint;
- Ray Train, 1 worker (all threads), then 2 workers (DDP, the threads split between them): the project's
  ``train_embedding_model``, which reports and checkpoints every epoch;
- a Ray task: ``run_in_process`` in one task with all the threads' CPUs, twice (the first starts a worker process,
  the second finds it): what a single-worker stage would cost without a Ray Train worker group (issue 18, item 3).
  ``saving_per_fit_without_worker_group_seconds`` = the 1-worker fit's start-up + finish - the warm task's time
  around its epochs;
- the task launcher (``train.single_worker=task``, the default for one worker): ``train_embedding_model`` in one
  Ray task that reports and checkpoints every epoch like Ray Train. ``task_launcher_saving_per_fit_seconds`` = the
  1-worker Ray Train fit's start-up + finish - the task launcher's, and ``task_launcher_overhead_vs_plain_torch``
  its per-epoch time against the plain loop's, as for Ray Train.

Per-epoch time in Ray Train is the wall time from one epoch's start to the next's (so it includes reducing the
metrics, the report and the checkpoint), taken from the epoch start times the workers record; the first epoch
is a warm-up and left out of both paths, and the plain loop runs before and after the Ray runs, its best kept.
``overhead_vs_plain_torch`` = Ray Train's per-epoch time at one worker / the plain loop's - 1 (target <= 0.10).
The fixed costs are reported apart: start-up (from the call to the first epoch's start: controller, worker
group, data from the object store, model) and finish (from the last epoch's end to the saved model).

The images are random 28x28 greyscale (Fashion-MNIST's shape; the throughput does not depend on the pixels), so
the benchmark needs no data set. Prints a table, then one JSON line, the last line.

    python bench/train.py             # 12,000 images x 4 epochs, 1 and 2 workers: about 4 minutes here
    python bench/train.py --quick     # 1,024 images x 3 epochs, 1 worker: under a minute, most of it Ray's start
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import log, machine_info, machine_line, parse_with_presets, require_positive, start_ray  # noqa: E402

FULL = dict(images=12_000, epochs=4, batch_size=128, workers=[1, 2])
QUICK = dict(images=1_024, epochs=3, batch_size=64, workers=[1])
TARGET_OVERHEAD = 0.10


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import ray
    import torch

    from bict_ray.config import load_config
    from bict_ray.core.data import ImageSet
    from bict_ray.distributed.train import train_embedding_model

    load_start = os.getloadavg()
    rng = np.random.default_rng(args.seed)
    images = ImageSet(rng.integers(0, 256, (args.images, 1, 28, 28), dtype=np.uint8),
                      rng.integers(0, args.classes, args.images).astype(np.int64), np.arange(args.images))
    classes = list(range(args.classes))
    start_ray(args.threads)  # worker logs stay off stdout: the JSON line must be the last line

    def config(workers: int, single_worker: str = "ray_train"):
        return load_config(None, [f"train.single_worker={single_worker}",
            f"model.backbone={args.backbone}", f"model.embedding_dim={args.embedding_dim}",
            f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", f"train.num_workers={workers}",
            f"train.cpus_per_worker={args.threads / workers}", f"train.torch_threads={max(1, args.threads // workers)}",
            "train.max_failures=0"])

    plain_runs, ray_runs = [], {}
    with tempfile.TemporaryDirectory(prefix="bict-bench-train-") as work:
        plain_runs.append(plain(config(1), images, args.classes, log))
        for workers in args.workers:
            log(f"Ray Train, {workers} worker(s) ...")
            started = time.time()
            artifact = train_embedding_model(config(workers), Path(work) / f"w{workers}" / "models" / "phi_1", 1,
                                             images, classes, args.classes, run_name=f"bench-train-w{workers}")
            ray_runs[workers] = ray_timings(artifact.card.training["history"], started, time.time())
            log(f"  {ray_runs[workers]['epoch_seconds']:.2f} s per epoch, start-up "
                f"{ray_runs[workers]['startup_seconds']:.1f} s")
        log("the task launcher, 1 worker ...")
        started = time.time()
        artifact = train_embedding_model(config(1, "task"), Path(work) / "task" / "models" / "phi_1", 1, images,
                                         classes, args.classes, run_name="bench-train-task")
        launcher = ray_timings(artifact.card.training["history"], started, time.time())
        log(f"  {launcher['epoch_seconds']:.2f} s per epoch, start-up {launcher['startup_seconds']:.1f} s")
        plain_runs.append(plain(config(1), images, args.classes, log))
        tasks = {name: in_ray_task(config(1), images, args.classes, args.threads, log) for name in ("cold", "warm")}

    best_plain = min(plain_runs, key=lambda run: run["epoch_seconds"])
    one = ray_runs[args.workers[0]] if args.workers[0] == 1 else None
    report = {
        "benchmark": "train",
        "quick": args.quick,
        "images": args.images,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "backbone": args.backbone,
        "threads": args.threads,
        "plain_images_per_s": best_plain["images_per_s"],
        "plain_epoch_seconds": best_plain["epoch_seconds"],
        "plain_epoch_seconds_runs": [run["epoch_seconds"] for run in plain_runs],
        "ray": {str(w): run for w, run in ray_runs.items()},
        "ray_task": tasks,
        "task_launcher": launcher,
        "task_launcher_overhead_vs_plain_torch": launcher["epoch_seconds"] / best_plain["epoch_seconds"] - 1,
        "target_overhead": TARGET_OVERHEAD,
        "machine": machine_info(load_start, torch=torch.__version__, ray=ray.__version__),
    }
    if one is not None:
        report["overhead_vs_plain_torch"] = one["epoch_seconds"] / best_plain["epoch_seconds"] - 1
        report["ray_images_per_s"] = one["images_per_s"]
        report["compute_overhead_vs_plain_torch"] = one["compute_seconds"] / best_plain["epoch_seconds"] - 1
        report["saving_per_fit_without_worker_group_seconds"] = (
            one["startup_seconds"] + one["finish_seconds"] - tasks["warm"]["fixed_seconds"])
        report["task_launcher_saving_per_fit_seconds"] = (
            one["startup_seconds"] + one["finish_seconds"] - launcher["startup_seconds"] - launcher["finish_seconds"])
    print_table(report)
    print(json.dumps(report))
    return report


def plain(config, images, num_classes: int, log) -> dict:
    """The plain torch loop on the same work; per-epoch figures over the epochs after the first."""
    from bict_ray.distributed.train import embedding_stage, run_in_process

    log("plain torch loop ...")
    records = run_in_process(embedding_stage(config, 1, images, num_classes))
    steady = records[1:]
    seconds = statistics.mean(r["seconds"] for r in steady)
    samples = statistics.mean(r["samples"] for r in steady)
    log(f"  {seconds:.2f} s per epoch")
    return {"epoch_seconds": seconds, "images_per_s": samples / seconds, "first_epoch_seconds": records[0]["seconds"]}


def in_ray_task(config, images, num_classes: int, cpus: int, log) -> dict:
    """The plain loop in one Ray task (no worker group, no report, no checkpoint): its wall time from the call to
    the result, the time of its epochs, and the rest (scheduling, a worker process, the stage's data)."""
    import ray

    from bict_ray.distributed.train import embedding_stage, run_in_process

    log("the plain loop in a Ray task ...")
    stage = embedding_stage(config, 1, images, num_classes)
    started = time.time()
    cpus = min(cpus, int(ray.cluster_resources().get("CPU", 1)))  # never more than the instance has: it would wait
    records = ray.get(ray.remote(num_cpus=cpus)(run_in_process).remote(stage))
    total = time.time() - started
    epochs = sum(r["seconds"] for r in records)
    log(f"  {total:.1f} s, {total - epochs:.1f} s of it around the epochs")
    return {"total_seconds": total, "epochs_seconds": epochs, "fixed_seconds": total - epochs}


def ray_timings(history: list[dict], called: float, returned: float) -> dict:
    """Per-epoch wall time (start to next start) over the epochs after the first, and the fixed costs."""
    starts = [h["started_at"] for h in history]
    if len(starts) < 3:
        raise ValueError("the Ray Train timing needs at least 3 epochs (one warm-up, one measured, one after it)")
    intervals = [b - a for a, b in zip(starts[1:-1], starts[2:])]
    epoch_seconds = statistics.mean(intervals)
    compute = statistics.mean(h["seconds"] for h in history[1:-1])
    samples = statistics.mean(h["samples"] for h in history[1:-1])
    last = history[-1]
    return {
        "epoch_seconds": epoch_seconds,
        "compute_seconds": compute,  # the epoch loop alone, as the worker timed it
        "report_and_checkpoint_seconds": epoch_seconds - compute,
        "images_per_s": samples / epoch_seconds,
        "startup_seconds": starts[0] - called,
        "finish_seconds": returned - (last["started_at"] + last["seconds"]),
        "total_seconds": returned - called,
        "first_epoch_seconds": starts[1] - starts[0],
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run, one worker (the smoke test)")
    parser.add_argument("--images", type=int, help="training images (12000; --quick 1024)")
    parser.add_argument("--epochs", type=int, help="epochs per run, the first one a warm-up (4; --quick 3)")
    parser.add_argument("--batch-size", type=int, help="batch size (128; --quick 64)")
    parser.add_argument("--workers", type=int, nargs="+", help="Ray Train worker counts to run (1 2; --quick 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads of the plain loop, split between the Ray Train workers (all cores)")
    parser.add_argument("--backbone", default="small_cnn", choices=["small_cnn", "resnet18", "resnet50"])
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parse_with_presets(parser, argv, QUICK, FULL)
    require_positive(parser, args, ("images", "batch_size", "threads", "embedding_dim", "classes"))
    if args.epochs < 3:
        parser.error("--epochs must be at least 3: the first is a warm-up, and an epoch's time needs the next start")
    if any(w < 1 or w > args.threads for w in args.workers):
        parser.error(f"--workers must be between 1 and --threads ({args.threads})")
    if args.images < args.batch_size * max(args.workers) * 2:
        parser.error("--images must give every worker at least two batches per epoch")
    return args


def print_table(report: dict) -> None:
    machine = report["machine"]
    print(f"train: {report['backbone']}, {report['images']} images x {report['epochs']} epochs, batch "
          f"{report['batch_size']}, {report['threads']} torch threads in all")
    print(machine_line(machine))
    rows = [("plain torch loop", report["plain_epoch_seconds"], report["plain_images_per_s"], "", "")]
    for workers, run in report["ray"].items():
        overhead = run["epoch_seconds"] / report["plain_epoch_seconds"] - 1
        rows.append((f"Ray Train, {workers} worker(s)", run["epoch_seconds"], run["images_per_s"],
                     f"{overhead:+.1%}", f"start-up {run['startup_seconds']:.1f} s, report+checkpoint "
                     f"{run['report_and_checkpoint_seconds'] * 1000:.0f} ms/epoch, finish {run['finish_seconds']:.1f} s"))
    print(f"  {'path':<22} {'s/epoch':>8} {'images/s':>9} {'vs plain':>9}  fixed costs")
    for name, seconds, rate, overhead, note in rows:
        print(f"  {name:<22} {seconds:8.2f} {rate:9,.0f} {overhead:>9}  {note}")
    launcher = report["task_launcher"]
    print(f"  {'task launcher':<22} {launcher['epoch_seconds']:8.2f} {launcher['images_per_s']:9,.0f} "
          f"{report['task_launcher_overhead_vs_plain_torch']:>+9.1%}  start-up {launcher['startup_seconds']:.1f} s, "
          f"report+checkpoint {launcher['report_and_checkpoint_seconds'] * 1000:.0f} ms/epoch, "
          f"finish {launcher['finish_seconds']:.1f} s")
    for name, task in report["ray_task"].items():
        print(f"  the plain loop in a Ray task ({name}): {task['total_seconds']:.1f} s, of which "
              f"{task['fixed_seconds']:.1f} s around its epochs")
    if "saving_per_fit_without_worker_group_seconds" in report:
        print(f"  a 1-worker stage without a worker group would save "
              f"{report['saving_per_fit_without_worker_group_seconds']:.1f} s a fit; the task launcher saves "
              f"{report['task_launcher_saving_per_fit_seconds']:.1f} s")
    if "overhead_vs_plain_torch" in report:
        verdict = "met" if report["overhead_vs_plain_torch"] <= TARGET_OVERHEAD else "NOT met"
        print(f"  per-epoch overhead at 1 worker: {report['overhead_vs_plain_torch']:+.1%} "
              f"(target <= {TARGET_OVERHEAD:.0%}: {verdict})")


if __name__ == "__main__":
    main()
