"""Retrieval metrics: hand-computed cases, a brute-force reference, and sharded == in-memory."""

import itertools

import numpy as np
import pytest

from bict_ray.retrieval import metrics
from bict_ray.retrieval.metrics import (
    QueryPositives,
    merge_positives,
    merge_shard_topk,
    metrics_from_ranks,
    metrics_from_topk,
    retrieval_metrics,
    shard_positives,
    shard_rank_counts,
    shard_topk,
)
from bict_ray.retrieval.shard import ShardList
from bict_ray.retrieval.sharded import run_passes, sharded_retrieval_metrics


def at_angles(*degrees):
    """2-D unit vectors at the given angles: their inner products order exactly by angle distance."""
    rad = np.deg2rad(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


def cell24():
    """24 unit vectors exact in float32 whose inner products are in {0, +-1/2, +-1}: random picks
    from them tie often and exactly, in any summation order."""
    axes = [s * np.eye(4)[i] for i in range(4) for s in (1, -1)]
    halves = [np.array(signs) for signs in itertools.product((0.5, -0.5), repeat=4)]
    return np.array(axes + halves, dtype=np.float32)


def brute_force(query, query_labels, gallery, gallery_labels, query_ids, gallery_ids, ks, map_at):
    """The definitions, one query at a time: drop the query's own id, sort the whole gallery by
    (score descending, id ascending), read off AP / AP@k and the first hit."""
    scores = query @ gallery.T
    aps, first_hits, without = [], [], 0
    for i in range(len(query)):
        keep = np.ones(len(gallery), bool) if query_ids is None else gallery_ids != query_ids[i]
        order = np.lexsort((gallery_ids[keep], -scores[i, keep]))
        relevant = gallery_labels[keep][order] == query_labels[i]
        num_positives = relevant.sum()
        if num_positives == 0:
            without += 1
            continue
        hit_ranks = np.flatnonzero(relevant) + 1
        if map_at is None:
            aps.append(np.mean(np.arange(1, num_positives + 1) / hit_ranks))
        else:
            top = hit_ranks[hit_ranks <= map_at]
            aps.append(np.sum(np.arange(1, len(top) + 1) / top) / min(num_positives, map_at))
        first_hits.append(hit_ranks[0])
    result = {"mAP": np.mean(aps)}
    result.update({f"R@{k}": np.mean(np.array(first_hits) <= k) for k in ks})
    result.update(num_queries=len(aps), num_queries_without_positive=without)
    return result


def assert_same_metrics(actual, expected, tol=1e-12):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=tol), key


def tied_problem(seed, num_query=30, num_gallery=80):
    """Heavily tied data; half the queries are gallery items (same id, embedded by another 'model'),
    labels 0..3 in the gallery and 0..4 in the queries (label 4: no positive)."""
    rng = np.random.default_rng(seed)
    vectors = cell24()
    gallery_ids = rng.permutation(1000)[:num_gallery]
    query_ids = np.where(
        rng.random(num_query) < 0.5, rng.choice(gallery_ids, num_query), 5000 + np.arange(num_query)
    )
    return dict(
        query=vectors[rng.integers(0, 24, num_query)],
        query_labels=rng.integers(0, 5, num_query),
        gallery=vectors[rng.integers(0, 24, num_gallery)],
        gallery_labels=rng.integers(0, 4, num_gallery),
        query_ids=query_ids,
        gallery_ids=gallery_ids,
    )


def split_into_shards(problem, cuts, seed):
    rows = np.random.default_rng(seed).permutation(len(problem["gallery"]))
    return [
        (problem["gallery"][part], problem["gallery_labels"][part], problem["gallery_ids"][part])
        for part in np.split(rows, cuts)
    ]


@pytest.fixture(params=["compiled", "numpy one pass", "numpy two passes"])
def ranking(request, monkeypatch):
    """Exact mode ranks with the compiled kernel (`_ranks.cpp`) where it is built, else with numpy, which sorts
    narrow rows by 16-bit score buckets (one radix pass) and wide rows by exact score keys (two passes): run the
    test all three ways."""
    if request.param == "compiled":
        assert metrics._rank_kernel() is not None, "bict_ray/retrieval/_ranks.cpp was not built: reinstall with g++"
    else:
        monkeypatch.setattr(metrics, "_rank_kernel", lambda: None)
    if request.param == "numpy two passes":
        monkeypatch.setattr(metrics, "_ONE_PASS_WIDTH", 0)
    return request.param


# Query 0 (label 0) and query 1 (label 1) both sit at 0 degrees; the gallery at 10, 20, 30, 40 degrees
# ranks g0, g1, g2, g3 for both. Query 0's positives are at ranks 1 and 3, query 1's at 2 and 4.
HAND = dict(
    query=at_angles(0, 0),
    query_labels=np.array([0, 1]),
    gallery=at_angles(10, 20, 30, 40),
    gallery_labels=np.array([0, 1, 0, 1]),
)


def test_hand_computed_exact_map_and_recall(ranking):
    result = retrieval_metrics(**HAND, ks=(1, 2))
    # AP0 = (1/1 + 2/3) / 2 = 5/6, AP1 = (1/2 + 2/4) / 2 = 1/2
    assert result == pytest.approx(
        {"mAP": (5 / 6 + 1 / 2) / 2, "R@1": 0.5, "R@2": 1.0, "num_queries": 2, "num_queries_without_positive": 0}
    )


@pytest.mark.parametrize(
    ("map_at", "expected"),
    [
        (2, (1 / 2 + (1 / 2) / 2) / 2),  # AP@2: (1/1) / 2 and (1/2) / 2
        (3, ((1 + 2 / 3) / 2 + (1 / 2) / 2) / 2),  # AP@3: (1/1 + 2/3) / 2 and (1/2) / 2
        (4, (5 / 6 + 1 / 2) / 2),  # AP@k with k >= the gallery is the exact AP
    ],
)
def test_hand_computed_map_at_k(map_at, expected):
    assert retrieval_metrics(**HAND, ks=(1,), map_at=map_at)["mAP"] == pytest.approx(expected)


def test_self_match_is_excluded_by_id_not_position(ranking):
    # The same four images embedded by two models: the query copy sits 2 degrees from its gallery copy.
    # Without self-exclusion each query would find itself first. With it:
    # q0 (2, label 0): g1 g2 g3 -> positive g2 at rank 2: AP 1/2.  q1 (12, label 1): g0 g2 g3 -> g3 at 3: 1/3.
    # q2 (52, label 0): g3 g1 g0 -> g0 at 3: 1/3.                  q3 (62, label 1): g2 g1 g0 -> g1 at 2: 1/2.
    labels = np.array([0, 1, 0, 1])
    ids = np.array([100, 7, 55, 3])
    gallery = at_angles(0, 10, 50, 60)
    shuffled = np.array([2, 0, 3, 1])
    result = retrieval_metrics(
        at_angles(2, 12, 52, 62), labels, gallery[shuffled], labels[shuffled],
        query_ids=ids, gallery_ids=ids[shuffled], ks=(1, 2, 3),
    )
    assert result == pytest.approx(
        {"mAP": 5 / 12, "R@1": 0.0, "R@2": 0.5, "R@3": 1.0, "num_queries": 4, "num_queries_without_positive": 0}
    )
    without_ids = retrieval_metrics(at_angles(2, 12, 52, 62), labels, gallery, labels, ks=(1,))
    assert without_ids["R@1"] == 1.0


@pytest.mark.parametrize(("ids", "expected_ap", "expected_r1"), [([5, 9, 1], 7 / 12, 0.0), ([9, 5, 1], 5 / 6, 1.0)])
def test_score_ties_are_broken_by_gallery_id(ids, expected_ap, expected_r1, ranking):
    # Gallery items 0 and 1 are the same vector (label 1 and label 0); item 2 scores lower (label 0).
    # Ids 5, 9: the negative ranks first -> positives at 2 and 3, AP (1/2 + 2/3) / 2 = 7/12.
    # Ids 9, 5: the positive ranks first -> positives at 1 and 3, AP (1 + 2/3) / 2 = 5/6.
    vectors = cell24()
    query = vectors[[0]]  # e_1
    gallery = vectors[[8, 8, 2]]  # (1/2, 1/2, 1/2, 1/2) twice, then e_2
    result = retrieval_metrics(
        query, np.array([0]), gallery, np.array([1, 0, 0]), gallery_ids=np.array(ids), ks=(1,)
    )
    assert result["mAP"] == pytest.approx(expected_ap)
    assert result["R@1"] == expected_r1
    for map_at in (1, 3):
        assert retrieval_metrics(
            query, np.array([0]), gallery, np.array([1, 0, 0]), gallery_ids=np.array(ids), ks=(1,), map_at=map_at
        )["R@1"] == expected_r1


def test_a_query_class_missing_between_gallery_classes_has_no_positive(ranking):
    # Gallery classes 0 and 2; a query of class 1 matches neither.
    result = retrieval_metrics(HAND["query"], np.array([1, 2]), HAND["gallery"], np.array([0, 2, 0, 2]), ks=(1,))
    assert result == pytest.approx(
        {"mAP": (1 / 2 + 2 / 4) / 2, "R@1": 0.0, "num_queries": 1, "num_queries_without_positive": 1}
    )


def test_queries_without_positive_are_counted_and_left_out_of_the_means(ranking):
    # Query 2's label is absent; query 3's only positive is its own entry, which is excluded.
    query = at_angles(0, 0, 0, 40)
    result = retrieval_metrics(
        query, np.array([0, 1, 7, 2]), HAND["gallery"], np.array([0, 1, 0, 2]),
        query_ids=np.array([-1, -2, -3, 3]), gallery_ids=np.arange(4), ks=(1, 2),
    )
    # q0: positives at ranks 1, 3 -> 5/6; q1: its positive at rank 2 -> 1/2
    assert result == pytest.approx(
        {"mAP": (5 / 6 + 1 / 2) / 2, "R@1": 0.5, "R@2": 1.0, "num_queries": 2, "num_queries_without_positive": 2}
    )


@pytest.mark.parametrize("map_at", [None, 1, 5, 20])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_tied_data(seed, map_at, ranking):
    problem = tied_problem(seed)
    ks = (1, 3, 10)
    expected = brute_force(**problem, ks=ks, map_at=map_at)
    assert_same_metrics(retrieval_metrics(**problem, ks=ks, map_at=map_at), expected)


@pytest.mark.parametrize("map_at", [None, 10])
def test_matches_brute_force_on_continuous_data(map_at, ranking):
    rng = np.random.default_rng(3)
    gallery = rng.standard_normal((150, 12)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    problem = dict(
        query=gallery[:40] + np.float32(0.1) * rng.standard_normal((40, 12)).astype(np.float32),
        query_labels=rng.integers(0, 6, 40),
        gallery=gallery,
        gallery_labels=rng.integers(0, 6, 150),
        query_ids=np.arange(40),
        gallery_ids=np.arange(150),
    )
    problem["query"] /= np.linalg.norm(problem["query"], axis=1, keepdims=True)
    expected = brute_force(**problem, ks=(1, 5), map_at=map_at)
    assert_same_metrics(retrieval_metrics(**problem, ks=(1, 5), map_at=map_at), expected)


def crowded_problem(num_classes=5, num_gallery=3000, num_query=25, seed=9):
    """2-D unit vectors: 3000 scores in [-1, 1] share each row's 65535 score buckets often, so ranking
    needs the exact comparisons inside a bucket. Half the queries are gallery items; ids shuffled."""
    rng = np.random.default_rng(seed)
    angles = rng.uniform(0, 2 * np.pi, num_gallery + num_query)
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    gallery_ids = rng.permutation(10 * num_gallery)[:num_gallery]
    return dict(
        query=vectors[num_gallery:],
        query_labels=rng.integers(0, num_classes, num_query),
        gallery=vectors[:num_gallery],
        gallery_labels=rng.integers(0, num_classes, num_gallery),
        query_ids=np.where(np.arange(num_query) % 2 == 0, gallery_ids[:num_query], -1 - np.arange(num_query)),
        gallery_ids=gallery_ids,
    )


@pytest.mark.parametrize("num_classes", [5, 300])
def test_matches_brute_force_where_scores_share_buckets(num_classes, ranking):
    # 300 classes: label codes wider than one byte.
    problem = crowded_problem(num_classes)
    expected = brute_force(**problem, ks=(1, 5), map_at=None)
    assert_same_metrics(retrieval_metrics(**problem, ks=(1, 5)), expected)
    shards = split_into_shards(problem, [700, 1900], seed=1)
    sharded = sharded_retrieval_metrics(
        problem["query"], problem["query_labels"], ShardList(shards), query_ids=problem["query_ids"], ks=(1, 5)
    )
    assert_same_metrics(sharded, expected)


def duplicated_pairs(rng):
    """Every gallery vector twice: each positive shares its score bucket, with runs of two."""
    vectors = rng.standard_normal((100, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.repeat(vectors, 2, axis=0)


def one_long_run(rng):
    """150 copies of one vector among 300 distinct ones: one bucket runs far past _MAX_RUN, while most
    positives have a bucket to themselves."""
    vectors = rng.standard_normal((301, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.concatenate([np.repeat(vectors[:1], 150, axis=0), vectors[1:]])


@pytest.mark.parametrize("make_gallery", [duplicated_pairs, one_long_run])
def test_crowded_score_buckets_fall_back_to_exact_keys(monkeypatch, make_gallery):
    # Pairwise comparison inside buckets would cost more than a second sort by exact keys, where equal
    # scores keep the id order.
    rng = np.random.default_rng(11)
    gallery = make_gallery(rng)
    num_gallery = len(gallery)
    gallery_ids = rng.permutation(num_gallery)
    labels = np.where(np.arange(num_gallery) < 150, 0, rng.integers(0, 3, num_gallery))
    problem = dict(
        query=gallery[::10] + np.float32(1e-3), query_labels=labels[::10], gallery=gallery,
        gallery_labels=labels, query_ids=gallery_ids[::10], gallery_ids=gallery_ids,
    )
    problem["query"] /= np.linalg.norm(problem["query"], axis=1, keepdims=True)
    monkeypatch.setattr(metrics, "_rank_kernel", lambda: None)  # the numpy ranking's own fallback
    exact_flags = []
    sort_order = metrics._sort_order
    monkeypatch.setattr(metrics, "_sort_order", lambda *args: exact_flags.append(args[2]) or sort_order(*args))
    assert_same_metrics(retrieval_metrics(**problem, ks=(1, 5)), brute_force(**problem, ks=(1, 5), map_at=None))
    assert exact_flags == [False, True]


def test_embeddings_far_from_unit_length_are_refused_naming_the_row(ranking):
    """Raw features would be ranked by their norms as much as their directions (and overflow float32 to inf or
    NaN): the metrics refuse them instead of ranking them silently."""
    big = np.float32(1e20)
    query = np.array([[1, 0], [big, big]], np.float32)
    gallery = np.array([[1, 0], [0, 1]], np.float32)
    with pytest.raises(ValueError, match=r"query must hold L2-normalised rows .*row 1 has norm inf"):
        retrieval_metrics(query, np.array([0, 1]), gallery, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"gallery must hold L2-normalised rows .*row 1 has norm 3"):
        retrieval_metrics(gallery, np.array([0, 1]), gallery * np.float32([[1], [3]]), np.array([0, 1]))


@pytest.mark.parametrize(("block_elements", "matmul_rows"), [(7, 1), (400, 7), (400, 256)])
def test_results_do_not_depend_on_the_block_size(monkeypatch, ranking, block_elements, matmul_rows):
    problem = tied_problem(4)  # 30 queries, 80 gallery items
    expected = retrieval_metrics(**problem)
    # 7 elements: one query row per block; 400: 5 rows per block, in matmuls of 7 rows (blocks of 5 and 2)
    # or of all 30
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(metrics, "_MATMUL_ROWS", matmul_rows)
    assert retrieval_metrics(**problem) == expected
    shards = split_into_shards(problem, [20, 50], seed=4)
    assert sharded_retrieval_metrics(
        problem["query"], problem["query_labels"], ShardList(shards), query_ids=problem["query_ids"]
    ) == expected


@pytest.mark.parametrize("map_at", [None, 5])
@pytest.mark.parametrize("cuts", [[], [40], [1, 2, 79], [0, 25, 25, 60]])
def test_sharded_equals_in_memory(cuts, map_at, ranking):
    problem = tied_problem(len(cuts))
    shards = split_into_shards(problem, cuts, seed=len(cuts))
    expected = retrieval_metrics(**problem, ks=(1, 5), map_at=map_at)
    result = sharded_retrieval_metrics(
        problem["query"], problem["query_labels"], ShardList(shards), query_ids=problem["query_ids"], ks=(1, 5),
        map_at=map_at,
    )
    assert_same_metrics(result, expected, tol=0)


@pytest.mark.parametrize("map_at", [None, 10])
def test_sharded_equals_in_memory_on_continuous_data(map_at, ranking):
    rng = np.random.default_rng(5)
    gallery = rng.standard_normal((300, 32)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    problem = dict(
        query=gallery[:50].copy(), query_labels=rng.integers(0, 8, 50), gallery=gallery,
        gallery_labels=rng.integers(0, 8, 300), query_ids=np.arange(50), gallery_ids=np.arange(300),
    )
    shards = split_into_shards(problem, [70, 71, 200], seed=0)
    expected = retrieval_metrics(**problem, map_at=map_at)
    result = sharded_retrieval_metrics(
        problem["query"], problem["query_labels"], ShardList(shards), query_ids=problem["query_ids"], map_at=map_at
    )
    assert_same_metrics(result, expected, tol=1e-9)


@pytest.mark.parametrize("map_at", [None, 5])
def test_sparse_ids_give_the_same_metrics_as_dense_ones(map_at):
    # Ids within a moderate span are found through a table of positions, sparse ones (hashes, say) by binary
    # search: both must find the same positives and own entries, in shards and in memory.
    problem = tied_problem(3)
    sparse = {**problem, "query_ids": problem["query_ids"] * 10**12 + 7, "gallery_ids": problem["gallery_ids"] * 10**12 + 7}
    expected = retrieval_metrics(**problem, ks=(1, 5), map_at=map_at)
    for case in (problem, sparse):
        shards = split_into_shards(case, [30, 31, 60], seed=1)
        result = sharded_retrieval_metrics(
            case["query"], case["query_labels"], ShardList(shards), query_ids=case["query_ids"], ks=(1, 5),
            map_at=map_at,
        )
        assert_same_metrics(result, expected, tol=0)
        assert_same_metrics(retrieval_metrics(**case, ks=(1, 5), map_at=map_at), expected, tol=0)


def test_shard_passes_combine_as_documented():
    # The runner's view: each pass one call per shard, combined on the driver. Exact ranks read with a
    # cut-off agree with the top-k pass.
    problem = tied_problem(6)
    shards = split_into_shards(problem, [20, 50], seed=6)
    query, labels, query_ids = problem["query"], problem["query_labels"], problem["query_ids"]
    positives = merge_positives([shard_positives(query, labels, *shard, query_ids=query_ids) for shard in shards])
    above = sum(shard_rank_counts(query, positives, emb, ids, query_ids=query_ids) for emb, _, ids in shards)
    topk = merge_shard_topk([shard_topk(query, labels, *shard, 10, query_ids=query_ids) for shard in shards], 10)
    assert_same_metrics(metrics_from_ranks(positives, above, ks=(1, 5)), retrieval_metrics(**problem, ks=(1, 5)))
    assert_same_metrics(
        metrics_from_ranks(positives, above, ks=(1, 5), map_at=10),
        metrics_from_topk(topk, labels, ks=(1, 5), map_at=10),
    )


def test_a_positive_never_outranks_itself_when_pass_one_scored_it_differently(ranking):
    # A BLAS call of another block shape may change a score's last bit between the passes; pass 2
    # compares a positive stored in its shard by the score it computes itself.
    problem = tied_problem(8)
    query, labels, query_ids = problem["query"], problem["query_labels"], problem["query_ids"]
    emb, ids = problem["gallery"], problem["gallery_ids"]
    positives = shard_positives(query, labels, emb, problem["gallery_labels"], ids, query_ids=query_ids)
    one_ulp_lower = QueryPositives(positives.offsets, np.nextafter(positives.scores, -np.inf), positives.ids)
    np.testing.assert_array_equal(
        shard_rank_counts(query, one_ulp_lower, emb, ids, query_ids=query_ids),
        shard_rank_counts(query, positives, emb, ids, query_ids=query_ids),
    )


@pytest.mark.parametrize(("positive_id", "expected"), [(0, 0), (5, 2)])
def test_minus_zero_and_zero_are_one_score(positive_id, expected, ranking):
    # Both shard items score +0.0 against e_1; a positive scored -0.0 ties with them, so only ids decide.
    query = np.eye(4, dtype=np.float32)[[0]]
    positives = QueryPositives(np.array([0, 1]), np.array([-0.0], np.float32), np.array([positive_id]))
    above = shard_rank_counts(query, positives, np.eye(4, dtype=np.float32)[[1, 2]], np.array([1, 2]))
    np.testing.assert_array_equal(above, [expected])


def test_topk_lists_too_short_for_the_cutoffs_are_refused():
    problem = tied_problem(7)
    topk = shard_topk(
        problem["query"], problem["query_labels"], problem["gallery"], problem["gallery_labels"],
        problem["gallery_ids"], 5,
    )
    with pytest.raises(ValueError, match="depth 5 cannot give R@10"):
        metrics_from_topk(topk, problem["query_labels"], ks=(1, 10), map_at=5)
    with pytest.raises(ValueError, match="exact mAP needs every positive's rank"):
        metrics_from_topk(topk, problem["query_labels"], ks=(1,), map_at=None)


def bad(**changes):
    arguments = dict(HAND, ks=(1,))
    arguments.update(changes)
    return arguments


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (bad(gallery=np.eye(4, 3, dtype=np.float32)[[0, 1, 2, 0]]), "gallery dim 3 does not match query dim 2"),
        (bad(gallery=2 * HAND["gallery"]), r"gallery must hold L2-normalised rows .*row 0 has norm 2"),
        (bad(query=HAND["query"].astype(np.float64)), "query must be float32, got float64"),
        (bad(gallery=np.full((4, 2), np.nan, np.float32)), "gallery contains NaN"),
        (bad(gallery_labels=np.array([0, 1, 0])), r"gallery labels must have shape \(4,\)"),
        (bad(query_labels=np.array([0.5, 1.0])), "query_labels must be integers"),
        (bad(query_ids=np.array([1, 2])), "query_ids need gallery_ids"),
        (bad(gallery_ids=np.array([1, 2, 2, 3])), "gallery ids must be unique"),
        (bad(ks=(0, 5)), "each of ks must be a positive integer, got 0"),
        (bad(map_at=0), "map_at must be a positive integer"),
        (bad(query_labels=np.array([5, 6])), "none of the 2 queries has a positive"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(arguments, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(**arguments)


def test_sharded_errors_name_the_shard():
    shards = [
        (HAND["gallery"][:2], HAND["gallery_labels"][:2], np.array([0, 1])),
        (np.eye(2, 3, dtype=np.float32), HAND["gallery_labels"][2:], np.array([2, 3])),
    ]
    with pytest.raises(ValueError, match="shard 1: shard dim 3 does not match query dim 2"):
        sharded_retrieval_metrics(HAND["query"], HAND["query_labels"], ShardList(shards))


def test_a_gathering_executor_scores_a_small_gallery_in_one_pass_with_the_same_numbers(monkeypatch):
    """InProcess(gather_bytes) reads a gallery that fits whole and runs the in-memory metrics on it; one too big
    for its budget is still scored shard by shard. Both give the sharded numbers."""
    from bict_ray.retrieval import sharded
    from bict_ray.retrieval.sharded import InProcess

    problem = tied_problem(4)
    source = ShardList.split(problem["gallery"], problem["gallery_labels"], problem["gallery_ids"], 16)
    args = (problem["query"], problem["query_labels"], source)
    expected = sharded_retrieval_metrics(*args, query_ids=problem["query_ids"])
    passes = []
    real = sharded.positives_pass
    monkeypatch.setattr(sharded, "positives_pass", lambda *a, **k: passes.append(1) or real(*a, **k))
    gathered = sharded_retrieval_metrics(*args, query_ids=problem["query_ids"], executor=InProcess(1 << 20))
    assert gathered == pytest.approx(expected, abs=1e-6) and passes == []
    too_small = InProcess(gather_bytes=problem["gallery"].nbytes - 1)
    assert sharded_retrieval_metrics(*args, query_ids=problem["query_ids"], executor=too_small) == expected
    assert len(passes) == source.num_shards


def test_merged_positives_come_in_rank_order_with_the_compiled_ranking(ranking):
    """Pass 2 and metrics_from_ranks skip their sorts on positives in rank order (score descending, id ascending);
    the numbers are the same either way."""
    problem = tied_problem(5)
    shards = split_into_shards(problem, [30, 55], seed=5)
    parts = [
        shard_positives(problem["query"], problem["query_labels"], emb, labels, ids, query_ids=problem["query_ids"])
        for emb, labels, ids in shards
    ]
    merged = merge_positives(parts)
    if ranking == "compiled":
        for q in range(merged.num_queries):
            entries = slice(merged.offsets[q], merged.offsets[q + 1])
            order = np.lexsort((merged.ids[entries], -merged.scores[entries]))
            np.testing.assert_array_equal(order, np.arange(len(order)))
    above = sum(shard_rank_counts(problem["query"], merged, emb, ids, query_ids=problem["query_ids"])
                for emb, _, ids in shards)
    assert_same_metrics(metrics_from_ranks(merged, above), brute_force(**problem, ks=(1, 5, 10), map_at=None))


class FoldingExecutor:
    """Hands each 'task' two or three shards at once through ``run_passes``, as the Ray Data executor does."""

    search_threads = None

    def __init__(self, per_task):
        self.per_task = per_task
        self.results = 0

    def map(self, source, pass_fn, queries, **inputs):
        for start in range(0, source.num_shards, self.per_task):
            indices = range(start, min(start + self.per_task, source.num_shards))
            for result in run_passes(source, indices, pass_fn, queries, inputs):
                self.results += 1
                yield result


@pytest.mark.parametrize("map_at", [None, 5])
def test_a_task_folds_its_shards_into_one_result_with_the_same_metrics(map_at, ranking):
    # a task of several shards returns one running result for the passes that combine (top-k merges, exact mAP's
    # rank counts), where one per shard held 8 bytes per positive per shard; the metrics are the same to the bit
    problem = tied_problem(5)
    shards = split_into_shards(problem, [10, 30, 45, 60], seed=5)  # five shards
    expected = retrieval_metrics(**problem, ks=(1, 5), map_at=map_at)
    executor = FoldingExecutor(per_task=3)
    got = sharded_retrieval_metrics(problem["query"], problem["query_labels"], ShardList(shards),
                                    query_ids=problem["query_ids"], ks=(1, 5), map_at=map_at, executor=executor)
    assert_same_metrics(got, expected)
    # two tasks: one result each for top-k (one pass) or the rank pass; the positives pass stays one per shard
    assert executor.results == (2 if map_at is not None else 5 + 2)
