"""Export a committed gallery version in the forms a retrieval service loads: a faiss index or a Lance dataset.

A gallery version (Parquet shards + manifest) is what bict-ray reads, checks and upgrades; a service wants one
file or folder it can open and search. Both exports keep the gallery's own int64 ids, so a hit names the same item
as ``exact_search`` and the gallery itself, and both record what space the vectors are in: a query must be
embedded by the model the gallery's ``space`` names (after an upgrade, the new model), or the scores mean nothing.

faiss (``export_faiss``): one index file, searched in process.

* ``flat`` (default): ``IndexIDMap2(IndexFlatIP)``, exhaustive and exact. Its top-k equals ``exact_search``'s
  except that faiss leaves exactly tied scores in no defined order (``exact_search`` breaks them by id).
* ``ivf``: ``IndexIVFFlat`` (inner product), k-means over a seeded sample, ``nlist`` lists of which a search visits
  ``nprobe``. Faster on large galleries, at the cost of recall: an item in a list not visited is missed.
  ``nprobe = nlist`` visits every list and gives the flat index's results.

A service loads either with::

    index = faiss.read_index("gallery.faiss")
    scores, ids = index.search(queries, k)   # queries (Q, dim) float32, L2-normalised; ids are gallery ids
    faiss.extract_index_ivf(index).nprobe = 32   # IVF only: more lists per search, more recall

Lance (``export_lance``): a Lance dataset folder (columns ``id`` int64, ``label`` int64 with null = unlabelled,
``embedding`` ``fixed_size_list<float32>[dim]``), the columnar format that vector databases such as LanceDB
serve from; they build their own ANN index on it. A service loads it with ``lance.dataset("gallery.lance")`` and
searches with ``dataset.to_table(nearest={"column": "embedding", "q": query, "k": 10, "metric": "dot"})``, whose
rows come with a column ``_distance`` = 1 - score. The export's description is also in the schema metadata (key
``bict_ray``), so the dataset describes itself.

Both write a JSON sidecar ``<out>.json``: format, index kind, metric ``inner_product`` (cosine, since the rows are
unit length), dim, rows, the gallery's space, lineage and path, and ``nlist``/``nprobe``. Neither overwrites an
existing output: the output and the sidecar are written under temporary names and renamed into place, the sidecar
first, so that an output that exists is complete and has its description beside it. Both read the gallery shard
by shard (checked against the manifest's checksums), so memory holds the index plus one shard.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import faiss
import numpy as np
import pyarrow as pa

from bict_ray.errors import InputError
from bict_ray.retrieval.search import check_positive_int
from bict_ray.storage.gallery import UNLABELLED, GalleryVersion, open_gallery

FAISS_INDEX_KINDS = ("flat", "ivf")
SIDECAR_FORMAT_VERSION = 1
METADATA_KEY = "bict_ray"
"""Schema metadata key of a Lance export holding the sidecar's JSON."""

# faiss's k-means warns below 39 training points per centroid (its min_points_per_centroid): fewer than that and a
# list's centroid is poorly placed, so the default nlist never asks for more lists than that allows.
_MIN_TRAIN_PER_LIST = 39
# Training rows per list: well above faiss's minimum, and below its max_points_per_centroid (256) so that faiss does
# not subsample again; k-means time grows with rows x lists, and more rows than this hardly move the centroids.
_TRAIN_PER_LIST = 64

Progress = Callable[[str], None]


def export_faiss(
    gallery: GalleryVersion | str,
    out: str | os.PathLike,
    *,
    index: str = "flat",
    nlist: int | None = None,
    nprobe: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict:
    """Write ``gallery`` as a faiss index file ``out`` (inner product) whose searches return the gallery's ids, and
    its sidecar ``<out>.json``.

    ``index``: ``"flat"`` (exact) or ``"ivf"`` (approximate). IVF only: ``nlist`` lists (default about 4·sqrt(N),
    at most N/39 so that every list has training points; more than N is refused), ``nprobe`` lists searched per
    query (default ceil(sqrt(nlist)); stored on the index, a service may change it), ``seed`` for the training
    sample and k-means. ``progress``: called with one line per shard.
    Returns the sidecar's contents plus ``path``, ``sidecar`` and ``seconds``.
    Raises ``InputError`` for bad options or an existing output, ``GalleryError`` for an unreadable gallery.
    """
    start = time.perf_counter()
    gallery = _open(gallery)
    if index not in FAISS_INDEX_KINDS:
        raise InputError(f"index must be one of {', '.join(FAISS_INDEX_KINDS)}, got {index!r}")
    path, sidecar = _output_paths(out, gallery)
    n, dim = gallery.num_rows, gallery.dim
    if index == "flat":
        if nlist is not None or nprobe is not None:
            raise InputError("nlist and nprobe apply to index='ivf' only (a flat index searches every row)")
        faiss_index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    else:
        nlist = _check_nlist(nlist, n)
        nprobe = _check_nprobe(nprobe, nlist)
        faiss_index = _trained_ivf(gallery, nlist, seed, progress)
        faiss_index.nprobe = nprobe
    _add_shards(faiss_index, gallery, progress)
    description = _description(gallery, "faiss", index, nlist=nlist, nprobe=nprobe)
    if index == "ivf":
        description.update(train_rows=min(n, _TRAIN_PER_LIST * nlist), seed=int(seed))
    tmp = _temp_name(path)
    try:
        faiss.write_index(faiss_index, tmp)
        _publish(description, sidecar, tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return {**description, "path": path, "sidecar": sidecar, "seconds": time.perf_counter() - start}


def export_lance(gallery: GalleryVersion | str, out: str | os.PathLike, progress: Progress | None = None) -> dict:
    """Write ``gallery`` as a Lance dataset folder ``out`` (columns ``id``, ``label``, ``embedding``, in the
    gallery's row order) and its sidecar ``<out>.json``; the sidecar's contents are also the schema metadata
    ``bict_ray``. ``progress``: called with one line per shard.
    Returns the sidecar's contents plus ``path``, ``sidecar`` and ``seconds``.
    Raises ``InputError`` for an existing output or a missing pylance, ``GalleryError`` for an unreadable gallery.
    """
    start = time.perf_counter()
    try:
        import lance
    except ImportError as err:
        raise InputError(f"the Lance export needs pylance (pip install pylance): {err}") from None
    gallery = _open(gallery)
    path, sidecar = _output_paths(out, gallery)
    description = _description(gallery, "lance", None)
    schema = pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("label", pa.int64(), nullable=True),
            # fixed_size_list, not the gallery's fixed_shape_tensor: it is the vector type Lance indexes and searches
            pa.field("embedding", pa.list_(pa.float32(), gallery.dim), nullable=False),
        ],
        metadata={METADATA_KEY: json.dumps(description)},
    )
    reader = pa.RecordBatchReader.from_batches(schema, _lance_batches(gallery, schema, progress))
    tmp = _temp_name(path)
    try:
        lance.write_dataset(reader, tmp, schema=schema, mode="create")
        _publish(description, sidecar, tmp, path)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp)
    return {**description, "path": path, "sidecar": sidecar, "seconds": time.perf_counter() - start}


def default_nlist(num_rows: int) -> int:
    """IVF lists for a gallery of ``num_rows``: about 4·sqrt(N) (faiss's rule of thumb), but no more than leave
    every list 39 training rows."""
    return max(1, min(round(4 * math.sqrt(num_rows)), num_rows // _MIN_TRAIN_PER_LIST))


def _open(gallery: GalleryVersion | str) -> GalleryVersion:
    return gallery if isinstance(gallery, GalleryVersion) else open_gallery(os.fspath(gallery))


def _output_paths(out: str | os.PathLike, gallery: GalleryVersion) -> tuple[str, str]:
    """The absolute output path and its sidecar's, both checked not to exist (nothing stored is overwritten)."""
    out = os.fspath(out)
    if not out or "://" in out:
        raise InputError(f"--out {out!r}: exports are written to a local path (copy the result to object storage)")
    path = os.path.abspath(out)
    if "://" not in gallery.path and (path + os.sep).startswith(gallery.path.rstrip(os.sep) + os.sep):
        raise InputError(f"--out {out}: inside the gallery version {gallery.path}, which holds its shards only")
    for target in (path, path + ".json"):
        if os.path.lexists(target):
            raise InputError(f"{target} already exists; refusing to overwrite it (remove it or choose another --out)")
    return path, path + ".json"


def _check_nlist(nlist: int | None, num_rows: int) -> int:
    if nlist is None:
        return default_nlist(num_rows)
    nlist = check_positive_int("nlist", nlist)
    if nlist > num_rows:
        raise InputError(f"nlist {nlist} is more than the gallery's {num_rows} rows: k-means needs a row per list "
                         f"(default for this gallery: {default_nlist(num_rows)})")
    return nlist


def _check_nprobe(nprobe: int | None, nlist: int) -> int:
    if nprobe is None:
        return math.ceil(math.sqrt(nlist))
    if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or not 1 <= nprobe <= nlist:
        raise InputError(f"nprobe must be an integer in 1..nlist ({nlist}), got {nprobe!r}")
    return int(nprobe)


def _trained_ivf(gallery: GalleryVersion, nlist: int, seed: int, progress: Progress | None) -> faiss.IndexIVFFlat:
    """An empty ``IndexIVFFlat`` trained on a seeded sample of the gallery's rows, gathered in one pass over the
    shards (the sample and one shard in memory, never the whole gallery twice)."""
    n = gallery.num_rows
    rng = np.random.default_rng(seed)
    wanted = np.sort(rng.choice(n, size=min(n, _TRAIN_PER_LIST * nlist), replace=False))
    sample, offset = [], 0
    for number, shard in enumerate(gallery.iter_shards(), 1):
        rows = len(shard.ids)
        inside = wanted[(wanted >= offset) & (wanted < offset + rows)] - offset
        sample.append(shard.embeddings[inside])
        offset += rows
        _report(progress, f"export: sampled shard {number}/{gallery.num_shards} for training")
    sample = np.ascontiguousarray(np.concatenate(sample))
    quantizer = faiss.IndexFlatIP(gallery.dim)
    index = faiss.IndexIVFFlat(quantizer, gallery.dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(seed)
    # unit rows searched by inner product: centroids on the unit sphere are what the lists' scores compare against
    index.cp.spherical = bool(gallery.normalised)
    index.train(sample)
    return index


def _add_shards(index, gallery: GalleryVersion, progress: Progress | None) -> None:
    for number, shard in enumerate(gallery.iter_shards(), 1):
        index.add_with_ids(np.ascontiguousarray(shard.embeddings, dtype=np.float32), shard.ids.astype(np.int64))
        _report(progress, f"export: added shard {number}/{gallery.num_shards} ({index.ntotal} rows)")


def _lance_batches(gallery: GalleryVersion, schema: pa.Schema, progress: Progress | None) -> Iterator[pa.RecordBatch]:
    for number, shard in enumerate(gallery.iter_shards(), 1):
        embeddings = pa.FixedSizeListArray.from_arrays(pa.array(shard.embeddings.ravel()), gallery.dim)
        # null again where the gallery stores null: read_shard hands unlabelled rows out as UNLABELLED
        labels = pa.array(shard.labels, mask=shard.labels == UNLABELLED)
        yield pa.record_batch([pa.array(shard.ids), labels, embeddings], schema=schema)
        _report(progress, f"export: wrote shard {number}/{gallery.num_shards}")


def _description(gallery: GalleryVersion, fmt: str, index: str | None, *, nlist: int | None = None,
                 nprobe: int | None = None) -> dict:
    """The sidecar: what a service must know to query the export (its space above all)."""
    return {
        "format_version": SIDECAR_FORMAT_VERSION,
        "format": fmt,
        "index": index,
        "metric": "inner_product",
        "dim": gallery.dim,
        "rows": gallery.num_rows,
        "space": gallery.space,
        "lineage": gallery.lineage,
        "normalised": gallery.normalised,
        "source": gallery.path,
        "ids": "the gallery's int64 ids",
        "nlist": nlist,
        "nprobe": nprobe,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _temp_name(path: str) -> str:
    """A unique sibling of ``path`` (same folder: the final rename stays within one filesystem)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")


def _publish(description: dict, sidecar: str, tmp: str, path: str) -> None:
    """Move the written output ``tmp`` to ``path``, its sidecar first: an output that exists has its sidecar."""
    sidecar_tmp = _temp_name(sidecar)
    try:
        with open(sidecar_tmp, "w") as stream:
            stream.write(json.dumps(description, indent=2) + "\n")
        _move_new(sidecar_tmp, sidecar)
    finally:
        if os.path.lexists(sidecar_tmp):
            os.unlink(sidecar_tmp)
    try:
        _move_new(tmp, path)
    except InputError:
        os.unlink(sidecar)  # ours, written just now: another writer's output took the name meanwhile
        raise


def _move_new(tmp: str, path: str) -> None:
    """Rename ``tmp`` to ``path`` unless ``path`` exists (checked again: another export may have made it since)."""
    if os.path.isfile(tmp):
        try:
            os.link(tmp, path)  # fails if path exists, where rename would replace it
        except FileExistsError:
            raise InputError(f"{path} already exists; refusing to overwrite it") from None
        except OSError:  # a filesystem without hard links
            pass
        else:
            os.unlink(tmp)
            return
    if os.path.lexists(path):
        raise InputError(f"{path} already exists; refusing to overwrite it")
    os.rename(tmp, path)


def _report(progress: Progress | None, line: str) -> None:
    if progress is not None:
        progress(line)
