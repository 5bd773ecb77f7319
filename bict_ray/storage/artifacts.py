"""Trained models and transforms on disk: ``weights.pt`` (a state_dict) plus a ``model.json`` card.

Loading uses ``torch.load(..., weights_only=True)``: a checkpoint can never execute code. An artifact folder is
written to a staging folder and renamed into place, so a folder that exists is complete, and an existing one is
never overwritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bict_ray.core.models import EmbeddingNet, UpgradeTransform
from bict_ray.errors import AlreadyExistsError, ArtifactError

WEIGHTS = "weights.pt"
CARD = "model.json"


@dataclass
class Artifact:
    """A loaded model or transform: the module (eval mode), its card and its folder."""

    module: nn.Module
    card: dict[str, Any]
    path: Path

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()


def save_artifact(path: str | Path, module: nn.Module, card: dict[str, Any]) -> dict[str, Any]:
    """Write ``module``'s weights and ``card`` (plus spec, sha256, created) to ``path``; refuse to overwrite."""
    path = Path(path)
    if (path / CARD).exists():
        raise AlreadyExistsError(f"{path} already holds a trained artifact; it is never overwritten")
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    payload = buffer.getvalue()
    card = {**card, "spec": module.spec, "weights": WEIGHTS, "sha256": hashlib.sha256(payload).hexdigest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    staging = path.with_name(path.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / WEIGHTS).write_bytes(payload)
    (staging / CARD).write_text(json.dumps(card, indent=2, default=_jsonable))
    if path.exists():  # an empty or partial folder left by a crash before the rename
        shutil.rmtree(path)
    staging.rename(path)
    return card


def load_artifact(path: str | Path) -> Artifact:
    """Rebuild the module from its card's spec and load its weights (weights_only=True), in eval mode."""
    path = Path(path)
    card_path = path / CARD
    if not card_path.is_file():
        raise ArtifactError(f"{path} is not a trained model or transform (no {CARD})")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{card_path} is not valid JSON: {err}") from None
    weights_path = path / card.get("weights", WEIGHTS)
    try:
        payload = weights_path.read_bytes()
    except OSError as err:
        raise ArtifactError(f"cannot read {weights_path}: {err}") from None
    if card.get("sha256") and hashlib.sha256(payload).hexdigest() != card["sha256"]:
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


def build_module(card: dict[str, Any]) -> nn.Module:
    if card.get("kind") == "transform":
        return UpgradeTransform.from_spec(card["spec"])
    return EmbeddingNet.from_spec(card["spec"])


def module_from_state(card: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a module from a card and a state_dict that travelled by value (to a Ray worker)."""
    module = build_module(card)
    module.load_state_dict(state)
    return module.eval()


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
