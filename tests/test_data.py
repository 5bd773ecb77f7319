import dataclasses
import gzip

import numpy as np
import pytest
from PIL import Image

from bict_ray.config import DataConfig, ScenarioConfig, load_config
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
