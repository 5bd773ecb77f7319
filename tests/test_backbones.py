"""A new model's backbone from outside: any torchvision classification architecture (``model.backbone:
torchvision:<architecture>``) or a python factory (``model.backbone: python`` with ``model.factory`` and
``model.kwargs``), initialised from a local weights file, rebuilt from its spec alone, and every bad input refused by
the key or file it came from.

Small and fast: mobilenet_v3_small on 32x32 images, a factory module of a few lines written under tmp_path. No Ray.
"""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

from bict_ray.config import ConfigError, load_config
from bict_ray.core.models import EmbeddingNet, build_backbone
from bict_ray.errors import InputError

from conftest import user_module

ARCHITECTURE = "mobilenet_v3_small"
BACKBONE = f"torchvision:{ARCHITECTURE}"
SIZE = 32  # the project's images here: (N, C, 32, 32) floats in [-1, 1]


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """BatchNorm running statistics away from their defaults, so that a file whose statistics were lost, or a probe
    pass that moved them, shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


def pretrained(seed: int = 0) -> torchvision.models.MobileNetV3:
    """A user's pretrained mobilenet_v3_small: seeded weights, its 1000-class head included."""
    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v3_small(weights=None)
    randomise_batchnorm(model, seed)
    return model.eval()


def penultimate(model: torchvision.models.MobileNetV3, x: torch.Tensor) -> torch.Tensor:
    """What the final Linear of the model's head sees: torchvision's forward up to ``classifier[-1]``."""
    with torch.no_grad():
        return model.classifier[:-1](torch.flatten(model.avgpool(model.features(x)), 1))


def images(channels: int = 3, n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def weights(tmp_path):
    """The pretrained model's state_dict in a local file, as a user brings it, and the model."""
    model = pretrained()
    path = tmp_path / "mobilenet.pt"
    torch.save(model.state_dict(), path)
    return path, model


# --- torchvision ---------------------------------------------------------------------------------------------------


def test_a_torchvision_backbone_from_a_local_file_gives_that_models_penultimate_features(weights):
    path, model = weights
    backbone, dim = build_backbone(BACKBONE, 3, SIZE, weights=path)
    assert dim == 1024  # the input of mobilenet_v3_small's classifier.3, found by the probe
    x = images()
    torch.testing.assert_close(backbone.eval()(x), penultimate(model, x), rtol=0, atol=0)
    untrained, _ = build_backbone(BACKBONE, 3, SIZE)  # without the file: torchvision's random init, not the file's
    assert not torch.allclose(untrained.eval()(x), penultimate(model, x), atol=1e-3)


def test_the_file_may_hold_the_head_or_not_and_the_probe_moves_nothing(weights, tmp_path):
    path, model = weights
    headless = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.3.")}
    torch.save(headless, tmp_path / "headless.pt")
    backbone, _ = build_backbone(BACKBONE, 3, SIZE, weights=tmp_path / "headless.pt")
    # the probe ran in eval mode: the BatchNorm statistics are the file's, and the backbone is back in train mode
    assert backbone.training
    loaded = backbone.net.state_dict()
    assert sorted(loaded) == sorted(headless)
    assert all(torch.equal(loaded[k], v) for k, v in headless.items())


def test_gray_images_reach_a_three_channel_architecture_as_three_equal_channels(weights):
    path, model = weights
    backbone, dim = build_backbone(BACKBONE, 1, SIZE, weights=path)
    gray = images(channels=1)
    assert dim == 1024
    torch.testing.assert_close(backbone.eval()(gray), penultimate(model, gray.expand(-1, 3, -1, -1)), rtol=0, atol=0)
    assert backbone.train()(gray).shape == (4, 1024)  # and it trains on them


def test_an_embedding_net_round_trips_through_its_spec_without_the_weights_file(weights):
    path, _ = weights
    torch.manual_seed(0)
    net = EmbeddingNet(BACKBONE, in_channels=1, image_size=SIZE, embedding_dim=8, num_classes=5,
                       backbone_weights=path)
    randomise_batchnorm(net.head, seed=3)
    spec = json.loads(json.dumps(net.spec))  # as the model card stores it
    assert spec == {"backbone": BACKBONE, "in_channels": 1, "image_size": SIZE, "embedding_dim": 8,
                    "num_classes": 5, "classifier": "cosine", "scale": 16.0}
    state = net.state_dict()
    path.unlink()  # the weights only initialise: a worker rebuilds the model from the spec and the state_dict alone
    torch.manual_seed(1)  # another process's random init, which the state_dict overwrites
    restored = EmbeddingNet.from_spec(spec)
    restored.load_state_dict(state)
    x = images(channels=1)
    for got, want in zip(restored.eval()(x), net.eval()(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_projects_own_backbones_keep_their_spec():
    # the spec a saved small_cnn/resnet model holds: its card still loads, and a new one is written the same
    assert EmbeddingNet(embedding_dim=4, num_classes=3).spec == {
        "backbone": "small_cnn", "in_channels": 1, "image_size": 28, "embedding_dim": 4, "num_classes": 3,
        "classifier": "cosine", "scale": 16.0}


def test_torchvision_errors_name_the_key_the_file_and_the_keys(weights, tmp_path):
    path, model = weights
    with pytest.raises(InputError, match=r"model.backbone 'torchvision:resnet19': 'resnet19' is not a torchvision "
                                         r"classification model; valid names: .*mobilenet_v3_small, "):
        build_backbone("torchvision:resnet19", 3, SIZE)
    with pytest.raises(InputError, match=r"'torchvision:squeezenet1_0': the head of torchvision 'squeezenet1_0' "
                                         r"ends in no Linear layer"):
        build_backbone("torchvision:squeezenet1_0", 3, SIZE)
    with pytest.raises(InputError, match=r"model.backbone 'torchvision:mobilenet_v3_small' takes 1- or 3-channel "
                                         r"images, got 2"):
        build_backbone(BACKBONE, 2, SIZE)
    state = model.state_dict()
    del state["features.0.0.weight"]
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(InputError, match=r"model.weights '.*wrong\.pt' does not match torchvision "
                                         r"'mobilenet_v3_small': 1 missing key\(s\) features\.0\.0\.weight; "
                                         r"1 unexpected key\(s\) extra\.weight$"):
        build_backbone(BACKBONE, 3, SIZE, weights=tmp_path / "wrong.pt")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pt")
    with pytest.raises(InputError, match=r"model.weights '.*resnet18\.pt' does not match torchvision "
                                         r"'mobilenet_v3_small': .*missing key\(s\) .*unexpected key\(s\) conv1"):
        build_backbone(BACKBONE, 3, SIZE, weights=tmp_path / "resnet18.pt")
    with pytest.raises(InputError, match=r"model.weights '.*none\.pt' not found"):
        build_backbone(BACKBONE, 3, SIZE, weights=tmp_path / "none.pt")


# --- a python factory ----------------------------------------------------------------------------------------------


FACTORY_MODULE = '''
import torch
from torch import nn


class Tiny(nn.Module):
    """conv-BN-ReLU, global average pool: (N, C, H, W) -> (N, width)."""

    def __init__(self, in_channels, width):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width)

    def forward(self, x):
        return self.norm(self.conv(x)).relu().mean(dim=(2, 3))


class TupleWhenTraining(Tiny):
    def forward(self, x):
        out = super().forward(x)
        return (out, out) if self.training else out


def make(in_channels=1, width=4):
    return Tiny(in_channels, width)


def tuple_when_training():
    return TupleWhenTraining(1, 4)


def no_features():
    return nn.Identity()


def flat_only():
    return nn.Linear(4, 4)


def not_a_module():
    return 42
'''


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    return user_module(tmp_path, monkeypatch, "user_nets_", FACTORY_MODULE)


def test_a_python_factory_with_kwargs_and_weights(factory_module, tmp_path):
    import importlib

    factory = f"{factory_module}:make"
    backbone, dim = build_backbone("python", 1, SIZE, factory=factory, kwargs={"width": 6})
    assert dim == 6  # kwargs reached the factory, and the probe found its output dim
    trained = importlib.import_module(factory_module).make(width=6)
    torch.manual_seed(5)
    nn.init.normal_(trained.conv.weight)
    randomise_batchnorm(trained, seed=5)
    torch.save(trained.state_dict(), tmp_path / "nets.pt")
    loaded, _ = build_backbone("python", 1, SIZE, weights=tmp_path / "nets.pt", factory=factory,
                               kwargs={"width": 6})
    gray = images(channels=1)
    torch.testing.assert_close(loaded.eval()(gray), trained.eval()(gray), rtol=0, atol=0)
    assert not torch.allclose(backbone.eval()(gray), trained(gray), atol=1e-3)


def test_a_factory_embedding_net_rebuilds_from_its_spec(factory_module):
    torch.manual_seed(0)
    net = EmbeddingNet("python", in_channels=3, image_size=SIZE, embedding_dim=4, num_classes=3,
                       factory=f"{factory_module}:make", kwargs={"in_channels": 3, "width": 5})
    randomise_batchnorm(net)
    spec = json.loads(json.dumps(net.spec))
    assert spec["factory"] == f"{factory_module}:make" and spec["kwargs"] == {"in_channels": 3, "width": 5}
    restored = EmbeddingNet.from_spec(spec)
    restored.load_state_dict(net.state_dict())
    x = images()
    for got, want in zip(restored.eval()(x), net.eval()(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_factory_errors_name_the_factory_and_the_probe(factory_module, tmp_path):
    def build(attribute, **keys):
        return build_backbone("python", 1, SIZE, factory=f"{factory_module}:{attribute}", **keys)

    with pytest.raises(InputError, match=rf"model.factory '{factory_module}:not_a_module' returned a int, "
                                         "expected a torch.nn.Module"):
        build("not_a_module")
    with pytest.raises(InputError, match=r"model.factory 'no_such_nets.model:make': cannot import "
                                         r"'no_such_nets.model' \(ModuleNotFoundError"):
        build_backbone("python", 1, SIZE, factory="no_such_nets.model:make")
    with pytest.raises(InputError, match=r"failed with model.kwargs \{'depth': 2\} \(TypeError"):
        build("make", kwargs={"depth": 2})
    with pytest.raises(InputError, match=rf"model.factory '{factory_module}:no_features': output of shape "
                                         r"\(2, 1, 32, 32\) for 2 images, expected \(2, F\)"):
        build("no_features")
    with pytest.raises(InputError, match=r"the forward pass on a probe batch of shape \(2, 1, 32, 32\) failed "
                                         r"\(RuntimeError: .*\); check data.image_size, data.channels and "
                                         r"model.kwargs"):
        build("flat_only")
    backbone, _ = build("tuple_when_training")  # the eval-mode probe passes; training does not
    with pytest.raises(InputError, match=r"returns tuple in train mode, expected one \(N, F\) tensor"):
        backbone.train()(images(channels=1))
    torch.save({"head.weight": torch.zeros(4, 4)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match=rf"model.weights '.*other\.pt' does not match model.factory "
                                         rf"'{factory_module}:make': 6 missing key\(s\) conv.weight, .*; 1 unexpected "
                                         r"key\(s\) head.weight"):
        build("make", weights=tmp_path / "other.pt")


# --- the config ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["model.backbone=torchvision:resnet19"],
     r"model.backbone 'torchvision:resnet19': 'resnet19' is not a torchvision classification model; valid names: "
     r".*resnet18, "),
    (["model.backbone=vgg"], r"model.backbone must be one of small_cnn, resnet18, resnet50, "
                             r"torchvision:<architecture> or python, got 'vgg'"),
    (["model.backbone=python"], "model.factory is required for model.backbone: python"),
    (["model.backbone=python", "model.factory=nets.make"],
     "model.factory must look like package.module:callable, got 'nets.make'"),
    (["model.factory=nets:make"], r"model.factory is read only by model.backbone: python \(got model.backbone "
                                  r"'small_cnn'\)"),
    (["model.kwargs={width: 8}"], "model.kwargs are model.factory's arguments, read only by model.backbone: python"),
    (["model.backbone=python", "model.factory=nets:make", "model.kwargs=[1]"], "model.kwargs must be a mapping"),
    (["model.backbone=python", "model.factory=nets:make", "model.kwargs={since: 2024-01-01}"],
     "model.kwargs must be plain YAML/JSON values, recorded in the model card"),
])
def test_model_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_backbone_from_outside_in_a_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  backbone: {BACKBONE}\n  weights: /models/mobilenet.pt\n  embedding_dim: 64\n")
    model = load_config(path).model
    assert model.backbone == BACKBONE and model.weights == "/models/mobilenet.pt" and model.kwargs == {}
    path.write_text("model:\n  backbone: python\n  factory: acme.nets:build\n  kwargs: {width: 64, depth: [2, 2]}\n")
    model = load_config(path).model
    assert model.factory == "acme.nets:build" and model.kwargs == {"width": 64, "depth": [2, 2]}
