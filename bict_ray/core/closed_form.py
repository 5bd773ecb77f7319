"""A training-free upgrade transform: psi as a linear map fitted in closed form on the same training pairs.

Vector-database migration guides suggest exactly this for moving embeddings between models: learn a linear map
from old to new embeddings on a sample embedded by both. It is the arm the MLP psi has to beat to earn its cost.

- ``lstsq``: the affine map (W, b) minimising sum_i ||s_i W + b - n_i||^2 (ordinary least squares, float64);
- ``procrustes``: the orthogonal (semi-orthogonal when the dims differ) W maximising sum_i <s_i W, n_i>, no
  bias: orthogonal Procrustes, W = U V^T from the SVD of S^T N. It rotates the old space and cannot distort it.

s_i is the stored old embedding of training image i and n_i = phi_new(x_i) L2-normalised, the target of the MLP's
cosine term. The result is an ``UpgradeTransform`` with ``layers=0``, so it is saved, loaded and applied to
galleries exactly as a trained psi is; upgrades L2-normalise its output.
"""

from __future__ import annotations

import numpy as np
import torch

from bict_ray.core.models import UpgradeTransform
from bict_ray.errors import InputError

FIT_METHODS = ("lstsq", "procrustes")


def fit_linear_transform(source: np.ndarray, target: np.ndarray, method: str = "lstsq") -> UpgradeTransform:
    """psi fitted on (N, d_in) stored old embeddings ``source`` and (N, d_out) new-model features ``target``
    (normalised here) by ``method`` (one of ``FIT_METHODS``); returned in eval mode."""
    if method not in FIT_METHODS:
        raise InputError(f"unknown closed-form fit {method!r}; valid methods: {', '.join(FIT_METHODS)}")
    source, target = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if source.ndim != 2 or target.ndim != 2 or len(source) != len(target):
        raise InputError(f"closed-form fit needs (N, d_in) and (N, d_out) pairs, got {source.shape} and {target.shape}")
    if not (np.isfinite(source).all() and np.isfinite(target).all()):
        raise InputError("closed-form fit: the training pairs hold NaN or Inf")
    target = target / np.maximum(np.linalg.norm(target, axis=1, keepdims=True), 1e-12)
    d_in, d_out = source.shape[1], target.shape[1]
    if method == "lstsq":
        if len(source) <= d_in:
            raise InputError(f"least squares needs more training pairs than dims + 1: {len(source)} pairs, d_in={d_in}")
        design = np.hstack([source, np.ones((len(source), 1))])
        solution, *_ = np.linalg.lstsq(design, target, rcond=None)
        weight, bias = solution[:d_in], solution[d_in]
    else:
        u, _, vt = np.linalg.svd(source.T @ target, full_matrices=False)
        weight, bias = u @ vt, np.zeros(d_out)
    return _as_transform(weight, bias)


def _as_transform(weight: np.ndarray, bias: np.ndarray) -> UpgradeTransform:
    """The map x -> x W + b as a linear ``UpgradeTransform``, whose residual form (d_in == d_out) computes
    x + x L^T + c: there the Linear holds W - I."""
    d_in, d_out = weight.shape
    psi = UpgradeTransform(d_in, d_out, layers=0)
    linear = psi.mlp[-1]
    if psi.residual:
        weight = weight - np.eye(d_in)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight.T.astype(np.float32)))
        linear.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    return psi.eval()
