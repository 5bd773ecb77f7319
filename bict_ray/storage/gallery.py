"""Gallery versions: Parquet shards of embeddings plus a manifest, committed atomically.

A gallery version is a folder::

    part-00000.parquet, part-00001.parquet, ...   columns: id int64, label int64 (null = unlabelled),
                                                  space, lineage (dictionary-encoded strings, per row),
                                                  embedding (float32 rows, see ENCODINGS)
    manifest.json                                 lineage, space, dim, encoding, rows per space and lineage,
                                                  and per shard: rows, BLAKE3 checksum, id range, size in bytes

**Rows keep their space.** Each row records the model space it is in (``space``, e.g. ``phi_2``) and how it got
there (``lineage``, the names joined by ``>``: ``phi_1>psi_1_2`` for a row upgraded by psi, ``phi_2`` for a row
embedded by phi_2 directly). A gallery that mixes the two, an upgraded gallery with new rows appended, is then one
version; an upgrade refuses rows that are not in its transform's source space, wherever they sit.

**The embedding column** is stored as ``fixed_size_binary(4 * dim)``, each row its float32 values little-endian
(``"binary"``, the default), or as Arrow's ``fixed_shape_tensor`` (``"tensor"``), which plain pyarrow and Ray Data
read back as (N, dim) arrays. Parquet writes a fixed-size list with a definition level per value, which made the
column's encoding, not the disk, the first limit of an upgrade; the binary column writes and reads several times
faster (measured: BENCHMARKS.md, section "Gallery I/O"). ``embeddings_from_column`` reads either as an (N, dim)
float32 array without a copy. Both encodings live in ``bict_ray.core.embedding_column``, which the configuration
checks its choice against.

**Checksums.** Each shard's record holds the BLAKE3 hash of its file's bytes, checked whenever the shard is read
verified: as strong as sha256 and nearly three times as fast on one core (measured: BENCHMARKS.md, section "Gallery
I/O"), and an upgrade hashes every shard it reads and writes.

Format 1 (before rows kept their space: no ``space`` and ``lineage`` columns, tensor embeddings, sha256 checksums)
stays readable; its rows are all in the manifest's space and lineage.

Publication protocol (a version is trusted only when its manifest exists):

* Local filesystem: shards are staged in the sibling folder ``<out>.staging``; ``commit`` writes
  the manifest there and renames the whole folder to ``<out>`` in one atomic rename, so readers see
  either no version or a complete one.
* Any other filesystem (object stores, where rename is a copy): shards are staged directly in
  ``<out>`` and the manifest is written last. A folder without ``manifest.json`` is an unfinished
  upgrade, which ``open_gallery`` refuses and a new ``GalleryWriter`` resumes. On S3 the manifest
  (and the staging settings) go up with a conditional put, so that of two writers committing one
  version exactly one succeeds (``_put_if_absent``).

Each shard file appears complete or not at all (temp file + rename), and the same data always gives
the same bytes, so a killed writer is resumed by skipping the shards ``has_shard`` reports done.

``write_shard`` returns the shard's manifest record, computed from the bytes it wrote. Handing these
records to ``commit`` spares it reading every shard back to hash it, which took a large share of a big
upgrade (measured: BENCHMARKS.md, section "Gallery upgrade", step 3): it then reads only each shard's footer
and its id, space and lineage columns.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from blake3 import blake3

from bict_ray.core.embedding_column import DEFAULT_ENCODING, ENCODINGS, embedding_field, embedding_array
from bict_ray.core.embedding_column import embeddings_from_column  # noqa: F401 (the storage API re-exports it)
from bict_ray.errors import GalleryError
from bict_ray.retrieval.shard import NORM_TOLERANCE, Shard

FORMAT_VERSION = 2
# Format 1: no per-row space and lineage, tensor embeddings; read as if every row were in the manifest's space.
READABLE_FORMATS = (1, 2)
MANIFEST_NAME = "manifest.json"
# Beside the staged shards until the commit: the settings of the run staging them (GalleryWriter._claim_staging).
STAGING_SETTINGS_NAME = "staging.json"
UNLABELLED = -1
"""Label value returned (and accepted) for rows whose stored label is null."""
LINEAGE_SEPARATOR = ">"
"""Joins the names of a row's lineage in its ``lineage`` column: ``phi_1>psi_1_2``."""


# Fixed writer options: identical inputs must give identical bytes, so that a resumed upgrade
# produces exactly the files of an uninterrupted one. Parquet files carry no timestamps; the
# only environment-dependent bytes are the writer's "created_by" version string.
# The embedding column is not compressed: unit float32 rows hardly compress, and zstd was a large
# part of the cost of writing a shard, while reading is as fast either way (measured: BENCHMARKS.md,
# section "Figures behind code choices"). ids, labels and the dictionary-encoded origins compress well.
_PARQUET_OPTIONS = dict(
    row_group_size=65536,
    compression={"id": "zstd", "label": "zstd", "space": "zstd", "lineage": "zstd", "embedding": "none"},
    use_dictionary=["label", "space", "lineage"],
    write_statistics=True,
    write_page_checksum=True,
    store_schema=True,
)
_SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_RECORD_KEYS = ("file", "rows", "blake3", "min_id", "max_id", "bytes", "spaces", "lineages")
"""The keys of a shard's manifest record, in manifest order."""
_V1_RECORD_KEYS = ("file", "rows", "sha256", "min_id", "max_id", "bytes")
_ORIGIN = pa.dictionary(pa.int32(), pa.string())


class ShardOrigins(NamedTuple):
    """Where the rows of one shard come from, row-aligned with its ``Shard``: ``spaces``, the model space each row
    is in, and ``lineages``, how it got there (``lineage_key`` of the names), as dictionary-encoded string arrays."""

    spaces: pa.DictionaryArray
    lineages: pa.DictionaryArray


def lineage_key(lineage: list[str]) -> str:
    """The ``lineage`` column's value for a row with this lineage: ``["phi_1", "psi_1_2"]`` -> ``"phi_1>psi_1_2"``."""
    return LINEAGE_SEPARATOR.join(lineage)


def extend_lineages(lineages: pa.DictionaryArray, name: str) -> pa.DictionaryArray:
    """Rows' lineages (a ``ShardOrigins.lineages``) with the transform ``name`` applied to every row."""
    values = [key + LINEAGE_SEPARATOR + name for key in lineages.dictionary.to_pylist()]
    return pa.DictionaryArray.from_arrays(lineages.indices, pa.array(values, pa.string()))


def gallery_schema(dim: int, encoding: str = DEFAULT_ENCODING, format_version: int = FORMAT_VERSION) -> pa.Schema:
    """The Arrow schema of every shard of a gallery of ``dim``-dimensional embeddings."""
    if format_version == 1:
        return pa.schema([pa.field("id", pa.int64(), nullable=False), pa.field("label", pa.int64(), nullable=True),
                          pa.field("embedding", pa.fixed_shape_tensor(pa.float32(), [dim]), nullable=False)])
    embedding = embedding_field(dim, encoding)
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("label", pa.int64(), nullable=True),
            pa.field("space", _ORIGIN, nullable=False),
            pa.field("lineage", _ORIGIN, nullable=False),
            embedding,
        ]
    )


def shard_name(index: int) -> str:
    """File name of shard ``index`` inside a version folder, e.g. ``part-00003.parquet``."""
    return f"part-{index:05d}.parquet"


class GalleryWriter:
    """Writes one gallery version shard by shard and publishes it with ``commit``.

    Several writers built with the same ``out`` (e.g. one per Ray task) may write different shards
    concurrently; one of them commits once all shards are written. A writer built on the ``out`` of
    a killed run resumes it: ``has_shard`` reports the shards already finished.
    """

    def __init__(
        self,
        out: str,
        *,
        dim: int,
        lineage: list[str],
        space: str,
        normalised: bool = True,
        extra: dict | None = None,
        encoding: str = DEFAULT_ENCODING,
        filesystem: pafs.FileSystem | None = None,
    ):
        """``out``: version folder (local path or pyarrow URI; a path inside ``filesystem`` if given).
        ``dim``: embedding size. ``lineage``: the extracting model then each transform applied,
        e.g. ``["phi_1", "psi_1_2"]``. ``space``: the model whose embedding space this is, e.g.
        ``"phi_2"``. ``normalised``: rows are L2-normalised (checked on write). ``extra``: free-form,
        JSON-serialisable metadata stored in the manifest. ``encoding``: how the embedding column is stored
        (``ENCODINGS``). Rows are in ``space`` with ``lineage`` unless ``write_shard`` is told otherwise.
        """
        if encoding not in ENCODINGS:
            raise GalleryError(f"embedding encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim <= 0:
            raise GalleryError(f"dim must be a positive integer, got {dim!r}")
        _check_lineage(lineage, space)
        extra = dict(extra or {})
        try:
            json.dumps(extra)
        except TypeError as err:
            raise GalleryError(f"extra must be JSON-serialisable: {err}") from None
        self.dim = int(dim)
        self.lineage = list(lineage)
        self.space = space
        self.normalised = bool(normalised)
        self.extra = extra
        self.encoding = encoding
        self._out = _locate(out, filesystem)
        self._refuse_committed()
        if self._out.is_local:
            self._staging = _Location(self._out.fs, self._out.path + ".staging", self._out.display + ".staging")
        else:
            self._staging = self._out
        self._staging.fs.create_dir(self._staging.path, recursive=True)
        self._claim_staging()

    @property
    def path(self) -> str:
        """The version being written, as the caller named it (path or URI)."""
        return self._out.display

    @property
    def staging_path(self) -> str:
        """Where the shards are staged until ``commit`` (``<out>.staging`` locally, else ``out``)."""
        return self._staging.display

    def write_shard(self, index: int, ids, labels, embeddings, *, spaces=None, lineages=None) -> dict:
        """Write shard ``index`` (overwriting an unfinished or earlier copy of it) and return its
        manifest record ``{"file", "rows", "blake3", "min_id", "max_id", "bytes", "spaces", "lineages"}``,
        computed from the bytes written (plain ints, strings and dicts: JSON-serialisable and picklable).
        Passing the records of the shards to ``commit`` spares it reading each shard back to hash it.

        ids: (n,) integers, unique. labels: (n,) integers (``UNLABELLED`` = none) or None.
        embeddings: (n, dim) floats, finite (cast to float32; L2-normalised if the gallery is).
        spaces, lineages: each row's space and ``lineage_key``, as one string for every row, a per-row sequence or
        Arrow array of strings (dictionary-encoded or not), or None for the writer's ``space`` and ``lineage``.
        """
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise GalleryError(f"shard index must be a non-negative integer, got {index!r}")
        name = shard_name(int(index))
        table = _shard_table(name, ids, labels, embeddings, self.dim, self.normalised, self.encoding,
                             _origin_column(spaces, len(embeddings), self.space, name, "spaces"),
                             _origin_column(lineages, len(embeddings), lineage_key(self.lineage), name, "lineages"))
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, **_PARQUET_OPTIONS)
        data = buffer.getvalue()
        _write_atomic(self._staging, name, data)
        return _shard_record(name, _checksum(data), len(data), table.column("id").to_numpy(),
                             _counts(table.column("space")), _counts(table.column("lineage")))

    def staged_count(self) -> int:
        """How many shard files are staged so far (one listing; for progress, not a check)."""
        selector = pafs.FileSelector(self._staging.path, allow_not_found=True)
        infos = self._staging.fs.get_file_info(selector)
        return sum(1 for info in infos if _SHARD_RE.match(posixpath.basename(info.path)))

    def has_shard(self, index: int, expected_rows: int | None = None) -> bool:
        """Whether shard ``index`` is already staged complete: readable footer, this gallery's
        schema and (if given) ``expected_rows`` rows. A resumed upgrade skips shards for which
        this is true; it checks shape, not content, so a rerun must map the same input rows to
        the same shard index."""
        try:
            meta = pq.read_metadata(self._staging.child(shard_name(index)).path, filesystem=self._staging.fs)
            schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException):
            return False
        if _schema_problem(schema, gallery_schema(self.dim, self.encoding)) is not None:
            return False
        return expected_rows is None or meta.num_rows == expected_rows

    def commit(self, num_shards: int | None = None, records=None) -> "GalleryVersion":
        """Validate the staged shards, write the manifest and publish the version.

        ``num_shards``: if given, exactly shards ``0 .. num_shards-1`` must be staged.
        ``records``: records returned by ``write_shard`` (by any writer of this ``out``), for any
        subset of the shards. A shard whose staged file has the size its record names is described
        by the record, reading only the file's footer and ids (to check its schema, its record's
        rows and id range, and ids unique across shards); any other shard (no record, e.g. one
        staged by a killed earlier run, or a file replaced since) is read back whole and hashed.

        Raises ``GalleryError`` (leaving everything in place) for an empty gallery, missing or
        extra shard indices, an unreadable shard, a wrong dim, duplicate ids, a malformed record,
        a record for a shard that is not staged or that disagrees with the file's ids, or ``out``
        already committed.
        """
        self._refuse_committed()
        given = _records_by_file(records)
        staged, leftovers = self._staged_shards(num_shards)
        unknown = sorted(set(given) - set(staged))
        if unknown:
            raise GalleryError(f"records given for shards {unknown}, which are not staged in {self._staging.display}")
        names, shard_records = list(staged), []
        for name in names:
            record, ids = self._describe_shard(name, staged[name], given.get(name))
            _check_unique_ids([name], [ids])
            shard_records.append(record)
        # across shards by their id ranges: only shards whose ranges overlap are read again, so a version whose
        # shards hold disjoint ranges (an extraction in id order, its upgrades, a synthetic gallery) is committed
        # holding one shard's ids at a time, not every id of the version (8 bytes a row: 8 GB at a billion)
        for group in _overlapping([(r["min_id"], r["max_id"]) for r in shard_records]):
            _check_unique_ids([names[i] for i in group], [self._staged_ids(names[i]) for i in group])
        for path in leftovers:
            self._staging.fs.delete_file(path)
        manifest = {
            "format_version": FORMAT_VERSION,
            "lineage": self.lineage,
            "space": self.space,
            "dim": self.dim,
            "normalised": self.normalised,
            "encoding": self.encoding,
            "num_rows": int(sum(r["rows"] for r in shard_records)),
            # rows per space and per lineage over the whole version, so that a reader (an upgrade refusing rows in
            # the wrong space, a report) knows the mix without opening a shard
            "spaces": _total_counts(r["spaces"] for r in shard_records),
            "lineages": _total_counts(r["lineages"] for r in shard_records),
            "shards": shard_records,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "extra": self.extra,
        }
        if not _put_if_absent(self._staging, MANIFEST_NAME, json.dumps(manifest, indent=2).encode() + b"\n"):
            raise GalleryError(f"{self._out.display} was committed by another writer while this one checked its "
                               "shards; that version stands, and is never overwritten")
        if self._out.is_local:
            self._out.fs.move(self._staging.path, self._out.path)
        return GalleryVersion(self._out, manifest)

    def _settings(self) -> dict:
        return {"dim": self.dim, "lineage": self.lineage, "space": self.space, "normalised": self.normalised,
                "extra": self.extra, "encoding": self.encoding}

    def _claim_staging(self) -> None:
        """Record this version's settings beside its staged shards, or check them against those of the run that
        staged them: a resumed run with another transform, lineage or extra (an upgrade's precision, say) would
        otherwise commit a mixture of both runs' shards."""
        # the claim is written only where none is; one found (or one another writer wrote first) must match
        if _put_if_absent(self._staging, STAGING_SETTINGS_NAME, json.dumps(self._settings(), sort_keys=True).encode()):
            return
        location = self._staging.child(STAGING_SETTINGS_NAME)
        try:
            staged = json.loads(_read_bytes(location))
        except (ValueError, OSError) as err:
            raise GalleryError(f"cannot read {location.display}: {err}") from None
        mine = json.loads(json.dumps(self._settings()))  # as JSON gives them back (lists, not tuples)
        different = sorted(key for key in set(mine) | set(staged) if mine.get(key) != staged.get(key))
        if different:
            details = "; ".join(f"{key}: staged {staged.get(key)!r}, now {mine.get(key)!r}" for key in different)
            raise GalleryError(
                f"{self._staging.display} holds shards staged by another run ({details}); finish that run with "
                f"its settings, or remove {self._staging.display} to start again"
            )

    def _refuse_committed(self) -> None:
        info = self._out.fs.get_file_info(self._out.child(MANIFEST_NAME).path)
        if info.type != pafs.FileType.NotFound:
            raise GalleryError(
                f"{self._out.display} already holds a committed gallery version; refusing to overwrite it"
            )
        if self._out.is_local and self._out.fs.get_file_info(self._out.path).type != pafs.FileType.NotFound:
            raise GalleryError(f"{self._out.display} exists but is not a committed gallery version; remove it first")

    def _staged_shards(self, num_shards: int | None) -> tuple[dict[str, int], list[str]]:
        """The staged shards as ``{file name: size in bytes}`` in shard order, and the paths of the
        temp files left by killed writers (never finished shards; ``commit`` deletes them once the
        version is known good, so that a refused commit changes nothing)."""
        selector = pafs.FileSelector(self._staging.path, allow_not_found=True)
        indices, sizes, leftovers = {}, {}, []
        for info in self._staging.fs.get_file_info(selector):
            name = posixpath.basename(info.path)
            if name.endswith(".tmp"):
                leftovers.append(info.path)
            elif (match := _SHARD_RE.match(name)) is not None:
                indices[int(match.group(1))] = name
                sizes[name] = info.size
            elif name == STAGING_SETTINGS_NAME:
                leftovers.append(info.path)  # the run's settings: not part of the version
            elif name != MANIFEST_NAME:
                raise GalleryError(f"unexpected file {name!r} in {self._staging.display}")
        if not indices:
            raise GalleryError(f"empty gallery: no shards staged in {self._staging.display}")
        expected = range(num_shards if num_shards is not None else max(indices) + 1)
        missing = sorted(set(expected) - set(indices))
        extra = sorted(set(indices) - set(expected))
        if missing:
            raise GalleryError(f"missing shards {[shard_name(i) for i in missing]} in {self._staging.display}")
        if extra:
            raise GalleryError(f"unexpected shards {[shard_name(i) for i in extra]} in {self._staging.display}")
        return {indices[i]: sizes[indices[i]] for i in expected}, leftovers

    def _describe_shard(self, name: str, size: int, record: dict | None) -> tuple[dict, np.ndarray]:
        """The manifest record of a staged shard of ``size`` bytes, and its ids.

        ``record`` (from ``write_shard``, or None) is trusted for the file's checksum if the file
        still has the size it names; then only the footer and the ids are read, and must agree
        with it. Otherwise the whole file is read back and hashed.
        """
        location = self._staging.child(name)
        if record is not None and record["bytes"] == size:
            with location.fs.open_input_file(location.path) as source:
                ids, spaces, lineages = self._shard_columns(name, source)
            found = _shard_record(name, record["blake3"], record["bytes"], ids, spaces, lineages)
            if found != record:
                differ = [key for key in _RECORD_KEYS if found[key] != record[key]]
                given = ", ".join(f"{key} {record[key]}" for key in differ)
                actual = ", ".join(f"{key} {found[key]}" for key in differ)
                raise GalleryError(f"shard {name}: the record given to commit says {given}, the file has {actual}")
            return found, ids
        data = _read_bytes(location)
        ids, spaces, lineages = self._shard_columns(name, pa.BufferReader(data))
        return _shard_record(name, _checksum(data), len(data), ids, spaces, lineages), ids

    def _staged_ids(self, name: str) -> np.ndarray:
        return _read_ids(self._staging.child(name), f"shard {name}")

    def _shard_columns(self, name: str, source: pa.NativeFile) -> tuple[np.ndarray, dict, dict]:
        """The ids of the staged shard ``name`` open as ``source`` and its rows per space and per lineage, after
        checking from its footer that it has this gallery's schema (reads the footer and those columns only)."""
        try:
            with pq.ParquetFile(source) as parquet:
                problem = _schema_problem(parquet.schema_arrow, gallery_schema(self.dim, self.encoding))
                if problem is not None:
                    raise GalleryError(f"shard {name}: {problem} (gallery dim {self.dim}, encoding {self.encoding})")
                table = parquet.read(columns=["id", "space", "lineage"])
        except (OSError, pa.ArrowException) as err:
            raise GalleryError(f"shard {name}: unreadable Parquet ({err})") from None
        if table.num_rows == 0:
            raise GalleryError(f"shard {name}: no rows")
        return (table.column("id").to_numpy(), _counts(table.column("space")), _counts(table.column("lineage")))


def open_gallery(path: str, *, filesystem: pafs.FileSystem | None = None) -> "GalleryVersion":
    """Open a committed gallery version (local path or pyarrow URI; a path inside ``filesystem``
    if given). Raises ``GalleryError`` if it has no manifest or the manifest is malformed."""
    location = _locate(path, filesystem)
    manifest_location = location.child(MANIFEST_NAME)
    try:
        raw = _read_bytes(manifest_location)
    except FileNotFoundError:
        raise GalleryError(f"{location.display} is not a committed gallery version (no {MANIFEST_NAME})") from None
    try:
        manifest = json.loads(raw)
    except ValueError as err:
        raise GalleryError(f"{manifest_location.display}: invalid JSON ({err})") from None
    _check_manifest(manifest, manifest_location.display)
    return GalleryVersion(location, manifest)


def is_committed(path: str, *, filesystem: pafs.FileSystem | None = None) -> bool:
    """Whether ``path`` holds a committed gallery version (a manifest exists); lets a rerun skip it."""
    location = _locate(path, filesystem).child(MANIFEST_NAME)
    return location.fs.get_file_info(location.path).type == pafs.FileType.File


def write_gallery(
    out: str,
    ids,
    labels,
    embeddings,
    *,
    rows_per_shard: int,
    lineage: list[str],
    space: str,
    normalised: bool = True,
    extra: dict | None = None,
    encoding: str = DEFAULT_ENCODING,
    spaces=None,
    lineages=None,
    filesystem: pafs.FileSystem | None = None,
) -> "GalleryVersion":
    """Shard (N,) ids, (N,) labels (or None) and (N, D) embeddings into ``rows_per_shard``-row
    shards and commit them as the version ``out``. Resumes a killed earlier call on the same ``out``.
    ``spaces``, ``lineages``: (N,) strings, each row's space and ``lineage_key`` (None: ``space`` and
    ``lineage`` for every row)."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise GalleryError(f"empty gallery or bad shape: embeddings must be (N, D) with N > 0, got {embeddings.shape}")
    if rows_per_shard <= 0:
        raise GalleryError(f"rows_per_shard must be positive, got {rows_per_shard}")
    ids = np.asarray(ids)
    labels = None if labels is None else np.asarray(labels)
    if len(ids) != len(embeddings) or (labels is not None and len(labels) != len(embeddings)):
        raise GalleryError(f"ids, labels and embeddings must have the same number of rows ({len(embeddings)})")
    origins = {key: None if values is None else np.asarray(values, dtype=object)
               for key, values in (("spaces", spaces), ("lineages", lineages))}
    for key, values in origins.items():
        if values is not None and values.shape != (len(embeddings),):
            raise GalleryError(f"{key} must have one value per row ({len(embeddings)}), got shape {values.shape}")
    writer = GalleryWriter(
        out, dim=embeddings.shape[1], lineage=lineage, space=space,
        normalised=normalised, extra=extra, encoding=encoding, filesystem=filesystem,
    )
    starts = range(0, len(embeddings), rows_per_shard)
    records = []
    for index, start in enumerate(starts):
        rows = slice(start, start + rows_per_shard)
        if not writer.has_shard(index, expected_rows=len(ids[rows])):
            shard_labels = None if labels is None else labels[rows]
            shard_origins = {key: None if values is None else values[rows] for key, values in origins.items()}
            records.append(writer.write_shard(index, ids[rows], shard_labels, embeddings[rows], **shard_origins))
    return writer.commit(num_shards=len(starts), records=records)


class GalleryVersion:
    """A committed gallery version: its manifest and checked access to its shards."""

    def __init__(self, location: _Location, manifest: dict):
        self._location = location
        self.manifest = manifest

    @property
    def path(self) -> str:
        """The version folder, as a local absolute path or the URI it was opened with."""
        return self._location.display

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem holding it (e.g. for ``ray.data.read_parquet(..., filesystem=)``)."""
        return self._location.fs

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    @property
    def lineage(self) -> list[str]:
        return list(self.manifest["lineage"])

    @property
    def space(self) -> str:
        return self.manifest["space"]

    @property
    def normalised(self) -> bool:
        return self.manifest["normalised"]

    @property
    def format_version(self) -> int:
        return self.manifest["format_version"]

    @property
    def encoding(self) -> str:
        """How the embedding column is stored (``ENCODINGS``; format 1: ``"tensor"``)."""
        return self.manifest.get("encoding", "tensor")

    @property
    def spaces(self) -> dict[str, int]:
        """Rows per space, e.g. ``{"phi_2": 10000}`` (format 1: every row in the manifest's space)."""
        return dict(self.manifest.get("spaces", {self.space: self.num_rows}))

    @property
    def lineages(self) -> dict[str, int]:
        """Rows per ``lineage_key``, e.g. ``{"phi_1>psi_1_2": 9000, "phi_2": 1000}`` for an upgraded gallery with rows
        appended (format 1: every row with the manifest's lineage)."""
        return dict(self.manifest.get("lineages", {lineage_key(self.lineage): self.num_rows}))

    @property
    def num_rows(self) -> int:
        return self.manifest["num_rows"]

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def shard_rows(self) -> list[int]:
        """Rows of every shard, in shard order (from the manifest)."""
        return [int(s["rows"]) for s in self.manifest["shards"]]

    @property
    def shard_paths(self) -> list[str]:
        """Every shard file, in shard order, as an absolute path or URI."""
        return [self._location.child(s["file"]).display for s in self.manifest["shards"]]

    def read_shard(self, index: int, *, verify: bool = True) -> Shard:
        """Shard ``index`` as ``Shard(embeddings (n, dim) float32, labels (n,) int64 with ``UNLABELLED`` for null,
        ids (n,) int64)``. ``verify``: check the file's checksum against the manifest.
        Always checks schema, row count, id range and that embeddings are finite. The embeddings of a binary
        column are a view of the bytes read, not a copy."""
        return self.read_rows(index, verify=verify)[0]

    def read_rows(self, index: int, *, verify: bool = True) -> tuple[Shard, ShardOrigins]:
        """Shard ``index`` as ``read_shard`` gives it, and where its rows come from (``ShardOrigins``: each row's
        space and lineage; for a format-1 shard, the manifest's)."""
        record = self.manifest["shards"][index]
        name = record["file"]
        try:
            data = _read_bytes(self._location.child(name))
        except FileNotFoundError:
            raise GalleryError(f"shard {name} listed in {self.path}/{MANIFEST_NAME} is missing") from None
        algorithm = "blake3" if self.format_version >= 2 else "sha256"
        if verify and _checksum(data, algorithm) != record[algorithm]:
            raise GalleryError(f"shard {name}: {algorithm} checksum does not match the manifest (corrupt or replaced "
                               "file)")
        try:
            # the pages' CRCs only when the file's checksum was not checked: a matching one covers every byte,
            # and checking the CRCs too is a measurable part of decoding (measured: BENCHMARKS.md, section
            # "Gallery upgrade")
            table = pq.read_table(pa.BufferReader(data), page_checksum_verification=not verify)
        except (OSError, pa.ArrowException) as err:  # a failed page CRC is an OSError
            raise GalleryError(f"shard {name}: unreadable Parquet ({err})") from None
        problem = _schema_problem(table.schema, gallery_schema(self.dim, self.encoding, self.format_version))
        if problem is not None:
            raise GalleryError(f"shard {name}: {problem}")
        if table.num_rows != record["rows"]:
            raise GalleryError(f"shard {name}: {table.num_rows} rows, manifest says {record['rows']}")
        try:
            embeddings = embeddings_from_column(table.column("embedding"))
        except GalleryError as err:
            raise GalleryError(f"shard {name}: {err}") from None
        if not np.isfinite(embeddings).all():
            raise GalleryError(f"shard {name}: embeddings contain NaN or Inf")
        ids = _int64_column(table, "id", name)
        if len(ids) and (ids.min() != record["min_id"] or ids.max() != record["max_id"]):
            expected = f"[{record['min_id']}, {record['max_id']}]"
            raise GalleryError(f"shard {name}: ids outside the manifest's range {expected}")
        labels = _int64_column(table, "label", name)
        if self.format_version == 1:
            origins = ShardOrigins(_constant_origin(self.space, len(ids)),
                                   _constant_origin(lineage_key(self.lineage), len(ids)))
        else:
            origins = ShardOrigins(*(_single_chunk(table.column(key)) for key in ("space", "lineage")))
        return Shard(embeddings, labels, ids), origins

    def read_ids(self, index: int) -> np.ndarray:
        """Shard ``index``'s ids (its id column only, no checksum: for planning, e.g. checking that rows to append
        are new)."""
        name = self.manifest["shards"][index]["file"]
        return _read_ids(self._location.child(name), f"shard {name} of {self.path}")

    def iter_shards(self, *, verify: bool = True) -> Iterator[Shard]:
        """Yield ``read_shard(i)`` for every shard in order (one shard in memory at a time)."""
        for index in range(self.num_shards):
            yield self.read_shard(index, verify=verify)

    def read_all(self, *, verify: bool = True) -> Shard:
        """The whole gallery in memory as one ``Shard(embeddings (N, dim) float32, labels (N,) int64, ids (N,)
        int64)``, in shard order. Evaluation never needs it: it reads shard by shard."""
        parts = list(self.iter_shards(verify=verify))
        if not parts:
            return Shard(np.empty((0, self.dim), np.float32), np.empty(0, np.int64), np.empty(0, np.int64))
        return Shard(*(np.concatenate(column) for column in zip(*parts)))

    def validate(self, *, checksums: bool = True) -> None:
        """Read every shard with all checks and check ids are unique across shards; raise
        ``GalleryError`` naming the first problem found."""
        names = [s["file"] for s in self.manifest["shards"]]
        ids = [self.read_shard(i, verify=checksums).ids for i in range(self.num_shards)]
        _check_unique_ids(names, ids)

    def __repr__(self) -> str:
        return (
            f"GalleryVersion({self.path!r}, space={self.space!r}, lineage={self.lineage}, "
            f"rows={self.num_rows}, dim={self.dim})"
        )


def _shard_table(name: str, ids, labels, embeddings, dim: int, normalised: bool, encoding: str,
                 spaces: pa.DictionaryArray, lineages: pa.DictionaryArray) -> pa.Table:
    """Validated shard contents as a table with ``gallery_schema(dim, encoding)``."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[1] != dim:
        raise GalleryError(f"shard {name}: embeddings must be (n, {dim}), got shape {embeddings.shape}")
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise GalleryError(f"shard {name}: embeddings must be floating point, got {embeddings.dtype}")
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    n = len(embeddings)
    if n == 0:
        raise GalleryError(f"shard {name}: no rows")
    if not np.isfinite(embeddings).all():
        bad = int(np.flatnonzero(~np.isfinite(embeddings).all(axis=1))[0])
        raise GalleryError(f"shard {name}: embeddings contain NaN or Inf (first at row {bad})")
    if normalised:
        norms = np.linalg.norm(embeddings, axis=1)
        if np.abs(norms - 1).max() > NORM_TOLERANCE:
            raise GalleryError(
                f"shard {name}: gallery is declared normalised but norms range {norms.min():.4g}..{norms.max():.4g}"
            )
    ids = _as_int64(ids, n, f"shard {name}: ids")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise GalleryError(f"shard {name}: duplicate ids {unique[counts > 1][:5].tolist()}")
    if labels is None:
        label_array = pa.nulls(n, pa.int64())
    else:
        labels = _as_int64(labels, n, f"shard {name}: labels")
        if (labels < UNLABELLED).any():
            raise GalleryError(f"shard {name}: labels must be >= 0 or {UNLABELLED} (unlabelled)")
        label_array = pa.array(labels, mask=labels == UNLABELLED)
    return pa.Table.from_arrays([pa.array(ids), label_array, spaces, lineages, embedding_array(embeddings, encoding)],
                                schema=gallery_schema(dim, encoding))


def _origin_column(values, n: int, default: str, name: str, what: str) -> pa.DictionaryArray:
    """``write_shard``'s ``spaces`` or ``lineages`` as the shard's dictionary column of ``n`` rows: one string for
    every row (None: ``default``), or per-row strings (a sequence, a numpy array, an Arrow array)."""
    if values is None or isinstance(values, str):
        value = default if values is None else values
        _check_origin(value, name, what)
        return _constant_origin(value, n)
    if isinstance(values, pa.ChunkedArray):
        values = _single_chunk(values)
    if not isinstance(values, pa.Array):
        values = pa.array(np.asarray(values, dtype=object), type=pa.string())
    if len(values) != n:
        raise GalleryError(f"shard {name}: {what} must have one value per row ({n}), got {len(values)}")
    if values.null_count:
        raise GalleryError(f"shard {name}: {what} has {values.null_count} null rows")
    if not isinstance(values, pa.DictionaryArray):
        values = values.cast(pa.string()).dictionary_encode()
    values = values.cast(_ORIGIN)
    for value in values.dictionary.to_pylist():
        _check_origin(value, name, what)
    return values


def _check_origin(value, name: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise GalleryError(f"shard {name}: {what} must be non-empty strings, got {value!r}")
    if what == "spaces" and LINEAGE_SEPARATOR in value:
        raise GalleryError(f"shard {name}: space {value!r} contains {LINEAGE_SEPARATOR!r}, which joins lineages")
    if what == "lineages" and "" in value.split(LINEAGE_SEPARATOR):
        raise GalleryError(f"shard {name}: lineage {value!r} has an empty name")


def _constant_origin(value: str, n: int) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value], pa.string()))


def _single_chunk(column: pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)


def _counts(column) -> dict[str, int]:
    """Rows per value of a dictionary column (chunked or not), in the order the values first occur."""
    column = _single_chunk(column) if isinstance(column, pa.ChunkedArray) else column
    codes = column.indices.to_numpy()
    present, first = np.unique(codes, return_index=True)
    counts = np.bincount(codes, minlength=len(column.dictionary))
    names = column.dictionary.to_pylist()
    return {names[code]: int(counts[code]) for code in present[np.argsort(first)]}


def _total_counts(per_shard) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in per_shard:
        for key, rows in counts.items():
            total[key] = total.get(key, 0) + rows
    return total


def _as_int64(values, n: int, what: str) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != (n,):
        raise GalleryError(f"{what} must have shape ({n},), got {values.shape}")
    if not np.issubdtype(values.dtype, np.integer):
        raise GalleryError(f"{what} must be integers, got {values.dtype}")
    return values.astype(np.int64, copy=False)


def _int64_column(table: pa.Table, column: str, name: str) -> np.ndarray:
    values = table.column(column)
    if values.type != pa.int64():
        raise GalleryError(f"shard {name}: column {column!r} has type {values.type}, expected int64")
    if column == "id" and values.null_count:
        raise GalleryError(f"shard {name}: {values.null_count} null ids")
    return pc.fill_null(values, UNLABELLED).to_numpy()


def _schema_problem(schema: pa.Schema, expected: pa.Schema) -> str | None:
    """What makes ``schema`` differ from a gallery's ``expected`` schema (names and types), or None if it matches."""
    if schema.names != expected.names:
        return f"columns {schema.names}, expected {expected.names}"
    for field in expected:
        if schema.field(field.name).type != field.type:
            return f"column {field.name!r} has type {schema.field(field.name).type}, expected {field.type}"
    return None


def _checksum(data, algorithm: str = "blake3") -> str:
    """The hex digest of a shard file's bytes: BLAKE3 (format 2), or sha256 (format 1)."""
    if algorithm == "sha256":
        return hashlib.sha256(data).hexdigest()
    return blake3(data).hexdigest()


def _shard_record(name: str, checksum: str, size: int, ids: np.ndarray, spaces: dict, lineages: dict) -> dict:
    """The manifest record of shard ``name``: a file of ``size`` bytes whose BLAKE3 digest is ``checksum`` and
    holding the (non-empty) ``ids``, with rows per space and per lineage; plain Python values, in ``_RECORD_KEYS``
    order."""
    return {
        "file": name,
        "rows": len(ids),
        "blake3": checksum,
        "min_id": int(ids.min()),
        "max_id": int(ids.max()),
        "bytes": int(size),
        "spaces": dict(spaces),
        "lineages": dict(lineages),
    }


def _records_by_file(records) -> dict[str, dict]:
    """The shard records given to ``commit`` (an iterable, or None), checked and keyed by file name.
    Raises for a malformed record or two different records for the same file."""
    by_file = {}
    for record in records if records is not None else ():
        problem = _record_problem(record)
        if problem is not None:
            raise GalleryError(f"malformed shard record {record!r}: {problem}")
        record = {key: record[key] if key in ("file", "blake3", "spaces", "lineages") else int(record[key])
                  for key in _RECORD_KEYS}
        earlier = by_file.setdefault(record["file"], record)
        if earlier != record:
            raise GalleryError(f"two different records given for shard {record['file']}: {earlier} and {record}")
    return by_file


def _record_problem(record: Any) -> str | None:
    """What makes ``record`` differ from a record returned by ``write_shard``, or None."""
    if not isinstance(record, dict):
        return "expected a dict"
    if set(record) != set(_RECORD_KEYS):
        return f"keys {sorted(record)}, expected {sorted(_RECORD_KEYS)}"
    if not isinstance(record["file"], str) or _SHARD_RE.match(record["file"]) is None:
        return "file must be a shard name like part-00000.parquet"
    if not isinstance(record["blake3"], str) or _DIGEST_RE.fullmatch(record["blake3"]) is None:
        return "blake3 must be 64 lowercase hex digits"
    numbers = [record[key] for key in ("rows", "min_id", "max_id", "bytes")]
    if not all(isinstance(value, (int, np.integer)) and not isinstance(value, bool) for value in numbers):
        return "rows, min_id, max_id and bytes must be integers"
    if record["rows"] <= 0 or record["bytes"] <= 0 or record["min_id"] > record["max_id"]:
        return "rows and bytes must be positive and min_id <= max_id"
    for key in ("spaces", "lineages"):
        counts = record[key]
        if (not isinstance(counts, dict) or not all(isinstance(k, str) and k for k in counts)
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in counts.values())
                or sum(counts.values()) != record["rows"]):
            return f"{key} must map names to positive row counts summing to rows"
    return None


def _read_ids(location: "_Location", what: str) -> np.ndarray:
    """The id column of the shard file at ``location`` (that column only); a GalleryError naming ``what``."""
    try:
        return pq.read_table(location.path, columns=["id"], filesystem=location.fs).column("id").to_numpy()
    except (OSError, pa.ArrowException) as err:
        raise GalleryError(f"{what}: unreadable Parquet ({err})") from None


def _overlapping(ranges: list[tuple[int, int]]) -> list[list[int]]:
    """The groups of two or more shards whose (min id, max id) ranges overlap, each a connected run of the sorted
    ranges; a shard in no group shares no id with any other."""
    groups, current, reach = [], [], None
    for index in sorted(range(len(ranges)), key=lambda i: ranges[i][0]):
        low, high = ranges[index]
        if reach is not None and low > reach:
            groups.append(current)
            current, reach = [], None
        current.append(index)
        reach = high if reach is None else max(reach, high)
    groups.append(current)
    return [sorted(group) for group in groups if len(group) > 1]


def _check_unique_ids(names: list[str], id_arrays: list[np.ndarray]) -> None:
    """Raise naming the first id that appears in two shards (or twice in one)."""
    ids = np.concatenate(id_arrays)
    shard_of = np.repeat(np.arange(len(id_arrays)), [len(a) for a in id_arrays])
    pair = first_duplicate(ids)
    if pair is not None:
        first, second = pair
        raise GalleryError(
            f"duplicate id {int(ids[first])} in shards {names[shard_of[first]]} and {names[shard_of[second]]}"
        )


def first_duplicate(ids: np.ndarray) -> tuple[int, int] | None:
    """Positions ``(first, second)`` of the smallest id that occurs more than once, in input order; None if all
    ids are unique."""
    order = np.argsort(ids, kind="stable")
    repeated = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if not len(repeated):
        return None
    return int(order[repeated[0]]), int(order[repeated[0] + 1])


def _check_lineage(lineage, space) -> None:
    if not isinstance(lineage, (list, tuple)) or not lineage or not all(isinstance(s, str) and s for s in lineage):
        raise GalleryError(f"lineage must be a non-empty list of names like ['phi_1', 'psi_1_2'], got {lineage!r}")
    if not isinstance(space, str) or not space:
        raise GalleryError(f"space must be a model name like 'phi_2', got {space!r}")


def _check_manifest(manifest: Any, where: str) -> None:
    """Raise unless ``manifest`` is a well-formed manifest of a readable format whose files stay in its folder."""
    if not isinstance(manifest, dict):
        raise GalleryError(f"{where}: expected a JSON object")
    found = manifest.get("format_version")
    if found not in READABLE_FORMATS:
        readable = " or ".join(map(str, READABLE_FORMATS))
        raise GalleryError(f"{where}: unsupported format_version {found!r} (expected {readable})")
    required = {"lineage", "space", "dim", "normalised", "num_rows", "shards", "created", "extra"}
    if found >= 2:
        required |= {"encoding", "spaces", "lineages"}
    missing = required - set(manifest)
    if missing:
        raise GalleryError(f"{where}: missing keys {sorted(missing)}")
    try:
        _check_lineage(manifest["lineage"], manifest["space"])
    except GalleryError as err:
        raise GalleryError(f"{where}: {err}") from None
    if not isinstance(manifest["dim"], int) or manifest["dim"] <= 0:
        raise GalleryError(f"{where}: dim must be a positive integer, got {manifest['dim']!r}")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not shards:
        raise GalleryError(f"{where}: empty gallery (no shards)")
    if found >= 2 and manifest["encoding"] not in ENCODINGS:
        raise GalleryError(f"{where}: unknown encoding {manifest['encoding']!r} (one of {', '.join(ENCODINGS)})")
    keys = _RECORD_KEYS if found >= 2 else _V1_RECORD_KEYS
    for record in shards:
        if not isinstance(record, dict) or not set(keys) <= set(record):
            raise GalleryError(f"{where}: malformed shard entry {record!r} (keys {', '.join(keys)})")
        name = record["file"]
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise GalleryError(f"{where}: shard file {name!r} is not a plain file name inside the version folder")
    if sum(r["rows"] for r in shards) != manifest["num_rows"]:
        raise GalleryError(f"{where}: num_rows {manifest['num_rows']} is not the sum of the shards' rows")
    for key in ("spaces", "lineages") if found >= 2 else ():
        counts = manifest[key]
        if not isinstance(counts, dict) or sum(counts.values()) != manifest["num_rows"]:
            raise GalleryError(f"{where}: {key} must map names to rows, summing to num_rows")


@dataclass(frozen=True)
class _Location:
    """A folder on a pyarrow filesystem; ``display`` is how users name it (path or URI). ``s3_from_uri``: an s3://
    URI opened from the standard AWS configuration, which boto3 reads the same way (``_put_if_absent``)."""

    fs: pafs.FileSystem
    path: str
    display: str
    s3_from_uri: bool = False

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def child(self, name: str) -> "_Location":
        return _Location(self.fs, posixpath.join(self.path, name), self.display.rstrip("/") + "/" + name,
                         self.s3_from_uri)


def _locate(path: str, filesystem: pafs.FileSystem | None) -> _Location:
    if filesystem is not None:
        return _Location(filesystem, path.rstrip("/"), path.rstrip("/"))
    if "://" not in path:
        absolute = os.path.abspath(path)
        return _Location(pafs.LocalFileSystem(), absolute, absolute)
    try:
        fs, inner = pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise GalleryError(f"cannot open filesystem for {path!r}: {err}") from None
    return _Location(fs, inner.rstrip("/"), path.rstrip("/"), isinstance(fs, pafs.S3FileSystem))


def _read_bytes(location: _Location) -> bytes:
    """The whole file (raises FileNotFoundError if absent)."""
    if location.fs.get_file_info(location.path).type != pafs.FileType.File:
        raise FileNotFoundError(location.display)
    # a random-access file read whole in one call: a stream's readall() was 15 times slower on local disk (measured:
    # BENCHMARKS.md, section "Gallery I/O")
    with location.fs.open_input_file(location.path) as file:
        return file.read()


def _put_if_absent(folder: _Location, name: str, data: bytes) -> bool:
    """Write ``folder/name`` unless it exists, as one step; False (and nothing written) if it existed.

    On S3 a conditional put (``If-None-Match: *``, through boto3: pyarrow has no conditional write), so that of two
    writers racing to commit one version exactly one wins and the other's manifest never replaces it. Elsewhere a
    check then an atomic write: on a local filesystem the commit's folder rename is what excludes a second writer;
    on other object stores the window between the check and the write stays open (docs/STORAGE.md)."""
    if folder.s3_from_uri:
        import boto3
        from botocore.exceptions import ClientError

        bucket, _, prefix = folder.path.partition("/")
        key = posixpath.join(prefix, name) if prefix else name
        try:
            boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise OSError(f"writing {folder.child(name).display}: {err}") from err
        return True
    if folder.fs.get_file_info(folder.child(name).path).type != pafs.FileType.NotFound:
        return False
    _write_atomic(folder, name, data)
    return True


def _write_atomic(folder: _Location, name: str, data: bytes) -> None:
    """Write ``data`` to ``folder/name`` so that the file appears complete or not at all."""
    # A unique temp name: a retried (speculative) task may write the same file concurrently.
    tmp = folder.child(f".{name}.{uuid.uuid4().hex}.tmp").path
    with folder.fs.open_output_stream(tmp) as stream:
        stream.write(data)
    folder.fs.move(tmp, folder.child(name).path)
