"""A sequence that starts from the service's deployed model (``old_model``) instead of training phi_1.

The "production" model is the project's small CNN, trained one epoch in this process and saved as TorchScript, as a
team would hand it over: gallery v1 must be exactly its embeddings, phi_2 must train backward-compatible against it
(BCT's classifier made from class means, the l2 loss from its embeddings of each batch), the run must record its file
by hash and refuse it once it changes.
"""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from bict_ray.config import load_config
from bict_ray.core.embed import embed_images, frozen_features, preprocess
from bict_ray.distributed.train import embedding_stage, run_in_process
from bict_ray.errors import ArtifactError, InputError, TrainingError
from bict_ray.pipeline.sequence import run_sequence
from bict_ray.storage.artifacts import (external_artifact, is_external, load_artifact, module_from_state,
                                        read_card, save_external)
from bict_ray.storage.gallery import open_gallery

from conftest import Deployed, deploy, train_subset, trained_small_cnn


@pytest.fixture(scope="module")
def deployed(ray_session, smoke_config, smoke_data, tmp_path_factory):
    """(the TorchScript file, the module it scripts) of a small CNN trained one epoch on the first split's classes."""
    net = trained_small_cnn(load_config("configs/smoke.yaml", ["train.epochs=1"]), smoke_data,
                            smoke_config.scenario.classes[0])
    path = tmp_path_factory.mktemp("service") / "deployed.pt"
    deploy(net, path, smoke_data.train.images[:4])
    return path, net


def service_config(path, *overrides):
    return load_config("configs/smoke.yaml", ["old_model.kind=torchscript", f"old_model.path={path}",
                                              "old_model.image_size=28", "old_model.channels=1", *overrides])


@pytest.fixture(scope="module")
def service_run(deployed, smoke_data, tmp_path_factory):
    path, _ = deployed
    out = tmp_path_factory.mktemp("service_run") / "run"
    lines = []
    results = run_sequence(service_config(path), out, log=lines.append, dataset=smoke_data)
    return out, results, lines


def test_the_old_model_from_outside_is_phi_1_and_makes_gallery_v1(service_run, deployed, smoke_data):
    out, results, lines = service_run
    path, net = deployed
    phi_1 = out / "models" / "phi_1"
    assert sorted(p.name for p in phi_1.iterdir()) == ["model.json"]  # the service's weights are never copied
    card = load_artifact(phi_1).card
    assert is_external(card) and card.spec["files"] == {str(path): card.spec["files"][str(path)]}
    assert card.training == {"trained": False, "source": f"torchscript {path}"}
    assert any("phi_1: the old model from outside" in line and "not trained" in line for line in lines)
    assert not any("training phi_1" in line for line in lines)
    gallery = open_gallery(str(out / "gallery" / "v1"))
    stored = np.concatenate([gallery.read_shard(i)[0] for i in range(gallery.num_shards)])
    expected = embed_images(net, smoke_data.gallery.images)
    np.testing.assert_allclose(stored, expected, atol=1e-5)
    assert gallery.lineage == ["phi_1"]
    assert results["run"]["old_model"] == "torchscript"


def test_phi_2_trains_compatible_with_it_and_psi_upgrades_its_gallery(service_run):
    out, results, _ = service_run
    phi_2 = load_artifact(out / "models" / "phi_2").card
    assert phi_2.parent == "phi_1" and phi_2.training["compat_loss"] == "bct"
    assert phi_2.training["history"][-1]["compat"] > 0
    assert open_gallery(str(out / "gallery" / "v2")).lineage == ["phi_1", "psi_1_2"]
    (step,) = results["steps"]
    for name in ("old_self", "new_self", "backward", "forward"):
        assert 0 < step["tests"][name]["mAP"] <= 1
    assert results["validation"]["steps"][0]["step"] == 2


def test_a_rerun_reuses_it_and_refuses_the_file_once_it_changed(service_run, deployed, smoke_data):
    out, _, _ = service_run
    path, net = deployed
    lines = []
    run_sequence(service_config(path), out, log=lines.append, dataset=smoke_data)
    assert any("old model from outside" in line and "unchanged" in line for line in lines)
    assert any("phi_2: trained already" in line for line in lines)
    before = (out / "models" / "phi_1" / "model.json").read_text()
    original = path.read_bytes()
    try:
        deploy(net, path, smoke_data.train.images[4:8])  # the same model traced again: other bytes
        with pytest.raises(ArtifactError, match=f"{path}, which has changed since the run recorded it"):
            run_sequence(service_config(path), out, dataset=smoke_data)
    finally:
        path.write_bytes(original)
    assert (out / "models" / "phi_1" / "model.json").read_text() == before


def test_a_card_travels_alone_and_rebuilds_the_same_model(deployed, smoke_data, tmp_path):
    path, net = deployed
    artifact = external_artifact(service_config(path).old_model, "phi_1")
    assert artifact.state == {}  # nothing but the card goes to a Ray worker
    images = torch.from_numpy(smoke_data.train.images[:16])
    rebuilt = module_from_state(artifact.card, artifact.state)
    torch.testing.assert_close(frozen_features(rebuilt, images), net.embed(preprocess(images)), atol=1e-5, rtol=0)
    save_external(tmp_path / "phi_1", artifact.card)
    moved = tmp_path / "elsewhere.pt"
    path.rename(moved)
    try:
        with pytest.raises(ArtifactError, match=f"loaded from {path}, which is gone"):
            load_artifact(tmp_path / "phi_1")
    finally:
        moved.rename(path)


def test_bct_gets_class_means_and_l2_its_embeddings(deployed, smoke_config, smoke_data):
    path, net = deployed
    classes = smoke_config.scenario.classes[1]
    train = train_subset(smoke_data, classes)
    parent = external_artifact(service_config(path).old_model, "phi_1")
    stage = embedding_stage(service_config(path), 2, train, smoke_data.num_classes, parent, classes)
    context = stage.compat.context
    assert context.classifier == "cosine" and context.valid_mask[classes].all()
    embedded = net.embed(preprocess(torch.from_numpy(train.images))).detach()
    for c in classes:  # every class synthesised: the normalised mean of its embeddings (all, < 2000 a class here)
        mean = embedded[torch.from_numpy(train.labels == c)].mean(0)
        torch.testing.assert_close(context.old_weight[c], mean / mean.norm(), atol=1e-5, rtol=0)
    l2 = embedding_stage(service_config(path, "compat.loss=l2", "train.epochs=1"), 2, train, smoke_data.num_classes,
                         parent, classes)
    (record,) = run_in_process(l2)
    assert np.isfinite(record["loss"]) and record["samples"] > 0


def test_the_spaces_must_match_and_bct_needs_its_synthesis(deployed, smoke_config, smoke_data):
    path, _ = deployed
    classes = smoke_config.scenario.classes[1]
    train = train_subset(smoke_data, classes)
    parent = external_artifact(service_config(path).old_model, "phi_1")
    with pytest.raises(TrainingError, match="embeds in 32 dims but the new model in 16 .*model.embedding_dim: 32"):
        embedding_stage(service_config(path, "model.embedding_dim=16"), 2, train, smoke_data.num_classes, parent,
                        classes)
    with pytest.raises(TrainingError, match="has none: .*compat.synthesise_new_classes: true"):
        embedding_stage(service_config(path, "compat.synthesise_new_classes=false"), 2, train,
                        smoke_data.num_classes, parent, classes)


@pytest.fixture(scope="module")
def kept(deployed, smoke_data, tmp_path_factory):
    """What a service kept of a model it can no longer run: the model's embeddings of every image (training,
    validation and test), by id (sorted), as list<double> under its own column names."""
    _, net = deployed
    sets = [smoke_data.train, smoke_data.val, smoke_data.test]
    order = np.argsort(np.concatenate([s.ids for s in sets]))
    ids = np.concatenate([s.ids for s in sets])[order]
    vectors = embed_images(net, np.concatenate([s.images for s in sets]))[order]
    path = tmp_path_factory.mktemp("kept") / "embeddings.parquet"
    write_embeddings(path, ids, vectors)
    return path, ids, vectors


def write_embeddings(path, ids, vectors):
    pq.write_table(pa.table({"image_id": ids, "vector": pa.array(list(vectors.astype(np.float64)),
                                                                 pa.list_(pa.float64()))}), path)


def kept_config(path, *overrides):
    return load_config("configs/smoke.yaml", ["old_model.kind=embeddings", f"old_model.path={path}",
                                              "old_model.id_column=image_id", "old_model.embedding_column=vector",
                                              *overrides])


def test_only_its_embeddings_drive_the_same_sequence(kept, service_run, smoke_data, tmp_path):
    path, ids, vectors = kept
    out = tmp_path / "run"
    results = run_sequence(kept_config(path), out, dataset=smoke_data)
    card = load_artifact(out / "models" / "phi_1").card
    assert is_external(card) and list(card.spec["files"]) == [str(path)]
    assert card.training["source"] == f"embeddings {path}"
    gallery = open_gallery(str(out / "gallery" / "v1"))
    stored = np.concatenate([gallery.read_shard(i)[0] for i in range(gallery.num_shards)])
    looked_up = vectors[np.searchsorted(ids, smoke_data.gallery.ids)]
    np.testing.assert_allclose(stored, looked_up, atol=1e-6)
    model_run = open_gallery(str(service_run[0] / "gallery" / "v1"))  # the same model run on the images
    np.testing.assert_allclose(stored, np.concatenate([model_run.read_shard(i)[0]
                                                       for i in range(model_run.num_shards)]), atol=1e-5)
    phi_2 = load_artifact(out / "models" / "phi_2").card
    assert phi_2.parent == "phi_1" and phi_2.training["history"][-1]["compat"] > 0
    (step,) = results["steps"]
    for name in ("old_self", "new_self", "backward", "forward"):
        assert 0 < step["tests"][name]["mAP"] <= 1


def test_the_compat_losses_read_the_stored_rows_of_each_batch(kept, smoke_config, smoke_data):
    path, ids, vectors = kept
    classes = smoke_config.scenario.classes[1]
    train = train_subset(smoke_data, classes)
    parent = external_artifact(kept_config(path).old_model, "phi_1")
    assert set(parent.state) == {"ids", "table"}  # read once here; the table travels to the workers
    rebuilt = module_from_state(parent.card, parent.state)
    rows = frozen_features(rebuilt, torch.from_numpy(train.images[:8]), torch.from_numpy(train.ids[:8]))
    torch.testing.assert_close(rows, torch.from_numpy(vectors[np.searchsorted(ids, train.ids[:8])]), atol=1e-6,
                               rtol=0)
    stage = embedding_stage(kept_config(path, "compat.loss=l2", "train.epochs=1"), 2, train, smoke_data.num_classes,
                            parent, classes)
    (record,) = run_in_process(stage)
    assert np.isfinite(record["loss"])


def test_an_image_without_a_stored_embedding_is_named(kept, smoke_data, tmp_path):
    path, ids, vectors = kept
    missing = int(smoke_data.query.ids[3])
    keep = ids != missing
    write_embeddings(tmp_path / "partial.parquet", ids[keep], vectors[keep])
    with pytest.raises(InputError, match=f"no old embedding of image id {missing} \\(1 of"):
        run_sequence(kept_config(tmp_path / "partial.parquet"), tmp_path / "run", dataset=smoke_data)


def module_config(*overrides):
    return load_config("configs/smoke.yaml", ["old_model.kind=module", "old_model.image_size=28",
                                              "old_model.channels=1", *overrides])


def test_a_module_from_python_is_phi_1_and_a_rerun_must_pass_the_same(deployed, service_run, smoke_data, tmp_path):
    """A notebook hands over its own nn.Module: it travels to the workers by value (cloudpickle), as a class
    defined in a notebook does; the run records its state_dict's hash."""
    import conftest

    ray.cloudpickle.register_pickle_by_value(conftest)  # as if Deployed were defined in the notebook
    _, net = deployed
    out = tmp_path / "run"
    lines = []
    run_sequence(module_config(), out, log=lines.append, dataset=smoke_data, old_model=Deployed(net))
    assert any("a module passed from Python (conftest.Deployed)" in line for line in lines)
    card = read_card(out / "models" / "phi_1")
    assert card.spec["files"] == {} and len(card.spec["state_sha256"]) == 64
    gallery = open_gallery(str(out / "gallery" / "v1"))
    model_run = open_gallery(str(service_run[0] / "gallery" / "v1"))  # the same model from its TorchScript file
    np.testing.assert_allclose(*(np.concatenate([g.read_shard(i)[0] for i in range(g.num_shards)])
                                 for g in (gallery, model_run)), atol=1e-5)
    assert load_artifact(out / "models" / "phi_2").card.training["history"][-1]["compat"] > 0
    other = copy.deepcopy(net)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)  # a retrained or edited model: other weights, the same class
    with pytest.raises(ArtifactError, match="phi_1 was another module when the run recorded it"):
        run_sequence(module_config(), out, dataset=smoke_data, old_model=Deployed(other))
    with pytest.raises(InputError, match="old_model.kind=module needs the module passed from Python"):
        run_sequence(module_config(), out, dataset=smoke_data)
