"""Shared fixtures. One Ray instance serves the whole session: starting Ray costs seconds on this machine."""

import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import local_s3

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# S3 means the local test server (local_s3.py), named by the standard AWS variables. Set before Ray starts, so that
# every Ray worker and driver subprocess of the session inherits them; the server itself starts with the `s3` fixture.
os.environ.update(local_s3.ENVIRONMENT)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from bict_ray.distributed.cluster import set_train_env_defaults

    if not ray.is_initialized():
        set_train_env_defaults()
        # address="local": always a fresh instance of our own, even when a `ray start` cluster runs on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3():
    """The session's S3-compatible server on 127.0.0.1 (moto), reached through AWS_ENDPOINT_URL."""
    server = local_s3.LocalS3()
    yield server
    server.close()


@pytest.fixture
def bucket(s3, request):
    """A new, empty bucket for one test: its name."""
    import boto3

    name = "t-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid() % 1000}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def smoke_config():
    from bict_ray.config import load_config

    return load_config("configs/smoke.yaml")


@pytest.fixture(scope="session")
def smoke_data(smoke_config):
    from bict_ray.core.data import load_dataset

    return load_dataset(smoke_config.data)


def load_bench(name: str):
    """bench/<name>.py as a module (the benchmarks are scripts, not a package the tests import)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_subset(dataset, classes):
    """The training images of the given classes."""
    return dataset.train.subset(np.flatnonzero(np.isin(dataset.train.labels, classes)))


class Deployed(nn.Module):
    """What a service scripts of one of the project's models: the embedding of its [-1, 1] input, nothing else."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x)


def deploy(net, path, images: np.ndarray) -> None:
    """``net`` traced to TorchScript at ``path``, as a team hands over its production model (``images``: a few
    (N, C, H, W) uint8 examples)."""
    from bict_ray.core.embed import preprocess

    torch.jit.trace(Deployed(net).eval(), preprocess(torch.from_numpy(np.array(images))),
                    check_trace=False).save(str(path))


def trained_small_cnn(config, dataset, classes):
    """The config's model trained one epoch in this process on ``classes`` of the dataset's training images, in
    eval mode (embedding_stage puts the images in Ray's object store: needs ray_session)."""
    from bict_ray.distributed.train import embedding_stage

    stage = embedding_stage(config, 1, train_subset(dataset, classes), dataset.num_classes, classes_seen=classes)
    torch.manual_seed(0)
    parts = stage.build(torch.device("cpu"))
    parts.run_epoch(parts.model, parts.loader, stage.optimizer(parts.model.parameters()), 0)
    return parts.model.eval()


def user_module(tmp_path, monkeypatch, prefix: str, source: str) -> str:
    """``source`` as a module a user put on sys.path, named ``prefix`` + the test's folder so that no other test's
    copy is cached; returns its name."""
    import textwrap

    name = prefix + tmp_path.name.replace("-", "_")
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name
