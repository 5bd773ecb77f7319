"""Synthetic galleries for scale runs: rows around a model's class means, each shard a function of (seed, shard)."""

import numpy as np
import pytest

from bict_ray.config import GalleryConfig
from bict_ray.core.synthetic import class_structure, synthetic_shard
from bict_ray.distributed.pipelines import synthesize_gallery
from bict_ray.errors import InputError
from bict_ray.storage.gallery import GalleryError, open_gallery


@pytest.fixture(scope="module")
def structure():
    """Three classes of unit embeddings in 16 dims, spread about their means as a model's embeddings are."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    labels = np.repeat([2, 5, 7], 400)
    embeddings = centres[np.searchsorted([2, 5, 7], labels)] + 0.3 * rng.normal(size=(1200, 16))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return class_structure(embeddings, labels), embeddings, labels


def test_rows_lie_around_their_class_mean_with_its_spread(structure):
    found, embeddings, labels = structure
    assert found.classes.tolist() == [2, 5, 7]
    np.testing.assert_allclose(np.linalg.norm(found.means, axis=1), 1.0, rtol=1e-6)
    ids, rows_labels, rows = synthetic_shard(found, 0, rows=30_000, rows_per_shard=30_000, seed=1)
    np.testing.assert_array_equal(ids, np.arange(30_000))
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)
    assert set(np.unique(rows_labels)) == {2, 5, 7}
    for c, mean in zip(found.classes, found.means):
        real, drawn = embeddings[labels == c], rows[rows_labels == c]
        # as close to the class's direction, on average, as the real embeddings are (normalising moves it a little)
        assert abs(float(np.mean(drawn @ mean)) - float(np.mean(real @ mean))) < 0.02
        # and nearer to their own mean than to any other class's
        assert (np.argmax(drawn @ found.means.T, axis=1) == list(found.classes).index(c)).mean() > 0.99


def test_a_shard_depends_on_the_seed_and_its_index_alone(structure):
    found = structure[0]
    first = synthetic_shard(found, 3, rows=1000, rows_per_shard=128, seed=4)
    again = synthetic_shard(found, 3, rows=1000, rows_per_shard=128, seed=4)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert first[0].tolist() == list(range(384, 512))
    last = synthetic_shard(found, 7, rows=1000, rows_per_shard=128, seed=4)
    assert len(last[0]) == 1000 - 7 * 128
    assert not np.array_equal(synthetic_shard(found, 3, rows=1000, rows_per_shard=128, seed=5)[2], first[2])


def test_the_pipeline_writes_the_same_bytes_twice_and_never_over_a_version(ray_session, structure, tmp_path):
    found = structure[0]
    config = GalleryConfig(rows_per_shard=256, concurrency=2)
    versions = [synthesize_gallery(found, 1000, str(tmp_path / name), space="phi_1", seed=3, config=config)[0]
                for name in ("a", "b")]
    records = [[s["blake3"] for s in v.manifest["shards"]] for v in versions]
    assert records[0] == records[1] and len(records[0]) == 4
    embeddings, labels, ids = open_gallery(str(tmp_path / "a")).read_all()
    np.testing.assert_array_equal(ids, np.arange(1000))
    expected = synthetic_shard(found, 1, rows=1000, rows_per_shard=256, seed=3)[2]
    np.testing.assert_array_equal(embeddings[256:512], expected)
    assert versions[0].lineage == ["phi_1"] and versions[0].manifest["extra"]["synthetic"]["rows"] == 1000
    with pytest.raises(GalleryError, match="already holds a committed gallery version"):
        synthesize_gallery(found, 1000, str(tmp_path / "a"), space="phi_1", config=config)
    with pytest.raises(InputError, match="rows >= 1"):
        synthesize_gallery(found, 0, str(tmp_path / "c"), space="phi_1", config=config)
