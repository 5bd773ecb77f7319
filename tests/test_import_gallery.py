"""`bict-ray import-gallery`: external embeddings (Parquet, .npz, .npy) as a committed gallery version.

Each import test runs twice: through Ray Data tasks (`[ray_data]`, the session-wide Ray of conftest.py) and with the
same shard function called in this process (`[in_process]`, no Ray), which is also what lets a test interrupt an
import between two shards. The planning and checking helpers are tested on their own, without Ray.
"""

import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bict_ray.distributed.import_gallery as ig
from bict_ray.cli import main
from bict_ray.errors import GalleryError, InputError
from bict_ray.retrieval.shard import NORM_TOLERANCE
from bict_ray.storage import tables
from bict_ray.storage.gallery import UNLABELLED, first_duplicate, open_gallery

DIM = 6


def unit(n, dim=DIM, seed=0):
    rows = np.random.default_rng(seed).normal(size=(n, dim))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def list_column(rows, value=pa.float64()):
    return pa.array([list(r) for r in rows], type=pa.list_(value))


def fixed_column(rows, dim=None):
    rows = np.asarray(rows, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), dim or rows.shape[1])


def write_parquet(path, row_group_size=4, **columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def in_process_stage_shards(plan, out, writer_settings, normalise, cfg):
    """``stage_shards`` without Ray: the tasks' function, one shard at a time, in this process."""
    for index in range(plan.num_shards):
        yield from ig.write_import_shards([index], plan=plan, out=out, writer_settings=writer_settings,
                                          normalise=normalise)


@pytest.fixture(params=["in_process", "ray_data"])
def run_import(request, monkeypatch):
    """``import_gallery`` through Ray Data tasks or in this process; small shards so that imports span several."""
    if request.param == "ray_data":
        request.getfixturevalue("ray_session")
    else:
        monkeypatch.setattr(ig, "stage_shards", in_process_stage_shards)
        monkeypatch.setattr("bict_ray.distributed.cluster.ensure_ray", lambda cfg: None)  # for the CLI

    def run(source, out, **kwargs):
        kwargs.setdefault("space", "prod_v3")
        kwargs.setdefault("rows_per_shard", 5)
        return ig.import_gallery(str(source), str(out), **kwargs)

    run.mode = request.param
    return run


def assert_nothing_committed(out):
    assert not os.path.exists(out), "a failed import must leave no version at --out"
    with pytest.raises(GalleryError, match="not a committed gallery version"):
        open_gallery(str(out))


# --- imports that succeed ---------------------------------------------------------------------------------------


def test_parquet_with_other_column_names_and_float64_lists(run_import, tmp_path):
    rows = unit(23)
    source = write_parquet(tmp_path / "prod.parquet", item_id=np.arange(1000, 1023), vec=list_column(rows),
                           other=np.zeros(23))
    version, stats = run_import(source, tmp_path / "g", id_column="item_id", embedding_column="vec")
    gallery = open_gallery(str(tmp_path / "g")).read_all()
    np.testing.assert_array_equal(gallery.ids, np.arange(1000, 1023))
    np.testing.assert_array_equal(gallery.labels, np.full(23, UNLABELLED))  # no --label-column: unlabelled
    assert gallery.embeddings.dtype == np.float32
    np.testing.assert_allclose(gallery.embeddings, rows, atol=1e-6)
    assert (version.space, version.lineage, version.dim, version.normalised) == ("prod_v3", ["prod_v3"], DIM, True)
    assert version.shard_rows == [5, 5, 5, 5, 3]
    assert (stats.rows, stats.shards, stats.skipped_shards, stats.files) == (23, 5, 0, 1)
    assert version.manifest["extra"]["imported_from"] == str(source)


def test_folder_and_glob_of_fixed_size_list_files_with_labels(run_import, tmp_path):
    rows = unit(17, seed=1)
    folder = tmp_path / "export"
    write_parquet(folder / "part-0.parquet", id=np.arange(9), label=np.arange(9) % 3, embedding=fixed_column(rows[:9]))
    write_parquet(folder / "part-1.parquet", id=np.arange(9, 17), label=pa.array([1, None, 2, 0, 1, 1, 0, 2]),
                  embedding=fixed_column(rows[9:]))
    (folder / "_SUCCESS").write_text("")  # what Spark leaves beside its files: not an input
    for source, out in ((folder, tmp_path / "g1"), (folder / "part-*.parquet", tmp_path / "g2")):
        version, stats = run_import(source, out, label_column="label")
        gallery = version.read_all()
        np.testing.assert_array_equal(gallery.ids, np.arange(17))
        np.testing.assert_array_equal(gallery.labels, [0, 1, 2, 0, 1, 2, 0, 1, 2, 1, UNLABELLED, 2, 0, 1, 1, 0, 2])
        np.testing.assert_allclose(gallery.embeddings, rows, atol=1e-6)
        assert version.lineage == ["prod_v3"] and stats.files == 2
        assert version.shard_rows == [5, 5, 5, 2]  # shard 1 spans both files


def test_fixed_shape_tensor_column(run_import, tmp_path):
    rows = unit(8, seed=2).astype(np.float32)
    source = write_parquet(tmp_path / "t.parquet", id=np.arange(8, dtype=np.int32),
                           embedding=pa.FixedShapeTensorArray.from_numpy_ndarray(rows))
    version, _ = run_import(source, tmp_path / "g")
    np.testing.assert_array_equal(version.read_all().embeddings, rows)


def test_npz_and_npy(run_import, tmp_path):
    rows = unit(12, seed=3)
    np.savez_compressed(tmp_path / "a.npz", key=np.arange(12) * 7, vectors=rows, cls=np.arange(12) % 4)
    version, _ = run_import(tmp_path / "a.npz", tmp_path / "g1", id_column="key", embedding_column="vectors",
                            label_column="cls")
    gallery = version.read_all()
    np.testing.assert_array_equal(gallery.ids, np.arange(12) * 7)
    np.testing.assert_array_equal(gallery.labels, np.arange(12) % 4)
    np.testing.assert_allclose(gallery.embeddings, rows, atol=1e-6)
    np.save(tmp_path / "a.npy", rows.astype(np.float32))
    version, _ = run_import(tmp_path / "a.npy", tmp_path / "g2")
    gallery = version.read_all()
    np.testing.assert_array_equal(gallery.ids, np.arange(12))  # an .npy's ids are its row numbers
    np.testing.assert_array_equal(gallery.labels, np.full(12, UNLABELLED))
    assert version.space == "prod_v3" and version.lineage == ["prod_v3"]


def test_normalise_scales_rows_and_is_required_for_unnormalised_input(run_import, tmp_path):
    rows = unit(10, seed=4) * np.linspace(0.5, 3, 10)[:, None]
    source = write_parquet(tmp_path / "raw.parquet", id=np.arange(10), embedding=list_column(rows))
    with pytest.raises(InputError, match=r"raw\.parquet, row 0, column 'embedding': embedding has L2 norm 0\.5, "
                                         r"not 1 .*--normalise"):
        run_import(source, tmp_path / "g1")
    assert_nothing_committed(tmp_path / "g1")
    version, _ = run_import(source, tmp_path / "g2", normalise=True)
    embeddings = version.read_all().embeddings
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(embeddings, rows / np.linalg.norm(rows, axis=1, keepdims=True), atol=1e-6)
    assert version.manifest["extra"]["normalise"] is True


# --- bad input: a clear error naming file and row, nothing committed ---------------------------------------------


def _two_files(tmp_path, second_dim=DIM, ids=(range(6), range(6, 12)), fixed=False):
    column = fixed_column if fixed else list_column
    write_parquet(tmp_path / "in" / "a.parquet", id=np.array(ids[0]), embedding=column(unit(6, seed=5)))
    write_parquet(tmp_path / "in" / "b.parquet", id=np.array(ids[1]), embedding=column(unit(6, second_dim, seed=6)))
    return tmp_path / "in"


def _one_file(tmp_path, rows, **columns):
    columns.setdefault("id", np.arange(len(rows)))
    return write_parquet(tmp_path / "in.parquet", embedding=list_column(rows), **columns)


def _with(rows, row, value):
    rows = rows.copy()
    rows[row] = value
    return rows


BAD_INPUTS = {
    # name: (write the input, import kwargs, what the message must say)
    "wrong dim in one file": (lambda p: _two_files(p, second_dim=5), {},
                              r"b\.parquet, row 0, column 'embedding': embedding has 5 values, expected 6 "
                              r"\(the dim of .*a\.parquet, row 0\)"),
    "fixed dims differ between files": (lambda p: _two_files(p, second_dim=5, fixed=True), {},
                                        r"b\.parquet: column 'embedding' holds 5-dim vectors .* but .*a\.parquet"),
    "mixed dims in one file": (lambda p: write_parquet(
        p / "in.parquet", id=np.arange(6), embedding=pa.array([list(r) for r in unit(3)] + [[1.0, 0.0]] +
                                                              [list(r) for r in unit(2)])), {},
        r"in\.parquet, row 3, column 'embedding': embedding has 2 values, expected 6"),
    "NaN in row 7": (lambda p: _one_file(p, _with(unit(12), 7, np.nan)), {},
                     r"in\.parquet, row 7, column 'embedding': embedding holds NaN or Inf"),
    "Inf in row 2": (lambda p: _one_file(p, _with(unit(12), 2, np.inf)), {"normalise": True},
                     r"in\.parquet, row 2, column 'embedding': embedding holds NaN or Inf"),
    "zero vector": (lambda p: _one_file(p, _with(unit(12), 9, 0.0)), {},
                    r"in\.parquet, row 9, column 'embedding': zero vector"),
    "zero vector with --normalise": (lambda p: _one_file(p, _with(unit(12), 9, 0.0)), {"normalise": True},
                                     r"in\.parquet, row 9, column 'embedding': zero vector"),
    "unnormalised row": (lambda p: _one_file(p, _with(unit(12), 11, unit(1)[0] * 1.01)), {},
                         r"in\.parquet, row 11, column 'embedding': embedding has L2 norm 1\.01, not 1"),
    "duplicate id across two files": (lambda p: _two_files(p, ids=([0, 1, 2, 3, 4, 5], [6, 7, 3, 9, 10, 11])), {},
                                      r"duplicate id 3 \(column 'id'\): .*a\.parquet, row 3 and .*b\.parquet, row 2"),
    "duplicate id within one shard": (lambda p: _one_file(p, unit(12), id=np.array([0, 1, 8, 3, 8] + list(range(10, 17)))),
                                      {}, r"duplicate id 8 \(column 'id'\): .*in\.parquet, row 2 and .*in\.parquet, row 4"),
    "missing column": (lambda p: _one_file(p, unit(4), other=np.zeros(4)), {"embedding_column": "vec"},
                       r"in\.parquet: no column 'vec' \(--embedding-column\); columns are: embedding, other, id"),
    "missing column in the second file": (lambda p: (_two_files(p), write_parquet(
        p / "in" / "b.parquet", key=np.arange(6), embedding=list_column(unit(6))))[0], {},
        r"b\.parquet: no column 'id' \(--id-column\); columns are: key, embedding"),
    "null id": (lambda p: _one_file(p, unit(6), id=pa.array([0, 1, 2, None, 4, 5])), {},
                r"in\.parquet, row 3, column 'id': null id"),
    "null embedding": (lambda p: write_parquet(p / "in.parquet", id=np.arange(3), embedding=pa.array(
        [list(unit(1)[0]), None, list(unit(1)[0])], type=pa.list_(pa.float32()))), {},
        r"in\.parquet, row 1, column 'embedding': null embedding"),
    "label below -1": (lambda p: _one_file(p, unit(6), label=np.array([0, 1, 2, 3, -2, 1])),
                       {"label_column": "label"}, r"in\.parquet, row 4, column 'label': label -2"),
    "string ids": (lambda p: _one_file(p, unit(3), id=pa.array(["a", "b", "c"])), {},
                   r"in\.parquet, column 'id': type string, ids must be integers"),
    "npz without the id array": (lambda p: (np.savez(p / "in.npz", embedding=unit(4), ids=np.arange(4)),
                                            p / "in.npz")[1], {},
                                 r"in\.npz: no array 'id' \(--id-column\); arrays are: embedding, ids"),
    "npz with NaN in row 7": (lambda p: (np.savez_compressed(p / "in.npz", id=np.arange(12),
                                                             embedding=_with(unit(12), 7, np.nan)),
                                         p / "in.npz")[1], {},
                              r"in\.npz, row 7, column 'embedding': embedding holds NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_named_and_commits_nothing(run_import, tmp_path, case):
    write, kwargs, message = BAD_INPUTS[case]
    source = write(tmp_path)
    with pytest.raises(InputError, match=message):
        run_import(source, tmp_path / "g", **kwargs)
    assert_nothing_committed(tmp_path / "g")


def test_an_existing_version_is_never_overwritten(run_import, tmp_path):
    source = _one_file(tmp_path, unit(7))
    first, _ = run_import(source, tmp_path / "g")
    manifest = (tmp_path / "g" / "manifest.json").read_bytes()
    other = _one_file(tmp_path / "other", unit(7, seed=9))
    with pytest.raises(GalleryError, match="already holds a committed gallery version"):
        run_import(other, tmp_path / "g")
    assert (tmp_path / "g" / "manifest.json").read_bytes() == manifest
    np.testing.assert_allclose(open_gallery(str(tmp_path / "g")).read_all().embeddings, unit(7), atol=1e-6)


def test_an_out_inside_the_input_folder_is_refused(run_import, tmp_path):
    write_parquet(tmp_path / "in" / "a.parquet", id=np.arange(3), embedding=list_column(unit(3)))
    with pytest.raises(InputError, match="lies inside the input folder"):
        run_import(tmp_path / "in", tmp_path / "in" / "gallery")
    assert not (tmp_path / "in" / "gallery.staging").exists()


# --- resuming -----------------------------------------------------------------------------------------------------


def test_an_interrupted_import_resumes_without_rewriting_staged_shards(run_import, tmp_path, monkeypatch):
    rows = unit(23, seed=7)
    folder = tmp_path / "in"
    write_parquet(folder / "a.parquet", id=np.arange(11), embedding=list_column(rows[:11]))
    write_parquet(folder / "b.parquet", id=np.arange(11, 23), embedding=list_column(rows[11:]))

    def killed_after_two(plan, out, writer_settings, normalise, cfg):
        for index in range(2):
            yield from ig.write_import_shards([index], plan=plan, out=out, writer_settings=writer_settings,
                                              normalise=normalise)
        raise KeyboardInterrupt  # the driver dies with shards 0 and 1 staged

    with monkeypatch.context() as patch:
        patch.setattr(ig, "stage_shards", killed_after_two)
        with pytest.raises(KeyboardInterrupt):
            run_import(folder, tmp_path / "g")
    assert_nothing_committed(tmp_path / "g")
    staging = tmp_path / "g.staging"
    staged = {name: os.stat(staging / name) for name in ("part-00000.parquet", "part-00001.parquet")}
    assert sorted(p.name for p in staging.glob("part-*")) == sorted(staged)

    version, stats = run_import(folder, tmp_path / "g")
    assert (stats.shards, stats.skipped_shards) == (5, 2)
    for name, before in staged.items():
        after = os.stat(tmp_path / "g" / name)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), f"{name} was rewritten"
    # the same bytes as an uninterrupted import
    straight, _ = run_import(folder, tmp_path / "straight")
    assert [s["blake3"] for s in version.manifest["shards"]] == [s["blake3"] for s in straight.manifest["shards"]]
    np.testing.assert_array_equal(version.read_all().ids, np.arange(23))


def test_a_resume_with_other_settings_is_refused(run_import, tmp_path, monkeypatch):
    source = _one_file(tmp_path, unit(12))

    def killed_after_one(plan, out, writer_settings, normalise, cfg):
        yield from ig.write_import_shards([0], plan=plan, out=out, writer_settings=writer_settings,
                                          normalise=normalise)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ig, "stage_shards", killed_after_one)
        with pytest.raises(KeyboardInterrupt):
            run_import(source, tmp_path / "g")
    with pytest.raises(GalleryError, match="staged by another run .*rows_per_shard"):
        run_import(source, tmp_path / "g", rows_per_shard=4)
    _one_file(tmp_path, unit(12, seed=8))  # the input changed since
    with pytest.raises(GalleryError, match="staged by another run .*import_fingerprint"):
        run_import(source, tmp_path / "g")
    assert_nothing_committed(tmp_path / "g")


# --- the command line ---------------------------------------------------------------------------------------------


def test_cli_imports_and_reports(run_import, tmp_path, capsys):
    source = write_parquet(tmp_path / "e.parquet", item_id=np.arange(9), vec=list_column(unit(9) * 2))
    def args(out, *more):
        return ["import-gallery", "--from", str(source), "--out", str(out), "--space", "ext", "--id-column",
                "item_id", "--embedding-column", "vec", "--rows-per-shard", "4", *more]

    assert main(args(tmp_path / "g")) == 2
    err = capsys.readouterr().err
    assert "e.parquet, row 0, column 'vec': embedding has L2 norm 2" in err and "Traceback" not in err
    assert_nothing_committed(tmp_path / "g")
    assert main(args(tmp_path / "g2", "--normalise")) == 0
    captured = capsys.readouterr()
    assert "part-00002.parquet: 1 rows staged (3/3)" in captured.err
    assert f"-> {tmp_path / 'g2'}: 9 rows in 3 shards (0 resumed)" in captured.out
    assert "space ext" in captured.out
    version = open_gallery(str(tmp_path / "g2"))
    assert version.lineage == ["ext"] and version.num_rows == 9


# --- the pure helpers (no Ray) ------------------------------------------------------------------------------------


def test_the_plan_cuts_the_files_rows_into_shards(tmp_path):
    for name, n in (("a", 7), ("b", 0), ("c", 6)):
        write_parquet(tmp_path / f"{name}.parquet", id=np.arange(n), embedding=fixed_column(unit(n), DIM))
    plan = ig.plan_import(str(tmp_path), rows_per_shard=5)
    assert [f.rows for f in plan.files] == [7, 0, 6] and plan.dim == DIM
    assert [f.row_groups for f in plan.files] == [(4, 3), (0,), (4, 2)]
    assert plan.num_shards == 3
    assert plan.pieces(0) == [(0, 0, 5)]
    assert plan.pieces(1) == [(0, 5, 7), (2, 0, 3)]
    assert plan.pieces(2) == [(2, 3, 6)]
    assert plan.locate(8) == (str(tmp_path / "c.parquet"), 1)


def test_a_task_reads_only_the_row_groups_of_its_shard(tmp_path, monkeypatch):
    rows = unit(40, seed=10)
    write_parquet(tmp_path / "a.parquet", row_group_size=8, id=np.arange(40), embedding=list_column(rows))
    plan = ig.plan_import(str(tmp_path / "a.parquet"), rows_per_shard=6)
    asked = []
    original = pq.ParquetFile.iter_batches

    def recording(self, *args, **kwargs):
        asked.append((kwargs["row_groups"], kwargs["batch_size"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)
    reader = ig.ShardReader(plan, normalise=False)
    ids, labels, embeddings = reader.read_shard(4)  # rows 24 .. 29: row group 3 on
    np.testing.assert_array_equal(ids, np.arange(24, 30))
    assert labels is None
    np.testing.assert_allclose(embeddings, rows[24:30], atol=1e-6)
    ids, _, _ = reader.read_shard(5)  # the next shard continues the same stream of batches
    np.testing.assert_array_equal(ids, np.arange(30, 36))
    reader.close()
    assert asked == [([3, 4], 6)]


def test_npy_rows_are_read_by_range(tmp_path):
    rows = np.arange(60, dtype=np.float64).reshape(20, 3)
    np.savez_compressed(tmp_path / "c.npz", e=rows)
    np.savez(tmp_path / "s.npz", e=rows)
    np.save(tmp_path / "a.npy", rows)
    fs = pa.fs.LocalFileSystem()
    for path, member in (("c.npz", "e"), ("s.npz", "e"), ("a.npy", None)):
        with ig.NpyArray(fs, str(tmp_path / path), path, member=member) as array:
            assert array.shape == (20, 3)
            np.testing.assert_array_equal(array.rows(5, 9), rows[5:9])
            np.testing.assert_array_equal(array.rows(17, 20), rows[17:20])
            np.testing.assert_array_equal(array.rows(0, 2), rows[0:2])
    np.save(tmp_path / "f.npy", np.asfortranarray(rows))
    with pytest.raises(InputError, match="f.npy: stored in Fortran order"):
        ig.NpyArray(fs, str(tmp_path / "f.npy"), "f.npy")


def test_check_embeddings_names_the_first_bad_row():
    rows = unit(5)
    ok = tables.check_embeddings(rows, "x.parquet", 100, "vec", dim=DIM, reference="r", normalise=False)
    assert ok.dtype == np.float32 and ok.shape == (5, DIM)
    off = rows.copy()
    off[3] *= 1 + 2 * NORM_TOLERANCE
    with pytest.raises(InputError, match=r"x\.parquet, row 103, column 'vec': embedding has L2 norm 1\.002"):
        tables.check_embeddings(off, "x.parquet", 100, "vec", dim=DIM, reference="r", normalise=False)
    within = rows.copy()
    within[3] *= 1 + NORM_TOLERANCE / 2
    tables.check_embeddings(within, "x.parquet", 100, "vec", dim=DIM, reference="r", normalise=False)
    with pytest.raises(InputError, match=r"expected \(n, 6\)"):
        tables.check_embeddings(rows[:, :4], "x.parquet", 0, "vec", dim=DIM, reference="r", normalise=True)


def test_first_duplicate_and_the_types_accepted():
    assert first_duplicate(np.array([5, 1, 9, 1, 5])) == (1, 3)
    assert first_duplicate(np.arange(4)) is None
    assert tables.vector_type(pa.list_(pa.float32())) == (None, None)
    assert tables.vector_type(pa.list_(pa.float64(), 8)) == (8, None)
    assert tables.vector_type(pa.fixed_shape_tensor(pa.float64(), [4])) == (4, None)
    assert "1-D vectors" in tables.vector_type(pa.fixed_shape_tensor(pa.float32(), [2, 2]))[1]
    assert "float32 or float64" in tables.vector_type(pa.list_(pa.int64()))[1]
    assert "not a vector type" in tables.vector_type(pa.string())[1]


def test_sources_that_are_not_inputs(tmp_path):
    with pytest.raises(InputError, match="missing.parquet does not exist"):
        ig.plan_import(str(tmp_path / "missing.parquet"), rows_per_shard=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .parquet files in this folder"):
        ig.plan_import(str(tmp_path / "empty"), rows_per_shard=4)
    with pytest.raises(InputError, match="no files match"):
        ig.plan_import(str(tmp_path / "empty" / "*.parquet"), rows_per_shard=4)
    write_parquet(tmp_path / "mixed" / "a.parquet", id=np.arange(2), embedding=list_column(unit(2)))
    np.save(tmp_path / "mixed" / "b.npy", unit(2))
    with pytest.raises(InputError, match=r"b\.npy: not a \.parquet file"):
        ig.plan_import(str(tmp_path / "mixed" / "*"), rows_per_shard=4)
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(InputError, match=r"bad\.parquet: not a readable Parquet file"):
        ig.plan_import(str(tmp_path / "bad.parquet"), rows_per_shard=4)
    write_parquet(tmp_path / "zero.parquet", id=np.arange(0), embedding=list_column(np.zeros((0, DIM))))
    with pytest.raises(InputError, match="no rows to import"):
        ig.plan_import(str(tmp_path / "zero.parquet"), rows_per_shard=4)


def test_the_fingerprint_follows_the_input(tmp_path):
    source = write_parquet(tmp_path / "a.parquet", id=np.arange(3), embedding=list_column(unit(3)))
    first = ig.plan_import(str(source), rows_per_shard=4).fingerprint
    assert ig.plan_import(str(source), rows_per_shard=2).fingerprint == first
    write_parquet(tmp_path / "a.parquet", id=np.arange(4), embedding=list_column(unit(4)))
    assert ig.plan_import(str(source), rows_per_shard=4).fingerprint != first
    assert json.loads(json.dumps(first)) == first and len(first) == len(hashlib.sha256().hexdigest())
