"""Searching the backward-loss weight lambda (and friends) across whole upgrade sequences with Ray Tune.

One trial = one whole sequence phi_1 -> ... -> phi_T in its own run directory, reporting once per upgrade step,
so ASHA can stop a poor lambda after its first upgrade. The paper's point is that lambda drives *both* directions
(backward through BCT, forward through what psi can recover), so the objective defaults to the mean forward mAP
over the steps, with backward and new-self reported beside it.

Trial drivers are function trainables holding no CPU (``tune.with_resources(..., {"cpu": 0, "memory": ...})``):
a driver that held a CPU would starve its own Ray Train workers on a small machine, a silent hang (docs/RAY.md).

A search space is a YAML file (``tune_spaces/*.yaml``)::

    metric: mean_forward_mAP        # any metric reported below
    mode: max
    num_samples: 1                  # repeats of the grid / samples of the random space
    max_concurrent_trials: 2        # optional; default: what the cluster's CPUs allow
    params:                         # dotted config keys -> grid | choice | uniform | loguniform
      compat.lam: {grid: [0.0, 0.5, 1.0, 2.0]}
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # optional
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
# what a search may optimise: each test's mAP at the step just evaluated, its mean over the steps so far, its last
METRICS = tuple(f"{kind}{test}_mAP" for test in TESTS for kind in ("mean_", "last_", ""))
TRIAL_MEMORY_BYTES = 256 * 1024**2  # the driver's own footprint; its Train workers ask for their CPUs themselves


@dataclass
class SearchSpace:
    params: dict[str, dict[str, Any]]
    metric: str = "mean_forward_mAP"
    mode: str = "max"
    num_samples: int = 1
    max_concurrent_trials: int | None = None
    scheduler: dict[str, Any] | None = None
    name: str = "search"


def load_space(path: str | Path, base: Config) -> SearchSpace:
    """Read and check a search-space YAML (a path or a shipped preset's name) against the config it will override."""
    path = presets.resolve(path, "space")
    raw = yaml.safe_load(path.read_text()) or {}
    allowed = {"params", "metric", "mode", "num_samples", "max_concurrent_trials", "scheduler", "name"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in search space {path}; valid keys: "
                          f"{', '.join(sorted(allowed))}")
    space = SearchSpace(params=raw.get("params") or {}, metric=raw.get("metric", "mean_forward_mAP"),
                        mode=raw.get("mode", "max"), num_samples=int(raw.get("num_samples", 1)),
                        max_concurrent_trials=raw.get("max_concurrent_trials"), scheduler=raw.get("scheduler"),
                        name=raw.get("name", path.stem))
    if not space.params:
        raise ConfigError(f"search space {path} has no params")
    if space.metric not in METRICS:
        raise ConfigError(f"search space {path}: metric {space.metric!r} is not reported; choose one of "
                          f"{', '.join(METRICS)}")
    if space.mode not in ("max", "min"):
        raise ConfigError(f"search space {path}: mode must be max or min, got {space.mode!r}")
    for key, spec in space.params.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
            raise ConfigError(f"search space {path}: params.{key} must be one of "
                              f"{{{' | '.join(k + ': ...' for k in SEARCH_KINDS)}}}, got {spec!r}")
        for value in _sample_values(spec):  # every value the space can produce must make a valid config
            _trial_config(base, {key: value})
    if space.scheduler is not None and space.scheduler.get("type") != "asha":
        raise ConfigError(f"search space {path}: scheduler.type must be asha, got {space.scheduler.get('type')!r}")
    return space


def run_search(config: Config, space: SearchSpace, out: str | Path, *, resume: bool = False, log=print) -> dict:
    """Run (or with ``resume`` continue) the search; write trials.csv, best_config.json and lambda.png under out/tune."""
    import ray
    from ray import tune

    from bict_ray.distributed.cluster import ensure_ray

    if config.data.val_fraction == 0:
        raise ConfigError("a search selects on the validation set, and data.val_fraction is 0: set it above 0 "
                          "(selecting on the test split would report a number it was tuned on)")
    ensure_ray(config.ray)
    tune_dir = RunDir(out).path.resolve() / "tune"  # RunDir refuses a URI: it would become a local folder
    tune_dir.mkdir(parents=True, exist_ok=True)
    storage = tune_dir / "ray"
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=config.to_dict(), trials_dir=str(tune_dir / "trials")),
        {"cpu": 0, "memory": TRIAL_MEMORY_BYTES})
    if resume:
        if not tune.Tuner.can_restore(str(storage / space.name)):
            raise ConfigError(f"nothing to resume: no search named {space.name!r} under {storage}")
        log(f"[tune] resuming {storage / space.name}")
        tuner = tune.Tuner.restore(str(storage / space.name), trainable=trainable, resume_errored=True)
    else:
        if (storage / space.name).exists():
            raise ConfigError(f"{storage / space.name} already holds a search; use --resume, or another --out")
        concurrency = space.max_concurrent_trials or _default_concurrency(config, ray.cluster_resources())
        log(f"[tune] {space.name}: {_describe(space)}; objective {space.mode} {space.metric}; "
            f"{concurrency} trial(s) at a time")
        tuner = tune.Tuner(
            trainable, param_space={k: _tune_domain(v) for k, v in space.params.items()},
            tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, num_samples=space.num_samples,
                                        max_concurrent_trials=concurrency,
                                        scheduler=_scheduler(space, config)),
            run_config=tune.RunConfig(name=space.name, storage_path=str(storage), verbose=1))
    grid = tuner.fit()
    summary = _summarise(grid, space, tune_dir, log)
    return _test_best(config, summary, tune_dir, log)


def _trial(params: dict[str, Any], base: dict[str, Any], trials_dir: str) -> None:
    """One Tune trial: a whole sequence, reporting after every upgrade step."""
    from ray import tune

    from bict_ray.pipeline.sequence import run_sequence

    # a trial selects: it is evaluated on validation only, and never extracts or upgrades the test gallery
    config = _trial_config(from_dict(Config, copy.deepcopy(base)), {**params, "eval.test": False})
    trial_dir = Path(trials_dir) / tune.get_context().get_trial_id()
    history: list[dict] = []

    def on_step(step: int, tests: dict) -> None:
        history.append({name: result["mAP"] for name, result in tests.items()})
        tune.report(_step_metrics(step, history))

    run_sequence(config, trial_dir, on_step=on_step, log=lambda line: print(f"[trial {trial_dir.name}] {line}"))


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


def _summarise(grid, space: SearchSpace, tune_dir: Path, log) -> dict:
    import pandas as pd

    from bict_ray.pipeline.report import plot_lambda_search

    rows = []
    for result in grid:
        if result.metrics is None:
            continue
        row = {"trial_id": result.metrics.get("trial_id", Path(result.path).name)}
        row.update({_column(k): v for k, v in result.config.items()})
        row.update({k: result.metrics.get(k) for k in METRICS if k in result.metrics})
        row["steps_reported"] = result.metrics.get("training_iteration")
        row["error"] = str(result.error).splitlines()[0] if result.error else ""
        rows.append(row)
    if not rows:
        raise RuntimeError(f"no trial of {space.name} reported a result; see the logs under {tune_dir / 'ray'}")
    trials = pd.DataFrame(rows).sort_values("lam" if "lam" in rows[0] else "trial_id")
    trials.to_csv(tune_dir / "trials.csv", index=False)
    best = grid.get_best_result(metric=space.metric, mode=space.mode, filter_nan_and_inf=True)
    summary = {"metric": space.metric, "mode": space.mode, "best_params": best.config,
               "best_value": best.metrics.get(space.metric), "best_trial": best.metrics.get("trial_id"),
               "best_run_dir": str(tune_dir / "trials" / str(best.metrics.get("trial_id"))),
               "trials": len(rows)}
    if "lam" in trials.columns:
        plot_lambda_search(tune_dir / "trials.csv", tune_dir / "lambda.png")
    log(f"[tune] {len(rows)} trials; best {space.metric} = {summary['best_value']:.4f} with {best.config}")
    log(f"[tune] trials: {tune_dir / 'trials.csv'}")
    return summary


def _test_best(config: Config, summary: dict, tune_dir: Path, log) -> dict:
    """The selected configuration on the test split, once, after the selection: its trial resumed (the models and
    transforms it trained are reused) with the test evaluation on. Writes both beside each other into
    best_config.json, with ``selected_on``."""
    from bict_ray.pipeline.sequence import run_sequence

    best = _trial_config(config, summary["best_params"])
    log(f"[tune] testing the selected configuration {summary['best_params']} once, in {summary['best_run_dir']}")
    results = run_sequence(best, summary["best_run_dir"], log=lambda line: log(f"[best] {line}"))
    summary = {**summary, "selected_on": "validation", "validation": results["validation"]["steps"],
               "test": results["steps"]}
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
