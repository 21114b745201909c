"""`compare`: plain, aligned and aligned + corrected interpolation of two networks side by side (barrier
curves and variance collapse), the demo's and `onebasin barrier`'s measurement; `Comparison`, its result."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from ._progress import progress_bar
from .align import align, get_method
from .barrier import barrier_curve
from .checks import first_input
from .diagnostics import site_label, variance_ratios
from .errors import EmptyDataError
from .interpolate import BarrierCurve, interpolate_model
from .pipeline import _check_models, _check_options, _example, merge, on_device
from .repair import endpoint_stats, endpoints_from_alignment
from .spec import trace
from .stats import current_precision, takes_precision

CORRECTION_OF = {"exact": "repair_exact", "closed": "repair_closed", "reset_bn": "reset_bn", "none": None}
CURVE_REPAIRS = ("exact", "closed", "reset_bn")  # the corrections of compare's third curve


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

    def repair_note(self, split: str = "test") -> str:
        """One line when the correction raised the midpoint loss over the aligned midpoint's, else ""."""
        fixed = next((label for label in self.curves if label.startswith("aligned+")), None)
        if fixed is None or "aligned" not in self.curves:
            return ""
        (_, before), (_, after) = self.midpoint("aligned", split), self.midpoint(fixed, split)
        if after <= before:
            return ""
        return (f"note: the correction raised the midpoint {split} loss ({before:.4f} aligned -> {after:.4f} {fixed}); "
                f"merge with repair='auto' keeps whichever is lower on held-out training data")

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "repair_raised_loss": bool(self.repair_note()),
            "curves": {k: c.to_dict() for k, c in self.curves.items()},
            "variance_ratio": {k: [{"site": site_label(s), "kind": s.kind, "ratio": r} for s, r in rows]
                               for k, rows in self.variance.items()},
            "alignment": self.align_record,
        }  # fmt: skip


@takes_precision
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
    precision: str | None = None,
    align_options: dict | None = None,
) -> Comparison:
    """Interpolate A and B plain, aligned, and aligned + correction; measure barriers and variance collapse.

    Args:
        loaders: split -> re-iterable (x, y) batches, e.g. {"test": ..., "train": ...}; curves on each.
        calib_data: training batches for alignment statistics and REPAIR calibration (first `max_examples`).
        method: alignment method; repair: "exact" | "closed" | "reset_bn" (the third curve's correction).
        device: where to run (copies of A and B are moved there); default: where A is.
        precision: of every statistic: "float64" (exact float64 sums) or "float32" (shifted float32 products
            added into float64 sums, ~1e-6 relative error; stats.Moments); None: the enclosing stats.statistics_precision, float32 by default.
        align_options: passed to the alignment method (e.g. {"untie": True} for orthogonal or learned).
    Returns:
        Comparison with curves {"plain", "aligned", "aligned+<REPAIR>"} and variance ratios at alpha = 0.5.
        With activation matching, the endpoint statistics of the plain and of the aligned pair (REPAIR's
        goals, the variance ratios' endpoint stds) come from the alignment's own pass: one pass in all.
    Raises: as `merge`; EmptyDataError also names an empty split of `loaders`.
    """
    alphas = list(alphas) if alphas is not None else [i / 10 for i in range(11)]
    _check_options(method, repair, alphas, CURVE_REPAIRS)
    _check_models(model_a, model_b)
    model_a, model_b = on_device(model_a, device), on_device(model_b, device)
    if not loaders:
        raise EmptyDataError("compare needs at least one evaluation split, e.g. loaders={'test': test_batches}")
    for split, loader in loaders.items():
        first_input(loader, name=f"loaders[{split!r}]")
    example = _example(model_a, calib_data, "calib_data", check=False)
    spec = trace(model_a, example)
    fixed = f"aligned+{'REPAIR' if repair == 'exact' else repair}"
    steps = progress_bar(total=5, desc="compare", disable=not progress)

    def step(label: str) -> None:
        steps.set_postfix_str(label)
        steps.refresh()

    step(f"aligning ({method})")
    quiet = {"progress": False} if not progress and "progress" in inspect.signature(get_method(method).fn).parameters else {}
    aligned_b, aligned = align(model_a, model_b, method, calib_data, spec=spec, max_examples=max_examples,
                               **quiet, **(align_options or {}))
    aligned_a = aligned.models[0] if aligned.models is not None else model_a  # orthogonal rewrites A too
    aligned_spec = trace(aligned_a, example) if aligned.record.get("untied") else spec  # an untied head: a new graph
    steps.update()

    def endpoints(site_stats, a: nn.Module, b: nn.Module, spec):  # from the alignment's own pass, or measured
        return endpoints_from_alignment(spec, site_stats) or endpoint_stats(a, b, calib_data, spec, max_examples=max_examples)

    ends = {"plain": endpoints(aligned.plain_site_stats, model_a, model_b, spec),
            "aligned": endpoints(aligned.site_stats, aligned_a, aligned_b, aligned_spec)}
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
                                  max_examples=max_examples, spec=aligned_spec, endpoints=ends["aligned"], on_model=keep_midpoint)
    steps.update()
    step("variance ratios")
    for label, (a, b) in pairs.items():
        variance[label] = variance_ratios(a, b, interpolate_model(a, b, 0.5), calib_data, endpoints=ends[label])
    if "model" not in midpoint:  # 0.5 not among the alphas
        midpoint["model"] = merge(aligned_a, aligned_b, method="none", repair=repair, data=calib_data, spec=aligned_spec,
                                  max_examples=max_examples)[0]
    variance[fixed] = variance_ratios(aligned_a, aligned_b, midpoint["model"], calib_data, endpoints=ends["aligned"])
    steps.update()
    steps.close()
    settings = {"method": method, "repair": repair, "alphas": alphas, "max_examples": max_examples,
                "precision": current_precision()}
    return Comparison(curves, variance, aligned.record, settings)
