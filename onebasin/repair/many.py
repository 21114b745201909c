"""N-way REPAIR: correct the average of N aligned networks towards the weighted mean of their unit statistics.

The goals generalise Jordan et al. 2022, eqs. 3-4 from two endpoints (weights 1 - alpha and alpha) to N:

    E[X_merged] = sum_i w_i E[X_i],    std(X_merged) = sum_i w_i std(X_i),

with the N endpoints' statistics taken in one pass (N forwards per batch), and the corrections computed
exactly as two-model REPAIR does (`api.correct`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from ..spec import PermutationSpec, Site
from ..stats import joint_moments, takes_precision
from .api import RepairResult, correct
from .sites import KINDS, select_sites


def goal_statistics(
    models: Sequence[nn.Module], sites: list[Site], weights: Sequence[float], data: Iterable, max_examples: int | None = 5000,
    graph=None, precision: str | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Goals of N-way REPAIR at each site: sum_i w_i E[X_i] and sum_i w_i std(X_i) (eqs. 3-4 with N weights).

    `models` are the aligned endpoints (unit u of each in the same universe slot); one pass, N forwards per batch;
    precision: of the sums (`stats.joint_moments`; None: the enclosing `statistics_precision`).
    Returns ([(units,) float64 goal mean per site], [goal std per site]).
    """
    moments, _ = joint_moments(models, sites, data, max_examples, cross=False, graph=graph, precision=precision)
    w = torch.tensor(list(weights), dtype=torch.float64)[:, None]
    means, stds = [], []
    for m in moments:
        mean, std = m.mean_x.cpu().reshape(len(models), -1), m.var_x.sqrt().cpu().reshape(len(models), -1)
        means.append((w * mean).sum(0))
        stds.append((w * std).sum(0))
    return means, stds


@takes_precision
def repair_many(
    merged: nn.Module, aligned: Sequence[nn.Module], weights: Sequence[float], data: Iterable, spec: PermutationSpec,
    *, sites: Iterable[str] = KINDS, max_examples: int | None = 5000, precision: str | None = None,
) -> RepairResult:
    """Exact N-way REPAIR of `merged`, the weighted average of the `aligned` endpoints (units in one order).

    Args:
        merged: the averaged network; aligned: the N endpoints in the universe's unit order; weights: N weights
            summing to 1; data: calibration batches (first `max_examples` inputs); spec: the traced spec;
        sites: the site kinds to correct ("layer", "block", ...: `select_sites`);
        precision: of every statistic, goals and corrections ("float32" | "float64"; None: the enclosing
            `stats.statistics_precision`, float32 by default).
    Returns:
        `api.correct`'s RepairResult: the corrected model (of merged's class when every correction folds).
    """
    chosen = select_sites(spec, tuple(sites))
    goal_mean, goal_std = goal_statistics(aligned, chosen, weights, data, max_examples, spec.graph)
    return correct(merged, chosen, goal_mean, goal_std, data, graph=spec.graph, max_examples=max_examples)
