"""Turning images into stored embeddings, and stored embeddings into upgraded ones (plain torch, no Ray).

The same two functions serve training (psi's training pairs), extraction, gallery upgrades and evaluation, so the
representation the gallery stores and the one psi learns from can never drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from bict_ray.core.models import FoldedTransform, UpgradeTransform
from bict_ray.errors import InputError


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) uint8 -> float32 in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def takes_images(model: nn.Module) -> bool:
    """Whether ``model`` maps uint8 images to its input itself: an old model from outside does
    (``bict_ray.core.external.ExternalModel``, trained on an input of its own); the project's models see
    ``preprocess``'s [-1, 1] floats."""
    return bool(getattr(model, "takes_images", False))


def takes_ids(model: nn.Module) -> bool:
    """Whether ``model`` looks images up by id instead of computing from their pixels: an old model of which only
    its embeddings are left (``bict_ray.core.external.OldEmbeddings``)."""
    return bool(getattr(model, "takes_ids", False))


def model_input(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What ``model`` is called on for a (N, C, H, W) uint8 batch."""
    return images if takes_images(model) else preprocess(images)


@torch.no_grad()
def frozen_features(model: nn.Module, images: torch.Tensor, ids: torch.Tensor | np.ndarray | None = None
                    ) -> torch.Tensor:
    """A frozen model's (N, D) features of a uint8 batch, what a compat loss compares the new model's with and a
    synthesised classifier averages: the project's un-normalised features (what its classifier sees), or an old
    model from outside's unit embeddings (it has nothing else; an embeddings-only one looks up the images' ``ids``)."""
    if takes_ids(model):
        return _looked_up(model, images, ids).to(images.device)
    x = model_input(model, images)
    return model.embed(x) if takes_images(model) else model(x)[0]


@torch.no_grad()
def embed_images(model: nn.Module, images: np.ndarray, batch_size: int = 512,
                 device: torch.device | str = "cpu", ids: np.ndarray | None = None) -> np.ndarray:
    """phi(x) for (N, C, H, W) uint8 images -> (N, D) float32, L2-normalised (what a gallery stores). ``ids``: the
    images' ids, which an old model that is only its embeddings looks up (``takes_ids``); others ignore them."""
    if takes_ids(model):
        return _looked_up(model, images, ids).numpy()
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = model_input(model, torch.from_numpy(np.array(images[start:start + batch_size])).to(device))
        out.append(model.embed(batch).cpu())
    model.train(was_training)
    dim = model.embedding_dim
    return torch.cat(out).numpy() if out else np.empty((0, dim), np.float32)


@torch.no_grad()
def model_features(model: nn.Module, images: np.ndarray, batch_size: int = 512,
                   device: torch.device | str = "cpu", ids: np.ndarray | None = None) -> np.ndarray:
    """``frozen_features`` of (N, C, H, W) uint8 images, (N, D) float32: for synthesising classifier rows, and psi's
    training targets."""
    if takes_ids(model):
        return _looked_up(model, images, ids).numpy()
    was_training = model.training
    model.eval()
    out = [frozen_features(model, torch.from_numpy(np.array(images[s:s + batch_size])).to(device)).cpu()
           for s in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy()


def _looked_up(model: nn.Module, images, ids) -> torch.Tensor:
    """An embeddings-only old model's rows of the images ``ids``, refused without ids for every image."""
    if ids is None:
        raise InputError(f"{model.source}: the old model is only its embeddings, looked up by image id: the caller "
                         "must pass the images' ids")
    if len(ids) != len(images):
        raise InputError(f"{model.source}: {len(ids)} ids for {len(images)} images")
    return model.lookup(ids)


# Rows per block when applying psi: the hidden activations of a block (1,024 x 512 floats, 2 MB) stay in the
# core's cache, where a whole 4,096-row shard at once spills them to memory, so blocks are faster (measured:
# BENCHMARKS.md, section "Figures behind code choices"). Fixed, not a setting: a row's bytes may depend on the block
# shape, and an upgrade must give the same bytes whatever runs it.
UPGRADE_BLOCK_ROWS = 1024


# The number formats psi may compute in during an upgrade (its input and output stay float32). bfloat16 keeps
# float32's range with an 8-bit mantissa: on CPUs with AVX512-BF16 or AMX the matmuls run natively and much faster
# than in float32 (measured: BENCHMARKS.md, section "Figures behind code choices"); the inputs, weights and
# activations round to 8 significant bits, which moves the rows slightly and the mAP hardly at all (measured on the
# demo's trained psi: BENCHMARKS.md, section "Gallery upgrade"). Elsewhere torch emulates it, slower than float32.
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def inference_form(psi: nn.Module | FoldedTransform, precision: str = "float32") -> nn.Module | FoldedTransform:
    """psi as upgrades apply it: an ``UpgradeTransform`` folded (``UpgradeTransform.folded``) and computing in
    ``precision`` (one of ``PRECISIONS``), any other module in eval mode (float32 only). Fold once and pass the result
    to ``upgrade_embeddings`` when applying psi to many shards."""
    dtype = _precision(precision)
    if not isinstance(psi, FoldedTransform):
        psi.eval()
        if not isinstance(psi, UpgradeTransform):
            if dtype != torch.float32:
                raise InputError(f"precision {precision!r} applies to UpgradeTransform only, got {type(psi).__name__}")
            return psi
        psi = psi.folded()
    return psi if psi.dtype == dtype else psi.to(dtype)


@torch.no_grad()
def upgrade_embeddings(transforms: Sequence[nn.Module | FoldedTransform],
                       embeddings: np.ndarray | torch.Tensor, precision: str = "float32") -> np.ndarray:
    """Apply psi_{s->s+1}, then the next, ... to (N, D) stored embeddings; each output is L2-normalised, float32.

    Normalising after every transform keeps each intermediate exactly what that gallery version stores.
    Each transform runs in its ``inference_form`` in ``precision`` (see ``PRECISIONS``), in blocks of
    ``UPGRADE_BLOCK_ROWS``.
    """
    # a copy: Parquet-backed arrays are read-only, and psi must not write into the caller's rows
    x = torch.tensor(np.asarray(embeddings, dtype=np.float32))
    for psi in transforms:
        apply = inference_form(psi, precision)
        out = x.new_empty((len(x), psi.spec["d_out"]))
        for start in range(0, len(x), UPGRADE_BLOCK_ROWS):
            block = apply(x[start:start + UPGRADE_BLOCK_ROWS])
            torch.div(block, block.norm(dim=1, keepdim=True).clamp_min_(1e-12), out=out[start:start + len(block)])
        x = out
    return x.numpy()


def _precision(name: str) -> torch.dtype:
    if name not in PRECISIONS:
        raise InputError(f"precision must be one of {sorted(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]
