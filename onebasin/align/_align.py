"""`align`: trace, validate, run a registered method, permute B, and check that B's function is unchanged."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from ..graph import as_call, to_device
from ..checks import check_finite, check_same_architecture
from ..permute import permute_model
from ..spec import PermutationSpec, trace
from ..stats import eval_mode, takes_precision
from ._registry import AlignResult, AlignmentError, device_of, first_examples, get_method


def _flat_output(out) -> torch.Tensor:
    """All floating tensors of a model's output (a tensor, tuple, dict or Hugging Face ModelOutput), flattened."""
    leaves = [t.flatten() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return torch.cat(leaves)


def check_same_function(model: nn.Module, permuted: nn.Module, x: torch.Tensor, name: str = "model B") -> float:
    """Raise AlignmentError (naming `name`) unless `permuted` computes what `model` does on x (eval mode);
    returns max |diff|.

    Tolerance: sqrt(machine epsilon) of the output dtype times the output's largest magnitude.
    """
    args, kwargs = as_call(x)
    with torch.no_grad(), eval_mode(model, permuted):
        out, out_p = (_flat_output(m(*args, **kwargs)) for m in (model, permuted))
    scale = max(out.abs().max().item(), 1.0)
    diff = (out_p - out).abs().max().item()
    tol = torch.finfo(out.dtype).eps ** 0.5 * scale
    if not diff <= tol:
        raise AlignmentError(
            f"the permuted {name} computes a different function (max |difference| {diff:.3g} > {tol:.3g}): "
            "the permutation spec misses an axis of this model; write it by hand with onebasin.spec.from_groups"
        )
    return diff


@takes_precision
def align(
    model_a: nn.Module,
    model_b: nn.Module,
    method: str = "activation",
    data=None,
    *,
    spec: PermutationSpec | None = None,
    example_input: torch.Tensor | None = None,
    check: bool = True,
    precision: str | None = None,
    **options,
) -> tuple[nn.Module, AlignResult]:
    """Permute model B's hidden units into model A's basin.

    Args:
        model_a, model_b: nn.Modules of one architecture (never modified; their train/eval modes kept).
        method: a registered method name (`list_methods()`): "activation", "weight", "annealing", "functional".
        data: iterable of x or (x, y) batches, e.g. a DataLoader (needed by every method but "weight").
        spec: the PermutationSpec; traced from A on `example_input` when not given.
        example_input: an input batch (N, ...), default the first batch of `data`; used to trace and to check.
        check: assert that the permuted B gives B's outputs on `example_input` (AlignmentError if not).
        precision: "float64" (exact float64 sums) or "float32" (shifted float32 products added into float64
            sums: faster, ~1e-6 relative error; stats.Moments) for every statistic; None: the enclosing stats.statistics_precision, float32 by default.
        options: passed to the method (max_examples, device, seed, budget, init, ...).
    Returns:
        (a permuted copy of B, the AlignResult: perms per group and the method's record, plus
        record["check_max_diff"] when checked). A method that also rewrites A (orthogonal) leaves the
        rewritten A in `result.models[0]`: interpolate B's copy with that, not with A.
    """
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    check_same_architecture(sd_a, sd_b)
    check_finite(sd_a, "model A"), check_finite(sd_b, "model B")
    fn = get_method(method)
    if example_input is None and (spec is None or check):
        if data is None:
            raise ValueError("align needs `data` or `example_input` to trace the model and check the result")
        example_input = first_examples(data, 64)[0]
    if example_input is not None:
        example_input = to_device(example_input, device_of(model_a, options.get("device")))
    if spec is None:
        spec = trace(model_a, example_input)
    result = fn(spec, model_a, model_b, data, **options)
    permuted = result.models[1] if result.models is not None else permute_model(model_b, spec, result.perms)
    if check:
        result.record["check_max_diff"] = check_same_function(model_b, permuted, example_input)
    return permuted, result
