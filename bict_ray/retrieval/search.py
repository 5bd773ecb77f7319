"""Exact inner-product search (sgemm tiles + a compiled top-k, faiss as fallback) and the merge of per-shard
top-k lists.

Embeddings are (N, D) float32 and L2-normalised, so the inner product is the cosine similarity.
Every ranking here follows one rule: score descending, ties broken by gallery id ascending (by gallery
position when no ids are given). faiss alone leaves tied items in arbitrary order and may keep any of the
items tied at the k-th place; `exact_search` repairs both, so that per-shard top-k lists merged with
`merge_topk` equal the top-k over the whole gallery.

How: each worker thread takes a block of queries, scores it against the gallery a tile at a time with one
single-threaded sgemm (torch's, MKL on x86-64: numpy's OpenBLAS, run with its Haswell kernels as some machines
pin it, gives a pair last-bit different scores in different rows of a block, where MKL's do not), and hands each score tile to a compiled streaming top-k
(`bict_ray/retrieval/_topk.cpp`, built by pip install, loaded with ctypes). That top-k compares 16 scores per vector
instruction against the query's current k-th best and touches only the few that pass, so the search runs
near the sgemm's own rate; faiss's `knn` (the kernel behind `IndexFlatIP`) passes every score through a
scalar heap and stays well below it (measured: BENCHMARKS.md, section "Evaluation"). Where the library was
not built, `exact_search` falls back to faiss, with the same results up to float32 rounding (the two use
different BLAS builds).

A pair's score does not depend on the block, tile or shard it is computed in (each score is one dot
product accumulated in the same order), which is what makes sharded and in-memory results agree.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import torch

from bict_ray.errors import InputError
from bict_ray.retrieval.shard import NORM_TOLERANCE


def exact_search(
    query: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    gallery_ids: np.ndarray | None = None,
    threads: int | None = None,
    unit: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery items of each query by inner product, exactly.

    query: (Q, D) float32, L2-normalised. gallery: (G, D) float32, L2-normalised. unit=False accepts rows of
    any length (a raw inner-product search, e.g. on integer data whose products are exact).
    k: wanted list length; clamped to G (a gallery of G items has no k-th item beyond G).
    gallery_ids: (G,) integer, unique; only decides the order of tied scores (position when None).
    threads: threads for this call (default: OpenMP's count, i.e. OMP_NUM_THREADS where set, as Ray sets
        it in its workers). Set it when Ray workers or torch share the cores: competing thread pools run
        slower than one thread. numpy's BLAS runs single-threaded during the call (restored afterwards).
    Returns scores (Q, min(k, G)) float32, best first, and indices (Q, min(k, G)) int64, positions in
    `gallery`.
    """
    check_embeddings("query", query, unit)
    check_embeddings("gallery", gallery, unit)
    if query.shape[1] != gallery.shape[1]:
        raise InputError(
            f"query dim {query.shape[1]} does not match gallery dim {gallery.shape[1]}"
        )
    check_positive_int("k", k)
    if threads is not None:
        check_positive_int("threads", threads)
    tie_key = np.arange(len(gallery), dtype=np.int64)
    if gallery_ids is not None:
        tie_key = check_ids("gallery_ids", gallery_ids, len(gallery))
    k = min(int(k), len(gallery))
    kernel = _topk_kernel()
    if kernel is None:
        with _faiss_threads(threads), _faiss_blocks():
            return _search_tie_exact(query, gallery, k, tie_key)
    return _search_tiled(kernel, query, gallery, k, tie_key, threads or default_threads())


def merge_topk(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists into the global top-k.

    parts: (scores (Q, k_i) float32, ids (Q, k_i) int64) per shard, ids global gallery ids. A padding
        entry has score -inf and sorts last.
    Returns scores (Q, min(k, sum k_i)) float32 and ids (Q, min(k, sum k_i)) int64, ranked by score
    descending and id ascending: the same lists as one search over the union of the shards.
    """
    if not parts:
        raise InputError("merge_topk needs at least one part")
    scores, ids, order = merge_order([s for s, _ in parts], [i for _, i in parts], k)
    return (
        np.take_along_axis(scores, order, axis=1),
        np.take_along_axis(ids, order, axis=1),
    )


def query_blocks(num_queries: int, rows_per_block: int) -> Iterator[slice]:
    """Consecutive row slices of at most `rows_per_block` rows covering `num_queries` queries."""
    for start in range(0, num_queries, rows_per_block):
        yield slice(start, min(start + rows_per_block, num_queries))


def rows_per_block(num_gallery: int, max_elements: int) -> int:
    """How many query rows keep a (rows, num_gallery) score block within `max_elements` (at least 1)."""
    return max(1, max_elements // max(1, num_gallery))


def merge_order(
    scores_parts: Sequence[np.ndarray], ids_parts: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate per-shard lists and rank them: returns scores (Q, n), ids (Q, n) and the column
    order (Q, min(k, n)) of the merged top-k (score descending, id ascending)."""
    check_positive_int("k", k)
    num_queries = scores_parts[0].shape[0]
    for i, (s, ids) in enumerate(zip(scores_parts, ids_parts, strict=True)):
        if s.ndim != 2 or s.shape[0] != num_queries or s.shape != ids.shape:
            raise InputError(
                f"part {i}: scores {s.shape} and ids {ids.shape} must both be ({num_queries}, k_i)"
            )
    scores = np.concatenate(scores_parts, axis=1)
    ids = np.concatenate(ids_parts, axis=1)
    order = _rank_rows(scores, ids)[:, : min(int(k), scores.shape[1])]
    return scores, ids, order


def default_threads() -> int:
    """The threads a search or ranking uses unless told: OpenMP's count, which honours OMP_NUM_THREADS (as Ray
    sets it for a task to its CPUs)."""
    return faiss.omp_get_max_threads()


def check_positive_int(name: str, value) -> int:
    """Refuse anything but an integer >= 1 (bools included), naming `name`; returns it as int."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_embeddings(name: str, x: np.ndarray, unit: bool = True) -> None:
    """Refuse anything but a finite (N, D) float32 array (D >= 1) of L2-normalised rows (any rows with
    ``unit=False``), naming `name` and the first bad row in the error.

    Unit rows are refused rather than normalised here: the inner product of raw features ranks by their norms as
    much as by their directions, and a silent normalisation would hide that a caller stored the wrong vectors.
    """
    if not isinstance(x, np.ndarray):
        raise InputError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise InputError(f"{name} must be float32, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] < 1:
        raise InputError(f"{name} must have shape (N, D) with D >= 1, got {x.shape}")
    if not np.isfinite(x).all():
        raise InputError(f"{name} contains NaN or infinite values")
    if not unit:
        return
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    off = np.flatnonzero(np.abs(norms - 1) > NORM_TOLERANCE)
    if off.size:
        raise InputError(f"{name} must hold L2-normalised rows (|norm - 1| <= {NORM_TOLERANCE:g}); row {off[0]} has "
                         f"norm {norms[off[0]]:.6g} ({off.size} such rows): normalise them first, e.g. "
                         f"x / np.linalg.norm(x, axis=1, keepdims=True)")


def check_ids(name: str, ids: np.ndarray, length: int) -> np.ndarray:
    """Validate unique integer ids of the given length; returns them as an int64 array."""
    ids = check_integer_vector(name, ids, length)
    if len(np.unique(ids)) != len(ids):
        raise InputError(f"{name} must be unique")
    return ids


def check_integer_vector(name: str, values: np.ndarray, length: int) -> np.ndarray:
    """Validate a (length,) integer array; returns it as int64."""
    values = np.asarray(values)
    if values.ndim != 1 or len(values) != length:
        raise InputError(f"{name} must have shape ({length},), got {values.shape}")
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise InputError(f"{name} must be integers, got {values.dtype}")
    return values.astype(np.int64, copy=False)


def _search_tie_exact(
    query: np.ndarray, gallery: np.ndarray, k: int, tie_key: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    num_queries, num_gallery = len(query), len(gallery)
    scores = np.empty((num_queries, k), dtype=np.float32)
    indices = np.empty((num_queries, k), dtype=np.int64)
    if k == 0:
        return scores, indices
    gallery = np.ascontiguousarray(gallery)
    rows = np.arange(num_queries)
    depth = min(k + 1, num_gallery)
    while rows.size:
        sub_scores, sub_indices = faiss.knn(
            np.ascontiguousarray(query[rows]),
            gallery,
            depth,
            metric=faiss.METRIC_INNER_PRODUCT,
        )
        # The list settles the top k only when it holds every item tied with the k-th score: its last
        # score must be lower, or it must hold the whole gallery. Rows with a tie across the cut are
        # searched again, deeper (rare outside duplicated embeddings).
        settled = (
            np.ones(len(rows), dtype=bool)
            if depth == num_gallery
            else sub_scores[:, depth - 1] < sub_scores[:, k - 1]
        )
        order = _rank_rows(sub_scores[settled], tie_key[sub_indices[settled]])[:, :k]
        scores[rows[settled]] = np.take_along_axis(sub_scores[settled], order, axis=1)
        indices[rows[settled]] = np.take_along_axis(sub_indices[settled], order, axis=1)
        rows = rows[~settled]
        depth = min(2 * depth, num_gallery)
    return scores, indices


# The tiled search: a work item is a block of up to SEARCH_QUERY_BLOCK queries against a gallery range, scored
# SEARCH_GALLERY_TILE rows per sgemm (a 16 MB score tile per thread). 2,048 x 2,048 ran nearest the machine's
# sgemm rate of the tile shapes tried; a narrower query block fell furthest behind (measured: BENCHMARKS.md,
# section "Figures behind code choices"). The tile width also fixes the sgemm shape that every score comes from
# (see `_TopKKernel.search_range`): changing it may change scores in their last bit.
SEARCH_QUERY_BLOCK = 2048
SEARCH_GALLERY_TILE = 2048
# Query rows of every sgemm are padded to a multiple of this: the widest micro-kernel block of the x86-64 BLAS
# builds (OpenBLAS's Haswell and SkylakeX sgemm kernels work on 16 x 4 and 4-row tails).
QUERY_ROW_MULTIPLE = 16
# Per-query candidate buffers of a work item stay within this many bytes (matters only for a very large k).
_BUFFER_BYTES = 64 << 20
# Below this many query-gallery pairs a search runs in the calling thread: threads would cost more than they save.
_INLINE_PAIRS = 1 << 22


class _TopKKernel:
    """The compiled streaming top-k (`bict_ray/retrieval/_topk.cpp`) behind a small Python face."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        lib.bict_topk_update.argtypes = [pointer, size, size, size, pointer, size, size, size] + [pointer] * 4
        lib.bict_topk_update.restype = ctypes.c_int
        lib.bict_topk_finish.argtypes = [size, size, size] + [pointer] * 5
        lib.bict_topk_finish.restype = ctypes.c_int
        lib.bict_topk_entry_bytes.restype = size
        self.lib, self.entry_bytes = lib, lib.bict_topk_entry_bytes()

    def search_range(
        self, query, gallery, start, stop, k, capacity, tie_key, out_scores, out_indices, scratch: threading.local
    ) -> None:
        """Top-k of `query` among gallery rows [start, stop), by sgemm tiles; writes (rows, k) outputs, -inf and -1
        past the range's size. numpy's BLAS must be single-threaded here when several of these run at once.
        scratch: the calling thread's buffers, kept from one work item to the next (fresh pages cost a fault each)."""
        rows = len(query)
        count = np.zeros(rows, dtype=np.int64)
        entries = _reused(scratch, "entries", rows * capacity * self.entry_bytes, np.uint8)
        threshold_score = np.full(rows, -np.inf, dtype=np.float32)
        threshold_key = np.full(rows, np.iinfo(np.int64).max, dtype=np.int64)
        state = (count.ctypes.data, entries.ctypes.data, threshold_score.ctypes.data, threshold_key.ctypes.data)
        # Every sgemm has the same shape class, so that a pair gets the same score in any tile, range or shard:
        # numpy's BLAS scores a lone query row by gemv, narrow tiles by small-matrix kernels, and the rows past the
        # last full block of its micro-kernel by tail code, whose sums can differ in the last bit. So a query block
        # gets zero rows up to a multiple of QUERY_ROW_MULTIPLE, and a short last tile zero rows.
        if rows % QUERY_ROW_MULTIPLE:
            query = np.concatenate([query, np.zeros((QUERY_ROW_MULTIPLE - rows % QUERY_ROW_MULTIPLE, query.shape[1]),
                                                    np.float32)])
        tile = _reused(scratch, "tile", len(query) * SEARCH_GALLERY_TILE, np.float32).reshape(len(query), -1)
        sgemm = _position_exact_sgemm(query.shape[1])
        padded = None
        for first in range(start, stop, SEARCH_GALLERY_TILE):
            last = min(first + SEARCH_GALLERY_TILE, stop)
            block = gallery[first:last]
            if last - first < SEARCH_GALLERY_TILE:
                padded = np.zeros((SEARCH_GALLERY_TILE, gallery.shape[1]), np.float32) if padded is None else padded
                padded[: last - first] = block
                padded[last - first :] = 0
                block = padded
            sgemm(query, block, tile)
            self._check(self.lib.bict_topk_update(
                tile.ctypes.data, rows, last - first, SEARCH_GALLERY_TILE, tie_key.ctypes.data, first, k, capacity,
                *state,
            ))
        self._check(self.lib.bict_topk_finish(
            rows, k, capacity, tie_key.ctypes.data, count.ctypes.data, entries.ctypes.data,
            out_scores.ctypes.data, out_indices.ctypes.data,
        ))

    @staticmethod
    def _check(code: int) -> None:
        if code != 0:
            raise RuntimeError(f"bict_ray.retrieval._topk refused its arguments (code {code}): a bug in bict_ray.retrieval.search")


def _reused(scratch: threading.local, name: str, size: int, dtype) -> np.ndarray:
    """A (size,) array from the thread's scratch buffer `name`, grown when too small; contents undefined."""
    buffer = getattr(scratch, name, None)
    if buffer is None or buffer.size < size:
        buffer = np.empty(size, dtype=dtype)
        setattr(scratch, name, buffer)
    return buffer[:size]


_kernel_lock = threading.Lock()
_kernel: list = []  # [] until first looked up, then [kernel or None]


def _topk_kernel() -> _TopKKernel | None:
    """The compiled top-k, or None where the install could not build it."""
    with _kernel_lock:
        if not _kernel:
            spec = importlib.util.find_spec("bict_ray.retrieval._topk")
            _kernel.append(_TopKKernel(spec.origin) if spec is not None and spec.origin else None)
            if _kernel[0] is None:
                logging.getLogger(__name__).warning(
                    "bict_ray.retrieval._topk is not built (no C++ compiler at install?): exact_search uses faiss's top-k, "
                    "about 20%% slower; reinstall the package with g++ available to build it"
                )
        return _kernel[0]


def _numpy_sgemm(query: np.ndarray, block: np.ndarray, out: np.ndarray) -> None:
    np.matmul(query, block.T, out=out)


def _torch_sgemm(query: np.ndarray, block: np.ndarray, out: np.ndarray) -> None:
    torch.mm(torch.from_numpy(query), torch.from_numpy(block).T, out=torch.from_numpy(out))


_sgemm_lock = threading.Lock()
_sgemm_by_dim: dict[int, object] = {}


def _position_exact_sgemm(dim: int):
    """The tile sgemm for ``dim``-d rows: numpy's BLAS where it scores a pair the same in every row and column of a
    tile, else torch's (MKL on x86-64), probed once per dim.

    Merged shard lists equal the global one only if a pair's score does not depend on where its rows sit in the
    tile. numpy's OpenBLAS, the faster of the two on the CPUs measured (BENCHMARKS.md), has that property with its
    SkylakeX kernels but not with the Haswell ones that some machines pin (OPENBLAS_CORETYPE), where the same pair
    differs in its last bit from one row of a block to another; MKL's did not in any shape tried.
    """
    with _sgemm_lock:
        if dim not in _sgemm_by_dim:
            _sgemm_by_dim[dim] = _numpy_sgemm if _scores_independent_of_position(_numpy_sgemm, dim) else _torch_sgemm
        return _sgemm_by_dim[dim]


def _scores_independent_of_position(sgemm, dim: int, rows: int = 2 * QUERY_ROW_MULTIPLE) -> bool:
    """Whether ``sgemm`` gives the same scores for query rows moved within a block and gallery rows moved within
    a tile (the shapes the search uses)."""
    rng = np.random.default_rng(0)
    query = rng.standard_normal((rows, dim)).astype(np.float32)
    tile = rng.standard_normal((SEARCH_GALLERY_TILE, dim)).astype(np.float32)
    reference = np.empty((rows, SEARCH_GALLERY_TILE), np.float32)
    moved = np.empty_like(reference)
    sgemm(query, tile, reference)
    for shift_rows, shift_tile in ((5, 0), (0, 7), (QUERY_ROW_MULTIPLE + 3, 333)):
        sgemm(np.roll(query, shift_rows, axis=0), np.roll(tile, shift_tile, axis=0), moved)
        if not np.array_equal(np.roll(np.roll(reference, shift_rows, axis=0), shift_tile, axis=1), moved):
            return False
    return True


def _search_tiled(kernel: _TopKKernel, query, gallery, k: int, tie_key, threads: int):
    num_queries, num_gallery = len(query), len(gallery)
    scores = np.empty((num_queries, k), dtype=np.float32)
    indices = np.empty((num_queries, k), dtype=np.int64)
    if k == 0 or num_queries == 0:
        return scores, indices
    capacity = 2 * k + 16
    small = num_queries * num_gallery < _INLINE_PAIRS
    threads = 1 if small else threads
    # Equal query blocks, as many as a multiple of the threads, so that no thread is left with a short last one.
    largest = max(1, min(SEARCH_QUERY_BLOCK, _BUFFER_BYTES // (capacity * kernel.entry_bytes)))
    num_blocks = -(-num_queries // largest)
    num_blocks = min(num_queries, -(-num_blocks // threads) * threads)
    blocks = list(query_blocks(num_queries, -(-num_queries // num_blocks)))
    # Too few query blocks to keep every thread busy (a handful of queries): split the gallery too, and
    # merge the ranges' lists at the end.
    parts = max(1, min(threads // len(blocks), math.ceil(num_gallery / SEARCH_GALLERY_TILE)))
    bounds = np.linspace(0, num_gallery, parts + 1).astype(np.int64)
    if parts == 1:
        outputs = [(scores, indices)]
    else:
        outputs = [
            (np.empty((num_queries, k), np.float32), np.empty((num_queries, k), np.int64)) for _ in range(parts)
        ]
    scratch = threading.local()
    work = [
        (query[rows], gallery, int(bounds[p]), int(bounds[p + 1]), k, capacity, tie_key,
         outputs[p][0][rows], outputs[p][1][rows], scratch)
        for rows in blocks
        for p in range(parts)
    ]
    if small:
        # In this thread, BLAS as it is set: its threads do not change the scores.
        for item in work:
            kernel.search_range(*item)
    else:
        with _single_threaded_blas():
            if threads == 1:
                for item in work:
                    kernel.search_range(*item)
            else:
                with ThreadPoolExecutor(threads, thread_name_prefix="bict-search") as pool:
                    for future in [pool.submit(kernel.search_range, *item) for item in work]:
                        future.result()
    if parts > 1:
        # A range smaller than k pads its list with -inf and -1: those sort last and are cut.
        part_scores = np.concatenate([s for s, _ in outputs], axis=1)
        part_indices = np.concatenate([i for _, i in outputs], axis=1)
        keys = np.where(part_indices >= 0, tie_key[part_indices], np.iinfo(np.int64).max)
        order = _rank_rows(part_scores, keys)[:, :k]
        scores[:] = np.take_along_axis(part_scores, order, axis=1)
        indices[:] = np.take_along_axis(part_indices, order, axis=1)
    return scores, indices


class _SingleThreadedBlas:
    """numpy's BLAS (threadpoolctl) and torch's at one thread while any search runs, as they were once the last one
    ends.
    Counted, so that searches overlapping in several threads restore the setting once, and correctly."""

    def __init__(self):
        self._lock = threading.Lock()
        self._active = 0
        self._limit = None
        self._controller = None  # found once: scanning the loaded libraries costs about a millisecond
        self._torch_threads = 1

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._active == 0:
                if self._controller is None:
                    from threadpoolctl import ThreadpoolController

                    self._controller = ThreadpoolController()
                self._limit = self._controller.limit(limits=1, user_api="blas")
                self._torch_threads = torch.get_num_threads()
                torch.set_num_threads(1)
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    self._limit.restore_original_limits()
                    self._limit = None
                    torch.set_num_threads(self._torch_threads)


_single_threaded_blas = _SingleThreadedBlas()


def _rank_rows(scores: np.ndarray, tie_key: np.ndarray) -> np.ndarray:
    """Per-row column order: score descending, then tie_key ascending. (Q, n) -> (Q, n) int64."""
    return np.lexsort((tie_key, -scores), axis=-1)


# faiss scores a block of queries against a block of gallery rows with one sgemm, then keeps each query's top k.
# Its default gallery block (1,024 rows) leaves the sgemm short of the machine's rate; 4,096 rows (a 64 MB score
# block with 4,096 queries) bring it nearer (measured: BENCHMARKS.md, section "Figures behind code choices").
FAISS_DATABASE_BLOCK = 4096


@contextlib.contextmanager
def _faiss_blocks() -> Iterator[None]:
    previous = faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_database_bs = FAISS_DATABASE_BLOCK
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_database_bs = previous


@contextlib.contextmanager
def _faiss_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)
