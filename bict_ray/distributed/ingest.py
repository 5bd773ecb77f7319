"""Training images as a Ray Data stream (``train.ingest: stream``): no worker holds the whole split.

``training_stream`` gives a Ray Dataset with one row per image (``image`` (C, H, W) uint8, ``label``, ``id``), of
the split's images only, in one of two ways:

- data.kind=parquet: the table itself, read and decoded in Ray Data tasks (``train.ingest_cpus`` CPUs each), the
  rows filtered to the split's ids. Decoding uses the loader's own code with the channels and size the split was
  loaded with, so a streamed image is the loaded image, byte for byte.
- every other kind: the split the driver loaded, cut into blocks in the object store; a worker fetches only the
  blocks of its share, where the memory path gives each worker the whole array.

Ray Train splits the stream across its workers (``ray.train.get_dataset_shard``); a one-worker task iterates it
whole. ``StreamLoader`` turns a worker's share into the (images, labels, ids) batches the training loop takes, each
epoch a new pass, shuffled in a local buffer with a seed per epoch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import ray

from bict_ray.config import Config
from bict_ray.core.data import ImageSet, decode_images, parquet_table_files
from bict_ray.core.image_table import image_bytes, require_bytes_field
from bict_ray.errors import DataError

IMAGE, LABEL, ID = "image", "label", "id"
# rows per object-store block of a split the driver loaded: a few MiB of images, so that a worker's share is many
# blocks and its buffer holds a handful
BLOCK_BYTES = 4 << 20


def training_stream(config: Config, split: ImageSet) -> ray.data.Dataset:
    """The Ray Dataset of ``split``'s images (see the module's docstring for where it reads them)."""
    if config.data.kind == "parquet":
        return stream_parquet(config.data, split, config.train.ingest_cpus)
    return stream_image_set(split)


def stream_image_set(split: ImageSet) -> ray.data.Dataset:
    """``split`` in object-store blocks of about ``BLOCK_BYTES`` of images."""
    rows = _rows_per_block(split)
    blocks = [_block(split.images[i:i + rows], split.labels[i:i + rows], split.ids[i:i + rows])
              for i in range(0, len(split), rows)]
    return ray.data.from_arrow(blocks)


def stream_parquet(data_cfg, split: ImageSet, num_cpus: float) -> ray.data.Dataset:
    """The rows of ``split`` read from the Parquet table at ``data_cfg.root`` and decoded in Ray Data tasks.

    The split's ids select the rows, so the table needs its id column: without one, ids are row positions in the
    whole table, which a task reading one file cannot know."""
    if data_cfg.id_column is None:
        raise DataError("train.ingest=stream reads the images of data.kind=parquet by their ids, and data.id_column "
                        "is null; give the table an id column, or use train.ingest=memory")
    files = [str(f) for f in parquet_table_files(data_cfg.root)]
    columns = [data_cfg.image_column, data_cfg.label_column, data_cfg.id_column]
    decode = dataclasses.replace(data_cfg, channels=int(split.images.shape[1]), image_size=int(split.images.shape[2]))
    dataset = ray.data.read_parquet(files, num_cpus=num_cpus).select_columns(columns)
    # a function, not a class: a class runs in an actor pool, started again on every pass (every epoch). Batches
    # of about BLOCK_BYTES decoded, each one output block: a worker's memory is then its buffer and a few such
    # blocks, where a file's whole block, decoded, grew with the table (BENCHMARKS.md, "Training ingest")
    return dataset.map_batches(_decode_rows, fn_kwargs=dict(cfg=decode, ids=np.sort(split.ids)),
                               batch_size=_rows_per_block(split), batch_format="pyarrow", num_cpus=num_cpus,
                               zero_copy_batch=True)


def _rows_per_block(split: ImageSet) -> int:
    return max(1, BLOCK_BYTES // max(1, int(np.prod(split.images.shape[1:]))))


class StreamLoader:
    """A worker's share of the stream as batches of (images (B, C, H, W) uint8, labels, ids) tensors.

    Each ``iter`` is one epoch: a new pass over the share (Ray Data reads it again), shuffled in a buffer of
    ``shuffle_buffer`` rows seeded by ``seed`` and the epoch (``set_epoch``); the last incomplete batch is dropped,
    as the memory path's loader drops it."""

    def __init__(self, shard, batch_size: int, shuffle_buffer: int, seed: int):
        self.shard, self.batch_size, self.shuffle_buffer, self.seed = shard, batch_size, shuffle_buffer, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        batches = self.shard.iter_torch_batches(
            batch_size=self.batch_size, drop_last=True, device="cpu", local_shuffle_buffer_size=self.shuffle_buffer,
            local_shuffle_seed=self.seed * 100_003 + self.epoch)
        for batch in batches:
            yield batch[IMAGE], batch[LABEL], batch[ID]


def _decode_rows(rows: pa.Table, cfg, ids: np.ndarray) -> pa.Table:
    """One batch of table rows: those whose id is in ``ids`` (sorted) kept, their images decoded."""
    found = rows.column(cfg.id_column).to_numpy().astype(np.int64)
    keep = np.flatnonzero(_isin_sorted(found, ids))
    rows, kept = rows.take(pa.array(keep, pa.int64())), found[keep]
    column = rows.column(cfg.image_column)
    field = require_bytes_field(column.type, str(cfg.root), cfg.image_column)
    encoded = image_bytes(column, field, str(cfg.root), cfg.image_column).to_pylist()
    images = decode_images(encoded, cfg, lambda i: f"id {kept[i]} of {cfg.root}")
    return _block(images, rows.column(cfg.label_column).to_numpy().astype(np.int64), kept)


def _isin_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """values in sorted_set, by binary search (the split's ids are sorted once on the driver)."""
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def _block(images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> pa.Table:
    return pa.table({IMAGE: pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(images)),
                     LABEL: pa.array(labels, pa.int64()), ID: pa.array(ids, pa.int64())})
