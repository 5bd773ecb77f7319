"""The criterion study: BCT's criterion (backward prev > old self) per variant over seeds, variants of a seed
sharing the base's φ_1, v1 and splits (bict_ray/pipeline/criterion_study.py, `bict-ray study criterion`)."""

import json

import pytest

from bict_ray.cli import main
from bict_ray.config import load_config
from bict_ray.errors import InputError
from bict_ray.pipeline import criterion_study
from bict_ray.pipeline.criterion_study import criterion_markdown, criterion_rows, parse_variant, verdict

TESTS = ("old_self", "new_self", "backward", "backward_prev", "forward", "deployed_before")


def _results(scores: dict, anchored_backward: dict | None = None) -> dict:
    """scores: (split, step) -> {test: mAP}; unlisted tests 0.5. anchored_backward: (split, step) -> mAP."""
    def steps(split, values):
        return [{"step": t, "tests": {name: {"mAP": values.get((split, t), {}).get(name, 0.5), "R@1": 0.9}
                                      for name in TESTS}} for t in (2, 3)]
    results = {"steps": steps("test", scores), "validation": {"steps": steps("validation", scores)}}
    if anchored_backward is not None:
        arm = {(split, t): {"backward": value} for (split, t), value in anchored_backward.items()}
        results["arms"] = {"bct_anchored": {"steps": steps("test", arm),
                                            "validation": {"steps": steps("validation", arm)}}}
    return results


def test_margins_and_verdicts_match_a_hand_computation():
    seed_0 = _results({("test", 2): {"old_self": 0.40, "backward_prev": 0.45},
                       ("test", 3): {"old_self": 0.60, "backward_prev": 0.50},
                       ("validation", 2): {"old_self": 0.42, "backward_prev": 0.44}},
                      anchored_backward={("test", 3): 0.38, ("validation", 3): 0.43})
    seed_1 = _results({("test", 2): {"old_self": 0.40, "backward_prev": 0.43},
                       ("test", 3): {"old_self": 0.62, "backward_prev": 0.64},
                       ("validation", 2): {"old_self": 0.40, "backward_prev": 0.46}},
                      anchored_backward={("test", 3): 0.30, ("validation", 3): 0.30})
    step_2, step_3 = criterion_rows([seed_0, seed_1])
    # step 2: margins 5 and 3 points on test, 2 and 6 on validation
    assert step_2["margin_test"]["values"] == pytest.approx([5.0, 3.0])
    assert step_2["margin_test"]["mean"] == pytest.approx(4.0)
    assert step_2["margin_test"]["std"] == pytest.approx(2 ** 0.5)
    assert step_2["margin_validation"]["values"] == pytest.approx([2.0, 6.0])
    assert verdict(step_2["margin_test"]) == "met"
    # step 3: −10 and +2: one seed each way
    assert step_3["margin_test"]["values"] == pytest.approx([-10.0, 2.0])
    assert verdict(step_3["margin_test"]) == "mixed"
    # the anchored arm against φ_1 on v1, which is old self at step 2 (40 on test, 42 and 40 on validation)
    assert step_3["anchored_margin_test"]["values"] == pytest.approx([-2.0, -10.0])
    assert step_3["anchored_margin_validation"]["values"] == pytest.approx([1.0, -10.0])
    assert verdict(step_3["anchored_margin_test"]) == "not met"
    assert step_3["forward"]["mean"] == pytest.approx(50.0)

    table = criterion_markdown({"seeds": [0, 1], "rows": {"bct_1": [step_2, step_3]}})
    assert "| bct_1 | 3 |" in table and "| -4.0 ± 8.5 | mixed | -4.5 ± 7.8 | -6.0 ± 5.7 | not met |" in table


def test_rows_refuse_results_without_validation():
    results = _results({})
    del results["validation"]
    with pytest.raises(InputError, match="val_fraction"):
        criterion_rows([results])


def test_variants_parse_into_overrides_and_bad_ones_are_named():
    assert parse_variant("bct:1") == ("bct_1", ["compat.loss=bct", "compat.lam=1"])
    assert parse_variant("bct:1:train.epochs=6,transform.epochs=4") == (
        "bct_1_epochs6_epochs4", ["compat.loss=bct", "compat.lam=1", "train.epochs=6", "transform.epochs=4"])
    for bad in ("bct", "bct:", "bct:1:epochs", "a:b:c:d"):
        with pytest.raises(InputError, match="variant"):
            parse_variant(bad)


def test_variants_of_a_seed_read_the_base_variants_phi_1_v1_and_splits(tmp_path, monkeypatch):
    """The study's own wiring, with the sequence runs replaced: the base variant's seed folders are what the others
    start from (copied before their run), so only phi_2 onwards differs between variants."""
    started = []

    def fake_run_seeds(config, out, seeds, *, dataset=None, log=print):
        for seed in seeds:
            run = out / f"seed_{seed}"
            started.append((out.name, seed, (run / "models/phi_1/weights.pt").is_file()))
            for part in ("splits", "models/phi_1", "gallery/v1"):
                (run / part).mkdir(parents=True, exist_ok=True)
                if not (run / part / "weights.pt").exists():
                    (run / part / "weights.pt").write_bytes(f"{out.name}-{seed}".encode())
            (run / "results.json").write_text(json.dumps(_results({("test", 2): {"old_self": config.compat.lam}}),))

    monkeypatch.setattr(criterion_study, "run_seeds", fake_run_seeds)
    configs = {name: load_config("smoke", overrides) for name, overrides in
               (parse_variant("bct:0.4"), parse_variant("ract:0.2"))}
    study = criterion_study.run_criterion_study(configs, [0, 1], tmp_path, log=lambda line: None)
    assert started == [("bct_0.4", 0, False), ("bct_0.4", 1, False), ("ract_0.2", 0, True), ("ract_0.2", 1, True)]
    for seed in (0, 1):
        assert (tmp_path / "ract_0.2" / f"seed_{seed}" / "models/phi_1/weights.pt").read_bytes() == \
            f"bct_0.4-{seed}".encode()
    assert study["rows"]["ract_0.2"][0]["old_self"]["mean"] == pytest.approx(20.0)
    assert json.loads((tmp_path / "criterion_study.json").read_text())["rows"] == study["rows"]
    assert "| ract_0.2 | 2 |" in (tmp_path / "criterion_study.md").read_text()


def test_the_cli_refuses_the_lambda_studys_options(capsys):
    assert main(["study", "criterion", "--lams", "0,1"]) == 2
    assert "--variants" in capsys.readouterr().err
