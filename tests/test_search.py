"""Exact search and top-k merging: against numpy brute force, with ties, and refusing bad input.

Every test of `exact_search` runs twice: on the compiled top-k (`bict_ray/retrieval/_topk.cpp`, what an install
builds) and on the faiss fallback (what runs where it could not be built)."""

import itertools
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest
from threadpoolctl import threadpool_info

from bict_ray.retrieval import search
from bict_ray.retrieval.search import exact_search, merge_topk


@pytest.fixture(autouse=True, params=["compiled", "faiss"])
def search_kernel(request, monkeypatch):
    if request.param == "faiss":
        monkeypatch.setattr(search, "_kernel", [None])
    return request.param


def integer_rows(rng, n, dim, span=2):
    """Small integers as float32: every inner product is an exact integer whatever the order of the sum, so
    the expected ranking is known exactly, and ties are everywhere."""
    return rng.integers(-span, span + 1, (n, dim)).astype(np.float32)


def unit_rows(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cell24():
    """The 24 unit vectors (+-e_i) and (+-1/2, ...): exact in float32, inner products in {0, +-1/2, +-1},
    so random picks from them make many exact score ties."""
    axes = [s * np.eye(4)[i] for i in range(4) for s in (1, -1)]
    halves = [np.array(signs) for signs in itertools.product((0.5, -0.5), repeat=4)]
    return np.array(axes + halves, dtype=np.float32)


def brute_force_topk(query, gallery, k, tie_key):
    """Score descending, then tie_key ascending, by a full sort of every row."""
    scores = query @ gallery.T
    order = np.array([np.lexsort((tie_key, -row))[:k] for row in scores])
    return np.take_along_axis(scores, order, axis=1), order


def test_exact_search_matches_numpy_matmul_topk():
    rng = np.random.default_rng(0)
    query, gallery = unit_rows(rng, 30, 16), unit_rows(rng, 400, 16)
    scores, indices = exact_search(query, gallery, 10)
    expected = np.argsort(-(query @ gallery.T), axis=1)[:, :10]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(query @ gallery.T, expected, 1), atol=1e-6)
    assert scores.dtype == np.float32 and indices.dtype == np.int64


def test_tie_at_the_cut_keeps_the_smallest_ids():
    # Four copies of one vector tie for the top; k=2 must keep ids 10 and 20 (positions 1 and 3),
    # whatever faiss's heap happened to keep.
    v, w = np.eye(2, dtype=np.float32)
    gallery = np.stack([v, v, v, v, w])
    ids = np.array([40, 10, 30, 20, 0])
    scores, indices = exact_search(v[None], gallery, 2, gallery_ids=ids)
    np.testing.assert_array_equal(indices, [[1, 3]])
    np.testing.assert_array_equal(scores, [[1.0, 1.0]])
    # without ids the position breaks the tie
    _, indices = exact_search(v[None], gallery, 3)
    np.testing.assert_array_equal(indices, [[0, 1, 2]])


@pytest.mark.parametrize("k", [1, 3, 7, 20])
def test_exact_search_follows_the_tie_rule_on_heavily_tied_data(k):
    rng = np.random.default_rng(k)
    vectors = cell24()
    query, gallery = vectors[rng.integers(0, 24, 25)], vectors[rng.integers(0, 24, 90)]
    ids = rng.permutation(1000)[:90]
    scores, indices = exact_search(query, gallery, k, gallery_ids=ids)
    expected_scores, expected = brute_force_topk(query, gallery, k, ids)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(scores, expected_scores)


def test_k_beyond_gallery_is_clamped_to_gallery_size():
    rng = np.random.default_rng(1)
    scores, indices = exact_search(unit_rows(rng, 4, 8), unit_rows(rng, 3, 8), 10)
    assert scores.shape == indices.shape == (4, 3)
    np.testing.assert_array_equal(np.sort(indices, axis=1), np.tile([0, 1, 2], (4, 1)))


def blas_threads():
    return [(lib["filepath"], lib["num_threads"]) for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_threads_apply_to_the_call_only(monkeypatch):
    monkeypatch.setattr(search, "_INLINE_PAIRS", 0)  # use threads even on this small search
    rng = np.random.default_rng(2)
    before, blas_before = faiss.omp_get_max_threads(), blas_threads()
    query, gallery = unit_rows(rng, 5, 8), unit_rows(rng, 5000, 8)
    _, one_thread = exact_search(query, gallery, 5, threads=1)
    _, default = exact_search(query, gallery, 5)
    _, three = exact_search(query, gallery, 5, threads=3)
    np.testing.assert_array_equal(one_thread, default)
    np.testing.assert_array_equal(one_thread, three)
    assert faiss.omp_get_max_threads() == before
    assert blas_threads() == blas_before


def test_concurrent_searches_restore_the_blas_threads(monkeypatch):
    monkeypatch.setattr(search, "_INLINE_PAIRS", 0)
    rng = np.random.default_rng(3)
    query, gallery = unit_rows(rng, 64, 16), unit_rows(rng, 6000, 16)
    expected = exact_search(query, gallery, 9, threads=1)[1]
    before = blas_threads()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda t: exact_search(query, gallery, 9, threads=t)[1], [1, 2, 3, 2, 1, 2]))
    for result in results:
        np.testing.assert_array_equal(result, expected)
    assert blas_threads() == before


@pytest.mark.parametrize(
    "num_queries, num_gallery, dim, k, threads",
    [
        (1, 5000, 16, 10, 2),  # one query: the gallery is split between the threads, their lists merged
        (2, 4100, 8, 100, 3),  # a short last tile; three gallery ranges
        (37, 2048, 4, 1, 2),  # exactly one tile, k = 1, heavy ties
        (70, 700, 32, 700, 2),  # k = the whole gallery: a full sort
        (90, 6000, 8, 300, 1),  # the candidate buffers fill and compact many times
        (130, 3000, 64, 25, 4),  # query blocks of 33 rows on four threads
    ],
)
def test_exact_search_is_exact_on_integer_data(monkeypatch, num_queries, num_gallery, dim, k, threads):
    monkeypatch.setattr(search, "_INLINE_PAIRS", 0)
    rng = np.random.default_rng(num_queries)
    query, gallery = integer_rows(rng, num_queries, dim), integer_rows(rng, num_gallery, dim)
    ids = rng.permutation(10 * num_gallery)[:num_gallery]
    scores, indices = exact_search(query, gallery, k, gallery_ids=ids, threads=threads, unit=False)
    expected_scores, expected = brute_force_topk(query, gallery, k, ids)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(scores, expected_scores)


def test_query_blocks_and_threads_do_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(5)
    query, gallery = unit_rows(rng, 200, 32), unit_rows(rng, 5000, 32)
    reference = exact_search(query, gallery, 50, threads=1)
    monkeypatch.setattr(search, "_INLINE_PAIRS", 0)
    monkeypatch.setattr(search, "SEARCH_QUERY_BLOCK", 7)
    for threads in (1, 2, 5):
        result = exact_search(query, gallery, 50, threads=threads)
        np.testing.assert_array_equal(result[1], reference[1])
        np.testing.assert_array_equal(result[0], reference[0])


def test_the_compiled_top_k_is_built_and_agrees_with_faiss(search_kernel):
    # An install that silently failed to build it would run the slower fallback everywhere.
    if search_kernel == "faiss":
        pytest.skip("compares the compiled top-k against this fallback")
    assert search._topk_kernel() is not None, "bict_ray/retrieval/_topk.cpp was not built: reinstall with a C++ compiler"
    rng = np.random.default_rng(6)
    query, gallery = unit_rows(rng, 300, 64), unit_rows(rng, 9000, 64)
    scores, indices = exact_search(query, gallery, 40)
    faiss_scores, faiss_indices = faiss.knn(query, gallery, 40, metric=faiss.METRIC_INNER_PRODUCT)
    # two BLAS builds: the same lists up to near-ties within float32 rounding
    assert (indices == faiss_indices).all(axis=1).mean() > 0.95
    np.testing.assert_allclose(scores, faiss_scores, atol=1e-6)


@pytest.mark.parametrize("cuts", [[], [40], [1, 2, 50], [0, 30, 30, 89]])
def test_merged_shard_topk_equals_global_topk(cuts):
    rng = np.random.default_rng(len(cuts))
    vectors = cell24()
    query, gallery = vectors[rng.integers(0, 24, 20)], vectors[rng.integers(0, 24, 90)]
    ids = rng.permutation(500)[:90]
    k = 8
    parts = []
    for rows in np.split(rng.permutation(90), cuts):
        scores, indices = exact_search(query, gallery[rows], k, gallery_ids=ids[rows])
        parts.append((scores, ids[rows][indices]))
    merged_scores, merged_ids = merge_topk(parts, k)
    expected_scores, expected = exact_search(query, gallery, k, gallery_ids=ids)
    np.testing.assert_array_equal(merged_ids, ids[expected])
    np.testing.assert_array_equal(merged_scores, expected_scores)


def test_merged_shard_topk_equals_global_topk_on_continuous_data():
    # faiss scores a pair to the same bit in any shard, so merged lists equal the global ones exactly
    rng = np.random.default_rng(9)
    query, gallery = unit_rows(rng, 50, 64), unit_rows(rng, 1000, 64)
    ids = rng.permutation(1000)
    parts = []
    for rows in np.split(np.arange(1000), [3, 400, 401]):
        scores, indices = exact_search(query, gallery[rows], 20, gallery_ids=ids[rows])
        parts.append((scores, ids[rows][indices]))
    merged_scores, merged_ids = merge_topk(parts, 20)
    expected_scores, expected = exact_search(query, gallery, 20, gallery_ids=ids)
    np.testing.assert_array_equal(merged_ids, ids[expected])
    np.testing.assert_array_equal(merged_scores, expected_scores)


def test_merge_topk_ranks_padding_last_and_ties_by_id():
    scores_a = np.array([[0.9, -np.inf]], np.float32)
    ids_a = np.array([[7, -1]])
    scores_b = np.array([[0.9, 0.5]], np.float32)
    ids_b = np.array([[3, 8]])
    scores, ids = merge_topk([(scores_a, ids_a), (scores_b, ids_b)], 4)
    np.testing.assert_array_equal(ids, [[3, 7, 8, -1]])
    np.testing.assert_array_equal(scores, np.array([[0.9, 0.9, 0.5, -np.inf]], np.float32))


def first_axis(n: int, d: int) -> np.ndarray:
    """(n, d) float32 unit rows, all along the first axis."""
    rows = np.zeros((n, d), np.float32)
    rows[:, 0] = 1
    return rows


@pytest.mark.parametrize(
    ("query", "gallery", "k", "message"),
    [
        (first_axis(2, 4), first_axis(3, 5), 1, "query dim 4 does not match gallery dim 5"),
        (first_axis(2, 4).astype(np.float64), first_axis(3, 4), 1, "query must be float32, got float64"),
        (first_axis(2, 4), np.full((3, 4), np.nan, np.float32), 1, "gallery contains NaN"),
        (np.zeros(4, np.float32), first_axis(3, 4), 1, r"query must have shape \(N, D\)"),
        (first_axis(2, 4), first_axis(3, 4), 0, "k must be a positive integer"),
        (first_axis(2, 4), 2 * first_axis(3, 4), 1, r"gallery must hold L2-normalised rows .*row 0 has norm 2 \(3 "),
    ],
)
def test_exact_search_refuses_bad_input(query, gallery, k, message):
    with pytest.raises(ValueError, match=message):
        exact_search(query, gallery, k)


def test_exact_search_refuses_duplicate_gallery_ids():
    gallery = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="gallery_ids must be unique"):
        exact_search(gallery, gallery, 1, gallery_ids=np.array([1, 2, 1]))


def test_merge_topk_refuses_parts_for_different_queries():
    part = (np.zeros((2, 3), np.float32), np.zeros((2, 3), np.int64))
    other = (np.zeros((3, 3), np.float32), np.zeros((3, 3), np.int64))
    with pytest.raises(ValueError, match=r"part 1: scores \(3, 3\) and ids \(3, 3\) must both be \(2, k_i\)"):
        merge_topk([part, other], 2)


def test_the_tile_sgemm_is_one_whose_scores_do_not_depend_on_row_positions():
    """A BLAS that scores a pair differently in another row of the tile would make merged shard lists differ from
    the global one: the probe refuses it, and the search then uses torch's sgemm."""
    def position_dependent(query, block, out):
        np.matmul(query, block.T, out=out)
        out[1::4] = np.nextafter(out[1::4], np.float32(np.inf))  # one row in four off by an ulp, as Haswell's was

    assert not search._scores_independent_of_position(position_dependent, 32)
    assert search._scores_independent_of_position(search._torch_sgemm, 32)
    assert search._position_exact_sgemm(32) in (search._numpy_sgemm, search._torch_sgemm)
