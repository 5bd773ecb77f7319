"""Import an external embedding table as a committed gallery version, streamed through Ray Data in bounded memory.

``bict-ray import-gallery`` turns embeddings made elsewhere (a production index, another team's model) into a
gallery version that bict-ray can evaluate and upgrade. Its lineage starts at the external space it names.

Inputs: one Parquet file, a folder of them (``*.parquet`` files under it, names starting with ``.`` or ``_``
skipped) or a glob (``*``, ``?``, ``[...]`` within path components), local or a pyarrow URI; the embedding column is
``list<float>``, ``large_list``, ``fixed_size_list`` or Arrow's ``fixed_shape_tensor`` (1-D), of float32 or float64
(converted to float32). Or one ``.npz`` (arrays named like the columns) or ``.npy`` ((N, D) embeddings only; the ids
are then the row numbers 0 .. N-1 and there are no labels).

The plan (``plan_import``, driver side) reads only the footers: rows per file, and each file's schema, checked for
the columns and their types, and for one dim across files where the type fixes it. The global row order is the
files in sorted order, then their rows; output shard i holds rows ``i * rows_per_shard ...`` of it, so a rerun maps
the same rows to the same shards. Each shard is written by a Ray Data task (``map_shards``) that reads only its own
rows (Parquet row groups streamed in batches, .npy/.npz rows by byte offset), checks them and writes it; a rerun
after a kill skips the shards already staged (``GalleryWriter.has_shard``). The tasks hand back the ids of their
shards, which the driver checks for duplicates across shards (naming both files and rows) before the one commit.
The driver thus holds all ids (8 bytes a row), as the commit's own unique-id check does, never the embeddings.

Every bad input raises ``InputError`` naming the file, the row (its index within that file) and the column, and
nothing is committed: a missing column (listing those that exist), a wrong or mixed dim, nulls, NaN/Inf, a zero
vector, a row not L2-normalised (within ``NORM_TOLERANCE``) unless ``normalise`` scales it, duplicate ids, ids or
labels that are not integers. The checks of the columns and rows are ``bict_ray.storage.tables``'s, shared with
an old model's embeddings of the training images.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from bict_ray.config import GalleryConfig
from bict_ray.distributed.shards import map_shards
from bict_ray.errors import GalleryError, InputError
from bict_ray.storage.gallery import GalleryVersion, GalleryWriter, first_duplicate, is_committed, shard_name
from bict_ray.storage.tables import check_columns, check_embeddings, check_ids, check_labels, first_row_dim

PARQUET, NPY, NPZ = "parquet", "npy", "npz"
# Rows per Parquet read batch inside a task (at most; a shard's rows when fewer): what bounds a task's memory
# beside its one shard.
READ_BATCH_ROWS = 65536
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class SourceFile:
    """One input file: how messages name it, its path inside the plan's filesystem, its rows and (Parquet) the rows
    of each row group."""

    display: str
    path: str
    rows: int
    row_groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class ImportPlan:
    """What the tasks need to write shard i: the input files in order, the dim, the columns, the shard size."""

    source: str
    kind: str  # PARQUET, NPY or NPZ
    filesystem: pafs.FileSystem
    files: tuple[SourceFile, ...]
    dim: int
    reference: str  # where the dim was read, for messages: "FILE, column 'x' (type ...)" or "FILE, row 0"
    rows_per_shard: int
    id_column: str | None  # None: a .npy, whose ids are its row numbers
    embedding_column: str
    label_column: str | None
    fingerprint: str  # sha256 of the files' names, rows, sizes and mtimes: a resumed run must read the same input

    @cached_property
    def starts(self) -> np.ndarray:
        """The global position of each file's first row, then the total."""
        return np.concatenate([[0], np.cumsum([f.rows for f in self.files])]).astype(np.int64)

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.rows_per_shard)

    def shard_rows(self, index: int) -> int:
        return min(self.rows_per_shard, self.num_rows - index * self.rows_per_shard)

    def pieces(self, index: int) -> list[tuple[int, int, int]]:
        """Shard ``index`` as ``(file index, first row, end row)`` runs of rows, each within one file, in order."""
        begin = index * self.rows_per_shard
        end = min(begin + self.rows_per_shard, self.num_rows)
        pieces = []
        file = int(np.searchsorted(self.starts, begin, side="right")) - 1
        while begin < end:
            stop = min(end, int(self.starts[file + 1]))
            if stop > begin:
                pieces.append((file, begin - int(self.starts[file]), stop - int(self.starts[file])))
            begin = stop
            file += 1
        return pieces

    def locate(self, position: int) -> tuple[str, int]:
        """The file (as messages name it) and row within it of global row ``position``."""
        file = int(np.searchsorted(self.starts, position, side="right")) - 1
        return self.files[file].display, int(position - self.starts[file])


@dataclass
class ImportStats:
    rows: int
    shards: int
    skipped_shards: int
    files: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def import_gallery(source: str, out: str, *, space: str, id_column: str = "id", embedding_column: str = "embedding",
                   label_column: str | None = None, normalise: bool = False, rows_per_shard: int | None = None,
                   config: GalleryConfig | None = None,
                   progress: Callable[[str], None] | None = None) -> tuple[GalleryVersion, ImportStats]:
    """Import the embeddings at ``source`` into a new committed gallery version at ``out`` in the space ``space``
    (lineage ``[space]``). Resumable: rerun the same call after a kill.

    source: a Parquet file, folder or glob, or an .npz / .npy file (local path or pyarrow URI). The columns (arrays
    of an .npz) ``id_column`` (integers, unique), ``embedding_column`` (vectors) and, if given, ``label_column``
    (integers; null or -1 = unlabelled); without it every row is unlabelled. normalise: scale rows to unit length
    (else a row whose norm is not 1 is an error). rows_per_shard: rows per output shard (``config.rows_per_shard``
    when None). config: tasks at once and CPUs per task (``GalleryConfig()`` when None). progress: called with a line
    per shard staged.

    Raises ``InputError`` for bad input (naming file, row and column) and ``GalleryError`` for an ``out`` that is
    already committed; nothing is committed then.
    """
    cfg = config or GalleryConfig()
    rows_per_shard = cfg.rows_per_shard if rows_per_shard is None else rows_per_shard
    if not isinstance(rows_per_shard, (int, np.integer)) or isinstance(rows_per_shard, bool) or rows_per_shard < 1:
        raise InputError(f"rows_per_shard must be a positive integer, got {rows_per_shard!r}")
    if not isinstance(space, str) or not space.strip():
        raise InputError(f"space must name the external embedding space, e.g. 'prod_v3', got {space!r}")
    out = out if "://" in out else os.path.abspath(out)
    if is_committed(out):
        raise GalleryError(f"{out} already holds a committed gallery version; it is never overwritten "
                           "(choose another --out)")
    started = time.perf_counter()
    plan = plan_import(source, rows_per_shard=int(rows_per_shard), id_column=id_column,
                       embedding_column=embedding_column, label_column=label_column)
    _refuse_out_inside_input(source, out)
    writer_settings = dict(dim=plan.dim, lineage=[space], space=space, normalised=True,
                           encoding=cfg.embedding_encoding, extra={
        "imported_from": plan.source, "import_fingerprint": plan.fingerprint, "import_files": len(plan.files),
        "rows_per_shard": plan.rows_per_shard, "normalise": bool(normalise),
        "columns": {"id": plan.id_column, "embedding": plan.embedding_column, "label": plan.label_column}})
    writer = GalleryWriter(out, **writer_settings)
    if progress is not None:
        progress(f"importing {plan.num_rows} rows x {plan.dim} dims from {len(plan.files)} file(s) into "
                 f"{plan.num_shards} shards of up to {plan.rows_per_shard} rows, staged in {writer.staging_path}")
    results = {}
    for result in stage_shards(plan, out, writer_settings, bool(normalise), cfg):
        results[result["shard"]] = result
        if progress is not None:
            state = "already staged (resumed)" if result["skipped"] else "staged"
            progress(f"{shard_name(result['shard'])}: {result['rows']} rows {state} "
                     f"({len(results)}/{plan.num_shards})")
    ordered = [results[i] for i in range(plan.num_shards)]
    check_unique_ids(plan, np.concatenate([r["ids"] for r in ordered]), 0, plan.id_column)
    version = writer.commit(num_shards=plan.num_shards,
                            records=[r["record"] for r in ordered if r["record"] is not None])
    stats = ImportStats(rows=plan.num_rows, shards=plan.num_shards, skipped_shards=sum(r["skipped"] for r in ordered),
                        files=len(plan.files), seconds=time.perf_counter() - started)
    return version, stats


def _refuse_out_inside_input(source: str, out: str) -> None:
    """A local ``out`` inside the input's folder would have its staged shards listed as input by a rerun."""
    if "://" in source or "://" in out:
        return
    parts = os.path.abspath(source).split(os.sep)
    base = os.sep.join(parts[:next((i for i, p in enumerate(parts) if _GLOB_CHARS & set(p)), len(parts))]) or os.sep
    if not os.path.isdir(base):
        return
    for folder in (out, out + ".staging"):
        if os.path.commonpath([base, folder]) == base:
            raise InputError(f"--out {out} lies inside the input folder {base}: a rerun would read its shards as "
                             "input; choose an --out outside it")


def stage_shards(plan: ImportPlan, out: str, writer_settings: dict, normalise: bool, cfg: GalleryConfig):
    """Yield one result per shard (``write_import_shards``'s), from Ray Data tasks, as they finish."""
    yield from map_shards(plan.num_shards, cfg.concurrency, write_import_shards,
                          dict(plan=ray.put(plan), out=out, writer_settings=writer_settings, normalise=normalise),
                          num_cpus=cfg.cpus_per_task)


# --- planning (driver side: listings and footers only) -----------------------------------------------------------


def plan_import(source: str, *, rows_per_shard: int, id_column: str = "id", embedding_column: str = "embedding",
                label_column: str | None = None) -> ImportPlan:
    """The import's plan from the input's listing and footers (no rows read, but one embedding when no file's type
    fixes the dim). Raises ``InputError`` for a missing input, a missing column, a column of the wrong type, or
    dims that differ between files."""
    fs, kind, entries = resolve_source(source)
    if kind == PARQUET:
        files, dim, reference = _plan_parquet(fs, entries, id_column, embedding_column, label_column)
    else:
        files, dim, reference = _plan_numpy(fs, kind, entries[0], id_column, embedding_column, label_column)
        if kind == NPY:
            id_column = None
    if sum(f.rows for f in files) == 0:
        raise InputError(f"{source}: no rows to import")
    described = [[display, rows, info.size, info.mtime_ns] for (display, _, info), rows in
                 zip(entries, [f.rows for f in files])]
    fingerprint = hashlib.sha256(json.dumps([kind, described]).encode()).hexdigest()
    return ImportPlan(source=_display_of(source), kind=kind, filesystem=fs,
                      files=tuple(files), dim=dim, reference=reference, rows_per_shard=rows_per_shard,
                      id_column=id_column, embedding_column=embedding_column, label_column=label_column,
                      fingerprint=fingerprint)


def resolve_source(source: str) -> tuple[pafs.FileSystem, str, list[tuple[str, str, pafs.FileInfo]]]:
    """The filesystem, the kind (PARQUET, NPY, NPZ) and the input files ``(display, path, info)`` in sorted order of
    a file, folder or glob."""
    if not isinstance(source, str) or not source:
        raise InputError(f"the input must be a path or URI, got {source!r}")
    if "://" in source:
        try:
            fs, path = pafs.FileSystem.from_uri(source)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
            raise InputError(f"cannot open the filesystem of {source!r}: {err}") from None
        prefix = source.split("://", 1)[0] + "://"
        display = (lambda p: prefix + p.lstrip("/") if prefix != "file://" else prefix + p)
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(source)
        display = (lambda p: p)
    path = path.rstrip("/") or "/"
    parts = path.split("/")
    if any(_GLOB_CHARS & set(part) for part in parts):
        first = next(i for i, part in enumerate(parts) if _GLOB_CHARS & set(part))
        base = "/".join(parts[:first]) or "/"
        infos = [info for info in _list_files(fs, base) if _glob_match(info.path.split("/"), parts)]
        if not infos:
            raise InputError(f"{source}: no files match")
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"{display(path)} does not exist")
        if info.type == pafs.FileType.Directory:
            infos = [i for i in _list_files(fs, path) if i.path.endswith(".parquet")
                     and not any(p.startswith((".", "_")) for p in i.path[len(path):].split("/") if p)]
            if not infos:
                raise InputError(f"{display(path)}: no .parquet files in this folder")
        else:
            infos = [info]
    kind = NPY if infos[0].path.endswith(".npy") else NPZ if infos[0].path.endswith(".npz") else PARQUET
    if len(infos) > 1:
        odd = [i.path for i in infos if not i.path.endswith(".parquet")]
        if odd:
            raise InputError(f"{display(odd[0])}: not a .parquet file; a folder or glob takes Parquet files only "
                             "(an .npy or .npz is imported on its own)")
    return fs, kind, [(display(i.path), i.path, i) for i in infos]


def _display_of(source: str) -> str:
    return source if "://" in source else os.path.abspath(source)


def _list_files(fs: pafs.FileSystem, base: str) -> list[pafs.FileInfo]:
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    return len(parts) == len(pattern) and all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pattern))


def _plan_parquet(fs, entries, id_column, embedding_column, label_column):
    files, dim, reference = [], None, None
    for display, path, _ in entries:
        try:
            with fs.open_input_file(path) as stream:
                meta = pq.ParquetFile(stream).metadata
                schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as err:
            raise InputError(f"{display}: not a readable Parquet file ({err})") from None
        file_dim = check_columns(display, schema, id_column, embedding_column, label_column)
        if file_dim is not None:
            if dim is None:
                dim = file_dim
                reference = f"{display}, column {embedding_column!r} (type {schema.field(embedding_column).type})"
            elif file_dim != dim:
                raise InputError(
                    f"{display}: column {embedding_column!r} holds {file_dim}-dim vectors (type "
                    f"{schema.field(embedding_column).type}), but {reference} holds {dim}-dim ones: every file must "
                    "have the same dim")
        groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        files.append(SourceFile(display, path, meta.num_rows, groups))
    if dim is None:  # list columns only: the first row gives the dim the others are checked against
        file = next((f for f in files if f.rows), None)
        if file is None:
            return files, 0, ""
        try:
            with fs.open_input_file(file.path) as stream:
                group = next(i for i, rows in enumerate(file.row_groups) if rows)
                batch = next(pq.ParquetFile(stream).iter_batches(batch_size=1, row_groups=[group],
                                                                 columns=[embedding_column], use_threads=False))
        except (OSError, pa.ArrowException) as err:
            raise InputError(f"{file.display}: cannot read row 0 ({err})") from None
        dim = first_row_dim(batch.column(0), file.display, embedding_column)
        reference = f"{file.display}, row 0"
    return files, dim, reference


def _plan_numpy(fs, kind, entry, id_column, embedding_column, label_column):
    display, path, _ = entry
    if kind == NPY:
        if label_column is not None:
            raise InputError(f"{display}: an .npy file holds the embeddings only (ids are its row numbers); "
                             "use an .npz for labels")
        with NpyArray(fs, path, display) as array:
            shape, dtype = array.shape, array.dtype
        if len(shape) != 2 or shape[1] == 0:
            raise InputError(f"{display}: embeddings must be an (N, D) array, got shape {shape}")
        if not np.issubdtype(dtype, np.floating):
            raise InputError(f"{display}: embedding values must be float32 or float64, got {dtype}")
        return [SourceFile(display, path, int(shape[0]))], int(shape[1]), display
    members = npz_arrays(fs, path, display)
    shapes = {}
    for flag, name in (("--id-column", id_column), ("--embedding-column", embedding_column),
                       ("--label-column", label_column)):
        if name is None:
            continue
        if name not in members:
            raise InputError(f"{display}: no array {name!r} ({flag}); arrays are: {', '.join(members)}")
        with NpyArray(fs, path, display, member=name) as array:
            shapes[name] = (array.shape, array.dtype)
    shape, dtype = shapes[embedding_column]
    if len(shape) != 2 or shape[1] == 0:
        raise InputError(f"{display}, array {embedding_column!r}: embeddings must be (N, D), got shape {shape}")
    if not np.issubdtype(dtype, np.floating):
        raise InputError(f"{display}, array {embedding_column!r}: values must be float32 or float64, got {dtype}")
    for name in (id_column, label_column):
        if name is None:
            continue
        found, found_dtype = shapes[name]
        if found != (shape[0],):
            raise InputError(f"{display}, array {name!r}: shape {found}, expected ({shape[0]},) to match "
                             f"{embedding_column!r} of shape {shape}")
        if not np.issubdtype(found_dtype, np.integer):
            raise InputError(f"{display}, array {name!r}: dtype {found_dtype}, expected integers")
    return [SourceFile(display, path, int(shape[0]))], int(shape[1]), f"{display}, array {embedding_column!r}"


def npz_arrays(fs: pafs.FileSystem, path: str, display: str) -> list[str]:
    """The names of the arrays of an .npz."""
    try:
        with fs.open_input_file(path) as stream, zipfile.ZipFile(stream) as archive:
            return [name[:-4] for name in archive.namelist() if name.endswith(".npy")]
    except (OSError, zipfile.BadZipFile) as err:
        raise InputError(f"{display}: not a readable .npz file ({err})") from None


class NpyArray:
    """Rows of an .npy file or of one array of an .npz, read by range without loading the rest (a seek to the
    rows' byte offset; inside a compressed .npz, a forward seek decompresses and drops what lies before)."""

    def __init__(self, fs: pafs.FileSystem, path: str, display: str, member: str | None = None):
        self.display = display if member is None else f"{display}, array {member!r}"
        try:
            self._file = fs.open_input_file(path)
            self._archive = None
            self._stream = self._file
            if member is not None:
                self._archive = zipfile.ZipFile(self._file)
                self._stream = self._archive.open(member + ".npy")
            version = np.lib.format.read_magic(self._stream)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._stream)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(self._stream)
            else:
                raise InputError(f"{self.display}: unsupported .npy format version {version}")
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise InputError(f"{self.display}: not a readable .npy array ({err})") from None
        if fortran and len(shape) > 1:
            raise InputError(f"{self.display}: stored in Fortran order; save np.ascontiguousarray(array) instead")
        if dtype.hasobject:
            raise InputError(f"{self.display}: holds Python objects ({dtype}); expected a numeric array")
        self.shape, self.dtype, self._offset = tuple(shape), dtype, self._stream.tell()
        self._row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))

    def rows(self, start: int, stop: int) -> np.ndarray:
        self._stream.seek(self._offset + start * self._row_bytes)
        data = self._stream.read((stop - start) * self._row_bytes)
        if len(data) != (stop - start) * self._row_bytes:
            raise InputError(f"{self.display}: truncated (rows {start} to {stop - 1} not all present)")
        return np.frombuffer(data, self.dtype).reshape((stop - start, *self.shape[1:]))

    def close(self) -> None:
        if self._archive is not None:
            self._stream.close()
            self._archive.close()
        self._file.close()

    def __enter__(self) -> "NpyArray":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the shard tasks -----------------------------------------------------------------------------------------------


def write_import_shards(indices: list[int], *, plan, out: str, writer_settings: dict, normalise: bool) -> list[dict]:
    """One task: stage each of shards ``indices`` not staged yet from its input rows. Returns per shard its rows,
    whether an earlier run staged it, its manifest record (None when staged earlier) and its ids."""
    plan = ray.get(plan) if isinstance(plan, ray.ObjectRef) else plan
    writer = GalleryWriter(out, **writer_settings)
    reader = ShardReader(plan, normalise)
    results = []
    try:
        for index in indices:
            expected = plan.shard_rows(index)
            if writer.has_shard(index, expected_rows=expected):
                staged = posixpath.join(writer.staging_path, shard_name(index))
                ids = pq.read_table(staged, columns=["id"]).column("id").to_numpy()
                results.append({"shard": index, "rows": expected, "skipped": True, "record": None, "ids": ids})
                continue
            ids, labels, embeddings = reader.read_shard(index)
            check_unique_ids(plan, ids, index * plan.rows_per_shard, plan.id_column)
            record = writer.write_shard(index, ids, labels, embeddings)
            results.append({"shard": index, "rows": len(ids), "skipped": False, "record": record, "ids": ids})
    finally:
        reader.close()
    return results


class ShardReader:
    """Reads and checks the rows of output shards, in the order a task asks for them: consecutive shards of one
    Parquet file are read from one stream of batches, an .npy/.npz stays open."""

    def __init__(self, plan: ImportPlan, normalise: bool):
        self.plan, self.normalise = plan, normalise
        self._cursor: tuple | None = None  # Parquet: (file index, next row, batch iterator, pending batch)
        self._arrays: dict[str, NpyArray] = {}

    def read_shard(self, index: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Shard ``index``'s (ids int64, labels int64 or None, embeddings float32 unit rows), checked."""
        parts = [self._read_piece(*piece) for piece in self.plan.pieces(index)]
        ids = np.concatenate([p[0] for p in parts])
        labels = None if self.plan.label_column is None else np.concatenate([p[1] for p in parts])
        return ids, labels, np.concatenate([p[2] for p in parts])

    def _read_piece(self, file_index: int, start: int, stop: int):
        plan, file = self.plan, self.plan.files[file_index]
        if plan.kind == PARQUET:
            table = self._parquet_rows(file_index, start, stop)
            ids_values = table.column(plan.id_column)
            labels_values = None if plan.label_column is None else table.column(plan.label_column)
            vectors = table.column(plan.embedding_column)
        else:
            vectors = self._array(plan.embedding_column).rows(start, stop)
            ids_values = (np.arange(start, stop, dtype=np.int64) if plan.id_column is None
                          else self._array(plan.id_column).rows(start, stop))
            labels_values = None if plan.label_column is None else self._array(plan.label_column).rows(start, stop)
        ids = check_ids(ids_values, file.display, start, plan.id_column or "row number")
        labels = None if labels_values is None else check_labels(labels_values, file.display, start,
                                                                 plan.label_column)
        embeddings = check_embeddings(vectors, file.display, start, plan.embedding_column, dim=plan.dim,
                                      reference=plan.reference, normalise=self.normalise)
        return ids, labels, embeddings

    def _array(self, name: str) -> NpyArray:
        if name not in self._arrays:
            file = self.plan.files[0]
            member = None if self.plan.kind == NPY else name
            self._arrays[name] = NpyArray(self.plan.filesystem, file.path, file.display, member=member)
        return self._arrays[name]

    def _parquet_rows(self, file_index: int, start: int, stop: int) -> pa.Table:
        """Rows ``start .. stop-1`` of a Parquet file: continues the open batch stream when it stands at ``start``,
        else opens one at the row group holding ``start``."""
        plan, file = self.plan, self.plan.files[file_index]
        try:
            if self._cursor is None or self._cursor[0] != file_index or self._cursor[1] != start:
                self._close_cursor()
                bounds = np.concatenate([[0], np.cumsum(file.row_groups)])
                group = int(np.searchsorted(bounds, start, side="right")) - 1
                stream = plan.filesystem.open_input_file(file.path)
                columns = [c for c in (plan.id_column, plan.embedding_column, plan.label_column) if c is not None]
                batches = pq.ParquetFile(stream).iter_batches(
                    batch_size=min(READ_BATCH_ROWS, plan.rows_per_shard), row_groups=list(range(group, len(file.row_groups))),
                    columns=list(dict.fromkeys(columns)), use_threads=False)
                self._cursor = [file_index, int(bounds[group]), batches, None, stream]
            cursor, taken = self._cursor, []
            while cursor[1] < stop:
                batch = cursor[3] if cursor[3] is not None else next(cursor[2])
                cursor[3] = None
                begin, end = cursor[1], cursor[1] + batch.num_rows
                if end > stop:
                    cursor[3] = batch.slice(stop - begin)
                    batch, end = batch.slice(0, stop - begin), stop
                if end > start:
                    taken.append(batch.slice(max(0, start - begin)))
                cursor[1] = end
            return pa.Table.from_batches(taken)
        except (OSError, pa.ArrowException, StopIteration) as err:
            self._close_cursor()
            raise InputError(f"{file.display}: cannot read rows {start} to {stop - 1} ({err!r})") from None

    def _close_cursor(self) -> None:
        if self._cursor is not None:
            self._cursor[4].close()
            self._cursor = None

    def close(self) -> None:
        self._close_cursor()
        for array in self._arrays.values():
            array.close()
        self._arrays.clear()


def check_unique_ids(plan: ImportPlan, ids: np.ndarray, first_position: int, column: str | None) -> None:
    """Raise naming an id that occurs twice among ``ids`` (global rows ``first_position ...``), with both places."""
    pair = first_duplicate(ids)
    if pair is not None:
        (file_a, row_a), (file_b, row_b) = (plan.locate(first_position + p) for p in pair)
        raise InputError(f"duplicate id {int(ids[pair[0]])} (column {column!r}): {file_a}, row {row_a} and "
                         f"{file_b}, row {row_b}")
