"""Two smoke sequences under the other retrieval protocols, end to end: separate query and gallery sets (a seeded
split of the test split), and an open set whose test classes no model ever trains on or selects with."""

import json

import numpy as np
import pytest

from bict_ray.config import load_config
from bict_ray.core.data import load_dataset
from bict_ray.core.embed import embed_images
from bict_ray.pipeline.report import _run_section
from bict_ray.pipeline.sequence import run_sequence
from bict_ray.retrieval.metrics import retrieval_metrics
from bict_ray.storage.artifacts import load_artifact
from bict_ray.storage.gallery import open_gallery

QUICK = ["train.epochs=1", "transform.epochs=1", "eval.partial_refresh=[]", "eval.matrix=false",
         "data.limit_train=400", "data.limit_test=200"]


def run(tmp_path_factory, name, overrides):
    config = load_config("smoke", QUICK + overrides)
    dataset = load_dataset(config.data, config.eval, config.scenario)
    out = tmp_path_factory.mktemp(name) / "run"
    return out, run_sequence(config, out, log=lambda line: None, dataset=dataset), dataset


@pytest.fixture(scope="module")
def query_gallery_run(ray_session, tmp_path_factory):
    return run(tmp_path_factory, "query_gallery", ["eval.protocol=query_gallery"])


@pytest.fixture(scope="module")
def open_set_run(ray_session, tmp_path_factory):
    # BCT only (no psi to train): the open set is about what trains and what is searched, v1 shows both
    return run(tmp_path_factory, "open_set", ["scenario.classes=[[0, 1, 2], [0, 1, 2, 3, 4, 5]]",
                                              "scenario.test_classes=[6, 7, 8, 9]", "transform.enabled=false"])


def test_query_gallery_searches_the_query_set_in_the_gallery_set(query_gallery_run):
    out, results, dataset = query_gallery_run
    query, gallery = dataset.query, dataset.gallery
    assert (len(query), len(gallery)) == (40, 160)  # a fifth of each class's 20 test images are queries
    for t in (1, 2):
        rows = open_gallery(str(out / "gallery" / f"v{t}")).read_all()
        assert sorted(rows.ids) == sorted(gallery.ids)  # v1 extracted from the gallery set, v2 upgraded from it
    (step,) = results["steps"]
    assert {metrics["num_queries"] for metrics in step["tests"].values()} == {40}
    # new self: phi_2 of the queries against phi_2 of the gallery images, not against the queries themselves
    phi_2 = load_artifact(out / "models" / "phi_2").module
    q, g = embed_images(phi_2, query.images), embed_images(phi_2, gallery.images)
    expected = retrieval_metrics(q, query.labels, g, gallery.labels, query_ids=query.ids, gallery_ids=gallery.ids)
    assert step["tests"]["new_self"] == pytest.approx(expected, abs=1e-5)
    # validation stays leave-one-out over the whole validation set
    assert results["validation"]["steps"][0]["tests"]["new_self"]["num_queries"] == len(dataset.val)
    saved = json.loads((out / "results.json").read_text())["run"]
    assert saved["protocol"] == "query_gallery" and "test_classes" not in saved
    assert "- retrieval protocol: query_gallery" in _run_section(saved)


def test_open_set_gallery_and_queries_hold_only_the_test_classes(open_set_run):
    out, results, dataset = open_set_run
    test_classes = [6, 7, 8, 9]
    v1 = open_gallery(str(out / "gallery" / "v1")).read_all()
    assert len(v1.ids) == len(dataset.test) == 200 and set(v1.labels.tolist()) == set(test_classes)
    (step,) = results["steps"]
    assert step["tests"]["forward"]["num_queries"] == 200  # leave-one-out over the test-class images
    # no model, and no validation image, ever saw a test class
    train = dataset.train
    for t in (1, 2):
        ids = np.load(out / "splits" / f"model_{t}_train_ids.npy")
        assert not np.isin(train.labels[np.searchsorted(train.ids, ids)], test_classes).any()
    validation_ids = np.load(out / "splits" / "validation_ids.npy")
    assert np.array_equal(validation_ids, np.sort(dataset.val.ids))
    assert not np.isin(dataset.val.labels, test_classes).any()
    run_info = json.loads((out / "results.json").read_text())["run"]
    assert run_info["protocol"] == "leave_one_out" and run_info["test_classes"] == test_classes
    assert run_info["classes"] == [[0, 1, 2], [0, 1, 2, 3, 4, 5]]
    assert "- open-set test classes (held out of training): 6, 7, 8, 9" in _run_section(run_info)
