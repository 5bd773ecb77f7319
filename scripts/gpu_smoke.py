"""The smoke training on a GPU: phi_1, the BCT phi_2 and psi with train.use_gpu=true, then a GPU extraction.

    python scripts/gpu_smoke.py [--data FILE.npz] [--out DIR]

Prints one JSON line last (device, per-stage seconds and samples/s, final metrics), for BENCHMARKS.md.
"""

import argparse
import json
import time

import numpy as np
import ray
import torch

from bict_ray.config import load_config
from bict_ray.core.data import load_dataset
from bict_ray.distributed.pipelines import extract_gallery
from bict_ray.distributed.train import train_embedding_model, train_upgrade_transform


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", help="npz with images/labels/test_images/test_labels (default: Fashion-MNIST)")
    parser.add_argument("--out", default="/tmp/bict-gpu")
    args = parser.parse_args()
    overrides = ["train.use_gpu=true", "gallery.use_gpu=true", "train.cpus_per_worker=4", "gallery.cpus_per_task=1"]
    if args.data:
        overrides += ["data.kind=npz", f"data.root={args.data}"]
    config = load_config("configs/smoke.yaml", overrides)
    ray.init(num_cpus=8, num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=True)
    data = load_dataset(config.data, config.eval, config.scenario)
    old_classes = config.scenario.classes[0]
    old_train = data.train.subset(np.flatnonzero(np.isin(data.train.labels, old_classes)))
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "ray": ray.__version__}
    stages = {}
    started = time.perf_counter()
    old = train_embedding_model(config, f"{args.out}/models/phi_1", 1, old_train, old_classes, data.num_classes)
    stages["phi_1"] = (time.perf_counter() - started, old.card)
    started = time.perf_counter()
    new = train_embedding_model(config, f"{args.out}/models/phi_2", 2, data.train, list(range(data.num_classes)),
                                data.num_classes, parent=old)
    stages["phi_2"] = (time.perf_counter() - started, new.card)
    started = time.perf_counter()
    psi = train_upgrade_transform(config, f"{args.out}/transforms/psi_1_2", 1, new, data.train, [old])
    stages["psi_1_2"] = (time.perf_counter() - started, psi.card)
    for name, (seconds, card) in stages.items():
        last = card.training["history"][-1]
        report[name] = {"seconds": round(seconds, 2), "samples_per_s_last_epoch": round(last["samples_per_s"]),
                        "loss_first": round(card.training["history"][0]["loss"], 4), "loss_last": round(last["loss"], 4)}
    started = time.perf_counter()
    _, stats = extract_gallery(old, data.test, f"{args.out}/gallery/v1", config=config.gallery)
    report["extract_v1"] = {"seconds": round(time.perf_counter() - started, 2), "rows": stats.rows}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
