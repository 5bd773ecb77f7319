"""The criterion study: does phi_t searching phi_{t-1}'s gallery beat phi_{t-1} searching its own (BCT's criterion,
backward prev > old self), per compatibility loss and training budget, over seeds, and at what cost to forward?

A variant is a compatibility loss, its λ and any other overrides (``bct:1:train.epochs=6``). The first variant is
the base: per seed it trains phi_1, gallery v1 and the splits, and every other variant of that seed copies them,
so that only the training of phi_2 .. phi_T (and psi) differs between the variants of a seed.

    OUT/<variant>/seed_<s>/        an ordinary run directory (resumable; ``bict-ray report`` reads it)
    OUT/<variant>/results.json     the run over seeds (bict_ray.pipeline.seeds)
    OUT/criterion_study.json       per variant and step: the named tests on test, the criterion's margin on
                                   validation and test, and the anchored arm's margin, mean ± std over the seeds
    OUT/criterion_study.md         the table

The margin is backward prev − old self. With the ``bct_anchored`` arm in the config (every phi_t compatible with
phi_1, the gallery never upgraded) the anchored margin is phi_t (anchored) on v1 − phi_1 on v1: BCT's criterion for
the gallery a service never upgrades. The study selects nothing; it reports both splits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bict_ray.config import Config
from bict_ray.errors import InputError
from bict_ray.pipeline.seeds import check_seeds, run_seeds, spread
from bict_ray.storage.rundir import RunDir

DEFAULT_VARIANTS = ("bct:1", "bct:1:train.epochs=6", "ract:1")
SHARED = ("splits", "models/phi_1", "gallery/v1")  # what a variant of a seed reads from the base variant
TESTS = ("old_self", "new_self", "backward_prev", "forward")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"bct:1:train.epochs=6"`` -> ("bct_1_epochs6", ["compat.loss=bct", "compat.lam=1", "train.epochs=6"])."""
    parts = text.strip().split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise InputError(f"variant {text!r}: write LOSS:LAMBDA[:key=value,...], e.g. bct:1:train.epochs=6")
    extra = [item for item in parts[2].split(",") if item] if len(parts) == 3 else []
    for item in extra:
        if "=" not in item:
            raise InputError(f"variant {text!r}: {item!r} is not key=value")
    name = "_".join([parts[0], parts[1], *(item.split(".")[-1].replace("=", "") for item in extra)])
    return name, [f"compat.loss={parts[0]}", f"compat.lam={parts[1]}", *extra]


def run_criterion_study(configs: dict[str, Config], seeds: list[int], out: str | Path, *, dataset=None,
                        log=print) -> dict:
    """Run (or resume) every variant's config (``configs``: name -> config, the base first) over ``seeds`` into
    OUT/<name>/, sharing the base's phi_1, v1 and splits per seed; write and return the study (:func:`summarise`)."""
    check_seeds(seeds)
    if not configs:
        raise InputError("the criterion study needs at least one variant")
    root = RunDir.local(out, "the criterion study").path
    names = list(configs)
    for name, config in configs.items():
        if name != names[0]:
            for seed in seeds:
                _share(root / names[0] / f"seed_{seed}", root / name / f"seed_{seed}")
        log(f"[criterion] {name}: compat.loss={config.compat.loss} compat.lam={config.compat.lam:g} "
            f"train.epochs={config.train.epochs}")
        run_seeds(config, root / name, seeds, dataset=dataset, log=lambda line, n=name: log(f"[{n}] {line}"))
    study = {"seeds": list(seeds), "rows": {name: criterion_rows(_per_seed(root / name, seeds)) for name in names}}
    (root / "criterion_study.json").write_text(json.dumps(study, indent=2), encoding="utf-8")
    (root / "criterion_study.md").write_text(criterion_markdown(study), encoding="utf-8")
    return study


def _share(base: Path, run: Path) -> None:
    """Copy the base variant's phi_1, gallery v1 and splits into ``run`` (once: a rerun keeps what is there)."""
    for part in SHARED:
        if (run / part).exists():
            continue
        if not (base / part).exists():
            raise InputError(f"{base / part} is missing: the base variant's run did not finish; rerun the study")
        (run / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(base / part, run / part)


def _per_seed(root: Path, seeds: list[int]) -> list[dict]:
    return [json.loads((root / f"seed_{s}" / "results.json").read_text(encoding="utf-8")) for s in seeds]


def criterion_rows(per_seed: list[dict]) -> list[dict]:
    """Per step t >= 2 of the seeds' results.json dicts: the named tests on test, the margin (backward prev − old
    self) on validation and test, and with the bct_anchored arm its margin against phi_1 on v1, each a spread over
    the seeds (mAP %). Every result needs its validation steps (``data.val_fraction`` > 0)."""
    for results in per_seed:
        if "validation" not in results:
            raise InputError("the criterion study reads validation and test: a run has no validation results "
                             "(data.val_fraction is 0)")
    steps = [entry["step"] for entry in per_seed[0]["steps"]]
    anchored = all("bct_anchored" in results.get("arms", {}) for results in per_seed)
    rows = []
    for at, t in enumerate(steps):
        if t < 2:
            continue
        row = {"step": t, **{name: spread([_map(r, "test", at, name) for r in per_seed]) for name in TESTS}}
        for split in ("validation", "test"):
            row[f"margin_{split}"] = spread([_map(r, split, at, "backward_prev") - _map(r, split, at, "old_self")
                                             for r in per_seed])
            if anchored:  # phi_1 on v1 is old self at step 2
                row[f"anchored_margin_{split}"] = spread(
                    [_map(r, split, at, "backward", "bct_anchored") - _map(r, split, steps.index(2), "old_self")
                     for r in per_seed])
        rows.append(row)
    return rows


def _map(results: dict, split: str, at: int, test: str, arm: str | None = None) -> float:
    entry = results["arms"][arm] if arm else results
    steps = entry["validation"]["steps"] if split == "validation" else entry["steps"]
    return 100 * steps[at]["tests"][test]["mAP"]


def verdict(stats: dict) -> str:
    """"met" when the margin is positive for every seed, "not met" when negative for every seed, else "mixed"."""
    values = stats["values"]
    return "met" if min(values) > 0 else "not met" if max(values) < 0 else "mixed"


def criterion_markdown(study: dict) -> str:
    def cell(stats):
        return f"{stats['mean']:.1f} ± {stats['std']:.1f}"

    rows = study["rows"]
    anchored = any("anchored_margin_test" in row for variant in rows.values() for row in variant)
    header = ["variant", "step", "old self", "new self", "backward prev", "forward", "margin (val)",
              "margin (test)", "criterion"]
    if anchored:
        header += ["anchored margin (val)", "anchored margin (test)", "anchored"]
    lines = [f"BCT's criterion, mAP % on test unless marked, mean ± std over seeds "
             f"{', '.join(map(str, study['seeds']))}. margin = backward prev − old self; anchored margin = φ_t "
             "anchored on v1 − φ_1 on v1; criterion: met / not met when every seed's test margin is positive / "
             "negative, else mixed.", "",
             "| " + " | ".join(header) + " |", "| --- | ---: | " + " | ".join(["---:"] * 6) + " | --- |"
             + (" ---: | ---: | --- |" if anchored else "")]
    for name, variant_rows in rows.items():
        for row in variant_rows:
            cells = [name, str(row["step"]), *(cell(row[k]) for k in (*TESTS, "margin_validation", "margin_test")),
                     verdict(row["margin_test"])]
            if anchored:
                cells += ([cell(row["anchored_margin_validation"]), cell(row["anchored_margin_test"]),
                           verdict(row["anchored_margin_test"])] if "anchored_margin_test" in row else ["", "", ""])
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
