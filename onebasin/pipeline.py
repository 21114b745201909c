"""The whole pipeline: align B to A, interpolate, correct (Jordan et al. 2022), and the comparison
behind `onebasin demo` and `onebasin barrier` (plain vs aligned vs aligned+REPAIR)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .align import align, get_method
from .checks import check_example_input, check_finite, check_same_architecture, check_same_dtype, first_input
from .diagnostics import site_label, variance_ratios
from .errors import EmptyDataError, InvalidOptionError
from .interpolate import BarrierCurve, barrier_curve, interpolate_model
from .repair import endpoint_stats, endpoints_from_alignment, reset_bn
from .repair import repair as repair_fn
from .spec import PermutationSpec, trace
from .graph import describe_input

REPAIRS = ("exact", "closed", "reset_bn", "none")
CORRECTION_OF = {"exact": "repair_exact", "closed": "repair_closed", "reset_bn": "reset_bn", "none": None}


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

    def to_dict(self) -> dict:
        return dict(self.__dict__)


_NEEDS_DATA = ("activation", "annealing", "functional")  # built-in methods that run the networks


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
    **align_options,
) -> tuple[nn.Module, MergeResult]:
    """Merge two networks of one architecture into one: align B to A, interpolate at `alpha`, correct.

    Args:
        model_a, model_b: trained nn.Modules of one architecture (not modified).
        method: alignment method ("activation", "weight", "annealing", "functional") or "none".
        repair: "exact" / "closed" REPAIR (Jordan et al. 2022, Sec. 4), "reset_bn" (Sec. 5.2) or "none".
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
    if method != "none":
        model_b, aligned = align(model_a, model_b, method, data, spec=spec, max_examples=max_examples, **align_options)
        model_a = aligned.models[0] if aligned.models is not None else model_a
        result.align_record = aligned.record
        ends = endpoints_from_alignment(spec, aligned.site_stats, tuple(sites))  # REPAIR's goals from the same pass
    if repair in ("exact", "closed"):
        if data is None:
            raise EmptyDataError("REPAIR needs calibration data (training batches)")
        repaired = repair_fn(model_a, model_b, alpha, data, spec=spec, method=repair, max_examples=max_examples,
                             sites=tuple(sites), endpoints=ends)
        merged, result.repair_passes, result.fused, result.affines = repaired.model, repaired.passes, repaired.fused, repaired.affines
    elif repair == "reset_bn":
        merged = reset_bn(interpolate_model(model_a, model_b, alpha), data, max_examples)
    else:
        merged = interpolate_model(model_a, model_b, alpha)
    result.seconds = time.perf_counter() - start
    return merged, result


@dataclass
class Comparison:
    """Barrier curves and variance ratios of plain, aligned and aligned+REPAIR interpolation."""

    curves: dict[str, BarrierCurve]  # label -> curve
    variance: dict[str, list[tuple]]  # label -> [(site, ratio)] at alpha = 0.5
    align_record: dict
    settings: dict

    def midpoint(self, label: str, split: str = "test") -> tuple[float, float]:
        """(accuracy, loss) of curve `label` at the alpha nearest 0.5."""
        c = self.curves[label]
        i = min(range(len(c.alphas)), key=lambda j: abs(c.alphas[j] - 0.5))
        return c.acc[split][i], c.loss[split][i]

    def summary_rows(self, split: str = "test") -> list[list]:
        """[name, accuracy, loss, loss barrier, error barrier]: endpoints first, then each curve's midpoint."""
        first = next(iter(self.curves.values()))
        rows = [["model A", first.acc[split][0], first.loss[split][0], "", ""],
                ["model B", first.acc[split][-1], first.loss[split][-1], "", ""]]
        for label, c in self.curves.items():
            acc, loss = self.midpoint(label, split)
            rows.append([f"midpoint {label}", acc, loss, c.barrier(split, "loss"), c.barrier(split, "error")])
        return rows

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "curves": {k: c.to_dict() for k, c in self.curves.items()},
            "variance_ratio": {k: [{"site": site_label(s), "kind": s.kind, "ratio": r} for s, r in rows]
                               for k, rows in self.variance.items()},
            "alignment": self.align_record,
        }  # fmt: skip


def compare(
    model_a: nn.Module,
    model_b: nn.Module,
    loaders: dict[str, Iterable],
    calib_data: Iterable,
    *,
    method: str = "activation",
    repair: str = "exact",
    alphas: Iterable[float] | None = None,
    max_examples: int = 5000,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> Comparison:
    """Interpolate A and B plain, aligned, and aligned + correction; measure barriers and variance collapse.

    Args:
        loaders: split -> re-iterable (x, y) batches, e.g. {"test": ..., "train": ...}; curves on each.
        calib_data: training batches for alignment statistics and REPAIR calibration (first `max_examples`).
        method: alignment method; repair: "exact" | "closed" | "reset_bn" (the third curve's correction).
        device: where to run (copies of A and B are moved there); default: where A is.
            With activation matching, the endpoint statistics of the plain and of the aligned pair (REPAIR's
            goals, the variance ratios' endpoint stds) come from the alignment's own pass: one pass in all.
    Returns:
        Comparison with curves {"plain", "aligned", "aligned+<REPAIR>"} and variance ratios at alpha = 0.5.
    Raises: as `merge`; EmptyDataError also names an empty split of `loaders`.
    """
    alphas = list(alphas) if alphas is not None else [i / 10 for i in range(11)]
    _check_options(method, repair, alphas, REPAIRS[:3])
    _check_models(model_a, model_b)
    model_a, model_b = on_device(model_a, device), on_device(model_b, device)
    if not loaders:
        raise EmptyDataError("compare needs at least one evaluation split, e.g. loaders={'test': test_batches}")
    for split, loader in loaders.items():
        first_input(loader, name=f"loaders[{split!r}]")
    spec = trace(model_a, _example(model_a, calib_data, "calib_data", check=False))
    fixed = f"aligned+{'REPAIR' if repair == 'exact' else repair}"
    steps = tqdm(total=5, desc="compare", disable=not progress)

    def step(label: str) -> None:
        steps.set_postfix_str(label)
        steps.refresh()

    step(f"aligning ({method})")
    aligned_b, aligned = align(model_a, model_b, method, calib_data, spec=spec, max_examples=max_examples)
    aligned_a = aligned.models[0] if aligned.models is not None else model_a  # orthogonal rewrites A too
    steps.update()

    def endpoints(site_stats, a: nn.Module, b: nn.Module):  # from the alignment's own pass, or measured
        return endpoints_from_alignment(spec, site_stats) or endpoint_stats(a, b, calib_data, spec, max_examples=max_examples)

    ends = {"plain": endpoints(aligned.plain_site_stats, model_a, model_b),
            "aligned": endpoints(aligned.site_stats, aligned_a, aligned_b)}
    curves, variance, midpoint = {}, {}, {}

    def keep_midpoint(a: float, model: nn.Module) -> None:  # the corrected midpoint, for its variance ratios
        if a == 0.5:
            midpoint["model"] = model

    pairs = {"plain": (model_a, model_b), "aligned": (aligned_a, aligned_b)}
    for label, (a, b) in pairs.items():
        step(f"barrier curve: {label}")
        curves[label] = barrier_curve(a, b, loaders, alphas, calib_data=calib_data, max_examples=max_examples)
        steps.update()
    step(f"barrier curve: {fixed}")
    curves[fixed] = barrier_curve(aligned_a, aligned_b, loaders, alphas, CORRECTION_OF[repair], calib_data=calib_data,
                                  max_examples=max_examples, spec=spec, endpoints=ends["aligned"], on_model=keep_midpoint)
    steps.update()
    step("variance ratios")
    for label, (a, b) in pairs.items():
        variance[label] = variance_ratios(a, b, interpolate_model(a, b, 0.5), calib_data, endpoints=ends[label])
    if "model" not in midpoint:  # 0.5 not among the alphas
        midpoint["model"] = merge(aligned_a, aligned_b, method="none", repair=repair, data=calib_data, spec=spec, max_examples=max_examples)[0]
    variance[fixed] = variance_ratios(aligned_a, aligned_b, midpoint["model"], calib_data, endpoints=ends["aligned"])
    steps.update()
    steps.close()
    settings = {"method": method, "repair": repair, "alphas": alphas, "max_examples": max_examples}
    return Comparison(curves, variance, aligned.record, settings)
