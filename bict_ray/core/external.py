"""The old model phi_old brought from outside: a service's deployed embedding model as a frozen module of the method.

A team upgrading its retrieval service already has phi_old and a gallery it made; it does not train phi_1. The
``old_model`` config section (``bict_ray.config.OldModelConfig``, docs/OLD_MODEL.md) says in which form the service
kept it, one of ``OLD_MODEL_KINDS``:

- ``torchscript``: a scripted or traced module, ``torch.jit.load``-ed on the CPU;
- ``torchvision``: a torchvision classification architecture and a local state_dict (never a download), the
  embedding taken at a named graph node or, by default, at the input of the head's final Linear;
- ``python``: ``package.module:factory`` returning an ``nn.Module``, optionally with a local state_dict;
- ``embeddings``: no model, only its embeddings by image id, read by ``bict_ray.storage.old_embeddings`` (a
  Parquet table is storage's, not the method's) into ``OldEmbeddings``, which stands where the model would.

What the training pipeline uses from this module:

- ``load_old_model(cfg)`` -> ``ExternalModel``, standing where a trained phi_1 stands: ``embed(images)`` maps the
  project's (N, C, H, W) **uint8** images (not the [-1, 1] floats that ``bict_ray.core.embed.preprocess`` makes
  for the project's own models) to (N, ``dim``) float32 L2-normalised embeddings, the space of the gallery the
  service keeps; ``source`` says what was loaded, for the run's record. It has no classifier (``classifier`` is
  None) and its weights are the service's files, never copied: a run records it as a card naming those files and
  their hashes (``bict_ray.storage.artifacts.external_artifact``), and every process that needs it (a Ray Train
  worker, a gallery task) loads it from them. It is only ever run, never trained.
- ``class_mean_classifier(old_embeddings, labels, num_classes)``: the old classifier BCT's loss needs, made from
  phi_old's embeddings of the new training set (each class's row the normalised mean of its embeddings), for
  ``BCTLoss(weight, "cosine", scale, valid_mask)``.

Plain torch (torchvision for the ``torchvision`` kind); no Ray, no files but the ones the config names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bict_ray.core.foreign import (PROBE_ROWS, call_factory, final_linear, first_line, load_state, read_state_dict,
                                   torchvision_architectures)
from bict_ray.core.losses import synthesise_old_classifier
from bict_ray.errors import InputError

if TYPE_CHECKING:
    from bict_ray.config import OldModelConfig

# old_model.kind: "none" = the run trains its own phi_1 (the default); the next three are loaded here from files;
# "module" is an nn.Module handed over from Python; "embeddings" brings phi_old's embeddings by image id only
# (bict_ray.storage.old_embeddings)
OLD_MODEL_KINDS = ("none", "torchscript", "torchvision", "python", "module", "embeddings")
MODEL_KINDS = ("torchscript", "torchvision", "python")
# the kinds whose model takes the project's images through an InputMapping: those loaded from files, and "module", an
# nn.Module handed over from Python (run_sequence(..., old_model=module): a notebook's own model)
INPUT_KINDS = (*MODEL_KINDS, "module")

# ITU-R 601 luma, torchvision's Grayscale: a 3-channel image made 1-channel as a gray-scale model was trained on
LUMA = (0.299, 0.587, 0.114)


class InputMapping(nn.Module):
    """The project's (N, C, H, W) uint8 images -> the input the old model was trained on, (N, channels, size, size).

    x / 255, then the channels (1 -> 3 replicates the gray channel, 3 -> 1 takes the luma), then a bilinear
    resize to ``size`` x ``size`` (antialiased: a downscale that skips pixels aliases), then (x - mean) / std per
    channel. mean = std = 0.5 is the project's own [-1, 1] mapping; an ImageNet-trained model wants ImageNet's.
    """

    def __init__(self, channels: int, size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if channels not in (1, 3):
            raise InputError(f"the old model's input must have 1 or 3 channels, got {channels}")
        if size < 1:
            raise InputError(f"the old model's input size must be >= 1, got {size}")
        for name, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, channels):
                raise InputError(f"{name} must have 1 or {channels} values, got {list(values)}")
        if min(std) <= 0:
            raise InputError(f"std must be > 0, got {list(std)}")
        self.channels, self.size = int(channels), int(size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).expand(channels).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).expand(channels).reshape(1, -1, 1, 1))
        self.register_buffer("luma", torch.tensor(LUMA).reshape(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # a float input would be the project's [-1, 1] images (or already the model's): mapping it again is wrong
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise InputError(f"the old model takes (N, C, H, W) uint8 images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        x = images.to(self.mean.device).float().div_(255.0)
        if x.shape[1] != self.channels:
            if x.shape[1] == 1 and self.channels == 3:
                x = x.expand(-1, 3, -1, -1)
            elif x.shape[1] == 3 and self.channels == 1:
                x = (x * self.luma).sum(dim=1, keepdim=True)
            else:
                raise InputError(f"cannot make {x.shape[1]}-channel images into the old model's {self.channels}")
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std


class ExternalModel(nn.Module):
    """phi_old, frozen: the service's module behind its input mapping, with checked, L2-normalised output.

    ``embed(images)`` (also what calling it does): (N, C, H, W) uint8 -> (N, ``dim``) float32 unit rows. ``dim`` is
    found by one forward pass on a probe batch of the configured input shape. ``classifier`` is None: a service's
    head (if it kept one) classifies its own classes, not the dataset's. ``source``: what was loaded, in words.
    """

    classifier = None
    takes_images = True  # it maps the uint8 images itself (bict_ray.core.embed.model_input)

    def __init__(self, model: nn.Module, mapping: InputMapping, source: str):
        super().__init__()
        self.model, self.mapping, self.source = model, mapping, source
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.train(False)
        probe = torch.randint(0, 256, (PROBE_ROWS, mapping.channels, mapping.size, mapping.size), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(0))
        self.dim = int(self.embed(probe).shape[1])

    @property
    def embedding_dim(self) -> int:
        return self.dim

    def train(self, mode: bool = True) -> ExternalModel:
        # the old model is frozen as deployed: its BatchNorm statistics never move, its dropout never drops
        return super().train(False)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) uint8 -> (N, dim) float32, L2-normalised: the embedding the service's gallery stores."""
        x = self.mapping(images)
        try:
            out = self.model(x)
        except Exception as exc:  # anything a foreign module raises: name the input it was given
            raise InputError(f"{self.source}: the forward pass on input of shape {tuple(x.shape)} failed "
                             f"({type(exc).__name__}: {first_line(exc)}); check old_model.image_size, channels "
                             "and layer") from exc
        return F.normalize(self._checked(out, len(x)).float(), dim=1)

    forward = embed

    def _checked(self, out, rows: int) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise InputError(f"{self.source}: the model returns {type(out).__name__}, expected one (N, D) tensor")
        if out.dim() != 2 or out.shape[0] != rows:
            raise InputError(f"{self.source}: output of shape {tuple(out.shape)} for {rows} images, expected "
                             f"({rows}, D); name a layer whose output is one flat vector per image")
        finite = torch.isfinite(out).all(dim=1)
        if not finite.all():
            raise InputError(f"{self.source}: output row {int((~finite).nonzero()[0])} holds NaN or Inf")
        zero = out.norm(dim=1) == 0
        if zero.any():
            raise InputError(f"{self.source}: output row {int(zero.nonzero()[0])} is a zero vector (it has no "
                             "direction to retrieve by)")
        return out


class OldEmbeddings(nn.Module):
    """phi_old when only its embeddings are left (``old_model.kind: embeddings``): a table from image id to the
    embedding the service stored, standing where a model stands. ``lookup(ids)`` gives the (N, ``dim``) float32
    unit rows of those images (``takes_ids``: ``bict_ray.core.embed`` passes the images' ids, not their pixels);
    an image without a row is refused, naming it. It has no classifier and computes nothing: only the images the
    table holds have an old embedding. The table is two buffers, so it travels to a Ray worker as a state_dict.
    """

    classifier = None
    takes_ids = True

    def __init__(self, ids: np.ndarray | torch.Tensor, table: np.ndarray | torch.Tensor, source: str):
        super().__init__()
        ids, table = torch.as_tensor(np.asarray(ids, dtype=np.int64)), torch.as_tensor(np.asarray(table, np.float32))
        if ids.dim() != 1 or table.dim() != 2 or len(ids) != len(table):
            raise InputError(f"{source}: ids {tuple(ids.shape)} and embeddings {tuple(table.shape)} do not pair up")
        if len(ids) > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise InputError(f"{source}: the ids must be sorted and unique")
        self.register_buffer("ids", ids)
        self.register_buffer("table", table)
        self.source, self.dim = source, int(table.shape[1])

    @property
    def embedding_dim(self) -> int:
        return self.dim

    def lookup(self, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N,) image ids -> (N, dim) float32, their stored unit rows."""
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        slot = torch.searchsorted(self.ids, ids).clamp(max=max(len(self.ids) - 1, 0))
        hit = self.ids[slot] == ids if len(self.ids) else torch.zeros(len(ids), dtype=torch.bool)
        if not bool(hit.all()):
            missing = ids[~hit]
            raise InputError(f"{self.source}: no old embedding of image id {int(missing[0])} ({len(missing)} of "
                             f"{len(ids)} missing): with only the old model's embeddings, every image it is asked "
                             "for needs a row")
        return self.table[slot]


def wrap_module(module: nn.Module, cfg: OldModelConfig) -> ExternalModel:
    """``module``, handed over from Python (``old_model.kind: module``), as phi_old behind ``cfg``'s input mapping."""
    if cfg.kind != "module":
        raise InputError(f"a module passed from Python is old_model.kind=module, not {cfg.kind!r}")
    if not isinstance(module, nn.Module):
        raise InputError(f"old_model: expected a torch.nn.Module, got {type(module).__name__}")
    source = f"a module passed from Python ({type(module).__module__}.{type(module).__qualname__})"
    return ExternalModel(module, InputMapping(cfg.channels, cfg.image_size, cfg.mean, cfg.std), source)


def load_old_model(cfg: OldModelConfig) -> ExternalModel:
    """phi_old as ``cfg`` (the ``old_model`` section, kind one of ``MODEL_KINDS``) names it, in eval mode on the CPU.

    Raises ``InputError`` naming the file, factory or layer: a missing file, one that is not TorchScript, an unknown
    architecture (listing the valid ones), weights whose keys do not match (naming the missing and unexpected ones),
    a factory that cannot be imported or does not return an ``nn.Module``, an unknown layer, or an output on the
    probe batch that is not (N, D), holds NaN/Inf or a zero row.
    """
    if cfg.kind not in MODEL_KINDS:
        raise InputError(f"old_model.kind={cfg.kind!r} has no model to load (kinds with one: "
                         f"{', '.join(MODEL_KINDS)})")
    model, source = _LOADERS[cfg.kind](cfg)
    return ExternalModel(model, InputMapping(cfg.channels, cfg.image_size, cfg.mean, cfg.std), source)


def class_mean_classifier(old_embeddings: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                          num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BCT's old classifier for an old model that brings none: each class's row is the L2-normalised mean of its
    samples' normalised old embeddings (BCT's pseudo old classifier with every class synthesised).

    old_embeddings: (N, D) phi_old embeddings of the training images; labels: (N,) int64 in [0, num_classes).
    Returns ``(weight (num_classes, D), valid (num_classes,) bool)``: valid marks the classes with samples; a class
    without any keeps a zero row, which ``BCTLoss`` keeps out of its softmax. The rows are unit length: for the
    ``cosine`` classifier (a ``linear`` one has no seen rows to take a norm from).
    """
    old_embeddings, labels = torch.as_tensor(old_embeddings), torch.as_tensor(labels)
    if old_embeddings.dim() != 2:
        raise InputError(f"old_embeddings must be (N, D), got shape {tuple(old_embeddings.shape)}")
    weight = torch.zeros(num_classes, old_embeddings.shape[1], dtype=torch.float32)
    unseen = torch.zeros(num_classes, dtype=torch.bool)  # phi_old trained on none of the dataset's classes
    return synthesise_old_classifier(weight, unseen, old_embeddings.float(), labels.long(), "cosine")


# --- the loaders: cfg -> (module, source) -------------------------------------------------------------------------


def _torchscript(cfg: OldModelConfig) -> tuple[nn.Module, str]:
    path = os.path.abspath(cfg.path)
    if not os.path.isfile(path):
        raise InputError(f"old_model.path {path!r}: no such file")
    try:
        model = torch.jit.load(path, map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError, ValueError or pickle errors for a file that is not one
        raise InputError(f"old_model.path {path!r} is not a TorchScript file (torch.jit.save of a scripted or "
                         f"traced module: {first_line(exc)}); a state_dict is old_model.kind torchvision or "
                         "python, with old_model.weights") from exc
    return model, f"torchscript {path}"


def _torchvision(cfg: OldModelConfig) -> tuple[nn.Module, str]:
    import torchvision  # imported here: only this kind needs it

    names = torchvision_architectures()
    if cfg.architecture not in names:
        raise InputError(f"old_model.architecture {cfg.architecture!r} is not a torchvision classification model; "
                         f"valid names: {', '.join(names)}")
    # weights=None: nothing is downloaded, the file is the weights
    model = torchvision.models.get_model(cfg.architecture, weights=None)
    weights = os.path.abspath(cfg.weights)
    state = read_state_dict(weights, "old_model.weights")
    head = final_linear(model)
    what = f"torchvision {cfg.architecture!r}"
    if cfg.layer is None:
        if head is None:
            raise InputError(f"{what} ends in no Linear layer to take the embedding before: name the embedding's "
                             "graph node in old_model.layer")
        prefix, parent, name, _ = head
        # stripped, the head needs no weights (a file saved without it loads too) and its size does not matter
        setattr(parent, name, nn.Identity())
        load_state(model, {k: v for k, v in state.items() if not k.startswith(prefix + ".")}, weights,
                   "old_model.weights", what)
        return model, f"torchvision {cfg.architecture} ({weights}), the input of {prefix}"
    if head is not None:
        # the service's head classifies its own classes: sized from the file, which then loads as it was saved
        prefix, parent, name, linear = head
        rows = state.get(f"{prefix}.weight")
        if rows is not None and rows.dim() == 2 and rows.shape[0] != linear.out_features:
            setattr(parent, name, nn.Linear(linear.in_features, rows.shape[0], bias=linear.bias is not None))
    load_state(model, state, weights, "old_model.weights", what)
    return _graph_node(model, cfg.layer, what), f"torchvision {cfg.architecture} ({weights}), layer {cfg.layer}"


def _python(cfg: OldModelConfig) -> tuple[nn.Module, str]:
    model = call_factory(cfg.factory, cfg.kwargs, "old_model")
    source = f"python {cfg.factory}({', '.join(f'{k}={v!r}' for k, v in cfg.kwargs.items())})"
    if cfg.weights is not None:
        weights = os.path.abspath(cfg.weights)
        load_state(model, read_state_dict(weights, "old_model.weights"), weights, "old_model.weights",
                   f"old_model.factory {cfg.factory!r}")
        source += f" ({weights})"
    return model, source


_LOADERS = {"torchscript": _torchscript, "torchvision": _torchvision, "python": _python}


def _graph_node(model: nn.Module, layer: str, what: str) -> nn.Module:
    """The sub-graph of ``model`` that returns graph node ``layer``'s output (torchvision's feature extraction)."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model.eval()
    nodes = get_graph_node_names(model)[1]  # the eval-mode graph: what embeddings are computed with
    if layer not in nodes:
        raise InputError(f"old_model.layer {layer!r} is not a node of {what}; its nodes: "
                         f"{', '.join(nodes)}")
    return _Node(create_feature_extractor(model, return_nodes={layer: "embedding"}))


class _Node(nn.Module):
    """A feature extractor's one output, as a tensor rather than a dict of one."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x)["embedding"]
