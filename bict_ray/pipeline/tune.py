"""Searching the backward-loss weight lambda (and friends) across whole upgrade sequences with Ray Tune.

One trial = one whole sequence phi_1 -> ... -> phi_T in its own run directory, reporting once per upgrade step,
so ASHA can stop a poor lambda after its first upgrade. The paper's point is that lambda drives *both* directions
(backward through BCT, forward through what psi can recover), so the objective defaults to the mean forward mAP
over the steps, with backward and new-self reported beside it.

Trial drivers are function trainables holding no CPU (``tune.with_resources(..., {"cpu": 0, "memory": ...})``):
a driver that held a CPU would starve its own Ray Train workers on a small machine, a silent hang (docs/RAY.md).

A search space is a YAML file (``tune_spaces/*.yaml``)::

    searcher: grid                  # optional; grid (Tune's variant generator, the default) or optuna
    metric: mean_forward_mAP        # any metric reported below
    mode: max
    num_samples: 1                  # repeats of the grid / samples of the random space
    max_concurrent_trials: 2        # optional; default: what the cluster's CPUs allow
    params:                         # dotted config keys -> grid | choice | uniform | loguniform
      compat.lam: {grid: [0.0, 0.5, 1.0, 2.0]}
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # optional

or, a multi-objective search with Optuna's TPE sampler (Ray Tune's ``OptunaSearch``)::

    searcher: optuna
    seed: 0                         # optional; the sampler's seed, so that the search is reproducible
    metric: [mean_backward_mAP, mean_forward_mAP]   # two or more objectives ...
    mode: [max, max]                                # ... and one mode each
    num_samples: 12                 # trials the sampler proposes
    params:                         # Optuna samples: choice | uniform | loguniform, no grid
      compat.lam: {loguniform: [0.03, 10.0]}

A multi-objective search selects the Pareto front on validation (:func:`pareto_front`), tests each front
configuration once, and keeps ``best_*`` on the front trial best on the first objective; ASHA is refused there
(it stops trials on one metric).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bict_ray import presets
from bict_ray.config import Config, ConfigError, apply_override, from_dict
from bict_ray.retrieval.protocol import TESTS
from bict_ray.storage.rundir import RunDir

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform")
SEARCHERS = ("grid", "optuna")  # grid: Tune's basic variant generator; optuna: Tune's OptunaSearch (TPE)
# what a search may optimise: each test's mAP at the step just evaluated, its mean over the steps so far, its last
METRICS = tuple(f"{kind}{test}_mAP" for test in TESTS for kind in ("mean_", "last_", ""))
TRIAL_MEMORY_BYTES = 256 * 1024**2  # the driver's own footprint; its Train workers ask for their CPUs themselves


@dataclass
class SearchSpace:
    params: dict[str, dict[str, Any]]
    metric: str | list[str] = "mean_forward_mAP"  # a list (with searcher optuna): a multi-objective search
    mode: str | list[str] = "max"  # one per metric when metric is a list
    num_samples: int = 1
    max_concurrent_trials: int | None = None
    scheduler: dict[str, Any] | None = None
    name: str = "search"
    searcher: str = "grid"
    seed: int = 0  # the Optuna sampler's seed

    @property
    def multi_objective(self) -> bool:
        return isinstance(self.metric, list)

    @property
    def objectives(self) -> list[str]:
        return list(self.metric) if self.multi_objective else [self.metric]

    @property
    def modes(self) -> list[str]:
        return list(self.mode) if isinstance(self.mode, list) else [self.mode]


def load_space(path: str | Path, base: Config) -> SearchSpace:
    """Read and check a search-space YAML (a path or a shipped preset's name) against the config it will override."""
    path = presets.resolve(path, "space")
    raw = yaml.safe_load(path.read_text()) or {}
    allowed = {"params", "metric", "mode", "num_samples", "max_concurrent_trials", "scheduler", "name", "searcher",
               "seed"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in search space {path}; valid keys: "
                          f"{', '.join(sorted(allowed))}")
    searcher = raw.get("searcher", "grid")
    if searcher not in SEARCHERS:
        raise ConfigError(f"search space {path}: searcher must be one of {', '.join(SEARCHERS)}, got {searcher!r}")
    seed = raw.get("seed", 0)
    if "seed" in raw and searcher != "optuna":
        raise ConfigError(f"search space {path}: seed is the Optuna sampler's seed and needs searcher: optuna "
                          f"(searcher is {searcher})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"search space {path}: seed must be an integer >= 0, got {seed!r}")
    space = SearchSpace(params=raw.get("params") or {}, metric=raw.get("metric", "mean_forward_mAP"),
                        mode=raw.get("mode", "max"), num_samples=int(raw.get("num_samples", 1)),
                        max_concurrent_trials=raw.get("max_concurrent_trials"), scheduler=raw.get("scheduler"),
                        name=raw.get("name", path.stem), searcher=searcher, seed=seed)
    if not space.params:
        raise ConfigError(f"search space {path} has no params")
    _check_objectives(space, path)
    for key, spec in space.params.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
            raise ConfigError(f"search space {path}: params.{key} must be one of "
                              f"{{{' | '.join(k + ': ...' for k in SEARCH_KINDS)}}}, got {spec!r}")
        if searcher == "optuna" and "grid" in spec:
            raise ConfigError(f"search space {path}: params.{key} is a grid, and searcher optuna samples its "
                              f"points: give it as choice, uniform or loguniform (or use searcher: grid)")
        for value in _sample_values(spec):  # every value the space can produce must make a valid config
            _trial_config(base, {key: value})
    if space.scheduler is not None and space.scheduler.get("type") != "asha":
        raise ConfigError(f"search space {path}: scheduler.type must be asha, got {space.scheduler.get('type')!r}")
    if space.scheduler is not None and space.multi_objective:
        raise ConfigError(f"search space {path}: scheduler asha stops trials on one metric, and metric is a list "
                          f"(a multi-objective search): remove the scheduler, or give one metric")
    return space


def _check_objectives(space: SearchSpace, path: Path) -> None:
    """metric and mode: one of each, or (searcher optuna only) two lists of the same length."""
    metric, mode = space.metric, space.mode
    if isinstance(metric, list):
        if space.searcher != "optuna":
            raise ConfigError(f"search space {path}: metric is a list {metric!r} (a multi-objective search), which "
                              f"needs searcher: optuna (searcher is {space.searcher})")
        if len(metric) < 2:
            raise ConfigError(f"search space {path}: metric as a list needs two or more objectives, got {metric!r}; "
                              f"give one metric as a string")
        if not isinstance(mode, list):
            raise ConfigError(f"search space {path}: metric is a list of {len(metric)}, so mode must be a list of "
                              f"{len(metric)} too (max or min for each), got {mode!r}")
        if len(mode) != len(metric):
            raise ConfigError(f"search space {path}: metric and mode must be lists of the same length, got "
                              f"{len(metric)} metric(s) and {len(mode)} mode(s)")
        if len(set(map(str, metric))) != len(metric):
            raise ConfigError(f"search space {path}: metric names an objective twice: {metric!r}")
    elif isinstance(mode, list):
        raise ConfigError(f"search space {path}: mode is a list {mode!r} but metric {metric!r} is one; give one "
                          f"mode, or a list of metrics with searcher: optuna")
    for index, name in enumerate(space.objectives):
        where = f"metric[{index}]" if space.multi_objective else "metric"
        if name not in METRICS:
            raise ConfigError(f"search space {path}: {where} {name!r} is not reported; choose one of "
                              f"{', '.join(METRICS)}")
    for index, value in enumerate(space.modes):
        where = f"mode[{index}]" if space.multi_objective else "mode"
        if value not in ("max", "min"):
            raise ConfigError(f"search space {path}: {where} must be max or min, got {value!r}")


def run_search(config: Config, space: SearchSpace, out: str | Path, *, resume: bool = False, log=print) -> dict:
    """Run (or with ``resume`` continue) the search; write trials.csv, best_config.json and lambda.png under out/tune
    (and, for a multi-objective search of two objectives, pareto.png)."""
    import ray
    from ray import tune

    from bict_ray.distributed.cluster import ensure_ray

    if config.data.val_fraction == 0:
        raise ConfigError("a search selects on the validation set, and data.val_fraction is 0: set it above 0 "
                          "(selecting on the test split would report a number it was tuned on)")
    ensure_ray(config.ray)
    run = RunDir(out)
    # the summary files (trials.csv, the plots, best_config.json) in the run directory, or its mirror for a run on
    # object storage; Tune's own storage and every trial's run directory in the store itself, where the trials
    # write them from whatever node they run on
    tune_dir = run.path.resolve() / "tune"
    tune_dir.mkdir(parents=True, exist_ok=True)
    base = run.uri or str(run.path.resolve())
    storage, trials = f"{base}/tune/ray", f"{base}/tune/trials"
    experiment = f"{storage}/{space.name}"
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=config.to_dict(), trials_dir=trials),
        {"cpu": 0, "memory": TRIAL_MEMORY_BYTES})
    if resume:
        if not tune.Tuner.can_restore(experiment):
            raise ConfigError(f"nothing to resume: no search named {space.name!r} under {storage}")
        log(f"[tune] resuming {experiment}")
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    else:
        if _exists(experiment):
            raise ConfigError(f"{experiment} already holds a search; use --resume, or another --out")
        concurrency = space.max_concurrent_trials or _default_concurrency(config, ray.cluster_resources())
        objective = ", ".join(f"{mode} {metric}" for metric, mode in zip(space.objectives, space.modes))
        log(f"[tune] {space.name}: {_describe(space)}; {space.searcher} searcher; "
            f"objective{'s' if space.multi_objective else ''} {objective}; {concurrency} trial(s) at a time")
        # TuneConfig takes one metric: a multi-objective search gives its list to the searcher alone
        metric, mode = (None, None) if space.multi_objective else (space.metric, space.mode)
        tuner = tune.Tuner(
            trainable, param_space={k: _tune_domain(v) for k, v in space.params.items()},
            tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=space.num_samples,
                                        max_concurrent_trials=concurrency, search_alg=_search_alg(space),
                                        scheduler=_scheduler(space, config)),
            run_config=tune.RunConfig(name=space.name, storage_path=str(storage), verbose=1))
    grid = tuner.fit()
    summary = _summarise(grid, space, tune_dir, trials, log)
    run.sync()
    summary = _test_best(config, summary, tune_dir, log)
    run.sync()  # best_config.json last, as it is written last: its presence means the search is complete
    return summary


def _exists(path: str) -> bool:
    """Whether a local path or a URI (s3://...) names anything."""
    import pyarrow.fs as pafs

    filesystem, inside = pafs.FileSystem.from_uri(path)
    return filesystem.get_file_info(inside).type != pafs.FileType.NotFound


def _search_alg(space: SearchSpace):
    """None (Tune's basic variant generator: grids, random samples) or Optuna's TPE through Tune's OptunaSearch,
    which takes a list of metrics and modes for a multi-objective search."""
    if space.searcher != "optuna":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=space.metric, mode=space.mode, seed=space.seed)


def _trial(params: dict[str, Any], base: dict[str, Any], trials_dir: str) -> None:
    """One Tune trial: a whole sequence, reporting after every upgrade step."""
    from ray import tune

    from bict_ray.pipeline.sequence import run_sequence

    # a trial selects: it is evaluated on validation only, and never extracts or upgrades the test gallery
    config = _trial_config(from_dict(Config, copy.deepcopy(base)), {**params, "eval.test": False})
    trial_dir = f"{trials_dir}/{tune.get_context().get_trial_id()}"  # a path, or a URI: its own mirror
    history: list[dict] = []

    def on_step(step: int, tests: dict) -> None:
        history.append({name: result["mAP"] for name, result in tests.items()})
        tune.report(_step_metrics(step, history))

    name = trial_dir.rsplit("/", 1)[-1]
    run_sequence(config, trial_dir, on_step=on_step, log=lambda line: print(f"[trial {name}] {line}"))


def _step_metrics(step: int, history: list[dict]) -> dict[str, float]:
    """What a trial reports after step ``step``: this step's mAPs and their means over the steps so far."""
    last = history[-1]
    metrics: dict[str, float] = {"step": step}
    for name in TESTS:
        values = [h[name] for h in history if name in h]
        if values:
            metrics[f"{name}_mAP"] = last.get(name, math.nan)
            metrics[f"mean_{name}_mAP"] = sum(values) / len(values)
            metrics[f"last_{name}_mAP"] = values[-1]
    return metrics


def _trial_config(base: Config, params: dict[str, Any]) -> Config:
    """A trial's config: the base with the trial's parameters, and no arms (a trial selects lambda; arms compare)."""
    raw = {**base.to_dict(), "arms": []}
    for key, value in params.items():
        apply_override(raw, f"{key}={json.dumps(value)}")
    return from_dict(Config, raw)


def _summarise(grid, space: SearchSpace, tune_dir: Path, trials_dir: str, log) -> dict:
    import pandas as pd

    from bict_ray.pipeline.report import plot_lambda_search

    rows, configs = [], {}
    for result in grid:
        if result.metrics is None:
            continue
        row = {"trial_id": result.metrics.get("trial_id", Path(result.path).name)}
        configs[row["trial_id"]] = result.config
        row.update({_column(k): v for k, v in result.config.items()})
        row.update({k: result.metrics.get(k) for k in METRICS if k in result.metrics})
        row["steps_reported"] = result.metrics.get("training_iteration")
        row["error"] = str(result.error).splitlines()[0] if result.error else ""
        rows.append(row)
    if not rows:
        raise RuntimeError(f"no trial of {space.name} reported a result; see the logs under {tune_dir / 'ray'}")
    trials = pd.DataFrame(rows).sort_values("lam" if "lam" in rows[0] else "trial_id")
    trials.to_csv(tune_dir / "trials.csv", index=False)
    if "lam" in trials.columns:
        plot_lambda_search(tune_dir / "trials.csv", tune_dir / "lambda.png")
    if space.multi_objective:
        return _summarise_front(trials.to_dict("records"), configs, space, tune_dir, trials_dir, log)
    best = grid.get_best_result(metric=space.metric, mode=space.mode, filter_nan_and_inf=True)
    summary = {"metric": space.metric, "mode": space.mode, "best_params": best.config,
               "best_value": best.metrics.get(space.metric), "best_trial": best.metrics.get("trial_id"),
               "best_run_dir": f"{trials_dir}/{best.metrics.get('trial_id')}",
               "trials": len(rows)}
    log(f"[tune] {len(rows)} trials; best {space.metric} = {summary['best_value']:.4f} with {best.config}")
    log(f"[tune] trials: {tune_dir / 'trials.csv'}")
    return summary


def pareto_front(rows: list[dict], objectives: list[str], modes: list[str]) -> list[dict]:
    """The rows on the Pareto front of ``objectives`` (each maximised or minimised as its mode in ``modes`` says), in
    the order given.

    A row is on the front when no other row is at least as good on every objective and strictly better on one; two
    rows equal on every objective are both on it. A row missing an objective, or with a NaN or infinite value for
    one, takes no part (it neither is on the front nor dominates)."""
    if len(objectives) != len(modes) or not objectives:
        raise ValueError(f"one mode per objective: {len(objectives)} objective(s), {len(modes)} mode(s)")
    if any(mode not in ("max", "min") for mode in modes):
        raise ValueError(f"modes must be max or min, got {modes!r}")

    def point(row: dict) -> tuple[float, ...] | None:
        values = []
        for metric, mode in zip(objectives, modes):
            value = row.get(metric)
            try:
                value = float(value)
            except (TypeError, ValueError):
                return None
            if not math.isfinite(value):
                return None
            values.append(value if mode == "max" else -value)  # larger is better from here on
        return tuple(values)

    scored = [(row, p) for row in rows if (p := point(row)) is not None]
    return [row for row, p in scored
            if not any(all(a >= b for a, b in zip(q, p)) and any(a > b for a, b in zip(q, p)) for _, q in scored)]


def _summarise_front(rows: list[dict], configs: dict[str, dict], space: SearchSpace, tune_dir: Path,
                     trials_dir: str, log) -> dict:
    """The summary of a multi-objective search: its Pareto front on validation, best first on the first objective;
    ``best_*`` name the front trial best on the first objective (the first of them on a tie)."""
    objectives, modes = space.objectives, space.modes
    front = pareto_front(rows, objectives, modes)
    if not front:
        raise RuntimeError(f"no trial of {space.name} reported a finite value for every objective "
                           f"({', '.join(objectives)}); see the logs under {tune_dir / 'ray'}")
    sign = 1.0 if modes[0] == "max" else -1.0
    front = sorted(front, key=lambda row: -sign * float(row[objectives[0]]))  # stable: trial order on a tie
    pareto = [{"trial_id": row["trial_id"], "params": configs[row["trial_id"]],
               "run_dir": f"{trials_dir}/{row['trial_id']}",
               "scores": {"validation": {metric: float(row[metric]) for metric in objectives}}} for row in front]
    best = pareto[0]
    summary = {"metric": objectives[0], "mode": modes[0], "objectives": objectives, "modes": modes,
               "best_params": best["params"], "best_value": best["scores"]["validation"][objectives[0]],
               "best_trial": best["trial_id"], "best_run_dir": best["run_dir"], "trials": len(rows),
               "pareto": pareto}
    log(f"[tune] {len(rows)} trials; {len(pareto)} on the Pareto front of {', '.join(objectives)} (validation):")
    for entry in pareto:
        values = ", ".join(f"{metric} {value:.4f}" for metric, value in entry["scores"]["validation"].items())
        log(f"[tune]   {entry['trial_id']}: {values} with {entry['params']}")
    log(f"[tune] trials: {tune_dir / 'trials.csv'}")
    return summary


def _test_best(config: Config, summary: dict, tune_dir: Path, log) -> dict:
    """The selected configuration on the test split, once, after the selection: its trial resumed (the models and
    transforms it trained are reused) with the test evaluation on. Writes both beside each other into
    best_config.json, with ``selected_on``. After a multi-objective search, every configuration on the front (chosen
    on validation alone) is tested once so, and each ``pareto`` entry gets its ``validation`` and ``test`` steps and
    its objectives on test beside those on validation (``scores``); test only reports."""
    from bict_ray.pipeline.sequence import run_sequence

    if "pareto" in summary:
        return _test_front(config, summary, tune_dir, log)
    best = _trial_config(config, summary["best_params"])
    log(f"[tune] testing the selected configuration {summary['best_params']} once, in {summary['best_run_dir']}")
    results = run_sequence(best, summary["best_run_dir"], log=lambda line: log(f"[best] {line}"))
    summary = {**summary, "selected_on": "validation", "validation": results["validation"]["steps"],
               "test": results["steps"]}
    return _write_best(summary, tune_dir, log)


def _test_front(config: Config, summary: dict, tune_dir: Path, log) -> dict:
    from bict_ray.pipeline.report import plot_pareto
    from bict_ray.pipeline.sequence import run_sequence

    pareto = []
    for entry in summary["pareto"]:
        log(f"[tune] testing front configuration {entry['params']} once, in {entry['run_dir']}")
        results = run_sequence(_trial_config(config, entry["params"]), entry["run_dir"],
                               log=lambda line, trial=entry["trial_id"]: log(f"[front {trial}] {line}"))
        tested = _objectives_of(results["steps"], summary["objectives"])
        pareto.append({**entry, "scores": {**entry["scores"], "test": tested},
                       "validation": results["validation"]["steps"], "test": results["steps"]})
    best = pareto[0]  # the front trial best on the first objective
    summary = {**summary, "pareto": pareto, "selected_on": "validation", "validation": best["validation"],
               "test": best["test"]}
    if len(summary["objectives"]) == 2:
        plot_pareto(tune_dir / "trials.csv", summary, tune_dir / "pareto.png")
    else:
        log(f"[tune] no pareto.png: the plot draws two objectives, this search has {len(summary['objectives'])}")
    return _write_best(summary, tune_dir, log)


def _objectives_of(steps: list[dict], objectives: list[str]) -> dict[str, float | None]:
    """The objectives computed from a run's steps as a trial computes them from its reports (_step_metrics)."""
    ordered = sorted(steps, key=lambda entry: entry["step"])
    if not ordered:
        return {}
    history = [{name: scores["mAP"] for name, scores in entry["tests"].items()} for entry in ordered]
    metrics = _step_metrics(ordered[-1]["step"], history)
    return {metric: metrics.get(metric) for metric in objectives}  # None: a test the run did not evaluate


def _write_best(summary: dict, tune_dir: Path, log) -> dict:
    # written last: its presence means the search and the selected configuration's test are complete
    (tune_dir / "best_config.json").write_text(json.dumps(summary, indent=2))
    log(f"[tune] best: {tune_dir / 'best_config.json'}")
    return summary


def _column(key: str) -> str:
    """Config keys as trials.csv columns: compat.lam -> lam, compat.loss -> compat_loss, other.key -> other_key."""
    return {"compat.lam": "lam", "compat.loss": "compat_loss"}.get(key, key.replace(".", "_"))


def _tune_domain(spec: dict[str, Any]):
    from ray import tune

    kind, value = next(iter(spec.items()))
    if kind == "grid":
        return tune.grid_search(list(value))
    if kind == "choice":
        return tune.choice(list(value))
    if kind == "uniform":
        return tune.uniform(*value)
    return tune.loguniform(*value)


def _sample_values(spec: dict[str, Any]) -> list:
    kind, value = next(iter(spec.items()))
    if kind in ("grid", "choice"):
        if not isinstance(value, list) or not value:
            raise ConfigError(f"a {kind} needs a non-empty list, got {value!r}")
        return value
    if not isinstance(value, list) or len(value) != 2 or not value[0] < value[1]:
        raise ConfigError(f"a {kind} needs [low, high] with low < high, got {value!r}")
    if kind == "loguniform" and value[0] <= 0:
        raise ConfigError(f"a loguniform needs low > 0, got {value!r}")
    return [float(v) for v in value]


def _scheduler(space: SearchSpace, config: Config):
    if not space.scheduler:
        return None
    from ray.tune.schedulers import ASHAScheduler

    options = {k: v for k, v in space.scheduler.items() if k != "type"}
    return ASHAScheduler(time_attr="training_iteration", max_t=config.scenario.steps - 1,
                         grace_period=options.get("grace_period", 1),
                         reduction_factor=options.get("reduction_factor", 2))


def _default_concurrency(config: Config, resources: dict) -> int:
    """As many trials as can each run their Train workers at once (at least 1)."""
    per_trial = config.train.num_workers * config.train.cpus_per_worker
    return max(1, int(resources.get("CPU", 1) // per_trial))


def _describe(space: SearchSpace) -> str:
    return ", ".join(f"{k} {next(iter(v))} {next(iter(v.values()))}" for k, v in space.params.items())
