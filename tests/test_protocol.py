"""The evaluation protocol on hand-made embeddings: which gallery each named test uses, and that every test, run
through the sharded driver on committed gallery versions, gives the in-memory metrics."""

import numpy as np
import pytest

from bict_ray.errors import GalleryError
from bict_ray.retrieval.metrics import retrieval_metrics
from bict_ray.retrieval.protocol import (
    Embedded,
    PartialRefresh,
    SequenceEmbeddings,
    compatibility_matrix,
    partial_refresh,
    step_tests,
)
from bict_ray.storage.gallery import write_gallery

TESTS = ("old_self", "new_self", "backward", "backward_prev", "forward", "deployed_before")


def embedded(seed, n=40, d=8, classes=4):
    """The 40-image test split (ids 0..39, 4 classes) embedded by a made-up model: other seed, other embeddings."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return Embedded(x / np.linalg.norm(x, axis=1, keepdims=True), np.arange(n) % classes, np.arange(n))


def committed(tmp_path, name, e: Embedded, rows_per_shard=9, ids=None):
    """``e`` stored as committed gallery version ``name`` (shards of 9 rows: 5 shards, the last one of 4)."""
    return write_gallery(str(tmp_path / name), e.ids if ids is None else ids, e.labels, e.embeddings,
                         rows_per_shard=rows_per_shard, lineage=["phi_1"], space="phi_1")


def in_memory(query: Embedded, gallery: Embedded, **kwargs):
    return retrieval_metrics(query.embeddings, query.labels, gallery.embeddings, gallery.labels, query_ids=query.ids,
                             gallery_ids=gallery.ids, **kwargs)


def two_steps(tmp_path, rows_per_shard=7):
    """phi_1, phi_2 and gallery versions v1, v2: four different sets of embeddings of the same 40 images."""
    phi = {1: embedded(1), 2: embedded(2)}
    v = {1: embedded(11), 2: embedded(12)}
    data = SequenceEmbeddings(queries=phi, galleries={t: committed(tmp_path, f"v{t}", v[t]) for t in v},
                              rows_per_shard=rows_per_shard)
    return data, phi, v


def test_named_tests_use_the_right_galleries(tmp_path):
    data, phi, v = two_steps(tmp_path)
    tests = step_tests(data, 2)
    assert tuple(tests) == TESTS
    expected = {"old_self": (phi[1], phi[1]), "new_self": (phi[2], phi[2]), "backward": (phi[2], v[1]),
                "backward_prev": (phi[2], phi[1]), "forward": (phi[2], v[2]), "deployed_before": (phi[1], v[1])}
    # every query model against every gallery gives another mAP: a test that took a wrong pair cannot pass
    every_pair = {(q, g): in_memory(phi[q], gallery)["mAP"]
                  for q in phi for g, gallery in [("phi_1", phi[1]), ("phi_2", phi[2]), ("v1", v[1]), ("v2", v[2])]}
    assert len(set(every_pair.values())) == len(every_pair), every_pair
    for name, (query, gallery) in expected.items():
        assert tests[name]["mAP"] == pytest.approx(in_memory(query, gallery)["mAP"], abs=1e-12), name


@pytest.mark.parametrize("map_at", [None, 5])
def test_step_tests_through_the_driver_equal_the_in_memory_metrics(tmp_path, map_at):
    # galleries read shard by shard (9-row shards), query sets cut into 7-row shards: the same numbers as
    # retrieval_metrics on the whole arrays in memory
    data, phi, v = two_steps(tmp_path)
    tests = step_tests(data, 2, ks=(1, 5), map_at=map_at)
    pairs = {"old_self": (phi[1], phi[1]), "new_self": (phi[2], phi[2]), "backward": (phi[2], v[1]),
             "backward_prev": (phi[2], phi[1]), "forward": (phi[2], v[2]), "deployed_before": (phi[1], v[1])}
    for name, (query, gallery) in pairs.items():
        expected = in_memory(query, gallery, ks=(1, 5), map_at=map_at)
        assert tests[name].keys() == expected.keys(), name
        assert tests[name] == pytest.approx(expected, abs=1e-12), name


def test_a_query_set_as_gallery_never_reads_a_version(tmp_path, monkeypatch):
    # old_self, new_self and backward_prev use the queries in memory; the versions serve the other three tests
    data, _, _ = two_steps(tmp_path)
    read = []
    for t, version in data.galleries.items():
        original = version.read_shard
        monkeypatch.setattr(version, "read_shard", lambda i, t=t, original=original: read.append(t) or original(i))
    step_tests(data, 2)
    # backward and deployed_before read v1, forward reads v2; exact mAP reads each shard twice
    assert read.count(1) == 2 * 2 * 5 and read.count(2) == 2 * 5


def test_bct_only_keeps_v1_deployed_so_forward_is_backward(tmp_path):
    data = SequenceEmbeddings(queries={1: embedded(1), 2: embedded(2), 3: embedded(3)},
                              galleries={1: committed(tmp_path, "v1", embedded(11))}, rows_per_shard=7)
    tests = step_tests(data, 3)
    assert tests["forward"] == tests["backward"]
    assert tests["deployed_before"] == step_tests(data, 2)["backward"]  # phi_2 against v1


def test_partial_refresh_ends_at_deployed_and_forward(tmp_path):
    data, phi, v = two_steps(tmp_path)
    curve = partial_refresh(data, 2, [0.0, 0.5, 1.0], seed=3)
    tests = step_tests(data, 2)
    assert curve[-1]["mAP"] == pytest.approx(tests["forward"]["mAP"], abs=1e-12)
    assert curve[0]["mAP"] == pytest.approx(tests["backward"]["mAP"], abs=1e-12)  # phi_2 against v1 untouched
    # half way: the rows a seeded permutation picks, as the in-memory protocol always picked them
    upgraded = np.zeros(40, dtype=bool)
    upgraded[np.random.default_rng(3).permutation(40)[:20]] = True
    mixed = Embedded(np.where(upgraded[:, None], v[2].embeddings, v[1].embeddings), v[2].labels, v[2].ids)
    assert curve[1]["mAP"] == pytest.approx(in_memory(phi[2], mixed)["mAP"], abs=1e-12)
    assert curve[1]["R@1"] == in_memory(phi[2], mixed)["R@1"]
    assert curve[1]["mAP"] not in (curve[0]["mAP"], curve[-1]["mAP"])
    matrix = compatibility_matrix(data)
    assert matrix["mAP"][1][0] == pytest.approx(tests["backward"]["mAP"], abs=1e-12)
    assert matrix["queries"] == ["phi_1", "phi_2"] and matrix["galleries"] == ["v1", "v2"]


def test_partial_refresh_refuses_versions_whose_shard_ids_differ(tmp_path):
    old = committed(tmp_path, "v1", embedded(11))
    ids = np.arange(40)
    ids[18:27] += 1000  # shard 2 (rows 18..26) holds other images
    other_ids = committed(tmp_path, "v2", embedded(12), ids=ids)
    refresh = PartialRefresh(other_ids, old, np.ones(40, dtype=bool))
    refresh.read_shard(1)  # the shards before it mix fine
    with pytest.raises(GalleryError, match=r"partial refresh: shard 2 holds other ids in .*v2 than in .*v1"):
        refresh.read_shard(2)
    data = SequenceEmbeddings(queries={2: embedded(2)}, galleries={1: old, 2: other_ids})
    with pytest.raises(GalleryError, match="shard 2 holds other ids"):
        partial_refresh(data, 2, [0.5])
    # the same ids in another order are refused too: rows are mixed by position
    ids = np.arange(40)
    ids[9:18] = ids[9:18][::-1]
    with pytest.raises(GalleryError, match="shard 1 holds other ids"):
        PartialRefresh(committed(tmp_path, "v2_reordered", embedded(12), ids=ids), old, np.ones(40, bool)).read_shard(1)
    # other shard sizes: refused before any shard is read, naming the first shard that differs
    resharded = committed(tmp_path, "v2_resharded", embedded(12), rows_per_shard=10)
    with pytest.raises(GalleryError, match="shard 0 holds 10 and 9 rows"):
        PartialRefresh(resharded, old, np.ones(40, dtype=bool))


def test_separate_gallery_embeddings_serve_the_self_tests(tmp_path):
    # eval.protocol=query_gallery: phi_s(G) is phi_s of the gallery images (ids 100..139), not the queries (0..39)
    data, phi, v = two_steps(tmp_path)
    gallery = {t: embedded(20 + t) for t in (1, 2)}
    for e in gallery.values():
        e.ids = e.ids + 100
    data.gallery_embedded = gallery
    tests = step_tests(data, 2)
    expected = {"old_self": (phi[1], gallery[1]), "new_self": (phi[2], gallery[2]),
                "backward_prev": (phi[2], gallery[1])}
    # and not what the queries as gallery (leave-one-out) would give
    one_set = {"old_self": phi[1], "new_self": phi[2], "backward_prev": phi[1]}
    for name, (query, g) in expected.items():
        assert tests[name] == pytest.approx(in_memory(query, g), abs=1e-12), name
        assert tests[name]["mAP"] != pytest.approx(in_memory(query, one_set[name])["mAP"]), name


def tiny(vectors, labels, ids):
    return Embedded(np.asarray(vectors, dtype=np.float32), np.asarray(labels), np.asarray(ids))


# two queries and a gallery of four rows in 2-D; gallery row 0 is the first query's vector exactly
TINY_QUERIES = ([[1, 0], [0, 1]], [0, 1])
TINY_GALLERY = tiny([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1]], [0, 1, 0, 1], [0, 1, 2, 3])


@pytest.mark.parametrize("query_ids, mAP, r1", [
    # separate sets: no query is in the gallery, so none is excluded. Query 0 ranks rows 0+, 1-, 2+ (AP = (1/1 + 2/3)
    # / 2 = 5/6), query 1 ranks 3+, 2-, 1+ (AP 5/6); both find a positive first
    ([100, 101], 5 / 6, 1.0),
    # the queries are gallery rows 0 and 3 (one set, leave-one-out): those rows leave their own query's ranking. Query
    # 0 ranks 1-, 2+ (AP 1/2), query 1 ranks 2-, 1+ (AP 1/2); neither finds a positive first
    ([0, 3], 0.5, 0.0),
])
def test_self_exclusion_is_by_id_on_a_hand_made_case(tmp_path, query_ids, mAP, r1):
    queries = tiny(*TINY_QUERIES, query_ids)
    data = SequenceEmbeddings(queries={1: queries, 2: queries}, gallery_embedded={1: TINY_GALLERY, 2: TINY_GALLERY},
                              galleries={1: committed(tmp_path, "v1", TINY_GALLERY, rows_per_shard=3)},
                              rows_per_shard=3)
    tests = step_tests(data, 2, ks=(1, 2))
    for name in ("old_self", "new_self", "backward_prev", "backward", "forward", "deployed_before"):
        assert tests[name]["mAP"] == pytest.approx(mAP, abs=1e-6), name
        assert tests[name]["R@1"] == r1 and tests[name]["R@2"] == 1.0 and tests[name]["num_queries"] == 2, name


def test_a_pair_asked_for_again_is_scored_once_with_the_same_numbers(tmp_path, monkeypatch):
    """Step 3 repeats two of step 2's pairs, the matrix five step tests, partial refresh its two ends: each exact
    search runs once, and every number equals that of a sequence scored afresh."""
    import bict_ray.retrieval.protocol as protocol

    def sequence():
        phi = {t: embedded(t) for t in (1, 2, 3)}
        galleries = {t: committed(tmp_path / f"run{len(runs)}", f"v{t}", embedded(10 + t)) for t in (1, 2, 3)}
        return SequenceEmbeddings(queries=phi, galleries=galleries, rows_per_shard=7)

    runs = []
    data = sequence()
    runs.append(data)
    searches = []
    original = protocol.evaluate
    monkeypatch.setattr(protocol, "evaluate", lambda *a, **k: searches.append(a[:2]) or original(*a, **k))
    tests = {t: step_tests(data, t) for t in (2, 3)}
    assert len(searches) == 6 + 4  # step 3's old self and deployed before are step 2's new self and forward
    assert tests[3]["old_self"] == tests[2]["new_self"] and tests[3]["deployed_before"] == tests[2]["forward"]
    matrix = compatibility_matrix(data)
    assert len(searches) == 10 + 9 - 5  # (phi_1, v1), (phi_2, v1), (phi_2, v2), (phi_3, v1), (phi_3, v3) were scored
    curve = partial_refresh(data, 3, [0.0, 0.5, 1.0], seed=3)
    assert len(searches) == 14 + 1  # (phi_3, v2) is a matrix cell, (phi_3, v3) is forward: only the mix is new
    fresh = sequence()
    assert {t: step_tests(fresh, t) for t in (2, 3)} == tests
    fresh.scores.clear()
    assert compatibility_matrix(fresh) == matrix
    fresh.scores.clear()
    assert partial_refresh(fresh, 3, [0.0, 0.5, 1.0], seed=3) == curve
    assert curve[0]["mAP"] == matrix["mAP"][2][1] and curve[-1]["mAP"] == tests[3]["forward"]["mAP"]
