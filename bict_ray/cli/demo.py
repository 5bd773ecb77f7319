"""`bict-ray demo`: the main job on the embedded default (Fashion-MNIST, configs/demo.yaml)."""

from __future__ import annotations

from pathlib import Path

from bict_ray.cli.common import add_config_args
from bict_ray.config import load_config
from bict_ray.data import load_dataset
from bict_ray.rundir import RunDir
from bict_ray.splits import load_or_make_splits

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the main job on Fashion-MNIST (configs/demo.yaml)")
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    config = load_config(args.config or DEMO_CONFIG, args.overrides)
    run_dir = RunDir.create(args.out or "runs/demo", config)
    dataset = load_dataset(config.data)
    splits = load_or_make_splits(run_dir.path, config.scenario, dataset.train, dataset.num_classes)
    print(f"dataset: {dataset.source}: {len(dataset.train)} train / {len(dataset.test)} test images")
    for split in splits:
        print(f"  phi_{split.version}: {len(split.train_ids)} training images of classes {split.classes}")
    print("The training, gallery upgrade and evaluation stages are not built yet: this demo stops after the "
          f"data and the seeded splits ({run_dir.path / 'splits'}).")
    return 0
