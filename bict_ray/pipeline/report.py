"""The human report of a BiCT run: per-step tables, plots and RUN_DIR/report.md (docs/PROTOCOL.md).

Reads RUN_DIR/results.json and, when a λ search ran, RUN_DIR/tune/trials.csv and RUN_DIR/tune/best_config.json
(with its Pareto front after a multi-objective search); writes RUN_DIR/report.md and its PNGs under RUN_DIR/plots/.
Scores in results.json (and trials.csv) are fractions in [0, 1]; everything shown is in percent, differences in
percentage points.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm, SymLogNorm
from matplotlib.figure import Figure

from bict_ray.errors import InputError
from bict_ray.retrieval.protocol import NAMED_TESTS, TESTS

REPORT_METRICS = ("mAP", "R@1")  # every test must carry these; the report shows both

# two header lines per column of the plain-text table, so it stays narrow enough for a terminal
_TEXT_HEADERS = (("step", ""), *(test.column for test in NAMED_TESTS), ("forward -", "backward"))
_MARKDOWN_HEADERS = ("step", *(test.label for test in NAMED_TESTS), "forward − backward")
_TEST_LEGEND = "".join(f"- **{test.label}**: {test.query} queries against {test.gallery}: {test.meaning}\n"
                       for test in NAMED_TESTS)
# the same colour for a test in every plot
_COLOURS = {"old_self": "tab:gray", "new_self": "tab:green", "backward": "tab:orange", "forward": "tab:blue"}
_ARM_COLOURS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:red") * 4
_TRIAL_METRICS = {"mean_forward_mAP": ("mean forward", "tab:blue"),
                  "mean_backward_mAP": ("mean backward", "tab:orange"),
                  "mean_new_self_mAP": ("mean new self", "tab:green")}
_TRIAL_COLUMNS = ("trial_id", "lam", "compat_loss", *_TRIAL_METRICS, "last_forward_mAP")
_JSON_NAMES = {dict: "object", list: "array", str: "string"}
# a search objective's test in words, for the axes of the Pareto plot: name -> (label, its queries and gallery)
_OBJECTIVE_WORDS = {test.name: (test.label, f"{test.query} queries, {test.gallery}") for test in NAMED_TESTS}


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """RUN_DIR/results.json, checked against the schema; ValueError naming the file and key when it does not fit."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise InputError(f"{path}: not found (the pipeline writes it after its evaluation stage)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    _check_results(results, str(path))
    return results


def step_table(results: dict[str, Any], metric: str = "mAP") -> str:
    """An aligned plain-text table of ``metric`` (percent, 1 decimal), one row per upgrade step, for a terminal."""
    rows = [[str(step)] + [_pct(value) for value in values] + [_points(gain)]
            for step, values, gain in _step_rows(results, metric)]
    widths = [max(len(top), len(bottom), *(len(row[i]) for row in rows))
              for i, (top, bottom) in enumerate(_TEXT_HEADERS)]
    lines = [f"{metric} (%) at each upgrade step t",
             *("  ".join(header[line].rjust(width) for header, width in zip(_TEXT_HEADERS, widths)).rstrip()
               for line in (0, 1)),
             *("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows),
             "backward: phi_t vs the never-upgraded gallery v1 (BCT alone)",
             "forward:  phi_t vs the psi-upgraded gallery v_t (BiCT)"]
    return "\n".join(lines)


def markdown_step_table(results: dict[str, Any], metric: str = "mAP") -> str:
    """The same table as :func:`step_table` as a Markdown table."""
    rows = [[str(step)] + [_pct(value) for value in values] + [_points(gain)]
            for step, values, gain in _step_rows(results, metric)]
    return _markdown_table(_MARKDOWN_HEADERS, rows)


def seeds_table(results: dict[str, Any], metric: str = "mAP") -> str:
    """A plain-text table of ``metric`` as mean ± std over the seeds of a run over seeds (percent, 1 decimal), one
    row per upgrade step; std is the sample standard deviation (ddof = 1)."""
    _check_results(results, "results")
    summary = _field(results, "seeds", "", "results", dict)
    headers = _TEXT_HEADERS[:-1]  # no forward − backward: the spread of a difference is not the difference of spreads
    rows = [[str(entry["step"])] + [_mean_std(_field(entry["tests"][test], metric, f"seeds.steps.{test}", "results"))
                                    for test in TESTS]
            for entry in _ordered(summary["steps"])]
    widths = [max(len(top), len(bottom), *(len(row[i]) for row in rows)) for i, (top, bottom) in enumerate(headers)]
    seeds = summary["seeds"]
    return "\n".join([
        f"{metric} (%) at each upgrade step t, mean ± std over {len(seeds)} seeds (train.seed = "
        f"{', '.join(map(str, seeds))})",
        *("  ".join(header[line].rjust(width) for header, width in zip(headers, widths)).rstrip() for line in (0, 1)),
        *("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)])


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.md and RUN_DIR/plots/*.png from the run's results; returns the report's path.

    Optional parts (matrix, partial refresh, arms, timings, tune/) are skipped when absent and checked
    when present. Local directories only.
    """
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    steps = _ordered(results["steps"])
    arms = results.get("arms") or {}

    sections = [_run_section(results["run"]),
                *_seeds_sections(results, plots),
                "## What BiCT buys\n\n" + _bict_findings(steps, arms),
                _steps_section(results, plots),
                _bct_criterion_section(steps)]
    if results.get("validation"):
        sections.append(_validation_section(results["validation"]))
    if arms:
        sections.append(_arms_section(arms))
    if results.get("matrix"):
        sections.append(_matrix_section(results["matrix"], plots))
    if results.get("partial_refresh"):
        sections.append(_partial_refresh_section(results["partial_refresh"], plots))
    tune_section = _tune_section(run_dir / "tune", plots)
    if tune_section:
        sections.append(tune_section)
    if results.get("service"):
        sections.append(_service_section(results["service"]))
    if results.get("timings"):
        sections.append(_timings_section(results["timings"]))

    path = run_dir / "report.md"
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path


# --- report sections -------------------------------------------------------------------------------------------

def plot_lambda_search(trials_csv: str | Path, png: str | Path) -> None:
    """The lambda plot of a search on its own (what `bict-ray tune` leaves beside trials.csv)."""
    _plot_lambda(_read_trials(Path(trials_csv)), Path(png))


def plot_pareto(trials_csv: str | Path, best: dict[str, Any] | str | Path, png: str | Path) -> None:
    """The Pareto plot of a two-objective search (what `bict-ray tune` leaves beside trials.csv as pareto.png):
    every trial's two objectives on validation, the front selected on validation as a step line, and each front
    configuration's test scores, measured once after the selection. ``best``: best_config.json, or its contents."""
    source = "best config" if isinstance(best, dict) else str(best)
    best = best if isinstance(best, dict) else _read_json(Path(best))
    objectives, _ = _pareto_objectives(best, source)
    if len(objectives) != 2:
        raise InputError(f"{source}: the Pareto plot draws two objectives, got {len(objectives)}")
    _plot_pareto(_read_objective_trials(Path(trials_csv), objectives), best, Path(png))


def _run_section(run: dict[str, Any]) -> str:
    lines = [f"# BiCT report: {run['name']}", ""]
    for key, label in (("dataset", "dataset"), ("scenario", "upgrade scenario"), ("steps", "models in sequence"),
                       ("models", "models"), ("protocol", "retrieval protocol"),
                       ("test_classes", "open-set test classes (held out of training)"), ("created", "created")):
        if key in run:
            value = ", ".join(map(str, run[key])) if isinstance(run[key], list) else run[key]
            lines.append(f"- {label}: {value}")
    lines += ["", "Scores are percentages (mAP and Recall@1, self-matches excluded by sample id); "
                  "differences are in percentage points."]
    return "\n".join(lines)


def _bict_findings(steps: list[dict], arms: dict[str, Any]) -> str:
    """Sentences computed from the mAP numbers: what the ψ-upgraded gallery bought over BCT alone and over every
    other arm of the run, stated honestly."""
    last = steps[-1]
    t = last["step"]
    forward, backward, new_self = (_score_of(last, test) for test in ("forward", "backward", "new_self"))
    gain = forward - backward
    verdict = (f"a gain of {_points(gain)} points" if gain > 0
               else f"BiCT does **not** gain here: it is {abs(gain) * 100:.1f} points behind")
    lines = [f"At the last step (t = {t}), BiCT's forward retrieval (φ_{t} against the ψ-upgraded gallery v{t}) "
             f"reaches {_pct(forward)}% mAP, against {_pct(backward)}% for BCT alone (φ_{t} against the "
             f"never-upgraded gallery v1): {verdict}.",
             _every_step(steps, "forward", "backward"),
             _every_step(steps, "forward", "old_self")]
    gap = forward - new_self
    lines.append(f"New self (φ_{t} against a gallery re-extracted with φ_{t}, which privacy forbids) reaches "
                 f"{_pct(new_self)}%; forward is {abs(gap) * 100:.1f} points {'above' if gap > 0 else 'below'} it.")
    for name, arm in arms.items():
        theirs = {entry["step"]: entry for entry in arm["steps"]}.get(t)
        if name in ("bict", "bct_chained") or theirs is None:
            continue  # BiCT itself, and BCT chained: the backward line above
        difference = forward - _score_of(theirs, "forward")
        lines.append(f"Over `{name}` ({arm.get('meaning', name)}), on the same φ_1, gallery v1 and splits: BiCT's "
                     f"last-step retrieval is {abs(difference) * 100:.1f} points "
                     f"{'higher' if difference > 0 else 'lower'} ({_pct(forward)}% vs "
                     f"{_pct(_score_of(theirs, 'forward'))}%).")
    return lines[0] + "\n\n" + "\n".join(f"- {line}" for line in lines[1:])


def _every_step(steps: list[dict], better: str, worse: str) -> str:
    claim = f"{better.replace('_', ' ')} > {worse.replace('_', ' ')}"
    failed = [entry for entry in steps if _score_of(entry, better) <= _score_of(entry, worse)]
    if not failed:
        return f"{claim.capitalize()} held at every step (t = {', '.join(str(e['step']) for e in steps)})."
    where = ", ".join(f"t = {e['step']} ({_pct(_score_of(e, better))} vs {_pct(_score_of(e, worse))})"
                      for e in failed)
    return f"{claim.capitalize()} did **not** hold at every step: it failed at {where}."


def _steps_section(results: dict[str, Any], plots: Path) -> str:
    _plot_steps(_ordered(results["steps"]), results.get("arms") or {}, plots / "steps.png")
    return "\n\n".join([
        "## Tests at each upgrade step", _TEST_LEGEND.rstrip(),
        "### mAP (%)", markdown_step_table(results, "mAP"),
        "### Recall@1 (%)", markdown_step_table(results, "R@1"),
        "![mAP at each upgrade step](plots/steps.png)"])


def _seeds_sections(results: dict[str, Any], plots: Path) -> list[str]:
    """The "Spread over seeds" section of a run over seeds (bict_ray/pipeline/seeds.py); none for a single run."""
    summary = results.get("seeds")
    if not summary:
        return []
    seeds, steps = summary["seeds"], _ordered(summary["steps"])
    _plot_seeds(steps, len(seeds), plots / "seeds.png")
    n = len(seeds)
    rows = [[str(entry["step"]), test.label, _mean_std(entry["tests"][test.name]["mAP"]),
             _interval(entry["tests"][test.name]["mAP"]["ci95"]),
             ", ".join(_pct(value) for value in entry["tests"][test.name]["mAP"]["values"])]
            for entry in steps for test in NAMED_TESTS]
    spread = ("With one seed there is no spread to estimate: std is shown as 0 and there is no interval."
              if n == 1 else
              f"Below, each test's mAP as mean ± std, the sample standard deviation over the seeds (ddof = 1), and "
              f"the 95% Student t interval of the mean, mean ± t(0.975, {n - 1}) · std / √{n}. The error bars of "
              "the plot are ± one standard deviation.")
    return ["\n\n".join([
        "## Spread over seeds",
        f"Every score in this report is the **mean over {n} seeds** (train.seed = {', '.join(map(str, seeds))}). "
        "Each seed trains every model and ψ again (initialisation, data order); the images, the training splits "
        "and the test split are the same for all of them. Each seed's own run, with its compatibility matrix and "
        f"timings, is in {', '.join(f'`{run}/`' for run in summary['runs'])}. {spread}",
        _markdown_table(("step", "test", "mAP (%) mean ± std", "95% interval", "per seed"), rows),
        "![mAP over seeds, mean ± std](plots/seeds.png)"])]


def _validation_section(validation: dict[str, Any]) -> str:
    return "\n\n".join([
        "## Validation set",
        "The same tests on the validation set (held out of the training images; no model trained on it). It is what "
        "a search selects on; the test numbers above were not used to choose anything.",
        "### mAP (%)", _steps_table(validation["steps"], "mAP", "validation.steps", "results")])


def _bct_criterion_section(steps: list[dict]) -> str:
    held = [e["step"] for e in steps if _score_of(e, "backward_prev") > _score_of(e, "old_self")]
    failed = [e["step"] for e in steps if e["step"] not in held]
    if not failed:
        verdict = "held at every step"
    elif not held:
        verdict = "did **not** hold at any step"
    else:
        verdict = (f"held at t = {', '.join(map(str, held))} and did **not** hold at "
                   f"t = {', '.join(map(str, failed))}")
    rows = [[str(e["step"]), _pct(_score_of(e, "backward_prev")), _pct(_score_of(e, "old_self")),
             _points(_score_of(e, "backward_prev") - _score_of(e, "old_self")),
             "yes" if e["step"] in held else "no"] for e in steps]
    table = _markdown_table(("step", "backward prev", "old self", "difference", "held"), rows)
    return ("## BCT's own criterion\n\n"
            "BCT calls φ_t compatible with φ_{t−1} when φ_t queries against φ_{t−1}'s gallery beat φ_{t−1} "
            f"against itself (backward prev > old self, mAP). On this run it {verdict}.\n\n{table}")


def _arms_section(arms: dict[str, Any]) -> str:
    """One column per arm: the retrieval each arm serves after step t (φ_t against its deployed gallery, the
    ``forward`` test: v1 for the BCT arms), on test and on validation; then every test of each arm at the last step."""
    names = list(arms)
    legend = "".join(f"- **{name}**: {arms[name].get('meaning', '')}\n" for name in names)
    parts = ["## Arms (mAP, %)",
             "Every arm on this run's φ_1, gallery v1 and splits (the same bytes), so a difference is the method's. "
             "The number is what the service serves after step t: φ_t queries against the gallery the arm deploys "
             "(upgraded by ψ, or v1 for BCT only).", legend.rstrip()]
    for split, label in (("steps", "test"), ("validation", "validation")):
        series = {name: _arm_split(arms[name], split) for name in names}
        if any(entries is None for entries in series.values()):
            continue
        steps = sorted({e["step"] for entries in series.values() for e in entries})
        by_step = {name: {e["step"]: e for e in entries} for name, entries in series.items()}
        rows = [[str(t), *(_pct(_score_of(by_step[name][t], "forward")) if t in by_step[name] else ""
                           for name in names)] for t in steps]
        parts += [f"### Served retrieval at each step, {label}", _markdown_table(("step", *names), rows)]
    last = {name: _ordered(arms[name]["steps"])[-1] for name in names if arms[name]["steps"]}
    if last:
        rows = [[name, str(entry["step"]), *(_pct(_score_of(entry, test)) for test in TESTS)]
                for name, entry in last.items()]
        parts += ["### Every test of each arm at its last step, test",
                  _markdown_table(("arm", "step", *(test.label for test in NAMED_TESTS)), rows)]
    return "\n\n".join(parts)


def _arm_split(arm: dict[str, Any], split: str) -> list[dict] | None:
    if split == "steps":
        return _ordered(arm["steps"])
    return _ordered(arm["validation"]["steps"]) if arm.get("validation") else None


def _matrix_section(matrix: dict[str, Any], plots: Path) -> str:
    _plot_matrix(matrix, plots / "matrix.png")
    parts = ["## Compatibility matrix",
             "Every query model (rows) against every gallery state of the sequence (columns); blank: not evaluated.",
             "![compatibility matrix, mAP](plots/matrix.png)"]
    for metric in REPORT_METRICS:
        if metric in matrix:
            rows = [[query] + [_pct(value) for value in row] for query, row in zip(matrix["queries"], matrix[metric])]
            parts += [f"### {metric} (%)", _markdown_table(["query \\ gallery", *matrix["galleries"]], rows)]
    return "\n\n".join(parts)


def _partial_refresh_section(entries: list[dict], plots: Path) -> str:
    _plot_partial_refresh(entries, plots / "partial_refresh.png")
    steps = sorted({e["step"] for e in entries})
    fractions = sorted({e["fraction"] for e in entries})
    by_key = {(e["step"], e["fraction"]): e["mAP"] for e in entries}
    rows = [[f"{fraction * 100:g}%"] + [_pct(by_key.get((step, fraction))) for step in steps]
            for fraction in fractions]
    return ("## Partial refresh\n\n"
            "mAP of φ_t queries while only a fraction of the gallery has been upgraded by ψ.\n\n"
            "![mAP vs fraction of the gallery upgraded](plots/partial_refresh.png)\n\n"
            + _markdown_table(["gallery upgraded", *(f"step {step}" for step in steps)], rows))


def _tune_section(tune_dir: Path, plots: Path) -> str | None:
    trials_path, best_path = tune_dir / "trials.csv", tune_dir / "best_config.json"
    parts = []
    if best_path.is_file():
        best = _read_json(best_path)
        chosen = {k: v for k, v in best.items() if k not in ("validation", "test", "pareto")}
        parts += ["### Best config", f"Selected on the {best.get('selected_on', 'unknown')} set.",
                  "```json\n" + json.dumps(chosen, indent=2, sort_keys=True) + "\n```"]
        if best.get("test"):
            parts += ["The selected configuration on the test split, evaluated once after the selection (mAP, %):",
                      _steps_table(best["test"], "mAP", "test", str(best_path))]
        if best.get("pareto"):
            parts += _pareto_parts(best, trials_path, plots, str(best_path))
    if trials_path.is_file():
        trials = _read_trials(trials_path)
        _plot_lambda(trials, plots / "lambda.png")
        columns = [c for c in _TRIAL_COLUMNS if c in trials.columns]
        rows = [[_trial_cell(column, row[column]) for column in columns] for _, row in trials.iterrows()]
        headers = [c.replace("_mAP", " mAP (%)").replace("_", " ") if c.endswith("_mAP") else c for c in columns]
        parts = ["![search over λ](plots/lambda.png)", *parts, f"### Trials ({len(trials)})",
                 _markdown_table(headers, rows)]
    return "\n\n".join(["## λ search (Ray Tune)", *parts]) if parts else None


def _pareto_parts(best: dict[str, Any], trials_path: Path, plots: Path, source: str) -> list[str]:
    """The Pareto front of a multi-objective search: a table of its configurations, validation beside test, and
    the plot when there are two objectives."""
    objectives, modes = _pareto_objectives(best, source)
    headers = ["trial", "params", *(f"{_metric_header(m)} val / test (%)" for m in objectives)]
    rows = []
    for entry in best["pareto"]:
        scores = entry.get("scores", {})
        rows.append([str(entry["trial_id"]), ", ".join(f"{k} = {_param(v)}" for k, v in entry["params"].items()),
                     *(f"{_pct(scores.get('validation', {}).get(m))} / {_pct(scores.get('test', {}).get(m))}"
                       for m in objectives)])
    parts = ["### Pareto front",
             f"{len(best['pareto'])} configuration(s) on the Pareto front of "
             f"{', '.join(f'{mode} {metric}' for metric, mode in zip(objectives, modes))}, selected on the "
             "validation set; each was then tested once (test only reports, it chose nothing). The best config "
             "above is the front configuration best on the first objective.",
             _markdown_table(headers, rows)]
    if len(objectives) == 2 and trials_path.is_file():
        _plot_pareto(_read_objective_trials(trials_path, objectives), best, plots / "pareto.png")
        parts.append("![Pareto front, selected on validation](plots/pareto.png)")
    return parts


def _service_section(service: dict[str, Any]) -> str:
    """What `bict-ray upgrade-service` did with the service's own gallery (bict_ray.pipeline.service)."""
    rows = []
    for stage, what in (("import", "the service's gallery, as stored"), ("upgrade", "upgraded by ψ")):
        record = service.get(stage)
        if record:
            rows.append([what, f"{record['rows']:,}", str(record["dim"]), " → ".join(record["lineage"]),
                         f"`{record['path']}`"])
    parts = ["## The service's gallery",
             "Upgraded from its embeddings alone. The tests above score the labelled query and gallery sets, whose "
             "gallery went through the same ψ."]
    if rows:
        parts.append(_markdown_table(("version", "rows", "dim", "lineage", "path"), rows))
    tests = service.get("tests")
    if tests:
        parts.append("Its labels score it too, with the labelled query set (mAP %, R@1 %):")
        parts.append(_markdown_table(("test", "queries", "gallery", "mAP", "R@1"), [
            [name.replace("_", " "), query, gallery, f"{tests[name]['mAP'] * 100:.1f}", f"{tests[name]['R@1'] * 100:.1f}"]
            for name, query, gallery in (("old_self", "φ_1", "as stored"), ("backward", "φ_2", "as stored"),
                                         ("forward", "φ_2", "upgraded by ψ")) if name in tests]))
    export = service.get("export")
    if export:
        index = f", {export['index']} index" if export.get("index") else ""
        parts.append(f"Exported for serving as {export['format']}{index}: `{export['path']}` "
                     f"(sidecar `{export['sidecar']}`).")
    if service.get("timings"):
        parts.append("Seconds: " + ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in service["timings"].items()))
    return "\n\n".join(parts)


def _timings_section(timings: dict[str, float]) -> str:
    total = sum(timings.values())
    rows = [[stage, f"{seconds:.1f}", f"{seconds / total * 100:.0f}%" if total else ""]
            for stage, seconds in timings.items()]
    rows.append(["**total**", f"**{total:.1f}**", ""])
    return "## Timings\n\n" + _markdown_table(("stage", "seconds", "share"), rows)


# --- plots -----------------------------------------------------------------------------------------------------

def _plot_steps(steps: list[dict], arms: dict[str, Any], path: Path) -> None:
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    ts = [e["step"] for e in steps]
    for test, label in (("new_self", "new self (backfill, forbidden)"), ("forward", "forward (BiCT)"),
                        ("backward", "backward (BCT only)"), ("old_self", "old self")):
        ax.plot(ts, [_score_of(e, test) * 100 for e in steps], marker="o", color=_COLOURS[test], label=label)
    # BiCT and BCT chained are the forward and backward lines already
    others = {name: arm for name, arm in arms.items() if name not in ("bict", "bct_chained")}
    for (name, arm), colour in zip(others.items(), _ARM_COLOURS):
        entries = _ordered(arm["steps"])
        ax.plot([e["step"] for e in entries], [_score_of(e, "forward") * 100 for e in entries], marker="s",
                linestyle="--", color=colour, label=f"{name} (served)")
    ax.set_xticks(sorted({*ts, *(e["step"] for arm in others.values() for e in arm["steps"])}))
    ax.set_xlabel(r"upgrade step t (query model $\varphi_t$)")
    ax.set_ylabel("mAP (%)")
    ax.set_title("Retrieval at each upgrade step")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    fig.savefig(path, dpi=120)


def _plot_seeds(steps: list[dict], n: int, path: Path) -> None:
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    tests = (("new_self", "new self (backfill, forbidden)"), ("forward", "forward (BiCT)"),
             ("backward", "backward (BCT only)"), ("old_self", "old self"))
    for index, (test, label) in enumerate(tests):
        # shifted apart a little so that overlapping bars stay readable
        shift = (index - (len(tests) - 1) / 2) * 0.04
        ax.errorbar([e["step"] + shift for e in steps], [e["tests"][test]["mAP"]["mean"] * 100 for e in steps],
                    yerr=[e["tests"][test]["mAP"]["std"] * 100 for e in steps], marker="o", capsize=4,
                    color=_COLOURS[test], label=label)
    ax.set_xticks([e["step"] for e in steps])
    ax.set_xlabel(r"upgrade step t (query model $\varphi_t$)")
    ax.set_ylabel("mAP (%)")
    ax.set_title(f"Retrieval at each upgrade step over {n} seeds (mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    fig.savefig(path, dpi=120)


def _plot_matrix(matrix: dict[str, Any], path: Path) -> None:
    values = np.array([[np.nan if v is None else v * 100 for v in row] for row in matrix["mAP"]], dtype=float)
    rows, cols = values.shape
    fig = Figure(figsize=(1.2 * cols + 2.5, 0.8 * rows + 1.8), layout="constrained")
    ax = fig.subplots()
    finite = values[np.isfinite(values)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 100.0)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=colormaps["viridis"].with_extremes(bad="white"),
                      vmin=low, vmax=max(high, low + 1e-9))
    for i in range(rows):
        for j in range(cols):
            if np.isfinite(values[i, j]):
                # dark text on the bright end of viridis, light text on the dark end
                shade = (values[i, j] - low) / (high - low) if high > low else 1.0
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center",
                        color="black" if shade > 0.6 else "white")
    ax.set_xticks(range(cols), matrix["galleries"])
    ax.set_yticks(range(rows), matrix["queries"])
    ax.set_xlabel("gallery state")
    ax.set_ylabel("query model")
    ax.set_title("Compatibility matrix (mAP, %)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=120)


def _plot_partial_refresh(entries: list[dict], path: Path) -> None:
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for step in sorted({e["step"] for e in entries}):
        points = sorted((e["fraction"], e["mAP"]) for e in entries if e["step"] == step)
        ax.plot([f * 100 for f, _ in points], [m * 100 for _, m in points], marker="o", label=f"step {step}")
    ax.set_xlabel("gallery upgraded by ψ (%)")
    ax.set_ylabel(r"mAP of $\varphi_t$ queries (%)")
    ax.set_title("Partial refresh: mAP as ψ upgrades the gallery")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def _plot_lambda(trials, path: Path) -> None:
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    losses = sorted(trials["compat_loss"].dropna().unique()) if "compat_loss" in trials.columns else []
    if len(losses) <= 1:
        losses = [None]  # one line per metric through every trial
    markers = "osD^v<>"
    for index, loss in enumerate(losses):
        subset = trials if loss is None else trials[trials["compat_loss"] == loss]
        subset = subset.sort_values("lam")
        for column, (label, colour) in _TRIAL_METRICS.items():
            if column in subset.columns:
                ax.plot(subset["lam"], subset[column] * 100, marker=markers[index % len(markers)], color=colour,
                        linestyle=("-", "--", ":", "-.")[index % 4],
                        label=label if loss is None else f"{label} ({loss})")
    positive = trials["lam"][trials["lam"] > 0]
    if len(positive) and positive.max() > 10 * positive.min():
        # λ = 0 (independent training) is a real point of the search: keep it on a symlog axis
        if (trials["lam"] == 0).any():
            ax.set_xscale("symlog", linthresh=float(positive.min()))
        else:
            ax.set_xscale("log")
    ax.set_xlabel("λ (backward-compatibility loss weight)")
    ax.set_ylabel("mAP over the sequence (%)")
    ax.set_title(f"λ search ({len(trials)} trials)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    fig.savefig(path, dpi=120)


def _plot_pareto(trials, best: dict[str, Any], path: Path) -> None:
    (x, y), (x_mode, _) = best["objectives"], best["modes"]
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    ax = fig.subplots()
    shown = trials[np.isfinite(trials[x]) & np.isfinite(trials[y])]
    if "lam" in shown.columns and shown["lam"].notna().any():
        lam = shown["lam"].astype(float)
        positive = lam[lam > 0]
        norm = None
        if len(positive) and positive.max() > 10 * positive.min():  # a wide λ range: colour it on a log scale
            norm = (SymLogNorm(linthresh=float(positive.min()), vmin=float(lam.min()), vmax=float(lam.max()))
                    if (lam == 0).any() else LogNorm(vmin=float(positive.min()), vmax=float(positive.max())))
        points = ax.scatter(shown[x] * 100, shown[y] * 100, c=lam, cmap="viridis", norm=norm, s=40, zorder=2,
                            label=f"trials on validation ({len(shown)})")
        fig.colorbar(points, ax=ax, label="λ (backward-compatibility loss weight)")
    else:
        ax.scatter(shown[x] * 100, shown[y] * 100, color="tab:gray", s=40, zorder=2,
                   label=f"trials on validation ({len(shown)})")
    front = sorted(best["pareto"], key=lambda entry: entry["scores"]["validation"][x])
    fx = [entry["scores"]["validation"][x] * 100 for entry in front]
    fy = [entry["scores"]["validation"][y] * 100 for entry in front]
    # the boundary of what the front dominates: each point's value holds toward the worse end of x
    ax.step(fx, fy, where="pre" if x_mode == "max" else "post", color="black", linewidth=1.2, zorder=3,
            label=f"Pareto front on validation ({len(front)})")
    ax.scatter(fx, fy, s=110, facecolors="none", edgecolors="black", linewidths=1.2, zorder=4)
    tested = [(vx, vy, entry["scores"]["test"][x] * 100, entry["scores"]["test"][y] * 100)
              for vx, vy, entry in zip(fx, fy, front)
              if all(_finite(entry.get("scores", {}).get("test", {}).get(m)) for m in (x, y))]
    for vx, vy, tx, ty in tested:
        ax.plot([vx, tx], [vy, ty], linestyle=":", color="tab:red", linewidth=0.8, alpha=0.7, zorder=4)
    if tested:
        ax.scatter([t[2] for t in tested], [t[3] for t in tested], marker="X", s=90, color="tab:red", zorder=5,
                   label="front configurations on test (once, after the selection)")
    ax.set_xlabel(_objective_label(x, x_mode))
    ax.set_ylabel(_objective_label(y, best["modes"][1]))
    ax.set_title(f"Pareto front of {len(trials)} trials, selected on validation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.savefig(path, dpi=120)


def _objective_label(metric: str, mode: str) -> str:
    """A search objective in words, on two lines: "backward (BCT only) mAP (φ_t queries, the never-upgraded gallery
    v1)" over
    "mean over the steps (%)"."""
    kind, test = next(((k, metric[len(k):-len("_mAP")]) for k in ("mean_", "last_")
                       if metric.startswith(k)), ("", metric[:-len("_mAP")]))
    name, pair = _OBJECTIVE_WORDS.get(test, (test.replace("_", " "), ""))
    when = {"mean_": "mean over the steps", "last_": "at the last step", "": "at the last reported step"}[kind]
    better = ", lower is better" if mode == "min" else ""
    return f"{name} mAP ({pair})\n{when} (%{better})" if pair else f"{name} mAP\n{when} (%{better})"


def _param(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _metric_header(metric: str) -> str:
    return metric.replace("_mAP", " mAP").replace("_", " ")


# --- input checks and helpers ----------------------------------------------------------------------------------

def _step_rows(results: dict[str, Any], metric: str) -> list[tuple[int, list[float], float]]:
    """(step, [score of each test in TESTS], forward − backward) per step of results.json, in step order."""
    _check_results(results, "results")
    return _rows_of(results["steps"], metric)


def _steps_table(steps: list[dict], metric: str, where: str, source: str) -> str:
    """The Markdown step table of a list of steps kept apart from results["steps"] (validation, a search's test)."""
    _check_steps(steps, where, source)
    rows = [[str(step)] + [_pct(value) for value in values] + [_points(gain)]
            for step, values, gain in _rows_of(steps, metric)]
    return _markdown_table(_MARKDOWN_HEADERS, rows)


def _rows_of(steps: list[dict], metric: str) -> list[tuple[int, list[float], float]]:
    for index, entry in enumerate(steps):  # mAP and R@1 are checked; another metric is checked here
        for test in TESTS:
            where = f"steps[{index}].tests.{test}"
            _score(_field(entry["tests"][test], metric, where, "results"), f"{where}.{metric}", "results")
    return [(entry["step"], [_score_of(entry, test, metric) for test in TESTS],
             _score_of(entry, "forward", metric) - _score_of(entry, "backward", metric))
            for entry in _ordered(steps)]


def _check_results(results: Any, source: str) -> None:
    if not isinstance(results, dict):
        raise InputError(f"{source}: the top level must be a JSON object, got {type(results).__name__}")
    run = _field(results, "run", "", source, dict)
    _field(run, "name", "run", source, str)
    _check_steps(_field(results, "steps", "", source, list), "steps", source)
    validation = _optional(results, "validation", dict, source)
    if validation:
        _check_steps(_field(validation, "steps", "validation", source, list), "validation.steps", source)
    matrix = _optional(results, "matrix", dict, source)
    if matrix:
        _check_matrix(matrix, source)
    for index, entry in enumerate(_optional(results, "partial_refresh", list, source)):
        where = f"partial_refresh[{index}]"
        _step_number(_field(_mapping(entry, where, source), "step", where, source), f"{where}.step", source)
        for key in ("fraction", *REPORT_METRICS):
            _score(_field(entry, key, where, source), f"{where}.{key}", source)
    for name, arm in _optional(results, "arms", dict, source).items():
        where = f"arms.{name}"
        _check_steps(_field(_mapping(arm, where, source), "steps", where, source, list), f"{where}.steps", source)
        validation = _optional(arm, "validation", dict, source)
        if validation:
            _check_steps(_field(validation, "steps", f"{where}.validation", source, list),
                         f"{where}.validation.steps", source)
    for stage, seconds in _optional(results, "timings", dict, source).items():
        if _number(seconds, f"timings.{stage}", source) < 0:
            raise InputError(f"{source}: 'timings.{stage}' must be seconds >= 0, got {seconds!r}")
    seeds = _optional(results, "seeds", dict, source)
    if seeds:
        _check_seeds(seeds, source)


def _check_steps(steps: list, where: str, source: str, check_scores=None) -> None:
    """A list of ``{"step", "tests": {test: scores}}`` entries, each step once, every test there; ``check_scores(scores,
    at, source)`` checks one test's dict (default: every REPORT_METRICS score a fraction)."""
    check_scores = check_scores or _check_scores
    if not steps:
        raise InputError(f"{source}: '{where}' is empty: there is no upgrade step to report")
    seen = set()
    for index, entry in enumerate(steps):
        at = f"{where}[{index}]"
        step = _step_number(_field(_mapping(entry, at, source), "step", at, source), f"{at}.step", source)
        if step in seen:
            raise InputError(f"{source}: '{at}.step': step {step} appears twice")
        seen.add(step)
        tests = _field(entry, "tests", at, source, dict)
        for test in TESTS:
            check_scores(_field(tests, test, f"{at}.tests", source, dict), f"{at}.tests.{test}", source)


def _check_scores(scores: dict, at: str, source: str) -> None:
    for metric in REPORT_METRICS:
        _score(_field(scores, metric, at, source), f"{at}.{metric}", source)


def _check_seeds(summary: dict, source: str) -> None:
    """results["seeds"] of a run over seeds: the seeds, their runs, and a spread entry per step, test and metric."""
    seeds = _field(summary, "seeds", "seeds", source, list)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise InputError(f"{source}: 'seeds.seeds' must be a non-empty list of integers, got {seeds!r}")
    runs = _field(summary, "runs", "seeds", source, list)
    if len(runs) != len(seeds) or not all(isinstance(run, str) for run in runs):
        raise InputError(f"{source}: 'seeds.runs' must name one run directory per seed ({len(seeds)}), got {runs!r}")
    parts = [("seeds.steps", _field(summary, "steps", "seeds", source, list))]
    if _optional(summary, "validation", dict, source):
        parts.append(("seeds.validation.steps", _field(summary["validation"], "steps", "seeds.validation", source,
                                                       list)))
    for where, steps in parts:
        _check_steps(steps, where, source, functools.partial(_check_spreads, n=len(seeds)))


def _check_spreads(metrics: dict, at: str, source: str, n: int) -> None:
    """One test's ``{metric: spread}`` of a run over ``n`` seeds."""
    for metric in REPORT_METRICS:
        _field(metrics, metric, at, source, dict)
    for metric, spread in metrics.items():
        _check_spread(_mapping(spread, f"{at}.{metric}", source), metric, f"{at}.{metric}", n, source)


def _check_spread(spread: dict, metric: str, where: str, n: int, source: str) -> None:
    mean = _number(_field(spread, "mean", where, source), f"{where}.mean", source)
    if metric in REPORT_METRICS:
        _score(mean, f"{where}.mean", source)
    if _number(_field(spread, "std", where, source), f"{where}.std", source) < 0:
        raise InputError(f"{source}: '{where}.std' must be >= 0, got {spread['std']!r}")
    if _field(spread, "n", where, source) != n:
        raise InputError(f"{source}: '{where}.n' must be the number of seeds, {n}, got {spread['n']!r}")
    values = _field(spread, "values", where, source, list)
    if len(values) != n:
        raise InputError(f"{source}: '{where}.values' must hold one value per seed ({n}), got {len(values)}")
    for index, value in enumerate(values):
        _number(value, f"{where}.values[{index}]", source)
    interval = _field(spread, "ci95", where, source)
    if interval is not None:
        if not isinstance(interval, list) or len(interval) != 2:
            raise InputError(f"{source}: '{where}.ci95' must be null or [low, high], got {interval!r}")
        low, high = (_number(v, f"{where}.ci95", source) for v in interval)
        if not low <= mean <= high:
            raise InputError(f"{source}: '{where}.ci95' {interval!r} must hold the mean {mean!r}")


def _check_matrix(matrix: dict, source: str) -> None:
    queries = _field(matrix, "queries", "matrix", source, list)
    galleries = _field(matrix, "galleries", "matrix", source, list)
    for metric in ("mAP", *(m for m in REPORT_METRICS[1:] if m in matrix)):
        grid = _field(matrix, metric, "matrix", source, list)
        if len(grid) != len(queries) or any(not isinstance(row, list) or len(row) != len(galleries) for row in grid):
            raise InputError(f"{source}: 'matrix.{metric}' must be {len(queries)} rows (queries) of "
                             f"{len(galleries)} values (galleries)")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if value is not None:
                    _score(value, f"matrix.{metric}[{i}][{j}]", source)


def _trial_cell(column: str, value: Any) -> str:
    if column.endswith("_mAP"):
        return _pct(value)
    if column == "lam":
        return f"{value:g}"
    return str(value)


def _read_trials(path: Path):
    trials = _read_csv(path)
    if "lam" not in trials.columns or not any(column in trials.columns for column in _TRIAL_METRICS):
        raise InputError(f"{path}: needs a 'lam' column and at least one of {', '.join(_TRIAL_METRICS)}; "
                         f"found columns {', '.join(map(str, trials.columns))}")
    _check_numeric(trials, ["lam", *(c for c in (*_TRIAL_METRICS, "last_forward_mAP") if c in trials.columns)], path)
    return trials.sort_values(["lam", *(["compat_loss"] if "compat_loss" in trials.columns else [])])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None


def _pareto_objectives(best: dict[str, Any], source: str) -> tuple[list[str], list[str]]:
    """The objectives and modes of a multi-objective search's best config, checked with its ``pareto`` entries."""
    objectives = _field(best, "objectives", "", source, list)
    modes = _field(best, "modes", "", source, list)
    if len(modes) != len(objectives) or not objectives:
        raise InputError(f"{source}: 'objectives' and 'modes' must be non-empty lists of the same length")
    for index, entry in enumerate(_field(best, "pareto", "", source, list)):
        where = f"pareto[{index}]"
        _field(_mapping(entry, where, source), "trial_id", where, source)
        _field(entry, "params", where, source, dict)
        validation = _field(_field(entry, "scores", where, source, dict), "validation", f"{where}.scores", source,
                            dict)
        for metric in objectives:
            _number(_field(validation, metric, f"{where}.scores.validation", source),
                    f"{where}.scores.validation.{metric}", source)
    return objectives, modes


def _read_objective_trials(path: Path, objectives: list[str]):
    """trials.csv with a numeric column for each objective (a row may hold NaN: a trial that reported nothing)."""
    trials = _read_csv(path)
    for column in objectives:
        if column not in trials.columns:
            raise InputError(f"{path}: no column '{column}' (an objective of the search); found columns "
                             f"{', '.join(map(str, trials.columns))}")
    _check_numeric(trials, objectives, path)
    return trials


def _read_csv(path: Path):
    import pandas as pd

    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a readable CSV table ({err})") from None
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None


def _check_numeric(table, columns, path: Path) -> None:
    import pandas as pd

    for column in columns:
        if not pd.api.types.is_numeric_dtype(table[column]):
            raise InputError(f"{path}: column '{column}' must be numeric")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _ordered(steps: list[dict]) -> list[dict]:
    return sorted(steps, key=lambda entry: entry["step"])


def _score_of(entry: dict, test: str, metric: str = "mAP") -> float:
    return float(entry["tests"][test][metric])


def _field(mapping: dict, key: str, where: str, source: str, kind: type | None = None) -> Any:
    """mapping[key], or a ValueError naming the file and the dotted key."""
    name = f"{where}.{key}" if where else key
    if key not in mapping:
        raise InputError(f"{source}: missing key '{name}'")
    value = mapping[key]
    if kind is not None and not isinstance(value, kind):
        raise InputError(f"{source}: '{name}' must be a JSON {_JSON_NAMES.get(kind, kind.__name__)}, "
                         f"got {type(value).__name__}")
    return value


def _optional(mapping: dict, key: str, kind: type, source: str) -> Any:
    """An optional part: empty when absent or null, else checked to be of ``kind``."""
    return kind() if mapping.get(key) is None else _field(mapping, key, "", source, kind)


def _mapping(value: Any, where: str, source: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"{source}: '{where}' must be a JSON object, got {type(value).__name__}")
    return value


def _number(value: Any, where: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{source}: '{where}' must be a finite number, got {value!r}")
    return float(value)


def _score(value: Any, where: str, source: str) -> float:
    if not 0.0 <= _number(value, where, source) <= 1.0:
        raise InputError(f"{source}: '{where}' must be a fraction in [0, 1], got {value!r}")
    return float(value)


def _step_number(value: Any, where: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise InputError(f"{source}: '{where}' must be an integer >= 2 (step t upgrades phi_(t-1) to phi_t), "
                         f"got {value!r}")
    return value


def _pct(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value * 100:.1f}"


def _points(difference: float) -> str:
    return f"{difference * 100:+.1f}"


def _mean_std(spread: dict) -> str:
    return f"{spread['mean'] * 100:.1f} ± {spread['std'] * 100:.1f}"


def _interval(interval: list[float] | None) -> str:
    return "—" if interval is None else f"[{interval[0] * 100:.1f}, {interval[1] * 100:.1f}]"


def _markdown_table(headers, rows) -> str:
    # numbers right-aligned; the first column names the row
    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
