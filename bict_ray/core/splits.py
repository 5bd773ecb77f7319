"""Upgrade scenarios: which training images each model phi_t of the sequence may learn from.

- class growth: model t sees every training image of the classes in its subset;
- data growth: model t sees a fraction of each class's training images, nested so phi_{t+1} sees a superset.

In an open set (``scenario.test_classes``) no model sees those classes: the loader has dropped their images from
the training pool, the default class subsets leave them out, and a training or validation set that still holds
them is refused.

Splits are seeded, written to ``RUN_DIR/splits/`` and read back on resume; a run directory whose saved splits
were made for another scenario is refused rather than silently re-split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bict_ray.core.data import DataError, ImageSet

if TYPE_CHECKING:  # the config sits above core: it checks its choices against the lists defined here
    from bict_ray.config import ScenarioConfig

SPLITS_DIR = "splits"
VALIDATION_FILE = "validation_ids.npy"


@dataclass
class ModelSplit:
    """Training split of model ``version`` (1-based): sample ids (sorted) and the classes it saw."""

    version: int
    train_ids: np.ndarray
    classes: list[int]


def make_splits(scenario: ScenarioConfig, train: ImageSet, num_classes: int) -> list[ModelSplit]:
    """One :class:`ModelSplit` per model of the sequence, deterministic under ``scenario.seed``."""
    _refuse_test_classes(scenario, train, "the training set")
    return SCENARIOS[scenario.kind](scenario, train, num_classes)


def per_class_share(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded ``fraction`` of each class's rows, at least one row per class (fraction 1: all)."""
    if fraction >= 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        chosen.append(members[: max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(chosen))


def default_class_subsets(steps: int, num_classes: int, held_out=()) -> list[list[int]]:
    """Evenly growing class subsets ending with every class not ``held_out``, e.g. 3 steps of 10 classes: 4, 7,
    10 (the first 4, 7 and 10 of the classes kept, in order)."""
    kept = [c for c in range(num_classes) if c not in set(held_out)]
    first = min(len(kept), max(2, len(kept) - (steps - 1) * (len(kept) // steps)))
    sizes = np.linspace(first, len(kept), steps).round().astype(int)
    return [kept[: int(n)] for n in sizes]


def load_or_make_splits(run_dir: str | Path, scenario: ScenarioConfig, train: ImageSet, num_classes: int,
                        validation: ImageSet | None = None) -> list[ModelSplit]:
    """Read the run's saved splits, or make and save them (with the validation set's ids, ``validation_ids.npy``);
    refuse splits saved for another scenario, training set or validation set."""
    folder = Path(run_dir) / SPLITS_DIR
    if validation is not None:
        _refuse_test_classes(scenario, validation, "the validation set")  # it selects: it must never see them
    splits = make_splits(scenario, train, num_classes)
    fingerprint = _fingerprint(scenario, train, validation)
    if (folder / "splits.json").is_file():
        saved = json.loads((folder / "splits.json").read_text())
        if saved.get("fingerprint") != fingerprint:
            raise DataError(
                f"{folder} holds splits for another scenario or dataset ({saved.get('scenario')}); "
                "use a new run directory, or the config that made this one")
        return [ModelSplit(s["version"], np.load(folder / s["file"]), s["classes"]) for s in saved["models"]]
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for split in splits:
        name = f"model_{split.version}_train_ids.npy"
        np.save(folder / name, split.train_ids)
        entries.append({"version": split.version, "file": name, "classes": split.classes,
                        "num_train": int(len(split.train_ids))})
    record = {"scenario": _scenario_dict(scenario), "fingerprint": fingerprint, "models": entries,
              "num_validation": 0 if validation is None else len(validation)}
    if validation is not None:
        np.save(folder / VALIDATION_FILE, np.sort(validation.ids))
    tmp = folder / "splits.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(folder / "splits.json")  # the record appears last and whole: its presence means complete splits
    return splits


def _class_growth(scenario: ScenarioConfig, train: ImageSet, num_classes: int) -> list[ModelSplit]:
    subsets = scenario.classes or default_class_subsets(scenario.steps, num_classes, scenario.test_classes or ())
    present = set(np.unique(train.labels).tolist())
    splits = []
    for t, subset in enumerate(subsets, 1):
        unknown = sorted(c for c in subset if not 0 <= c < num_classes)
        if unknown:
            raise DataError(f"scenario.classes for model {t} names class(es) {unknown} that do not exist "
                            f"(the dataset has classes 0..{num_classes - 1})")
        empty = sorted(c for c in subset if c not in present)
        if empty:
            raise DataError(f"scenario.classes for model {t} names class(es) {empty} with no training images")
        mask = np.isin(train.labels, subset)
        splits.append(ModelSplit(t, np.sort(train.ids[mask]), sorted(int(c) for c in subset)))
    return splits


def _data_growth(scenario: ScenarioConfig, train: ImageSet, num_classes: int) -> list[ModelSplit]:
    fractions = scenario.fractions or np.linspace(1.0 / scenario.steps, 1.0, scenario.steps).tolist()
    rng = np.random.default_rng(scenario.seed)
    # one permutation per class, and every model takes a prefix of it: nested splits
    orders = {c: rng.permutation(train.ids[train.labels == c]) for c in range(num_classes)}
    classes = sorted(c for c, ids in orders.items() if len(ids))
    splits = []
    for t, frac in enumerate(fractions, 1):
        chosen = [ids[: max(1, int(round(frac * len(ids))))] for ids in orders.values() if len(ids)]
        splits.append(ModelSplit(t, np.sort(np.concatenate(chosen)), classes))
    return splits


# scenario.kind -> how the models' training splits grow
SCENARIOS = {"class_growth": _class_growth, "data_growth": _data_growth}


def _refuse_test_classes(scenario: ScenarioConfig, images: ImageSet, what: str) -> None:
    seen = sorted(set(np.unique(images.labels).tolist()) & set(scenario.test_classes or ()))
    if seen:
        raise DataError(f"{what} holds images of scenario.test_classes {seen}, which no model may train or select "
                        "on: load the dataset with the scenario, load_dataset(config.data, config.eval, "
                        "config.scenario)")


def _scenario_dict(scenario: ScenarioConfig) -> dict:
    record = {"kind": scenario.kind, "steps": scenario.steps, "classes": scenario.classes,
              "fractions": scenario.fractions, "seed": scenario.seed}
    if scenario.test_classes is not None:  # only when set: closed-set run directories keep their fingerprints
        record["test_classes"] = scenario.test_classes
    return record


def _fingerprint(scenario: ScenarioConfig, train: ImageSet, validation: ImageSet | None) -> str:
    digest = hashlib.sha256(json.dumps(_scenario_dict(scenario), sort_keys=True).encode())
    digest.update(np.ascontiguousarray(train.ids).tobytes())
    digest.update(np.ascontiguousarray(train.labels).tobytes())
    if validation is not None:
        digest.update(b"validation")
        digest.update(np.ascontiguousarray(np.sort(validation.ids)).tobytes())
    return digest.hexdigest()
