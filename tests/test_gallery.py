"""Gallery extraction, upgrade (with a real SIGKILL mid-upgrade) and sharded evaluation on Ray Data, and their CLI."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bict_ray.cli import main
from bict_ray.config import GalleryConfig
from bict_ray.core.data import ImageSet
from bict_ray.core.embed import embed_images, upgrade_embeddings
from bict_ray.core.models import EmbeddingNet, UpgradeTransform
from bict_ray.distributed.evaluate import RayDataExecutor, evaluate_gallery
from bict_ray.distributed.pipelines import extract_gallery, upgrade_gallery
from bict_ray.errors import StorageError
from bict_ray.retrieval.metrics import retrieval_metrics
from bict_ray.retrieval.protocol import PartialRefresh
from bict_ray.retrieval.sharded import IN_PROCESS, sharded_retrieval_metrics
from bict_ray.storage.artifacts import ModelCard, load_artifact, save_artifact
from bict_ray.storage.gallery import GalleryError, GalleryWriter, open_gallery, write_gallery

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 8
IMAGE_SIZE = 8
NUM_CLASSES = 4
# Many small shards: the killed driver must still be mid-upgrade when the test has seen a few shards staged.
SHARDS, ROWS_PER_SHARD = 120, 16
CONFIG = GalleryConfig(rows_per_shard=16, batch_size=64, concurrency=1, cpus_per_task=0.5)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """phi_1 (small CNN on 1x8x8 images, DIM-d embeddings), psi_1_2 (DIM -> DIM, not the identity) and a psi
    trained for another gallery (source phi_2), saved with cards like train.py's."""
    root = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    phi = EmbeddingNet(in_channels=1, image_size=IMAGE_SIZE, embedding_dim=DIM, num_classes=NUM_CLASSES).eval()
    save_artifact(root / "phi_1", phi, ModelCard("embedding", "phi_1", version=1))
    for name, source, target in (("psi_1_2", "phi_1", "phi_2"), ("psi_2_3", "phi_2", "phi_3")):
        psi = UpgradeTransform(DIM, DIM, hidden=16, layers=1)
        torch.nn.init.normal_(psi.mlp[-1].weight)  # a residual psi starts as the identity: make it map something
        save_artifact(root / name, psi, ModelCard("transform", name, source=source, target=target))
    return {name: load_artifact(root / name) for name in ("phi_1", "psi_1_2", "psi_2_3")}


@pytest.fixture(scope="module")
def source_gallery(tmp_path_factory):
    """A phi_1-space gallery of SHARDS x ROWS_PER_SHARD unit rows, ids shuffled, 4 labels (no Ray involved)."""
    ids, labels, embeddings = random_gallery(SHARDS * ROWS_PER_SHARD, seed=1)
    out = str(tmp_path_factory.mktemp("source") / "v1")
    return write_gallery(out, ids, labels, embeddings, rows_per_shard=ROWS_PER_SHARD, lineage=["phi_1"],
                         space="phi_1")


@pytest.fixture(scope="module")
def upgraded(ray_session, artifacts, source_gallery, tmp_path_factory):
    """The uninterrupted upgrade of source_gallery by psi_1_2, and its stats."""
    out = str(tmp_path_factory.mktemp("upgraded") / "v2")
    return upgrade_gallery(source_gallery, artifacts["psi_1_2"], out, config=CONFIG)


def random_gallery(n, seed, d=DIM):
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(n, d)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return rng.permutation(10 * n)[:n].astype(np.int64), rng.integers(0, NUM_CLASSES, n), embeddings


def random_images(n, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    return ImageSet(images, rng.integers(0, NUM_CLASSES, n), np.arange(1000, 1000 + n, dtype=np.int64))


def npz_dataset(images, npz) -> list[str]:
    """``images`` saved as an npz dataset (train and test the same images); the CLI settings that load it."""
    np.savez(npz, images=images.images[:, 0], labels=images.labels, test_images=images.images[:, 0],
             test_labels=images.labels)
    return ["--set", "data.kind=npz", "--set", f"data.root={npz}", "--set", "gallery.rows_per_shard=16"]


def file_bytes(version):
    return [open(path, "rb").read() for path in version.shard_paths]


# ---- extraction and upgrade ------------------------------------------------------------------------


def test_extract_stores_the_models_embeddings_with_the_images_ids(ray_session, artifacts, tmp_path):
    images = random_images(40, seed=2)
    version, stats = extract_gallery(artifacts["phi_1"], images, str(tmp_path / "v1"), config=CONFIG)
    embeddings, labels, ids = open_gallery(str(tmp_path / "v1")).read_all()
    np.testing.assert_array_equal(ids, images.ids)
    np.testing.assert_array_equal(labels, images.labels)
    np.testing.assert_allclose(embeddings, embed_images(artifacts["phi_1"].module, images.images), atol=1e-5)
    assert (version.lineage, version.space, version.num_shards) == (["phi_1"], "phi_1", 3)
    assert (stats.rows, stats.shards, stats.skipped_shards) == (40, 3, 0)


def test_a_long_pipeline_reports_the_shards_staged(ray_session, artifacts, source_gallery, tmp_path, monkeypatch):
    import bict_ray.distributed.pipelines

    monkeypatch.setattr(bict_ray.distributed.pipelines, "PROGRESS_EVERY_S", 0.05)
    lines = []
    upgrade_gallery(source_gallery, artifacts["psi_1_2"], str(tmp_path / "v2"), config=CONFIG,
                    progress=lines.append)
    counts = [int(re.search(r"(\d+)/120 shards staged after \d+ s$", line).group(1)) for line in lines]
    assert counts and counts == sorted(counts) and counts[-1] <= SHARDS
    assert all(line.startswith(str(tmp_path / "v2.staging")) for line in lines)


def test_a_shard_pipeline_starts_all_its_slots_at_once(ray_session):
    """Both slots of a 2-slot pipeline start together. Ray Data's object-store budget policy held the second task
    back until it re-read its reserved resources, 1.0 s later, and all tasks being equally long the pipeline's last
    task then ran alone for that second: a core idle for a sixth of a 1M-row upgrade."""
    from bict_ray.distributed.shards import map_shard_tasks

    def started(batch):
        began = time.time()
        time.sleep(1.5)
        return {"id": batch["id"], "began": np.full(len(batch["id"]), began)}

    gaps = []
    for _ in range(3):  # the first run may start a worker process; the stagger, when there, is in every run
        rows = map_shard_tasks(2, 2, started, {}, num_cpus=1).take_all()
        assert sorted(int(r["id"]) for r in rows) == [0, 1]
        gaps.append(abs(rows[0]["began"] - rows[1]["began"]))
    assert min(gaps[1:]) < 0.6, f"the second task started {gaps} s after the first"


def test_upgrade_applies_psi_shard_by_shard_and_extends_the_lineage(upgraded, source_gallery, artifacts):
    version, stats = upgraded
    assert (version.lineage, version.space) == (["phi_1", "psi_1_2"], "phi_2")
    assert (stats.rows, stats.shards, stats.skipped_shards) == (SHARDS * ROWS_PER_SHARD, SHARDS, 0)
    for index in (0, 117, SHARDS - 1):
        embeddings, labels, ids = version.read_shard(index)
        source_embeddings, source_labels, source_ids = source_gallery.read_shard(index)
        np.testing.assert_array_equal(ids, source_ids)
        np.testing.assert_array_equal(labels, source_labels)
        expected = upgrade_embeddings([artifacts["psi_1_2"].module], source_embeddings)
        np.testing.assert_allclose(embeddings, expected, atol=1e-5)
        assert np.abs(embeddings - source_embeddings).max() > 0.1  # psi really moved the rows


def test_bfloat16_upgrade_is_recorded_and_close_to_float32(ray_session, upgraded, source_gallery, artifacts, tmp_path):
    config = GalleryConfig(rows_per_shard=16, batch_size=64, concurrency=1, cpus_per_task=0.5,
                           upgrade_precision="bfloat16")
    version, _ = upgrade_gallery(source_gallery, artifacts["psi_1_2"], str(tmp_path / "v2"), config=config)
    exact = upgraded[0]
    assert version.manifest["extra"]["upgrade_precision"] == "bfloat16"
    assert exact.manifest["extra"]["upgrade_precision"] == "float32"
    fast, _, fast_ids = version.read_all()
    rows, _, exact_ids = exact.read_all()
    np.testing.assert_array_equal(fast_ids, exact_ids)
    assert 0 < np.abs(fast - rows).max() and (fast * rows).sum(axis=1).min() > 0.999
    # a float32 upgrade killed after one shard, resumed in bfloat16, would mix the two: refused, the shard kept
    partial = str(tmp_path / "v3")
    shard = exact.read_shard(0)
    GalleryWriter(partial, dim=DIM, lineage=["phi_1", "psi_1_2"], space="phi_2",
                  extra={"source_version": source_gallery.path, "upgrade_precision": "float32"}).write_shard(
        0, shard.ids, shard.labels, shard.embeddings)
    with pytest.raises(GalleryError, match="staged by another run .*upgrade_precision.*'float32'.*'bfloat16'"):
        upgrade_gallery(source_gallery, artifacts["psi_1_2"], partial, config=config)
    assert sorted(os.listdir(partial + ".staging")) == ["part-00000.parquet", "staging.json"]


def test_upgrade_refuses_a_transform_from_another_space(ray_session, artifacts, source_gallery, tmp_path):
    with pytest.raises(GalleryError, match="psi_2_3 maps phi_2 embeddings.*space of phi_1"):
        upgrade_gallery(source_gallery, artifacts["psi_2_3"], str(tmp_path / "v2"), config=CONFIG)
    assert not os.path.exists(tmp_path / "v2") and not os.path.exists(tmp_path / "v2.staging")


def test_upgrade_never_overwrites_a_committed_version(upgraded, source_gallery, artifacts):
    version, _ = upgraded
    before = file_bytes(version) + [open(os.path.join(version.path, "manifest.json"), "rb").read()]
    with pytest.raises(GalleryError, match="already holds a committed gallery version"):
        upgrade_gallery(source_gallery, artifacts["psi_1_2"], version.path, config=CONFIG)
    assert file_bytes(version) + [open(os.path.join(version.path, "manifest.json"), "rb").read()] == before


def test_upgrade_killed_by_sigkill_resumes_to_the_same_bytes(ray_session, upgraded, source_gallery, artifacts,
                                                            tmp_path):
    out = str(tmp_path / "v2")
    staging = out + ".staging"
    sigkill_upgrade_driver(ray_session, source_gallery, artifacts, out, lambda: staged_shards(staging))
    killed_at = staged_shards(staging)
    assert killed_at < SHARDS and not os.path.exists(out)

    version, stats = upgrade_gallery(source_gallery, artifacts["psi_1_2"], out, config=CONFIG)
    assert stats.skipped_shards >= 3 and stats.shards == SHARDS
    ids = version.read_all().ids
    assert len(ids) == len(np.unique(ids)) == source_gallery.num_rows
    np.testing.assert_array_equal(np.sort(ids), np.sort(source_gallery.read_all().ids))
    assert file_bytes(version) == file_bytes(upgraded[0])


def sigkill_upgrade_driver(ray_session, source_gallery, artifacts, out, staged) -> None:
    """Upgrade ``source_gallery`` by psi_1_2 into ``out`` in a driver process of the session's Ray instance, and
    SIGKILL that driver once ``staged()`` counts 3 shards written."""
    driver = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "scripts", "upgrade_gallery.py"),
         ray_session.get_runtime_context().gcs_address, source_gallery.path, str(artifacts["psi_1_2"].path), out],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while staged() < 3:
            assert driver.poll() is None, f"the driver ended before the kill: {driver.stdout.read()[-2000:]}"
            assert time.monotonic() < deadline, "the driver staged no shards within 60 s"
            time.sleep(0.02)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
    finally:
        if driver.poll() is None:
            driver.kill()


def staged_shards(staging):
    return len([n for n in os.listdir(staging) if n.endswith(".parquet")]) if os.path.isdir(staging) else 0


# ---- sharded evaluation ------------------------------------------------------------------------------


@pytest.mark.parametrize("map_at", [None, 5])
def test_sharded_evaluation_equals_in_memory_metrics(ray_session, tmp_path, map_at):
    ids, labels, embeddings = random_gallery(150, seed=3)
    gallery = write_gallery(str(tmp_path / "v1"), ids, labels, embeddings, rows_per_shard=40, lineage=["phi_1"],
                            space="phi_1")
    # the first 30 queries are gallery images (self-excluded by id), the other 10 are not in the gallery
    extra_ids, extra_labels, extra_embeddings = random_gallery(10, seed=4)
    query = np.concatenate([embeddings[:30], extra_embeddings])
    query_labels = np.concatenate([labels[:30], extra_labels])
    query_ids = np.concatenate([ids[:30], extra_ids + 10_000])
    got = evaluate_gallery(query, query_labels, gallery.path, query_ids=query_ids, map_at=map_at, concurrency=2)
    expected = retrieval_metrics(query, query_labels, embeddings, labels, query_ids=query_ids, gallery_ids=ids,
                                 map_at=map_at)
    assert got == pytest.approx(expected, abs=1e-12)
    assert got["num_queries"] == 40 and 0 < got["mAP"] < 1


@pytest.mark.parametrize("map_at", [None, 5])
def test_ray_data_and_in_process_executors_give_identical_metrics(ray_session, tmp_path, map_at):
    # one driver, two executors: the same shards, the same passes, the same merges, whatever order the tasks finish
    ids, labels, embeddings = random_gallery(150, seed=6)
    gallery = write_gallery(str(tmp_path / "v1"), ids, labels, embeddings, rows_per_shard=20, lineage=["phi_1"],
                            space="phi_1")
    query, query_labels, query_ids = embeddings[:40], labels[:40], ids[:40]
    ray_data = RayDataExecutor(concurrency=2)
    results = {executor: sharded_retrieval_metrics(query, query_labels, gallery, query_ids=query_ids, ks=(1, 5),
                                                   map_at=map_at, executor=executor)
               for executor in (IN_PROCESS, ray_data)}
    assert results[ray_data] == results[IN_PROCESS] and results[IN_PROCESS]["num_queries"] == 40
    # a source built in the driver (a partial refresh of two versions) travels to the tasks and mixes the same rows
    upgraded = write_gallery(str(tmp_path / "v2"), ids, labels, random_gallery(150, seed=7)[2], rows_per_shard=20,
                             lineage=["phi_1", "psi_1_2"], space="phi_2")
    mixed = PartialRefresh(upgraded, gallery, np.arange(150) % 3 == 0)
    assert sharded_retrieval_metrics(query, query_labels, mixed, query_ids=query_ids, map_at=map_at,
                                     executor=ray_data) == \
        sharded_retrieval_metrics(query, query_labels, mixed, query_ids=query_ids, map_at=map_at)


def test_evaluation_refuses_queries_of_another_dim(ray_session, source_gallery):
    query = np.eye(3, 4, dtype=np.float32)
    with pytest.raises(ValueError, match=f"query dim 4 does not match gallery .* dim {DIM}"):
        evaluate_gallery(query, np.zeros(3, np.int64), source_gallery)


# ---- command line ------------------------------------------------------------------------------------


def test_cli_upgrade_onto_a_committed_version_exits_2(upgraded, source_gallery, artifacts, capsys):
    code = main(["upgrade", "--gallery", source_gallery.path, "--transform", str(artifacts["psi_1_2"].path),
                 "--out", upgraded[0].path])
    assert code == 2
    err = capsys.readouterr().err
    assert "already holds a committed gallery version" in err and upgraded[0].path in err


def test_cli_extract_then_evaluate_prints_the_metrics(ray_session, artifacts, tmp_path, capsys):
    images = random_images(48, seed=5)
    settings = npz_dataset(images, tmp_path / "data.npz")
    model = str(artifacts["phi_1"].path)
    assert main(["extract", "--model", model, "--out", str(tmp_path / "v1"), *settings]) == 0
    assert "48 rows in 3 shards (0 resumed)" in capsys.readouterr().out
    results = tmp_path / "results.json"
    assert main(["evaluate", "--gallery", str(tmp_path / "v1"), "--model", model, "--out", str(results),
                 *settings]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{"):])
    written = json.loads(results.read_text())
    # the CLI's queries (embedded in this process, as it embeds them) against the gallery as stored, shard by shard
    # in this process: the same numbers. Not retrieval_metrics in memory: this untrained phi_1 scores every pair of
    # these random images within 0.004 of 1, many pairs within one float32 ulp, so exact mAP moves by 1e-5 with the
    # block shape of the score matmuls (see bict_ray.retrieval.metrics)
    query = embed_images(artifacts["phi_1"].module, images.images)
    version = open_gallery(str(tmp_path / "v1"))
    stored = version.read_all()
    expected = sharded_retrieval_metrics(query, images.labels, version, query_ids=stored.ids)
    assert written["metrics"] == expected
    in_memory = retrieval_metrics(query, images.labels, stored.embeddings, stored.labels, query_ids=stored.ids,
                                  gallery_ids=stored.ids)
    assert written["metrics"] == pytest.approx(in_memory, abs=1e-4)
    assert (written["query_model"], written["gallery_lineage"]) == ("phi_1", ["phi_1"])
    assert printed == written


# ---- on S3 (the local server of tests/local_s3.py, through the standard AWS variables) ---------------------


def s3_objects(bucket, prefix):
    """{key: bytes} of the objects under ``prefix``, read with boto3, as any S3 client would see them (without the
    empty "folder/" markers pyarrow creates)."""
    import boto3

    client = boto3.client("s3")
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def s3_shards(bucket, prefix):
    import boto3

    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return len([o for o in listing.get("Contents", []) if re.search(r"/part-\d+\.parquet$", o["Key"])])


def test_upgrade_on_s3_writes_the_same_version_as_on_disk(ray_session, upgraded, source_gallery, artifacts, bucket):
    # the source read from S3, the upgrade written there by Ray Data tasks: byte for byte the local upgrade
    ids, labels, embeddings = source_gallery.read_all()[2], source_gallery.read_all()[1], source_gallery.read_all()[0]
    source = write_gallery(f"s3://{bucket}/v1", ids, labels, embeddings, rows_per_shard=ROWS_PER_SHARD,
                           lineage=["phi_1"], space="phi_1")
    version, stats = upgrade_gallery(source.path, artifacts["psi_1_2"], f"s3://{bucket}/v2", config=CONFIG)
    assert stats.shards == SHARDS and version.path == f"s3://{bucket}/v2"
    stored = s3_objects(bucket, "v2/")
    assert sorted(stored) == ["v2/manifest.json"] + [f"v2/part-{i:05d}.parquet" for i in range(SHARDS)]
    local = upgraded[0]
    assert [stored[f"v2/{os.path.basename(p)}"] for p in local.shard_paths] == file_bytes(local)
    np.testing.assert_array_equal(open_gallery(f"s3://{bucket}/v2").read_all().embeddings,
                                  local.read_all().embeddings)


def assert_resumes_on_s3(upgraded, source_gallery, artifacts, bucket) -> None:
    """s3://bucket/v2 holds an unfinished upgrade (no version yet); its rerun skips what is there and ends with the
    bytes of the uninterrupted upgrade."""
    out = f"s3://{bucket}/v2"
    with pytest.raises(GalleryError, match="not a committed gallery version"):
        open_gallery(out)
    version, stats = upgrade_gallery(source_gallery, artifacts["psi_1_2"], out, config=CONFIG)
    assert stats.skipped_shards >= 3 and stats.shards == SHARDS
    stored = s3_objects(bucket, "v2/")
    assert [stored[f"v2/{os.path.basename(p)}"] for p in upgraded[0].shard_paths] == file_bytes(upgraded[0])


def test_cli_gallery_commands_take_s3_uris(ray_session, artifacts, bucket, tmp_path, monkeypatch, capsys):
    # extract into the bucket, evaluate from it, the metrics written back to it: nothing becomes a local "s3:" folder
    monkeypatch.chdir(tmp_path)
    images = random_images(48, seed=5)
    settings = npz_dataset(images, tmp_path / "data.npz")
    model = str(artifacts["phi_1"].path)
    assert main(["extract", "--model", model, "--out", f"s3://{bucket}/v1", *settings]) == 0
    assert main(["evaluate", "--gallery", f"s3://{bucket}/v1", "--model", model, "--out",
                 f"s3://{bucket}/metrics.json", *settings]) == 0
    out = capsys.readouterr().out
    stored = s3_objects(bucket, "")
    assert json.loads(stored["metrics.json"]) == json.loads(out[out.index("{"):])
    assert "v1/manifest.json" in stored and sorted(p.name for p in tmp_path.iterdir()) == ["data.npz"]


def test_upgrade_on_s3_killed_by_sigkill_resumes_to_the_same_bytes(ray_session, upgraded, source_gallery, artifacts,
                                                                  bucket):
    out = f"s3://{bucket}/v2"
    sigkill_upgrade_driver(ray_session, source_gallery, artifacts, out, lambda: s3_shards(bucket, "v2/"))
    time.sleep(1)  # the task that was writing when its driver died may finish its shard
    killed_at = s3_shards(bucket, "v2/")
    assert killed_at < SHARDS and "v2/manifest.json" not in s3_objects(bucket, "v2/manifest")
    assert_resumes_on_s3(upgraded, source_gallery, artifacts, bucket)


def test_s3_lost_mid_upgrade_fails_naming_it_commits_nothing_and_resumes(ray_session, s3, upgraded, source_gallery,
                                                                         artifacts, bucket):
    import threading

    out = f"s3://{bucket}/v2"
    outcome = {}

    def upgrade():
        try:
            outcome["version"] = upgrade_gallery(source_gallery, artifacts["psi_1_2"], out, config=CONFIG)
        except Exception as err:  # checked below
            outcome["error"] = err

    thread = threading.Thread(target=upgrade)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while s3_shards(bucket, "v2/") < 3:
            assert thread.is_alive(), f"the upgrade ended before the server went away: {outcome}"
            assert time.monotonic() < deadline, "no shards staged within 60 s"
            time.sleep(0.05)
        s3.stop()
        thread.join(timeout=180)
    finally:
        s3.start()
    assert not thread.is_alive(), "the upgrade hung when the server went away"
    assert "error" in outcome, "the upgrade finished although the server was gone"
    error = outcome["error"]  # the version it was writing, the store's own words, and what is left
    assert isinstance(error, StorageError), repr(error)
    assert re.search(rf"writing gallery version {out} failed in its storage: .*connect.* Nothing was committed",
                     str(error), re.IGNORECASE), str(error)
    assert_resumes_on_s3(upgraded, source_gallery, artifacts, bucket)
