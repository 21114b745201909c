"""Variance collapse diagnostic (Jordan et al. 2022, Sec. 3.1, Figs. 1-2).

For endpoints A, B (B aligned to A) and an interpolated net, per site (each Linear/Conv output or the
norm right after it, i.e. pre-activation, and each residual block output): the mean over units of
std_alpha / ((std_A + std_B) / 2). 1 means no collapse; the paper's plain interpolations fall towards 0
with depth. (The paper's Fig. 2 divides sums of variances instead; the per-unit std ratio used here
weighs every unit equally and is what REPAIR sets to 1 on its calibration data.)

A measurement, not a correction: kept apart from `onebasin.repair` (whose site taps it reuses) so
reports and the CLI can call it on any interpolated or repaired net without pulling in REPAIR's options.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_weights, eval_mode
from .interpolate import evaluate
from .repair import KINDS, EndpointStats, endpoint_stats, site_stats
from .spec import PermutationSpec, Site


def variance_ratios(
    model_a: nn.Module,
    model_b: nn.Module,
    model_alpha: nn.Module,
    data: Iterable,
    spec: PermutationSpec | None = None,
    *,
    sites: Iterable[str] | list[Site] = KINDS,
    max_examples: int | None = 5000,
    endpoints: EndpointStats | None = None,
) -> list[tuple[Site, float]]:
    """Mean over units of std_alpha / ((std_A + std_B) / 2) at every site, in forward order.

    Args:
        model_a, model_b: endpoints (unit i of B is compared with unit i of A: align B first for the
            "aligned" curve, pass the raw B for the "plain" one).
        model_alpha: the interpolated net, plain or REPAIRed (a `Repaired<Class>` wrapper is read after
            its RepairAffine modules).
        data: re-iterable x or (x, y) batches; first `max_examples` examples.
        spec, sites: as in `onebasin.repair.endpoint_stats`; `endpoints` reuses an earlier measurement.
    Returns:
        [(site, ratio)]. Units with std_A + std_B == 0 (dead in both endpoints) are left out of the mean.
    """
    ends = endpoints or endpoint_stats(model_a, model_b, data, spec, sites, max_examples)
    _, stds = site_stats(model_alpha, ends.sites, data, max_examples, ends.graph)
    rows = []
    for s, std, va, vb in zip(ends.sites, stds, ends.var_a, ends.var_b):
        ref = (va.sqrt() + vb.sqrt()) / 2
        live = ref > 0
        rows.append((s, float((std[live] / ref[live]).mean()) if live.any() else float("nan")))
    return rows


def site_label(site: Site) -> str:
    """Short name of a site for tables and plot ticks: its module, or its fx node for a block output."""
    return site.module or site.node


def ratio_table(results: dict[str, list[tuple[Site, float]]]) -> str:
    """Text table: one row per site (index, kind, name), one column per method (e.g. plain / aligned / REPAIR)."""
    labels = list(results)
    first = results[labels[0]]
    head = ["#", "kind", "site", *labels]
    rows = [[str(i), s.kind, site_label(s), *(f"{results[k][i][1]:.3f}" for k in labels)] for i, (s, _) in enumerate(first)]
    widths = [max(len(r[j]) for r in [head, *rows]) for j in range(len(head))]
    return "\n".join(_row(r, widths) for r in [head, *rows])


def _row(cells: list[str], widths: list[int]) -> str:
    """Three left-aligned label columns, then right-aligned numbers."""
    return "  ".join(c.rjust(w) if j >= 3 else c.ljust(w) for j, (c, w) in enumerate(zip(cells, widths)))


def ratio_series(results: dict[str, list[tuple[Site, float]]]) -> dict[str, list[float]]:
    """{method: [ratio per site]}: the input of `onebasin.plots.plot_variance_ratios`."""
    return {k: [r for _, r in rows] for k, rows in results.items()}


def ensemble_evaluate(models: Sequence[nn.Module], loader: Iterable, weights: Sequence[float] | None = None) -> tuple[float, float]:
    """(loss, accuracy) of the output ensemble: the weighted mean of the models' softmax probabilities."""
    w = check_weights(weights, len(models))
    loss, correct, n = 0.0, 0, 0
    with torch.no_grad(), eval_mode(*models):
        for x, y, *_ in loader:
            prob = sum(wi * F.softmax(m(x), -1) for wi, m in zip(w, models))
            loss += float(F.nll_loss(prob.clamp_min(1e-30).log(), y, reduction="sum"))
            correct, n = correct + int((prob.argmax(-1) == y).sum()), n + len(y)
    return loss / n, correct / n


def merge_diagnostics(models: Sequence[nn.Module], merged: nn.Module, loader: Iterable,
                      weights: Sequence[float] | None = None) -> dict:
    """Barrier-like numbers of an N-model merge on (x, y) batches: the merged model's loss and accuracy beside
    the endpoints' (each and their weighted mean) and the output ensemble's; `gap` = endpoint mean - merged."""
    w = check_weights(weights, len(models))
    ends = [dict(zip(("loss", "acc"), evaluate(m, loader))) for m in models]
    mean = {k: sum(wi * e[k] for wi, e in zip(w, ends)) for k in ("loss", "acc")}
    merged_ = dict(zip(("loss", "acc"), evaluate(merged, loader)))
    ensemble = dict(zip(("loss", "acc"), ensemble_evaluate(models, loader, w)))
    gap = {"acc": mean["acc"] - merged_["acc"], "loss": merged_["loss"] - mean["loss"]}
    return {"merged": merged_, "endpoints": ends, "endpoint_mean": mean, "ensemble": ensemble, "gap": gap}
