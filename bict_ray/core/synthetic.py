"""Synthetic gallery rows for scale runs: a gallery of any size in a model's space, from that model's class
structure, with no images behind it.

``class_structure`` measures, on a model's embeddings of real images, each class's mean direction and spread (the
root-mean-square distance of its embeddings to their mean). ``synthetic_shard`` draws shard i of a gallery from
it: each row a class drawn uniformly, its mean plus isotropic Gaussian noise of the class's spread, L2-normalised,
its id ``i * rows_per_shard + row``. Shard i depends on (seed, i) alone, so a pipeline that writes it can resume
to identical bytes. The rows search like the model's own embeddings only as far as a class is a Gaussian blob
around its mean: a scale run measures time and memory, and its mAP is the blobs', not a real gallery's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bict_ray.errors import InputError


@dataclass(frozen=True)
class ClassStructure:
    """means (C, D) float32, unit rows; spreads (C,) float32; classes (C,) int64, the labels the rows take."""

    means: np.ndarray
    spreads: np.ndarray
    classes: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])


def class_structure(embeddings: np.ndarray, labels: np.ndarray) -> ClassStructure:
    """Each class's mean direction and spread, from (N, D) L2-normalised embeddings and their (N,) labels."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    if embeddings.ndim != 2 or len(embeddings) != len(labels) or not len(labels):
        raise InputError(f"class_structure needs (N, D) embeddings and N labels, N > 0; got {embeddings.shape} and "
                         f"{labels.shape}")
    classes = np.unique(labels)
    means, spreads = [], []
    for c in classes:
        members = embeddings[labels == c]
        mean = members.mean(axis=0)
        spreads.append(np.sqrt(np.mean(np.sum((members - mean) ** 2, axis=1))))
        means.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
    return ClassStructure(np.stack(means).astype(np.float32), np.asarray(spreads, np.float32),
                          classes.astype(np.int64))


def synthetic_shard(structure: ClassStructure, index: int, rows: int, rows_per_shard: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shard ``index`` of a synthetic gallery of ``rows`` rows: (ids (n,) int64, labels (n,) int64, embeddings
    (n, D) float32, unit rows)."""
    first = index * rows_per_shard
    n = max(0, min(rows_per_shard, rows - first))
    rng = np.random.default_rng([seed, index])
    pick = rng.integers(0, len(structure.classes), n)
    noise = rng.standard_normal((n, structure.dim), dtype=np.float32)
    # E|noise * spread / sqrt(D)|^2 = spread^2: a row lies as far from its mean as the class's embeddings do
    noise *= (structure.spreads[pick] / np.float32(np.sqrt(structure.dim)))[:, None]
    embeddings = structure.means[pick] + noise
    embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), np.float32(1e-12))
    return np.arange(first, first + n, dtype=np.int64), structure.classes[pick], embeddings
