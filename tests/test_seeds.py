"""A configuration over several training seeds: the spread summary by hand, its errors, the report's section, and
the smoke sequence run twice (train.seed = 0, 1) end to end."""

import copy
import json
import math

import pytest
import torch
import yaml
from PIL import Image

from bict_ray.config import load_config
from bict_ray.errors import InputError
from bict_ray.pipeline.report import load_results, seeds_table, write_report
from bict_ray.pipeline.seeds import mean_results, run_seeds, summarise_seeds, t_quantile_975
from bict_ray.storage.artifacts import load_artifact

TESTS = ("old_self", "new_self", "backward", "backward_prev", "forward", "deployed_before")


def seed_results(forward, offset=0.0, steps=(2,)):
    """One seed's results.json: forward mAP as given, the other tests 0.3 + offset; counts and a label ride along."""
    def tests(t):
        scores = {test: {"mAP": 0.3 + offset, "R@1": 0.4 + offset, "num_queries": 200, "model": f"phi_{t}"}
                  for test in TESTS}
        scores["forward"] = {"mAP": forward + 0.01 * (t - 2), "R@1": 0.5, "num_queries": 200, "model": f"phi_{t}"}
        return scores

    return {"run": {"name": "toy", "steps": max(steps)}, "steps": [{"step": t, "tests": tests(t)} for t in steps],
            "validation": {"steps": [{"step": t, "tests": tests(t)} for t in steps]}, "matrix": None,
            "timings": {"train phi_1": 1.0}}


def test_two_seeds_match_a_hand_computation():
    summary = summarise_seeds([seed_results(0.50), seed_results(0.60, offset=0.1)], [0, 1])
    assert summary["seeds"] == [0, 1] and summary["runs"] == ["seed_0", "seed_1"]
    (step,) = summary["steps"]
    forward = step["tests"]["forward"]["mAP"]
    # mean 0.55; sample std (ddof = 1) sqrt(2 * 0.05^2 / 1) = 0.0707; t_{0.975,1} = 12.706, std / sqrt(2) = 0.05
    assert forward["mean"] == pytest.approx(0.55)
    assert forward["std"] == pytest.approx(math.sqrt(2 * 0.05 ** 2))
    assert forward["ci95"] == pytest.approx([0.55 - 12.706 * 0.05, 0.55 + 12.706 * 0.05], abs=1e-4)
    assert forward["n"] == 2 and forward["values"] == [0.50, 0.60]
    assert step["tests"]["old_self"]["R@1"]["std"] == pytest.approx(0.1 / math.sqrt(2))
    # equal counts: no spread, and the interval collapses; a label is no metric
    assert step["tests"]["forward"]["num_queries"] == {"mean": 200.0, "std": 0.0, "ci95": [200.0, 200.0], "n": 2,
                                                       "values": [200.0, 200.0]}
    assert "model" not in step["tests"]["forward"]
    assert summary["validation"]["steps"] == summary["steps"]


def test_the_t_quantiles():
    assert t_quantile_975(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile_975(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile_975(30) == pytest.approx(2.042, abs=1e-3)
    assert t_quantile_975(31) == 1.96


def test_one_seed_has_no_spread():
    (step,) = summarise_seeds([seed_results(0.5)], [7])["steps"]
    assert step["tests"]["forward"]["mAP"] == {"mean": 0.5, "std": 0.0, "ci95": None, "n": 1, "values": [0.5]}


def test_validation_and_arms_are_summarised_only_where_every_seed_has_them():
    a, b = seed_results(0.5), seed_results(0.6)
    for results, forward in ((a, 0.2), (b, 0.4)):
        arm = seed_results(forward)
        results["arms"] = {"independent_psi": {"meaning": "lambda = 0", "steps": arm["steps"], "timings": {}}}
        arm = seed_results(forward + 0.1)
        results["arms"]["bict"] = {"meaning": "psi-upgraded gallery", "steps": arm["steps"],
                                   "validation": arm["validation"], "run_dir": "."}
    del b["validation"]
    summary = summarise_seeds([a, b], [0, 1])
    assert "validation" not in summary
    independent = summary["arms"]["independent_psi"]
    assert independent["steps"][0]["tests"]["forward"]["mAP"]["mean"] == pytest.approx(0.3)
    assert "validation" not in independent and "timings" not in independent
    arm = summary["arms"]["bict"]
    assert arm["meaning"] == "psi-upgraded gallery" and "run_dir" not in arm
    assert arm["steps"][0]["tests"]["forward"]["mAP"]["mean"] == pytest.approx(0.4)
    assert arm["validation"]["steps"] == arm["steps"]
    means = mean_results([a, b], [0, 1])["arms"]["bict"]
    assert means["validation"]["steps"][0]["tests"]["forward"]["mAP"] == pytest.approx(0.4)
    b["arms"]["other"] = b["arms"]["bict"]  # an arm only one seed ran
    with pytest.raises(InputError, match=r"seed 1: arms 'other' is not in seed 0's run"):
        summarise_seeds([a, b], [0, 1])
    del b["arms"]
    assert "arms" not in summarise_seeds([a, b], [0, 1])


@pytest.mark.parametrize("break_it, message", [
    (lambda r: r["steps"].pop(), r"seed 5: steps: step 3 is missing \(seed 0 has it\)"),
    (lambda r: r["steps"][0]["tests"].pop("forward"), r"seed 5: steps step 2: test 'forward' is missing"),
    (lambda r: r["steps"][0]["tests"]["backward"].pop("R@1"), r"seed 5: steps step 2 test 'backward' has no number "
                                                              r"'R@1'"),
    (lambda r: r["validation"]["steps"][1]["tests"]["old_self"].update(mAP="high"),
     r"seed 5: validation\.steps step 3 test 'old_self' has no number 'mAP'"),
    (lambda r: r["steps"].append(copy.deepcopy(r["steps"][0]) | {"step": 4}),
     r"seed 5: steps: step 4 is not in seed 0"),
    (lambda r: r.update(steps=[]), r"seed 5: 'steps' is missing or empty"),
])
def test_mismatched_runs_name_the_seed_and_the_key(break_it, message):
    other = seed_results(0.6, steps=(2, 3))
    break_it(other)
    with pytest.raises(InputError, match=message):
        summarise_seeds([seed_results(0.5, steps=(2, 3)), other], [0, 5])


@pytest.mark.parametrize("seeds, message", [
    ([], "non-empty"), ([0, 0], "distinct: 0 given more than once"), ([-1], "integers >= 0, got -1"),
    ([1.5], "integers >= 0, got 1.5"),
])
def test_bad_seed_lists_are_refused(seeds, message):
    with pytest.raises(InputError, match=message):
        summarise_seeds([seed_results(0.5)] * len(seeds), seeds)


def test_the_results_hold_the_means_and_the_report_shows_the_spread(tmp_path):
    results = mean_results([seed_results(0.50, steps=(2, 3)), seed_results(0.60, offset=0.1, steps=(2, 3))], [0, 1])
    assert results["run"]["seeds"] == [0, 1] and "mean over 2 seeds" in results["run"]["scores"]
    assert results["steps"][0]["tests"]["forward"]["mAP"] == pytest.approx(0.55)
    assert results["validation"]["steps"][1]["tests"]["forward"]["mAP"] == pytest.approx(0.56)
    assert "matrix" not in results and "timings" not in results  # one seed's, not a mean: left in seed_<s>/
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = write_report(tmp_path).read_text()
    section = text.split("## Spread over seeds")[1].split("\n## ")[0]
    assert "**mean over 2 seeds** (train.seed = 0, 1)" in section and "`seed_0/`, `seed_1/`" in section
    assert "| 2 | forward (BiCT) | 55.0 ± 7.1 | [-8.5, 118.5] | 50.0, 60.0 |" in section
    assert "| 3 | old self | 35.0 ± 7.1 |" in section
    assert "(plots/seeds.png)" in section and text.index("## Spread over seeds") < text.index("## What BiCT buys")
    with Image.open(tmp_path / "plots" / "seeds.png") as image:
        assert image.format == "PNG" and image.width > 300
        image.verify()
    lines = seeds_table(results).splitlines()
    assert lines[0] == "mAP (%) at each upgrade step t, mean ± std over 2 seeds (train.seed = 0, 1)"
    assert lines[3].split() == ["2", *["35.0", "±", "7.1"] * 4, "55.0", "±", "7.1", "35.0", "±", "7.1"]


def test_one_seed_reports_no_interval(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(mean_results([seed_results(0.5)], [3])))
    text = write_report(tmp_path).read_text()
    assert "With one seed there is no spread to estimate" in text
    assert "| 2 | forward (BiCT) | 50.0 ± 0.0 | — | 50.0 |" in text


@pytest.mark.parametrize("break_it, message", [
    (lambda s: s["steps"][0]["tests"]["forward"]["mAP"].update(n=3), r"'seeds\.steps\[0\]\.tests\.forward\.mAP\.n' "
                                                                     r"must be the number of seeds, 2"),
    (lambda s: s["steps"][0]["tests"]["forward"]["mAP"].update(mean=55.0), r"mAP\.mean' must be a fraction"),
    (lambda s: s["steps"][0]["tests"]["backward"].pop("mAP"),
     r"missing key 'seeds\.steps\[0\]\.tests\.backward\.mAP'"),
    (lambda s: s["steps"][0]["tests"]["forward"]["mAP"].update(ci95=[0.6, 0.7]), r"must hold the mean"),
    (lambda s: s.update(runs=["seed_0"]), r"'seeds\.runs' must name one run directory per seed"),
])
def test_malformed_seed_summaries_name_the_key(tmp_path, break_it, message):
    results = mean_results([seed_results(0.50), seed_results(0.60)], [0, 1])
    break_it(results["seeds"])
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(InputError, match=message):
        load_results(tmp_path)


def test_an_ordinary_run_directory_is_not_taken_for_a_run_over_seeds(tmp_path):
    (tmp_path / "config.yaml").write_text("name: smoke\n")
    with pytest.raises(InputError, match="it has config.yaml"):
        run_seeds(load_config("configs/smoke.yaml"), tmp_path, [0, 1])


TINY = ["train.epochs=1", "transform.epochs=1", "eval.partial_refresh=[]", "eval.matrix=false",
        "data.limit_train=400", "data.limit_test=200"]


def test_two_seeds_of_the_smoke_sequence(ray_session, tmp_path):
    out = tmp_path / "seeds"
    lines = []
    results = run_seeds(load_config("configs/smoke.yaml", TINY), out, [0, 1], log=lines.append)
    runs = [json.loads((out / f"seed_{s}" / "results.json").read_text()) for s in (0, 1)]
    assert results == json.loads((out / "results.json").read_text())
    assert results["seeds"] == summarise_seeds(runs, [0, 1])
    assert results["steps"] == mean_results(runs, [0, 1])["steps"]
    # the same images and splits for both seeds, models trained from other initialisations and data orders
    splits = [sorted(p.name for p in (out / f"seed_{s}" / "splits").iterdir()) for s in (0, 1)]
    assert splits[0] == splits[1] and splits[0]
    for name in splits[0]:
        assert (out / "seed_0" / "splits" / name).read_bytes() == (out / "seed_1" / "splits" / name).read_bytes()
    assert runs[0]["run"]["classes"] == runs[1]["run"]["classes"]
    for stage in ("models/phi_1", "models/phi_2", "transforms/psi_1_2"):
        a, b = (load_artifact(out / f"seed_{s}" / stage).state for s in (0, 1))
        assert any(not torch.equal(a[key], b[key]) for key in a), stage
    saved = yaml.safe_load((out / "seed_1" / "config.yaml").read_text())
    assert saved["train"]["seed"] == 1 and saved["data"]["seed"] == saved["scenario"]["seed"] == 0
    assert any(line.startswith("[seed 1] [sequence] training phi_2") for line in lines)
    forward = results["seeds"]["steps"][0]["tests"]["forward"]["mAP"]
    assert forward["n"] == 2 and forward["values"] == [r["steps"][0]["tests"]["forward"]["mAP"] for r in runs]
    text = write_report(out).read_text()
    assert "## Spread over seeds" in text and "mean over 2 seeds" in text
    with Image.open(out / "plots" / "seeds.png") as image:
        assert image.width > 300


def test_two_seeds_on_s3_keep_every_run_in_the_bucket(ray_session, bucket, tmp_path, monkeypatch):
    # `bict-ray sequence --seeds 0,1 --out s3://…`: each seed's run directory is a run on S3 of its own, and the
    # summary beside them; another machine's mirror reads them back
    import boto3

    from bict_ray.storage.rundir import RunDir

    uri = f"s3://{bucket}/seeds"
    monkeypatch.setenv("BICT_CACHE_DIR", str(tmp_path / "machine-a"))
    results = run_seeds(load_config("configs/smoke.yaml", TINY), uri, [0, 1], log=lambda line: None)
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="seeds/")["Contents"]}
    assert {"seeds/results.json", "seeds/seed_0/results.json", "seeds/seed_1/gallery/v2/manifest.json"} <= keys
    monkeypatch.setenv("BICT_CACHE_DIR", str(tmp_path / "machine-b"))
    out = RunDir(uri).path
    runs = [json.loads((out / f"seed_{s}" / "results.json").read_text()) for s in (0, 1)]
    assert results == json.loads((out / "results.json").read_text())
    assert results["seeds"] == summarise_seeds(runs, [0, 1])

