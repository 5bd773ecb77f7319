import dataclasses
import gzip

import numpy as np
import pytest
from PIL import Image

from bict_ray.config import ConfigError, DataConfig, ScenarioConfig, load_config
from bict_ray.core.data import DataError, find_fashion_mnist, load_dataset
from bict_ray.core.splits import default_class_subsets, load_or_make_splits, make_splits


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "fmnist"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (50, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(50) % 10)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    return folder


def test_fashion_mnist_from_idx_files(fake_fashion):
    dataset = load_dataset(DataConfig(root=str(fake_fashion), val_fraction=0.0))
    assert dataset.train.images.shape == (50, 1, 28, 28) and dataset.train.images.dtype == np.uint8
    assert dataset.test.images.shape == (20, 1, 28, 28)
    assert dataset.num_classes == 10 and dataset.classes[0] == "T-shirt/top"
    # ids are unique across both splits: a gallery row always names one image
    assert np.array_equal(np.concatenate([dataset.train.ids, dataset.test.ids]), np.arange(70))


def test_torchvision_layout_is_found(fake_fashion, tmp_path):
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in fake_fashion.iterdir():
        (raw / f.name).write_bytes(f.read_bytes())
    assert find_fashion_mnist(str(tmp_path / "tv")) == raw


def test_truncated_idx_file_is_named(fake_fashion):
    path = fake_fashion / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "rb") as f:
        data = f.read()
    with gzip.open(path, "wb") as f:
        f.write(data[:-10])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz is truncated"):
        load_dataset(DataConfig(root=str(fake_fashion)))


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    import bict_ray.core.data as data

    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", ())
    monkeypatch.delenv(data.FASHION_MNIST_ENV, raising=False)
    monkeypatch.setattr(data, "_download_fashion_mnist",
                        lambda root: (_ for _ in ()).throw(DataError(data.missing_dataset_message(root))))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(DataConfig(root=str(tmp_path / "nothing")))


def make_image_folder(root, classes=("cat", "dog", "eel"), per_class=5, mode="RGB", sizes=((40, 30), (24, 24))):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = sizes[i % len(sizes)]
            color = (c * 80, i * 40, 0) if mode == "RGB" else c * 80
            Image.new(mode, size, color).save(root / name / f"{i}.png")


def test_image_folder_any_size_rgb(tmp_path):
    make_image_folder(tmp_path / "imgs")
    dataset = load_dataset(DataConfig(kind="imagefolder", root=str(tmp_path / "imgs"), image_size=16,
                                      test_fraction=0.4, val_fraction=0.0))
    assert dataset.classes == ["cat", "dog", "eel"]  # numbered in sorted folder order
    assert dataset.train.images.shape[1:] == (3, 16, 16)
    assert len(dataset.train) + len(dataset.test) == 15
    assert np.array_equal(np.bincount(dataset.test.labels), [2, 2, 2])
    # red channel encodes the class: images stay paired with their labels
    assert np.array_equal(dataset.test.images[:, 0, 0, 0], dataset.test.labels * 80)


def test_image_folder_grayscale_and_channel_override(tmp_path):
    make_image_folder(tmp_path / "g", mode="L")
    grey = load_dataset(DataConfig(kind="imagefolder", root=str(tmp_path / "g")))
    assert grey.train.images.shape[1:] == (1, 32, 32)
    rgb = load_dataset(DataConfig(kind="imagefolder", root=str(tmp_path / "g"), channels=3))
    assert rgb.train.images.shape[1] == 3


def test_image_folder_bad_inputs(tmp_path):
    make_image_folder(tmp_path / "one", classes=("only",))
    with pytest.raises(DataError, match="at least 2"):
        load_dataset(DataConfig(kind="imagefolder", root=str(tmp_path / "one")))
    make_image_folder(tmp_path / "bad")
    (tmp_path / "bad" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        load_dataset(DataConfig(kind="imagefolder", root=str(tmp_path / "bad")))
    with pytest.raises(DataError, match="not found"):
        load_dataset(DataConfig(kind="imagefolder", root=str(tmp_path / "missing")))


def test_npz_loader(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (30, 12, 12, 3), dtype=np.uint8),
             labels=np.arange(30) % 3)
    dataset = load_dataset(DataConfig(kind="npz", root=str(tmp_path / "d.npz"), test_fraction=0.2, val_fraction=0.0))
    assert dataset.train.images.shape == (24, 3, 12, 12) and len(dataset.test) == 6
    np.savez(tmp_path / "nolabels.npz", images=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(DataError, match="no 'labels' array"):
        load_dataset(DataConfig(kind="npz", root=str(tmp_path / "nolabels.npz")))


def test_limits_are_class_balanced(fake_fashion):
    dataset = load_dataset(DataConfig(root=str(fake_fashion), limit_train=20, limit_test=10, val_fraction=0.0))
    assert len(dataset.train) == 20 and np.array_equal(np.bincount(dataset.train.labels), [2] * 10)
    assert len(dataset.test) == 10


@pytest.fixture
def train_set(fake_fashion):
    return load_dataset(DataConfig(root=str(fake_fashion), val_fraction=0.0)).train


def test_default_class_growth():
    assert default_class_subsets(3, 10) == [list(range(4)), list(range(7)), list(range(10))]
    assert default_class_subsets(2, 10) == [list(range(5)), list(range(10))]


def test_class_growth_splits(train_set):
    splits = make_splits(ScenarioConfig(kind="class_growth", steps=3), train_set, 10)
    assert [s.classes for s in splits] == default_class_subsets(3, 10)
    for split in splits:
        labels = train_set.labels[np.searchsorted(train_set.ids, split.train_ids)]
        assert set(labels.tolist()) == set(split.classes)
        assert len(split.train_ids) == np.isin(train_set.labels, split.classes).sum()


def test_data_growth_is_nested_seeded_and_sized(train_set):
    scenario = ScenarioConfig(kind="data_growth", steps=2, fractions=[0.4, 1.0], seed=3)
    first, second = make_splits(scenario, train_set, 10)
    assert len(first.train_ids) == 20 and len(second.train_ids) == 50
    assert set(first.train_ids) <= set(second.train_ids)
    again = make_splits(scenario, train_set, 10)
    assert np.array_equal(again[0].train_ids, first.train_ids)
    other = make_splits(ScenarioConfig(kind="data_growth", steps=2, fractions=[0.4, 1.0], seed=4), train_set, 10)
    assert not np.array_equal(other[0].train_ids, first.train_ids)


def test_unknown_class_is_refused(train_set):
    with pytest.raises(DataError, match=r"class\(es\) \[12\] that do not exist"):
        make_splits(ScenarioConfig(steps=2, classes=[[0, 1], [0, 12]]), train_set, 10)


def test_splits_are_saved_reloaded_and_protected(tmp_path, train_set):
    scenario = ScenarioConfig(kind="data_growth", steps=2, fractions=[0.5, 1.0])
    saved = load_or_make_splits(tmp_path, scenario, train_set, 10)
    reloaded = load_or_make_splits(tmp_path, scenario, train_set, 10)
    assert all(np.array_equal(a.train_ids, b.train_ids) for a, b in zip(saved, reloaded))
    before = (tmp_path / "splits" / "splits.json").read_text()
    with pytest.raises(DataError, match="splits for another scenario"):
        load_or_make_splits(tmp_path, ScenarioConfig(kind="data_growth", steps=2, fractions=[0.3, 1.0]),
                            train_set, 10)
    assert (tmp_path / "splits" / "splits.json").read_text() == before


def test_validation_set_is_held_out_of_training_per_class_and_disjoint_from_test(smoke_data):
    """The smoke preset's Fashion-MNIST slice with the default data.val_fraction (0.1)."""
    val, train, test = smoke_data.val, smoke_data.train, smoke_data.test
    assert val is not None and len(val) == 120 and len(train) == 1080
    assert not set(val.ids) & set(train.ids) and not set(val.ids) & set(test.ids)
    assert np.bincount(val.labels, minlength=10).tolist() == [12] * 10  # a tenth of each class's 120
    np.testing.assert_array_equal(val.images[0], load_dataset(load_config("smoke").data).val.images[0])


def test_validation_set_is_seeded_and_can_be_turned_off():
    base = load_config("smoke").data
    other_seed = load_dataset(dataclasses.replace(base, seed=1)).val
    assert not np.array_equal(other_seed.ids, load_dataset(base).val.ids)
    none = load_dataset(dataclasses.replace(base, val_fraction=0.0))
    assert none.val is None and len(none.train) == 1200


def test_validation_ids_are_saved_with_the_splits_and_protect_them(tmp_path, smoke_data):
    scenario = ScenarioConfig(kind="class_growth", steps=2)
    saved = load_or_make_splits(tmp_path, scenario, smoke_data.train, 10, smoke_data.val)
    np.testing.assert_array_equal(np.load(tmp_path / "splits" / "validation_ids.npy"), np.sort(smoke_data.val.ids))
    reloaded = load_or_make_splits(tmp_path, scenario, smoke_data.train, 10, smoke_data.val)
    assert all(np.array_equal(a.train_ids, b.train_ids) for a, b in zip(saved, reloaded))
    another = load_dataset(dataclasses.replace(load_config("smoke").data, seed=1))
    with pytest.raises(DataError, match="splits for another scenario or dataset"):
        load_or_make_splits(tmp_path, scenario, another.train, 10, another.val)


# --- retrieval protocols: query and gallery sets, open set ------------------------------------------------------

def protocol_config(*overrides):
    return load_config("smoke", list(overrides))


def load_for(config):
    return load_dataset(config.data, config.eval, config.scenario)


def paired(images, labels):
    """The made-up images below store their label in pixel (0, 0, 0): true while images and labels stay paired."""
    return np.array_equal(images[:, 0, 0, 0], labels)


def npz_with_sets(path, **arrays):
    rng = np.random.default_rng(2)

    def images_of(labels):
        images = rng.integers(10, 256, (len(labels), 8, 8), dtype=np.uint8)
        images[:, 0, 0] = labels
        return images

    train_y, query_y, gallery_y = np.arange(30) % 3, np.arange(6) % 3, np.arange(12) % 3
    content = {"images": images_of(train_y), "labels": train_y, "x_query": images_of(query_y), "y_query": query_y,
               "x_gallery": images_of(gallery_y), "y_gallery": gallery_y}
    content.update(arrays)
    np.savez(path, **{key: value for key, value in content.items() if value is not None})
    return str(path)


def test_leave_one_out_query_and_gallery_are_the_test_set(fake_fashion):
    dataset = load_dataset(DataConfig(root=str(fake_fashion), val_fraction=0.0))
    assert dataset.protocol == "leave_one_out" and dataset.query is dataset.test and dataset.gallery is dataset.test


def test_npz_query_and_gallery_keys_are_the_protocols_sets(tmp_path):
    path = npz_with_sets(tmp_path / "sets.npz")
    config = load_config(None, ["data.kind=npz", f"data.root={path}", "data.val_fraction=0",
                                "eval.protocol=query_gallery"])
    dataset = load_for(config)
    query, gallery, test = dataset.query, dataset.gallery, dataset.test
    assert len(dataset.train) == 30 and len(query) == 6 and len(gallery) == 12 and len(test) == 18
    assert paired(query.images, query.labels) and paired(gallery.images, gallery.labels)
    # ids unique over train, query and gallery: self-exclusion by id can only ever remove a query's own image
    ids = np.concatenate([dataset.train.ids, query.ids, gallery.ids])
    assert len(np.unique(ids)) == len(ids) and sorted(test.ids) == sorted(np.concatenate([query.ids, gallery.ids]))
    # under leave-one-out the same file is searched as one set, the union of the two
    loo = load_dataset(config.data)
    assert loo.query is loo.gallery and np.array_equal(np.sort(loo.test.ids), np.sort(test.ids))


@pytest.mark.parametrize("arrays, message", [
    ({"y_query": None}, r"has x_query, x_gallery, y_gallery but no y_query"),
    ({"x_gallery": None, "y_gallery": None}, r"has x_query, y_query but no x_gallery, y_gallery"),
    ({"test_images": np.zeros((3, 8, 8), np.uint8), "test_labels": np.arange(3)}, "both test_images and x_query"),
    ({"x_query": np.zeros((6, 9, 9), np.uint8)}, r"x_query holds images of shape \(1, 9, 9\)"),
    ({"y_gallery": np.arange(5)}, r"y_gallery must be 12 integers"),
])
def test_npz_query_and_gallery_keys_are_checked(tmp_path, arrays, message):
    path = npz_with_sets(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as err:
        load_dataset(DataConfig(kind="npz", root=path))
    assert "bad.npz" in str(err.value)


def test_image_folder_query_and_gallery_subtrees(tmp_path):
    root = tmp_path / "sets"
    make_image_folder(root / "train", per_class=4)
    make_image_folder(root / "query", classes=("cat", "dog", "fox"), per_class=1)  # fox: never trained on
    make_image_folder(root / "gallery", classes=("cat", "dog", "eel", "fox"), per_class=3)
    config = load_config(None, ["data.kind=imagefolder", f"data.root={root}", "data.image_size=8",
                                "data.val_fraction=0", "eval.protocol=query_gallery"])
    dataset = load_for(config)
    assert dataset.classes == ["cat", "dog", "eel", "fox"]  # sorted over the three subtrees
    assert len(dataset.train) == 12 and np.bincount(dataset.train.labels).tolist() == [4, 4, 4]
    assert dataset.query.labels.tolist() == [0, 1, 3] and np.bincount(dataset.gallery.labels).tolist() == [3] * 4
    assert not set(dataset.query.ids) & set(dataset.gallery.ids)
    # the red channel encodes the position of the class in make_image_folder's list, not its number: cat, dog, fox
    assert dataset.query.images[:, 0, 0, 0].tolist() == [0, 80, 160]


def test_image_folder_query_without_gallery_is_named(tmp_path):
    root = tmp_path / "half"
    make_image_folder(root / "train")
    make_image_folder(root / "query", per_class=1)
    with pytest.raises(DataError, match=r"half has train/, query/ but no gallery/"):
        load_dataset(DataConfig(kind="imagefolder", root=str(root)))


def test_seeded_query_split_is_per_class_reproducible_and_disjoint():
    config = protocol_config("eval.protocol=query_gallery", "data.val_fraction=0")
    dataset = load_for(config)
    query, gallery, test = dataset.query, dataset.gallery, dataset.test
    assert len(test) == 400 and len(query) == 80 and len(gallery) == 320
    assert np.bincount(query.labels).tolist() == [8] * 10  # a fifth of each class's 40 test images
    assert not set(query.ids) & set(gallery.ids) and set(query.ids) | set(gallery.ids) == set(test.ids)
    again = load_for(config)
    assert np.array_equal(again.query.ids, query.ids) and np.array_equal(again.gallery.ids, gallery.ids)
    other = load_for(protocol_config("eval.protocol=query_gallery", "data.val_fraction=0", "data.seed=1"))
    assert not np.array_equal(other.query.ids, query.ids)
    half = load_for(protocol_config("eval.protocol=query_gallery", "eval.query_fraction=0.5", "data.val_fraction=0"))
    assert np.bincount(half.query.labels).tolist() == [20] * 10


def test_open_set_holds_test_classes_out_of_train_and_validation():
    config = protocol_config("scenario.classes=[[0, 1, 2], [0, 1, 2, 3, 4, 5]]", "scenario.test_classes=[6, 7, 8, 9]")
    dataset = load_for(config)
    assert dataset.test_classes == [6, 7, 8, 9]
    assert set(dataset.train.labels.tolist()) == set(range(6)) and set(dataset.val.labels.tolist()) == set(range(6))
    assert set(dataset.test.labels.tolist()) == {6, 7, 8, 9} and len(dataset.test) == 400  # limit_test after the filter
    assert dataset.query is dataset.gallery is dataset.test
    both = load_for(protocol_config("scenario.test_classes=[8, 9]", "scenario.classes=null",
                                    "eval.protocol=query_gallery"))
    assert set(both.query.labels.tolist()) == set(both.gallery.labels.tolist()) == {8, 9}


def test_open_set_splits_never_train_on_test_classes(tmp_path):
    config = protocol_config("scenario.kind=data_growth", "scenario.classes=null", "scenario.test_classes=[0, 9]")
    dataset = load_for(config)
    for split in load_or_make_splits(tmp_path, config.scenario, dataset.train, 10, dataset.val):
        assert split.classes == list(range(1, 9))
        assert not np.isin(dataset.train.labels[np.searchsorted(dataset.train.ids, split.train_ids)], [0, 9]).any()
    # the default class subsets grow over the 8 classes left, as over 8 classes: 4, 6, 8
    growth = make_splits(ScenarioConfig(steps=3, test_classes=[0, 9]), dataset.train, 10)
    assert [s.classes for s in growth] == [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6], list(range(1, 9))]
    # a dataset loaded without the scenario still holds them: refused before any model trains
    closed = load_dataset(config.data)
    with pytest.raises(DataError, match=r"the validation set holds images of scenario.test_classes \[0, 9\]"):
        load_or_make_splits(tmp_path / "other", config.scenario, closed.train, 10, closed.val)
    with pytest.raises(DataError, match=r"the training set holds images of scenario.test_classes \[0, 9\]"):
        make_splits(config.scenario, closed.train, 10)
    with pytest.raises(DataError, match=r"loaded for eval.protocol=leave_one_out, scenario.test_classes=None"):
        closed.check_protocol("leave_one_out", [0, 9])
    dataset.check_protocol("leave_one_out", [9, 0])


@pytest.mark.parametrize("overrides, message", [
    (["scenario.test_classes=[4, 12]"], r"scenario.test_classes \[4, 12\] names class\(es\) \[12\] that do not exist"),
    (["scenario.test_classes=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"], "hold every training image"),
])
def test_open_set_data_errors_name_the_key(overrides, message):
    config = protocol_config("scenario.classes=null", *overrides)
    with pytest.raises(DataError, match=message):
        load_for(config)


def test_open_set_test_split_without_those_classes_is_refused(tmp_path):
    path = npz_with_sets(tmp_path / "sets.npz", y_query=np.array([0, 1, 0, 1, 0, 1]))
    config = load_config(None, ["data.kind=npz", f"data.root={path}", "data.val_fraction=0",
                                "scenario.test_classes=[2]", "scenario.steps=2", "eval.protocol=query_gallery"])
    with pytest.raises(DataError, match=r"query_gallery: the query set holds no image of scenario.test_classes \[2\]"):
        load_for(config)
    np.savez(tmp_path / "two.npz", images=np.zeros((20, 8, 8), np.uint8), labels=np.arange(20) % 2,
             test_images=np.zeros((4, 8, 8), np.uint8), test_labels=np.zeros(4, np.int64), classes=["a", "b", "c"])
    with pytest.raises(DataError, match=r"scenario.test_classes \[2\]: the test split holds no image"):
        load_dataset(DataConfig(kind="npz", root=str(tmp_path / "two.npz")), scenario=config.scenario)


def test_query_split_moves_with_data_seed_alone(fake_fashion):
    # the same 20 test images (2 a class) under two data seeds: one query a class, another one
    splits = [load_for(load_config(None, [f"data.root={fake_fashion}", f"data.seed={seed}", "eval.query_fraction=0.5",
                                          "eval.protocol=query_gallery"])) for seed in (0, 1)]
    assert np.array_equal(splits[0].test.ids, splits[1].test.ids)
    assert all(np.bincount(d.query.labels).tolist() == [1] * 10 for d in splits)
    assert not np.array_equal(splits[0].query.ids, splits[1].query.ids)


def test_query_split_needs_two_images_per_class(fake_fashion):
    config = load_config(None, [f"data.root={fake_fashion}", "data.limit_test=10", "eval.protocol=query_gallery"])
    with pytest.raises(DataError, match=r"class 0 has 1 image\(s\) in the test split; eval.protocol=query_gallery"):
        load_for(config)


@pytest.mark.parametrize("overrides, message", [
    (["eval.protocol=loo"], r"eval.protocol must be one of leave_one_out, query_gallery, got 'loo'"),
    (["eval.query_fraction=1.0"], r"eval.query_fraction must be in \(0.0, 1.0\)"),
    (["scenario.test_classes=[]"], "scenario.test_classes is empty"),
    (["scenario.test_classes=[3, 3]"], r"scenario.test_classes must be distinct class ids >= 0"),
    (["scenario.test_classes=[-1]"], r"scenario.test_classes must be distinct class ids >= 0"),
    (["scenario.test_classes=[7]"], r"scenario.classes\[1\] \(model 2\) has test class\(es\) \[7\]"),
])
def test_protocol_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        protocol_config(*overrides)
