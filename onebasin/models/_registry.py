"""The model registry (timm style): `register_model` adds a factory under its name; `onebasin.models`
re-exports these functions and imports the model files, which register themselves."""

from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from ..errors import InvalidOptionError


@dataclass(frozen=True)
class ModelInfo:
    """A registry entry: the factory and what input it expects."""

    name: str
    fn: Callable[..., nn.Module]
    flat_input: bool  # True: takes in_features (C*H*W), e.g. the MLP; False: takes in_channels
    image_size: int | None  # the input height/width the model needs; None: any size (>= 8 or so)
    default_dataset: str  # the dataset the paper trains it on (for tests and defaults)
    tokens: bool = False  # True: takes (N, T) token ids and vocab_size/block_size (the GPT), not images
    recipe: str = "resnet20"  # the train.RECIPES entry it trains with by default
    demo: dict | None = None  # `onebasin demo`'s own Experiment fields for it (None: the MLP demo's); epochs: the recipe's


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(fn=None, *, flat_input=False, image_size=None, default_dataset="cifar10", tokens=False, recipe="resnet20",
                   demo=None):
    """Register `fn` under its own name; usable bare (`@register_model`) or with metadata (`ModelInfo`'s fields:
    its input, default dataset, training recipe and demo preset)."""

    def add(f):
        if f.__name__ in _REGISTRY:
            raise ValueError(f"model {f.__name__!r} is already registered")
        _REGISTRY[f.__name__] = ModelInfo(f.__name__, f, flat_input, image_size, default_dataset, tokens, recipe, demo)
        return f

    return add(fn) if fn is not None else add


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered models matching the glob `pattern`."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def model_info(name: str) -> ModelInfo:
    """The registry entry of `name`; ValueError listing the valid names when unknown."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model `name` with its options, e.g. `create_model("mlp", width=128)`."""
    return model_info(name).fn(**kwargs)


def build_model(name: str, **kwargs) -> nn.Module:
    """A registered model by name, or a user's own from "package.module:factory" (an importable callable
    returning an nn.Module, called with `kwargs`). ValueError when the name or factory cannot be found."""
    if ":" not in name:
        return create_model(name, **kwargs)
    module, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import model factory {name!r}: {err}") from err
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {name!r} returned {type(model).__name__}, not an nn.Module")
    return model


def input_kwargs(name: str, channels: int, image_size: int, num_classes: int) -> dict:
    """The input/output keyword arguments that fit model `name` to a dataset of C x H x W images."""
    info = model_info(name)
    if info.flat_input:
        return {"in_features": channels * image_size * image_size, "num_classes": num_classes}
    return {"in_channels": channels, "num_classes": num_classes}


def data_kwargs(name: str, info) -> dict:
    """The input/output keyword arguments that fit model `name` to the dataset `info` (`data.dataset_info`):
    `input_kwargs` for image data; vocab_size and block_size (the sequence length) for a model of token ids
    on text. InvalidOptionError when one is text and the other is not."""
    text = hasattr(info, "vocab")  # a data.TextInfo
    if model_info(name).tokens != text:
        raise InvalidOptionError(f"model {name!r} takes {'token ids' if model_info(name).tokens else 'images'}, but "
                                 f"dataset {info.name!r} is {'text' if text else 'images'}")
    if text:
        return {"vocab_size": info.vocab_size, "block_size": info.seq_len}
    size = model_info(name).image_size or info.image_size
    return input_kwargs(name, info.channels, size, info.num_classes)
