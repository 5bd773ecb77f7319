"""The λ study: λ × seeds × ψ budget in one Ray Tune grid, trials sharing their seed's φ_1, v1 and splits,
selected on validation, reported on test (bict_ray/pipeline/lambda_study.py, `bict-ray study lambda`)."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bict_ray.cli import main
from bict_ray.core.splits import per_class_share
from bict_ray.errors import InputError
from bict_ray.pipeline.lambda_study import LambdaStudy, PsiBudget, summarise_study, trial_name
from bict_ray.storage.artifacts import load_artifact

TESTS = ("old_self", "new_self", "backward", "backward_prev", "forward", "deployed_before")


def _fake_results(forward_val: float, forward_test: float, steps=(2, 3)) -> dict:
    def tests(forward):
        return {test: {"mAP": forward if test == "forward" else 0.3, "R@1": 0.5} for test in TESTS}
    return {"steps": [{"step": t, "tests": tests(forward_test)} for t in steps],
            "validation": {"steps": [{"step": t, "tests": tests(forward_val)} for t in steps]}}


def _write_trials(root, scores: dict) -> None:
    """scores: (lam, seed, budget name) -> (validation forward, test forward)."""
    for (lam, seed, budget), (val, test) in scores.items():
        folder = root / "trials" / trial_name(lam, seed, PsiBudget.parse(budget))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(_fake_results(val, test)))


def test_selection_follows_validation_and_never_test(tmp_path):
    study = LambdaStudy(lams=(0.0, 1.0), seeds=(0, 1))
    budget = (PsiBudget(1.0, 8),)
    scores = {(0.0, 0, "1x8"): (0.50, 0.40), (0.0, 1, "1x8"): (0.52, 0.42),
              (1.0, 0, "1x8"): (0.60, 0.30), (1.0, 1, "1x8"): (0.58, 0.32)}
    _write_trials(tmp_path, scores)
    summary = summarise_study(tmp_path, study, budget)
    assert summary["selected"]["1x8"]["lam"] == 1.0 and summary["selected_on"] == "validation"
    # the selected λ's test numbers are reported as they are, and the spread is over the seeds by hand
    forward = summary["selected"]["1x8"]["test"]["forward"]
    assert forward["mean"] == pytest.approx(0.31) and forward["values"] == pytest.approx([0.30, 0.32])
    assert forward["std"] == pytest.approx(0.01 * 2 ** 0.5) and forward["n"] == 2

    # only test numbers change, hugely in λ = 0's favour: the selection does not move
    _write_trials(tmp_path, {key: (val, 0.99 if key[0] == 0.0 else test) for key, (val, test) in scores.items()})
    assert summarise_study(tmp_path, study, budget)["selected"]["1x8"]["lam"] == 1.0
    # only validation numbers change: it does
    _write_trials(tmp_path, {key: (0.9 if key[0] == 0.0 else val, test) for key, (val, test) in scores.items()})
    assert summarise_study(tmp_path, study, budget)["selected"]["1x8"]["lam"] == 0.0


def test_selection_is_per_budget_and_a_missing_trial_is_named(tmp_path):
    study = LambdaStudy(lams=(0.0, 3.0), seeds=(0,))
    budgets = (PsiBudget(1.0, 8), PsiBudget(0.1, 2))
    _write_trials(tmp_path, {(0.0, 0, "1x8"): (0.6, 0.6), (3.0, 0, "1x8"): (0.5, 0.5),
                             (0.0, 0, "0.1x2"): (0.2, 0.2), (3.0, 0, "0.1x2"): (0.4, 0.4)})
    summary = summarise_study(tmp_path, study, budgets)
    assert {name: chosen["lam"] for name, chosen in summary["selected"].items()} == {"1x8": 0.0, "0.1x2": 3.0}
    assert [(e["budget"], e["lam"]) for e in summary["entries"]] == [("1x8", 0.0), ("1x8", 3.0),
                                                                      ("0.1x2", 0.0), ("0.1x2", 3.0)]
    (tmp_path / "trials" / "lam_3-seed_0-psi_0.1x2" / "results.json").unlink()
    with pytest.raises(InputError, match="lam_3-seed_0-psi_0.1x2.*has not finished"):
        summarise_study(tmp_path, study, budgets)


def test_psi_budget_keeps_a_seeded_share_of_every_class():
    labels = np.repeat(np.arange(4), [10, 20, 3, 1])
    share = per_class_share(labels, 0.5, seed=7)
    assert np.bincount(labels[share], minlength=4).tolist() == [5, 10, 2, 1]  # at least one image of every class
    assert np.array_equal(share, per_class_share(labels, 0.5, seed=7)) and np.all(np.diff(share) > 0)
    assert not np.array_equal(share, per_class_share(labels, 0.5, seed=8))
    assert np.array_equal(per_class_share(labels, 1.0, seed=7), np.arange(len(labels)))


@pytest.mark.parametrize("text", ["8", "1x", "x2", "0x2", "1.5x2", "1x0", "ax2"])
def test_a_bad_psi_budget_is_named(text):
    with pytest.raises(InputError, match="FRACTIONxEPOCHS"):
        PsiBudget.parse(text)


def test_a_bad_study_is_refused():
    with pytest.raises(InputError, match="λ values must be"):
        LambdaStudy(lams=(-1.0,)).check()
    with pytest.raises(InputError, match="lists a λ twice"):
        LambdaStudy(lams=(1.0, 1.0)).check()
    with pytest.raises(InputError, match="distinct"):
        LambdaStudy(seeds=(0, 0)).check()


def test_quick_study_end_to_end(ray_session, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["study", "lambda", "--quick", "--out", str(out)]) == 0
    study = json.loads((out / "study.json").read_text())
    assert study["lams"] == [0.0, 1.0] and study["seeds"] == [0, 1]
    assert [b["name"] for b in study["budgets"]] == ["1x1"]
    assert len(study["entries"]) == 2 and all(e["test"]["forward"]["n"] == 2 for e in study["entries"])

    # every trial of a seed read its base's φ_1 (the same bytes: no φ_1 of its own) and its gallery v1
    for seed in (0, 1):
        phi_1 = load_artifact(out / "bases" / f"seed_{seed}" / "models" / "phi_1")
        for lam in (0, 1):
            for budget in ("1x1",):
                trial = out / "trials" / f"lam_{lam}-seed_{seed}-psi_{budget}"
                assert not (trial / "models" / "phi_1").exists() and not (trial / "gallery" / "v1").exists()
                phi_2 = load_artifact(trial / "models" / "phi_2")
                assert phi_2.card.parent == (None if lam == 0 else phi_1.card.name)
    psi = load_artifact(out / "trials" / "lam_1-seed_0-psi_1x1" / "transforms" / "psi_1_2").card.training
    assert psi["epochs"] == 1 and psi["num_train"] == 360  # every pair of phi_2's 360 training images

    # the selection is the argmax of the validation forward, computed again from the trials' own results
    for budget in ("1x1",):
        means = {}
        for lam in (0, 1):
            per_seed = [json.loads((out / "trials" / f"lam_{lam}-seed_{s}-psi_{budget}" / "results.json").read_text())
                        for s in (0, 1)]
            means[float(lam)] = sum(r["validation"]["steps"][-1]["tests"]["forward"]["mAP"] for r in per_seed) / 2
        assert study["selected"][budget]["lam"] == max(means, key=means.get)

    rows = pd.read_csv(out / "lambda_study.csv")
    assert set(rows["split"]) == {"validation", "test"} and rows["mean"].between(0, 1).all()
    with Image.open(out / "lambda_study.png") as image:
        assert image.size[0] > 400
    assert "Selected on validation: λ =" in (out / "lambda_study.md").read_text()
    assert "Selected on validation" in capsys.readouterr().out

    # a rerun resumes: nothing is trained again, the same study comes back
    before = {p: p.stat().st_mtime for p in out.glob("trials/*/models/*/model.pt")}
    assert main(["study", "lambda", "--quick", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime for p in out.glob("trials/*/models/*/model.pt")} == before
    assert json.loads((out / "study.json").read_text())["selected"] == study["selected"]
