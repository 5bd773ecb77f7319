"""Gallery store: round trips, deterministic bytes, resumable staging, and every bad-input case."""

import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from blake3 import blake3

from bict_ray.retrieval.shard import Shard
from bict_ray.storage.gallery import (
    STAGING_SETTINGS_NAME,
    UNLABELLED,
    GalleryError,
    GalleryWriter,
    embeddings_from_column,
    gallery_schema,
    is_committed,
    open_gallery,
    write_gallery,
)

LINEAGE = dict(lineage=["phi_1", "psi_1_2"], space="phi_2")


def make_gallery(n=10, d=4, seed=0):
    """(n,) ids 100.., (n,) labels i % 3 with row 1 unlabelled, (n, d) unit float32 embeddings."""
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(n, d)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = np.arange(n) % 3
    labels[1] = UNLABELLED
    return np.arange(100, 100 + n), labels, embeddings


def shard_bytes(version):
    return [open(p, "rb").read() for p in version.shard_paths]


def rewrite_manifest(path, **changes):
    manifest_path = os.path.join(path, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest.update(changes)
    json.dump(manifest, open(manifest_path, "w"))
    return manifest


@pytest.fixture
def committed(tmp_path):
    ids, labels, embeddings = make_gallery()
    return write_gallery(str(tmp_path / "v2"), ids, labels, embeddings, rows_per_shard=4, **LINEAGE)


# ---- round trips ---------------------------------------------------------------------------------


def test_round_trip_local_path(tmp_path, committed):
    ids, labels, embeddings = make_gallery()
    version = open_gallery(str(tmp_path / "v2"))
    assert version.path == str(tmp_path / "v2")
    assert (version.dim, version.num_rows, version.num_shards) == (4, 10, 3)
    assert version.lineage == ["phi_1", "psi_1_2"] and version.space == "phi_2" and version.normalised
    assert version.shard_paths == [str(tmp_path / "v2" / f"part-0000{i}.parquet") for i in range(3)]
    assert [s["rows"] for s in version.manifest["shards"]] == [4, 4, 2] == version.shard_rows
    assert [(s["min_id"], s["max_id"]) for s in version.manifest["shards"]] == [(100, 103), (104, 107), (108, 109)]
    # a shard is (embeddings, labels, ids) here as everywhere evaluation reads one
    shard = version.read_shard(1)
    assert isinstance(shard, Shard) and shard.ids.tolist() == [104, 105, 106, 107]
    np.testing.assert_array_equal(shard.embeddings, embeddings[4:8])
    got_embeddings, got_labels, got_ids = version.read_all()
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_labels, [0, -1, 2, 0, 1, 2, 0, 1, 2, 0])
    np.testing.assert_array_equal(got_embeddings, embeddings)
    assert got_ids.dtype == np.int64 and got_labels.dtype == np.int64 and got_embeddings.dtype == np.float32
    assert sorted(os.listdir(tmp_path)) == ["v2"]  # the staging folder was renamed, not copied
    version.validate()


def test_round_trip_file_uri(tmp_path):
    ids, labels, embeddings = make_gallery(n=5, d=3)
    uri = f"file://{tmp_path}/v1"
    write_gallery(uri, ids, None, embeddings, rows_per_shard=2, lineage=["phi_1"], space="phi_1", extra={"seed": 7})
    version = open_gallery(uri)
    assert version.path == uri and version.shard_paths[0] == uri + "/part-00000.parquet"
    assert version.manifest["extra"] == {"seed": 7}
    got_embeddings, got_labels, got_ids = version.read_all()
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_labels, [UNLABELLED] * 5)
    np.testing.assert_array_equal(got_embeddings, embeddings)


def test_round_trip_object_store_writes_manifest_last():
    fs, _ = pafs.FileSystem.from_uri("mock://")
    ids, labels, embeddings = make_gallery(n=6)
    writer = GalleryWriter("bucket/v1", dim=4, filesystem=fs, **LINEAGE)
    assert writer.staging_path == "bucket/v1"  # no rename on object stores: shards go straight to out
    writer.write_shard(0, ids[:3], labels[:3], embeddings[:3])
    writer.write_shard(1, ids[3:], labels[3:], embeddings[3:])
    assert writer.has_shard(1, expected_rows=3) and not writer.has_shard(2)
    assert not is_committed("bucket/v1", filesystem=fs)
    with pytest.raises(GalleryError, match="not a committed gallery version"):
        open_gallery("bucket/v1", filesystem=fs)
    writer.commit()
    version = open_gallery("bucket/v1", filesystem=fs)
    assert is_committed("bucket/v1", filesystem=fs)
    np.testing.assert_array_equal(version.read_all().embeddings, embeddings)


def test_two_writers_racing_on_s3_commit_one_version(bucket, monkeypatch):
    # both staged v2 and checked that it was not committed; the first to commit wins, the second is refused and the
    # first's manifest stays (a conditional put on S3: plain object stores would let the second replace it)
    import boto3

    ids, labels, embeddings = make_gallery(n=6)
    first, second = (GalleryWriter(f"s3://{bucket}/v2", dim=4, **LINEAGE) for _ in range(2))
    for writer in (first, second):
        writer.write_shard(0, ids, labels, embeddings)
    monkeypatch.setattr(second, "_refuse_committed", lambda: None)  # it checked before the first committed
    first.commit()
    stored = boto3.client("s3").get_object(Bucket=bucket, Key="v2/manifest.json")["Body"].read()
    with pytest.raises(GalleryError, match="committed by another writer .* never overwritten"):
        second.commit()
    assert boto3.client("s3").get_object(Bucket=bucket, Key="v2/manifest.json")["Body"].read() == stored
    np.testing.assert_array_equal(open_gallery(f"s3://{bucket}/v2").read_all().embeddings, embeddings)


def test_a_second_writer_with_other_settings_on_s3_is_refused(bucket):
    ids, labels, embeddings = make_gallery(n=6)
    GalleryWriter(f"s3://{bucket}/v2", dim=4, **LINEAGE).write_shard(0, ids, labels, embeddings)
    with pytest.raises(GalleryError, match=r"holds shards staged by another run \(extra: staged \{\}"):
        GalleryWriter(f"s3://{bucket}/v2", dim=4, extra={"upgrade_precision": "bfloat16"}, **LINEAGE)


def test_plain_pyarrow_reads_embeddings_as_float32_matrix(committed):
    # the default binary column: each row its float32 bytes, little-endian, readable without bict-ray
    table = pq.read_table(committed.shard_paths[0])
    assert table.schema == gallery_schema(4)
    column = table.column("embedding").combine_chunks()
    matrix = np.frombuffer(column.buffers()[1], dtype="<f4").reshape(len(column), -1)
    np.testing.assert_array_equal(matrix, make_gallery()[2][:4])
    assert table.column("label").to_pylist() == [0, None, 2, 0]
    assert table.column("space").to_pylist() == ["phi_2"] * 4
    assert table.column("lineage").to_pylist() == ["phi_1>psi_1_2"] * 4
    # pandas sees the same rows, one bytes value each
    frame = table.to_pandas()
    np.testing.assert_array_equal(np.frombuffer(frame.embedding[1], "<f4"), make_gallery()[2][1])


def test_tensor_encoding_reads_as_matrix_in_pyarrow_and_ray_data(tmp_path, ray_session):
    import ray

    ids, labels, embeddings = make_gallery()
    version = write_gallery(str(tmp_path / "t"), ids, labels, embeddings, rows_per_shard=4, encoding="tensor",
                            **LINEAGE)
    assert version.encoding == "tensor" and version.manifest["encoding"] == "tensor"
    table = pq.read_table(version.shard_paths[0])
    assert table.schema == gallery_schema(4, "tensor")
    matrix = table.column("embedding").chunk(0).to_numpy_ndarray()
    assert matrix.shape == (4, 4) and matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix, embeddings[:4])
    batch = next(iter(ray.data.read_parquet(version.shard_paths[0]).iter_batches(batch_format="numpy")))
    assert batch["embedding"].shape == (4, 4) and batch["embedding"].dtype == np.float32
    np.testing.assert_array_equal(version.read_all().embeddings, embeddings)
    version.validate()


def write_format_1(path, ids, labels, embeddings, rows_per_shard, lineage, space):
    """A version as bict-ray wrote them before rows kept their space: tensor embeddings, no space and lineage
    columns, a format-1 manifest."""
    os.makedirs(path)
    shards = []
    for index, start in enumerate(range(0, len(ids), rows_per_shard)):
        rows = slice(start, start + rows_per_shard)
        name = f"part-{index:05d}.parquet"
        table = pa.Table.from_arrays(
            [pa.array(ids[rows]), pa.array(labels[rows], mask=labels[rows] == UNLABELLED),
             pa.FixedShapeTensorArray.from_numpy_ndarray(embeddings[rows])], schema=gallery_schema(4, format_version=1))
        pq.write_table(table, os.path.join(path, name))
        data = open(os.path.join(path, name), "rb").read()
        shards.append({"file": name, "rows": len(ids[rows]), "sha256": hashlib.sha256(data).hexdigest(),
                       "min_id": int(ids[rows].min()), "max_id": int(ids[rows].max()), "bytes": len(data)})
    manifest = {"format_version": 1, "lineage": lineage, "space": space, "dim": 4, "normalised": True,
                "num_rows": len(ids), "shards": shards, "created": "2026-11-01T00:00:00+00:00", "extra": {}}
    json.dump(manifest, open(os.path.join(path, "manifest.json"), "w"))


def test_a_format_1_version_still_reads_with_every_row_in_its_space(tmp_path):
    ids, labels, embeddings = make_gallery()
    write_format_1(str(tmp_path / "old"), ids, labels, embeddings, 4, ["phi_1", "psi_1_2"], "phi_2")
    version = open_gallery(str(tmp_path / "old"))
    assert (version.format_version, version.encoding) == (1, "tensor")
    assert version.spaces == {"phi_2": 10} and version.lineages == {"phi_1>psi_1_2": 10}
    shard, origins = version.read_rows(2)
    np.testing.assert_array_equal(shard.embeddings, embeddings[8:])
    assert origins.spaces.to_pylist() == ["phi_2"] * 2 and origins.lineages.to_pylist() == ["phi_1>psi_1_2"] * 2
    np.testing.assert_array_equal(version.read_all().labels, [0, -1, 2, 0, 1, 2, 0, 1, 2, 0])
    version.validate()


def test_rows_keep_their_own_space_and_lineage(tmp_path):
    """An upgraded gallery with rows appended: 7 rows came through psi_1_2, 3 were embedded by phi_2 itself."""
    ids, labels, embeddings = make_gallery()
    lineages = ["phi_1>psi_1_2"] * 7 + ["phi_2"] * 3
    version = write_gallery(str(tmp_path / "v"), ids, labels, embeddings, rows_per_shard=4, lineages=lineages,
                            **LINEAGE)
    assert version.spaces == {"phi_2": 10}
    assert version.lineages == {"phi_1>psi_1_2": 7, "phi_2": 3}
    assert [s["lineages"] for s in version.manifest["shards"]] == [
        {"phi_1>psi_1_2": 4}, {"phi_1>psi_1_2": 3, "phi_2": 1}, {"phi_2": 2}]
    assert version.read_rows(1)[1].lineages.to_pylist() == lineages[4:8]
    spaces = ["phi_1"] * 2 + ["phi_2"] * 8  # a gallery half refreshed from images is representable too
    mixed = write_gallery(str(tmp_path / "m"), ids, labels, embeddings, rows_per_shard=4, spaces=spaces, **LINEAGE)
    assert mixed.spaces == {"phi_1": 2, "phi_2": 8}
    assert mixed.read_rows(0)[1].spaces.to_pylist() == spaces[:4]


@pytest.mark.parametrize("origins, message", [
    (dict(spaces=["phi_2", ""]), "spaces must be non-empty strings"),
    (dict(spaces="phi>2"), "contains '>'"),
    (dict(lineages=["phi_1>", "phi_2"]), "lineage 'phi_1>' has an empty name"),
    (dict(lineages=["phi_2"]), "lineages must have one value per row"),
    (dict(spaces=pa.array(["phi_2", None])), "spaces has 1 null rows"),
])
def test_bad_row_origins_are_refused(tmp_path, origins, message):
    ids, labels, embeddings = make_gallery(n=2)
    writer = GalleryWriter(str(tmp_path / "v"), dim=4, **LINEAGE)
    with pytest.raises(GalleryError, match=message):
        writer.write_shard(0, ids, labels, embeddings, **origins)
    assert writer.staged_count() == 0


def test_a_resumed_run_with_another_encoding_is_refused(tmp_path):
    ids, labels, embeddings = make_gallery(n=2)
    GalleryWriter(str(tmp_path / "v"), dim=4, **LINEAGE).write_shard(0, ids, labels, embeddings)
    with pytest.raises(GalleryError, match="encoding: staged 'binary', now 'tensor'"):
        GalleryWriter(str(tmp_path / "v"), dim=4, encoding="tensor", **LINEAGE)
    with pytest.raises(GalleryError, match="embedding encoding must be one of binary, tensor"):
        GalleryWriter(str(tmp_path / "w"), dim=4, encoding="npy", **LINEAGE)


# ---- determinism and resumable staging ---------------------------------------------------------


def test_same_data_gives_identical_shard_bytes(tmp_path, committed):
    ids, labels, embeddings = make_gallery()
    again = write_gallery(str(tmp_path / "again"), ids, labels, embeddings, rows_per_shard=4, **LINEAGE)
    assert shard_bytes(again) == shard_bytes(committed)
    assert [s["blake3"] for s in again.manifest["shards"]] == [s["blake3"] for s in committed.manifest["shards"]]


def forget_staging_settings(out):
    """As a staging folder left by a version of bict-ray before the settings were recorded: the second writer is
    then not refused up front, and the commit's own checks of every shard must catch the mix."""
    os.remove(os.path.join(out + ".staging", STAGING_SETTINGS_NAME))


def test_killed_writer_is_resumed_to_the_same_version(tmp_path, committed):
    ids, labels, embeddings = make_gallery()
    out = str(tmp_path / "resumed")
    first = GalleryWriter(out, dim=4, **LINEAGE)
    first.write_shard(0, ids[:4], labels[:4], embeddings[:4])
    first.write_shard(1, ids[4:8], labels[4:8], embeddings[4:8])
    # the kill: a half-written temp file and a torn copy of shard 2 are left behind
    open(os.path.join(first.staging_path, ".part-00002.parquet.dead.tmp"), "wb").write(b"PAR1")
    open(os.path.join(first.staging_path, "part-00002.parquet"), "wb").write(b"PAR1 torn")

    second = GalleryWriter(out, dim=4, **LINEAGE)
    assert second.has_shard(0, expected_rows=4) and second.has_shard(1)
    assert not second.has_shard(0, expected_rows=5)
    assert not second.has_shard(2) and not second.has_shard(3)
    # a run with other settings may not add its shards to these (nor take them as its own)
    with pytest.raises(GalleryError, match="staged by another run .*dim: staged 4, now 8"):
        GalleryWriter(out, dim=8, **LINEAGE)
    second.write_shard(2, ids[8:], labels[8:], embeddings[8:])
    resumed = second.commit(num_shards=3)

    assert shard_bytes(resumed) == shard_bytes(committed)
    assert sorted(os.listdir(out)) == ["manifest.json"] + [f"part-0000{i}.parquet" for i in range(3)]
    for key in ("lineage", "space", "dim", "normalised", "num_rows", "shards", "extra"):
        assert resumed.manifest[key] == committed.manifest[key]


def test_a_resumed_run_with_other_settings_is_refused_and_the_staged_shards_kept(tmp_path):
    ids, labels, embeddings = make_gallery()
    out = str(tmp_path / "v2")
    first = GalleryWriter(out, dim=4, extra={"upgrade_precision": "float32"}, **LINEAGE)
    first.write_shard(0, ids[:4], labels[:4], embeddings[:4])
    staged = sorted(os.listdir(first.staging_path))
    for changed in ({"extra": {"upgrade_precision": "bfloat16"}}, {"lineage": ["phi_1", "psi_9"], "space": "phi_9"}):
        settings = {"dim": 4, **LINEAGE, "extra": {"upgrade_precision": "float32"}, **changed}
        with pytest.raises(GalleryError, match="staged by another run"):
            GalleryWriter(out, **settings)
    assert sorted(os.listdir(first.staging_path)) == staged
    # the same settings resume, and the settings file does not outlive the commit
    again = GalleryWriter(out, dim=4, extra={"upgrade_precision": "float32"}, **LINEAGE)
    again.write_shard(1, ids[4:], labels[4:], embeddings[4:])
    version = again.commit(num_shards=2)
    assert sorted(os.listdir(out)) == ["manifest.json", "part-00000.parquet", "part-00001.parquet"]
    assert version.manifest["extra"] == {"upgrade_precision": "float32"}


def test_write_gallery_rerun_after_kill_skips_finished_shards(tmp_path):
    ids, labels, embeddings = make_gallery()
    out = str(tmp_path / "v2")
    GalleryWriter(out, dim=4, **LINEAGE).write_shard(0, ids[:4], labels[:4], embeddings[:4])
    shard0 = os.path.join(out + ".staging", "part-00000.parquet")
    mtime = os.stat(shard0).st_mtime_ns
    version = write_gallery(out, ids, labels, embeddings, rows_per_shard=4, **LINEAGE)
    assert os.stat(version.shard_paths[0]).st_mtime_ns == mtime
    np.testing.assert_array_equal(version.read_all().ids, ids)


# ---- shard records handed to commit ---------------------------------------------------------------


def write_shards(out):
    """A writer on ``out`` with ``make_gallery()`` staged in shards of 4, 4, 2 rows, and their records."""
    ids, labels, embeddings = make_gallery()
    writer = GalleryWriter(out, dim=4, **LINEAGE)
    rows = np.split(np.arange(10), [4, 8])
    return writer, [writer.write_shard(i, ids[r], labels[r], embeddings[r]) for i, r in enumerate(rows)]


def staged_files(writer):
    folder = writer.staging_path
    return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}


def without_created(manifest):
    return {key: value for key, value in manifest.items() if key != "created"}


def test_write_shard_returns_the_manifest_record(tmp_path):
    writer, records = write_shards(str(tmp_path / "v"))
    shard0 = open(os.path.join(writer.staging_path, "part-00000.parquet"), "rb").read()
    assert records[0] == {"file": "part-00000.parquet", "rows": 4, "blake3": blake3(shard0).hexdigest(),
                          "min_id": 100, "max_id": 103, "bytes": len(shard0), "spaces": {"phi_2": 4},
                          "lineages": {"phi_1>psi_1_2": 4}}
    assert json.loads(json.dumps(records)) == records  # plain JSON types, as a Ray task would return them
    version = writer.commit()
    assert version.manifest["shards"] == records
    assert open_gallery(version.path).manifest["shards"] == records


def test_commit_with_records_gives_the_same_manifest(tmp_path, committed):
    writer, records = write_shards(str(tmp_path / "fast"))
    version = writer.commit(num_shards=3, records=iter(records[::-1]))  # any iterable, in any order
    assert without_created(version.manifest) == without_created(committed.manifest)
    assert shard_bytes(version) == shard_bytes(committed)
    version.validate()


def test_commit_trusts_a_record_only_for_a_file_of_the_recorded_size(tmp_path):
    writer, records = write_shards(str(tmp_path / "v"))
    true_sha = records[1]["blake3"]
    trusted = dict(records[0], blake3="0" * 64)  # size matches: commit does not read the bytes to check
    stale = dict(records[1], blake3="1" * 64, bytes=records[1]["bytes"] + 1)  # size differs: file replaced
    version = writer.commit(records=[trusted, stale, records[2]])
    assert version.manifest["shards"] == [trusted, dict(records[1], blake3=true_sha), records[2]]
    with pytest.raises(GalleryError, match="shard part-00000.parquet: blake3 checksum does not match"):
        version.read_shard(0)


def test_commit_with_records_on_an_object_store():
    fs, _ = pafs.FileSystem.from_uri("mock://")
    ids, labels, embeddings = make_gallery(n=6)
    writer = GalleryWriter("bucket/v1", dim=4, filesystem=fs, **LINEAGE)
    records = [writer.write_shard(0, ids[:3], labels[:3], embeddings[:3]),
               writer.write_shard(1, ids[3:], labels[3:], embeddings[3:])]
    version = writer.commit(records=records)
    assert version.manifest["shards"] == records
    open_gallery("bucket/v1", filesystem=fs).validate()


def test_commit_with_records_still_refuses_a_shard_of_another_dim(tmp_path):
    out = str(tmp_path / "v")
    record = GalleryWriter(out, dim=3, **LINEAGE).write_shard(0, [1], None, [[1.0, 0.0, 0.0]])
    forget_staging_settings(out)
    writer = GalleryWriter(out, dim=4, **LINEAGE)
    with pytest.raises(GalleryError, match=r"shard part-00000.parquet: column 'embedding' .*\[12\].*\(gallery dim 4"):
        writer.commit(records=[record])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(file="part-00003.parquet"), r"records given for shards \['part-00003.parquet'\], which are not staged"),
        (dict(rows=5, spaces={"phi_2": 5}, lineages={"phi_1>psi_1_2": 5}),
         "shard part-00001.parquet: the record given to commit says rows 5, .* the file has rows 4"),
        (dict(lineages={"phi_1>psi_1_2": 3, "phi_2": 1}), "says lineages .* the file has lineages"),
        (dict(spaces={"phi_2": 3}), "malformed shard record .*spaces must map names to positive row counts"),
        (dict(min_id=103, max_id=108), "says min_id 103, max_id 108, the file has min_id 104, max_id 107"),
        (dict(file="../part-00001.parquet"), "malformed shard record .*file must be a shard name"),
        (dict(blake3="ABC"), "malformed shard record .*blake3 must be 64 lowercase hex digits"),
        (dict(blake3="a" * 64 + "\n"), "malformed shard record .*blake3 must be 64 lowercase hex digits"),
        (dict(rows="4"), "malformed shard record .*must be integers"),
        (dict(bytes=0), "malformed shard record .*must be positive"),
        (dict(extra=1), "malformed shard record .*keys"),
    ],
)
def test_bad_records_are_refused_and_leave_staging_intact(tmp_path, change, message):
    writer, records = write_shards(str(tmp_path / "v"))
    before = staged_files(writer)
    with pytest.raises(GalleryError, match=message):
        writer.commit(records=[records[0], dict(records[1], **change), records[2]])
    assert staged_files(writer) == before and not os.path.exists(tmp_path / "v")


def test_conflicting_records_for_one_shard_are_refused(tmp_path):
    writer, records = write_shards(str(tmp_path / "v"))
    with pytest.raises(GalleryError, match="two different records given for shard part-00000.parquet"):
        writer.commit(records=records + [dict(records[0], blake3="0" * 64)])
    assert writer.commit(records=records + records[:1]).manifest["shards"] == records  # a repeat is harmless


def test_refused_commit_keeps_a_killed_writers_temp_files_until_it_succeeds(tmp_path):
    writer, records = write_shards(str(tmp_path / "v"))
    open(os.path.join(writer.staging_path, ".part-00003.parquet.dead.tmp"), "wb").write(b"PAR1")
    with pytest.raises(GalleryError, match="not staged"):
        writer.commit(records=[dict(records[0], file="part-00003.parquet")])
    assert ".part-00003.parquet.dead.tmp" in os.listdir(writer.staging_path)
    assert sorted(os.listdir(writer.commit(records=records).path)) == ["manifest.json"] + [
        f"part-0000{i}.parquet" for i in range(3)
    ]


def test_commit_mixes_records_with_shards_of_a_resumed_run(tmp_path, committed):
    ids, labels, embeddings = make_gallery()
    out = str(tmp_path / "resumed")
    GalleryWriter(out, dim=4, **LINEAGE).write_shard(1, ids[4:8], labels[4:8], embeddings[4:8])  # the killed run
    writer = GalleryWriter(out, dim=4, **LINEAGE)
    assert writer.has_shard(1, expected_rows=4)
    records = [writer.write_shard(0, ids[:4], labels[:4], embeddings[:4]),
               writer.write_shard(2, ids[8:], labels[8:], embeddings[8:])]
    version = writer.commit(num_shards=3, records=records)
    assert without_created(version.manifest) == without_created(committed.manifest)
    version.validate()


def test_a_manifest_record_missing_a_key_is_refused_naming_the_keys(committed):
    manifest = json.load(open(os.path.join(committed.path, "manifest.json")))
    del manifest["shards"][1]["bytes"]
    rewrite_manifest(committed.path, shards=manifest["shards"])
    with pytest.raises(GalleryError, match=r"malformed shard entry .*part-00001.*keys file, rows, blake3"):
        open_gallery(committed.path)


# ---- refusing to overwrite ------------------------------------------------------------------------


def test_writer_refuses_a_committed_version_and_leaves_it_intact(tmp_path, committed):
    before = shard_bytes(committed)
    ids, labels, embeddings = make_gallery(seed=1)
    with pytest.raises(GalleryError, match="already holds a committed gallery version"):
        GalleryWriter(committed.path, dim=4, **LINEAGE)
    with pytest.raises(GalleryError, match="already holds a committed gallery version"):
        write_gallery(committed.path, ids, labels, embeddings, rows_per_shard=4, **LINEAGE)
    assert shard_bytes(open_gallery(committed.path)) == before
    assert not os.path.exists(committed.path + ".staging")


def test_writer_refuses_an_existing_folder_that_is_not_a_version(tmp_path):
    (tmp_path / "v3").mkdir()
    (tmp_path / "v3" / "notes.txt").write_text("keep me")
    with pytest.raises(GalleryError, match="exists but is not a committed gallery version"):
        GalleryWriter(str(tmp_path / "v3"), dim=4, **LINEAGE)
    assert os.listdir(tmp_path / "v3") == ["notes.txt"]


def test_commit_refuses_when_out_was_committed_meanwhile(tmp_path):
    ids, labels, embeddings = make_gallery()
    out = str(tmp_path / "v2")
    late = GalleryWriter(out, dim=4, **LINEAGE)
    late.write_shard(0, ids[:4], labels[:4], embeddings[:4])
    winner = write_gallery(out + "_other", ids, labels, embeddings, rows_per_shard=4, **LINEAGE)
    os.rename(winner.path, out)
    with pytest.raises(GalleryError, match="already holds a committed"):
        late.commit()
    np.testing.assert_array_equal(open_gallery(out).read_all().ids, ids)


# ---- bad input at write / commit time ------------------------------------------------------------


@pytest.mark.parametrize(
    "ids, labels, embeddings, message",
    [
        ([1, 2], None, np.eye(2, 3, dtype=np.float32), r"part-00000.parquet: embeddings must be \(n, 4\)"),
        ([1, 2], None, np.array([[1, 0, 0, 0], [np.nan, 0, 0, 0]], np.float32), "NaN or Inf \\(first at row 1\\)"),
        ([1, 2], None, np.array([[1, 0, 0, 0], [np.inf, 0, 0, 0]], np.float32), "NaN or Inf"),
        ([1, 1], None, np.eye(2, 4, dtype=np.float32), r"duplicate ids \[1\]"),
        ([1, 2], [0], np.eye(2, 4, dtype=np.float32), r"labels must have shape \(2,\)"),
        ([1, 2], [0, -2], np.eye(2, 4, dtype=np.float32), "labels must be >= 0"),
        ([1.0, 2.0], None, np.eye(2, 4, dtype=np.float32), "ids must be integers"),
        ([], None, np.zeros((0, 4), np.float32), "no rows"),
        ([1, 2], None, 2 * np.eye(2, 4, dtype=np.float32), "declared normalised but norms range 2..2"),
        ([1, 2], None, np.eye(2, 4, dtype=np.int64), "must be floating point"),
    ],
)
def test_write_shard_rejects_bad_rows(tmp_path, ids, labels, embeddings, message):
    writer = GalleryWriter(str(tmp_path / "v"), dim=4, **LINEAGE)
    with pytest.raises(GalleryError, match=message):
        writer.write_shard(0, np.array(ids), None if labels is None else np.array(labels), embeddings)
    assert not writer.has_shard(0)


def test_unnormalised_gallery_accepts_any_finite_norm(tmp_path):
    version = write_gallery(
        str(tmp_path / "raw"), [5, 6], [0, 1], np.array([[3, 4], [0, 0]], np.float32),
        rows_per_shard=1, lineage=["phi_1"], space="phi_1", normalised=False,
    )
    assert not version.normalised
    np.testing.assert_array_equal(version.read_all().embeddings, [[3, 4], [0, 0]])


@pytest.mark.parametrize("bad", [dict(dim=0), dict(lineage=[]), dict(space=""), dict(extra={"x": object()})])
def test_writer_rejects_bad_settings(tmp_path, bad):
    settings = dict(dim=4, **LINEAGE) | bad
    with pytest.raises(GalleryError):
        GalleryWriter(str(tmp_path / "v"), **settings)


def test_empty_gallery_is_refused(tmp_path):
    writer = GalleryWriter(str(tmp_path / "v"), dim=4, **LINEAGE)
    with pytest.raises(GalleryError, match="empty gallery"):
        writer.commit()
    with pytest.raises(GalleryError, match="empty gallery"):
        write_gallery(str(tmp_path / "w"), [], None, np.zeros((0, 4), np.float32), rows_per_shard=2, **LINEAGE)
    assert not os.path.exists(tmp_path / "v") and not os.path.exists(tmp_path / "w")


def test_duplicate_ids_across_shards_are_refused_at_commit(tmp_path):
    ids, labels, embeddings = make_gallery(n=4)
    writer = GalleryWriter(str(tmp_path / "v"), dim=4, **LINEAGE)
    writer.write_shard(0, [1, 2], None, embeddings[:2])
    writer.write_shard(1, [3, 2], None, embeddings[2:])
    with pytest.raises(GalleryError, match="duplicate id 2 in shards part-00000.parquet and part-00001.parquet"):
        writer.commit()
    assert not os.path.exists(tmp_path / "v")


def test_commit_reads_ids_again_only_for_shards_whose_ranges_overlap(tmp_path, monkeypatch):
    # shards 0 and 2 interleave (ids 0, 4 and 2, 6); shard 1 (10, 11) and shard 3 (20, 21) overlap nothing
    _, _, embeddings = make_gallery(n=8)
    writer = GalleryWriter(str(tmp_path / "v"), dim=4, **LINEAGE)
    for index, ids in enumerate(([0, 4], [10, 11], [2, 6], [20, 21])):
        writer.write_shard(index, ids, None, embeddings[2 * index:2 * index + 2])
    read_again = []
    original = GalleryWriter._staged_ids
    monkeypatch.setattr(GalleryWriter, "_staged_ids", lambda self, name: read_again.append(name) or original(self, name))
    version = writer.commit()
    assert sorted(read_again) == ["part-00000.parquet", "part-00002.parquet"]
    assert version.num_rows == 8


def test_missing_or_extra_shard_indices_are_refused_at_commit(tmp_path):
    ids, labels, embeddings = make_gallery(n=4)
    writer = GalleryWriter(str(tmp_path / "v"), dim=4, **LINEAGE)
    writer.write_shard(0, ids[:2], labels[:2], embeddings[:2])
    writer.write_shard(2, ids[2:], labels[2:], embeddings[2:])
    with pytest.raises(GalleryError, match=r"missing shards \['part-00001.parquet'\]"):
        writer.commit()
    writer.write_shard(1, [7], None, embeddings[:1])
    with pytest.raises(GalleryError, match=r"unexpected shards \['part-00002.parquet'\]"):
        writer.commit(num_shards=2)
    assert writer.commit(num_shards=3).num_rows == 5


def test_mixed_dims_across_shards_are_refused_at_commit(tmp_path):
    out = str(tmp_path / "v")
    GalleryWriter(out, dim=3, **LINEAGE).write_shard(0, [1], None, [[1.0, 0.0, 0.0]])
    forget_staging_settings(out)
    writer = GalleryWriter(out, dim=4, **LINEAGE)
    writer.write_shard(1, [2], None, [[1.0, 0.0, 0.0, 0.0]])
    expected = r"shard part-00000.parquet: column 'embedding' has type fixed_size_binary\[12\].*\(gallery dim 4"
    with pytest.raises(GalleryError, match=expected):
        writer.commit()


def test_corrupt_staged_shard_is_refused_at_commit(tmp_path):
    writer = GalleryWriter(str(tmp_path / "v"), dim=4, **LINEAGE)
    open(os.path.join(writer.staging_path, "part-00000.parquet"), "wb").write(b"not parquet at all")
    with pytest.raises(GalleryError, match="shard part-00000.parquet: unreadable Parquet"):
        writer.commit()


# ---- bad committed versions at read time ---------------------------------------------------------


def test_missing_manifest_is_not_a_committed_version(tmp_path):
    with pytest.raises(GalleryError, match="not a committed gallery version"):
        open_gallery(str(tmp_path / "nothing"))
    assert not is_committed(str(tmp_path / "nothing"))


def test_checksum_mismatch_names_the_shard(committed):
    shard = committed.shard_paths[1]
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    version = open_gallery(committed.path)
    with pytest.raises(GalleryError, match="shard part-00001.parquet: blake3 checksum does not match"):
        version.read_shard(1)
    with pytest.raises(GalleryError, match="part-00001.parquet"):
        version.validate()
    assert version.read_shard(0).ids.tolist() == [100, 101, 102, 103]  # the other shards stay readable


def test_a_flipped_embedding_byte_is_caught_without_the_checksum_too(committed):
    """``verify=False`` skips the file's checksum; the pages' own CRCs still catch a flipped value."""
    shard = committed.shard_paths[1]
    chunk = pq.ParquetFile(shard).metadata.row_group(0).column(4)  # the embedding column
    data = bytearray(open(shard, "rb").read())
    data[chunk.data_page_offset + chunk.total_compressed_size - 3] ^= 0x01  # inside the last page's values
    open(shard, "wb").write(bytes(data))
    with pytest.raises(GalleryError, match="shard part-00001.parquet: unreadable Parquet .*(?i:crc|checksum)"):
        open_gallery(committed.path).read_shard(1, verify=False)


def test_corrupt_parquet_without_checksums_names_the_shard(committed):
    open(committed.shard_paths[2], "wb").write(b"PAR1 garbage PAR1")
    with pytest.raises(GalleryError, match="shard part-00002.parquet: unreadable Parquet"):
        open_gallery(committed.path).read_shard(2, verify=False)


def test_missing_shard_is_named(committed):
    os.remove(committed.shard_paths[0])
    with pytest.raises(GalleryError, match="shard part-00000.parquet listed in .* is missing"):
        open_gallery(committed.path).read_all()


def stored_table(ids, labels, embeddings):
    """A shard's table as a writer would store it (binary embeddings, every row in phi_2), bypassing its checks."""
    embeddings = np.ascontiguousarray(embeddings, np.float32)
    n = len(ids)
    origin = lambda value: pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value]))
    return pa.Table.from_arrays(
        [pa.array(ids), pa.array(labels), origin("phi_2"), origin("phi_1>psi_1_2"),
         pa.FixedSizeBinaryArray.from_buffers(pa.binary(embeddings.shape[1] * 4), n, [None, pa.py_buffer(embeddings)])],
        schema=gallery_schema(embeddings.shape[1]))


def _replace_shard(version, index, table):
    """Overwrite a committed shard with ``table`` and make the manifest's checksum agree."""
    pq.write_table(table, version.shard_paths[index])
    manifest = json.load(open(os.path.join(version.path, "manifest.json")))
    manifest["shards"][index]["blake3"] = blake3(open(version.shard_paths[index], "rb").read()).hexdigest()
    rewrite_manifest(version.path, shards=manifest["shards"])


def test_nan_embeddings_in_a_stored_shard_are_named(committed):
    embeddings = np.ones((2, 4), np.float32)
    embeddings[1, 2] = np.nan
    _replace_shard(committed, 2, stored_table([108, 109], [0, 1], embeddings))
    with pytest.raises(GalleryError, match="shard part-00002.parquet: embeddings contain NaN or Inf"):
        open_gallery(committed.path).read_shard(2)


def test_wrong_dim_in_a_stored_shard_is_named(committed):
    _replace_shard(committed, 2, stored_table([108, 109], [0, 1], np.ones((2, 3), np.float32)))
    with pytest.raises(GalleryError, match=r"shard part-00002.parquet: column 'embedding' .*\[12\], expected .*\[16\]"):
        open_gallery(committed.path).read_shard(2)


def test_duplicate_ids_across_stored_shards_fail_validation(committed):
    _replace_shard(committed, 2, stored_table([108, 100], [0, 1], np.eye(2, 4, dtype=np.float32)))
    manifest = json.load(open(os.path.join(committed.path, "manifest.json")))
    manifest["shards"][2].update(min_id=100, max_id=108)
    rewrite_manifest(committed.path, shards=manifest["shards"])
    with pytest.raises(GalleryError, match="duplicate id 100 in shards part-00000.parquet and part-00002.parquet"):
        open_gallery(committed.path).validate()


@pytest.mark.parametrize("name", ["../v1/part-00000.parquet", "/etc/passwd", "..", "sub/part-00000.parquet"])
def test_manifest_paths_must_stay_inside_the_version(committed, name):
    manifest = json.load(open(os.path.join(committed.path, "manifest.json")))
    manifest["shards"][0]["file"] = name
    rewrite_manifest(committed.path, shards=manifest["shards"])
    with pytest.raises(GalleryError, match="not a plain file name inside the version folder"):
        open_gallery(committed.path)


@pytest.mark.parametrize(
    "changes, message",
    [(dict(format_version=3), "unsupported format_version 3"), (dict(encoding="npy"), "unknown encoding 'npy'"),
     (dict(spaces={"phi_2": 9}), "spaces must map names to rows, summing to num_rows"), (dict(num_rows=11), "num_rows 11"),
     (dict(shards=[]), "empty gallery"), (dict(dim=-1), "dim must be a positive integer")],
)
def test_malformed_manifest_is_refused(committed, changes, message):
    rewrite_manifest(committed.path, **changes)
    with pytest.raises(GalleryError, match=message):
        open_gallery(committed.path)


# ---- embeddings_from_column ----------------------------------------------------------------------

VECTORS = np.array([[1, 2, 3], [4, 5, 6]], np.float32)


@pytest.mark.parametrize(
    "column",
    [
        pa.FixedShapeTensorArray.from_numpy_ndarray(VECTORS),
        pa.chunked_array([pa.FixedShapeTensorArray.from_numpy_ndarray(VECTORS[:1]),
                          pa.FixedShapeTensorArray.from_numpy_ndarray(VECTORS[1:])]),
        pa.array(VECTORS.tolist(), pa.list_(pa.float32(), 3)),
        pa.array(VECTORS.tolist(), pa.list_(pa.float32())),
        pa.array(VECTORS.tolist(), pa.large_list(pa.float64())),
        pa.array([[0, 0, 0]] + VECTORS.tolist(), pa.list_(pa.float32())).slice(1),
        VECTORS.astype(np.float64),
        np.array([VECTORS[0], VECTORS[1]] + [None], dtype=object)[:2],
    ],
    ids=["tensor", "chunked", "fixed_size_list", "list", "large_list_f64", "sliced_list", "numpy", "numpy_object"],
)
def test_embeddings_from_column_accepts_vector_columns(column):
    matrix = embeddings_from_column(column)
    assert matrix.dtype == np.float32 and matrix.flags.c_contiguous
    np.testing.assert_array_equal(matrix, VECTORS)


def test_embeddings_from_column_accepts_rays_tensor_type():
    extensions = pytest.importorskip("ray.data.extensions")
    np.testing.assert_array_equal(embeddings_from_column(extensions.ArrowTensorArray.from_numpy(VECTORS)), VECTORS)


@pytest.mark.parametrize(
    "column, message",
    [
        (pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float32())), "mixed dims"),
        (pa.array([[1.0, 2.0], None], pa.list_(pa.float32())), "1 null rows"),
        (pa.array([[1, 2], [3, 4]], pa.list_(pa.int32())), "must be floating point"),
        (pa.FixedShapeTensorArray.from_numpy_ndarray(np.ones((2, 2, 2), np.float32)), r"shape \[2, 2\]"),
        (pa.array([1.0, 2.0]), "not a vector type"),
        (np.array([np.ones(2), np.ones(3)], dtype=object), "mixed or non-vector shapes"),
    ],
)
def test_embeddings_from_column_rejects_non_embeddings(column, message):
    with pytest.raises(GalleryError, match=message):
        embeddings_from_column(column)
