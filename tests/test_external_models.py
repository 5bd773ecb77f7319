"""An old model from outside: a service's phi_old (TorchScript, torchvision + weights, a Python factory) or only its
embeddings of the training images, made into what the method uses, and every bad input refused by name.

Everything is tiny and made here: the models in a few lines of torch, the files under tmp_path. No Ray.
"""

from __future__ import annotations


import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from bict_ray.config import ConfigError, OldModelConfig, load_config
from bict_ray.core.embed import preprocess
from bict_ray.core.external import InputMapping, class_mean_classifier, load_old_model
from bict_ray.errors import InputError
from bict_ray.storage.old_embeddings import load_old_embeddings

from conftest import user_module

SIZE = 12  # the project's images here: (N, 1, 12, 12) uint8


class TinyCNN(nn.Module):
    """A service's small embedding model, with BatchNorm so that train mode would change its output."""

    def __init__(self, dim: int = 8, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.proj = nn.Linear(4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x))


def tiny_cnn(seed: int = 0, **kwargs) -> TinyCNN:
    torch.manual_seed(seed)
    model = TinyCNN(**kwargs)
    norm = model.features[1]
    norm.running_mean.uniform_(-0.5, 0.5)
    norm.running_var.uniform_(0.5, 2.0)
    return model.eval()


def images(n: int = 5, channels: int = 1, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=generator)


def model_config(kind: str, **keys) -> OldModelConfig:
    return OldModelConfig(kind=kind, **{"image_size": SIZE, "channels": 1, **keys})


# --- TorchScript ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["scripted", "traced"])
def test_torchscript_gives_the_original_models_embeddings(tmp_path, form):
    original = tiny_cnn()
    batch = images()
    compiled = torch.jit.script(original) if form == "scripted" else torch.jit.trace(original, preprocess(batch))
    path = tmp_path / f"{form}.pt"
    torch.jit.save(compiled, str(path))
    old = load_old_model(model_config("torchscript", path=str(path)))
    # mean = std = 0.5 at the data's own size and channels is the project's own [-1, 1] mapping
    expected = F.normalize(original(preprocess(batch)), dim=1)
    got = old.embed(batch)
    assert old.dim == 8 and old.classifier is None and str(path) in old.source
    assert got.dtype == torch.float32 and got.shape == (5, 8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    old.train()  # phi_old is frozen: its BatchNorm keeps the deployed statistics
    assert not old.model.training
    torch.testing.assert_close(old(batch), expected, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in old.parameters())


def test_torchscript_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match=r"old_model.path '.*missing\.pt': no such file"):
        load_old_model(model_config("torchscript", path=str(tmp_path / "missing.pt")))
    state = tmp_path / "state.pt"
    torch.save(tiny_cnn().state_dict(), state)
    with pytest.raises(InputError, match=r"old_model.path '.*state\.pt' is not a TorchScript file.*state_dict"):
        load_old_model(model_config("torchscript", path=str(state)))


# --- the input mapping -------------------------------------------------------------------------------------------


def test_the_input_mapping_makes_the_old_models_input():
    gray = images(2)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    x = InputMapping(3, SIZE, mean, std)(gray)
    for c in range(3):  # 1 -> 3 replicates the gray channel, then each channel's own mean and std
        torch.testing.assert_close(x[:, c], (gray[:, 0].float() / 255 - mean[c]) / std[c])
    color = images(2, channels=3)
    luma = 0.299 * color[:, 0].float() + 0.587 * color[:, 1].float() + 0.114 * color[:, 2].float()
    torch.testing.assert_close(InputMapping(1, SIZE, [0.0], [1.0])(color)[:, 0], luma / 255)
    flat = torch.full((2, 1, SIZE, SIZE), 51, dtype=torch.uint8)  # a resized constant image stays that constant
    resized = InputMapping(1, 20, [0.0], [1.0])(flat)
    assert resized.shape == (2, 1, 20, 20)
    torch.testing.assert_close(resized, torch.full_like(resized, 0.2))
    with pytest.raises(InputError, match="uint8 images, got torch.float32"):  # e.g. images already preprocessed
        InputMapping(1, SIZE, [0.5], [0.5])(preprocess(gray))


# --- torchvision ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path_factory.mktemp("resnet") / "resnet18.pt"
    torch.save(model.state_dict(), path)
    model.fc = nn.Identity()
    return path, model.eval()


def resnet_config(weights, **keys) -> OldModelConfig:
    return OldModelConfig(kind="torchvision", architecture="resnet18", weights=str(weights), image_size=16,
                          channels=3, **keys)


def test_torchvision_loads_local_weights_and_takes_the_input_of_the_head(resnet_weights):
    path, reference = resnet_weights
    batch = images(3)
    old = load_old_model(resnet_config(path))
    assert old.dim == 512 and "the input of fc" in old.source
    expected = F.normalize(reference(old.mapping(batch)), dim=1)  # the file's weights, not a random init
    torch.testing.assert_close(old.embed(batch), expected, atol=1e-5, rtol=1e-4)
    named = load_old_model(resnet_config(path, layer="flatten"))
    torch.testing.assert_close(named.embed(batch), expected, atol=1e-5, rtol=1e-4)


def test_torchvision_errors_name_the_keys_the_layer_and_the_architecture(resnet_weights, tmp_path):
    path, _ = resnet_weights
    state = torch.load(path, weights_only=True)
    del state["layer4.1.conv2.weight"], state["fc.weight"]  # a head missing from the file is no problem
    state["extra.weight"] = torch.zeros(3)
    wrong = tmp_path / "wrong.pt"
    torch.save(state, wrong)
    with pytest.raises(InputError, match=r"wrong\.pt' does not match torchvision 'resnet18': 1 missing key\(s\) "
                                         r"layer4\.1\.conv2\.weight; 1 unexpected key\(s\) extra\.weight$"):
        load_old_model(resnet_config(wrong))
    with pytest.raises(InputError, match=r"old_model.layer 'layer9' is not a node .*layer4\.1\.relu_1"):
        load_old_model(resnet_config(path, layer="layer9"))
    with pytest.raises(InputError, match=r"output of shape \(2, 512, 1, 1\) for 2 images, expected \(2, D\)"):
        load_old_model(resnet_config(path, layer="avgpool"))
    with pytest.raises(InputError, match=r"'resnet19' is not a torchvision classification model; valid names: "
                                         r".*resnet18, "):
        load_old_model(OldModelConfig(kind="torchvision", architecture="resnet19", weights=str(path),
                                      image_size=16, channels=3))
    with pytest.raises(InputError, match=r"old_model.weights '.*none\.pt' not found"):
        load_old_model(resnet_config(tmp_path / "none.pt"))


# --- a Python factory ----------------------------------------------------------------------------------------------


FACTORY_MODULE = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.proj = nn.Linear(4, width)

    def forward(self, x):
        return self.proj(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


class Broken(nn.Module):
    def __init__(self, fault):
        super().__init__()
        self.fault = fault

    def forward(self, x):
        flat = nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return {"four_d": x, "tuple": (flat, flat), "nan": flat.masked_fill(torch.arange(len(x))[:, None] == 1,
                float("nan")), "zero": flat * torch.tensor([[1.0], [0.0]])}[self.fault]


def make(width=4):
    torch.manual_seed(width)
    return Tiny(width)


def broken(fault):
    return Broken(fault)


def not_a_module():
    return 42
'''


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    return user_module(tmp_path, monkeypatch, "old_service_", FACTORY_MODULE)


def test_a_python_factory_with_kwargs_and_weights(factory_module, tmp_path):
    batch = images()
    old = load_old_model(model_config("python", factory=f"{factory_module}:make", kwargs={"width": 6}))
    assert old.dim == 6 and old.source.startswith(f"python {factory_module}:make(width=6)")
    trained = torch.nn.Linear(4, 6)  # the service's weights, other than what the factory initialises
    weights = tmp_path / "w.pt"
    torch.save({"proj." + k: v for k, v in trained.state_dict().items()}, weights)
    loaded = load_old_model(model_config("python", factory=f"{factory_module}:make", kwargs={"width": 6},
                                         weights=str(weights)))
    expected = F.normalize(trained(F.adaptive_avg_pool2d(preprocess(batch), 2).flatten(1)), dim=1)
    torch.testing.assert_close(loaded.embed(batch), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(old.embed(batch), expected, atol=1e-3)


def test_factory_errors_name_the_factory(factory_module, tmp_path):
    with pytest.raises(InputError, match=rf"old_model.factory '{factory_module}:not_a_module' returned a int, "
                                         "expected a torch.nn.Module"):
        load_old_model(model_config("python", factory=f"{factory_module}:not_a_module"))
    with pytest.raises(InputError, match=r"old_model.factory 'no_such_service.model:make': cannot import "
                                         r"'no_such_service.model' \(ModuleNotFoundError"):
        load_old_model(model_config("python", factory="no_such_service.model:make"))
    with pytest.raises(InputError, match=rf"'{factory_module}' has no 'mk'"):
        load_old_model(model_config("python", factory=f"{factory_module}:mk"))
    with pytest.raises(InputError, match=r"failed with old_model.kwargs \{'depth': 2\} \(TypeError"):
        load_old_model(model_config("python", factory=f"{factory_module}:make", kwargs={"depth": 2}))
    weights = tmp_path / "w.pt"
    torch.save({"head.weight": torch.zeros(4, 4)}, weights)
    with pytest.raises(InputError, match=r"w\.pt' does not match old_model.factory .*2 missing key\(s\) proj.weight, "
                                         r"proj.bias; 1 unexpected key\(s\) head.weight"):
        load_old_model(model_config("python", factory=f"{factory_module}:make", weights=str(weights)))


@pytest.mark.parametrize("fault, message", [
    ("four_d", r"output of shape \(2, 1, 12, 12\) for 2 images, expected \(2, D\)"),
    ("tuple", "returns tuple, expected one"),
    ("nan", "output row 1 holds NaN or Inf"),
    ("zero", "output row 1 is a zero vector"),
])
def test_an_output_that_is_no_embedding_is_refused(factory_module, fault, message):
    with pytest.raises(InputError, match=rf"python {factory_module}:broken\(fault='{fault}'\): .*{message}"):
        load_old_model(model_config("python", factory=f"{factory_module}:broken", kwargs={"fault": fault}))


# --- embeddings only ---------------------------------------------------------------------------------------------


def write(path, **columns):
    pq.write_table(pa.table(columns), path, row_group_size=3)  # several row groups: rows keep their file order
    return path


def vectors(n: int, dim: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)) * 3  # not unit length: the service's may not be


@pytest.mark.parametrize("column", ["list<double>", "fixed_size_list<float>", "fixed_shape_tensor"])
def test_old_embeddings_are_aligned_to_the_training_ids(tmp_path, column):
    rows = vectors(8)
    file_ids = np.array([70, 10, 40, 20, 99, 30, 50, 60])  # 99: not a training image, fine
    flat = pa.array(rows.astype(np.float32).ravel())
    stored = {"list<double>": pa.array(list(rows), type=pa.list_(pa.float64())),
              "fixed_size_list<float>": pa.FixedSizeListArray.from_arrays(flat, 4),
              "fixed_shape_tensor": pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), [4]),
                                                                   pa.FixedSizeListArray.from_arrays(flat, 4))}[column]
    path = write(tmp_path / "old.parquet", key=pa.array(file_ids), vec=stored, other=pa.array(range(8)))
    train_ids = np.array([30, 10, 60, 70, 20, 50, 40])  # the training set's own order
    got = load_old_embeddings(OldModelConfig(kind="embeddings", path=str(path), id_column="key",
                                             embedding_column="vec"), train_ids)
    row_of = {int(i): r for r, i in enumerate(file_ids)}
    expected = rows[[row_of[i] for i in train_ids]]
    assert got.dtype == np.float32 and got.shape == (7, 4)
    np.testing.assert_allclose(got, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-6)


def bad_files(tmp_path):
    """(file, message) for each input load_old_embeddings refuses, the training ids being 0 .. 5."""
    ids, rows = pa.array(np.arange(6)), vectors(6)

    def listed(values):
        return pa.array([None if v is None else list(v) for v in values], type=pa.list_(pa.float32()))

    nan, zero = rows.copy(), rows.copy()
    nan[4, 2], zero[3] = np.nan, 0.0
    mixed = [*rows[:5], rows[5, :3]]
    return {
        "column": (write(tmp_path / "column.parquet", id=ids, emb=listed(rows)),
                   r"column\.parquet: no column 'embedding' \(old_model.embedding_column\); columns are: id, emb"),
        "missing": (write(tmp_path / "missing.parquet", id=pa.array([0, 2, 4, 7]), embedding=listed(rows[:4])),
                    r"missing\.parquet, column 'id': 3 of the 6 training images have no row \(ids 1, 3, 5\)"),
        "duplicate": (write(tmp_path / "duplicate.parquet", id=pa.array([0, 1, 2, 3, 4, 5, 2]),
                            embedding=listed(vectors(7))),
                      r"duplicate\.parquet, column 'id': id 2 is on rows 2 and 6"),
        "dim": (write(tmp_path / "dim.parquet", id=ids, embedding=listed(mixed)),
                r"dim\.parquet, row 5, column 'embedding': embedding has 3 values, expected 4 \(the dim of "
                r".*dim\.parquet, row 0\)"),
        "nan": (write(tmp_path / "nan.parquet", id=ids, embedding=listed(nan)),
                r"nan\.parquet, row 4, column 'embedding': embedding holds NaN or Inf"),
        "zero": (write(tmp_path / "zero.parquet", id=ids, embedding=listed(zero)),
                 r"zero\.parquet, row 3, column 'embedding': zero vector"),
        "null": (write(tmp_path / "null.parquet", id=ids, embedding=listed([*rows[:1], None, *rows[2:]])),
                 r"null\.parquet, row 1, column 'embedding': null embedding"),
        "file": (tmp_path / "absent.parquet", r"old_model.path .*absent\.parquet: no such file"),
    }


@pytest.mark.parametrize("case", ["column", "missing", "duplicate", "dim", "nan", "zero", "null", "file"])
def test_bad_old_embeddings_are_refused_naming_file_and_row(tmp_path, case):
    path, message = bad_files(tmp_path)[case]
    with pytest.raises(InputError, match=message):
        load_old_embeddings(OldModelConfig(kind="embeddings", path=str(path)), np.arange(6))


# --- the old classifier --------------------------------------------------------------------------------------------


def test_class_mean_classifier_by_hand():
    embeddings = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    labels = torch.tensor([0, 0, 1])
    weight, valid = class_mean_classifier(embeddings, labels, num_classes=3)
    # class 0: the mean of the directions (1, 0) and (0, 1), not of the raw rows (which would lean to (2, 1))
    expected = torch.tensor([[2 ** -0.5, 2 ** -0.5], [0.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(weight, expected)
    assert valid.tolist() == [True, True, False]  # class 2 has no sample: out of BCT's softmax


# --- the config ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["old_model.kind=torchscript", "old_model.image_size=28", "old_model.channels=1"],
     "old_model.path is required for old_model.kind=torchscript"),
    (["old_model.kind=torchscript", "old_model.path=m.pt", "old_model.channels=1"],
     "old_model.image_size is required for old_model.kind=torchscript"),
    (["old_model.kind=torchvision", "old_model.architecture=resnet18", "old_model.image_size=32",
      "old_model.channels=3"], "old_model.weights is required for old_model.kind=torchvision"),
    (["old_model.kind=torchvision", "old_model.weights=w.pt", "old_model.image_size=32", "old_model.channels=3"],
     "old_model.architecture is required for old_model.kind=torchvision"),
    (["old_model.kind=python", "old_model.image_size=32", "old_model.channels=3"],
     "old_model.factory is required for old_model.kind=python"),
    (["old_model.kind=embeddings"], "old_model.path is required for old_model.kind=embeddings"),
    (["old_model.kind=onnx"], "old_model.kind must be one of none, torchscript, torchvision, python, module, embeddings"),
    (["old_model.kind=embeddings", "old_model.path=e.parquet", "old_model.layer=fc"],
     r"old_model.layer is not read by old_model.kind=embeddings \(only by torchvision\)"),
    (["old_model.path=m.pt"], "old_model.path is not read by old_model.kind=none"),
    (["old_model.kind=python", "old_model.factory=service.make", "old_model.image_size=32", "old_model.channels=3"],
     "old_model.factory must look like package.module:callable"),
    (["old_model.kind=torchscript", "old_model.path=m.pt", "old_model.image_size=32", "old_model.channels=3",
      "old_model.mean=[0.4, 0.5]"], r"old_model.mean must have 1 or 3 \(old_model.channels\) values"),
    (["old_model.kind=torchscript", "old_model.path=m.pt", "old_model.image_size=32", "old_model.channels=2"],
     "old_model.channels must be 1 or 3"),
    (["old_model.kind=python", "old_model.factory=a:b", "old_model.image_size=32", "old_model.channels=3",
      "old_model.kwargs=[1]"], "old_model.kwargs must be a mapping"),
    (["old_model.weight=w.pt"], r"unknown config key old_model.weight; valid keys in old_model: .*weights"),
])
def test_old_model_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_old_model_config_from_yaml_and_the_default(tmp_path):
    assert load_config(None).old_model.kind == "none"  # the run trains its own phi_1
    path = tmp_path / "c.yaml"
    path.write_text("old_model:\n  kind: torchvision\n  architecture: resnet50\n  weights: w.pt\n  image_size: 224\n"
                    "  channels: 3\n  mean: [0.485, 0.456, 0.406]\n  std: [0.229, 0.224, 0.225]\n")
    config = load_config(path).old_model
    assert config.architecture == "resnet50" and config.std == [0.229, 0.224, 0.225] and config.layer is None
    with pytest.raises(InputError, match="old_model.kind='none' has no model to load"):
        load_old_model(load_config(None).old_model)
