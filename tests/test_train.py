"""Compatible training on Ray Train, on the smoke slice of Fashion-MNIST."""

import hashlib

import numpy as np
import pytest
import torch

from bict_ray.config import load_config
from bict_ray.core.embed import embed_images, model_features
from bict_ray.distributed.train import CHECKPOINT_FILE, TrainingError, train_embedding_model, train_upgrade_transform
from bict_ray.retrieval.metrics import retrieval_metrics
from bict_ray.storage.artifacts import ArtifactError, load_artifact
from conftest import train_subset

OLD_CLASSES = [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def old_model(ray_session, smoke_config, smoke_data, tmp_path_factory):
    config = load_config("configs/smoke.yaml", ["train.epochs=3"])
    folder = tmp_path_factory.mktemp("run") / "models" / "phi_1"
    return train_embedding_model(config, folder, 1, train_subset(smoke_data, OLD_CLASSES), OLD_CLASSES,
                                 smoke_data.num_classes, run_name=f"test-old-{folder.parent.parent.name}")


def test_old_model_learns_and_is_saved_with_its_card(old_model):
    history = old_model.card.training["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["accuracy"] > 0.5
    card = old_model.card
    assert card.classes_seen == OLD_CLASSES and card.parent is None and card.spec["num_classes"] == 10
    state = torch.load(old_model.path / "weights.pt", weights_only=True)
    assert set(state) == set(old_model.module.state_dict())


def test_new_model_is_compatible_and_old_stays_frozen(old_model, smoke_config, smoke_data, tmp_path):
    weights_before = hashlib.sha256((old_model.path / "weights.pt").read_bytes()).hexdigest()
    state_before = {k: v.clone() for k, v in old_model.module.state_dict().items()}
    new = train_embedding_model(smoke_config, tmp_path / "phi_2", 2, smoke_data.train, list(range(10)),
                                smoke_data.num_classes, parent=old_model, run_name=f"test-new-{tmp_path.name}")
    assert hashlib.sha256((old_model.path / "weights.pt").read_bytes()).hexdigest() == weights_before
    assert all(torch.equal(state_before[k], v) for k, v in old_model.module.state_dict().items())
    card = new.card
    assert card.parent == "phi_1" and card.training["compat_loss"] == "bct" and card.training["lam"] == 1.0
    # compatible, as BCT defines it: phi_1's classifier reads phi_2's features of the classes phi_1 saw (48% of the
    # smoke test images here) where it reads those of a phi_2 trained with lambda = 0 at chance or below (0.5%); and
    # phi_2's queries search phi_1's gallery better than that twin's do
    independent = train_embedding_model(load_config("configs/smoke.yaml", ["compat.lam=0"]), tmp_path / "phi_2_ind",
                                        2, smoke_data.train, list(range(10)), smoke_data.num_classes,
                                        parent=old_model, run_name=f"test-ind-{tmp_path.name}")
    test = smoke_data.test
    seen = np.isin(test.labels, OLD_CLASSES)

    def old_classifier_accuracy(model):
        features = torch.from_numpy(model_features(model.module, test.images[seen]))
        with torch.no_grad():
            predicted = old_model.module.classifier(features).argmax(1).numpy()
        return float((predicted == test.labels[seen]).mean())

    gallery = embed_images(old_model.module, test.images)

    def backward(model):
        return retrieval_metrics(embed_images(model.module, test.images), test.labels, gallery, test.labels,
                                 query_ids=test.ids, gallery_ids=test.ids)["mAP"]

    assert old_classifier_accuracy(new) > old_classifier_accuracy(independent) + 0.25
    assert backward(new) > backward(independent), (backward(new), backward(independent))
    # psi trained on the stored representation of the training images moves them towards phi_2
    psi = train_upgrade_transform(smoke_config, tmp_path / "psi_1_2", 1, new, smoke_data.train, [old_model],
                                  run_name=f"test-psi-{tmp_path.name}")
    history = psi.card.training["history"]
    assert psi.card.source == "phi_1" and psi.card.target == "phi_2"
    assert history[-1]["cos_sim"] > history[0]["cos_sim"]
    assert psi.card.training["trained_on"] == ["phi_1"]


def test_two_worker_ddp(ray_session, smoke_data, tmp_path):
    config = load_config("configs/smoke.yaml", ["train.num_workers=2", "train.epochs=1"])
    model = train_embedding_model(config, tmp_path / "phi_1", 1, train_subset(smoke_data, OLD_CLASSES),
                                  OLD_CLASSES, smoke_data.num_classes, run_name=f"test-ddp-{tmp_path.name}")
    # both workers' samples count: the reduced epoch saw the whole (drop_last-trimmed) split once
    assert model.card.training["history"][0]["samples"] == pytest.approx(600, abs=2 * 64)


def test_one_worker_in_a_task_trains_as_ray_train_does(old_model, smoke_data, tmp_path):
    # old_model was trained in a Ray task (train.single_worker=task, the default): the same loop on Ray Train's
    # worker group gives the same weights and losses, so the launcher changes the cost of a fit, not its numbers
    config = load_config("configs/smoke.yaml", ["train.epochs=3", "train.single_worker=ray_train"])
    twin = train_embedding_model(config, tmp_path / "phi_1", 1, train_subset(smoke_data, OLD_CLASSES), OLD_CLASSES,
                                 smoke_data.num_classes, run_name=f"test-twin-{tmp_path.name}")
    state, twin_state = old_model.module.state_dict(), twin.module.state_dict()
    assert all(torch.equal(state[k], twin_state[k]) for k in state)
    losses = [[h["loss"] for h in m.card.training["history"]] for m in (old_model, twin)]
    assert losses[0] == losses[1]
    assert old_model.card.training["workers"][0]["pid"] != twin.card.training["workers"][0]["pid"]


def test_a_rerun_under_the_same_name_resumes_the_finished_task(old_model, smoke_data):
    # as Ray Train does: the same storage and run name find the last checkpoint, and no epoch is trained again
    config = load_config("configs/smoke.yaml", ["train.epochs=3"])
    run = old_model.path.parent.parent
    again = train_embedding_model(config, run / "models" / "phi_1_again", 1, train_subset(smoke_data, OLD_CLASSES),
                                  OLD_CLASSES, smoke_data.num_classes, run_name=f"test-old-{run.name}")
    history, rerun = old_model.card.training["history"], again.card.training["history"]
    assert [h["started_at"] for h in rerun] == [h["started_at"] for h in history]
    assert all(torch.equal(v, again.module.state_dict()[k]) for k, v in old_model.module.state_dict().items())


def test_nan_loss_fails_naming_the_step_and_writes_nothing(ray_session, smoke_data, tmp_path):
    config = load_config("configs/smoke.yaml", ["train.lr=1e30", "train.max_failures=0", "train.epochs=1"])
    with pytest.raises(TrainingError, match=r"NaN/Inf loss at phi_1 epoch 1 step \d+"):
        train_embedding_model(config, tmp_path / "phi_1", 1, train_subset(smoke_data, OLD_CLASSES),
                              OLD_CLASSES, smoke_data.num_classes, run_name=f"test-nan-{tmp_path.name}")
    assert not (tmp_path / "phi_1").exists()


def test_existing_model_is_never_overwritten(old_model, smoke_config, smoke_data):
    before = (old_model.path / "weights.pt").read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        train_embedding_model(smoke_config, old_model.path, 1, smoke_data.train, OLD_CLASSES, 10)
    assert (old_model.path / "weights.pt").read_bytes() == before


def test_mismatched_parent_is_refused(old_model, smoke_config, smoke_data, tmp_path):
    with pytest.raises(TrainingError, match="num_classes=10 but the new model needs 12"):
        train_embedding_model(smoke_config, tmp_path / "phi_2", 2, smoke_data.train, list(range(10)), 12,
                              parent=old_model)


def test_corrupt_or_missing_checkpoint_is_named(old_model, tmp_path):
    import shutil

    copy = tmp_path / "phi_1"
    shutil.copytree(old_model.path, copy)
    (copy / "weights.pt").write_bytes((copy / "weights.pt").read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"weights\.pt does not match the checksum"):
        load_artifact(copy)
    with pytest.raises(ArtifactError, match="no model.json"):
        load_artifact(tmp_path / "nothing")


@pytest.mark.parametrize("single_worker", ["task", "ray_train"])
def test_checkpoints_on_s3_and_a_rerun_resumes_from_them(ray_session, smoke_data, bucket, tmp_path, single_worker):
    # train.storage_path on the tests' S3 server (the standard AWS variables): both launchers keep their
    # checkpoints there, and a rerun under the same name finds the finished run instead of training again
    import boto3

    config = load_config("configs/smoke.yaml", ["train.epochs=3", f"train.storage_path=s3://{bucket}/ray_results",
                                                f"train.single_worker={single_worker}"])
    subset = train_subset(smoke_data, OLD_CLASSES)
    name = f"test-s3-{single_worker}"
    first = train_embedding_model(config, tmp_path / "a" / "phi_1", 1, subset, OLD_CLASSES, smoke_data.num_classes,
                                  run_name=name)
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=f"ray_results/{name}/")
    checkpoints = {o["Key"].split("/")[2] for o in listing.get("Contents", []) if o["Key"].endswith(CHECKPOINT_FILE)}
    assert len(checkpoints) == 2 and all(c.startswith("checkpoint_") for c in checkpoints), checkpoints  # newest two
    again = train_embedding_model(config, tmp_path / "b" / "phi_1", 1, subset, OLD_CLASSES, smoke_data.num_classes,
                                  run_name=name)
    assert [h["started_at"] for h in again.card.training["history"]] == \
        [h["started_at"] for h in first.card.training["history"]]
