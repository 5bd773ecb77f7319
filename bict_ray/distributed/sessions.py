"""Where a training stage's loop runs: in a Ray Train worker group, or, for a single worker, in one Ray task.

The loop (``distributed/train.py``) asks its session for six things: its rank and device, where everyone runs, the
model and loader prepared for it, its share of a streamed dataset, the checkpoint to resume from, and a place to
report each epoch. Two sessions answer:

- ``RayTrainSession``: inside ``TorchTrainer``: DDP across workers and nodes, checkpoints and restarts by Ray Train.
- ``TaskSession``: inside one Ray task with the worker's resources. A Ray Train ``fit()`` starts a controller and a
  worker group and tears them down again, a fixed cost of seconds (BENCHMARKS.md) that a one-worker stage gains
  nothing from. The task checkpoints every epoch into the same storage as Ray Train would
  (``STORAGE/NAME/checkpoint_<epoch>/checkpoint.pt``, the newest two kept), is retried by Ray when its process or
  node dies or the loop raises (``max_retries`` = ``train.max_failures``), and resumes from its newest checkpoint
  then and on a re-run under the same name, as Ray Train does.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any, Protocol

import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_PREFIX = "checkpoint_"


class TrainSession(Protocol):
    """What the training loop needs from where it runs."""

    rank: int
    device: torch.device

    def placement(self) -> list[dict[str, Any]]:
        """Where each rank runs: {"rank", "node_id", "pid"} per rank, recorded in the model card."""

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def prepare_loader(self, loader: torch.utils.data.DataLoader): ...

    def dataset_shard(self, dataset):
        """This rank's share of a streamed ``dataset`` (a Ray Data iterator)."""

    def restore(self) -> dict[str, Any] | None:
        """The newest checkpoint's contents, or None for a fresh start."""

    def report(self, metrics: dict[str, float], saved: dict[str, Any] | None) -> None:
        """One epoch's metrics; ``saved`` (rank 0 only) is the checkpoint to keep."""


class RayTrainSession:
    """A worker of ``TorchTrainer``: every rank reports, only rank 0 carries the checkpoint."""

    def __init__(self):
        self.rank = ray.train.get_context().get_world_rank()
        self.device = ray.train.torch.get_device()

    def placement(self) -> list[dict[str, Any]]:
        me = _here(self.rank)
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return [me]
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, me)
        return everyone

    def prepare_model(self, model):
        return ray.train.torch.prepare_model(model)

    def prepare_loader(self, loader):
        return ray.train.torch.prepare_data_loader(loader)

    def dataset_shard(self, dataset):
        return ray.train.get_dataset_shard("train")  # the trainer was given ``dataset`` and split it

    def restore(self):
        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return None
        with checkpoint.as_directory() as folder:
            return torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location=self.device, weights_only=True)

    def report(self, metrics, saved):
        if saved is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(saved, os.path.join(folder, CHECKPOINT_FILE))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


class TaskSession:
    """The only worker, in a Ray task: the model on the task's device, the loader as it is (one rank, no sampler),
    checkpoints in a ``CheckpointStore``."""

    rank = 0

    def __init__(self, store: CheckpointStore, use_gpu: bool):
        # Ray gives a task with num_gpus=1 one device, visible as cuda:0
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.store = store

    def placement(self):
        return [_here(0)]

    def prepare_model(self, model):
        return model.to(self.device)

    def prepare_loader(self, loader):
        return loader  # the stages move each batch to the device themselves

    def dataset_shard(self, dataset):
        return dataset.iterator()  # the only worker: the whole stream

    def restore(self):
        return self.store.latest(self.device)

    def report(self, metrics, saved):
        if saved is not None:
            self.store.save(saved)


class CheckpointStore:
    """One run's checkpoints, ``ROOT/NAME/checkpoint_<epoch:06d>/checkpoint.pt``, on a local path or any URI
    pyarrow opens (s3://, gs://, ...).

    A checkpoint is written beside its final name and moved there, so a reader (a resume, or a test watching the
    run) sees it whole or not at all; on object stores the move is a copy of one object, complete or absent.
    """

    def __init__(self, root: str, name: str, keep: int = 2):
        if "://" in root:
            self.fs, root = pafs.FileSystem.from_uri(root)
        else:
            self.fs, root = pafs.LocalFileSystem(), os.path.abspath(root)
        self.folder = f"{root.rstrip('/')}/{name}"
        self.keep = keep

    def latest(self, map_location=None) -> dict[str, Any] | None:
        for folder in reversed(self._checkpoints()):
            path = f"{folder}/{CHECKPOINT_FILE}"
            if self.fs.get_file_info(path).type == pafs.FileType.File:
                with self.fs.open_input_file(path) as f:
                    return torch.load(io.BytesIO(f.read()), map_location=map_location, weights_only=True)
        return None

    def save(self, saved: dict[str, Any]) -> None:
        folder = f"{self.folder}/{CHECKPOINT_PREFIX}{saved['epoch']:06d}"
        self.fs.create_dir(folder, recursive=True)
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        partial = f"{folder}/{CHECKPOINT_FILE}.partial"
        with self.fs.open_output_stream(partial) as f:
            f.write(buffer.getbuffer())
        self.fs.move(partial, f"{folder}/{CHECKPOINT_FILE}")
        for old in self._checkpoints()[:-self.keep]:
            self.fs.delete_dir(old)

    def _checkpoints(self) -> list[str]:
        """The checkpoint folders, oldest first (the zero-padded epoch sorts them)."""
        selector = pafs.FileSelector(self.folder, allow_not_found=True)
        return sorted(info.path for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.Directory and info.base_name.startswith(CHECKPOINT_PREFIX))


def _here(rank: int) -> dict[str, Any]:
    return {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
