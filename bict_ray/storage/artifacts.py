"""Trained models and transforms on disk: ``weights.pt`` (a state_dict) plus a ``model.json`` card.

Loading uses ``torch.load(..., weights_only=True)``: a checkpoint can never execute code. An artifact folder is
written to a staging folder and renamed into place, so a folder that exists is complete, and an existing one is
never overwritten.

A ``ModelCard`` is the one description of a model that every layer reads: what it is (``kind``, ``spec``), which
space it defines or maps between (``name``; ``source`` and ``target`` for a transform), and how it was trained
(``training``: settings, per-epoch history, where the workers ran).

An old model brought from outside (the ``old_model`` config section, ``bict_ray.core.external``) is recorded by its
card alone: the section, its embedding dim and the sha256 of the service's files (``external_artifact``), never a
copy of its weights. Loading it, here or in a Ray worker, reads those files and refuses them if they changed. An
old model that is only its embeddings is read once, by the driver, and its table travels to the workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bict_ray.config import OldModelConfig
from bict_ray.core.external import INPUT_KINDS, OldEmbeddings, load_old_model, wrap_module
from bict_ray.core.models import EmbeddingNet, UpgradeTransform
from bict_ray.errors import AlreadyExistsError, ArtifactError, ConfigError, InputError
from bict_ray.storage.old_embeddings import read_old_embeddings

WEIGHTS = "weights.pt"
CARD = "model.json"
# card.kind -> the module class its spec rebuilds
KINDS: dict[str, type[nn.Module]] = {"embedding": EmbeddingNet, "transform": UpgradeTransform}


@dataclass
class ModelCard:
    """What a model folder says about its module (``model.json``).

    kind: one of ``KINDS``: "embedding" (phi_t) or "transform" (psi_{s->t}).
    name: "phi_2", "psi_1_2": the name a gallery's lineage records; an embedding model's name is its space.
    spec: the module's constructor arguments (``EmbeddingNet.spec`` / ``UpgradeTransform.spec``).
    version, classes_seen, parent: an embedding model's t, the classes it trained on (global labels), and the model
        it was trained compatible with.
    source, target: a transform's input and output spaces (the models whose embeddings it maps from and to).
    training: how it was trained (settings, ``history`` per epoch, ``workers``); free-form, for people and reports.
    sha256, created: set by ``save_artifact``.
    """

    kind: str
    name: str
    spec: dict[str, Any] = field(default_factory=dict)
    version: int | None = None
    classes_seen: list[int] | None = None
    parent: str | None = None
    source: str | None = None
    target: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    created: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"model card kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    @property
    def dim(self) -> int:
        """The dimension of the embeddings this module outputs."""
        return int(self.spec["d_out"] if self.kind == "transform" else self.spec["embedding_dim"])

    @classmethod
    def from_json(cls, raw: Any, where: str) -> ModelCard:
        """A card from its JSON mapping; unknown or missing keys are an ArtifactError naming ``where``."""
        if not isinstance(raw, dict):
            raise ArtifactError(f"{where} must hold a JSON object, got {type(raw).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ArtifactError(f"{where} has unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
        missing = [key for key in ("kind", "name", "spec") if key not in raw]
        if missing:
            raise ArtifactError(f"{where} lacks key(s) {', '.join(missing)}")
        try:
            return cls(**raw)
        except InputError as err:
            raise ArtifactError(f"{where}: {err}") from None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Artifact:
    """A model or transform in hand: the module (eval mode), its card, and its folder (None if never saved)."""

    module: nn.Module
    card: ModelCard
    path: Path | None = None

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """What a process that rebuilds the module needs besides the card (``module_from_state``): its weights; none
        for an old model from outside, which each process loads from the files its card names, but the table of an
        old model that is only its embeddings (read once, here)."""
        kind = _kind(self.card) if is_external(self.card) else None
        if kind == "module":
            return {"module": self.module}  # it exists only in this process: it travels itself (cloudpickle)
        return {} if kind in INPUT_KINDS else self.module.state_dict()

    @classmethod
    def of(cls, value: Artifact | str | Path | nn.Module, kind: str, name: str | None = None,
           **card_fields) -> Artifact:
        """What a caller has in hand as an Artifact: itself, a saved folder (path), or a module of ``kind``.

        A bare module (an ``EmbeddingNet`` or ``UpgradeTransform``) needs ``name``, the name its outputs' lineage
        records; ``card_fields`` (``source``, ``target``, ...) complete its card.
        """
        if isinstance(value, Artifact):
            artifact = value
        elif isinstance(value, (str, Path)):
            artifact = load_artifact(value)
        elif isinstance(value, KINDS[kind]):
            if not name:
                raise InputError(f"a {type(value).__name__} passed as a module needs a name (what lineage records)")
            artifact = cls(value.eval(), ModelCard(kind, name, dict(value.spec), **card_fields))
        else:
            raise InputError(f"expected a {kind} model folder, Artifact or {KINDS[kind].__name__}, "
                             f"got {type(value).__name__}")
        if artifact.card.kind != kind:
            raise InputError(f"{artifact.path or artifact.card.name} is a {artifact.card.kind} model, not a {kind}")
        return artifact


def save_artifact(path: str | Path, module: nn.Module, card: ModelCard) -> ModelCard:
    """Write ``module``'s weights and ``card`` (with the module's spec, sha256, created) to ``path``; never
    overwrites. Returns the card as written."""
    payload = _state_bytes(module)
    card = dataclasses.replace(card, spec=dict(module.spec), sha256=hashlib.sha256(payload).hexdigest())
    return _write_folder(Path(path), card, {WEIGHTS: payload})


def external_artifact(cfg: OldModelConfig, name: str, version: int = 1, module: nn.Module | None = None) -> Artifact:
    """The old model brought from outside (``cfg``: the ``old_model`` section, any kind but none) as the run's
    model ``name``: loaded (a module, or for ``embeddings`` the table of every row of its file), with a card whose
    spec is ``cfg`` itself, the embedding dim and the sha256 of every file it was loaded from. The card's sha256 names the model (the section and those hashes); ``save_external``
    writes it, and whoever rebuilds the module from it checks that the files are still those
    (``module_from_state``, ``load_artifact``). ``module``: the nn.Module of ``old_model.kind: module``, handed over
    from Python; it has no file, so its state_dict's sha256 names it instead."""
    if (module is not None) != (cfg.kind == "module"):
        raise InputError("old_model.kind=module needs the module passed from Python (run_sequence(config, out, "
                         "old_model=module))" if module is None else
                         f"a module was passed from Python, but old_model.kind is {cfg.kind!r}: set it to module")
    loaded = wrap_module(module, cfg) if module is not None else _load_external(cfg)
    files = {path: _file_sha256(path) for path in _model_files(cfg)}
    spec = {"old_model": dataclasses.asdict(cfg), "embedding_dim": loaded.dim, "files": files}
    if module is not None:
        spec["state_sha256"] = hashlib.sha256(_state_bytes(module)).hexdigest()
    module = loaded
    identity = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    card = ModelCard("embedding", name, spec, version=version, sha256=identity,
                     training={"trained": False, "source": module.source})
    return Artifact(module, card)


def save_external(path: str | Path, card: ModelCard) -> ModelCard:
    """Write an old model from outside's card (``external_artifact``) to ``path``: the card only, its weights stay
    in the service's files; never overwrites."""
    if not is_external(card):
        raise InputError(f"{card.name}'s card names no old model from outside (spec has no 'old_model')")
    return _write_folder(Path(path), card, {})


def is_external(card: ModelCard) -> bool:
    """Whether the card is an old model from outside's (``external_artifact``), not a model this project trained."""
    return card.kind == "embedding" and "old_model" in card.spec


def _write_folder(path: Path, card: ModelCard, files: dict[str, bytes]) -> ModelCard:
    """Stage ``files`` and the card (stamped ``created``) and rename the folder into place; never overwrites."""
    if (path / CARD).exists():
        raise AlreadyExistsError(f"{path} already holds a trained artifact; it is never overwritten")
    card = dataclasses.replace(card, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    staging = path.with_name(path.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, payload in files.items():
        (staging / name).write_bytes(payload)
    (staging / CARD).write_text(json.dumps(card.to_json(), indent=2, default=_jsonable))
    if path.exists():  # an empty or partial folder left by a crash before the rename
        shutil.rmtree(path)
    staging.rename(path)
    return card


def load_artifact(path: str | Path) -> Artifact:
    """Rebuild the module from its card's spec and load its weights (weights_only=True), in eval mode."""
    path = Path(path)
    card_path = path / CARD
    card = read_card(path)
    if is_external(card):
        return Artifact(_external_module(card, str(card_path)), card, path)
    weights_path = path / WEIGHTS
    try:
        payload = weights_path.read_bytes()
    except OSError as err:
        raise ArtifactError(f"cannot read {weights_path}: {err}") from None
    if card.sha256 and hashlib.sha256(payload).hexdigest() != card.sha256:
        raise ArtifactError(f"{weights_path} does not match the checksum in {card_path}: the file is corrupt")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged or unsafe files
        raise ArtifactError(f"cannot load {weights_path}: {err}") from None
    module = build_module(card)
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ArtifactError(f"{weights_path} does not fit the architecture in {card_path}: {err}") from None
    module.eval()
    return Artifact(module, card, path)


def read_card(path: str | Path) -> ModelCard:
    """The card of the model folder ``path``, without loading the model."""
    card_path = Path(path) / CARD
    if not card_path.is_file():
        raise ArtifactError(f"{path} is not a trained model or transform (no {CARD})")
    try:
        raw = json.loads(card_path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{card_path} is not valid JSON: {err}") from None
    return ModelCard.from_json(raw, str(card_path))


def build_module(card: ModelCard) -> nn.Module:
    """An untrained module of the card's kind and spec."""
    if is_external(card):
        raise InputError(f"{card.name} is an old model from outside: it is loaded from its files "
                         "(module_from_state), never built untrained")
    return KINDS[card.kind].from_spec(card.spec)


def module_from_state(card: ModelCard, state: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a module from a card and a state_dict that travelled by value (to a Ray worker). An old model from
    outside travels as its card alone and is loaded here from the files it names, which must be those the run
    recorded: on a cluster they must be readable at the same path on every node."""
    if is_external(card):
        if _kind(card) == "embeddings" and state:  # the table read by the driver: no file to read again
            return OldEmbeddings(state["ids"], state["table"], card.training.get("source", card.name))
        if _kind(card) == "module" and state:
            return state["module"]
        return _external_module(card, f"{card.name}'s card")
    module = build_module(card)
    module.load_state_dict(state)
    return module.eval()


def _external_module(card: ModelCard, where: str) -> nn.Module:
    """Load the old model a card from ``external_artifact`` names, refusing files that are gone or changed."""
    if _kind(card) == "module":
        raise ArtifactError(f"{where}: {card.name} is a module that was passed from Python; it has no file to load "
                            "from: pass it again (old_model=)")
    for path, recorded in card.spec["files"].items():
        if not os.path.isfile(path):
            raise ArtifactError(f"{where}: {card.name} is the old model loaded from {path}, which is gone (on this "
                                f"node: {socket.gethostname()}); restore it, or start a new run directory")
        if _file_sha256(path) != recorded:
            raise ArtifactError(f"{where}: {card.name} is the old model loaded from {path}, which has changed since "
                                f"the run recorded it (sha256 {recorded[:16]}...); restore that file, or start a new "
                                "run directory for the new model")
    try:
        cfg = OldModelConfig(**card.spec["old_model"])
    except (TypeError, ConfigError) as err:
        raise ArtifactError(f"{where}: its old_model section is not valid: {err}") from None
    module = _load_external(cfg)
    if module.dim != card.spec["embedding_dim"]:
        raise ArtifactError(f"{where}: {card.name} embedded in {card.spec['embedding_dim']} dims when recorded, "
                            f"{module.dim} now ({module.source})")
    return module


def _load_external(cfg: OldModelConfig) -> nn.Module:
    """The old model ``cfg`` names: a module (``load_old_model``), or the table of its embeddings."""
    if cfg.kind == "embeddings":
        ids, table = read_old_embeddings(cfg)
        return OldEmbeddings(ids, table, f"embeddings {os.path.abspath(cfg.path)}")
    return load_old_model(cfg)


def _kind(card: ModelCard) -> str:
    return card.spec["old_model"]["kind"]


def _model_files(cfg: OldModelConfig) -> list[str]:
    """The files an old model from outside is loaded from (a python factory's code is not among them: it is
    whatever PYTHONPATH holds)."""
    return [os.path.abspath(p) for p in (cfg.path, cfg.weights) if p]


def _state_bytes(module: nn.Module) -> bytes:
    """``module``'s state_dict as ``torch.save`` writes it: what weights.pt holds, and what its sha256 hashes."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getvalue()


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
