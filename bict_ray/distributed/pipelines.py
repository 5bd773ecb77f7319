"""The serving half of BiCT on Ray Data: extract a gallery once, then upgrade it from its embeddings alone.

Both pipelines map *shard indices* through Ray Data tasks (``map_shard_tasks``): a task takes a run of
consecutive shards, builds its model once, and for each shard i reads its input rows, embeds or transforms
them and writes output shard i itself. Keeping output shard i a pure function of input shard i is what makes an
upgrade resumable: a killed run re-run skips the shards already written (``GalleryWriter.has_shard``), and the
result has the same bytes as an uninterrupted run, which a streaming read->map->write of blocks cannot promise.
Rows never pass through the object store, so the pipeline costs one read and one write per row.

Tasks rather than an actor pool: Ray keeps a job's idle workers, with torch already imported, from one pipeline
to the next, where each actor pool starts new processes and imports torch again on every call, seconds before its
first shard (measured: BENCHMARKS.md, section "Gallery upgrade", step 2).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import ray
import torch
from torch import nn

from bict_ray.config import GalleryConfig
from bict_ray.core.data import ImageSet
from bict_ray.core.embed import embed_images, inference_form, upgrade_embeddings
from bict_ray.core.synthetic import ClassStructure, synthetic_shard
from bict_ray.distributed.shards import map_shards
from bict_ray.errors import InputError, StorageError
from bict_ray.storage.artifacts import Artifact, module_from_state
from bict_ray.storage.gallery import (GalleryError, GalleryVersion, GalleryWriter, extend_lineages, is_committed,
                                      open_gallery)


@dataclass
class PipelineStats:
    rows: int
    shards: int
    skipped_shards: int
    seconds: float
    nodes: frozenset[str] = field(default_factory=frozenset)  # Ray node ids whose tasks processed the shards

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def extract_gallery(model: Artifact | str | nn.Module, images: ImageSet, out: str, *,
                    config: GalleryConfig | None = None, name: str | None = None,
                    progress: Callable[[str], None] | None = None) -> tuple[GalleryVersion, PipelineStats]:
    """Embed ``images`` with ``model`` (phi_1) into a new committed gallery version at ``out`` (resumable).

    model: a model folder, a loaded ``Artifact``, or an ``EmbeddingNet`` with ``name`` (the space its embeddings
    are in, what the version's lineage records). images: (N, C, H, W) uint8 with labels and unique ids.
    config: shard size, tasks at once, GPU (``GalleryConfig()`` when None). progress: called with a line on the
    shards staged so far every ``PROGRESS_EVERY_S`` seconds.

    Shard i holds rows ``i * rows_per_shard ...`` of ``images`` in their order, so a rerun after a kill maps the
    same rows to the same shards and skips those already written.
    """
    cfg = config or GalleryConfig()
    model = Artifact.of(model, "embedding", name)
    out = _absolute(out)
    _refuse_committed(out)
    name = model.card.name
    dim = model.card.dim
    started = time.perf_counter()
    settings = dict(dim=dim, lineage=[name], space=name, encoding=cfg.embedding_encoding)
    writer = GalleryWriter(out, normalised=True, **settings)
    parts = _shard_slices(len(images), cfg.rows_per_shard)
    num_shards = len(parts)
    results = _run_pool(_ExtractShard, cfg, writer, num_shards, progress, dict(
        card=model.card, state=model.state, shards=_image_shards(images, parts),
        shard_rows=[len(images.ids[part]) for part in parts], out=out, settings=settings,
        batch_size=cfg.batch_size, use_gpu=cfg.use_gpu))
    version = writer.commit(num_shards=num_shards, records=_records(results))
    return version, _stats(results, started)


def embed_in_tasks(model: Artifact | str | nn.Module, images: ImageSet, *, config: GalleryConfig | None = None,
                   name: str | None = None) -> np.ndarray:
    """phi(x) of ``images``, (N, D) float32 in their order, computed in Ray Data tasks as ``extract_gallery`` computes
    a gallery's rows (the model built once per task, on its GPU with ``config.use_gpu``; each task fetching only its
    shards' images), but returned rather than written: a query set too large to embed in the driver."""
    cfg = config or GalleryConfig()
    model = Artifact.of(model, "embedding", name)
    shards = _image_shards(images, _shard_slices(len(images), cfg.rows_per_shard))
    found = dict(map_shards(len(shards), cfg.concurrency, _embed_shards, dict(
        card=model.card, state=model.state, shards=shards, batch_size=cfg.batch_size, use_gpu=cfg.use_gpu),
        num_cpus=cfg.cpus_per_task, num_gpus=1 if cfg.use_gpu else 0))
    return np.concatenate([found[i] for i in range(len(shards))])


def _embed_shards(indices: list[int], *, card, state, shards, batch_size: int, use_gpu: bool) -> list:
    """One task of ``embed_in_tasks``: (shard index, its embeddings) for each of its shards."""
    device = _task_device(use_gpu)
    model = module_from_state(card, state).to(device)
    out = []
    for index in indices:
        images, _, ids = ray.get(shards[index])
        out.append((index, embed_images(model, images, batch_size, device, ids=ids)))
    return out


def _shard_slices(rows: int, rows_per_shard: int) -> list[slice]:
    """Shard i's rows, ``i * rows_per_shard ...``; one shard at least."""
    return [slice(start, start + rows_per_shard) for start in range(0, max(rows, 1), rows_per_shard)]


def _image_shards(images: ImageSet, parts: list[slice]) -> list:
    """One object of (images, labels, ids) per shard: a task fetches the images of its own shards, never the set."""
    return [ray.put((images.images[part], images.labels[part], images.ids[part])) for part in parts]


def _task_device(use_gpu: bool) -> str:
    """A pipeline task's device, with its torch threads set: the pipelines scale by tasks, one core each."""
    torch.set_num_threads(WORKER_THREADS)
    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def synthesize_gallery(structure: ClassStructure, rows: int, out: str, *, space: str, seed: int = 0,
                       config: GalleryConfig | None = None,
                       progress: Callable[[str], None] | None = None) -> tuple[GalleryVersion, PipelineStats]:
    """A committed gallery version of ``rows`` synthetic rows in ``space`` (a model's name: the lineage the rows
    record) at ``out``, drawn around ``structure``'s class means (``core.synthetic``) in Ray Data tasks: a scale
    run's gallery, of any size, with no images behind it. Resumable to identical bytes, as an extraction is.
    config, progress: as for ``extract_gallery``."""
    cfg = config or GalleryConfig()
    if rows < 1:
        raise InputError(f"a synthetic gallery needs rows >= 1, got {rows}")
    out = _absolute(out)
    _refuse_committed(out)
    num_shards = -(-rows // cfg.rows_per_shard)
    started = time.perf_counter()
    settings = dict(dim=structure.dim, lineage=[space], space=space, encoding=cfg.embedding_encoding,
                    extra={"synthetic": {"rows": rows, "seed": seed, "classes": structure.classes.tolist()}})
    writer = GalleryWriter(out, normalised=True, **settings)
    results = _run_pool(_SynthesizeShard, cfg, writer, num_shards, progress, dict(
        structure=structure, rows=rows, rows_per_shard=cfg.rows_per_shard, seed=seed, out=out, settings=settings,
        use_gpu=False))
    version = writer.commit(num_shards=num_shards, records=_records(results))
    return version, _stats(results, started)


def upgrade_gallery(gallery: str | GalleryVersion, transform: Artifact | str | nn.Module, out: str, *,
                    config: GalleryConfig | None = None, target: str | None = None,
                    progress: Callable[[str], None] | None = None) -> tuple[GalleryVersion, PipelineStats]:
    """G <- psi(G): a new version at ``out`` with the same ids, lineage extended by psi. Resumable after a kill.

    gallery: a committed version (path, URI or open). transform: a transform folder, a loaded ``Artifact``, or an
    ``UpgradeTransform`` with ``target``, the space it maps into (it is taken to map from the gallery's space).
    config: as for ``extract_gallery`` (also psi's ``upgrade_precision``). progress: as for ``extract_gallery``.

    Refuses a transform whose source model is not the space the gallery is in, a gallery with rows in any other
    space (the manifest's count, and each shard's rows as they are read), and an ``out`` that already holds a
    committed version. Each row's lineage is extended by psi.
    """
    cfg = config or GalleryConfig()
    source = gallery if isinstance(gallery, GalleryVersion) else open_gallery(gallery)
    if isinstance(transform, nn.Module) and not target:
        raise InputError(f"an {type(transform).__name__} passed as a module needs target=, the space it maps into")
    transform = Artifact.of(transform, "transform", f"psi_{source.space}_{target}", source=source.space,
                            target=target)
    card = transform.card
    if card.source != source.space:
        raise GalleryError(
            f"transform {card.name} maps {card.source} embeddings, but gallery {source.path} is in the "
            f"space of {source.space} (lineage {' -> '.join(source.lineage)})")
    other = {space: rows for space, rows in source.spaces.items() if space != card.source}
    if other:
        found = ", ".join(f"{rows} in {space}" for space, rows in other.items())
        raise GalleryError(f"transform {card.name} maps {card.source} embeddings, but gallery {source.path} holds "
                           f"rows in other spaces ({found}); upgrade only a gallery whose rows are all in "
                           f"{card.source}")
    if card.spec["d_in"] != source.dim:
        raise GalleryError(f"transform {card.name} expects dim {card.spec['d_in']}, gallery {source.path} "
                           f"has dim {source.dim}")
    out = _absolute(out)
    _refuse_committed(out)
    lineage = [*source.lineage, card.name]
    dim = card.dim
    started = time.perf_counter()
    extra = {"source_version": source.path, "upgrade_precision": cfg.upgrade_precision}
    settings = dict(dim=dim, lineage=lineage, space=card.target, extra=extra, encoding=cfg.embedding_encoding)
    writer = GalleryWriter(out, normalised=True, **settings)
    results = _run_pool(_UpgradeShard, cfg, writer, source.num_shards, progress, dict(
        card=card, state=transform.state, source=source, out=out, settings=settings, use_gpu=cfg.use_gpu,
        precision=cfg.upgrade_precision))
    version = writer.commit(num_shards=source.num_shards, records=_records(results))
    if not np.array_equal(_shard_rows(version), _shard_rows(source)):
        raise GalleryError(f"upgrade of {source.path} to {out} changed the row counts of some shards")
    return version, _stats(results, started)


def append_gallery(gallery: str | GalleryVersion, rows: str | GalleryVersion, out: str, *,
                   config: GalleryConfig | None = None,
                   progress: Callable[[str], None] | None = None) -> tuple[GalleryVersion, PipelineStats]:
    """G + R: a new version at ``out`` holding the rows of ``gallery`` and then those of ``rows``, a version of new
    rows in the gallery's space (embedded by the gallery's current model, or given as embeddings in its space).
    Every row keeps its own space and lineage, so an upgraded gallery with new rows is one version whose rows say
    which came through psi and which were embedded directly. Resumable after a kill, like an upgrade.

    The new version has the gallery's space and lineage, and records both inputs in its ``extra``. Refuses, before
    anything is written: rows in another space than the gallery's (any of them), another dim, an id that both
    hold (named with both shards), and an ``out`` that already holds a committed version.
    """
    cfg = config or GalleryConfig()
    source = gallery if isinstance(gallery, GalleryVersion) else open_gallery(gallery)
    new = rows if isinstance(rows, GalleryVersion) else open_gallery(rows)
    other = {space: n for space, n in new.spaces.items() if space != source.space}
    if other:
        found = ", ".join(f"{n} in {space}" for space, n in other.items())
        raise GalleryError(f"rows {new.path} are not all in the space of gallery {source.path}, {source.space} "
                           f"({found}): append rows embedded by {source.space}, or upgrade them to it first")
    if new.dim != source.dim or new.normalised != source.normalised:
        raise GalleryError(f"rows {new.path} have dim {new.dim} (normalised {new.normalised}), gallery "
                           f"{source.path} dim {source.dim} (normalised {source.normalised})")
    _refuse_shared_ids(source, new)
    out = _absolute(out)
    _refuse_committed(out)
    started = time.perf_counter()
    extra = {"appended_to": source.path, "appended_rows": new.path, "rows_appended": new.num_rows}
    settings = dict(dim=source.dim, lineage=source.lineage, space=source.space, extra=extra,
                    encoding=cfg.embedding_encoding)
    writer = GalleryWriter(out, normalised=True, **settings)
    num_shards = source.num_shards + new.num_shards
    results = _run_pool(_AppendShard, cfg, writer, num_shards, progress, dict(
        sources=(source, new), out=out, settings=settings, use_gpu=False))
    version = writer.commit(num_shards=num_shards, records=_records(results))
    return version, _stats(results, started)


# torch threads per pipeline task: the pipeline scales by tasks, one core each
WORKER_THREADS = 1
# seconds between two progress lines of a pipeline
PROGRESS_EVERY_S = 10.0


class _ShardWorker:
    """Base of the pipeline's per-task workers: open the writer, skip finished shards, write the rest."""

    def __init__(self, out, settings: dict, use_gpu):
        self.device = _task_device(use_gpu)
        self.node = ray.get_runtime_context().get_node_id()  # where this task runs, for PipelineStats.nodes
        # the driver's writer settings, which the staged shards are checked against
        self.writer = GalleryWriter(out, normalised=True, **settings)

    def __call__(self, indices: list[int]) -> list[dict]:
        """One result per shard: its rows, whether an earlier run staged it already, the node, and its manifest
        record (None when staged earlier: the commit reads that one back)."""
        results = []
        for index in indices:
            expected = self.expected_rows(index)
            if self.writer.has_shard(index, expected_rows=expected):
                results.append({"shard": index, "rows": expected, "skipped": True, "node": self.node, "record": None})
                continue
            ids, labels, embeddings, origins = self.compute(index)
            # the shard's manifest record, so that the commit need not read the shard back to hash it
            record = self.writer.write_shard(index, ids, labels, embeddings, **origins)
            results.append({"shard": index, "rows": len(ids), "skipped": False, "node": self.node, "record": record})
        return results


class _ExtractShard(_ShardWorker):
    def __init__(self, card, state, shards: list, shard_rows: list[int], batch_size, **kwargs):
        super().__init__(**kwargs)
        self.batch_size = batch_size
        self.model = module_from_state(card, state).to(self.device)
        self.shards, self.shard_rows = shards, shard_rows  # an object ref of (images, labels, ids) per shard

    def expected_rows(self, index: int) -> int:
        return self.shard_rows[index]

    def compute(self, index: int):
        images, labels, ids = ray.get(self.shards[index])
        embeddings = embed_images(self.model, images, self.batch_size, self.device, ids=ids)
        return ids, labels, embeddings, {}  # every row in phi's space, lineage [phi]


class _SynthesizeShard(_ShardWorker):
    def __init__(self, structure: ClassStructure, rows: int, rows_per_shard: int, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.structure, self.rows, self.rows_per_shard, self.seed = structure, rows, rows_per_shard, seed

    def expected_rows(self, index: int) -> int:
        return min(self.rows_per_shard, self.rows - index * self.rows_per_shard)

    def compute(self, index: int):
        ids, labels, embeddings = synthetic_shard(self.structure, index, self.rows, self.rows_per_shard, self.seed)
        return ids, labels, embeddings, {}


class _UpgradeShard(_ShardWorker):
    def __init__(self, card, state, source: GalleryVersion, precision: str, **kwargs):
        super().__init__(**kwargs)
        # folded (and cast) once for all the task's shards
        self.psi = inference_form(module_from_state(card, state), precision)
        self.precision = precision
        self.source = source
        self.card = card

    def expected_rows(self, index: int) -> int:
        return int(self.source.manifest["shards"][index]["rows"])

    def compute(self, index: int):
        (embeddings, labels, ids), origins = self.source.read_rows(index)
        # checked row by row, not only from the manifest's counts: a shard must never be upgraded from a space psi
        # was not trained on, whatever the manifest says
        # on the dictionary's codes, not on a string per row
        other = [code for code, space in enumerate(origins.spaces.dictionary.to_pylist()) if space != self.card.source]
        wrong = np.flatnonzero(np.isin(origins.spaces.indices.to_numpy(), other))
        if len(wrong):
            row = int(wrong[0])
            raise GalleryError(f"shard {index} of {self.source.path}: row {row} (id {ids[row]}) is in space "
                               f"{origins.spaces[row].as_py()}, but {self.card.name} maps {self.card.source} "
                               f"embeddings")
        # psi's own fixed block size, not gallery.batch_size: a resumed run may change that runtime setting, and
        # a shard's bytes must not depend on it (a matmul's last bit can depend on the batch shape)
        upgraded = upgrade_embeddings([self.psi], embeddings, self.precision)
        return ids, labels, upgraded, dict(lineages=extend_lineages(origins.lineages, self.card.name))


class _AppendShard(_ShardWorker):
    """Output shard i: shard i of the gallery, then the shards of the new rows, each row with its own origins."""

    def __init__(self, sources: tuple[GalleryVersion, GalleryVersion], **kwargs):
        super().__init__(**kwargs)
        self.parts = [(version, index) for version in sources for index in range(version.num_shards)]

    def expected_rows(self, index: int) -> int:
        version, part = self.parts[index]
        return version.shard_rows[part]

    def compute(self, index: int):
        version, part = self.parts[index]
        (embeddings, labels, ids), origins = version.read_rows(part)
        return ids, labels, embeddings, origins._asdict()


def _refuse_shared_ids(gallery: GalleryVersion, rows: GalleryVersion) -> None:
    """Raise naming an id of ``rows`` that ``gallery`` holds already, with the shard of each (reads the ids only)."""
    held = [gallery.read_ids(i) for i in range(gallery.num_shards)]
    known = np.concatenate(held)
    for index in range(rows.num_shards):
        ids = rows.read_ids(index)
        shared = ids[np.isin(ids, known)]
        if len(shared):
            first = int(shared[0])
            where = next(i for i, part in enumerate(held) if (part == first).any())
            raise GalleryError(f"id {first} of the rows to append ({rows.path}, {rows.manifest['shards'][index]['file']}) "
                               f"is in gallery {gallery.path} already ({gallery.manifest['shards'][where]['file']}); "
                               "appended rows need new ids")


def _process_shards(indices: list[int], worker: type[_ShardWorker], kwargs) -> list[dict]:
    """One Ray Data task: build ``worker`` (its model, its writer) once for the task's shards and run them."""
    return worker(**ray.get(kwargs))(indices)


def _run_pool(worker: type[_ShardWorker], cfg: GalleryConfig, writer: GalleryWriter, num_shards: int,
              progress: Callable[[str], None] | None, kwargs: dict) -> list[dict]:
    """Map shard indices through Ray Data tasks; returns one record per shard.

    A task whose store failed fails the pipeline with a StorageError that names the version being written.
    Nothing is committed then, and the shards staged stay for a rerun to resume from."""
    with _watch(writer, num_shards, progress):
        try:
            return list(map_shards(num_shards, cfg.concurrency, _process_shards,
                                   dict(worker=worker, kwargs=ray.put(kwargs)),
                                   num_cpus=cfg.cpus_per_task, num_gpus=1 if cfg.use_gpu else 0))
        except StorageError as err:
            raise StorageError(f"writing gallery version {writer.path} failed in its storage: {err}. Nothing was "
                               "committed; the shards written so far are kept, and a rerun resumes from them") from err


@contextlib.contextmanager
def _watch(writer: GalleryWriter, num_shards: int, progress: Callable[[str], None] | None) -> Iterator[None]:
    """Report the shards staged every PROGRESS_EVERY_S seconds while the body runs (a task reports to Ray Data
    only when all its shards are done, so Ray Data's own progress moves in a few big steps)."""
    if progress is None:
        yield
        return
    stop, started = threading.Event(), time.perf_counter()

    def report() -> None:
        while not stop.wait(PROGRESS_EVERY_S):
            staged = writer.staged_count()
            elapsed = time.perf_counter() - started
            progress(f"{writer.staging_path}: {staged}/{num_shards} shards staged after {elapsed:.0f} s")

    thread = threading.Thread(target=report, name="gallery-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _refuse_committed(out: str) -> None:
    if is_committed(out):
        raise GalleryError(f"{out} already holds a committed gallery version; it is never overwritten "
                           "(choose another --out)")


def _absolute(out: str) -> str:
    """A local ``out`` as an absolute path: the tasks that write it need not share the driver's cwd."""
    return out if "://" in out else os.path.abspath(out)


def _shard_rows(version: GalleryVersion) -> np.ndarray:
    return np.asarray([s["rows"] for s in version.manifest["shards"]])


def _records(results: list[dict]) -> list[dict]:
    return [r["record"] for r in results if r["record"] is not None]


def _stats(results: list[dict], started: float) -> PipelineStats:
    return PipelineStats(rows=sum(r["rows"] for r in results), shards=len(results),
                         skipped_shards=sum(r["skipped"] for r in results),
                         seconds=time.perf_counter() - started, nodes=frozenset(r["node"] for r in results))
