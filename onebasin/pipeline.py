"""The whole pipeline: align B to A, interpolate, correct (Jordan et al. 2022); and the same for N models
(`merge_many`: align into a shared universe, average, N-way REPAIR). The comparison behind `onebasin demo`
and `onebasin barrier` (plain vs aligned vs aligned+REPAIR) is `comparison.compare`."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .align import align, check_same_function, get_method
from ._copy import copy_module
from .align.many import ALIGNMENTS, agreement, align_many, cycle_consistency, get_combiner, induced_maps
from .checks import (check_example_input, check_finite, check_max_examples, check_models, check_module,
                     check_same_architecture, check_same_dtype, check_weights, first_input)
from .errors import EmptyDataError, InvalidOptionError
from .permute import Perms, StateDict, check_perm_list, permute_model
from .interpolate import evaluate, interpolate_model
from .repair import endpoints_from_alignment, reset_bn
from .repair import repair as repair_fn
from .repair.many import repair_many
from .spec import PermutationSpec, trace
from .stats import takes_precision
from .graph import batch_size, describe_input, take_rows

REPAIRS = ("exact", "closed", "auto", "reset_bn", "none")
HELD_OUT = 1000  # examples after the calibration set that judge REPAIR (repair="auto", MergeResult.repair_check)


@dataclass
class MergeResult:
    """What `merge` did and measured: JSON-ready via `to_dict`."""

    method: str  # alignment method, or "none"
    repair: str  # "exact" | "closed" | "reset_bn" | "none"
    alpha: float
    align_record: dict = field(default_factory=dict)
    repair_passes: int = 0
    fused: bool = True  # False: the result holds RepairAffine modules (see RepairResult.affines)
    affines: dict = field(default_factory=dict)  # graph node -> unit axis of each unfused correction
    example_input: dict = field(default_factory=dict)  # shapes/dtypes of the input (rebuilds the graph on reload)
    seconds: float = 0.0
    # held-out loss of the interpolated network with and without REPAIR (when held-out labelled examples were
    # available): {"examples", "loss_with_repair", "loss_without_repair", "repair_raised_loss", "kept"}
    repair_check: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


_NEEDS_DATA = ("activation", "annealing", "functional", "learned")  # built-in methods that run the networks


def _check_options(method: str, repair: str, alphas: Iterable, repairs=REPAIRS) -> None:
    """InvalidOptionError naming an unknown method or repair, or an alpha that is not a number in [0, 1]."""
    if method != "none":
        try:
            get_method(method)
        except ValueError as err:
            raise InvalidOptionError(f"{err} (or 'none')") from None
    if repair not in repairs:
        raise InvalidOptionError(f"unknown repair {repair!r}; valid: {', '.join(repairs)}")
    for a in alphas:
        try:
            ok = not isinstance(a, (bool, str)) and math.isfinite(float(a)) and 0 <= float(a) <= 1
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InvalidOptionError(f"alpha must be a number in [0, 1] (0 = A, 1 = B), got {a!r}")


def on_device(model: nn.Module, device) -> nn.Module:
    """`model`, or a copy of it on `device` (statistics then accumulate in float64 on that device)."""
    if device is None:
        return model
    device = torch.device(device)
    p = next(model.parameters(), None)
    return model if p is None or p.device == device else copy.deepcopy(model).to(device)


def _check_models(model_a: nn.Module, model_b: nn.Module) -> None:
    check_module(model_a, "model_a"), check_module(model_b, "model_b")
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    check_same_architecture(sd_a, sd_b)
    check_same_dtype(sd_a, sd_b)
    check_finite(sd_a, "model A"), check_finite(sd_b, "model B")


def _example(model: nn.Module, data: Iterable, name: str = "the data", check: bool = True) -> torch.Tensor:
    """The first batch's input (64 rows) on the model's device, checked to run through `model` (`check`;
    `trace` checks it itself)."""
    param = next(model.parameters(), None)
    example = first_input(data, 64, param.device if param is not None else None, name=name)
    if check:
        check_example_input(model, example)
    return example


@takes_precision
def merge(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    method: str = "activation",
    repair: str = "exact",
    alpha: float = 0.5,
    data: Iterable | None = None,
    spec: PermutationSpec | None = None,
    max_examples: int = 5000,
    device: str | torch.device | None = None,
    sites: Iterable[str] = ("layer", "block"),
    held_out: Iterable | None = None,
    precision: str | None = None,
    **align_options,
) -> tuple[nn.Module, MergeResult]:
    """Merge two networks of one architecture into one: align B to A, interpolate at `alpha`, correct.

    Args:
        model_a, model_b: trained nn.Modules of one architecture (not modified).
        method: alignment method ("activation", "weight", "annealing", "functional") or "none".
        repair: "exact" / "closed" REPAIR (Jordan et al. 2022, Sec. 4), "reset_bn" (Sec. 5.2) or "none"; "auto":
            exact REPAIR kept only if it does not raise the loss on held-out labelled examples (else the
            uncorrected interpolation; both losses in `result.repair_check`).
        held_out: labelled (x, y) batches, not the test set, that judge REPAIR (default: up to 1,000 examples
            of `data` after its first `max_examples`); exact and closed REPAIR are judged too when there are
            any (`result.repair_check["repair_raised_loss"]`).
        precision: of every statistic: "float64" (exact float64 sums) or "float32" (shifted float32 products
            added into float64 sums, ~1e-6 relative error; stats.Moments); None: the enclosing stats.statistics_precision, float32 by default.
        alpha: interpolation weight, 0 = A, 1 = B.
        device: where to run (copies of A and B are moved there; statistics in float64 on it); default: A's.
        sites: the REPAIR site kinds ("layer": Linear/Conv outputs, "block": residual additions, which
            cannot be folded into weights; ("layer",) keeps the result a plain model of A's class).
        data: re-iterable x or (x, y) batches (training data): used for alignment statistics and as
            REPAIR's calibration set (first `max_examples` examples). Only "weight" + "none" need none.
            With activation matching, REPAIR's goals (eqs. 3-4) come from the alignment's own pass
            (`repair.endpoints_from_alignment`): one paired pass of A and B fewer.
    Returns:
        (merged model, MergeResult). The model has A's class when every correction could be fused.
    Raises (all OnebasinError): InvalidOptionError (unknown method or repair, alpha not in [0, 1]),
        ArchitectureMismatchError (keys, shapes or dtypes of A and B differ), InvalidWeightsError (NaN/inf),
        EmptyDataError (no data, no batch, a 0-row batch), InputMismatchError (the first batch does not
        run through A: shape, dtype or device; checked with `checks.check_example_input` before tracing).
    """
    _check_options(method, repair, [alpha])
    check_max_examples(max_examples)
    _check_models(model_a, model_b)
    model_a, model_b = on_device(model_a, device), on_device(model_b, device)
    if data is None and (method in _NEEDS_DATA or repair != "none"):
        raise EmptyDataError(f"merge(method={method!r}, repair={repair!r}) needs data: pass data=<training batches> "
                             f"(only method='weight' or 'none' with repair='none' run without)")
    start = time.perf_counter()
    example = _example(model_a, data, check=spec is not None) if data is not None else None
    if spec is None and example is not None:
        spec = trace(model_a, example)
    result = MergeResult(method, repair, float(alpha))
    if example is not None:
        result.example_input = describe_input(example)
    ends = None
    if method == "learned":  # learn the permutations for the midpoint that will be used: REPAIRed or not
        align_options.setdefault("repair_in_loop", repair in ("exact", "closed", "auto"))
    if method != "none":
        model_b, aligned = align(model_a, model_b, method, data, spec=spec, max_examples=max_examples, **align_options)
        model_a = aligned.models[0] if aligned.models is not None else model_a
        if aligned.record.get("untied"):  # A and B now hold the head apart from the embedding: trace them anew
            spec = trace(model_a, example)
        result.align_record = aligned.record
        ends = endpoints_from_alignment(spec, aligned.site_stats, tuple(sites))  # REPAIR's goals from the same pass
    if repair in ("exact", "closed", "auto"):
        if data is None:
            raise EmptyDataError("REPAIR needs calibration data (training batches)")
        held = list(held_out) if held_out is not None else held_out_batches(data, max_examples)
        if repair == "auto" and not held:
            raise InvalidOptionError(f"repair='auto' judges REPAIR on held-out labelled examples: pass held_out=<(x, y) "
                                     f"batches> or data with more than max_examples={max_examples} (x, y) examples "
                                     "(up to 1,000 after them are held out), or choose repair='exact'")
        repaired = repair_fn(model_a, model_b, alpha, data, spec=spec, method="exact" if repair == "auto" else repair,
                             max_examples=max_examples, sites=tuple(sites), endpoints=ends)
        merged, result.repair_passes, result.fused, result.affines = repaired.model, repaired.passes, repaired.fused, repaired.affines
        if held:
            plain = interpolate_model(model_a, model_b, alpha)
            result.repair_check = judge_repair(merged, plain, held, keep_better=repair == "auto")
            if result.repair_check["kept"] == "none":
                merged, result.fused, result.affines = plain, True, {}
    elif repair == "reset_bn":
        merged = reset_bn(interpolate_model(model_a, model_b, alpha), data, max_examples)
    else:
        merged = interpolate_model(model_a, model_b, alpha)
    result.seconds = time.perf_counter() - start
    return merged, result


def held_out_batches(data: Iterable, skip: int, limit: int = HELD_OUT) -> list:
    """The labelled (x, y) batches of `data` after its first `skip` examples, `limit` examples at most (the batch
    that straddles either bound is cut); [] when `data` has no more examples or its batches are not what
    `evaluate` scores: a tensor x with integer class labels y (a dict input or other targets are not judged)."""
    out, seen = [], 0
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not _scorable(*batch[:2]):
            return []
        x, y = batch[0], batch[1]
        n = batch_size(x)
        lo, hi = max(skip - seen, 0), min(n, skip + limit - seen)
        if lo < hi:
            out.append((take_rows(x, slice(lo, hi)), y[lo:hi]))
        seen += n
        if seen >= skip + limit:
            break
    return out


def _scorable(x, y) -> bool:
    """Whether `evaluate` (cross-entropy, accuracy) can score a batch: a tensor input and integer labels."""
    return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and not y.is_floating_point() and y.dim() >= 1


def judge_repair(repaired: nn.Module, plain: nn.Module, held: list, keep_better: bool = False) -> dict:
    """Mean loss of the REPAIRed and the uncorrected interpolated network on held-out batches; with `keep_better`,
    "kept" names the lower ("repair" on a tie), else always "repair" (REPAIR kept, its effect reported)."""
    with_repair, _ = evaluate(repaired, held)
    without, _ = evaluate(plain, held)
    raised = with_repair > without
    return {"examples": sum(len(y) for _, y in held), "loss_with_repair": with_repair, "loss_without_repair": without,
            "repair_raised_loss": raised, "kept": "none" if keep_better and raised else "repair"}


# --- N models --------------------------------------------------------------------------------------------

MANY_REPAIRS = ("exact", "reset_bn", "none")


@dataclass
class ManyResult:
    """What `merge_many` did and measured: JSON-ready via `to_dict`."""

    method: str  # a combiner ("universe" | "mergemany" | "anchor") or "none" (plain averaging)
    alignment: str  # "activation" | "weight"
    repair: str  # "exact" | "reset_bn" | "none"
    weights: list[float]  # of each model in the average and in the REPAIR goals, summing to 1
    perms: list[Perms]  # per model: apply_perms(spec, perms[i], sd_i) is model i in the universe
    cycle_consistency: float | None  # of the maps P_j^-1 P_i over all triples (None for N < 3): 1.0 by construction
    pairwise_consistency: float | None  # of the direct pairwise matchings (None for N < 3 or method "none")
    pairwise_agreement: float | None  # fraction of units where P_j^-1 P_i equals the direct pairwise matching of (i, j)
    record: dict = field(default_factory=dict)  # sweeps, converged, objective (activation), examples
    seconds: dict = field(default_factory=dict)  # align, average, repair, diagnostics, total
    repair_passes: int = 0
    fused: bool = True  # False: the model holds RepairAffine modules (see `affines`)
    affines: dict = field(default_factory=dict)  # fx node -> unit axis of each unfused correction
    example_input: dict = field(default_factory=dict)  # shapes/dtypes of the input (rebuilds the graph on reload)

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out["perms"] = [{g: p.tolist() for g, p in perms.items()} for perms in self.perms]
        return out


def weighted_mean(state_dicts: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """sum_i weights[i] * state_dicts[i], summed in float64 and cast back; integer buffers rounded."""
    out = {}
    for key, t in state_dicts[0].items():
        total = sum(w * sd[key].double() for w, sd in zip(weights, state_dicts))
        out[key] = total.to(t.dtype) if t.is_floating_point() else torch.round(total).to(t.dtype)
    return out


def _aligned(models: list[nn.Module], spec: PermutationSpec, perms: list[Perms], example) -> list[nn.Module]:
    """The permuted copies of the models, each checked to compute what its model does on `example` (when given),
    as `align` checks B: a spec that misses an axis (e.g. a parametrised layer) is an AlignmentError, not a merge."""
    aligned = [permute_model(m, spec, p) for m, p in zip(models, perms)]
    if example is not None:
        for i, (m, a) in enumerate(zip(models, aligned)):
            check_same_function(m, a, example, f"model {i}")
    return aligned


@takes_precision
def merge_many(
    models: Sequence[nn.Module],
    method: str = "universe",
    repair: str = "exact",
    weights: Sequence[float] | None = None,
    data: Iterable | None = None,
    alignment: str = "activation",
    *,
    spec: PermutationSpec | None = None,
    max_examples: int | None = 5000,
    max_iter: int = 100,
    seed: int = 0,
    perms: list[Perms] | None = None,
    sites: Iterable[str] = ("layer", "block"),
    max_memory: int | None = 1 << 30,
    precision: str | None = None,
) -> tuple[nn.Module, ManyResult]:
    """Merge N networks of one architecture into one: align into a universe, average, correct.

    Every method gives one permutation p_i per model into a shared unit order (`align.many`); the merged
    network is the weighted mean of the permuted models; N-way REPAIR then gives every unit the weighted
    mean of the N endpoints' means and stds (Jordan et al. 2022, eqs. 3-4 with N weights instead of
    1 - alpha and alpha).

    Args:
        models: N >= 2 trained nn.Modules of one architecture (not modified).
        method: a registered combiner (`align.many.list_combiners()`): "universe" (cycle-consistent multi-model
            objective, C2M3's), "mergemany" (Ainsworth et al. 2022), "anchor" (all aligned to model 0), or
            "none" (plain averaging).
        repair: "exact" N-way REPAIR, "reset_bn" (BatchNorm statistics re-estimated, Sec. 5.2) or "none".
        weights: N non-negative weights of the average and of the goals (normalised; default uniform).
        data: re-iterable x or (x, y) batches of training data: alignment statistics and REPAIR calibration
            (first `max_examples` inputs). Only alignment="weight" with repair="none" and a `spec` needs none.
        alignment: "activation" (correlations from one pass with all N models) or "weight" (no data).
        spec: the PermutationSpec (traced from model 0 on the first batch when None).
        perms: one {group: LongTensor} per model (e.g. `result.perms` of an earlier call) to use instead of
            aligning; `method` is then only recorded, and the pairwise measures are None.
        sites: the REPAIR site kinds, as `merge`'s ("layer", "block"; ("layer",) keeps model 0's class).
        max_memory: bytes the alignment's joint sums may hold (N(N-1)/2 units^2 float64 per site); above it the
            statistics take several passes over the data, each holding some groups' sums, and a batch whose tapped
            activations of the N models would exceed it runs in slices of rows (each bounded by it: the peak is about
            twice it; `align_many`'s max_memory; recorded as statistics_passes, statistics_bytes and statistics_rows).
            None: one pass, whole batches.
        precision: of every statistic, as `merge`'s: the joint statistics of the N models (alignment and the
            N-way REPAIR goals, `stats.joint_moments`) and REPAIR's corrections.
    Returns:
        (merged model, ManyResult with per-model perms, cycle-consistency measures, record and timings).
        The model has model 0's class when every REPAIR correction could be fused.
    Raises (all OnebasinError): InvalidOptionError (unknown method, alignment or repair; bad weights,
        max_examples or perms; fewer than 2 models or one that is no nn.Module), ArchitectureMismatchError,
        InvalidWeightsError, EmptyDataError / InputMismatchError (as `merge`), AlignmentError (a permuted
        model computes another function than its model on the first batch: the spec misses an axis).
    """
    if method != "none":
        get_combiner(method)  # InvalidOptionError listing the valid names, before any work
    if alignment not in ALIGNMENTS:
        raise InvalidOptionError(f"unknown alignment {alignment!r}; valid: {', '.join(ALIGNMENTS)}")
    if repair not in MANY_REPAIRS:
        raise InvalidOptionError(f"unknown repair {repair!r}; valid: {', '.join(MANY_REPAIRS)}")
    check_max_examples(max_examples)
    models = check_models(models)
    w = check_weights(weights, len(models))
    if data is None and (spec is None or repair != "none"):
        raise EmptyDataError("merge_many needs data (training batches) to trace the model and to REPAIR")
    start = time.perf_counter()
    example = _example(models[0], data) if data is not None else None
    spec = spec or trace(models[0], example)
    if perms is None:
        perms, direct, record = align_many(spec, models, method, alignment, data, max_examples=max_examples,
                                           max_iter=max_iter, seed=seed, max_memory=max_memory, precision=precision)
    else:
        check_perm_list(spec, perms, len(models))
        direct, record = {}, {"given_perms": True}
    aligned_at = time.perf_counter()
    aligned = _aligned(models, spec, perms, example)
    merged = copy_module(models[0])
    merged.load_state_dict(weighted_mean([m.state_dict() for m in aligned], w))
    averaged_at = time.perf_counter()
    passes, fused, affines = 0, True, {}
    if repair == "exact":
        fixed = repair_many(merged, aligned, w, data, spec, sites=sites, max_examples=max_examples, precision=precision)
        merged, passes, fused, affines = fixed.model, fixed.passes, fixed.fused, fixed.affines
    elif repair == "reset_bn":
        merged = reset_bn(merged, data, max_examples)
    repaired_at = time.perf_counter()
    maps = induced_maps(perms)
    result = ManyResult(method, alignment, repair, w, perms, cycle_consistency(maps, len(models)),
                        cycle_consistency(direct, len(models)) if direct else None, agreement(maps, direct), record,
                        {"align": aligned_at - start, "average": averaged_at - aligned_at, "repair": repaired_at - averaged_at,
                         "diagnostics": time.perf_counter() - repaired_at, "total": time.perf_counter() - start},
                        passes, fused, affines, describe_input(example) if example is not None else {})  # fmt: skip
    return merged, result
