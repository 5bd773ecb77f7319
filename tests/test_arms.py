"""The arms BiCT is compared with: the closed-form linear psi, bct_chained from BiCT's tests, and every arm in one
run sharing phi_1, gallery v1 and the splits."""

import hashlib
import json

import numpy as np
import pytest

from bict_ray.config import ConfigError, load_config
from bict_ray.core.closed_form import fit_linear_transform
from bict_ray.core.embed import upgrade_embeddings
from bict_ray.errors import InputError
from bict_ray.pipeline.arms import TRAINED_ARMS, chained_steps
from bict_ray.pipeline.sequence import run_sequence
from bict_ray.storage.artifacts import Artifact, load_artifact, save_artifact

TESTS = ("old_self", "new_self", "backward", "backward_prev", "forward", "deployed_before")


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _orthonormal(rng, rows, cols):
    q, _ = np.linalg.qr(rng.normal(size=(max(rows, cols), max(rows, cols))))
    return q[:rows, :cols]


@pytest.mark.parametrize("method", ["lstsq", "procrustes"])
@pytest.mark.parametrize("d_in, d_out", [(8, 8), (8, 12)])
def test_a_closed_form_fit_recovers_a_rotation_of_the_old_space(method, d_in, d_out):
    rng = np.random.default_rng(0)
    source = _unit(rng.normal(size=(500, d_in)))
    rotation = _orthonormal(rng, d_in, d_out)  # orthonormal rows: unit inputs stay unit
    target = source @ rotation
    psi = fit_linear_transform(source, target * 3.0, method)  # the fit normalises its targets
    assert psi.spec["layers"] == 0 and psi.residual == (d_in == d_out)
    np.testing.assert_allclose(upgrade_embeddings([psi], source), target, atol=1e-5)


def test_least_squares_fits_the_bias_and_procrustes_cannot_distort():
    rng = np.random.default_rng(1)
    source = _unit(rng.normal(size=(400, 6)))
    stretch = np.diag([4.0, 1, 1, 1, 1, 0.25])
    target = _unit(source @ stretch + 0.5)
    fitted = {m: upgrade_embeddings([fit_linear_transform(source, target, m)], source) for m in ("lstsq", "procrustes")}
    cosine = {m: float(np.mean(np.sum(out * target, axis=1))) for m, out in fitted.items()}
    assert cosine["lstsq"] > cosine["procrustes"] > 0.5
    # procrustes is a rotation: it keeps every angle between stored rows
    psi = fit_linear_transform(source, target, "procrustes")
    np.testing.assert_allclose(fitted["procrustes"] @ fitted["procrustes"].T, source @ source.T, atol=1e-5)
    assert psi.mlp[-1].bias.abs().max() == 0


def test_a_fitted_psi_saves_and_loads_as_a_trained_one(tmp_path):
    rng = np.random.default_rng(2)
    source = _unit(rng.normal(size=(100, 5)))
    psi = fit_linear_transform(source, rng.normal(size=(100, 5)))
    save_artifact(tmp_path / "psi", psi, Artifact.of(psi, "transform", "psi_1_2").card)
    loaded = load_artifact(tmp_path / "psi")
    np.testing.assert_array_equal(upgrade_embeddings([loaded.module], source), upgrade_embeddings([psi], source))


def test_closed_form_refuses_what_it_cannot_fit():
    with pytest.raises(InputError, match="unknown closed-form fit 'ridge'"):
        fit_linear_transform(np.ones((10, 2)), np.ones((10, 2)), "ridge")
    with pytest.raises(InputError, match="more training pairs than dims"):
        fit_linear_transform(np.ones((3, 4)), np.ones((3, 4)))
    with pytest.raises(InputError, match="NaN or Inf"):
        fit_linear_transform(np.full((10, 2), np.nan), np.ones((10, 2)))
    with pytest.raises(ConfigError, match="set transform.layers=0"):
        load_config("smoke", ["transform.fit=lstsq"])
    with pytest.raises(ConfigError, match="arms must be one of"):
        load_config("smoke", ["arms=[bct]"])


def test_bct_chained_is_bict_with_the_gallery_left_at_v1():
    def tests(step, backward, deployed_before):
        names = dict.fromkeys(TESTS, {"mAP": step / 10})
        return {"step": step, "tests": {**names, "backward": {"mAP": backward},
                                        "deployed_before": {"mAP": deployed_before}}}

    chained = chained_steps([tests(3, 0.31, 0.9), tests(2, 0.21, 0.12)])
    assert [e["step"] for e in chained] == [2, 3]
    two, three = (e["tests"] for e in chained)
    assert two["forward"]["mAP"] == 0.21 and two["deployed_before"]["mAP"] == 0.12  # phi_1 / v1 in both arms
    assert three["forward"]["mAP"] == 0.31 and three["deployed_before"]["mAP"] == 0.21  # phi_2 / v1
    assert three["new_self"]["mAP"] == 0.3


@pytest.fixture(scope="module")
def arms_run(ray_session, smoke_data, tmp_path_factory):
    config = load_config("smoke", [
        "scenario.steps=3", "scenario.classes=[[0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]",
        "train.epochs=1", "transform.epochs=1", "eval.partial_refresh=[]", "eval.matrix=false",
        "arms=[bct_chained, bct_anchored, independent_psi, linear_psi]"])
    out = tmp_path_factory.mktemp("arms") / "run"
    lines = []
    results = run_sequence(config, out, log=lines.append, dataset=smoke_data)
    return out, results, lines


def test_every_arm_reports_every_step_on_test_and_validation(arms_run):
    out, results, _ = arms_run
    arms = results["arms"]
    assert list(arms) == ["bict", "bct_chained", "bct_anchored", "independent_psi", "linear_psi"]
    assert json.loads((out / "results.json").read_text())["arms"] == arms
    for name, arm in arms.items():
        for split in (arm["steps"], arm["validation"]["steps"]):
            assert [e["step"] for e in split] == [2, 3], name
            assert all(set(e["tests"]) == set(TESTS) for e in split), name
    assert arms["bict"]["steps"] == results["steps"]


def test_the_arms_share_phi_1_and_gallery_v1_byte_for_byte(arms_run):
    out, results, lines = arms_run
    phi_1 = (out / "models" / "phi_1" / "weights.pt").read_bytes()
    card = json.loads((out / "models" / "phi_1" / "model.json").read_text())
    for name in TRAINED_ARMS:
        arm_dir = out / "arms" / name
        assert results["arms"][name]["shared"]["phi_1"] == card["sha256"] == hashlib.sha256(phi_1).hexdigest()
        # read from the run, never trained or extracted again
        assert not (arm_dir / "models" / "phi_1").exists() and not (arm_dir / "gallery" / "v1").exists()
        assert any(f"[{name}] gallery v1: shared with" in line for line in lines)
        assert not (arm_dir / "splits").exists()  # the run's splits, not drawn again


def test_each_arm_trains_what_it_says(arms_run):
    out, results, _ = arms_run
    anchored, independent, linear = (out / "arms" / name for name in TRAINED_ARMS)
    assert json.loads((anchored / "models" / "phi_3" / "model.json").read_text())["parent"] == "phi_1"
    assert not (anchored / "models" / "phi_2").exists() and not (anchored / "transforms").exists()
    main = json.loads((out / "models" / "phi_3" / "model.json").read_text())
    assert json.loads((anchored / "models" / "phi_3" / "model.json").read_text())["training"]["num_train"] == \
        main["training"]["num_train"]
    for t in (2, 3):
        card = json.loads((independent / "models" / f"phi_{t}" / "model.json").read_text())
        assert card["parent"] is None and "compat_loss" not in card["training"]  # lambda = 0: trained independently
        fitted = json.loads((linear / "transforms" / f"psi_{t - 1}_{t}" / "model.json").read_text())
        assert fitted["spec"]["layers"] == 0 and fitted["training"]["fit"] == "lstsq"
        assert fitted["training"]["trained_on"][0] == "phi_1"
    assert not (linear / "models").exists()  # every model shared
    assert json.loads((linear / "gallery" / "v3" / "manifest.json").read_text())["lineage"] == [
        "phi_1", "psi_1_2", "psi_2_3"]


def test_linear_psi_fits_on_the_runs_pairs_without_embedding_them_again(arms_run, smoke_data):
    """The arm reads phi_1(x) and phi_t(x) of the run's training images from memory, applies its own chain, and
    fits exactly what a fit on freshly embedded pairs gives."""
    import torch

    from bict_ray.core.embed import embed_images, model_features

    out, _, lines = arms_run
    for t in (2, 3):
        assert any(f"[linear_psi] psi_{t - 1}_{t}: phi_1(x) and phi_{t}(x) of its" in line for line in lines)
    assert not any("[independent_psi] psi_" in line and "shared with" in line for line in lines)  # its own models
    linear = out / "arms" / "linear_psi" / "transforms"
    phi_1 = load_artifact(out / "models" / "phi_1").module
    chain = []
    for t in (2, 3):
        ids = np.load(out / "splits" / f"model_{t}_train_ids.npy")
        images = smoke_data.train.images[np.searchsorted(smoke_data.train.ids, ids)]
        source = upgrade_embeddings(chain, embed_images(phi_1, images))
        expected = fit_linear_transform(source, model_features(load_artifact(out / "models" / f"phi_{t}").module,
                                                               images), "lstsq")
        fitted = load_artifact(linear / f"psi_{t - 1}_{t}").module
        for key, value in expected.state_dict().items():
            assert torch.allclose(fitted.state_dict()[key], value, atol=1e-4), (t, key)
        chain.append(fitted)


def test_arms_that_share_a_model_and_a_gallery_score_them_identically(arms_run):
    _, results, _ = arms_run
    arms = {name: {e["step"]: e["tests"] for e in arm["steps"]} for name, arm in results["arms"].items()}
    # bct_anchored's phi_2 is BiCT's (its reference is phi_1 in both): at t = 2 it is bct_chained
    for test in TESTS:
        assert arms["bct_anchored"][2][test]["mAP"] == pytest.approx(arms["bct_chained"][2][test]["mAP"], abs=1e-9)
    # linear_psi has BiCT's models: everything but the psi-upgraded galleries is BiCT's
    for t in (2, 3):
        for test in ("old_self", "new_self", "backward", "backward_prev"):
            assert arms["linear_psi"][t][test]["mAP"] == pytest.approx(arms["bict"][t][test]["mAP"], abs=1e-9)
        assert arms["linear_psi"][t]["forward"] != arms["bict"][t]["forward"]
    assert arms["bct_anchored"][3]["new_self"] != arms["bct_chained"][3]["new_self"]


def test_an_arm_added_to_a_finished_run_trains_only_the_arm(arms_run, smoke_data):
    out, results, lines = arms_run
    config = load_config(out / "config.yaml", ["arms=[linear_psi]"])
    again = []
    rerun = run_sequence(config, out, log=again.append, dataset=smoke_data)
    assert not any("training phi" in line or "fitting" in line for line in again)
    assert rerun["arms"]["linear_psi"]["steps"] == results["arms"]["linear_psi"]["steps"]
    assert list(rerun["arms"]) == ["bict", "linear_psi"]
