"""Torch modules the project did not write, built with nothing downloaded: a torchvision classification architecture
by name (``weights=None``), a ``package.module:callable`` factory, and a local state_dict file loaded into either with
every key checked.

Two models come from outside and share these: the old model phi_old a service already runs
(``bict_ray.core.external``, the ``old_model`` section) and the backbone of the new model
(``bict_ray.core.models``, the ``model`` section). Each caller passes the config key its value came from
(``old_model.weights``, ``model.factory``, ...), so that a message names the key the user wrote. Plain torch
(torchvision imported only by the functions that need it); no Ray.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bict_ray.errors import InputError

# "package.module:attribute", the attribute possibly dotted (a class's factory method)
FACTORY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

# Where torchvision's classification models keep their head: ResNets, RegNets, Inception (fc); DenseNets, VGGs,
# MobileNets, EfficientNets, ConvNeXts (classifier); ViTs (heads); Swin (head). The features a model classifies by,
# the embedding a service retrieves with, are what the final Linear of it sees.
HEAD_NAMES = ("fc", "classifier", "heads", "head")

# Rows of the probe batch that finds a model's output dim: two, so that an output mixing the rows (a view(1, -1) gives
# (1, N * D)) shows, which one row would hide
PROBE_ROWS = 2


def torchvision_architectures() -> list[str]:
    """The names ``torchvision.models.get_model`` builds a classification model for (resnet18, mobilenet_v3_small,
    ...), sorted; not the detection, segmentation or video models."""
    import torchvision  # imported here: only the models from outside need it

    return torchvision.models.list_models(module=torchvision.models)


def read_state_dict(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """A local state_dict file, read with ``torch.load(..., weights_only=True)`` (no code from the file runs).
    Raises InputError, the message starting ``{what} '{path}'``, for a missing, unreadable or non-state_dict file."""
    if not os.path.isfile(path):
        raise InputError(f"{what} {os.fspath(path)!r} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for unreadable or unsafe pickles
        raise InputError(f"{what} {os.fspath(path)!r} is not a readable state_dict: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{what} {os.fspath(path)!r} does not hold a state_dict of tensors")
    return state


def load_state(module: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike, key: str,
               what: str) -> None:
    """Load ``state`` (read from ``path``, the value of config key ``key``) into ``module``, every key matching.

    Raises InputError naming the file, ``what`` it was loaded into and the missing and unexpected keys, or the
    tensors of the wrong shape: a file that half fits is a file for another model, never a partial initialisation.
    """
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a key of the right name but the wrong shape
        raise InputError(f"{key} {os.fspath(path)!r} does not match {what}: {exc}") from exc
    problems = [f"{len(keys)} {kind} key(s) {some(keys)}" for kind, keys in
                (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
    if problems:
        raise InputError(f"{key} {os.fspath(path)!r} does not match {what}: {'; '.join(problems)}")


def call_factory(factory: str, kwargs: dict[str, Any], section: str) -> nn.Module:
    """``factory`` ("package.module:callable", imported from ``sys.path``) called with ``kwargs``: the module it
    returns. ``section`` is the config section both came from (``old_model``, ``model``), for the messages: a module
    that cannot be imported, a missing attribute, a call that raises or a result that is no ``nn.Module``."""
    key = f"{section}.factory"
    module_name, _, attribute = factory.partition(":")
    try:
        target = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while it is imported
        raise InputError(f"{key} {factory!r}: cannot import {module_name!r} ({type(exc).__name__}: "
                         f"{first_line(exc)}); is its folder on PYTHONPATH?") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise InputError(f"{key} {factory!r}: {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise InputError(f"{key} {factory!r} is a {type(target).__name__}, not a callable")
    try:
        model = target(**kwargs)
    except Exception as exc:  # the factory is the user's code: whatever it raises, name the call
        raise InputError(f"{key} {factory!r} failed with {section}.kwargs {kwargs} ({type(exc).__name__}: "
                         f"{first_line(exc)})") from exc
    if not isinstance(model, nn.Module):
        raise InputError(f"{key} {factory!r} returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


def final_linear(model: nn.Module) -> tuple[str, nn.Module, str, nn.Linear] | None:
    """The last layer of the model's head (``HEAD_NAMES``) if it is a Linear: (its state_dict prefix, e.g.
    ``classifier.3``, its parent, its attribute name there, the Linear); None otherwise (SqueezeNet's head ends in a
    convolution)."""
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return name, model, name, head
        if isinstance(head, nn.Sequential):
            last, module = list(head.named_children())[-1] if len(head) else ("", None)
            return (f"{name}.{last}", head, last, module) if isinstance(module, nn.Linear) else None
    return None


def some(keys: Sequence[str], shown: int = 8) -> str:
    """The first ``shown`` of ``keys``, comma-separated, with ", ..." when there are more."""
    return ", ".join(list(keys)[:shown]) + (", ..." if len(keys) > shown else "")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (a foreign module's may run to a traceback), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
