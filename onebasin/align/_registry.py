"""The method registry, the result type, and small helpers every alignment method shares.

Methods are registered mergekit-style: a function `fn(spec, model_a, model_b, data=None, **options)
-> AlignResult` decorated with `@register_method(name=..., reference=...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from ..errors import OnebasinError
from ..permute import Perms, StateDict, identity_perms
from ..spec import PermutationSpec
from ..distributed import all_reduce_count  # noqa: F401  (the methods count their examples with it)


@dataclass
class AlignResult:
    """Permutations that move model B into model A's basin, and what the method did to find them.

    `perms[g]` is a LongTensor p (group size,) in the permute.py convention: unit i of the aligned B is
    unit p[i] of B, so `apply_perms(spec, perms, sd_b)` is B written in A's unit order. `record` holds
    the method's name, iterations, objective values, seconds and examples used. A method that also
    re-bases the networks beyond permutations (orthogonal) returns them as `models` = (A', B'): same
    functions as A and B, B' in A''s basis; interpolate those.
    """

    perms: Perms
    record: dict = field(default_factory=dict)
    models: tuple | None = None  # (A, B) rewritten by a method that does more than permute (orthogonal): use these
    # {group: [per site of the group: {"mean_a", "var_a", "mean_b", "var_b", "cov_ab"}]}: float64 (units,) statistics
    # of A and the ALIGNED B from the method's own pass over the data (activation matching), so that REPAIR
    # need not measure its goals again (`repair.endpoints_from_alignment`); None for other methods
    site_stats: dict | None = None
    plain_site_stats: dict | None = None  # the same for A and the UNALIGNED B (the plain interpolation's goals)
    maps: dict | None = None  # {group: float64 (n, n) orthogonal map} applied to B's canonical form before `perms`
    # (learned, orthogonal with stream="weights": each stream's map; learned with heads="orthogonal": each head group's)


@dataclass(frozen=True)
class Method:
    """A registered alignment method: call it like its function."""

    name: str
    reference: str
    fn: Callable[..., AlignResult]

    def __call__(self, spec: PermutationSpec, model_a, model_b, data=None, **options) -> AlignResult:
        return self.fn(spec, model_a, model_b, data, **options)


_METHODS: dict[str, Method] = {}


def register_method(*, name: str, reference: str):
    """Register `fn(spec, model_a, model_b, data=None, **options) -> AlignResult` under `name`."""

    def add(fn):
        if name in _METHODS:
            raise ValueError(f"alignment method {name!r} is already registered")
        _METHODS[name] = Method(name, reference, fn)
        return fn

    return add


def list_methods() -> list[str]:
    """Sorted names of the registered alignment methods."""
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """The registered method `name`; ValueError listing the valid names when unknown."""
    if name not in _METHODS:
        raise ValueError(f"unknown alignment method {name!r}; valid names: {', '.join(list_methods())}")
    return _METHODS[name]


class AlignmentError(OnebasinError):
    """An alignment could not be computed, or its result changes model B's function."""


# --- helpers ------------------------------------------------------------------------------------------


def weights_of(model: nn.Module | StateDict, params_only: bool = True) -> StateDict:
    """Floating tensors of a model (its parameters only, when `params_only`) or of a state_dict."""
    if isinstance(model, nn.Module):
        sd = model.state_dict()
        keep = dict(model.named_parameters()) if params_only else sd
        return {k: v.detach() for k, v in sd.items() if k in keep and v.is_floating_point()}
    return {k: v for k, v in model.items() if v.is_floating_point()}


def require_module(model, method: str) -> nn.Module:
    """`model` itself, or a clear error when a method that runs forward passes got a state_dict."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"method {method!r} runs the networks: pass nn.Modules, not {type(model).__name__}")
    return model


def device_of(model: nn.Module, device=None) -> torch.device:
    """`device` if given, else the device of the model's first parameter (CPU if it has none)."""
    if device is not None:
        return torch.device(device)
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def initial_perms(spec: PermutationSpec, init=None) -> Perms:
    """Identity perms, overridden by `init` (an AlignResult or a perms dict) where given."""
    perms = identity_perms(spec)
    given = init.perms if isinstance(init, AlignResult) else (init or {})
    perms.update({g: torch.as_tensor(p, dtype=torch.long).cpu() for g, p in given.items() if g in perms})
    return perms


def assign(score: torch.Tensor, maximize: bool = True) -> torch.Tensor:
    """Linear assignment on an (n, n) matrix: LongTensor p with p[i] the column given to row i (Kuhn 1955)."""
    s = score.detach().double().cpu().numpy()
    if not np.isfinite(s).all():
        raise AlignmentError("the assignment matrix holds NaN/inf (non-finite weights or activations?)")
    return torch.as_tensor(assignment(s if maximize else -s), dtype=torch.long)


def assignment(score: np.ndarray) -> np.ndarray:
    """p (n,) maximising sum_i score[i, p[i]] over permutations, for a square float array (Kuhn 1955; scipy).

    When every row's maximum is strict and the maxima fall in distinct columns, those columns are the unique
    optimum (their sum bounds every permutation's, and any other loses in some row): returned without the O(n^3)
    assignment. Learned matching's latents, stepped a little from a permutation, are mostly so (docs/results.md 8.5).
    """
    n = score.shape[0]
    if n > 1 and score.shape == (n, n):
        top = np.argmax(score, axis=1)
        if len(np.unique(top)) == n:
            rows = np.arange(n)
            best, masked = score[rows, top], score.copy()
            masked[rows, top] = -np.inf
            if (best > masked.max(axis=1)).all():
                return top
    rows, cols = linear_sum_assignment(score, maximize=True)
    return cols[np.argsort(rows)]


def matched(score: torch.Tensor, p: torch.Tensor) -> float:
    """sum_i score[i, p[i]]: the objective of assignment p."""
    return score[torch.arange(len(p)), p.to(score.device)].sum().item()


def first_examples(data: Iterable, max_examples: int):
    """The first `max_examples` inputs (and labels, when batches are (x, y)) of a loader, concatenated.

    Inputs may be tensors or dicts of tensors (keyword inputs). Unlike distributed.batches this never shards
    by rank: every process sees the same examples.
    """
    from ..graph import batch_size, take_rows

    xs, ys, seen = [], [], 0
    for batch in data:
        x, y = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (tuple, list)) else (batch, None)
        rows = slice(0, max_examples - seen)
        xs.append(take_rows(x, rows))
        if y is not None:
            ys.append(y[rows])
        seen += batch_size(xs[-1])
        if seen >= max_examples:
            break
    if not xs:
        raise ValueError("the data loader yielded no batches")
    x = {k: torch.cat([d[k] for d in xs]) for k in xs[0]} if isinstance(xs[0], dict) else torch.cat(xs)
    return x, (torch.cat(ys) if len(ys) == len(xs) else None)
