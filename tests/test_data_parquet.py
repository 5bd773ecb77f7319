"""data.kind=parquet: image tables as Hugging Face datasets and Ray Data write them, decoded in memory."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bict_ray.config import ConfigError, DataConfig, load_config
from bict_ray.core.data import DataError, load_dataset

SIZE = 8
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def make_images(n, mode="RGB", seed=0):
    """(n, H, W[, 3]) uint8: smooth gradients with a per-image offset (JPEG keeps them close), noise for PNG."""
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(SIZE), np.arange(SIZE)) * 8
    base = (ramp[None] + rng.integers(0, 100, (n, 1, 1))).astype(np.uint8)
    if mode == "RGB":
        base = np.stack([base, base[:, ::-1], 255 - base], axis=-1)
    return base


def encode(pixels, fmt="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def image_table(pixels, labels, ids=None, fmt="PNG", form="binary", names=None, **extra):
    """A table as the loader reads it: the images as a binary column, or as Hugging Face's Image struct."""
    encoded = [encode(p, fmt) for p in pixels]
    if form == "binary":
        images = pa.array(encoded, pa.binary())
    else:
        images = pa.array([{"bytes": b, "path": f"{i}.{fmt.lower()}"} for i, b in enumerate(encoded)], HF_IMAGE)
    columns = {"image": images, "label": pa.array(labels, pa.int64())}
    if ids is not None:
        columns["id"] = pa.array(ids, pa.int64())
    columns.update(extra)
    table = pa.table(columns)
    if names is not None:
        features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}})})
    return table


def load(root, **options):
    return load_dataset(DataConfig(kind="parquet", root=str(root), image_size=SIZE, val_fraction=0.0, **options))


def by_id(dataset):
    """id -> (image (H, W, C), label) over both splits."""
    found = {}
    for part in (dataset.train, dataset.test):
        for image, label, id_ in zip(part.images, part.labels, part.ids):
            found[int(id_)] = (image.transpose(1, 2, 0), int(label))
    return found


LABELS = np.arange(15) % 3  # 5 images of each of 3 classes
IDS = np.random.default_rng(1).permutation(np.arange(100, 400, 20))  # not in row order


def test_png_bytes_decode_exactly_with_labels_and_ids_kept(tmp_path):
    pixels = make_images(15)
    pq.write_table(image_table(pixels, LABELS, IDS), tmp_path / "d.parquet")
    dataset = load(tmp_path / "d.parquet", test_fraction=0.4)
    assert dataset.train.images.shape == (9, 3, SIZE, SIZE) and dataset.train.images.dtype == np.uint8
    assert np.bincount(dataset.test.labels).tolist() == [2, 2, 2] and len(dataset.train) == 9
    assert dataset.classes == ["0", "1", "2"]
    found = by_id(dataset)
    assert sorted(found) == sorted(IDS.tolist())  # the table's ids, not positions
    for row, id_ in enumerate(IDS):
        image, label = found[int(id_)]
        assert label == LABELS[row]
        np.testing.assert_array_equal(image, pixels[row])  # PNG is lossless
    # each split in id order: a split's images are found by id with a binary search
    assert all(np.all(np.diff(part.ids) > 0) for part in (dataset.train, dataset.test))


def test_hugging_face_image_struct_jpeg_and_class_names(tmp_path):
    pixels = make_images(15, seed=2)
    names = ["cat", "dog", "eel"]
    pq.write_table(image_table(pixels, LABELS, IDS, fmt="JPEG", form="hf", names=names), tmp_path / "hf.parquet")
    dataset = load(tmp_path / "hf.parquet")
    assert dataset.classes == names
    found = by_id(dataset)
    for row, id_ in enumerate(IDS):
        image, label = found[int(id_)]
        assert label == LABELS[row]
        error = np.abs(image.astype(int) - pixels[row].astype(int))
        assert error.mean() < 3 and error.max() < 40  # JPEG is lossy: close, not equal


def test_grey_images_stay_grey_and_resize_as_image_folder_does(tmp_path):
    pixels = make_images(15, mode="L")
    pq.write_table(image_table(pixels, LABELS, IDS), tmp_path / "g.parquet")
    assert load(tmp_path / "g.parquet").train.images.shape[1:] == (1, SIZE, SIZE)
    big = load_dataset(DataConfig(kind="parquet", root=str(tmp_path / "g.parquet"), image_size=16, channels=3))
    assert big.train.images.shape[1:] == (3, 16, 16)
    expected = np.asarray(Image.fromarray(pixels[0]).convert("RGB").resize((16, 16), Image.BILINEAR))
    np.testing.assert_array_equal(by_id(big)[int(IDS[0])][0], expected)


def test_a_folder_of_files_is_one_table_whatever_the_spread(tmp_path):
    table = image_table(make_images(15), LABELS, IDS)
    pq.write_table(table, tmp_path / "one.parquet")
    (tmp_path / "parts" / "sub").mkdir(parents=True)
    pq.write_table(table.slice(9), tmp_path / "parts" / "a.parquet")  # the rows in another order, over two files
    pq.write_table(table.slice(0, 9), tmp_path / "parts" / "sub" / "b.parquet")
    (tmp_path / "parts" / ".hidden.parquet").write_bytes(b"not data")
    one, parts = load(tmp_path / "one.parquet"), load(tmp_path / "parts")
    for name in ("train", "test"):
        np.testing.assert_array_equal(getattr(one, name).ids, getattr(parts, name).ids)
        np.testing.assert_array_equal(getattr(one, name).images, getattr(parts, name).images)


def test_a_table_without_ids_numbers_its_rows(tmp_path):
    pixels = make_images(15)
    pq.write_table(image_table(pixels, LABELS), tmp_path / "noid.parquet")
    dataset = load(tmp_path / "noid.parquet")
    found = by_id(dataset)
    assert sorted(found) == list(range(15))
    for row in range(15):
        np.testing.assert_array_equal(found[row][0], pixels[row])
    # id_column null numbers the rows even where the table has ids
    pq.write_table(image_table(pixels, LABELS, IDS), tmp_path / "ids.parquet")
    assert sorted(by_id(load(tmp_path / "ids.parquet", id_column=None))) == list(range(15))


def write_sets(root, query_in_folder=True):
    """train.parquet (12 rows, classes 0-2), query/ (two files, 3 rows), gallery.parquet (6 rows, classes 0-3)."""
    root.mkdir()
    rng = np.random.default_rng(3)
    train_y, query_y, gallery_y = np.arange(12) % 3, np.array([0, 1, 3]), np.arange(6) % 4
    ids = rng.permutation(1000)[:21]
    pq.write_table(image_table(make_images(12, seed=4), train_y, ids[:12]), root / "train.parquet")
    query = image_table(make_images(3, seed=5), query_y, ids[12:15])
    if query_in_folder:
        (root / "query").mkdir()
        pq.write_table(query.slice(0, 2), root / "query" / "0.parquet")
        pq.write_table(query.slice(2), root / "query" / "1.parquet")
    else:
        pq.write_table(query, root / "query.parquet")
    pq.write_table(image_table(make_images(6, seed=6), gallery_y, ids[15:]), root / "gallery.parquet")
    return ids


def test_train_query_and_gallery_sets(tmp_path):
    ids = write_sets(tmp_path / "sets")
    config = load_config(None, ["data.kind=parquet", f"data.root={tmp_path / 'sets'}", f"data.image_size={SIZE}",
                                "data.val_fraction=0", "eval.protocol=query_gallery"])
    dataset = load_dataset(config.data, config.eval, config.scenario)
    assert dataset.classes == ["0", "1", "2", "3"]
    assert len(dataset.train) == 12 and sorted(dataset.train.ids) == sorted(ids[:12])
    assert sorted(dataset.query.ids) == sorted(ids[12:15]) and sorted(dataset.gallery.ids) == sorted(ids[15:])
    assert sorted(dataset.query.labels.tolist()) == [0, 1, 3] and np.bincount(dataset.gallery.labels).tolist() == [
        2, 2, 1, 1]
    # the test split is the two sets, queries first
    np.testing.assert_array_equal(dataset.test.ids, np.concatenate([dataset.query.ids, dataset.gallery.ids]))
    query_pixels = make_images(3, seed=5)
    for row, id_ in enumerate(ids[12:15]):
        np.testing.assert_array_equal(dataset.query.images[dataset.query.ids == id_][0].transpose(1, 2, 0),
                                      query_pixels[row])


def test_sets_need_all_three(tmp_path):
    write_sets(tmp_path / "half", query_in_folder=False)
    (tmp_path / "half" / "gallery.parquet").unlink()
    with pytest.raises(DataError, match=r"half has train, query but no gallery: separate query and gallery sets"):
        load(tmp_path / "half")
    write_sets(tmp_path / "extra")
    (tmp_path / "extra" / "test.parquet").write_bytes((tmp_path / "extra" / "train.parquet").read_bytes())
    with pytest.raises(DataError, match=r"and also test.parquet, which is in none of them"):
        load(tmp_path / "extra")
    write_sets(tmp_path / "both", query_in_folder=False)
    (tmp_path / "both" / "query").mkdir()
    with pytest.raises(DataError, match=r"has both query.parquet and query/"):
        load(tmp_path / "both")


def test_ids_must_be_unique_across_the_sets(tmp_path):
    ids = write_sets(tmp_path / "dup")
    table = pq.read_table(tmp_path / "dup" / "gallery.parquet")
    table = table.set_column(2, "id", pa.array([int(ids[0])] + ids[16:].tolist(), pa.int64()))
    pq.write_table(table, tmp_path / "dup" / "gallery.parquet")
    with pytest.raises(DataError, match=rf"id {ids[0]} is on two rows, .*train.parquet, row 0, column 'id' and "
                                        r".*gallery.parquet, row 0, column 'id'"):
        load(tmp_path / "dup")


def bad_table(**changes):
    """A good table of 15 rows with ``changes``: a column name -> new array (None: dropped)."""
    table = image_table(make_images(15), LABELS, np.arange(15))
    for name, values in changes.items():
        index = table.schema.get_field_index(name)
        if values is None:
            table = table.remove_column(index)
        elif index < 0:
            table = table.append_column(name, values)
        else:
            table = table.set_column(index, name, values)
    return table


def broken_image_rows():
    images = [encode(p) for p in make_images(15)]
    images[4] = b"not an image"
    return pa.array(images, pa.binary())


def labels_with(row, value, kind=pa.int64()):
    values = LABELS.tolist()
    values[row] = value
    return pa.array(values, kind)


@pytest.mark.parametrize("changes, options, message", [
    ({"image": None}, {}, r"bad.parquet: no column 'image' \(data.image_column\); columns are: label, id"),
    ({"label": None}, {}, r"bad.parquet: no column 'label' \(data.label_column\); columns are: image, id"),
    ({}, {"id_column": "uid"}, r"bad.parquet: no column 'uid' \(data.id_column\); columns are: image, label, id"),
    ({"image": broken_image_rows()}, {}, r"cannot read image .*bad.parquet, row 4, column 'image': not an image in a "
                                      "format PIL reads"),
    ({"label": labels_with(3, None)}, {}, r"bad.parquet, row 3, column 'label': null label"),
    ({"label": labels_with(2, -1)}, {}, r"bad.parquet, row 2, column 'label': label -1; labels are class ids"),
    ({"label": pa.array(LABELS.astype(float))}, {}, r"bad.parquet, column 'label': type double; labels must be "
                                                    "integers"),
    ({"label": pa.array([str(v) for v in LABELS])}, {}, r"column 'label': type string; labels must be integers"),
    ({"id": pa.array([0] + list(range(14)), pa.int64())}, {},
     r"id 0 is on two rows, .*bad.parquet, row 0, column 'id' and .*bad.parquet, row 1, column 'id'"),
    ({"id": pa.array([None] + list(range(1, 15)), pa.int64())}, {}, r"bad.parquet, row 0, column 'id': null id"),
    ({"id": pa.array(np.arange(15) - 1)}, {}, r"bad.parquet, row 0, column 'id': id -1; ids must be >= 0"),
    ({"image": pa.array(np.arange(15))}, {}, r"column 'image': type int64; images must be encoded bytes"),
    ({"image": pa.array([None] + [encode(p) for p in make_images(14)], pa.binary())}, {},
     r"bad.parquet, row 0, column 'image': null image"),
    ({"image": pa.array([{"bytes": None, "path": "/photos/0.png"}] * 15, HF_IMAGE)}, {},
     r"row 0, column 'image': no image bytes, only a path \('/photos/0.png'\); the loader decodes the images a table "
     "holds"),
])
def test_bad_tables_are_named_by_file_row_and_column(tmp_path, changes, options, message):
    pq.write_table(bad_table(**changes), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=message):
        load(tmp_path / "bad.parquet", **options)


def test_a_truncated_image_is_named(tmp_path):
    images = [encode(p) for p in make_images(15)]
    images[7] = images[7][:60]  # a PNG cut short: its header and part of its pixels
    pq.write_table(bad_table(image=pa.array(images, pa.binary())), tmp_path / "cut.parquet")
    with pytest.raises(DataError, match=r"cannot read image .*cut.parquet, row 7, column 'image'"):
        load(tmp_path / "cut.parquet")


def test_empty_missing_and_unreadable_data_are_named(tmp_path):
    pq.write_table(bad_table().slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match=r"empty.parquet: no rows; a dataset needs images"):
        load(tmp_path / "empty.parquet")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"nothing holds no .parquet files"):
        load(tmp_path / "nothing")
    with pytest.raises(DataError, match=r"Parquet data not found: .*missing"):
        load(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(DataError, match=r"junk.parquet: not a readable Parquet file"):
        load(tmp_path / "junk.parquet")
    pq.write_table(bad_table(label=pa.array(np.zeros(15, np.int64))), tmp_path / "one.parquet")
    with pytest.raises(DataError, match=r"one.parquet has 1 class\(es\)"):
        load(tmp_path / "one.parquet")


def test_files_with_and_without_ids_are_refused(tmp_path):
    (tmp_path / "mixed").mkdir()
    pq.write_table(bad_table(), tmp_path / "mixed" / "a.parquet")
    pq.write_table(bad_table(id=None), tmp_path / "mixed" / "b.parquet")
    with pytest.raises(DataError, match=r"b.parquet: no column 'id' .* \(.*a.parquet has one"):
        load(tmp_path / "mixed")


def test_class_names_beyond_the_labels_and_disagreeing_files(tmp_path):
    pq.write_table(image_table(make_images(15), LABELS, IDS, names=["a", "b"]), tmp_path / "few.parquet")
    with pytest.raises(DataError, match=r"few.parquet, row 2, column 'label': label 2, but the Hugging Face metadata "
                                        "names 2 classes"):
        load(tmp_path / "few.parquet")
    (tmp_path / "two").mkdir()
    pq.write_table(image_table(make_images(15), LABELS, IDS, names=["a", "b", "c"]), tmp_path / "two" / "0.parquet")
    pq.write_table(image_table(make_images(15), LABELS, IDS + 1, names=["x", "y", "z"]), tmp_path / "two" / "1.parquet")
    with pytest.raises(DataError, match=r"give column 'label' different class names"):
        load(tmp_path / "two")


@pytest.mark.parametrize("overrides, message", [
    (["data.kind=imagefolder", "data.root=x", "data.image_column=img"],
     "data.image_column is read by data.kind=parquet only, and data.kind is imagefolder"),
    (["data.kind=parquet", "data.root=x", "data.id_column=label"],
     "data.image_column, data.label_column and data.id_column must name different columns"),
    (["data.kind=parquet", "data.root=x", "data.label_column=''"], "data.label_column must name a column"),
])
def test_parquet_config_keys_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
