"""`bict-ray export`: a gallery version as a faiss index or a Lance dataset searches like the gallery itself.

The exported index must return the gallery's own ids with the top-k that `exact_search` gives, say what space it is
in, and never replace something already stored."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from bict_ray.cli import main
from bict_ray.errors import InputError
from bict_ray.retrieval.search import exact_search
from bict_ray.storage.export import export_faiss, export_lance
from bict_ray.storage.gallery import UNLABELLED, write_gallery

ROWS, DIM, K = 2_000, 32, 10
# two scores closer than this are treated as tied: faiss and exact_search use different BLAS kernels, whose float32
# scores of one pair may differ in the last bits
TIE = 1e-5


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    rng = np.random.default_rng(7)
    ids = 10_000 + 7 * np.arange(ROWS, dtype=np.int64)  # not positions: a lost id mapping shows
    labels = rng.integers(0, 20, ROWS)
    labels[::13] = UNLABELLED
    path = tmp_path_factory.mktemp("export") / "v2"
    return write_gallery(str(path), ids, labels, unit(rng.standard_normal((ROWS, DIM))), rows_per_shard=700,
                         lineage=["phi_1", "psi_1_2"], space="phi_2")


@pytest.fixture(scope="module")
def queries(gallery):
    rng = np.random.default_rng(11)
    rows = gallery.read_all().embeddings
    return np.concatenate([rows[rng.choice(ROWS, 25, replace=False)], unit(rng.standard_normal((25, DIM)))])


@pytest.fixture(scope="module")
def reference(gallery, queries):
    """`exact_search`'s top-K as (scores, gallery ids)."""
    everything = gallery.read_all()
    scores, positions = exact_search(queries, everything.embeddings, K, gallery_ids=everything.ids)
    return scores, everything.ids[positions]


def assert_same_topk(scores, ids, expected_scores, expected_ids, queries, gallery):
    """Same scores, and the same ids up to the order of (near-)tied scores; at the K-th place a tie may keep any of
    the tied items, so there an id only needs the K-th score."""
    everything = gallery.read_all()
    row_of = {int(item): row for row, item in enumerate(everything.ids)}
    assert ids.shape == expected_ids.shape == (len(queries), K)
    np.testing.assert_allclose(scores, expected_scores, atol=TIE)
    for query, got, want, want_scores in zip(queries, ids, expected_ids, expected_scores):
        groups = np.split(np.arange(K), np.flatnonzero(np.diff(want_scores) < -TIE) + 1)
        for group in groups[:-1]:
            assert set(got[group]) == set(want[group]), (got, want)
        assert all(int(item) in row_of for item in got), got  # gallery ids, not positions or -1
        last = groups[-1]
        true_scores = everything.embeddings[[row_of[int(item)] for item in got[last]]] @ query
        np.testing.assert_allclose(true_scores, want_scores[last], atol=TIE)
        assert len(set(got.tolist())) == K


def test_a_flat_faiss_export_returns_exact_searchs_topk_by_gallery_id(gallery, queries, reference, tmp_path):
    result = export_faiss(gallery, tmp_path / "gallery.faiss")
    index = faiss.read_index(str(tmp_path / "gallery.faiss"))
    assert index.ntotal == ROWS and index.d == DIM and index.metric_type == faiss.METRIC_INNER_PRODUCT
    scores, ids = index.search(queries, K)
    assert_same_topk(scores, ids, *reference, queries, gallery)
    # random float vectors: no ties at all, so the lists are identical as they stand
    np.testing.assert_array_equal(ids, reference[1])
    assert result["rows"] == ROWS and result["index"] == "flat" and result["seconds"] >= 0


def test_an_ivf_export_probing_every_list_returns_the_flat_topk(gallery, queries, reference, tmp_path):
    flat = faiss.read_index(export_faiss(gallery, tmp_path / "flat.faiss")["path"])
    result = export_faiss(gallery, tmp_path / "ivf.faiss", index="ivf", nlist=20, nprobe=20)
    ivf = faiss.read_index(result["path"])
    assert isinstance(ivf, faiss.IndexIVFFlat) and ivf.metric_type == faiss.METRIC_INNER_PRODUCT
    assert ivf.nlist == 20 and ivf.nprobe == 20 and ivf.ntotal == ROWS  # nprobe travels with the file
    flat_scores, flat_ids = flat.search(queries, K)
    ivf_scores, ivf_ids = ivf.search(queries, K)
    assert_same_topk(ivf_scores, ivf_ids, flat_scores, flat_ids, queries, gallery)
    assert_same_topk(ivf_scores, ivf_ids, *reference, queries, gallery)
    # the default nprobe visits a few lists only: approximate, but still gallery ids
    default = faiss.read_index(export_faiss(gallery, tmp_path / "default.faiss", index="ivf")["path"])
    assert default.nlist == 51 and default.nprobe == 8  # 4 sqrt(2000) = 179 > 2000 // 39 = 51 lists; ceil(sqrt(51))
    _, approximate = default.search(queries, K)
    assert np.isin(approximate, gallery.read_all().ids).all()
    assert np.mean([len(set(a) & set(b)) / K for a, b in zip(approximate, reference[1])]) > 0.5


def test_the_sidecar_says_what_space_and_shape_the_index_has(gallery, tmp_path):
    export_faiss(gallery, tmp_path / "ivf.faiss", index="ivf", nlist=16, nprobe=4)
    sidecar = json.loads((tmp_path / "ivf.faiss.json").read_text())
    assert sidecar["space"] == "phi_2" and sidecar["lineage"] == ["phi_1", "psi_1_2"]
    assert (sidecar["dim"], sidecar["rows"], sidecar["metric"]) == (DIM, ROWS, "inner_product")
    assert (sidecar["format"], sidecar["index"], sidecar["nlist"], sidecar["nprobe"]) == ("faiss", "ivf", 16, 4)
    assert sidecar["source"] == gallery.path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ivf.faiss", "ivf.faiss.json"]  # no temp file left


@pytest.mark.parametrize("existing", ["index", "sidecar"])
def test_an_existing_output_is_refused_and_left_as_it_was(gallery, tmp_path, existing):
    out = tmp_path / "gallery.faiss"
    taken = out if existing == "index" else tmp_path / "gallery.faiss.json"
    taken.write_bytes(b"a service's index, not ours")
    with pytest.raises(InputError, match=f"{taken}.*already exists"):
        export_faiss(gallery, out)
    with pytest.raises(InputError, match=f"{taken}.*already exists"):
        export_lance(gallery, out)
    assert taken.read_bytes() == b"a service's index, not ours"
    assert [p.name for p in tmp_path.iterdir()] == [taken.name]


def test_bad_ivf_settings_are_refused_naming_them(gallery, tmp_path):
    with pytest.raises(InputError, match="nlist 2001 is more than the gallery's 2000 rows"):
        export_faiss(gallery, tmp_path / "a.faiss", index="ivf", nlist=ROWS + 1)
    with pytest.raises(InputError, match=r"nprobe must be an integer in 1..nlist \(16\), got 17"):
        export_faiss(gallery, tmp_path / "a.faiss", index="ivf", nlist=16, nprobe=17)
    with pytest.raises(InputError, match="apply to index='ivf' only"):
        export_faiss(gallery, tmp_path / "a.faiss", nlist=16)
    with pytest.raises(InputError, match="index must be one of flat, ivf, got 'hnsw'"):
        export_faiss(gallery, tmp_path / "a.faiss", index="hnsw")
    assert list(tmp_path.iterdir()) == []


def test_a_lance_export_round_trips_ids_labels_and_embeddings(gallery, tmp_path):
    lance = pytest.importorskip("lance")
    result = export_lance(gallery, tmp_path / "gallery.lance")
    dataset = lance.dataset(result["path"])
    table = dataset.to_table()
    everything = gallery.read_all()
    np.testing.assert_array_equal(table.column("id").to_numpy(), everything.ids)
    labels = table.column("label")
    assert labels.null_count == int((everything.labels == UNLABELLED).sum()) > 0  # null where the gallery has null
    np.testing.assert_array_equal(labels.fill_null(UNLABELLED).to_numpy(), everything.labels)
    embeddings = table.column("embedding").combine_chunks()
    assert embeddings.type.list_size == DIM
    np.testing.assert_array_equal(embeddings.flatten().to_numpy().reshape(-1, DIM), everything.embeddings)
    described = json.loads(dataset.schema.metadata[b"bict_ray"])
    assert described == json.loads((tmp_path / "gallery.lance.json").read_text())
    assert (described["format"], described["space"], described["rows"]) == ("lance", "phi_2", ROWS)
    nearest = dataset.to_table(nearest={"column": "embedding", "q": everything.embeddings[3], "k": 1, "metric": "dot"})
    assert nearest.column("id").to_pylist() == [everything.ids[3]]


def test_the_cli_exports_and_names_a_missing_gallery(gallery, queries, reference, tmp_path, capsys):
    out = tmp_path / "served" / "gallery.faiss"
    assert main(["export", "--gallery", gallery.path, "--format", "faiss", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"exported {gallery.path}: {ROWS} rows x {DIM} dims as faiss flat to {out}")
    np.testing.assert_array_equal(faiss.read_index(str(out)).search(queries, K)[1], reference[1])
    assert main(["export", "--gallery", gallery.path, "--format", "faiss", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    missing = tmp_path / "no_such_gallery"
    assert main(["export", "--gallery", str(missing), "--format", "faiss", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bict-ray export: error: ") and str(missing) in err and "Traceback" not in err
    assert main(["export", "--gallery", gallery.path, "--format", "lance", "--out", str(tmp_path / "x"),
                 "--nlist", "4"]) == 2
    assert "--format faiss only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_cli_ivf_export_reports_its_lists(gallery, tmp_path, capsys):
    out = tmp_path / "ivf.faiss"
    assert main(["export", "--gallery", gallery.path, "--format", "faiss", "--out", str(out), "--index", "ivf",
                 "--nlist", "10", "--nprobe", "3"]) == 0
    assert "as faiss ivf (nlist 10, nprobe 3)" in capsys.readouterr().out
    assert faiss.read_index(str(out)).nprobe == 3
