"""Compatible training on Ray Train: the old model, the backward-compatible new model, and the upgrade transform psi.

One ``train_loop_per_worker`` serves all three stages. The driver side (``train_embedding_model``,
``train_upgrade_transform``) describes a stage as a typed ``EmbeddingStage`` or ``TransformStage`` — what the workers
need (images, the frozen old model and its synthesised classifier, psi's training pairs, shipped once through the
object store) and how to optimise — trains it and saves the result as a model folder with its card. A stage builds
its own model, data loader and epoch; the loop around it (``train_stage``) is the same for all, and runs where its
session says (``sessions.py``): a ``TorchTrainer`` for several workers, one Ray task for one. Epoch progress is
printed by rank 0 and reported with a checkpoint every epoch, so a lost worker resumes from the last finished epoch
(``train.max_failures``), and a killed run resumes on re-run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from bict_ray.config import Config
from bict_ray.core.closed_form import fit_linear_transform
from bict_ray.core.data import ImageSet
from bict_ray.core.embed import embed_images, frozen_features, model_features, preprocess, upgrade_embeddings
from bict_ray.core.external import class_mean_classifier
from bict_ray.storage.artifacts import (Artifact, ModelCard, is_external, load_artifact, module_from_state,
                                        save_artifact)
from bict_ray.core.losses import (COMPAT_LOSSES, CompatContext, CompatibleTrainingLoss, check_finite, compat_loss_for,
                                  synthesise_old_classifier, transform_loss)
from bict_ray.core.models import EmbeddingNet, UpgradeTransform, backbone_spec
from bict_ray.distributed.ingest import StreamLoader, training_stream
from bict_ray.distributed.memory import PeakMemory
from bict_ray.distributed.sessions import CHECKPOINT_FILE, CheckpointStore, RayTrainSession, TaskSession, TrainSession
from bict_ray.errors import AlreadyExistsError, InputError, TrainingError, last_line

# per unseen class, how many images the pseudo old classifier averages (enough for a stable mean direction)
SYNTHESIS_SAMPLES_PER_CLASS = 2000


@dataclass
class Optimisation:
    """How a stage is optimised: its epochs, batches and learning rate, the seed and torch threads per worker."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    threads: int | None = None


@dataclass
class StageParts:
    """What a stage builds on a worker: the model to train, its data loader, and one epoch's work
    ``run_epoch(model, loader, optimizer, epoch) -> sums`` (loss terms times samples, "samples")."""

    model: torch.nn.Module
    loader: torch.utils.data.DataLoader
    run_epoch: Callable


@dataclass
class CompatSetup:
    """The backward-compatible half of phi_{t+1}'s loss: lam * compat against the frozen parent phi_t."""

    loss: str  # a key of COMPAT_LOSSES
    lam: float
    context: CompatContext
    parent_card: ModelCard
    parent_state: Any  # ObjectRef of the parent's state_dict (or the state itself, in process)


@dataclass
class EmbeddingStage:
    """Training phi_t: CE on its split, plus ``compat`` when it is trained compatible with a parent."""

    name: str
    spec: dict[str, Any]
    # ObjectRef of (images (N, C, H, W) uint8, labels (N,) int64, ids (N,) int64), or the tuple itself; or, with
    # train.ingest=stream, a Ray Dataset of those rows (``distributed.ingest``)
    data: Any
    optimisation: Optimisation
    momentum: float
    backbone_weights: str | None = None
    shuffle_buffer: int = 4096  # rows, for streamed data
    compat: CompatSetup | None = None
    class_mask: torch.Tensor | None = None  # (num_classes,) bool, the classes of the split; None: all

    def build(self, device: torch.device, shard=None) -> StageParts:
        """``shard``: this worker's share of a streamed ``data`` (a Ray Dataset); unused for data in memory."""
        model = EmbeddingNet.from_spec(self.spec, backbone_weights=self.backbone_weights)
        if self.class_mask is not None:
            with torch.no_grad():
                # rows of classes outside the split get no gradient (out of the CE's softmax): zero rather than
                # random, so the saved classifier scores a class it never saw 0 instead of above learned ones at random
                model.classifier.weight[~self.class_mask] = 0
        batch_size = self.optimisation.batch_size
        if isinstance(self.data, ray.data.Dataset):
            loader = StreamLoader(shard, batch_size, self.shuffle_buffer, self.optimisation.seed)
        else:
            images, labels, ids = _resolve(self.data)
            # copies: arrays from the object store are read-only, and torch wants writable memory
            # the ids travel with the batches: an old model that is only its embeddings looks them up
            dataset = torch.utils.data.TensorDataset(torch.tensor(images), torch.tensor(labels), torch.tensor(ids))
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
        old, compat = None, None
        if self.compat is not None and self.compat.lam > 0:
            old = module_from_state(self.compat.parent_card, _resolve(self.compat.parent_state)).to(device)
            old.requires_grad_(False)
            compat = compat_loss_for(self.compat.loss, self.compat.context).to(device)
        criterion = CompatibleTrainingLoss(self.compat.lam if compat is not None else 0.0, compat,
                                           self.class_mask).to(device)
        name = self.name

        def run_epoch(model, loader, optimizer, epoch):
            model.train()
            sums = {"loss": 0.0, "ce": 0.0, "compat": 0.0, "correct": 0.0, "samples": 0.0}
            for step, (images, y, ids) in enumerate(loader):
                images, y = images.to(device), y.to(device)
                features, logits = model(preprocess(images))
                ref = None
                if criterion.needs_ref_emb:
                    # an old model from outside maps the uint8 images to its own input
                    ref = frozen_features(old, images, ids)
                losses = criterion(logits, features, y, ref)
                _optimise(losses, optimizer, f"{name} epoch {epoch + 1} step {step + 1}", sums, len(y))
                if criterion.class_mask is not None:
                    # rows of classes outside the split are untrained, not candidates: predict among the split's
                    logits = logits.masked_fill(~criterion.class_mask, -float("inf"))
                sums["correct"] += float((logits.argmax(1) == y).sum())
            return sums

        return StageParts(model, loader, run_epoch)

    def optimizer(self, params) -> torch.optim.Optimizer:
        opt = self.optimisation
        return torch.optim.SGD(params, lr=opt.lr, momentum=self.momentum, weight_decay=opt.weight_decay, nesterov=True)


@dataclass
class TransformStage:
    """Training psi on embedding pairs (s(x), phi_target(x)) with labels, both models frozen."""

    name: str
    spec: dict[str, Any]
    pairs: Any  # ObjectRef of (source (N, d_in), target features (N, d_out)) float32, or the tuple itself
    labels: Any  # ObjectRef of (N,) int64, or the array itself
    new_weight: torch.Tensor  # (C, d_out) the target model's classifier, frozen
    classifier: str
    scale: float
    alpha: float
    beta: float
    optimisation: Optimisation
    class_mask: torch.Tensor | None = None  # (C,) bool, the classes the target model trained on; None: all

    def build(self, device: torch.device, shard=None) -> StageParts:
        source, target = _resolve(self.pairs)
        labels = _resolve(self.labels)
        psi = UpgradeTransform.from_spec(self.spec)
        dataset = torch.utils.data.TensorDataset(torch.tensor(source), torch.tensor(target), torch.tensor(labels))
        batch_size = self.optimisation.batch_size
        drop_last = len(dataset) > batch_size  # BatchNorm needs more than one sample per batch
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last)
        new_weight = self.new_weight.to(device)
        class_mask = None if self.class_mask is None else self.class_mask.to(device)
        stage = self

        def run_epoch(model, loader, optimizer, epoch):
            model.train()
            sums = {"loss": 0.0, "ce": 0.0, "cos": 0.0, "cos_sim": 0.0, "samples": 0.0}
            for step, (s, t, y) in enumerate(loader):
                s, t, y = s.to(device), t.to(device), y.to(device)
                out = model(s)
                losses = transform_loss(out, t, y, new_weight, stage.classifier, stage.scale, stage.alpha, stage.beta,
                                        class_mask)
                _optimise(losses, optimizer, f"{stage.name} epoch {epoch + 1} step {step + 1}", sums, len(y))
                with torch.no_grad():
                    sums["cos_sim"] += float(F.cosine_similarity(out, t, dim=1).sum())
            return sums

        return StageParts(psi, loader, run_epoch)

    def optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.optimisation.lr, weight_decay=self.optimisation.weight_decay)


Stage = EmbeddingStage | TransformStage


def train_embedding_model(config: Config, out_dir: str | Path, version: int, train_set: ImageSet,
                          classes_seen: list[int], num_classes: int, parent: Artifact | None = None,
                          run_name: str | None = None) -> Artifact:
    """Train phi_<version> on ``train_set`` with Ray Train; backward-compatible with ``parent`` when given.

    ``parent`` is the frozen old model phi_{version-1}; it only ever runs in eval mode under no_grad, so its weights
    are unchanged bit for bit. Returns the saved artifact (``out_dir`` gets weights.pt + model.json).
    """
    out_dir = Path(out_dir)
    stage = embedding_stage(config, version, train_set, num_classes, parent, classes_seen)
    history, state, workers = _fit(config, out_dir, stage, run_name)
    model = EmbeddingNet.from_spec(stage.spec)
    model.load_state_dict(state)
    training = {"num_train": len(train_set), "epochs": config.train.epochs, "ingest": config.train.ingest,
                "metrics": history[-1] if history else {}, "history": history, "workers": workers}
    if stage.compat is not None:
        training.update(compat_loss=config.compat.loss, lam=config.compat.lam,
                        synthesise_new_classes=config.compat.synthesise_new_classes)
    card = ModelCard("embedding", f"phi_{version}", version=version, classes_seen=list(classes_seen),
                     parent=parent.card.name if parent else None, training=training)
    save_artifact(out_dir, model, card)
    return load_artifact(out_dir)


def embedding_stage(config: Config, version: int, train_set: ImageSet, num_classes: int,
                    parent: Artifact | None = None, classes_seen: list[int] | None = None) -> EmbeddingStage:
    """The stage that trains phi_<version>. The images go to the object store once (as one array, or as a stream's
    blocks or table reads with train.ingest=stream); with a ``parent`` the frozen
    old model and, for a loss that needs it (bct), its classifier with synthesised rows come along.
    ``classes_seen``: the classes of the split, the only ones in the CE's softmax (None: all ``num_classes``)."""
    # the backbone's name, with a factory and its kwargs: what a worker rebuilds it from; model.weights travels beside
    # the spec (backbone_weights), as it only initialises
    spec = {**backbone_spec(config.model.backbone, config.model.factory, config.model.kwargs),
            "in_channels": int(train_set.images.shape[1]), "image_size": int(train_set.images.shape[2]),
            "embedding_dim": config.model.embedding_dim, "num_classes": num_classes,
            "classifier": config.model.classifier, "scale": config.model.scale}
    train = config.train
    data = (training_stream(config, train_set) if train.ingest == "stream"
            else ray.put((train_set.images, train_set.labels, train_set.ids)))
    stage = EmbeddingStage(
        name=f"phi_{version}", spec=spec, data=data,
        optimisation=Optimisation(train.epochs, train.batch_size, train.lr, train.weight_decay,
                                  seed=train.seed + version, threads=_threads(config)),
        momentum=train.momentum, class_mask=_class_mask(classes_seen, num_classes),
        shuffle_buffer=train.shuffle_buffer,
        # absolute: a Ray Train worker need not run in the driver's working directory
        backbone_weights=os.path.abspath(config.model.weights) if config.model.weights else None)
    if parent is not None:
        _check_parent(parent, spec)
        classifier, scale = _old_head(config, parent)
        context = CompatContext(classifier=classifier, scale=scale, temperature=config.compat.temperature)
        if config.compat.lam > 0 and COMPAT_LOSSES[config.compat.loss].needs_old_classifier:
            weight, valid = _old_classifier(config, parent, train_set, num_classes)
            context = CompatContext(weight, valid, classifier, scale, config.compat.temperature)
        stage.compat = CompatSetup(config.compat.loss, config.compat.lam, context, parent.card,
                                   ray.put(parent.state))
    return stage


def extract_transform_pairs(config: Config, train_set: ImageSet, source_chain: list[Artifact],
                            target: Artifact) -> tuple[np.ndarray, np.ndarray]:
    """(s(x), phi_target(x)) of ``train_set`` here, in this process: psi's training pairs, extracted by the task
    the two functions below use, for a caller that keeps them (a run whose arms fit their own psi on its models)."""
    return ray.get(_pairs_task(config, train_set, source_chain, target))


def train_upgrade_transform(config: Config, out_dir: str | Path, source: int, target: Artifact,
                            train_set: ImageSet, source_chain: list[Artifact], run_name: str | None = None,
                            pairs: tuple[np.ndarray, np.ndarray] | None = None) -> Artifact:
    """Train psi_{source->target} on embedding pairs of the training set, both models frozen.

    ``source_chain`` produces s(x): [phi_1, psi_1_2, ...] (the representation the gallery stores, default) or
    [phi_source] (transform.source=model). Pairs are extracted once in a Ray task (never through this process),
    unless given as ``pairs`` (``extract_transform_pairs``); no gallery data is involved.
    """
    out_dir = Path(out_dir)
    version = target.card.version
    pairs = ray.put(pairs) if pairs is not None else _pairs_task(config, train_set, source_chain, target)
    spec = {"d_in": source_chain[-1].card.dim, "d_out": target.card.dim,
            "hidden": config.transform.hidden, "layers": config.transform.layers}
    tf = config.transform
    stage = TransformStage(
        name=f"psi_{source}_{version}", spec=spec, pairs=pairs, labels=ray.put(train_set.labels),
        new_weight=target.module.classifier.weight.detach().clone(),
        classifier=target.card.spec["classifier"], scale=target.card.spec["scale"], alpha=tf.alpha, beta=tf.beta,
        optimisation=Optimisation(tf.epochs, tf.batch_size, tf.lr, tf.weight_decay,
                                  seed=config.train.seed + 1000 + version, threads=_threads(config)),
        class_mask=_class_mask(target.card.classes_seen, target.card.spec["num_classes"]))
    history, state, workers = _fit(config, out_dir, stage, run_name)
    psi = UpgradeTransform.from_spec(spec)
    psi.load_state_dict(state)
    card = ModelCard("transform", stage.name, source=f"phi_{source}", target=target.card.name, training={
        "trained_on": [a.card.name for a in source_chain], "input": tf.source, "alpha": tf.alpha, "beta": tf.beta,
        "epochs": tf.epochs, "num_train": len(train_set), "metrics": history[-1] if history else {},
        "history": history, "workers": workers})
    save_artifact(out_dir, psi, card)
    return load_artifact(out_dir)


def fit_linear_upgrade_transform(config: Config, out_dir: str | Path, source: int, target: Artifact,
                                 train_set: ImageSet, source_chain: list[Artifact],
                                 pairs: tuple[np.ndarray, np.ndarray] | None = None) -> Artifact:
    """psi_{source->target} as a linear map fitted in closed form (``config.transform.fit``: lstsq | procrustes) on
    the pairs ``train_upgrade_transform`` trains on, extracted by the same Ray task or given as ``pairs``; no Ray
    Train, seconds."""
    out_dir = Path(out_dir)
    if (out_dir / "model.json").exists():
        raise AlreadyExistsError(f"{out_dir} already holds a fitted psi_{source}_{target.card.version}; "
                                 "it is never overwritten")
    method = config.transform.fit
    started = time.perf_counter()
    stored, features = pairs if pairs is not None else extract_transform_pairs(config, train_set, source_chain, target)
    psi = fit_linear_transform(stored, features, method)
    fitted = upgrade_embeddings([psi], stored)
    targets = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    cosine = float(np.mean(np.sum(fitted * targets, axis=1)))
    card = ModelCard("transform", f"psi_{source}_{target.card.version}", source=f"phi_{source}",
                     target=target.card.name, training={
                         "trained_on": [a.card.name for a in source_chain], "input": config.transform.source,
                         "fit": method, "num_train": len(train_set), "train_cosine": cosine,
                         "seconds": round(time.perf_counter() - started, 3)})
    save_artifact(out_dir, psi, card)
    return load_artifact(out_dir)


def train_loop_per_worker(loop: dict[str, Stage]) -> None:
    """One Ray Train worker: ``loop["stage"]`` trained by ``train_stage`` in a ``RayTrainSession`` (the driver reads
    the result from the last checkpoint)."""
    train_stage(loop["stage"], RayTrainSession())


def train_stage(stage: Stage, session: TrainSession) -> dict[str, Any]:
    """Build ``stage``'s model, resume from the session's latest checkpoint, train, report every epoch.

    Returns the final checkpoint's contents (rank 0; None on other ranks): the model's state, the per-epoch history
    (carried in the checkpoint, so it has no gap across restarts; each entry records the attempt it ran in, 1 = first
    start, 2 = after the first failure, ...; and the workers' peak memory) and where the workers ran.
    """
    opt = stage.optimisation
    if opt.threads:
        torch.set_num_threads(opt.threads)
    rank, device = session.rank, session.device
    memory = PeakMemory()  # from before the stage's data arrives: what holding it costs the worker
    torch.manual_seed(opt.seed)
    workers = session.placement()
    parts = stage.build(device, _shard(stage, session))
    model = session.prepare_model(parts.model)
    optimizer, scheduler = _optimizer(stage, model)
    # a stream is split across the workers already; a torch loader gets its distributed sampler here
    loader = parts.loader if isinstance(parts.loader, StreamLoader) else session.prepare_loader(parts.loader)

    start_epoch, history, attempt = 0, [], 1
    saved = session.restore()
    if saved is not None:
        _unwrap(model).load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        start_epoch, history, attempt = saved["epoch"] + 1, list(saved["history"]), saved["attempt"] + 1
        if rank == 0:
            print(f"[{stage.name}] attempt {attempt}: resumed from the checkpoint of epoch {start_epoch}", flush=True)

    def report(metrics, epoch):
        state = None
        if rank == 0:
            state = {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                     "attempt": attempt, "workers": workers}
        session.report(metrics, state)
        return state

    for epoch in range(start_epoch, opt.epochs):
        for each in (loader, getattr(loader, "sampler", None)):  # a stream's shuffle, a distributed sampler
            if hasattr(each, "set_epoch"):
                each.set_epoch(epoch)
        started, started_at = time.perf_counter(), time.time()
        totals = parts.run_epoch(model, loader, optimizer, epoch)
        scheduler.step()
        seconds = time.perf_counter() - started
        metrics = _reduce(totals, device)
        metrics.update(_peaks(memory, device))
        metrics.update(epoch=epoch, attempt=attempt, seconds=seconds, started_at=started_at,
                       samples_per_s=metrics["samples"] / seconds if seconds > 0 else 0.0)
        history.append(metrics)
        if rank == 0:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k not in ("epoch", "attempt", "started_at"))
            print(f"[{stage.name}] epoch {epoch + 1}/{opt.epochs} {shown}", flush=True)
        saved = report(metrics, epoch)
    if start_epoch >= opt.epochs and history:
        # a rerun of a finished run reports its final state again, so the driver gets a checkpoint
        saved = report(history[-1], opt.epochs - 1)
    memory.stop()
    return saved


def run_in_process(stage: Stage) -> list[dict[str, float]]:
    """The same stage, model, data and optimiser as ``train_loop_per_worker``, run in this process without Ray
    Train (no worker group, no report, no checkpoint): the baseline of ``bench/train.py``.

    Returns one record per epoch: ``seconds`` (the epoch's wall time) and ``samples``.
    """
    opt = stage.optimisation
    if opt.threads:
        torch.set_num_threads(opt.threads)
    torch.manual_seed(opt.seed)
    parts = stage.build(torch.device("cpu"), _shard(stage, None))
    optimizer, scheduler = _optimizer(stage, parts.model)
    records = []
    for epoch in range(opt.epochs):
        if hasattr(parts.loader, "set_epoch"):
            parts.loader.set_epoch(epoch)
        started = time.perf_counter()
        totals = parts.run_epoch(parts.model, parts.loader, optimizer, epoch)
        scheduler.step()
        records.append({"seconds": time.perf_counter() - started, "samples": totals["samples"],
                        "loss": totals["loss"] / max(totals["samples"], 1.0)})
    return records


def _stream(stage: Stage) -> ray.data.Dataset | None:
    """A streamed stage's Ray Dataset (an embedding stage with train.ingest=stream); None for data in memory."""
    data = getattr(stage, "data", None)  # a TransformStage has pairs, never streamed
    return data if isinstance(data, ray.data.Dataset) else None


def _shard(stage: Stage, session: TrainSession | None):
    """This worker's share of a streamed stage's data: Ray Train's split, or, alone, the whole stream; else None."""
    stream = _stream(stage)
    if stream is None:
        return None
    return stream.iterator() if session is None else session.dataset_shard(stream)


def _resolve(value):
    """An object-store reference fetched; a plain value as it is (the benchmark runs the stages without Ray)."""
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _optimise(losses: dict, optimizer, where: str, sums: dict, n: int) -> None:
    """One step on losses["total"] (refused if not finite); adds every loss term, times n, to the epoch's sums."""
    check_finite(losses["total"], where)
    optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    optimizer.step()
    for name, value in losses.items():
        sums["loss" if name == "total" else name] += value.item() * n
    sums["samples"] += n


def _optimizer(stage: Stage, model):
    optimizer = stage.optimizer([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=stage.optimisation.epochs)
    return optimizer, scheduler


def _reduce(sums: dict[str, float], device) -> dict[str, float]:
    """Sum the epoch's totals over workers, then turn them into means (accuracy, or cosine for psi)."""
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    total = dict(zip(keys, values.tolist()))
    n = max(total["samples"], 1.0)
    out = {k: total[k] / n for k in keys if k not in ("samples", "correct")}
    if "correct" in total:
        out["accuracy"] = total["correct"] / n
    out["samples"] = total["samples"]
    return out


def _peaks(memory: PeakMemory, device) -> dict[str, float]:
    """The largest peak memory over the workers, MiB: private (since the stage started; -1 where the system does
    not say) and resident (since the process started: a Ray worker process may have run other tasks before)."""
    private = memory.peak_uss_mib()
    peaks = torch.tensor([memory.peak_rss_mib(), -1.0 if private is None else private], dtype=torch.float64,
                         device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    return {"peak_rss_mib": float(peaks[0]), "peak_uss_mib": float(peaks[1])}


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _fit(config: Config, out_dir: Path, stage: Stage, run_name: str | None):
    """Train ``stage`` on ``train.num_workers`` workers; return (history, final state_dict, worker placement) or raise
    TrainingError. One worker runs in a Ray task unless ``train.single_worker`` is ray_train (``sessions.py``)."""
    if (out_dir / "model.json").exists():
        raise AlreadyExistsError(f"{out_dir} already holds a trained {stage.name}; it is never overwritten")
    train_cfg = config.train
    storage = train_cfg.storage_path or str((out_dir.parent.parent / "ray_results").resolve())
    name = run_name or f"{config.name}-{stage.name}"
    try:
        if train_cfg.num_workers == 1 and train_cfg.single_worker == "task":
            saved = _fit_in_task(train_cfg, stage, CheckpointStore(storage, name))
        else:
            saved = _fit_on_ray_train(train_cfg, stage, storage, name)
    except Exception as err:  # Ray wraps the worker's exception; keep its message, name the stage
        raise TrainingError(f"training {stage.name} failed: {_root_cause(err)}") from err
    if saved is None:
        raise TrainingError(f"training {stage.name} finished without a checkpoint (storage {storage}/{name})")
    model = {key: value.cpu() for key, value in saved["model"].items()}
    return saved["history"], model, saved["workers"]


def _fit_on_ray_train(train_cfg, stage: Stage, storage: str, name: str) -> dict[str, Any] | None:
    # a streamed stage's Dataset goes to the trainer, which splits it across the workers (get_dataset_shard)
    datasets = None if _stream(stage) is None else {"train": _stream(stage)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"stage": stage}, datasets=datasets,
        scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
                                     resources_per_worker={"CPU": train_cfg.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=train_cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        return None
    with result.checkpoint.as_directory() as folder:
        return torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


def _fit_in_task(train_cfg, stage: Stage, store: CheckpointStore) -> dict[str, Any]:
    """The one worker as a Ray task with a worker's resources. Ray retries it as Ray Train restarts a worker group:
    when its process or node dies or the loop raises, up to ``max_failures`` times, from the newest checkpoint.
    DEFAULT scheduling: inside a Tune trial the task must not be captured by the trial's CPU-less placement group."""
    task = _train_task.options(num_cpus=train_cfg.cpus_per_worker, num_gpus=1 if train_cfg.use_gpu else 0,
                               max_retries=train_cfg.max_failures, retry_exceptions=True,
                               scheduling_strategy="DEFAULT")
    return ray.get(task.remote(stage, store, train_cfg.use_gpu))


@ray.remote
def _train_task(stage: Stage, store: CheckpointStore, use_gpu: bool) -> dict[str, Any]:
    return train_stage(stage, TaskSession(store, use_gpu))


def _root_cause(err: BaseException) -> str:
    if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None:
        err = err.cause  # a task's exception, without the traceback Ray prints around it
    while err.__cause__ is not None:
        err = err.__cause__
    return last_line(err)


def _threads(config: Config) -> int | None:
    return config.train.torch_threads or max(1, int(config.train.cpus_per_worker))


def _pairs_task(config: Config, train_set: ImageSet, source_chain: list[Artifact], target: Artifact):
    # with train.ingest=stream the task iterates the training stream, so no process but the driver holds the set
    images = (training_stream(config, train_set) if config.train.ingest == "stream"
              else ray.put(train_set.images))
    return _extract_pairs.options(**_extraction_options(config)).remote(
        [(a.card, a.state) for a in source_chain], (target.card, target.state), images,
        config.train.batch_size * 4, _threads(config), train_set.ids)


def _extraction_options(config: Config) -> dict[str, Any]:
    """Ray options of the tasks that embed training images with frozen models (psi's pairs, the old classifier's
    synthesis). They run between fits, when a training worker's CPUs are free, so they take as many: at Ray's
    default of one CPU a task gets OMP_NUM_THREADS=1, and psi's pairs took as long as psi's training.
    DEFAULT scheduling: inside a Tune trial the task must not be captured by the trial's CPU-less placement group."""
    return {"num_cpus": max(1, int(config.train.cpus_per_worker)), "scheduling_strategy": "DEFAULT"}


def _check_parent(parent: Artifact, spec: dict[str, Any]) -> None:
    if parent.card.dim != spec["embedding_dim"]:
        # every compat loss compares the new features with the old model's (or its classifier's rows) in one space
        raise TrainingError(f"old model {parent.card.name} embeds in {parent.card.dim} dims but the new model in "
                            f"{spec['embedding_dim']} (model.embedding_dim): backward-compatible training needs one "
                            f"space; set model.embedding_dim: {parent.card.dim}")
    if is_external(parent.card):
        return  # its classes are the service's, its input mapping takes any channels
    old = parent.card.spec
    for key in ("num_classes", "in_channels"):
        if old[key] != spec[key]:
            raise TrainingError(f"old model {parent.path} has {key}={old[key]} but the new model needs {spec[key]}; "
                                "it was trained on another dataset")


def _old_head(config: Config, parent: Artifact) -> tuple[str, float]:
    """The old classifier's kind and scale: the parent's own, or for an old model from outside (which brings none)
    a cosine classifier of class means at the new model's scale."""
    if is_external(parent.card):
        return "cosine", config.model.scale
    return parent.card.spec["classifier"], parent.card.spec["scale"]


def _old_classifier(config: Config, parent: Artifact, train_set: ImageSet, num_classes: int):
    """The frozen old classifier, with synthesised rows for classes phi_t never saw (or masked, if turned off).
    An old model from outside has none: every row is synthesised, the class means of its embeddings."""
    if is_external(parent.card):
        if not config.compat.synthesise_new_classes:
            raise TrainingError(f"compat.loss={config.compat.loss} needs the old model's classifier, and the old "
                                f"model from outside ({parent.card.training.get('source')}) has none: its rows are "
                                "synthesised from class means, so set compat.synthesise_new_classes: true")
        index = _synthesis_sample(config, train_set, np.unique(train_set.labels))
        features = _sample_features(config, parent, train_set, index)
        return class_mean_classifier(torch.tensor(features), train_set.labels[index], num_classes)
    weight = parent.module.classifier.weight.detach().clone()
    seen = torch.zeros(weight.shape[0], dtype=torch.bool)
    seen[parent.card.classes_seen] = True
    if not config.compat.synthesise_new_classes:
        return weight, seen
    unseen = [c for c in np.unique(train_set.labels) if not seen[c]]
    if not unseen:
        return weight, seen
    index = _synthesis_sample(config, train_set, unseen)
    features = _sample_features(config, parent, train_set, index)
    return synthesise_old_classifier(weight, seen, torch.tensor(features),
                                     torch.from_numpy(train_set.labels[index]), parent.card.spec["classifier"])


def _synthesis_sample(config: Config, train_set: ImageSet, classes) -> np.ndarray:
    """Sorted indices of up to ``SYNTHESIS_SAMPLES_PER_CLASS`` training images of each of ``classes``, seeded."""
    rng = np.random.default_rng(config.train.seed)
    picks = []
    for c in classes:
        members = np.flatnonzero(train_set.labels == c)
        picks.append(rng.choice(members, min(len(members), SYNTHESIS_SAMPLES_PER_CLASS), replace=False))
    return np.sort(np.concatenate(picks))


def _sample_features(config: Config, parent: Artifact, train_set: ImageSet, index: np.ndarray) -> np.ndarray:
    """The frozen parent's features of training images ``index``, in a task on the training worker's CPUs."""
    return ray.get(_features.options(**_extraction_options(config)).remote(
        parent.card, parent.state, ray.put(train_set.images[index]), _threads(config), train_set.ids[index]))


def _class_mask(classes: list[int] | None, num_classes: int) -> torch.Tensor | None:
    """(num_classes,) bool, True at ``classes`` (global labels); None (all classes) for None."""
    if classes is None:
        return None
    outside = sorted(c for c in classes if not 0 <= c < num_classes)
    if outside:
        raise InputError(f"classes {outside} are outside the dataset's {num_classes} classes")
    mask = torch.zeros(num_classes, dtype=torch.bool)
    mask[list(classes)] = True
    return mask


@ray.remote(num_cpus=1)
def _features(card, state, images, threads, ids):
    torch.set_num_threads(threads)
    return model_features(module_from_state(card, state), images, ids=ids)


@ray.remote(num_cpus=1)
def _extract_pairs(chain, target, images, batch_size, threads, ids):
    """(s(x), phi_target(x)) for the training images, in the order of ``ids``: s is the source chain as the gallery
    would store it. ``images``: the (N, C, H, W) array, or a Ray Dataset of the rows (a training stream), embedded
    batch by batch as it streams."""
    torch.set_num_threads(threads)  # a worker process is reused across tasks: never inherit another's count
    first, rest = module_from_state(*chain[0]), [module_from_state(*c) for c in chain[1:]]
    target_model = module_from_state(*target)

    def pairs(batch, batch_ids):
        source = upgrade_embeddings(rest, embed_images(first, batch, batch_size, ids=batch_ids))
        return source, model_features(target_model, batch, batch_size)

    if not isinstance(images, ray.data.Dataset):
        return pairs(images, ids)
    parts, found = [], []
    for batch in images.iter_batches(batch_size=batch_size, batch_format="numpy"):
        parts.append(pairs(batch["image"], batch["id"]))
        found.append(batch["id"])
    found = np.concatenate(found)
    order = np.argsort(found)
    at = order[np.minimum(np.searchsorted(found[order], ids), len(found) - 1)]
    if len(found) != len(ids) or not np.array_equal(found[at], ids):
        raise TrainingError(f"the training stream held {len(found)} rows, not the split's {len(ids)} images")
    return tuple(np.concatenate([part[k] for part in parts])[at] for k in (0, 1))
