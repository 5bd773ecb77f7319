"""Rows keep their space: `append` (new rows in a gallery's space as a new version) and upgrades that refuse rows in
the wrong space, on Ray Data, through the Python API and the CLI."""

import io
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bict_ray.cli import main
from bict_ray.config import GalleryConfig
from bict_ray.core.embed import embed_images
from bict_ray.core.models import EmbeddingNet, UpgradeTransform
from bict_ray.distributed.pipelines import append_gallery, upgrade_gallery
from bict_ray.storage.artifacts import ModelCard, load_artifact, save_artifact
from bict_ray.storage.gallery import GalleryError, open_gallery, write_gallery

DIM, IMAGE_SIZE, ROWS_PER_SHARD = 8, 8, 16
CONFIG = GalleryConfig(rows_per_shard=ROWS_PER_SHARD, batch_size=64, concurrency=2, cpus_per_task=0.5)


def unit_rows(n, seed):
    rows = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """phi_2 (a small CNN on 1x8x8 images) and two transforms: psi_1_2 into its space, psi_2_3 out of it."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    phi = EmbeddingNet(in_channels=1, image_size=IMAGE_SIZE, embedding_dim=DIM, num_classes=4).eval()
    save_artifact(root / "phi_2", phi, ModelCard("embedding", "phi_2", version=2))
    for name, source, target in (("psi_1_2", "phi_1", "phi_2"), ("psi_2_3", "phi_2", "phi_3")):
        psi = UpgradeTransform(DIM, DIM, hidden=16, layers=1)
        torch.nn.init.normal_(psi.mlp[-1].weight)  # a residual psi starts as the identity: make it map something
        save_artifact(root / name, psi, ModelCard("transform", name, source=source, target=target))
    return {name: root / name for name in ("phi_2", "psi_1_2", "psi_2_3")}


@pytest.fixture(scope="module")
def upgraded(ray_session, models, tmp_path_factory):
    """A phi_1 gallery of 40 rows (ids 0..39) upgraded by psi_1_2: every row in phi_2, lineage phi_1>psi_1_2."""
    root = tmp_path_factory.mktemp("upgraded")
    ids = np.arange(40)
    v1 = write_gallery(str(root / "v1"), ids, ids % 4, unit_rows(40, 1), rows_per_shard=ROWS_PER_SHARD,
                       lineage=["phi_1"], space="phi_1")
    return upgrade_gallery(v1, str(models["psi_1_2"]), str(root / "v2"), config=CONFIG)[0]


def new_rows(path, ids, space="phi_2", seed=2):
    return write_gallery(str(path), ids, ids % 4, unit_rows(len(ids), seed), rows_per_shard=ROWS_PER_SHARD,
                         lineage=[space], space=space)


def test_append_keeps_each_rows_lineage_and_the_next_upgrade_extends_them(upgraded, models, tmp_path):
    rows = new_rows(tmp_path / "rows", np.arange(100, 120))
    appended, stats = append_gallery(upgraded, rows, str(tmp_path / "v2b"), config=CONFIG)
    assert (appended.space, appended.lineage) == ("phi_2", ["phi_1", "psi_1_2"])
    assert appended.num_rows == 60 and stats.rows == 60
    assert appended.num_shards == upgraded.num_shards + rows.num_shards
    assert appended.spaces == {"phi_2": 60}
    assert appended.lineages == {"phi_1>psi_1_2": 40, "phi_2": 20}
    assert appended.manifest["extra"] == {"appended_to": upgraded.path, "appended_rows": rows.path,
                                          "rows_appended": 20}
    both = [upgraded.read_all(), rows.read_all()]
    got = appended.read_all()
    np.testing.assert_array_equal(got.ids, np.concatenate([b.ids for b in both]))
    np.testing.assert_array_equal(got.labels, np.concatenate([b.labels for b in both]))
    np.testing.assert_array_equal(got.embeddings, np.concatenate([b.embeddings for b in both]))
    # the last shard came from the new rows, the first from psi: each row says which
    assert appended.read_rows(appended.num_shards - 1)[1].lineages.to_pylist() == ["phi_2"] * 4
    assert set(appended.read_rows(0)[1].lineages.to_pylist()) == {"phi_1>psi_1_2"}
    appended.validate()

    next_version, _ = upgrade_gallery(appended, str(models["psi_2_3"]), str(tmp_path / "v3"), config=CONFIG)
    assert next_version.spaces == {"phi_3": 60}
    assert next_version.lineages == {"phi_1>psi_1_2>psi_2_3": 40, "phi_2>psi_2_3": 20}


def test_append_refuses_rows_in_another_space_shared_ids_and_another_dim(upgraded, tmp_path):
    with pytest.raises(GalleryError, match=r"not all in the space of gallery .*phi_2 \(20 in phi_1\)"):
        append_gallery(upgraded, new_rows(tmp_path / "old", np.arange(100, 120), space="phi_1"),
                       str(tmp_path / "out"), config=CONFIG)
    shared = new_rows(tmp_path / "shared", np.array([100, 101, 7]))
    with pytest.raises(GalleryError, match=r"id 7 of the rows to append .*part-00000.parquet.* is in gallery .*"
                                           r"already \(part-00000.parquet\)"):
        append_gallery(upgraded, shared, str(tmp_path / "out"), config=CONFIG)
    wide = np.eye(2, DIM + 1, dtype=np.float32)
    other_dim = write_gallery(str(tmp_path / "wide"), [200, 201], None, wide, rows_per_shard=4, lineage=["phi_2"],
                              space="phi_2")
    with pytest.raises(GalleryError, match="have dim 9"):
        append_gallery(upgraded, other_dim, str(tmp_path / "out"), config=CONFIG)
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.staging")


def test_upgrade_refuses_rows_in_the_wrong_space_from_the_manifest_and_row_by_row(ray_session, models, tmp_path):
    ids = np.arange(32)
    spaces = ["phi_1"] * 30 + ["phi_2"] * 2  # a gallery half refreshed from images: psi_1_2 must not map it
    mixed = write_gallery(str(tmp_path / "mixed"), ids, None, unit_rows(32, 3), rows_per_shard=ROWS_PER_SHARD,
                          lineage=["phi_1"], space="phi_1", spaces=spaces)
    with pytest.raises(GalleryError, match=r"holds rows in other spaces \(2 in phi_2\)"):
        upgrade_gallery(mixed, str(models["psi_1_2"]), str(tmp_path / "v2"), config=CONFIG)
    # a manifest that says otherwise does not get those rows through: each shard's rows are checked as they are read
    manifest_path = tmp_path / "mixed" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["spaces"] = {"phi_1": 32}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(GalleryError, match=r"shard 1 of .*: row 14 \(id 30\) is in space phi_2, but psi_1_2 maps "
                                           "phi_1 embeddings"):
        upgrade_gallery(str(tmp_path / "mixed"), str(models["psi_1_2"]), str(tmp_path / "v2"), config=CONFIG)


def png_table(path, images, labels, ids):
    from PIL import Image

    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image[0]).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    pq.write_table(pa.table({"image": pa.array(encoded, pa.binary()), "label": labels, "id": ids}), path)


def test_cli_append_from_images_and_from_embeddings(upgraded, models, tmp_path, capsys):
    images = np.random.default_rng(4).integers(0, 256, size=(6, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    ids = np.arange(500, 506)
    png_table(tmp_path / "new.parquet", images, ids % 4, ids)
    flags = ["--set", f"data.image_size={IMAGE_SIZE}", "--set", "data.channels=1",
             "--set", f"gallery.rows_per_shard={ROWS_PER_SHARD}"]
    out = str(tmp_path / "with_images")
    assert main(["append", "--gallery", upgraded.path, "--images", str(tmp_path / "new.parquet"), "--model",
                 str(models["phi_2"]), "--out", out, *flags]) == 0
    appended = open_gallery(out)
    assert appended.lineages == {"phi_1>psi_1_2": 40, "phi_2": 6}
    tail = appended.read_rows(appended.num_shards - 1)[0]
    np.testing.assert_array_equal(tail.ids, ids)
    expected = embed_images(load_artifact(models["phi_2"]).module, images, 64, ids=ids)
    np.testing.assert_allclose(tail.embeddings, expected, atol=1e-6)  # phi_2 embedded them, as extract does
    assert not os.path.exists(out + ".new-rows")  # the new rows' own version is gone once the output is committed
    assert "appended 6 rows" in capsys.readouterr().out

    # embeddings given in the gallery's space, as import-gallery reads them (list<double>, other column names)
    rows = unit_rows(3, 5).astype(np.float64)
    pq.write_table(pa.table({"key": [900, 901, 902], "vec": pa.array(rows.tolist(), pa.list_(pa.float64()))}),
                   tmp_path / "emb.parquet")
    second = str(tmp_path / "with_embeddings")
    assert main(["append", "--gallery", out, "--from", str(tmp_path / "emb.parquet"), "--space", "phi_2",
                 "--id-column", "key", "--embedding-column", "vec", "--out", second, *flags]) == 0
    assert open_gallery(second).lineages == {"phi_1>psi_1_2": 40, "phi_2": 9}
    np.testing.assert_allclose(open_gallery(second).read_all().embeddings[-3:], rows, atol=1e-7)


@pytest.mark.parametrize("flags, message", [
    (["--from", "x.parquet", "--space", "phi_1"], "--space phi_1: the rows of .* are in phi_2"),
    (["--images", "x.parquet"], "--images needs --model"),
    (["--rows", "somewhere", "--space", "phi_2"], "--space apply to --from only"),
])
def test_cli_append_refuses_mistakes_by_name(upgraded, tmp_path, capsys, flags, message):
    assert main(["append", "--gallery", upgraded.path, "--out", str(tmp_path / "out"), *flags]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "out")


def test_cli_append_refuses_images_embedded_by_another_model(upgraded, models, tmp_path, capsys):
    code = main(["append", "--gallery", upgraded.path, "--images", "x.parquet", "--model", str(models["psi_1_2"]),
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert "the rows of" in capsys.readouterr().err and not os.path.exists(tmp_path / "out.new-rows")
