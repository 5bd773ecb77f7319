"""Models of a BiCT upgrade: the embedding network phi_t and the upgrade transform psi_{t->t+1}.

Both are rebuilt from a plain JSON-able ``spec`` dict (what a model card stores) plus a state_dict loaded with
``torch.load(..., weights_only=True)``. Plain torch; no Ray.

Class indices are *global* dataset labels: every phi_t has ``num_classes`` = all classes of the dataset, even when
it trains on a subset, so the new model's backward-compatible loss can index the old classifier with the same
labels. The losses keep the rows of classes a model does not train on out of its softmax
(``bict_ray.core.losses.masked_cross_entropy``): those rows get exactly zero gradient from the loss.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bict_ray.core.foreign import (FACTORY_RE, PROBE_ROWS, call_factory, final_linear, first_line, load_state,
                                   read_state_dict, torchvision_architectures)
from bict_ray.errors import InputError

CLASSIFIERS = ("cosine", "linear")

# ResNets on images this small lose too much resolution to the 7x7/2 stem and the max-pool (CIFAR practice).
SMALL_IMAGE_MAX_SIZE = 64

# model.backbone besides the names of BACKBONES: "torchvision:<architecture>", any torchvision classification model,
# and "python", the module model.factory returns (docs/EXTENDING.md, "A backbone from outside")
TORCHVISION_BACKBONE = "torchvision:"
FACTORY_BACKBONE = "python"


def build_backbone(name: str, in_channels: int, image_size: int, weights: str | os.PathLike | None = None,
                   factory: str | None = None, kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, int]:
    """Build a feature extractor mapping (N, in_channels, H, W) float to (N, F) features; return it and F.

    - ``small_cnn``: a stride-2 conv stem (32 channels), conv-BN-ReLU blocks of 64, 128, 128 channels with a
      2x2 max-pool after the first, global average pool; F = 128, about 240k parameters. Made for 28x28
      grayscale (the last convs run at 7x7, so they add capacity at little cost); works for any size >= 4 px.
    - ``resnet18`` (F = 512) / ``resnet50`` (F = 2048): torchvision, random init, ``fc`` replaced by Identity.
      For ``image_size <= 64`` the stem is a 3x3 stride-1 conv and the max-pool is dropped (CIFAR ResNets);
      otherwise conv1 is replaced only when ``in_channels != 3``.
    - ``torchvision:<architecture>``: any torchvision classification model exactly as torchvision builds it
      (``weights=None``, nothing downloaded), the final Linear of its head replaced by Identity; gray images are
      given to it as three equal channels (``ForeignBackbone``).
    - ``python``: the module ``factory`` ("package.module:callable") returns when called with ``kwargs``; it takes
      the images as they are.

    F of the last two is found by one forward pass on a probe batch of the configured shape, which also refuses a
    model that cannot take that shape or does not return (N, F) features.

    ``weights``: a local state_dict file (``model.weights``) for the backbone, read with
    ``torch.load(..., weights_only=True)``. The keys of the head the backbone drops are ignored (``fc.*`` for the
    first three, the final Linear's for a torchvision model); any other key missing, unexpected or of the wrong
    shape raises InputError naming the file and the keys.
    """
    problem = backbone_problem(name, factory, kwargs)
    if problem:
        raise InputError(problem)
    if in_channels < 1:
        raise InputError(f"in_channels must be >= 1, got {in_channels}")
    if image_size < 4:
        raise InputError(f"image_size must be >= 4 pixels, got {image_size}")
    if name in BACKBONES:
        backbone, feature_dim = BACKBONES[name](in_channels, image_size)
        if weights is not None:
            _load_backbone_weights(backbone, weights, "fc", f"backbone {name!r}")
        return backbone, feature_dim
    if name == FACTORY_BACKBONE:
        what = f"model.factory {factory!r}"
        net, head = call_factory(factory, dict(kwargs or {}), "model"), None  # its module is all backbone
        backbone = ForeignBackbone(net, what, gray_to_rgb=False)
    else:
        architecture = name[len(TORCHVISION_BACKBONE):]
        if in_channels not in (1, 3):
            raise InputError(f"model.backbone {name!r} takes 1- or 3-channel images, got {in_channels} channels")
        net, head = _torchvision_net(architecture)
        what = f"torchvision {architecture!r}"
        backbone = ForeignBackbone(net, f"model.backbone {name!r}", gray_to_rgb=in_channels == 1)
    if weights is not None:
        # into the bare net, before the wrapper: the file holds the keys torchvision or the factory gave it
        _load_backbone_weights(net, weights, head, what)
    return backbone, _probe_feature_dim(backbone, in_channels, image_size, factory is not None)


def backbone_problem(backbone: str, factory: str | None = None, kwargs: dict[str, Any] | None = None) -> str | None:
    """What is wrong with this choice of backbone, in a sentence naming the config key (``model.backbone``,
    ``model.factory``, ``model.kwargs``); None when nothing is. A torchvision architecture is checked against
    torchvision's list, which imports torchvision; a factory only by its form (importing it is the build's)."""
    if kwargs is not None and (not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs)):
        return f"model.kwargs must be a mapping of argument names to values, got {kwargs!r}"
    if backbone == FACTORY_BACKBONE:
        if not factory:
            return f"model.factory is required for model.backbone: {FACTORY_BACKBONE}"
        if not isinstance(factory, str) or not FACTORY_RE.match(factory):
            return f"model.factory must look like package.module:callable, got {factory!r}"
        try:
            json.dumps(kwargs or {}, allow_nan=False)
        except (TypeError, ValueError) as exc:
            # the spec (the model card) records them: every process that rebuilds the model calls the factory so
            return f"model.kwargs must be plain YAML/JSON values, recorded in the model card: {exc}"
        return None
    if factory is not None:
        return f"model.factory is read only by model.backbone: {FACTORY_BACKBONE} (got model.backbone {backbone!r})"
    if kwargs:
        return f"model.kwargs are model.factory's arguments, read only by model.backbone: {FACTORY_BACKBONE}"
    if isinstance(backbone, str) and backbone.startswith(TORCHVISION_BACKBONE):
        architecture, names = backbone[len(TORCHVISION_BACKBONE):], torchvision_architectures()
        if architecture not in names:
            return (f"model.backbone {backbone!r}: {architecture!r} is not a torchvision classification model; "
                    f"valid names: {', '.join(names)}")
        return None
    if backbone not in BACKBONES:
        return (f"model.backbone must be one of {', '.join(BACKBONES)}, {TORCHVISION_BACKBONE}<architecture> or "
                f"{FACTORY_BACKBONE}, got {backbone!r}")
    return None


def backbone_spec(backbone: str, factory: str | None = None, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keys of an ``EmbeddingNet`` spec that rebuild its backbone in another process (a Ray worker, a later
    load): ``backbone``, and for a factory ``factory`` and ``kwargs`` as JSON stores them. Never a weights file:
    it only initialises, and a trained model's state_dict holds the backbone. Raises InputError for a choice
    ``backbone_problem`` refuses."""
    problem = backbone_problem(backbone, factory, kwargs)
    if problem:
        raise InputError(problem)
    if backbone != FACTORY_BACKBONE:
        return {"backbone": backbone}  # what every spec held before factories: saved models keep loading
    # through JSON: a tuple becomes the list that a spec read back from the card holds, so every process calls the
    # factory with the same values
    return {"backbone": backbone, "factory": factory, "kwargs": json.loads(json.dumps(kwargs or {}))}


def classifier_logits(kind: str, weight: torch.Tensor, features: torch.Tensor, scale: float) -> torch.Tensor:
    """Logits (N, C) of classifier ``weight`` (C, D) on ``features`` (N, D).

    ``cosine``: ``scale * normalize(features) @ normalize(weight).T`` (NormFace/CosFace, no margin).
    ``linear``: ``features @ weight.T``, bias-free; ``scale`` is ignored.
    Functional so that a loss can apply a frozen old weight matrix to new features.
    """
    if weight.dim() != 2 or features.dim() != 2:
        raise InputError(f"classifier weight must be (C, D) and features (N, D), got shapes "
                         f"{tuple(weight.shape)} and {tuple(features.shape)}")
    if weight.shape[1] != features.shape[1]:
        raise InputError(f"feature dim {features.shape[1]} does not match classifier dim {weight.shape[1]}")
    if kind == "cosine":
        return scale * F.normalize(features, dim=1) @ F.normalize(weight, dim=1).T
    if kind == "linear":
        return features @ weight.T
    raise InputError(f"unknown classifier {kind!r}; valid kinds: {', '.join(CLASSIFIERS)}")


class CosineClassifier(nn.Module):
    """Cosine classifier: logits = scale * cos(x, w_c). ``.weight`` is (C, D)."""

    kind = "cosine"

    def __init__(self, dim: int, num_classes: int, scale: float = 16.0):
        super().__init__()
        if scale <= 0:
            raise InputError(f"cosine classifier scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.weight = _classifier_weight(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return classifier_logits(self.kind, self.weight, x, self.scale)


class LinearClassifier(nn.Module):
    """Bias-free linear classifier: logits = x @ W.T. ``.weight`` is (C, D); ``.scale`` is 1 and unused."""

    kind = "linear"
    scale = 1.0

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.weight = _classifier_weight(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return classifier_logits(self.kind, self.weight, x, self.scale)


class EmbeddingNet(nn.Module):
    """phi_t: backbone -> linear embedding head (F -> D, then BatchNorm1d) -> classifier omega_t over all classes.

    ``forward(x)`` returns ``(features, logits)``: (N, D) un-normalised and (N, C). ``embed(x)`` returns the
    (N, D) float32 L2-normalised embedding that a gallery stores (call it in eval mode).
    ``backbone`` (with ``factory`` and ``kwargs`` for ``python``) is as ``build_backbone`` takes it.
    ``backbone_weights`` initialises the backbone from a local file; it is not part of the spec, because a
    trained model's state_dict already holds the backbone.
    """

    def __init__(self, backbone: str = "small_cnn", in_channels: int = 1, image_size: int = 28,
                 embedding_dim: int = 128, num_classes: int = 10, classifier: str = "cosine",
                 scale: float = 16.0, factory: str | None = None, kwargs: dict[str, Any] | None = None,
                 backbone_weights: str | os.PathLike | None = None):
        super().__init__()
        if embedding_dim < 1:
            raise InputError(f"embedding_dim must be >= 1, got {embedding_dim}")
        if num_classes < 1:
            raise InputError(f"num_classes must be >= 1, got {num_classes}")
        if classifier not in CLASSIFIERS:
            raise InputError(f"unknown classifier {classifier!r}; valid kinds: {', '.join(CLASSIFIERS)}")
        self.spec = {**backbone_spec(backbone, factory, kwargs), "in_channels": int(in_channels),
                     "image_size": int(image_size), "embedding_dim": int(embedding_dim),
                     "num_classes": int(num_classes), "classifier": classifier, "scale": float(scale)}
        self.backbone, feature_dim = build_backbone(backbone, in_channels, image_size, backbone_weights,
                                                    self.spec.get("factory"), self.spec.get("kwargs"))
        self.head = nn.Sequential(nn.Linear(feature_dim, embedding_dim), nn.BatchNorm1d(embedding_dim))
        self.classifier = (CosineClassifier(embedding_dim, num_classes, scale) if classifier == "cosine"
                           else LinearClassifier(embedding_dim, num_classes))

    @classmethod
    def from_spec(cls, spec: dict[str, Any], backbone_weights: str | os.PathLike | None = None) -> EmbeddingNet:
        """Rebuild from a spec dict (keys as in ``.spec``; missing keys take the constructor defaults)."""
        _check_spec_keys("EmbeddingNet", spec, ("backbone", "factory", "kwargs", "in_channels", "image_size",
                                                "embedding_dim", "num_classes", "classifier", "scale"))
        return cls(**spec, backbone_weights=backbone_weights)

    @property
    def embedding_dim(self) -> int:
        return self.spec["embedding_dim"]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.head(self.backbone(x))
        return features, self.classifier(features)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) float32, L2-normalised: the retrieval embedding."""
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)


class UpgradeTransform(nn.Module):
    """psi_{t->t+1}: maps (N, d_in) old embeddings to (N, d_out) vectors in the new space (un-normalised).

    MLP: ``layers`` hidden blocks Linear-BatchNorm1d-ReLU of width ``hidden``, then Linear to d_out; ``layers=0`` is
    a linear map (``hidden`` unused), the form a closed-form fit produces (``bict_ray.core.closed_form``).
    When d_in == d_out it is residual, ``x + mlp(x)``, with the last Linear zero-initialised, so an untrained
    psi is exactly the identity and cannot destroy the gallery it is applied to. With d_in != d_out there is
    no identity to start from and the last layer keeps torch's default init.
    """

    def __init__(self, d_in: int, d_out: int, hidden: int = 512, layers: int = 2):
        super().__init__()
        for key, value, least in (("d_in", d_in, 1), ("d_out", d_out, 1), ("hidden", hidden, 1), ("layers", layers, 0)):
            if value < least:
                raise InputError(f"UpgradeTransform {key} must be >= {least}, got {value}")
        self.spec = {"d_in": int(d_in), "d_out": int(d_out), "hidden": int(hidden), "layers": int(layers)}
        blocks: list[nn.Module] = []
        width = d_in
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            width = hidden
        last = nn.Linear(width, d_out)
        self.residual = d_in == d_out
        if self.residual:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(*blocks, last)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> UpgradeTransform:
        """Rebuild from a spec dict (keys d_in, d_out, hidden, layers)."""
        _check_spec_keys("UpgradeTransform", spec, ("d_in", "d_out", "hidden", "layers"))
        return cls(**spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.spec["d_in"]:
            raise InputError(f"UpgradeTransform expects (N, {self.spec['d_in']}) input, got {tuple(x.shape)}")
        return x + self.mlp(x) if self.residual else self.mlp(x)

    @torch.no_grad()
    def folded(self) -> FoldedTransform:
        """This transform in eval mode, each BatchNorm folded into the Linear before it (what upgrades run)."""
        layers, modules = [], list(self.mlp)
        for i, module in enumerate(modules):
            if not isinstance(module, nn.Linear):
                continue
            weight, bias = module.weight.detach(), module.bias.detach()
            norm = modules[i + 1] if i + 1 < len(modules) else None
            if isinstance(norm, nn.BatchNorm1d):
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                weight, bias = weight * scale[:, None], (bias - norm.running_mean) * scale + norm.bias
            layers.append((weight.t().contiguous(), bias.clone(), isinstance(norm, nn.BatchNorm1d)))
        return FoldedTransform(self.spec, layers, self.residual)


class FoldedTransform:
    """psi for inference: Linear (BatchNorm folded in) + ReLU blocks, then the last Linear, plus x if residual.

    The same function as ``UpgradeTransform.eval()`` up to float rounding (BatchNorm's scale and shift applied
    to the weights once instead of to every activation): two passes over each hidden activation fewer, so a cheaper
    upgrade on the CPU (measured: BENCHMARKS.md, section "Gallery upgrade", step 1). Built by
    ``UpgradeTransform.folded``.
    """

    def __init__(self, spec: dict[str, int], layers: list[tuple[torch.Tensor, torch.Tensor, bool]], residual: bool):
        self.spec = spec
        self.layers = layers  # (weight (in, out), bias (out,), relu after)
        self.residual = residual
        self.dtype = layers[0][0].dtype if layers else torch.float32

    def to(self, dtype: torch.dtype) -> FoldedTransform:
        """The same transform computing in ``dtype`` (weights cast once); it still takes and returns float32."""
        layers = [(weight.to(dtype), bias.to(dtype), relu) for weight, bias, relu in self.layers]
        return FoldedTransform(self.spec, layers, self.residual)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.dtype)
        for weight, bias, relu in self.layers:
            h = torch.addmm(bias, h, weight)
            if relu:
                h.relu_()
        h = h.float()
        return h.add_(x) if self.residual else h


def _small_cnn(in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    # a stride-2 stem: full-resolution activations cost more in BatchNorm/ReLU memory traffic than in convs, so a
    # stride-1 first block trains markedly slower on 28x28 images (measured: BENCHMARKS.md, section "Training")
    stem = [nn.Conv2d(in_channels, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True)]
    return nn.Sequential(*stem, *block(32, 64), nn.MaxPool2d(2), *block(64, 128), *block(128, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten()), 128


def _resnet(name: str, in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    import torchvision  # imported here: only the ResNet backbones need it

    net = getattr(torchvision.models, name)(weights=None)
    if image_size <= SMALL_IMAGE_MAX_SIZE:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


# model.backbone -> builder(in_channels, image_size) -> (feature extractor, its feature dim F): the project's own
# backbones. A new one is a builder and a line here; the config checks model.backbone against these names (besides
# the torchvision: and python forms, which need no code).
BACKBONES: dict[str, Callable[[int, int], tuple[nn.Module, int]]] = {
    "small_cnn": _small_cnn,
    "resnet18": functools.partial(_resnet, "resnet18"),
    "resnet50": functools.partial(_resnet, "resnet50"),
}


class ForeignBackbone(nn.Module):
    """A backbone from outside (a torchvision model, a factory's module) as ``EmbeddingNet`` runs it: the project's
    (N, C, H, W) images in [-1, 1] -> (N, F) features, the output checked on every call.

    ``gray_to_rgb``: 1-channel images go to a 3-channel model as three equal channels. Replicating rather than
    giving the model a 1-channel first conv: the first conv of a pretrained file then loads as it was saved, and
    sees a gray image as the colour photo of a gray scene it was trained on. Summing that conv's weights over its
    input channels would compute the same function for a third of its input, but the first conv has another name in
    every architecture (conv1, features.0.0, conv_proj, ...). ``source`` names the backbone in messages.
    """

    def __init__(self, net: nn.Module, source: str, gray_to_rgb: bool):
        super().__init__()
        self.net, self.source, self.gray_to_rgb = net, source, bool(gray_to_rgb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gray_to_rgb:
            x = x.expand(-1, 3, -1, -1)
        out = self.net(x)
        # checked here, not only on the probe: some models return other things in train mode (GoogLeNet's and
        # Inception's auxiliary outputs), which the eval-mode probe cannot see
        if not isinstance(out, torch.Tensor):
            raise InputError(f"{self.source} returns {type(out).__name__} in {'train' if self.training else 'eval'} "
                             "mode, expected one (N, F) tensor of features")
        if out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise InputError(f"{self.source}: output of shape {tuple(out.shape)} for {x.shape[0]} images, expected "
                             f"({x.shape[0]}, F): one flat feature vector per image")
        return out


def _torchvision_net(architecture: str) -> tuple[nn.Module, str]:
    """torchvision's ``architecture`` with the final Linear of its head replaced by Identity, and that Linear's
    state_dict prefix (what a classification checkpoint holds that the backbone has no use for)."""
    import torchvision  # imported here: only the torchvision backbones need it

    # weights=None: nothing is downloaded; model.weights is the only way trained weights come in
    net = torchvision.models.get_model(architecture, weights=None)
    head = final_linear(net)
    if head is None:
        raise InputError(f"model.backbone '{TORCHVISION_BACKBONE}{architecture}': the head of torchvision "
                         f"{architecture!r} ends in no Linear layer to take the features before; model.backbone: "
                         f"{FACTORY_BACKBONE} with a factory that returns its feature extractor takes any model")
    prefix, parent, name, _ = head
    setattr(parent, name, nn.Identity())
    return net, prefix


def _probe_feature_dim(backbone: ForeignBackbone, in_channels: int, image_size: int, factory: bool) -> int:
    """F, from the output of one forward pass on a probe batch of the configured shape."""
    probe = torch.zeros(PROBE_ROWS, in_channels, image_size, image_size)
    training = backbone.training
    backbone.eval()  # in train mode the probe would move BatchNorm's running statistics
    try:
        with torch.no_grad():
            out = backbone(probe)
    except InputError:
        raise
    except Exception as exc:  # whatever a foreign module raises on an input it cannot take: name the input
        check = "data.image_size, data.channels" + (" and model.kwargs" if factory else "")
        raise InputError(f"{backbone.source}: the forward pass on a probe batch of shape {tuple(probe.shape)} "
                         f"failed ({type(exc).__name__}: {first_line(exc)}); check {check}") from exc
    finally:
        backbone.train(training)
    return int(out.shape[1])


def _load_backbone_weights(net: nn.Module, path: str | os.PathLike, head: str | None, what: str) -> None:
    state = read_state_dict(path, "model.weights")
    if head is not None:
        # the head the backbone replaced by Identity: a classification checkpoint carries it, and it fits nothing here
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    load_state(net, state, path, "model.weights", what)


def _classifier_weight(dim: int, num_classes: int) -> nn.Parameter:
    if dim < 1 or num_classes < 1:
        raise InputError(f"classifier needs dim >= 1 and num_classes >= 1, got {dim} and {num_classes}")
    weight = torch.empty(num_classes, dim)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's default
    return nn.Parameter(weight)


def _check_spec_keys(what: str, spec: dict[str, Any], valid: tuple[str, ...]) -> None:
    unknown = sorted(set(spec) - set(valid))
    if unknown:
        raise InputError(f"{what} spec has unknown keys {unknown}; valid keys: {', '.join(valid)}")
