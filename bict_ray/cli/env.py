"""`bict-ray env`: versions, hardware and where the dataset is, for bug reports."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

from bict_ray.core.data import find_fashion_mnist


def register(subparsers) -> None:
    parser = subparsers.add_parser("env", help="print versions, CPU/GPU counts and where the dataset was found")
    parser.set_defaults(func=run)


def run(args) -> int:
    for key, value in environment_report().items():
        print(f"{key + ':':<22}{value}")
    return 0


def environment_report() -> dict[str, str]:
    import torch

    report = {"bict-ray": _version("bict-ray"), "python": sys.version.split()[0],
              "platform": platform.platform()}
    for package in ("torch", "torchvision", "ray", "faiss-cpu", "pyarrow", "pandas", "numpy"):
        report[package] = _version(package)
    report["cpus"] = str(os.cpu_count())
    report["torch threads"] = str(torch.get_num_threads())
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    report["cuda gpus"] = str(gpus) + (f" ({torch.cuda.get_device_name(0)})" if gpus else "")
    folder = find_fashion_mnist()
    report["fashion-mnist"] = str(folder) if folder else "not found (apt-get install dataset-fashion-mnist)"
    return report


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
