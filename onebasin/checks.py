"""Input validation shared by every entry point: same architecture and dtype, finite weights, an example
input that fits the model (checked by one plain forward before anything is traced)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn

from .errors import (ArchitectureMismatchError, DatasetMismatchError, EmptyDataError, InputMismatchError,
                     InvalidOptionError, InvalidWeightsError)

StateDict = dict[str, torch.Tensor]
Example = torch.Tensor | tuple | dict  # a model's input: x, positional inputs, or keyword inputs


def check_same_architecture(sd_a: StateDict, sd_b: StateDict, names: tuple[str, str] = ("A", "B")) -> None:
    """Raise ArchitectureMismatchError listing every key or shape that differs between two state_dicts."""
    problems = [f"key {k!r} only in {names[0]}" for k in sd_a if k not in sd_b]
    problems += [f"key {k!r} only in {names[1]}" for k in sd_b if k not in sd_a]
    problems += [
        f"{k!r}: shape {tuple(sd_a[k].shape)} in {names[0]} vs {tuple(sd_b[k].shape)} in {names[1]}"
        for k in sd_a
        if k in sd_b and sd_a[k].shape != sd_b[k].shape
    ]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ArchitectureMismatchError(
            f"models {names[0]} and {names[1]} have different architectures ({len(problems)} differences):\n  {shown}{more}"
        )


def check_same_dtype(sd_a: StateDict, sd_b: StateDict, names: tuple[str, str] = ("A", "B")) -> None:
    """Raise ArchitectureMismatchError naming the floating tensors whose dtype differs between two state_dicts."""
    bad = [k for k in sd_a if k in sd_b and sd_a[k].is_floating_point() and sd_a[k].dtype != sd_b[k].dtype]
    if bad:
        k = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise ArchitectureMismatchError(
            f"models {names[0]} and {names[1]} have different dtypes: {k!r} is {_dtype(sd_a[k])} in {names[0]}, "
            f"{_dtype(sd_b[k])} in {names[1]}{more}; convert one, e.g. model_b.to({_dtype(sd_a[k])})")


def check_same_dataset(meta_a: dict, meta_b: dict, names: tuple[str, str] = ("A", "B")) -> None:
    """Raise DatasetMismatchError when two checkpoints' metadata record different "dataset"s (unrecorded: no check)."""
    da, db = meta_a.get("dataset"), meta_b.get("dataset")
    if da is not None and db is not None and str(da).lower() != str(db).lower():
        raise DatasetMismatchError(f"{names[0]} was trained on {da}, {names[1]} on {db}")


def check_finite(sd: StateDict, name: str = "model") -> None:
    """Raise InvalidWeightsError naming the tensors of a state_dict that hold NaN or inf, or no values at all."""
    if meta := [k for k, v in sd.items() if v.is_meta]:
        raise InvalidWeightsError(f"{name} is on the meta device (shapes without values) in: {', '.join(meta[:3])}; "
                                  "load or materialise its weights first")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InvalidWeightsError(f"{name} has non-finite (NaN/inf) values in: {', '.join(bad[:10])}")


def check_module(model, name: str) -> None:
    """InvalidOptionError naming `name` unless `model` is an nn.Module (a state_dict is the usual mistake)."""
    if not isinstance(model, nn.Module):
        raise InvalidOptionError(f"{name} is a {type(model).__name__}, not an nn.Module "
                                 "(load a state_dict into its model first, e.g. with onebasin.load_any)")


def check_max_examples(max_examples) -> None:
    """InvalidOptionError unless `max_examples` is None (all) or an integer >= 1."""
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1):
        raise InvalidOptionError(f"max_examples must be an integer >= 1 (or None: all), got {max_examples!r}")


def check_models(models, what: str = "merge_many") -> list[nn.Module]:
    """`models` as a list: >= 2 nn.Modules of one architecture and dtype with finite weights, else the
    OnebasinError naming the first bad one by position (models[i] / model i) and the cause."""
    try:
        models = list(models)
    except TypeError:
        raise InvalidOptionError(f"{what} needs a list of models, got a {type(models).__name__}") from None
    if len(models) < 2:
        raise InvalidOptionError(f"{what} needs at least 2 models, got {len(models)}")
    for i, m in enumerate(models):
        check_module(m, f"{what}: models[{i}]")
    sds = [m.state_dict() for m in models]
    for i, sd in enumerate(sds):
        check_finite(sd, f"model {i}")
        if i:
            check_same_architecture(sds[0], sd, ("model 0", f"model {i}"))
            check_same_dtype(sds[0], sd, ("model 0", f"model {i}"))
    return models


def check_weights(weights, n_models: int) -> list[float]:
    """N weights scaled to sum to 1 (None: uniform), else InvalidOptionError showing the weights as given.

    Each weight is a real number (a Python or numpy number, a 0-d tensor; not a bool or a string), finite
    and >= 0, and their sum is > 0.
    """
    if weights is None:
        return [1.0 / n_models] * n_models
    shown = _shown(weights)
    try:
        values = [_real(w) for w in weights]
    except TypeError:
        values = None
    if values is None or len(values) != n_models or not all(math.isfinite(w) and w >= 0 for w in values) or sum(values) <= 0:
        raise InvalidOptionError(f"weights must be {n_models} finite non-negative numbers with a positive sum "
                                 f"(one per model), got {shown}")
    return [w / sum(values) for w in values]


def _real(w) -> float:
    """float(w) for a real number; TypeError for a bool, a string or anything float() would not take."""
    if isinstance(w, (bool, str, bytes)):
        raise TypeError(type(w).__name__)
    try:
        return float(w)
    except (TypeError, ValueError):
        raise TypeError(type(w).__name__) from None


def _shown(weights) -> str:
    """The weights as the caller wrote them: [1, inf, 1], ['a', 1, 1], or the repr of a non-list."""
    if isinstance(weights, torch.Tensor):
        return str(weights.tolist())
    if isinstance(weights, (list, tuple)):
        return "[" + ", ".join(repr(w) if isinstance(w, str) else str(w) for w in weights) + "]"
    return repr(weights)


def first_input(data: Iterable | None, rows: int = 64, device: torch.device | str | None = None,
                name: str = "the data") -> Example:
    """The model input of the first batch of `data` (x of an (x, y, ...) batch), cut to `rows` rows.

    data: re-iterable x or (x, y, ...) batches; x a tensor, a tuple of tensors or a dict of tensors.
    Moved to `device` when given. Raises EmptyDataError naming `name` when `data` is None or yields no batch.
    """
    if data is None:
        raise EmptyDataError(f"no data given for {name}: pass an iterable of x or (x, y) batches")
    try:
        batch = next(iter(data))
    except StopIteration:
        raise EmptyDataError(f"{name} holds no batch: pass a non-empty iterable of x or (x, y) batches") from None
    x = batch[0] if isinstance(batch, (tuple, list)) else batch

    def cut(t: torch.Tensor) -> torch.Tensor:
        t = t[:rows] if t.dim() else t
        return t if device is None else t.to(device)

    return _map(x, cut)


def check_example_input(model: nn.Module, example: Example) -> None:
    """Check that `model` runs on `example`, else raise InputMismatchError naming the model class and the input.

    example: what the model is called with: a tensor x (N, ...), a tuple of tensors (positional inputs)
        or a dict of tensors (keyword inputs, e.g. a Hugging Face model's input_ids and attention_mask).
    Checks, in order: every tensor is on the model's device; floating tensors have the dtype of its
    floating parameters; the batch has >= 1 row (EmptyDataError otherwise). Then runs one forward in
    eval mode without gradients (each submodule's training flag is restored) and turns any exception
    into InputMismatchError with the first line of torch's message; nothing is printed.
    """
    tensors = [t for t in _leaves(example) if isinstance(t, torch.Tensor)]
    what = f"{type(model).__name__} cannot run on the input {describe(example)}"
    if not tensors:
        raise InputMismatchError(f"{what}: it holds no tensor")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    for t in tensors if param is not None else ():
        if t.device != param.device:
            raise InputMismatchError(f"{what}: the input is on {t.device}, the model on {param.device}")
        if t.is_floating_point() and t.dtype != param.dtype:
            raise InputMismatchError(f"{what}: the input is {_dtype(t)}, the model's parameters are {_dtype(param)} "
                                     f"(convert one, e.g. x.to({_dtype(param)}) or model.to({_dtype(t)}))")
    if any(t.dim() and t.shape[0] == 0 for t in tensors):
        raise EmptyDataError(f"{what}: the batch has 0 rows")
    try:
        with torch.no_grad(), eval_mode(model):
            _call(model, example)
    except Exception as err:  # any failure of the user's forward is an input mismatch here
        lines = str(err).strip().splitlines()
        raise InputMismatchError(f"{what}: {type(err).__name__}: {lines[0] if lines else '(no message)'}") from err


def describe(example: Example) -> str:
    """A short description of an input for messages, e.g. 'float32 (8, 13)' or '{input_ids: int64 (2, 7)}'."""
    if isinstance(example, torch.Tensor):
        return f"{_dtype(example)} {tuple(example.shape)}"
    if isinstance(example, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in example.items()) + "}"
    if isinstance(example, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in example) + ")"
    return type(example).__name__


def _call(model: nn.Module, example: Example):
    if isinstance(example, dict):
        return model(**example)
    return model(*example) if isinstance(example, (tuple, list)) else model(example)


def _leaves(example: Example) -> Iterator:
    if isinstance(example, dict):
        yield from (leaf for v in example.values() for leaf in _leaves(v))
    elif isinstance(example, (tuple, list)):
        yield from (leaf for v in example for leaf in _leaves(v))
    else:
        yield example


def _map(example: Example, fn) -> Example:
    if isinstance(example, dict):
        return {k: _map(v, fn) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(_map(v, fn) for v in example)
    return fn(example) if isinstance(example, torch.Tensor) else example


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode for the duration, then restore every submodule's own mode."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
