"""The λ study: does the backward-loss weight drive both directions, and does that depend on ψ's training budget?

The paper's headline is that "the inconspicuous loss weight of backward compatibility plays an essential role for
both backward and forward retrieval". This measures it: λ × training seed × ψ budget as one Ray Tune grid search,
each trial a whole upgrade sequence, selected on validation and reported on test (docs/EXPERIMENTS.md).

    OUT/bases/seed_<s>/     phi_1, gallery v1 and the splits for train.seed = s: trained once, read by every trial
                            of that seed (λ and ψ's budget change nothing before phi_2)
    OUT/trials/<trial>/     one run directory per (λ, seed, ψ budget), e.g. lam_0.3-seed_1-psi_1x8, resumable
    OUT/tune/               Ray Tune's own state (a rerun resumes the search)
    OUT/study.json          per ψ budget and λ: mean, std and 95% interval over the seeds of every test, on
                            validation and on test; the λ selected on validation, and its test scores
    OUT/lambda_study.csv    the same as rows (budget, λ, split, test, mean, std, ...)
    OUT/lambda_study.png    backward, backward prev, forward, new self and old self on test against λ, with error bars
    OUT/lambda_study.md     the tables

Scores of a trial are averaged over its upgrade steps t = 2..T first (one number per seed), then summarised over the
seeds. Each trial is evaluated on validation and on test: the curve on test is what the study reports; only the
validation numbers select a λ, and the selected λ's test numbers are read from the same runs, never chosen by them.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bict_ray.config import Config, from_dict
from bict_ray.errors import InputError
from bict_ray.pipeline.seeds import check_seeds, spread, summarise_seeds
from bict_ray.pipeline.tune import TRIAL_MEMORY_BYTES, _default_concurrency, _step_metrics, _trial_config
from bict_ray.storage.rundir import RunDir, write_json

LAMBDAS = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0)
SEEDS = (0, 1, 2)
# the tests plotted against λ (old self too: BCT's criterion compares backward prev with it)
PLOTTED = ("backward", "backward_prev", "forward", "new_self", "old_self")
SELECTS_BY = "forward"  # the λ a service would deploy: the best served retrieval after the upgrade, on validation


@dataclass(frozen=True)
class PsiBudget:
    """How much ψ learns from: ``pair_fraction`` of each class of phi_t's training images, for ``epochs`` epochs."""

    pair_fraction: float
    epochs: int

    @property
    def name(self) -> str:
        return f"{self.pair_fraction:g}x{self.epochs}"

    @classmethod
    def parse(cls, text: str) -> PsiBudget:
        """``"0.1x2"`` -> 10% of the pairs for 2 epochs; InputError naming the text otherwise."""
        fraction, sep, epochs = text.strip().partition("x")
        try:
            budget = cls(float(fraction), int(epochs))
        except ValueError:
            budget = None
        if not sep or budget is None or not 0 < budget.pair_fraction <= 1 or budget.epochs < 1:
            raise InputError(f"ψ budget {text!r}: write it as FRACTIONxEPOCHS with 0 < FRACTION <= 1 and EPOCHS >= 1, "
                             "e.g. 1x8 (every pair, 8 epochs) or 0.1x2")
        return budget

    def overrides(self) -> dict[str, Any]:
        return {"transform.pair_fraction": self.pair_fraction, "transform.epochs": self.epochs}


@dataclass
class LambdaStudy:
    lams: tuple[float, ...] = LAMBDAS
    seeds: tuple[int, ...] = SEEDS
    budgets: tuple[PsiBudget, ...] = ()  # empty: the config's own ψ only
    name: str = "lambda_study"
    concurrency: int | None = None  # trials at a time; None: what the cluster's CPUs allow

    def check(self) -> None:
        check_seeds(list(self.seeds))
        if not self.lams or any(not isinstance(lam, (int, float)) or lam < 0 for lam in self.lams):
            raise InputError(f"λ values must be a non-empty list of numbers >= 0, got {list(self.lams)}")
        for what, values in (("λ", self.lams), ("ψ budget", [b.name for b in self.budgets])):
            if len(set(values)) != len(values):
                raise InputError(f"the study lists a {what} twice: {list(values)}")


def trial_name(lam: float, seed: int, budget: PsiBudget) -> str:
    return f"lam_{lam:g}-seed_{seed}-psi_{budget.name}"


def run_lambda_study(config: Config, study: LambdaStudy, out: str | Path, *, log=print) -> dict:
    """Run (or resume) the study of ``config``'s sequence into ``out``; write and return OUT/study.json.

    A rerun resumes: the bases and every trial resume stage by stage in their run directories, and Ray Tune's
    search resumes from OUT/tune.
    """
    import ray
    from ray import tune

    from bict_ray.core.data import load_dataset
    from bict_ray.distributed.cluster import ensure_ray
    from bict_ray.pipeline.sequence import SequenceRunner

    study.check()
    if config.data.val_fraction == 0:
        raise InputError("the λ study selects on the validation set, and data.val_fraction is 0: set it above 0")
    if not config.eval.test:
        raise InputError("the λ study reports every λ on the test split: eval.test is false")
    if not config.transform.enabled:
        raise InputError("the λ study measures forward retrieval through ψ: transform.enabled is false")
    budgets = study.budgets or (PsiBudget(config.transform.pair_fraction, config.transform.epochs),)
    root = RunDir.local(out, "the λ study").path.resolve()
    if (root / "config.yaml").is_file():
        raise InputError(f"{root} is a run directory of one sequence (it has config.yaml): choose another --out")
    ensure_ray(config.ray)
    dataset = load_dataset(config.data, config.eval, config.scenario)
    for seed in study.seeds:
        base = _base_config(config, seed)
        log(f"[study] base seed {seed}: phi_1 and gallery v1 in {root / 'bases' / f'seed_{seed}'}")
        SequenceRunner(base, RunDir.create(root / "bases" / f"seed_{seed}", base), dataset,
                       lambda line, s=seed: log(f"[base {s}] {line}")).run_first()

    trials = len(study.lams) * len(study.seeds) * len(budgets)
    concurrency = study.concurrency or _default_concurrency(config, ray.cluster_resources())
    log(f"[study] {trials} trials (λ {', '.join(f'{lam:g}' for lam in study.lams)} × seeds "
        f"{', '.join(map(str, study.seeds))} × ψ budgets {', '.join(b.name for b in budgets)}), "
        f"{concurrency} at a time")
    trainable = tune.with_resources(
        # the dataset once into the object store: every trial reads the same images instead of loading its own
        tune.with_parameters(_trial, base=config.to_dict(), root=str(root), dataset=dataset),
        {"cpu": 0, "memory": TRIAL_MEMORY_BYTES})
    storage = root / "tune"
    if tune.Tuner.can_restore(str(storage / study.name)):
        log(f"[study] resuming the search in {storage / study.name}")
        tuner = tune.Tuner.restore(str(storage / study.name), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space={
            "compat.lam": tune.grid_search([float(lam) for lam in study.lams]),
            "train.seed": tune.grid_search(list(study.seeds)),
            "psi": tune.grid_search([b.name for b in budgets])},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name=study.name, storage_path=str(storage), verbose=1))
    grid = tuner.fit()
    failed = [result for result in grid if result.error]
    if failed:
        raise RuntimeError(f"{len(failed)} of {trials} trials failed, first: {str(failed[0].error).splitlines()[0]}; "
                           f"rerun to resume them (logs under {storage / study.name})")
    results = summarise_study(root, study, budgets)
    write_study(results, root)
    log(f"[study] {root / 'study.json'}, {root / 'lambda_study.md'}, {root / 'lambda_study.png'}")
    return results


def _base_config(config: Config, seed: int) -> Config:
    seeded = copy.deepcopy(config)
    seeded.train.seed = seed
    seeded.arms = []
    return seeded


def _trial(params: dict[str, Any], base: dict[str, Any], root: str, dataset) -> None:
    """One trial: the sequence at (λ, seed, ψ budget), reading phi_1, gallery v1 and the splits of its seed's base,
    evaluated on validation (reported to Tune after each step) and on test."""
    from ray import tune

    from bict_ray.pipeline.sequence import SequenceRunner

    budget = PsiBudget.parse(params["psi"])
    config = _trial_config(from_dict(Config, copy.deepcopy(base)), {
        "compat.lam": params["compat.lam"], "train.seed": params["train.seed"], **budget.overrides()})
    seed, name = config.train.seed, trial_name(config.compat.lam, config.train.seed, budget)
    log = lambda line: print(f"[{name}] {line}")  # noqa: E731
    base_config = _base_config(from_dict(Config, copy.deepcopy(base)), seed)
    shared = SequenceRunner(base_config, RunDir(Path(root) / "bases" / f"seed_{seed}"), dataset, log)
    shared.load_trained(1)
    runner = SequenceRunner(config, RunDir.create(Path(root) / "trials" / name, config), dataset, log,
                            shared=shared, shared_models=1)
    history: list[dict] = []

    def on_step(step: int, tests: dict) -> None:
        history.append({test: result["mAP"] for test, result in tests.items()})
        tune.report(_step_metrics(step, history))

    runner.run(on_step)


# --- the summary -----------------------------------------------------------------------------------------------


def summarise_study(root: str | Path, study: LambdaStudy, budgets: tuple[PsiBudget, ...]) -> dict:
    """study.json's content from the trials' results.json files under ``root``/trials: per ψ budget and λ, the
    per-step spread over seeds (seeds.summarise_seeds) and the spread of each seed's mean over the steps, on
    validation and on test; per budget, the λ whose mean validation forward is highest, with its test scores."""
    root = Path(root)
    entries = []
    for budget in budgets:
        for lam in study.lams:
            per_seed = [_trial_results(root, trial_name(lam, seed, budget)) for seed in study.seeds]
            per_step = summarise_seeds(per_seed, list(study.seeds))
            entries.append({
                "budget": budget.name, "pair_fraction": budget.pair_fraction, "psi_epochs": budget.epochs,
                "lam": float(lam),
                "validation": _over_steps([r["validation"]["steps"] for r in per_seed]),
                "test": _over_steps([r["steps"] for r in per_seed]),
                "per_step": {"validation": per_step["validation"]["steps"], "test": per_step["steps"]}})
    selected = {}
    for budget in budgets:
        mine = [e for e in entries if e["budget"] == budget.name]
        best = max(mine, key=lambda e: e["validation"][SELECTS_BY]["mean"])  # first (smallest λ) on a tie
        selected[budget.name] = {"lam": best["lam"], "selected_by": f"mean validation {SELECTS_BY} mAP over steps",
                                 "validation": best["validation"], "test": best["test"]}
    return {"study": study.name, "lams": [float(lam) for lam in study.lams], "seeds": list(study.seeds),
            "budgets": [{"name": b.name, "pair_fraction": b.pair_fraction, "psi_epochs": b.epochs} for b in budgets],
            "selected_on": "validation", "scores": "mAP, each seed's mean over the upgrade steps, then over seeds",
            "entries": entries, "selected": selected}


def _trial_results(root: Path, name: str) -> dict:
    path = root / "trials" / name / "results.json"
    if not path.is_file():
        raise InputError(f"{path}: not found; the trial {name} has not finished (rerun the study to resume it)")
    results = json.loads(path.read_text(encoding="utf-8"))
    if not results.get("steps") or not results.get("validation", {}).get("steps"):
        raise InputError(f"{path}: the trial has no test or no validation steps; was it run by the study?")
    return results


def _over_steps(per_seed_steps: list[list[dict]]) -> dict[str, dict]:
    """test -> spread over seeds of each seed's mAP averaged over its upgrade steps."""
    tests = per_seed_steps[0][0]["tests"]
    return {test: spread([statistics.fmean(entry["tests"][test]["mAP"] for entry in steps)
                          for steps in per_seed_steps]) for test in tests}


# --- what a person reads ---------------------------------------------------------------------------------------


def write_study(results: dict, root: str | Path) -> None:
    import pandas as pd

    root = Path(root)
    rows = [{"budget": e["budget"], "pair_fraction": e["pair_fraction"], "psi_epochs": e["psi_epochs"],
             "lam": e["lam"], "split": split, "test": test, "mean": stats["mean"], "std": stats["std"],
             "ci95_low": (stats["ci95"] or [math.nan])[0], "ci95_high": (stats["ci95"] or [math.nan, math.nan])[1],
             "n": stats["n"]}
            for e in results["entries"] for split in ("validation", "test") for test, stats in e[split].items()]
    pd.DataFrame(rows).to_csv(root / "lambda_study.csv", index=False)
    plot_lambda_study(results, root / "lambda_study.png")
    (root / "lambda_study.md").write_text(study_markdown(results), encoding="utf-8")
    write_json(root / "study.json", results)  # last: its presence means a complete study


def study_markdown(results: dict) -> str:
    from bict_ray.pipeline.report import _markdown_table, _mean_std

    seeds = results["seeds"]
    lines = [f"# The λ study: {results['study']}", "",
             f"mAP (%) as mean ± std over {len(seeds)} seeds (train.seed = {', '.join(map(str, seeds))}), each seed's "
             "scores first averaged over the upgrade steps. λ is selected on **validation** (highest mean validation "
             f"{SELECTS_BY}); the test columns report, they never select. φ_1, gallery v1 and the splits are shared "
             "by every λ of a seed."]
    for budget in results["budgets"]:
        chosen = results["selected"][budget["name"]]
        lines += ["", f"## ψ budget {budget['name']}: {budget['pair_fraction']:g} of the training pairs, "
                      f"{budget['psi_epochs']} epoch(s)", ""]
        rows = []
        for entry in (e for e in results["entries"] if e["budget"] == budget["name"]):
            mark = " ←" if entry["lam"] == chosen["lam"] else ""
            rows.append([f"{entry['lam']:g}{mark}", _mean_std(entry["validation"][SELECTS_BY]),
                         *(_mean_std(entry["test"][test]) for test in PLOTTED)])
        lines.append(_markdown_table(("λ", f"validation {SELECTS_BY}", *(f"test {t.replace('_', ' ')}" for t in PLOTTED)),
                                     rows))
        at_zero = next((e for e in results["entries"] if e["budget"] == budget["name"] and e["lam"] == 0), None)
        sentence = (f"Selected on validation: λ = {chosen['lam']:g} (validation {SELECTS_BY} "
                    f"{_mean_std(chosen['validation'][SELECTS_BY])}); its test forward is "
                    f"{_mean_std(chosen['test']['forward'])} and its test backward "
                    f"{_mean_std(chosen['test']['backward'])}.")
        if at_zero is not None and chosen["lam"] != 0:
            sentence += (f" λ = 0 (no backward compatibility) has test forward {_mean_std(at_zero['test']['forward'])}"
                         f" and backward {_mean_std(at_zero['test']['backward'])}.")
        lines += ["", sentence]
    lines += ["", "![λ study](lambda_study.png)", ""]
    return "\n".join(lines)


def plot_lambda_study(results: dict, png: str | Path) -> None:
    """One panel per ψ budget: each plotted test's mean on test against λ (symlog axis: λ = 0 is on it), error
    bars one std over the seeds, and a dashed line at the λ selected on validation."""
    from matplotlib.figure import Figure

    from bict_ray.pipeline.report import _COLOURS

    colours = {**_COLOURS, "backward_prev": "tab:red"}
    budgets = results["budgets"]
    fig = Figure(figsize=(5.2 * len(budgets), 4.2), layout="constrained")
    axes = fig.subplots(1, len(budgets), squeeze=False)[0]
    for ax, budget in zip(axes, budgets):
        mine = sorted((e for e in results["entries"] if e["budget"] == budget["name"]), key=lambda e: e["lam"])
        lams = [e["lam"] for e in mine]
        for test in PLOTTED:
            ax.errorbar(lams, [e["test"][test]["mean"] * 100 for e in mine],
                        yerr=[e["test"][test]["std"] * 100 for e in mine], marker="o", capsize=3,
                        color=colours.get(test), linestyle=":" if test == "old_self" else "-",
                        label=test.replace("_", " "))
        chosen = results["selected"][budget["name"]]["lam"]
        ax.axvline(chosen, color="black", linestyle="--", linewidth=1, label=f"selected on validation (λ={chosen:g})")
        linthresh = max(min((lam for lam in lams if lam > 0), default=0.1), 1e-3)
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_xlim(-0.3 * linthresh, max(lams) * 1.5 if max(lams) > 0 else linthresh)  # no empty λ < 0 half
        ax.set_xlabel("backward-loss weight λ")
        ax.set_ylabel("test mAP (%), mean over steps")
        ax.set_title(f"ψ: {budget['pair_fraction']:g} of the pairs, {budget['psi_epochs']} epoch(s)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"λ study: mean ± std over {len(results['seeds'])} seeds")
    fig.savefig(png, dpi=120)
