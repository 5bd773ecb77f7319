"""One configuration over several training seeds, and the spread of its scores (docs/PROTOCOL.md, "Seeds and spread").

    OUT/seed_<s>/      an ordinary run directory of the sequence with train.seed = s (resumable on its own)
    OUT/results.json   the mean over the seeds in the usual layout, plus "seeds": mean, std and 95% interval

Only ``train.seed`` changes between the runs: it seeds each model's initialisation and data order, ψ's training and
the synthesised old-classifier rows. The data (``data.seed``: test split, limits, validation set), the scenario's
training splits (``scenario.seed``) and the partial-refresh permutation (the top-level ``seed``) stay fixed, so every
seed trains on and is scored on the same images and the spread measures the training's randomness alone.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path

from bict_ray.config import Config
from bict_ray.core.data import Dataset, load_dataset
from bict_ray.errors import InputError
from bict_ray.pipeline.sequence import run_sequence
from bict_ray.storage.rundir import RunDir, write_json

# Student t quantiles t_{0.975, df} (two-sided 95%) for df = 1..30, to 4 decimals; beyond 30 the normal 1.96, at most
# 4% below t (df = 31). A table, not scipy: scipy is not a dependency of the project, and the interval must not
# depend on what else happens to be installed.
_T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
          2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
          2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
_Z_975 = 1.96


def run_seeds(config: Config, out: str | Path, seeds: list[int], *, log=print,
              dataset: Dataset | None = None) -> dict:
    """Run (or resume) ``config``'s sequence once per seed into OUT/seed_<s>/ with ``train.seed = s``; write and
    return OUT/results.json: the mean over the seeds as ``steps`` (and ``validation`` and ``arms`` where
    every seed has them) and their spread as ``seeds`` (:func:`summarise_seeds`).

    A rerun resumes each seed stage by stage: nothing trained is trained again, a finished seed is only evaluated
    again. ``dataset``: the loaded dataset of ``config.data`` (loaded once here when None; every seed uses it).
    """
    check_seeds(seeds)
    run = RunDir(out)  # on object storage: each seed's run directory is one there too, with its own mirror
    root = run.path
    if (root / "config.yaml").is_file():
        raise InputError(f"{run} is a run directory of one sequence (it has config.yaml); a run over seeds keeps "
                         "one run directory per seed under its own folder: choose another --out")
    dataset = dataset or load_dataset(config.data, config.eval, config.scenario)
    per_seed = []
    for seed in seeds:
        seeded = copy.deepcopy(config)
        seeded.train.seed = seed
        seed_dir = run.join(_run_name(seed))
        log(f"[seeds] seed {seed}: {seed_dir}")
        ran = run_sequence(seeded, seed_dir, log=lambda line, s=seed: log(f"[seed {s}] {line}"), dataset=dataset)
        per_seed.append(json.loads(json.dumps(ran)))  # as its results.json holds it, wherever that is
    results = mean_results(per_seed, seeds)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "results.json", results)
    run.sync()
    return results


def summarise_seeds(per_seed_results: list[dict], seeds: list[int]) -> dict:
    """The spread over seeds of the runs' results.json dicts (``per_seed_results[i]`` ran with ``seeds[i]``).

    Returns ``{"seeds", "runs", "steps": [{"step", "tests": {test: {metric: stats}}}]}`` plus ``"validation":
    {"steps"}`` when every run has it, and ``"arms"`` by name when every run has them, each entry
    summarised the same way (its ``steps``, its ``validation`` where every run has it; ``meaning`` taken
    from the first run). ``stats`` is ``{"mean", "std", "ci95", "n", "values"}`` of a numeric metric (fractions for
    mAP and R@k; other keys are skipped): the sample standard deviation (ddof = 1) and the Student t interval
    mean ± t_{0.975, n-1} · std / √n. With one seed ``std`` is 0 and ``ci95`` is None: one run estimates no spread.
    Runs whose steps, tests, metrics or arms differ are an InputError naming the seed and the key.
    """
    check_seeds(seeds)
    if len(per_seed_results) != len(seeds):
        raise InputError(f"{len(per_seed_results)} results for {len(seeds)} seeds ({_listed(seeds)}): "
                         "give one results dict per seed")
    summary = {"seeds": list(seeds), "runs": [_run_name(s) for s in seeds],
               **_summarise_entry(per_seed_results, seeds, "")}
    if all(r.get("arms") for r in per_seed_results):
        summary["arms"] = {name: _summarise_entry([r["arms"][name] for r in per_seed_results], seeds, f"arms.{name}.")
                           for name in _same_names([r["arms"] for r in per_seed_results], seeds, "arms")}
    return summary


def mean_results(per_seed_results: list[dict], seeds: list[int]) -> dict:
    """OUT/results.json of a run over seeds: the layout of one run, every score the mean over the seeds, and the
    spread under ``"seeds"``. Matrix, partial refresh and timings stay in each seed's own results.json."""
    summary = summarise_seeds(per_seed_results, seeds)
    first = per_seed_results[0]
    if not isinstance(first.get("run"), dict):
        raise InputError(f"seed {seeds[0]}: results have no 'run' object to describe the runs by")
    results = {"run": {**first["run"], "seeds": list(seeds),
                       "scores": f"mean over {len(seeds)} seeds (train.seed = {_listed(seeds)}); their spread is "
                                 "under 'seeds', each seed's own run in seed_<s>/"},
               **_means_of_entry(summary)}
    if "arms" in summary:
        results["arms"] = {name: {**entry, **_means_of_entry(entry)} for name, entry in summary["arms"].items()}
    results["seeds"] = summary
    return results


def check_seeds(seeds) -> None:
    """A non-empty list of distinct integers >= 0 (numpy's generators refuse negative seeds), else InputError."""
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise InputError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputError(f"seeds must be integers >= 0, got {seed!r} in {list(seeds)}")
    repeated = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if repeated:
        raise InputError(f"seeds must be distinct: {_listed(repeated)} given more than once in {_listed(seeds)}")


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}, the two-sided 95% quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    return _T_975[df - 1] if df <= len(_T_975) else _Z_975


def spread(values: list[float]) -> dict:
    """``{"mean", "std", "ci95", "n", "values"}`` of one metric over the seeds (see :func:`summarise_seeds`)."""
    values = [float(v) for v in values]
    n = len(values)
    mean = statistics.fmean(values)
    if n == 1:
        return {"mean": mean, "std": 0.0, "ci95": None, "n": 1, "values": values}
    std = statistics.stdev(values)
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": n, "values": values}


def _summarise_entry(entries: list[dict], seeds: list[int], where: str) -> dict:
    """``steps`` and, where every entry has it, ``validation.steps`` of one part of the runs (``where``: its dotted
    prefix, "" for the top level), with the first entry's ``meaning``."""
    summary = {key: entries[0][key] for key in ("meaning",) if key in entries[0]}
    summary["steps"] = _summarise_steps([e.get("steps") for e in entries], seeds, f"{where}steps")
    if all(e.get("validation") for e in entries):
        summary["validation"] = {"steps": _summarise_steps(
            [e["validation"].get("steps") for e in entries], seeds, f"{where}validation.steps")}
    return summary


def _means_of_entry(entry: dict) -> dict:
    means = {"steps": _means(entry["steps"])}
    if "validation" in entry:
        means["validation"] = {"steps": _means(entry["validation"]["steps"])}
    return means


def _summarise_steps(step_lists: list, seeds: list[int], where: str) -> list[dict]:
    """One entry per step of the first seed's list, each test's numeric metrics summarised over the seeds."""
    by_seed = [_by_step(steps, seed, where) for steps, seed in zip(step_lists, seeds)]
    reference, first = by_seed[0], seeds[0]
    for seed, steps in zip(seeds[1:], by_seed[1:]):
        _same_keys(reference, steps, seed, first, f"{where}: step")
    summary = []
    for step in sorted(reference):
        for seed, steps in zip(seeds[1:], by_seed[1:]):
            _same_keys(reference[step], steps[step], seed, first, f"{where} step {step}: test")
        tests = {}
        for test, metrics in reference[step].items():
            names = [name for name, value in metrics.items() if _is_number(value)]
            for seed, steps in zip(seeds[1:], by_seed[1:]):
                for name in names:
                    if not _is_number(steps[step][test].get(name)):
                        raise InputError(f"seed {seed}: {where} step {step} test '{test}' has no number '{name}' "
                                         f"(seed {first} has {metrics[name]!r}){_SAME_CONFIG}")
            tests[test] = {name: spread([steps[step][test][name] for steps in by_seed]) for name in names}
        summary.append({"step": step, "tests": tests})
    return summary


_SAME_CONFIG = "; were the runs made with the same config?"


def _by_step(steps, seed: int, where: str) -> dict[int, dict]:
    if not isinstance(steps, list) or not steps:
        raise InputError(f"seed {seed}: '{where}' is missing or empty: the run has no evaluated step")
    found = {}
    for entry in steps:
        if not isinstance(entry, dict) or not isinstance(entry.get("tests"), dict) or "step" not in entry:
            raise InputError(f"seed {seed}: each entry of '{where}' needs 'step' and 'tests', got {entry!r}")
        if entry["step"] in found:
            raise InputError(f"seed {seed}: '{where}' holds step {entry['step']} twice")
        found[entry["step"]] = entry["tests"]
    return found


def _same_keys(reference: dict, theirs: dict, seed: int, first: int, what: str) -> None:
    """InputError naming the first key that one of the two mappings has and the other lacks."""
    for key in reference:
        if key not in theirs:
            raise InputError(f"seed {seed}: {what} {key!r} is missing (seed {first} has it){_SAME_CONFIG}")
    for key in theirs:
        if key not in reference:
            raise InputError(f"seed {seed}: {what} {key!r} is not in seed {first}'s run{_SAME_CONFIG}")


def _same_names(parts: list[dict], seeds: list[int], where: str) -> list[str]:
    for seed, part in zip(seeds[1:], parts[1:]):
        _same_keys(parts[0], part, seed, seeds[0], where)
    return list(parts[0])


def _means(steps: list[dict]) -> list[dict]:
    return [{"step": entry["step"],
             "tests": {test: {name: stats["mean"] for name, stats in metrics.items()}
                       for test, metrics in entry["tests"].items()}} for entry in steps]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _run_name(seed: int) -> str:
    return f"seed_{seed}"


def _listed(values) -> str:
    return ", ".join(map(str, values))
