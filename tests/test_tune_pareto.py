"""The multi-objective search: the Pareto front by hand, the search-space checks, and one small Optuna search on the
smoke preset whose front is tested once and plotted."""

import json
import math

import pandas as pd
import pytest
from PIL import Image

from bict_ray.config import ConfigError, load_config
from bict_ray.pipeline.tune import load_space, pareto_front

BOTH = ["mean_backward_mAP", "mean_forward_mAP"]


def ids(rows):
    return [row["trial_id"] for row in rows]


def test_pareto_front_by_hand():
    rows = [{"trial_id": "a", "b": 0.9, "f": 0.1},
            {"trial_id": "b", "b": 0.5, "f": 0.5},
            {"trial_id": "c", "b": 0.4, "f": 0.4},    # dominated by b on both
            {"trial_id": "d", "b": 0.5, "f": 0.5},    # ties b exactly: neither dominates, both on the front
            {"trial_id": "e", "b": 0.5, "f": 0.3},    # as good as b on one, worse on the other: dominated
            {"trial_id": "f", "b": math.nan, "f": 0.99},  # NaN: ignored, dominates nothing
            {"trial_id": "g", "b": None, "f": 0.99},
            {"trial_id": "h", "f": 0.99},             # missing an objective
            {"trial_id": "i", "b": 0.1, "f": 0.8}]
    assert ids(pareto_front(rows, ["b", "f"], ["max", "max"])) == ["a", "b", "d", "i"]
    # one objective minimised: small f is good now
    assert ids(pareto_front(rows, ["b", "f"], ["max", "min"])) == ["a"]
    assert ids(pareto_front(rows, ["b", "f"], ["min", "min"])) == ["a", "c", "e", "i"]
    # only the objectives asked for count: on f alone, the rows missing b take part, tied at the top
    assert ids(pareto_front(rows, ["f"], ["max"])) == ["f", "g", "h"]
    assert pareto_front([{"trial_id": "x", "b": math.nan, "f": math.nan}], ["b", "f"], ["max", "max"]) == []
    assert pareto_front([], ["b", "f"], ["max", "max"]) == []
    with pytest.raises(ValueError, match="one mode per objective"):
        pareto_front(rows, ["b", "f"], ["max"])
    with pytest.raises(ValueError, match="max or min"):
        pareto_front(rows, ["b", "f"], ["max", "up"])


@pytest.mark.parametrize("text, match", [
    ("metric: [mean_backward_mAP, mean_forward_mAP]\nmode: [max, max]\nparams:\n  compat.lam: {choice: [0.0, 1.0]}\n",
     r"space\.yaml: metric is a list .* needs searcher: optuna"),
    ("searcher: optuna\nmetric: [mean_backward_mAP, mean_forward_mAP]\nmode: [max]\n"
     "params:\n  compat.lam: {choice: [0.0, 1.0]}\n",
     r"space\.yaml: metric and mode must be lists of the same length, got 2 metric\(s\) and 1 mode\(s\)"),
    ("searcher: optuna\nmetric: [mean_backward_mAP, mean_forward_mAP]\nmode: max\n"
     "params:\n  compat.lam: {choice: [0.0, 1.0]}\n",
     r"space\.yaml: metric is a list of 2, so mode must be a list of 2 too"),
    ("searcher: optuna\nmetric: [mean_backward_mAP, mean_froward_mAP]\nmode: [max, max]\n"
     "params:\n  compat.lam: {choice: [0.0, 1.0]}\n",
     r"space\.yaml: metric\[1\] 'mean_froward_mAP' is not reported"),
    ("searcher: optuna\nmetric: [mean_backward_mAP, mean_forward_mAP]\nmode: [max, down]\n"
     "params:\n  compat.lam: {choice: [0.0, 1.0]}\n",
     r"space\.yaml: mode\[1\] must be max or min, got 'down'"),
    ("searcher: optuna\nmetric: [mean_forward_mAP]\nmode: [max]\nparams:\n  compat.lam: {choice: [0.0, 1.0]}\n",
     r"space\.yaml: metric as a list needs two or more objectives"),
    ("searcher: optuna\nparams:\n  compat.lam: {grid: [0.0, 1.0]}\n",
     r"space\.yaml: params\.compat\.lam is a grid, and searcher optuna samples .* choice, uniform or loguniform"),
    ("searcher: optuna\nmetric: [mean_backward_mAP, mean_forward_mAP]\nmode: [max, max]\n"
     "params:\n  compat.lam: {loguniform: [0.1, 10.0]}\nscheduler: {type: asha}\n",
     r"space\.yaml: scheduler asha stops trials on one metric, and metric is a list"),
    ("searcher: tpe\nparams:\n  compat.lam: {choice: [0.0, 1.0]}\n",
     r"space\.yaml: searcher must be one of grid, optuna, got 'tpe'"),
    ("seed: 3\nparams:\n  compat.lam: {grid: [0.0, 1.0]}\n",
     r"space\.yaml: seed is the Optuna sampler's seed and needs searcher: optuna"),
    ("searcher: optuna\nseed: -1\nparams:\n  compat.lam: {choice: [0.0, 1.0]}\n",
     r"space\.yaml: seed must be an integer >= 0"),
])
def test_bad_multi_objective_space_is_named(smoke_config, tmp_path, text, match):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_space(space_file, smoke_config)


def test_optuna_spaces_that_load(smoke_config, tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text("searcher: optuna\nmetric: [mean_backward_mAP, mean_forward_mAP]\nmode: [max, min]\n"
                          "params:\n  compat.lam: {uniform: [0.0, 2.0]}\n")
    space = load_space(space_file, smoke_config)
    assert space.multi_objective and space.objectives == BOTH and space.modes == ["max", "min"] and space.seed == 0
    # single-objective Optuna, with ASHA, as the grid searcher takes it
    space_file.write_text("searcher: optuna\nseed: 7\nparams:\n  compat.lam: {loguniform: [0.1, 10.0]}\n"
                          "scheduler: {type: asha}\n")
    space = load_space(space_file, smoke_config)
    assert not space.multi_objective and space.objectives == ["mean_forward_mAP"] and space.seed == 7
    for config in (smoke_config, load_config("configs/demo.yaml")):
        shipped = load_space("tune_spaces/lambda_pareto.yaml", config)
        assert shipped.searcher == "optuna" and shipped.objectives == BOTH and shipped.num_samples == 12


def dominated(point, rows, modes):
    better = [(lambda a, b: a >= b) if mode == "max" else (lambda a, b: a <= b) for mode in modes]
    strictly = [(lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b) for mode in modes]
    return any(all(f(r, p) for f, r, p in zip(better, row, point)) and
               any(f(r, p) for f, r, p in zip(strictly, row, point)) for row in rows)


def test_multi_objective_search_tests_and_plots_its_front(ray_session, tmp_path):
    from bict_ray.pipeline.tune import run_search

    space_file = tmp_path / "space.yaml"
    space_file.write_text("name: mo\nsearcher: optuna\nnum_samples: 3\nmax_concurrent_trials: 2\n"
                          "metric: [mean_backward_mAP, mean_forward_mAP]\nmode: [max, max]\n"
                          "params:\n  compat.lam: {uniform: [0.0, 2.0]}\n")
    config = load_config("configs/smoke.yaml", ["train.epochs=1", "transform.epochs=1", "eval.matrix=false",
                                                "eval.partial_refresh=[]", "data.limit_train=400"])
    summary = run_search(config, load_space(space_file, config), tmp_path / "out", log=lambda line: None)
    tune_dir = tmp_path / "out" / "tune"
    trials = pd.read_csv(tune_dir / "trials.csv")
    assert len(trials) == 3 and trials["lam"].between(0.0, 2.0).all()
    best = json.loads((tune_dir / "best_config.json").read_text())
    assert best == summary and best["selected_on"] == "validation"
    assert best["objectives"] == BOTH and best["modes"] == ["max", "max"] and best["trials"] == 3
    pareto = best["pareto"]
    assert pareto
    points = trials[BOTH].to_numpy().tolist()
    front = {entry["trial_id"] for entry in pareto}
    for entry in pareto:
        chosen = trials.set_index("trial_id").loc[entry["trial_id"]]
        assert entry["scores"]["validation"] == pytest.approx({m: chosen[m] for m in BOTH})
        assert not dominated([chosen[m] for m in BOTH], points, ["max", "max"])
        assert entry["params"]["compat.lam"] == pytest.approx(chosen["lam"])
    # every trial off the front is dominated by one on it: the front is complete
    for _, row in trials[~trials["trial_id"].isin(front)].iterrows():
        assert dominated([row[m] for m in BOTH], [[e["scores"]["validation"][m] for m in BOTH] for e in pareto],
                         ["max", "max"])
    # best_* keep naming one configuration: the front's best on the first objective
    assert best["best_trial"] == pareto[0]["trial_id"] and best["best_params"] == pareto[0]["params"]
    assert best["best_value"] == pytest.approx(max(e["scores"]["validation"][BOTH[0]] for e in pareto))
    assert best["metric"] == BOTH[0] and best["test"] == pareto[0]["test"]
    # each front configuration tested once, after the selection; the others never touched the test split
    for entry in pareto:
        tested = json.loads((tune_dir / "trials" / entry["trial_id"] / "results.json").read_text())
        assert entry["test"] == tested["steps"] and len(entry["test"]) == 1
        assert entry["validation"] == tested["validation"]["steps"]
        (step,) = entry["test"]
        assert entry["scores"]["test"] == pytest.approx({"mean_backward_mAP": step["tests"]["backward"]["mAP"],
                                                         "mean_forward_mAP": step["tests"]["forward"]["mAP"]})
    for trial in trials["trial_id"]:
        assert (tune_dir / "trials" / trial / "gallery").exists() == (trial in front), trial
    with Image.open(tune_dir / "pareto.png") as image:
        assert image.size[0] > 100
    # Tuner.restore with the Optuna searcher: the finished search reads back the same trials, front and scores
    again = run_search(config, load_space(space_file, config), tmp_path / "out", resume=True, log=lambda line: None)
    assert again == summary
