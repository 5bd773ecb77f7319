"""The evaluation protocol of an upgrade sequence (docs/PROTOCOL.md), every test through the sharded driver.

The queries and the gallery G are the test split as the retrieval protocol cuts it (``eval.protocol``,
``bict_ray.core.data.PROTOCOLS``): under leave_one_out both are the whole test split (self-matches are excluded by
sample id), under query_gallery two disjoint sets. For step t:

- old_self        phi_{t-1} / phi_{t-1}(G)
- new_self        phi_t / phi_t(G)         (the backfill upper bound; forbidden in production, computed for evaluation)
- backward        phi_t / v1               (BCT alone: the gallery is never upgraded)
- backward_prev   phi_t / phi_{t-1}(G)     (BCT's pairwise compatibility)
- forward         phi_t / v_t              (BiCT: v_t = psi_{t-1->t}(v_{t-1}); with BCT only the deployed
                                           gallery stays v1, so forward equals backward)
- deployed_before phi_{t-1} / v_{t-1}      (the system before this step)

Every test runs ``bict_ray.retrieval.sharded.sharded_retrieval_metrics`` with the executor it is given. A gallery
version v_t is read from its shards (a committed ``GalleryVersion``, never whole into memory); phi_s(G), the
gallery images embedded by model s and held in memory (``SequenceEmbeddings.gallery_embedded``; under
leave_one_out the queries themselves), is cut into shards of ``rows_per_shard`` rows, so that both run the same
code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bict_ray.errors import GalleryError
from bict_ray.retrieval.shard import Shard, ShardList, ShardSource
from bict_ray.retrieval.sharded import IN_PROCESS, ShardExecutor, sharded_retrieval_metrics


@dataclass(frozen=True)
class NamedTest:
    """One of the tests of step t: its key in results.json, how tables name it (one line, or two for a terminal),
    its query model and gallery, and what it measures."""

    name: str
    label: str
    column: tuple[str, str]
    query: str
    gallery: str
    meaning: str


# the tests of every step, in the order reports show them; the one definition of their names
NAMED_TESTS = (
    NamedTest("old_self", "old self", ("old self", ""), "φ_{t−1}", "φ_{t−1}'s gallery", "before the upgrade"),
    NamedTest("new_self", "new self", ("new self", ""), "φ_t", "φ_t's gallery",
              "the upper bound, which needs the backfill privacy forbids"),
    NamedTest("backward", "backward (BCT only)", ("backward", "BCT only"), "φ_t", "the never-upgraded gallery v1",
              "BCT alone"),
    NamedTest("backward_prev", "backward prev", ("backward", "prev"), "φ_t", "φ_{t−1}'s embeddings of the gallery",
              "BCT's pairwise compatibility"),
    NamedTest("forward", "forward (BiCT)", ("forward", "BiCT"), "φ_t", "v_t = ψ_{t−1→t}(v_{t−1})",
              "the gallery upgraded from embeddings alone"),
    NamedTest("deployed_before", "deployed before", ("deployed", "before"), "φ_{t−1}", "v_{t−1}",
              "what users had before this upgrade"),
)
TESTS = tuple(test.name for test in NAMED_TESTS)


@dataclass
class Embedded:
    """(N, D) float32 L2-normalised embeddings of a set of images (queries or gallery), aligned with ``labels`` and
    ``ids``."""

    embeddings: np.ndarray
    labels: np.ndarray
    ids: np.ndarray


@dataclass
class SequenceEmbeddings:
    """What the protocol compares: per model t, its query embeddings and its embeddings of the gallery images,
    and per step t, gallery version v_t.

    galleries: shard sources with a ``dim`` (committed ``GalleryVersion``s); partial refresh also reads their
    ``shard_rows``. gallery_embedded: phi_t(G) where the gallery is another set than the queries
    (eval.protocol=query_gallery); a model absent from it has its queries as phi_t(G) (leave_one_out).
    rows_per_shard: the shards phi_t(G) is cut into when it serves as a gallery.
    """

    queries: dict[int, Embedded] = field(default_factory=dict)  # phi_t(query images)
    galleries: dict[int, ShardSource] = field(default_factory=dict)  # gallery version v_t, as stored
    rows_per_shard: int = 4096
    gallery_embedded: dict[int, Embedded] = field(default_factory=dict)  # phi_t(gallery images), when not queries
    # every test scored so far, by the objects it compared and its metric settings (``score``): the tests of a
    # sequence repeat pairs (step t+1's old self is step t's new self, its deployed before step t's forward; five of
    # the matrix's cells are step tests; partial refresh ends at forward), and each costs a full exact search
    scores: dict = field(default_factory=dict, repr=False)


def step_tests(data: SequenceEmbeddings, t: int, ks=(1, 5, 10), map_at=None,
               executor: ShardExecutor = IN_PROCESS) -> dict[str, dict]:
    """The named tests of step t (t >= 2), each a dict of metrics."""
    q_new, q_old = data.queries[t], data.queries[t - 1]
    pairs = {"old_self": (q_old, embedded_gallery(data, t - 1)), "new_self": (q_new, embedded_gallery(data, t)),
             "backward": (q_new, data.galleries[1]), "backward_prev": (q_new, embedded_gallery(data, t - 1)),
             "forward": (q_new, deployed_gallery(data, t)), "deployed_before": (q_old, deployed_gallery(data, t - 1))}
    return {name: score(data, *pairs[name], ks, map_at, executor) for name in TESTS}


def score(data: SequenceEmbeddings, query: Embedded, gallery: Embedded | ShardSource, ks=(1, 5, 10), map_at=None,
          executor: ShardExecutor = IN_PROCESS) -> dict:
    """``evaluate(query, gallery)``, once per pair of objects and metric settings in ``data.scores``: a pair asked
    for again gets the metrics it got (the same arrays give the same numbers, whatever executor runs them).
    ``gallery``: a version as stored, or phi_s(G) in memory (``embedded_gallery``), cut into shards here."""
    key = (id(query), id(gallery), tuple(ks), map_at)
    if key not in data.scores:
        source = gallery if not isinstance(gallery, Embedded) else ShardList.split(
            gallery.embeddings, gallery.labels, gallery.ids, data.rows_per_shard)
        # the objects themselves are kept with the metrics: their ids must not be reused while the key is stored
        data.scores[key] = (query, gallery, evaluate(query, source, ks, map_at, executor))
    return data.scores[key][2]


def embedded_gallery(data: SequenceEmbeddings, s: int) -> Embedded:
    """phi_s(G), the gallery images embedded by model s: ``gallery_embedded[s]``, else (leave-one-out) the query
    set."""
    return data.gallery_embedded.get(s, data.queries[s])


def deployed_gallery(data: SequenceEmbeddings, t: int) -> ShardSource:
    """The gallery as deployed after step t: v_t, or with BCT only (no psi) the newest version before it (v1)."""
    return data.galleries[max(k for k in data.galleries if k <= t)]


def compatibility_matrix(data: SequenceEmbeddings, ks=(1, 5, 10), map_at=None,
                         executor: ShardExecutor = IN_PROCESS) -> dict:
    """Every query model against every gallery version; a cell is None where the dims differ."""
    queries, galleries = sorted(data.queries), sorted(data.galleries)
    cells = {"mAP": [], "R@1": []}
    for s in queries:
        row = {"mAP": [], "R@1": []}
        for t in galleries:
            q, g = data.queries[s], data.galleries[t]
            result = score(data, q, g, ks, map_at, executor) if q.embeddings.shape[1] == g.dim else None
            for key in row:
                row[key].append(None if result is None else result[key])
        for key in cells:
            cells[key].append(row[key])
    return {"queries": [f"phi_{s}" for s in queries], "galleries": [f"v{t}" for t in galleries], **cells}


def partial_refresh(data: SequenceEmbeddings, t: int, fractions, seed: int = 0, ks=(1, 5, 10),
                    map_at=None, executor: ShardExecutor = IN_PROCESS) -> list[dict]:
    """phi_t against a gallery where only ``fraction`` of the rows are upgraded to v_t, the rest still in v_{t-1}.

    This is the state of a gallery while an upgrade is rolling out: fraction 0 is phi_t against the deployed
    v_{t-1} (compatible through BCT), fraction 1 is ``forward``. Rows are chosen by a seeded permutation of the
    rows in stored order (shard by shard): the first round(fraction * N) of it are upgraded. The two ends are
    v_{t-1} and v_t themselves, scored once for the step tests and the matrix (``score``).
    """
    new, old = data.galleries[t], data.galleries[t - 1]
    num_rows = sum(new.shard_rows)
    order = np.random.default_rng(seed).permutation(num_rows)
    curve = []
    for fraction in fractions:
        upgraded = np.zeros(num_rows, dtype=bool)
        upgraded[order[: int(round(fraction * len(order)))]] = True
        mixed = PartialRefresh(new, old, upgraded)  # checks the two are one gallery, shard by shard
        if upgraded.all() or not upgraded.any():
            result = score(data, data.queries[t], new if upgraded.all() else old, ks, map_at, executor)
        else:
            result = evaluate(data.queries[t], mixed, ks, map_at, executor)
        curve.append({"step": t, "fraction": float(fraction), "mAP": result["mAP"], "R@1": result["R@1"]})
    return curve


class PartialRefresh:
    """A shard source mixing two versions of one gallery row by row: shard i is shard i of ``new`` where
    ``upgraded`` holds, of ``old`` elsewhere (labels and ids of ``new``).

    new, old: shard sources with ``shard_rows`` (v_t and v_{t-1}: an upgrade keeps every shard's ids, in order).
    upgraded: (N,) bool over the rows in stored order, shard after shard. Shard i of the two must hold the same ids
    in the same order: refused otherwise (``GalleryError`` naming the shard) when the shard is read.
    """

    def __init__(self, new: ShardSource, old: ShardSource, upgraded: np.ndarray):
        rows_new, rows_old = list(new.shard_rows), list(old.shard_rows)
        if rows_new != rows_old:
            index = next((i for i, (a, b) in enumerate(zip(rows_new, rows_old)) if a != b), None)
            what = (f"{len(rows_new)} and {len(rows_old)} shards" if index is None
                    else f"shard {index} holds {rows_new[index]} and {rows_old[index]} rows")
            raise GalleryError(f"partial refresh: {_name(new)} and {_name(old)} are not one gallery upgraded shard "
                               f"by shard ({what})")
        upgraded = np.asarray(upgraded, dtype=bool)
        if upgraded.shape != (sum(rows_new),):
            raise GalleryError(f"partial refresh: {upgraded.shape[0]} row flags for {sum(rows_new)} rows")
        self.new, self.old, self.upgraded = new, old, upgraded
        self.offsets = np.concatenate([[0], np.cumsum(rows_new)]).astype(np.int64)

    @property
    def num_shards(self) -> int:
        return self.new.num_shards

    @property
    def dim(self) -> int:
        return self.new.dim

    @property
    def shard_rows(self) -> list[int]:
        return list(self.new.shard_rows)

    def read_shard(self, index: int) -> Shard:
        new, old = self.new.read_shard(index), self.old.read_shard(index)
        if not np.array_equal(new.ids, old.ids):
            raise GalleryError(f"partial refresh: shard {index} holds other ids in {_name(self.new)} than in "
                               f"{_name(self.old)}: not one gallery upgraded shard by shard")
        mask = self.upgraded[self.offsets[index] : self.offsets[index + 1]]
        return Shard(np.where(mask[:, None], new.embeddings, old.embeddings), new.labels, new.ids)

    def __repr__(self) -> str:
        return f"PartialRefresh({_name(self.new)} over {_name(self.old)}, {int(self.upgraded.sum())} rows upgraded)"


def evaluate(query: Embedded, gallery: ShardSource, ks=(1, 5, 10), map_at=None,
             executor: ShardExecutor = IN_PROCESS) -> dict:
    """One test: ``query`` against ``gallery``, through the sharded driver."""
    return sharded_retrieval_metrics(query.embeddings, query.labels, gallery, query_ids=query.ids, ks=tuple(ks),
                                     map_at=map_at, executor=executor)


def _name(source) -> str:
    """A source by its path where it has one (a gallery version), else as it prints."""
    return getattr(source, "path", None) or repr(source)
