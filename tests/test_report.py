import argparse
import copy
import json

import pytest
from PIL import Image

from bict_ray.cli import report as report_cli
from bict_ray.pipeline.report import load_results, markdown_step_table, step_table, write_report


def scores(mAP, r1=None):
    return {"mAP": mAP, "R@1": mAP + 0.1 if r1 is None else r1, "R@5": 0.9, "R@10": 0.95, "num_queries": 100}


def step(t, old_self, new_self, backward, backward_prev, forward, deployed_before):
    return {"step": t, "tests": {"old_self": scores(old_self), "new_self": scores(new_self),
                                 "backward": scores(backward), "backward_prev": scores(backward_prev),
                                 "forward": scores(forward), "deployed_before": scores(deployed_before)}}


def results_3_steps():
    """A 3-model run (class growth); step 3 is listed first on purpose: the report orders steps itself."""
    return {
        "run": {"name": "toy", "dataset": "fashion_mnist", "scenario": "class_growth", "steps": 3,
                "models": ["phi_1", "phi_2", "phi_3"], "created": "2025-01-01T00:00:00"},
        "steps": [step(3, 0.459, 0.683, 0.333, 0.401, 0.673, 0.459),
                  step(2, 0.400, 0.600, 0.450, 0.420, 0.580, 0.400)],
        "matrix": {"queries": ["phi_1", "phi_2", "phi_3"], "galleries": ["v1", "v2", "v3"],
                   "mAP": [[0.4, None, None], [0.45, 0.58, None], [0.333, 0.5, 0.673]],
                   "R@1": [[0.5, None, None], [0.55, 0.68, None], [0.433, 0.6, 0.773]]},
        "partial_refresh": [{"step": s, "fraction": f, "mAP": 0.3 + 0.3 * f + 0.01 * s, "R@1": 0.5}
                            for s in (2, 3) for f in (0.0, 0.5, 1.0)],
        "arms": {"bict": {"meaning": "this run", "steps": [step(3, 0.459, 0.683, 0.333, 0.401, 0.673, 0.459),
                                                           step(2, 0.400, 0.600, 0.450, 0.420, 0.580, 0.400)]},
                 "independent_psi": {"meaning": "λ = 0, then ψ",
                                     "steps": [step(2, 0.4, 0.62, 0.1, 0.1, 0.55, 0.4),
                                               step(3, 0.46, 0.70, 0.05, 0.05, 0.613, 0.55)],
                                     "validation": {"steps": [step(2, 0.4, 0.62, 0.1, 0.1, 0.5, 0.4),
                                                              step(3, 0.46, 0.70, 0.05, 0.05, 0.6, 0.55)]}}},
        "timings": {"train": 30.0, "upgrade": 10.0},
    }


def write_run(folder, results, trials=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))
    if trials is not None:
        (folder / "tune").mkdir()
        (folder / "tune" / "trials.csv").write_text(trials)
        (folder / "tune" / "best_config.json").write_text(json.dumps({"lam": 1.0, "compat_loss": "bct"}))
    return folder


TRIALS = ("trial_id,lam,compat_loss,mean_forward_mAP,mean_backward_mAP,mean_new_self_mAP,last_forward_mAP,time_s\n"
          "a,0.0,bct,0.55,0.08,0.66,0.613,40\n"
          "b,0.1,bct,0.60,0.30,0.65,0.64,41\n"
          "c,1.0,bct,0.626,0.39,0.64,0.673,39\n"
          "d,3.0,bct,0.61,0.41,0.60,0.65,42\n")


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    run_dir = write_run(tmp_path_factory.mktemp("full") / "run", results_3_steps(), trials=TRIALS)
    return run_dir, write_report(run_dir).read_text()


def test_step_table_rows_are_aligned_percentages_with_the_gain():
    lines = step_table(results_3_steps()).splitlines()
    assert lines[0] == "mAP (%) at each upgrade step t"
    assert lines[1] == "step  old self  new self  backward  backward  forward  deployed  forward -"
    assert lines[2] == "                          BCT only      prev     BiCT    before   backward"
    assert lines[3] == "   2      40.0      60.0      45.0      42.0     58.0      40.0      +13.0"
    assert lines[4] == "   3      45.9      68.3      33.3      40.1     67.3      45.9      +34.0"


def test_step_table_of_another_metric_and_of_a_missing_one():
    results = results_3_steps()
    results["steps"][0]["tests"]["forward"]["R@1"] = 0.80
    results["steps"][0]["tests"]["backward"]["R@1"] = 0.36
    assert step_table(results, "R@1").splitlines()[4] == (
        "   3      55.9      78.3      36.0      50.1     80.0      55.9      +44.0")
    with pytest.raises(ValueError, match=r"steps\[0\]\.tests\.old_self\.R@100"):
        step_table(results_3_steps(), "R@100")


def test_markdown_step_table():
    lines = markdown_step_table(results_3_steps()).splitlines()
    assert lines[0].startswith("| step | old self | new self | backward (BCT only) |")
    assert lines[1] == "|---|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[3] == "| 3 | 45.9 | 68.3 | 33.3 | 40.1 | 67.3 | 45.9 | +34.0 |"


def test_report_states_what_bict_buys_from_the_numbers(full_report):
    _, text = full_report
    assert text.startswith("# BiCT report: toy")
    assert "reaches 67.3% mAP, against 33.3% for BCT alone" in text
    assert "a gain of +34.0 points" in text
    assert "Forward > backward held at every step (t = 2, 3)." in text
    assert "Forward > old self held at every step (t = 2, 3)." in text
    assert "forward is 1.0 points below it" in text  # new self 68.3
    assert ("Over `independent_psi` (λ = 0, then ψ), on the same φ_1, gallery v1 and splits: BiCT's last-step "
            "retrieval is 6.0 points higher (67.3% vs 61.3%).") in text


def test_report_holds_every_section_and_table(full_report):
    _, text = full_report
    # BCT's criterion, reported per step: 42.0 vs 40.0 held at step 2, 40.1 vs 45.9 failed at step 3
    assert "On this run it held at t = 2 and did **not** hold at t = 3." in text
    assert "| 3 | 40.1 | 45.9 | -5.8 | no |" in text
    # one column per arm, the retrieval each serves; validation only where every arm has it (bict has none here)
    assert "| step | bict | independent_psi |" in text and "| 3 | 67.3 | 61.3 |" in text
    assert "Served retrieval at each step, validation" not in text
    assert "| independent_psi | 3 | 46.0 | 70.0 | 5.0 | 5.0 | 61.3 | 55.0 |" in text
    assert "| phi_2 | 45.0 | 58.0 |  |" in text  # null matrix cell left blank
    assert "| 50% | 47.0 | 48.0 |" in text  # partial refresh: 0.3 + 0.15 + 0.01 * step
    assert '"compat_loss": "bct"' in text  # tune best config
    assert "| c | 1 | bct | 62.6 | 39.0 | 64.0 | 67.3 |" in text
    assert "| **total** | **40.0** |  |" in text and "| train | 30.0 | 75% |" in text
    for name in ("steps", "matrix", "partial_refresh", "lambda"):
        assert f"(plots/{name}.png)" in text


def test_report_plots_are_valid_pngs(full_report):
    run_dir, _ = full_report
    for name in ("steps", "matrix", "partial_refresh", "lambda"):
        path = run_dir / "plots" / f"{name}.png"
        assert path.stat().st_size > 0
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
            image.verify()


def test_missing_optional_parts_are_skipped(tmp_path):
    results = results_3_steps()
    del results["matrix"], results["partial_refresh"]
    results["arms"], results["timings"] = None, {}  # null and empty count as absent
    run_dir = write_run(tmp_path / "run", results)
    text = write_report(run_dir).read_text()
    assert "a gain of +34.0 points" in text
    for heading in ("## Arms", "## Compatibility matrix", "## Partial refresh", "## λ search", "## Timings"):
        assert heading not in text
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == ["steps.png"]


def test_the_findings_say_so_when_forward_does_not_beat_backward(tmp_path):
    results = results_3_steps()
    results["steps"] = [step(2, 0.40, 0.60, 0.45, 0.42, 0.43, 0.40), step(3, 0.46, 0.68, 0.50, 0.47, 0.48, 0.43)]
    del results["matrix"], results["partial_refresh"]  # fewer plots to draw: this test reads the text
    text = write_report(write_run(tmp_path / "run", results)).read_text()
    assert "BiCT does **not** gain here: it is 2.0 points behind" in text
    assert ("Forward > backward did **not** hold at every step: it failed at t = 2 (43.0 vs 45.0), "
            "t = 3 (48.0 vs 50.0).") in text
    assert "Forward > old self held at every step" in text
    assert "held at every step" not in text.split("Forward > old self")[0]


def test_missing_or_unreadable_results_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"results\.json: not found"):
        write_report(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"results\.json: not valid JSON"):
        load_results(tmp_path)


@pytest.mark.parametrize("break_it, message", [
    (lambda r: r.pop("steps"), r"missing key 'steps'"),
    (lambda r: r["steps"][1]["tests"].pop("forward"), r"missing key 'steps\[1\]\.tests\.forward'"),
    (lambda r: r["steps"][0]["tests"]["backward"].update(mAP=33.3),
     r"'steps\[0\]\.tests\.backward\.mAP' must be a fraction"),
    (lambda r: r["steps"][0].update(step=2), r"step 2 appears twice"),
    (lambda r: r["matrix"]["mAP"].pop(), r"'matrix\.mAP' must be 3 rows"),
    (lambda r: r["arms"]["independent_psi"].pop("steps"), r"missing key 'arms\.independent_psi\.steps'"),
    (lambda r: r["arms"]["independent_psi"]["validation"]["steps"][0]["tests"].pop("forward"),
     r"missing key 'arms\.independent_psi\.validation\.steps\[0\]\.tests\.forward'"),
    (lambda r: r.update(steps=[]), r"'steps' is empty"),
])
def test_malformed_results_name_the_key(tmp_path, break_it, message):
    results = copy.deepcopy(results_3_steps())
    break_it(results)
    write_run(tmp_path, results)
    with pytest.raises(ValueError, match=message):
        write_report(tmp_path)


def test_trials_without_lam_name_the_file(tmp_path):
    write_run(tmp_path / "run", results_3_steps(), trials="trial_id,mean_forward_mAP\na,0.5\n")
    with pytest.raises(ValueError, match=r"trials\.csv: needs a 'lam' column"):
        write_report(tmp_path / "run")


def test_report_command_prints_the_table_and_the_path(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", results_3_steps())
    parser = argparse.ArgumentParser()
    report_cli.register(parser.add_subparsers())
    args = parser.parse_args(["report", str(run_dir)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "   3      45.9      68.3      33.3      40.1     67.3      45.9      +34.0" in out
    assert out.rstrip().endswith(f"report: {run_dir / 'report.md'}")
