"""train.ingest=stream: the training split as a Ray Data stream, exactly the split, split across the workers."""

import dataclasses
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bict_ray.config import ConfigError, DataConfig, GalleryConfig, load_config
from bict_ray.core.data import DataError, load_dataset
from bict_ray.core.embed import embed_images
from bict_ray.distributed.ingest import StreamLoader, stream_image_set, stream_parquet
from bict_ray.distributed.pipelines import embed_in_tasks
from bict_ray.distributed.train import extract_transform_pairs, train_embedding_model
from conftest import train_subset


def stream_rows(dataset):
    """(images, labels, ids) of a whole stream, in id order."""
    batches = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    images, labels, ids = (np.concatenate([b[k] for b in batches]) for k in ("image", "label", "id"))
    order = np.argsort(ids)
    return images[order], labels[order], ids[order]


def test_a_stream_of_a_loaded_split_is_the_split(ray_session, smoke_data):
    split = smoke_data.train
    images, labels, ids = stream_rows(stream_image_set(split))
    np.testing.assert_array_equal(ids, split.ids)  # the split's ids are ascending
    np.testing.assert_array_equal(labels, split.labels)
    np.testing.assert_array_equal(images, split.images)


def png(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels[0]).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def parquet_data(smoke_data, tmp_path_factory):
    """The smoke slice as a Parquet table of PNGs over three files, ids not in row order."""
    root = tmp_path_factory.mktemp("table")
    source = smoke_data.train
    ids = np.random.default_rng(0).permutation(len(source)) * 7 + 5
    for part, rows in enumerate(np.array_split(np.arange(len(source)), 3)):
        pq.write_table(pa.table({"image": [png(source.images[i]) for i in rows],
                                 "label": source.labels[rows].astype(np.int64), "id": ids[rows]}),
                       root / f"part-{part}.parquet")
    config = DataConfig(kind="parquet", root=str(root), limit_train=600)
    return config, load_dataset(config)


def test_a_parquet_stream_decodes_the_split_as_the_loader_does(ray_session, parquet_data):
    config, data = parquet_data
    # the rows of the training split only (not validation's or test's, nor those the limit left out), decoded in
    # Ray Data tasks to the very bytes the driver's loader decoded
    images, labels, ids = stream_rows(stream_parquet(config, data.train, num_cpus=0.5))
    np.testing.assert_array_equal(ids, data.train.ids)
    np.testing.assert_array_equal(labels, data.train.labels)
    np.testing.assert_array_equal(images, data.train.images)


def test_a_parquet_stream_needs_the_id_column(ray_session, parquet_data):
    config, data = parquet_data
    with pytest.raises(DataError, match="data.id_column is null"):
        stream_parquet(dataclasses.replace(config, id_column=None), data.train, num_cpus=0.5)


def test_an_epoch_of_the_loader_is_one_shuffled_pass(ray_session, smoke_data):
    split = smoke_data.train
    loader = StreamLoader(stream_image_set(split).iterator(), batch_size=64, shuffle_buffer=512, seed=3)
    passes = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert all(len(b[0]) == 64 for b in batches)  # the last short batch dropped
        passes.append(np.concatenate([b[2].numpy() for b in batches]))
    for seen in passes:
        assert len(seen) == len(split) // 64 * 64 and len(np.unique(seen)) == len(seen)
        assert np.isin(seen, split.ids).all()
    assert not np.array_equal(passes[0], passes[1])  # each epoch its own order


@pytest.mark.parametrize("workers,launcher", [(1, "task"), (2, "ray_train")])
def test_streamed_training_learns_and_splits_the_stream(ray_session, smoke_data, tmp_path, workers, launcher):
    classes = [0, 1, 2, 3, 4]
    config = load_config("configs/smoke.yaml", ["train.ingest=stream", "train.epochs=2",
                                                f"train.num_workers={workers}", f"train.single_worker={launcher}"])
    split = train_subset(smoke_data, classes)
    model = train_embedding_model(config, tmp_path / "phi_1", 1, split, classes, smoke_data.num_classes,
                                  run_name=f"test-stream-{workers}-{tmp_path.name}")
    history = model.card.training["history"]
    # one pass over the split per epoch, all workers together: each worker got its share, not the whole stream
    share = len(split) // workers
    assert [h["samples"] for h in history] == [workers * (share // 64) * 64] * 2
    # learns: the loss falls and the accuracy over the 5 classes is above twice chance
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["accuracy"] > 2 / len(classes)
    assert len({w["pid"] for w in model.card.training["workers"]}) == workers


def test_psi_pairs_from_the_stream_are_the_pairs_from_memory(ray_session, smoke_data, parquet_data, tmp_path):
    # psi's training pairs, embedded batch by batch as the stream arrives (from the table, whose rows are not in
    # id order), come back in the split's order
    classes = [0, 1, 2, 3, 4]
    memory = load_config("configs/smoke.yaml", ["train.epochs=1"])
    phi = train_embedding_model(memory, tmp_path / "phi_1", 1, train_subset(smoke_data, classes), classes,
                                smoke_data.num_classes, run_name=f"test-pairs-{tmp_path.name}")
    table, data = parquet_data
    split = data.train
    expected = extract_transform_pairs(memory, split, [phi], phi)
    stream = load_config("configs/smoke.yaml", ["train.ingest=stream", "data.kind=parquet", f"data.root={table.root}",
                                                f"data.limit_train={table.limit_train}"])
    streamed = extract_transform_pairs(stream, split, [phi], phi)
    for want, got in zip(expected, streamed):
        assert got.shape == want.shape == (len(split), 32)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_queries_embedded_in_tasks_are_the_drivers_bit_for_bit(ray_session, smoke_data, tmp_path):
    # eval.embed=tasks: the query set in shards over two tasks, each model built once, back in the set's order
    classes = [0, 1, 2, 3, 4]
    config = load_config("configs/smoke.yaml", ["train.epochs=1"])
    phi = train_embedding_model(config, tmp_path / "phi_1", 1, train_subset(smoke_data, classes), classes,
                                smoke_data.num_classes, run_name=f"test-embed-{tmp_path.name}")
    queries = smoke_data.test
    got = embed_in_tasks(phi, queries, config=GalleryConfig(rows_per_shard=96, concurrency=2))
    np.testing.assert_array_equal(got, embed_images(phi.module, queries.images, ids=queries.ids))


def test_an_unknown_ingest_or_embed_place_is_refused():
    with pytest.raises(ConfigError, match="train.ingest must be one of memory, stream"):
        load_config("configs/smoke.yaml", ["train.ingest=disk"])
    with pytest.raises(ConfigError, match="eval.embed must be one of driver, tasks"):
        load_config("configs/smoke.yaml", ["eval.embed=gpu"])
