"""The evaluation protocol of an upgrade sequence (DESIGN.md section 3), on embeddings already in memory.

The test split is both query and gallery (leave-one-out: self-matches are excluded by sample id). For step t:

- old_self        phi_{t-1} / phi_{t-1}(G)
- new_self        phi_t / phi_t(G)         (the backfill upper bound; forbidden in production, computed for evaluation)
- backward        phi_t / v1               (BCT alone: the gallery is never upgraded)
- backward_prev   phi_t / phi_{t-1}(G)     (BCT's pairwise compatibility)
- forward         phi_t / v_t              (BiCT: v_t = psi_{t-1->t}(v_{t-1}); with BCT only the deployed
                                           gallery stays v1, so forward equals backward)
- deployed_before phi_{t-1} / v_{t-1}      (the system before this step)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bict_ray.retrieval.metrics import retrieval_metrics


@dataclass
class Embedded:
    """(N, D) float32 L2-normalised embeddings of the test split, aligned with ``ids`` and ``labels``."""

    embeddings: np.ndarray
    ids: np.ndarray
    labels: np.ndarray


@dataclass
class SequenceEmbeddings:
    """What the protocol compares: per model t, its query embeddings, and per step t, gallery version v_t."""

    queries: dict[int, Embedded] = field(default_factory=dict)  # phi_t(test images)
    galleries: dict[int, Embedded] = field(default_factory=dict)  # gallery version v_t, as stored


def step_tests(data: SequenceEmbeddings, t: int, ks=(1, 5, 10), map_at=None) -> dict[str, dict]:
    """The named tests of step t (t >= 2), each a dict of metrics."""
    q_new, q_old = data.queries[t], data.queries[t - 1]
    pairs = {"old_self": (q_old, q_old), "new_self": (q_new, q_new), "backward": (q_new, data.galleries[1]),
             "backward_prev": (q_new, q_old)}
    pairs["forward"] = (q_new, deployed_gallery(data, t))
    pairs["deployed_before"] = (q_old, deployed_gallery(data, t - 1))
    return {name: evaluate(q, g, ks, map_at) for name, (q, g) in pairs.items()}


def deployed_gallery(data: SequenceEmbeddings, t: int) -> Embedded:
    """The gallery as deployed after step t: v_t, or with BCT only (no psi) the newest version before it (v1)."""
    return data.galleries[max(k for k in data.galleries if k <= t)]


def compatibility_matrix(data: SequenceEmbeddings, ks=(1, 5, 10), map_at=None) -> dict:
    """Every query model against every gallery version; a cell is None where the dims differ."""
    queries, galleries = sorted(data.queries), sorted(data.galleries)
    cells = {"mAP": [], "R@1": []}
    for s in queries:
        row = {"mAP": [], "R@1": []}
        for t in galleries:
            q, g = data.queries[s], data.galleries[t]
            result = evaluate(q, g, ks, map_at) if q.embeddings.shape[1] == g.embeddings.shape[1] else None
            for key in row:
                row[key].append(None if result is None else result[key])
        for key in cells:
            cells[key].append(row[key])
    return {"queries": [f"phi_{s}" for s in queries], "galleries": [f"v{t}" for t in galleries], **cells}


def partial_refresh(data: SequenceEmbeddings, t: int, fractions, seed: int = 0, ks=(1, 5, 10),
                    map_at=None) -> list[dict]:
    """phi_t against a gallery where only ``fraction`` of the rows are upgraded to v_t, the rest still in v_{t-1}.

    This is the state of a gallery while an upgrade is rolling out: fraction 0 is phi_t against the deployed
    v_{t-1} (compatible through BCT), fraction 1 is ``forward``. Rows are chosen by a seeded permutation.
    """
    new, old = data.galleries[t], data.galleries[t - 1]
    if not np.array_equal(new.ids, old.ids):
        order_new, order_old = np.argsort(new.ids), np.argsort(old.ids)
        new = Embedded(new.embeddings[order_new], new.ids[order_new], new.labels[order_new])
        old = Embedded(old.embeddings[order_old], old.ids[order_old], old.labels[order_old])
    order = np.random.default_rng(seed).permutation(len(new.ids))
    curve = []
    for fraction in fractions:
        upgraded = np.zeros(len(new.ids), dtype=bool)
        upgraded[order[: int(round(fraction * len(order)))]] = True
        mixed = Embedded(np.where(upgraded[:, None], new.embeddings, old.embeddings), new.ids, new.labels)
        result = evaluate(data.queries[t], mixed, ks, map_at)
        curve.append({"step": t, "fraction": float(fraction), "mAP": result["mAP"], "R@1": result["R@1"]})
    return curve


def evaluate(query: Embedded, gallery: Embedded, ks=(1, 5, 10), map_at=None) -> dict:
    return retrieval_metrics(query.embeddings, query.labels, gallery.embeddings, gallery.labels,
                             query_ids=query.ids, gallery_ids=gallery.ids, ks=tuple(ks), map_at=map_at)
