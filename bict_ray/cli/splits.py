"""`bict-ray splits`: load the dataset, make (or reload) the scenario's seeded splits and print them."""

from __future__ import annotations

from bict_ray.cli.common import add_config_args, config_from_args
from bict_ray.core.data import load_dataset
from bict_ray.core.splits import load_or_make_splits
from bict_ray.storage.rundir import RunDir


def register(subparsers) -> None:
    parser = subparsers.add_parser("splits", help="write the upgrade scenario's training splits to a run directory")
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    config = config_from_args(args)
    run_dir = RunDir.create(args.out or f"runs/{config.name}", config)
    dataset = load_dataset(config.data, config.eval, config.scenario)
    splits = load_or_make_splits(run_dir.path, config.scenario, dataset.train, dataset.num_classes, dataset.val)
    run_dir.sync()
    num_val = 0 if dataset.val is None else len(dataset.val)
    print(f"dataset: {dataset.source} ({len(dataset.train)} train, {num_val} validation, {len(dataset.test)} test, "
          f"{dataset.num_classes} classes)")
    for split in splits:
        print(f"model phi_{split.version}: {len(split.train_ids)} training images, classes {split.classes}")
    print(f"splits written to {run_dir.join('splits')}")
    return 0
