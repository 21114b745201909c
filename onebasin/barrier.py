"""The loss barrier along the linear path between two networks, optionally corrected at every alpha.

`barrier_curve` evaluates loss and accuracy of theta_alpha = (1 - alpha) theta_A + alpha theta_B with a
statistical correction at every alpha (BN reset or REPAIR, Jordan et al. 2022); `BarrierCurve.barrier`
(in `onebasin.interpolate`) gives the barrier of eq. (1). Above `repair`, which it calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import EmptyDataError
from .interpolate import BarrierCurve, evaluate, interpolate_model
from .repair import endpoint_stats, repair, reset_bn
from .stats import takes_precision

CORRECTIONS = (None, "reset_bn", "repair_exact", "repair_closed")


def _corrector(model_a, model_b, correction, calib_data, max_examples, spec, sites, ends=None) -> Callable[[float], nn.Module]:
    """alpha -> interpolated model with `correction` applied; endpoint statistics `ends` are measured once when None."""
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; valid corrections: {list(CORRECTIONS)}")
    if correction is None:
        return lambda a: interpolate_model(model_a, model_b, a)
    if correction == "reset_bn":
        return lambda a: reset_bn(interpolate_model(model_a, model_b, a), calib_data, max_examples)
    if ends is None:
        ends = endpoint_stats(model_a, model_b, calib_data, spec, sites, max_examples)
    method = correction.removeprefix("repair_")

    def repaired(a: float) -> nn.Module:
        if a in (0.0, 1.0):  # the goals are the endpoint's own statistics: REPAIR is the identity there
            return interpolate_model(model_a, model_b, a)
        return repair(model_a, model_b, a, calib_data, method=method, max_examples=max_examples, endpoints=ends).model

    return repaired


@takes_precision
def barrier_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    loaders: dict[str, Iterable],
    alphas: Iterable[float] | torch.Tensor | None = None,
    correction: str | None = None,
    *,
    calib_data: Iterable | None = None,
    loss_fn: Callable = F.cross_entropy,
    max_examples: int | None = 5000,
    spec=None,
    sites=("layer", "block"),
    endpoints=None,
    on_model: Callable[[float, nn.Module], None] | None = None,
    precision: str | None = None,
) -> BarrierCurve:
    """Loss and accuracy along theta_alpha = (1 - alpha) theta_A + alpha theta_B (Jordan et al. 2022, Fig. 3).

    Args:
        model_a, model_b: endpoints (B aligned to A by the caller); not modified.
        loaders: split name -> re-iterable of (x, y) batches, e.g. {"train": ..., "test": ...}.
        alphas: interpolation weights (default 0, 0.1, ..., 1); 0 and 1 are added if missing.
        correction: None, "reset_bn", "repair_exact" or "repair_closed", applied at every alpha (endpoints
            included) with `calib_data` (default: loaders["train"]; without either, EmptyDataError: a
            correction is never calibrated on a test split), first `max_examples` examples;
            `spec`/`sites` select the REPAIR sites.
        loss_fn: loss(logits, targets) -> batch mean.
        endpoints: precomputed `repair.endpoint_stats(model_a, model_b, ...)` of those sites, for REPAIR.
        on_model: called as on_model(alpha, model) with each evaluated (corrected) network, e.g. to keep one.
        precision: "float64" (exact float64 sums) or "float32" (shifted float32 products added into float64
            sums: faster, ~1e-6 relative error; stats.Moments) for REPAIR's statistics; None: the enclosing stats.statistics_precision, float32 by default.
    Returns:
        BarrierCurve; `.barrier(split, "loss" | "error")` gives eq. (1).
    """
    alphas = sorted({0.0, 1.0, *(float(a) for a in (torch.linspace(0, 1, 11) if alphas is None else alphas))})
    calib = calib_data if calib_data is not None else loaders.get("train")
    if correction is not None and calib is None:
        raise EmptyDataError(f"barrier_curve(correction={correction!r}) needs calibration data: pass calib_data=<training "
                             f"batches> (or a 'train' loader); the splits given are {list(loaders)}, and a correction "
                             f"calibrated on a test split would measure a model fitted to its own test data")
    make = _corrector(model_a, model_b, correction, calib, max_examples, spec, sites, endpoints)
    loss = {split: [] for split in loaders}
    acc = {split: [] for split in loaders}
    for a in alphas:
        model = make(a)
        if on_model is not None:
            on_model(a, model)
        for split, loader in loaders.items():
            l, c = evaluate(model, loader, loss_fn)
            loss[split].append(l)
            acc[split].append(c)
    return BarrierCurve(alphas, loss, acc, correction)
