"""The BiCT upgrade sequence phi_1 -> ... -> phi_T, end to end, resumable stage by stage.

    train phi_1 (or load the old model from outside, ``old_model``: a model, or only its embeddings, looked up by
    image id) -> extract gallery v1 -> for t = 2..T:
        train phi_t backward-compatible with phi_{t-1}
        train psi_{t-1->t} on the training set (as the gallery stores it, or phi_{t-1}(x))
        upgrade the gallery v_{t-1} -> v_t from its embeddings alone
        evaluate step t

Each stage writes one artifact (a model card, a committed gallery manifest); a rerun on the same run directory
loads what exists, verified by its checksums, and runs only what is missing. ``results.json`` is rewritten after
every step, so a long run shows its numbers as they come.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from bict_ray.config import Config
from bict_ray.core.data import Dataset, load_dataset
from bict_ray.core.embed import embed_images, upgrade_embeddings
from bict_ray.core.splits import load_or_make_splits, per_class_share
from bict_ray.distributed.cluster import ensure_ray
from bict_ray.distributed.evaluate import RayDataExecutor
from bict_ray.distributed.pipelines import embed_in_tasks, extract_gallery, upgrade_gallery
from bict_ray.distributed.train import (extract_transform_pairs, fit_linear_upgrade_transform, train_embedding_model,
                                       train_upgrade_transform)
from bict_ray.errors import NotFoundError
from bict_ray.pipeline.arms import ARM_MEANINGS, TRAINED_ARMS, chained_steps
from bict_ray.retrieval.protocol import Embedded, SequenceEmbeddings, compatibility_matrix, partial_refresh, step_tests
from bict_ray.retrieval.shard import ShardList
from bict_ray.retrieval.sharded import IN_PROCESS_GATHERING
from bict_ray.storage.artifacts import (Artifact, ArtifactError, external_artifact, load_artifact, read_card,
                                        save_external)
from bict_ray.storage.gallery import is_committed, open_gallery
from bict_ray.storage.rundir import RunDir


def run_sequence(config: Config, out: str | Path, *, log=print, on_step=None, dataset: Dataset | None = None,
                 old_model=None) -> dict:
    """Run (or resume) the whole sequence of ``config`` in run directory ``out``; return the results dict.

    ``on_step(step, tests)`` is called after each evaluated step (Ray Tune reports through it). ``old_model``: an
    ``nn.Module`` handed over from Python as phi_1 (``old_model.kind: module``, its input in that section); a rerun
    must pass the same one (its state_dict is checked against the run's record).
    """
    ensure_ray(config.ray)
    run_dir = RunDir.create(out, config)
    dataset = dataset or load_dataset(config.data, config.eval, config.scenario)
    runner = SequenceRunner(config, run_dir, dataset, log, keep_pairs=any(
        TRAINED_ARMS[name].reuses_pairs(config) for name in config.arms if name in TRAINED_ARMS), old_model=old_model)
    results = runner.run(on_step)
    if config.arms:
        results["arms"] = {"bict": _arm_entry(results)}
        for name in config.arms:
            results["arms"][name] = _run_arm(name, runner, results, log)
            runner.write(results)
    runner.kept_pairs = None  # the arms are done: nothing reads them any more
    return results


class SequenceRunner:
    """One sequence in one run directory. ``shared``: the run an arm belongs to, whose phi_1..phi_``shared_models``
    and gallery v1 this one reads instead of training and extracting its own (bict_ray.pipeline.arms)."""

    def __init__(self, config: Config, run_dir: RunDir, dataset: Dataset, log, *,
                 shared: SequenceRunner | None = None, shared_models: int = 0, keep_pairs: bool = False,
                 old_model=None):
        self.old_model = old_model  # old_model.kind=module: the nn.Module phi_1 is
        # on object storage, training checkpoints go to the run's store (runtime only: config.yaml keeps the key unset)
        config = run_dir.training_storage(config)
        self.config, self.run_dir, self.dataset, self.log = config, run_dir, dataset, log
        self.shared, self.shared_models = shared, shared_models if shared is not None else 0
        self.splits = shared.splits if shared is not None else load_or_make_splits(
            run_dir.path, config.scenario, dataset.train, dataset.num_classes, dataset.val)
        run_dir.sync()
        self.timings: dict[str, float] = {}
        self.gallery_nodes: dict[str, list[str]] = {}  # gallery version -> Ray nodes its pipeline ran on
        self.models, self.transforms = {}, {}
        # psi's training pairs before the source chain's transforms, (phi_first(x), phi_t(x)) by models and images:
        # kept when arms will fit their own psi on this run's models (_kept_pairs); None: never through this process
        self.kept_pairs: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] | None = {} if keep_pairs else None
        # queries in memory, gallery versions read shard by shard (never whole) by the sharded evaluation
        self.embedded = SequenceEmbeddings(rows_per_shard=config.gallery.rows_per_shard)
        # the validation set, query and gallery as the test split is: its gallery versions are small and stay in
        # memory, computed by the same functions as the gallery pipelines (embed_images, upgrade_embeddings)
        self.validation = SequenceEmbeddings(rows_per_shard=config.gallery.rows_per_shard) if dataset.val else None
        if shared is not None:
            # an arm compares the run's own objects (its queries, v1) in most of its tests: scored once for both
            self.embedded.scores = shared.embedded.scores
            if self.validation is not None:
                self.validation.scores = shared.validation.scores
        # ~20 evaluations a step: in this process unless the gallery is spread (a Ray Data pipeline costs seconds)
        gallery = config.gallery
        self.executor = (IN_PROCESS_GATHERING if gallery.concurrency == 1
                         else RayDataExecutor(gallery.concurrency, gallery.cpus_per_task))

    def run(self, on_step=None) -> dict:
        """Train, upgrade and evaluate every step. ``on_step(t, tests)`` gets each step's validation tests (what
        selects), or its test results when the dataset has no validation set."""
        config, steps = self.config, self.config.scenario.steps
        results = {"run": self._run_info(), "steps": [], "matrix": None, "partial_refresh": [],
                   "timings": self.timings, "gallery_nodes": self.gallery_nodes}
        if self.validation is not None:
            results["validation"] = {"steps": []}
        testing = config.eval.test
        for t in range(1, steps + 1):
            self.models[t] = self.train_model(t)
            if testing:
                self._timed(f"embed test set phi_{t}", lambda: self._embed_queries(t))
            if t > 1 and config.transform.enabled:
                self.transforms[t] = self.train_transform(t)
            if testing and (t == 1 or config.transform.enabled):
                self._gallery(t)
            if self.validation is not None:
                self._timed(f"embed validation set phi_{t}", lambda: self._embed_validation(t))
            if t == 1:
                continue
            selecting = None
            if self.validation is not None:
                selecting = self._timed(f"evaluate validation step {t}", lambda: step_tests(
                    self.validation, t, config.eval.ks, config.eval.map_at, IN_PROCESS_GATHERING))
                results["validation"]["steps"].append({"step": t, "tests": selecting})
                self._log_step(t, selecting, "validation")
            if testing:
                tests = self._timed(f"evaluate step {t}", lambda: step_tests(
                    self.embedded, t, config.eval.ks, config.eval.map_at, self.executor))
                results["steps"].append({"step": t, "tests": tests})
                if config.transform.enabled and config.eval.partial_refresh:
                    results["partial_refresh"] += self._timed(f"partial refresh step {t}", lambda: partial_refresh(
                        self.embedded, t, config.eval.partial_refresh, config.seed, config.eval.ks,
                        config.eval.map_at, self.executor))
                self._log_step(t, tests, "test")
                selecting = selecting or tests
            self.write(results)
            if on_step is not None and selecting is not None:
                on_step(t, selecting)
        if config.eval.matrix and testing:
            results["matrix"] = self._timed("compatibility matrix", lambda: compatibility_matrix(
                self.embedded, config.eval.ks, config.eval.map_at, self.executor))
        self.write(results)
        return results

    def run_first(self) -> None:
        """Only what every later stage builds on: phi_1 and, when the test split is evaluated, gallery v1 (and the
        splits, made on construction). What runs that share them start from (the lambda study's bases)."""
        self.models[1] = self.train_model(1)
        if self.config.eval.test:
            self._gallery(1)

    def load_trained(self, models_up_to: int, transforms_up_to: int = 1) -> None:
        """Load phi_1..phi_m and psi_1_2..psi_{n-1}_n from the run directory; each must exist (stage-wise jobs)."""
        for s in range(1, models_up_to + 1):
            folder = self.run_dir.model_dir(s)
            self.models[s] = _load_if_done(folder) or _missing(folder, f"phi_{s}")
        for s in range(2, transforms_up_to + 1):
            folder = self.run_dir.transform_dir(s - 1, s)
            self.transforms[s] = _load_if_done(folder) or _missing(folder, f"psi_{s - 1}_{s}")

    def write(self, results: dict) -> None:
        self.run_dir.write_results(results)

    def train_model(self, t: int):
        if t <= self.shared_models:
            self.log(f"[sequence] phi_{t}: shared with {self.shared.run_dir}")
            return self.shared.models[t]
        folder = self.run_dir.model_dir(t)
        if t == 1 and self.config.old_model.kind != "none":
            return self._old_model_from_outside(folder)
        existing = self._trained_already(folder, f"phi_{t}")
        if existing is not None:
            return existing
        split, train = self._training_split(t)
        reference = 1 if self.config.compat.reference == "first" else t - 1
        # lambda = 0 is independent training: no old model to load, none recorded as the parent
        parent = self.models.get(reference) if self.config.compat.lam > 0 else None
        what = "independently" if parent is None else \
            f"backward-compatible with phi_{reference} ({self.config.compat.loss}, lambda={self.config.compat.lam:g})"
        self.log(f"[sequence] training phi_{t} {what} on {len(train)} images of classes {split.classes}")
        return self._timed(f"train phi_{t}", lambda: train_embedding_model(
            self.config, folder, t, train, split.classes, self.dataset.num_classes, parent=parent,
            run_name=self._ray_name(f"phi_{t}")))

    def _old_model_from_outside(self, folder: Path):
        """phi_1 as the service deployed it (``old_model``): loaded, never trained; its card (the section, the
        files' sha256, or a module's state_dict's) goes into the run directory, and a rerun refuses files that
        changed since, or a module with other weights."""
        recorded = read_card(folder) if (folder / "model.json").exists() else None
        if recorded is not None and self.config.old_model.kind != "module":
            existing = load_artifact(folder)  # from the files the card names, their hashes checked
            self.log(f"[sequence] phi_1: the old model from outside, {recorded.training['source']} "
                     "(its files unchanged)")
            return existing
        artifact = self._timed("load phi_1", lambda: external_artifact(self.config.old_model, "phi_1",
                                                                       module=self.old_model))
        if recorded is None:
            recorded = save_external(folder, artifact.card)
            self.log(f"[sequence] phi_1: the old model from outside, {recorded.training['source']}, "
                     f"{recorded.dim}-d embeddings; not trained")
        elif recorded.sha256 != artifact.card.sha256:
            raise ArtifactError(f"{folder}: phi_1 was another module when the run recorded it (state sha256 "
                                f"{recorded.spec.get('state_sha256', '?')[:16]}..., now "
                                f"{artifact.card.spec['state_sha256'][:16]}...): pass that module, or start a "
                                "new run directory")
        else:
            self.log(f"[sequence] phi_1: {recorded.training['source']}, the module the run recorded")
        return Artifact(artifact.module, recorded, folder)

    def train_transform(self, t: int):
        folder = self.run_dir.transform_dir(t - 1, t)
        existing = self._trained_already(folder, f"psi_{t - 1}_{t}")
        if existing is not None:
            return existing
        train = self._transform_pairs(t)
        if self.config.transform.source == "gallery":
            chain = [self.models[1], *(self.transforms[s] for s in range(2, t))]
        else:
            chain = [self.models[t - 1]]
        fit = self.config.transform.fit
        self.log(f"[sequence] {'training' if fit == 'sgd' else f'fitting ({fit})'} psi_{t - 1}_{t} on {len(train)} "
                 f"training images ({' -> '.join(a.card.name for a in chain)} to phi_{t})")
        if fit != "sgd":
            return self._timed(f"fit psi_{t - 1}_{t}", lambda: fit_linear_upgrade_transform(
                self.config, folder, t - 1, self.models[t], train, chain, pairs=self._kept_pairs(chain, t, train)))
        return self._timed(f"train psi_{t - 1}_{t}", lambda: train_upgrade_transform(
            self.config, folder, t - 1, self.models[t], train, chain, run_name=self._ray_name(f"psi_{t - 1}_{t}"),
            pairs=self._kept_pairs(chain, t, train)))

    def _kept_pairs(self, chain, t: int, train):
        """psi_{t-1->t}'s pairs (s(x), phi_t(x)) from memory, or None: the training task extracts them itself.

        A run whose arms fit their own psi on its models keeps phi_first(x) and phi_t(x) of every step; an arm whose
        first and target models are the run's reads them instead of embedding the training images again, and
        applies its own chain's transforms (linear_psi's psi_1_2, not the run's)."""
        keeper = self.shared if self.shared is not None else self
        if keeper.kept_pairs is None:
            return None
        key = (_identity(chain[0]), _identity(self.models[t]), hashlib.sha256(train.ids.tobytes()).hexdigest())
        if key in keeper.kept_pairs and keeper is not self:
            self.log(f"[sequence] psi_{t - 1}_{t}: {chain[0].card.name}(x) and phi_{t}(x) of its {len(train)} "
                     f"training images shared with {keeper.run_dir}")
        elif key not in keeper.kept_pairs:
            if keeper is not self:
                return None  # a model of the arm's own: the run has nothing to share
            keeper.kept_pairs[key] = extract_transform_pairs(self.config, train, chain[:1], self.models[t])
        first, features = keeper.kept_pairs[key]
        return upgrade_embeddings([a.module for a in chain[1:]], first), features

    def _trained_already(self, folder: Path, name: str):
        existing = _load_if_done(folder)
        if existing is not None:
            self.log(f"[sequence] {name}: trained already ({folder}), skipped")
        return existing

    def _progress(self, line: str) -> None:
        self.log(f"[sequence] {line}")

    def _training_split(self, t: int):
        """Model t's split and its training images (psi_{t-1->t} trains on the same images as phi_t)."""
        split = self.splits[t - 1]
        return split, self.dataset.train.subset(np.searchsorted(self.dataset.train.ids, split.train_ids))

    def _transform_pairs(self, t: int):
        """The images whose pairs psi_{t-1->t} learns from: phi_t's training images, or ``transform.pair_fraction``
        of each class of them, drawn by the scenario's seed (the same images whatever lambda or train.seed)."""
        _, train = self._training_split(t)
        share = per_class_share(train.labels, self.config.transform.pair_fraction, self.config.scenario.seed + t)
        return train if len(share) == len(train) else train.subset(share)

    def _gallery(self, t: int) -> None:
        out = str(self._gallery_dir(t))
        if t == 1 and self.shared is not None:
            self.log(f"[sequence] gallery v1: shared with {self.shared.run_dir}")
        elif is_committed(out):
            self.log(f"[sequence] gallery v{t}: committed already, skipped")
        elif t == 1:
            self.log(f"[sequence] extracting gallery v1 with phi_1 ({len(self.dataset.gallery)} images)")
            _, stats = self._timed("extract gallery v1", lambda: extract_gallery(
                self.models[1], self.dataset.gallery, out, config=self.config.gallery, progress=self._progress))
            self.log(f"[sequence] gallery v1: {stats.rows} rows in {stats.shards} shards, {stats.rows_per_s:,.0f} rows/s")
            self.gallery_nodes["v1"] = sorted(stats.nodes)
        else:
            source = open_gallery(str(self._gallery_dir(t - 1)))
            _, stats = self._timed(f"upgrade gallery v{t}", lambda: upgrade_gallery(
                source, self.transforms[t], out, config=self.config.gallery, progress=self._progress))
            self.log(f"[sequence] gallery v{t} = psi_{t - 1}_{t}(v{t - 1}): {stats.rows} rows, "
                     f"{stats.skipped_shards} shards resumed, {stats.rows_per_s:,.0f} rows/s")
            self.gallery_nodes[f"v{t}"] = sorted(stats.nodes)
        shared_v1 = t == 1 and self.shared is not None and 1 in self.shared.embedded.galleries
        self.embedded.galleries[t] = self.shared.embedded.galleries[1] if shared_v1 else open_gallery(out)

    def _gallery_dir(self, t: int) -> Path:
        """Where gallery version t lives: this run's, or v1 of the run an arm shares it with."""
        return (self.shared or self).run_dir.gallery_dir(t) if t == 1 else self.run_dir.gallery_dir(t)

    def _embed_queries(self, t: int) -> None:
        """phi_t of the protocol's query set and, where the gallery is another set (query_gallery), phi_t of the
        gallery images: the self tests' phi_t(G)."""
        self.dataset.check_protocol(self.config.eval.protocol, self.config.scenario.test_classes)
        if self._shares_model(t) and t in self.shared.embedded.queries:  # an arm: the run's phi_t, embedded already
            self.embedded.queries[t] = self.shared.embedded.queries[t]
            if t in self.shared.embedded.gallery_embedded:
                self.embedded.gallery_embedded[t] = self.shared.embedded.gallery_embedded[t]
            return
        query, gallery = self.dataset.query, self.dataset.gallery
        self.embedded.queries[t] = Embedded(self._embed(t, query), query.labels, query.ids)
        if gallery is not query:
            self.embedded.gallery_embedded[t] = Embedded(self._embed(t, gallery), gallery.labels, gallery.ids)

    def _embed(self, t: int, images) -> np.ndarray:
        """phi_t of ``images``: in this process, or with eval.embed=tasks in Ray Data tasks as a gallery is
        extracted (on the workers' GPUs with gallery.use_gpu), bit for bit the same embeddings."""
        if self.config.eval.embed == "tasks":
            return embed_in_tasks(self.models[t], images, config=self.config.gallery)
        return embed_images(self.models[t].module, images.images, ids=images.ids)

    def _embed_validation(self, t: int) -> None:
        """phi_t's queries of the validation set, and its gallery version t: phi_1's embeddings at t = 1, then
        psi_{t-1->t} applied to version t - 1, as the gallery pipelines compute them (none with BCT only).
        Leave-one-out over the whole validation set under every eval.protocol: it selects, and splitting it would
        halve what it selects on."""
        val, data = self.dataset.val, self.validation
        if self._shares_model(t) and t in self.shared.validation.queries:
            data.queries[t] = self.shared.validation.queries[t]
        else:
            data.queries[t] = Embedded(self._embed(t, val), val.labels, val.ids)
        if t > 1 and t not in self.transforms:
            return  # BCT only: the gallery stays v1
        if t == 1 and self._shares_model(1) and 1 in self.shared.validation.galleries:
            data.galleries[1] = self.shared.validation.galleries[1]
            return
        if t == 1:
            stored = data.queries[1].embeddings
        else:
            previous = data.galleries[t - 1].shards
            stored = upgrade_embeddings([self.transforms[t].module],
                                        np.concatenate([shard.embeddings for shard in previous]))
        data.galleries[t] = ShardList.split(stored, val.labels, val.ids, data.rows_per_shard)

    def _shares_model(self, t: int) -> bool:
        """Whether phi_t is the run's this one belongs to (an arm's shared model), so are its embeddings."""
        return self.shared is not None and self.models[t] is self.shared.models.get(t)

    def _timed(self, stage: str, fn):
        started = time.perf_counter()
        value = fn()
        self.timings[stage] = round(time.perf_counter() - started, 3)
        self.run_dir.sync()  # on object storage, a finished stage is in the store before the next starts
        return value

    def _ray_name(self, stage: str) -> str:
        # unique per run directory, stable across reruns: a killed training resumes from its Ray checkpoint
        where = self.run_dir.identity
        return f"{where.rstrip('/').rsplit('/', 1)[-1]}-{hashlib.sha256(where.encode()).hexdigest()[:8]}-{stage}"

    def _run_info(self) -> dict:
        config = self.config
        return {"name": config.name, "dataset": f"{config.data.kind} ({self.dataset.source})",
                "scenario": config.scenario.kind, "steps": config.scenario.steps,
                "models": [f"phi_{t}" for t in range(1, config.scenario.steps + 1)],
                "classes": [s.classes for s in self.splits], "compat_loss": config.compat.loss,
                "lam": config.compat.lam, "transform": config.transform.enabled, "protocol": config.eval.protocol,
                **({"test_classes": config.scenario.test_classes} if config.scenario.test_classes else {}),
                **({"old_model": config.old_model.kind} if config.old_model.kind != "none" else {}),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def _log_step(self, t: int, tests: dict, split: str) -> None:
        parts = " ".join(f"{name}={result['mAP'] * 100:.1f}" for name, result in tests.items())
        self.log(f"[sequence] step {t} {split} mAP: {parts}")


def _identity(artifact) -> str:
    """What names a model's weights: the hash its card records when saved (every model of a run is)."""
    return artifact.card.sha256 or f"unsaved-{id(artifact.module)}"


def _run_arm(name: str, runner: SequenceRunner, results: dict, log) -> dict:
    """One arm beside the run of ``runner`` (bict_ray.pipeline.arms): bct_chained from its tests, the others as a
    sequence in RUN_DIR/arms/<name>/ sharing its phi_1 (and more, per arm) and gallery v1."""
    if name == "bct_chained":
        entry = {"meaning": ARM_MEANINGS[name], "steps": chained_steps(results["steps"])}
        if "validation" in results:
            entry["validation"] = {"steps": chained_steps(results["validation"]["steps"])}
        return entry
    arm = TRAINED_ARMS[name]
    config = arm.config(runner.config)
    shared = arm.shares(config.scenario.steps)
    log(f"[sequence] arm {name}: {arm.meaning}; phi_1..phi_{shared} and gallery v1 shared with this run")
    sub = SequenceRunner(config, RunDir.create(runner.run_dir.join("arms", name), config), runner.dataset,
                         lambda line: log(line.replace("[sequence]", f"[{name}]")), shared=runner,
                         shared_models=shared)
    arm_results = sub.run()
    return {**_arm_entry(arm_results), "meaning": arm.meaning, "run_dir": f"arms/{name}",
            "shared": {m.card.name: m.card.sha256 for m in (runner.models[t] for t in range(1, shared + 1))},
            "timings": arm_results["timings"]}


def _arm_entry(results: dict) -> dict:
    entry = {"meaning": ARM_MEANINGS["bict"], "steps": results["steps"]}
    if "validation" in results:
        entry["validation"] = results["validation"]
    return entry


def _missing(folder: Path, name: str):
    raise NotFoundError(f"{name} is not trained yet ({folder} has no model.json): run its stage first")


def _load_if_done(folder: Path):
    if not (folder / "model.json").exists():
        return None
    try:
        return load_artifact(folder)
    except ArtifactError as err:
        raise ArtifactError(f"{err}; delete {folder} to retrain it") from None
