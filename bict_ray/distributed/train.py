"""Compatible training on Ray Train: the old model, the backward-compatible new model, and the upgrade transform psi.

One ``train_loop_per_worker`` serves all three stages; the driver side (``train_embedding_model``,
``train_upgrade_transform``) prepares what the workers need (images, frozen models and their synthesised classifier,
psi's training pairs) once, ships it through the object store, runs a ``TorchTrainer`` and saves the result as a
model folder with its card. Epoch progress is printed by rank 0 and reported with a checkpoint every epoch, so a
lost worker resumes from the last finished epoch (``FailureConfig``), and a killed run resumes on re-run.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F

import ray.train
import ray.train.torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from bict_ray.config import Config
from bict_ray.core.data import ImageSet
from bict_ray.core.embed import embed_images, model_features, preprocess, upgrade_embeddings
from bict_ray.storage.artifacts import Artifact, load_artifact, module_from_state, save_artifact
from bict_ray.core.losses import (CompatibleTrainingLoss, build_compat_loss, check_finite, synthesise_old_classifier,
                             transform_loss)
from bict_ray.core.models import EmbeddingNet, UpgradeTransform
from bict_ray.errors import AlreadyExistsError, TrainingError

CHECKPOINT_FILE = "checkpoint.pt"
# per unseen class, how many images the pseudo old classifier averages (enough for a stable mean direction)
SYNTHESIS_SAMPLES_PER_CLASS = 2000


def train_embedding_model(config: Config, out_dir: str | Path, version: int, train_set: ImageSet,
                          classes_seen: list[int], num_classes: int, parent: Artifact | None = None,
                          run_name: str | None = None) -> Artifact:
    """Train phi_<version> on ``train_set`` with Ray Train; backward-compatible with ``parent`` when given.

    ``parent`` is the frozen old model phi_{version-1}; it only ever runs in eval mode under no_grad, so its weights
    are unchanged bit for bit. Returns the saved artifact (``out_dir`` gets weights.pt + model.json).
    """
    out_dir = Path(out_dir)
    loop, compat_card = embedding_loop(config, version, train_set, num_classes, parent)
    spec = loop["spec"]
    history, state, workers = _fit(config, out_dir, loop, run_name)
    model = EmbeddingNet.from_spec(spec)
    model.load_state_dict(state)
    card = {"kind": "embedding", "version": version, "backbone": spec["backbone"],
            "embedding_dim": spec["embedding_dim"], "num_classes": num_classes, "classes_seen": classes_seen,
            "num_train": len(train_set), "parent": parent.card["name"] if parent else None,
            "name": f"phi_{version}", **compat_card, "epochs": config.train.epochs,
            "metrics": history[-1] if history else {}, "history": history, "workers": workers}
    save_artifact(out_dir, model, card)
    return load_artifact(out_dir)


def embedding_loop(config: Config, version: int, train_set: ImageSet, num_classes: int,
                   parent: Artifact | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the workers need to train phi_<version> (``train_loop_per_worker``'s config), and the card's compat keys.

    The images go to the object store once; with a ``parent`` the frozen old model and, for bct, its classifier
    with synthesised rows come along.
    """
    spec = {"backbone": config.model.backbone, "in_channels": int(train_set.images.shape[1]),
            "image_size": int(train_set.images.shape[2]), "embedding_dim": config.model.embedding_dim,
            "num_classes": num_classes, "classifier": config.model.classifier, "scale": config.model.scale}
    loop = {"stage": "embedding", "name": f"phi_{version}", "spec": spec, "backbone_weights": config.model.weights,
            "epochs": config.train.epochs, "batch_size": config.train.batch_size, "lr": config.train.lr,
            "momentum": config.train.momentum, "weight_decay": config.train.weight_decay,
            "seed": config.train.seed + version, "threads": _threads(config),
            "data": ray.put((train_set.images, train_set.labels)),
            "lam": 0.0, "compat": None}
    compat_card = {}
    if parent is not None:
        _check_parent(parent, spec)
        compat_card = {"compat_loss": config.compat.loss, "lam": config.compat.lam,
                       "synthesise_new_classes": config.compat.synthesise_new_classes}
        loop.update(lam=config.compat.lam, compat=config.compat.loss, temperature=config.compat.temperature,
                    parent_card=parent.card, parent_state=ray.put(parent.state))
        if config.compat.loss == "bct" and config.compat.lam > 0:
            weight, valid = _old_classifier(config, parent, train_set)
            loop.update(old_weight=weight, old_valid=valid)
    return loop, compat_card


def train_upgrade_transform(config: Config, out_dir: str | Path, source: int, target: Artifact,
                            train_set: ImageSet, source_chain: list[Artifact], run_name: str | None = None) -> Artifact:
    """Train psi_{source->target} on embedding pairs of the training set, both models frozen.

    ``source_chain`` produces s(x): [phi_1, psi_1_2, ...] (the representation the gallery stores, default) or
    [phi_source] (transform.source=model). Pairs are extracted once in a Ray task; no gallery data is involved.
    """
    out_dir = Path(out_dir)
    version = target.card["version"]
    # DEFAULT scheduling: inside a Tune trial the task must not be captured by the trial's CPU-less placement group
    pairs = _extract_pairs.options(scheduling_strategy="DEFAULT").remote(
        [(a.card, a.state) for a in source_chain], (target.card, target.state), ray.put(train_set.images),
        config.train.batch_size * 4)
    d_in = source_chain[-1].card["spec"].get("d_out") or source_chain[-1].card["spec"]["embedding_dim"]
    spec = {"d_in": int(d_in), "d_out": int(target.card["spec"]["embedding_dim"]),
            "hidden": config.transform.hidden, "layers": config.transform.layers}
    tf = config.transform
    loop = {"stage": "transform", "name": f"psi_{source}_{version}", "spec": spec, "epochs": tf.epochs,
            "batch_size": tf.batch_size, "lr": tf.lr, "weight_decay": tf.weight_decay, "alpha": tf.alpha,
            "beta": tf.beta, "seed": config.train.seed + 1000 + version, "threads": _threads(config),
            "pairs": pairs, "labels": ray.put(train_set.labels),
            "new_weight": target.module.classifier.weight.detach().clone(),
            "classifier": target.card["spec"]["classifier"], "scale": target.card["spec"]["scale"]}
    history, state, workers = _fit(config, out_dir, loop, run_name)
    psi = UpgradeTransform.from_spec(spec)
    psi.load_state_dict(state)
    card = {"kind": "transform", "name": f"psi_{source}_{version}", "source": f"phi_{source}",
            "target": f"phi_{version}", "source_version": source, "target_version": version,
            "trained_on": [a.card["name"] for a in source_chain], "input": config.transform.source,
            "alpha": tf.alpha, "beta": tf.beta, "epochs": tf.epochs, "num_train": len(train_set),
            "metrics": history[-1] if history else {}, "history": history, "workers": workers}
    save_artifact(out_dir, psi, card)
    return load_artifact(out_dir)


def train_loop_per_worker(loop: dict[str, Any]) -> list[dict[str, Any]]:
    """One Ray Train worker: build the stage's model, resume from the latest checkpoint, train, report every epoch.

    Returns the per-epoch history (carried in the checkpoint, so it has no gap across restarts); each entry
    records the attempt it ran in (1 = first start, 2 = after the first failure, ...).
    """
    if loop["threads"]:
        torch.set_num_threads(loop["threads"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(loop["seed"])
    device = ray.train.torch.get_device()
    workers = _gather_placement(rank)
    stage = _build_stage(loop, device)
    model = ray.train.torch.prepare_model(stage["model"])
    optimizer, scheduler = _optimizer(loop, model)
    loader = ray.train.torch.prepare_data_loader(stage["loader"])

    start_epoch, history, attempt = 0, [], 1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            saved = torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location=device, weights_only=True)
        _unwrap(model).load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        start_epoch, history, attempt = saved["epoch"] + 1, list(saved["history"]), saved["attempt"] + 1
        if rank == 0:
            print(f"[{loop['name']}] attempt {attempt}: resumed from the checkpoint of epoch {start_epoch}",
                  flush=True)

    for epoch in range(start_epoch, loop["epochs"]):
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        started, started_at = time.perf_counter(), time.time()
        totals = stage["run_epoch"](model, loader, optimizer, epoch)
        scheduler.step()
        seconds = time.perf_counter() - started
        metrics = _reduce(totals, device)
        metrics.update(epoch=epoch, attempt=attempt, seconds=seconds, started_at=started_at,
                       samples_per_s=metrics["samples"] / seconds if seconds > 0 else 0.0)
        history.append(metrics)
        if rank == 0:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k not in ("epoch", "attempt", "started_at"))
            print(f"[{loop['name']}] epoch {epoch + 1}/{loop['epochs']} {shown}", flush=True)
        _report(metrics, model, optimizer, scheduler, epoch, history, attempt, workers, rank)
    if start_epoch >= loop["epochs"] and history:
        # a rerun of a finished run reports its final state again, so the driver gets a checkpoint
        _report(history[-1], model, optimizer, scheduler, loop["epochs"] - 1, history, attempt, workers, rank)
    return history


def run_in_process(loop: dict[str, Any]) -> list[dict[str, float]]:
    """The same stage, model, data and optimiser as ``train_loop_per_worker``, run in this process without Ray
    Train (no worker group, no report, no checkpoint): the baseline of ``bench/train.py``.

    Returns one record per epoch: ``seconds`` (the epoch's wall time) and ``samples``.
    """
    if loop["threads"]:
        torch.set_num_threads(loop["threads"])
    torch.manual_seed(loop["seed"])
    stage = _build_stage(loop, torch.device("cpu"))
    model = stage["model"]
    optimizer, scheduler = _optimizer(loop, model)
    records = []
    for epoch in range(loop["epochs"]):
        started = time.perf_counter()
        totals = stage["run_epoch"](model, stage["loader"], optimizer, epoch)
        scheduler.step()
        records.append({"seconds": time.perf_counter() - started, "samples": totals["samples"],
                        "loss": totals["loss"] / max(totals["samples"], 1.0)})
    return records


def _build_stage(loop: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if loop["stage"] == "embedding":
        return _embedding_stage(loop, device)
    return _transform_stage(loop, device)


def _embedding_stage(loop, device):
    images, labels = _resolve(loop["data"])
    model = EmbeddingNet.from_spec(loop["spec"], backbone_weights=loop.get("backbone_weights"))
    # copies: arrays from the object store are read-only, and torch wants writable memory
    dataset = torch.utils.data.TensorDataset(torch.tensor(images), torch.tensor(labels))
    loader = torch.utils.data.DataLoader(dataset, batch_size=loop["batch_size"], shuffle=True, drop_last=True)
    old = None
    compat = None
    if loop["compat"] and loop["lam"] > 0:
        old = module_from_state(loop["parent_card"], _resolve(loop["parent_state"])).to(device)
        old.requires_grad_(False)
        kwargs = {"temperature": loop["temperature"]} if loop["compat"] in ("contrastive", "ract") else {}
        if loop["compat"] == "bct":
            kwargs = {"old_weight": loop["old_weight"], "valid_mask": loop["old_valid"],
                      "classifier": loop["parent_card"]["spec"]["classifier"],
                      "scale": loop["parent_card"]["spec"]["scale"]}
        compat = build_compat_loss(loop["compat"], **kwargs).to(device)
    criterion = CompatibleTrainingLoss(loop["lam"], compat)

    def run_epoch(model, loader, optimizer, epoch):
        model.train()
        sums = {"loss": 0.0, "ce": 0.0, "compat": 0.0, "correct": 0.0, "samples": 0.0}
        for step, (x, y) in enumerate(loader):
            x, y = preprocess(x.to(device)), y.to(device)
            features, logits = model(x)
            ref = None
            if criterion.needs_ref_emb:
                with torch.no_grad():
                    ref = old(x)[0]
            losses = criterion(logits, features, y, ref)
            _optimise(losses, optimizer, f"{loop['name']} epoch {epoch + 1} step {step + 1}", sums, len(y))
            sums["correct"] += float((logits.argmax(1) == y).sum())
        return sums

    return {"model": model, "loader": loader, "run_epoch": run_epoch}


def _transform_stage(loop, device):
    source, target = _resolve(loop["pairs"])
    labels = _resolve(loop["labels"])
    psi = UpgradeTransform.from_spec(loop["spec"])
    dataset = torch.utils.data.TensorDataset(torch.tensor(source), torch.tensor(target), torch.tensor(labels))
    drop_last = len(dataset) > loop["batch_size"]  # BatchNorm needs more than one sample per batch
    loader = torch.utils.data.DataLoader(dataset, batch_size=loop["batch_size"], shuffle=True, drop_last=drop_last)
    new_weight = loop["new_weight"].to(device)

    def run_epoch(model, loader, optimizer, epoch):
        model.train()
        sums = {"loss": 0.0, "ce": 0.0, "cos": 0.0, "cos_sim": 0.0, "samples": 0.0}
        for step, (s, t, y) in enumerate(loader):
            s, t, y = s.to(device), t.to(device), y.to(device)
            out = model(s)
            losses = transform_loss(out, t, y, new_weight, loop["classifier"], loop["scale"],
                                    loop["alpha"], loop["beta"])
            _optimise(losses, optimizer, f"{loop['name']} epoch {epoch + 1} step {step + 1}", sums, len(y))
            with torch.no_grad():
                sums["cos_sim"] += float(F.cosine_similarity(out, t, dim=1).sum())
        return sums

    return {"model": psi, "loader": loader, "run_epoch": run_epoch}


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


def _optimizer(loop, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if loop["stage"] == "embedding":
        optimizer = torch.optim.SGD(params, lr=loop["lr"], momentum=loop["momentum"],
                                    weight_decay=loop["weight_decay"], nesterov=True)
    else:
        optimizer = torch.optim.AdamW(params, lr=loop["lr"], weight_decay=loop["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=loop["epochs"])
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


def _report(metrics, model, optimizer, scheduler, epoch, history, attempt, workers, rank):
    if rank != 0:
        ray.train.report(metrics)  # every rank reports; only rank 0 carries the checkpoint
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                    "attempt": attempt, "workers": workers},
                   os.path.join(folder, CHECKPOINT_FILE))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def _gather_placement(rank: int) -> list[dict[str, Any]]:
    """Where each rank runs (node id, pid), gathered from all ranks: recorded in the model card."""
    me = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [me]
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, me)
    return everyone


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _fit(config: Config, out_dir: Path, loop: dict[str, Any], run_name: str | None):
    """Run the TorchTrainer; return (history, final state_dict, worker placement) or raise TrainingError."""
    if (out_dir / "model.json").exists():
        raise AlreadyExistsError(f"{out_dir} already holds a trained {loop['name']}; it is never overwritten")
    train_cfg = config.train
    storage = train_cfg.storage_path or str((out_dir.parent.parent / "ray_results").resolve())
    name = run_name or f"{config.name}-{loop['name']}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
                                     resources_per_worker={"CPU": train_cfg.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=train_cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps the worker's exception; keep its message, name the stage
        raise TrainingError(f"training {loop['name']} failed: {_root_cause(err)}") from err
    if result.checkpoint is None:
        raise TrainingError(f"training {loop['name']} finished without a checkpoint (storage {storage}/{name})")
    with result.checkpoint.as_directory() as folder:
        saved = torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    return saved["history"], saved["model"], saved["workers"]


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def _threads(config: Config) -> int | None:
    return config.train.torch_threads or max(1, int(config.train.cpus_per_worker))


def _check_parent(parent: Artifact, spec: dict[str, Any]) -> None:
    old = parent.card["spec"]
    for key in ("num_classes", "in_channels"):
        if old[key] != spec[key]:
            raise TrainingError(f"old model {parent.path} has {key}={old[key]} but the new model needs {spec[key]}; "
                                "it was trained on another dataset")


def _old_classifier(config: Config, parent: Artifact, train_set: ImageSet):
    """The frozen old classifier, with synthesised rows for classes phi_t never saw (or masked, if turned off)."""
    weight = parent.module.classifier.weight.detach().clone()
    seen = torch.zeros(weight.shape[0], dtype=torch.bool)
    seen[parent.card["classes_seen"]] = True
    if not config.compat.synthesise_new_classes:
        return weight, seen
    rng = np.random.default_rng(config.train.seed)
    picks = []
    for c in np.unique(train_set.labels):
        if not seen[c]:
            members = np.flatnonzero(train_set.labels == c)
            picks.append(rng.choice(members, min(len(members), SYNTHESIS_SAMPLES_PER_CLASS), replace=False))
    if not picks:
        return weight, seen
    index = np.sort(np.concatenate(picks))
    features = ray.get(_features.options(scheduling_strategy="DEFAULT").remote(
        parent.card, parent.state, ray.put(train_set.images[index])))
    return synthesise_old_classifier(weight, seen, torch.tensor(features),
                                     torch.from_numpy(train_set.labels[index]), parent.card["spec"]["classifier"])


@ray.remote(num_cpus=1)
def _features(card, state, images):
    return model_features(module_from_state(card, state), images)


@ray.remote(num_cpus=1)
def _extract_pairs(chain, target, images, batch_size):
    """(s(x), phi_target(x)) for the training images: s is the source chain as the gallery would store it."""
    first = module_from_state(*chain[0])
    source = embed_images(first, images, batch_size)
    source = upgrade_embeddings([module_from_state(*c) for c in chain[1:]], source)
    target_model = module_from_state(*target)
    return source, model_features(target_model, images, batch_size)
