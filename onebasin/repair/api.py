"""REPAIR's entry points: `repair` (two endpoints, exact or closed form), `correct` (any goals), their
result, and `repair_errors` (how far a result is from its goals)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..graph import Captured, capture, model_inputs
from ..interpolate import lerp
from ..spec import PermutationSpec, Site
from ..stats import eval_mode, takes_precision
from .affine import affine_to_goal
from .fuse import fuse_corrections
from .measure import EndpointStats, endpoint_stats, site_stats
from .sites import KINDS, first_input, spec_and_sites
from .sweep import exact_corrections

METHODS = ("exact", "closed")


@dataclass
class SiteRepair:
    """The correction of one site: goal, statistics before it, the affine map, whether it was folded."""

    site: Site
    level: int  # exact: the site's dependency level; closed: 0
    goal_mean: torch.Tensor  # (units,) float64
    goal_std: torch.Tensor
    before_mean: torch.Tensor  # measured with earlier corrections in place (exact) or predicted by eq. 5 (closed)
    before_std: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    ndim: int  # number of axes of the site's activation tensor
    fused: bool = False  # folded into the producing layer (else a RepairAffine module)


@dataclass
class RepairResult:
    """A REPAIRed interpolated network and what was done to it."""

    model: nn.Module  # original class if `fused`, else a Repaired<Class> GraphModule with RepairAffine modules
    method: str
    alpha: float
    passes: int  # forward passes over the calibration data through the interpolated net (closed: 0)
    stats: list[SiteRepair]
    peak_bytes: int = 0  # exact: peak bytes of activations kept by the sweep
    note: str = ""  # e.g. why the per-level fallback was used
    graph: Captured | None = field(default=None, repr=False)  # the architecture's graph (sites name its nodes)

    @property
    def fused(self) -> bool:
        return all(s.fused for s in self.stats)

    @property
    def unfused(self) -> list[str]:
        """Graph nodes whose correction stays a RepairAffine module (`repair_<node>`)."""
        return [s.site.node for s in self.stats if not s.fused]

    @property
    def affines(self) -> dict[str, int]:
        """node -> unit axis of each unfused correction: what `restore_affines` needs to reload the model."""
        return {s.site.node: s.site.dim for s in self.stats if not s.fused}

    def summary(self) -> list[dict]:
        """One JSON-ready row per site: node, kind, level, fused, mean std ratio before (actual / goal)."""
        return [
            {"node": s.site.node, "kind": s.site.kind, "level": s.level, "fused": s.fused,
             "std_ratio_before": float((s.before_std / s.goal_std.clamp_min(1e-300)).mean())}
            for s in self.stats
        ]  # fmt: skip


@takes_precision
def correct(
    model: nn.Module,
    sites: list[Site],
    goal_mean: list[torch.Tensor],
    goal_std: list[torch.Tensor],
    data: Iterable,
    *,
    graph: Captured | None = None,
    method: str = "exact",
    max_examples: int | None = 5000,
    fuse: bool = True,
    ndims: list[int] | None = None,
    max_memory: int | None = 4 << 30,
    alpha: float = float("nan"),
    precision: str | None = None,
) -> RepairResult:
    """REPAIR `model` so that each site's units reach the goal mean and std (float64 (units,) per site).

    The exact variant of Jordan et al. 2022, Sec. 4.2, for any goals (two endpoints: eqs. 3-4; N models:
    their weighted means). `graph` is the model's captured graph (captured from the first batch if None).
    `precision`: of the statistics ("float64" or "float32", see `repair`). Returns a RepairResult (method
    "exact", passes 1 for the one-sweep path).
    """
    if method != "exact":
        raise ValueError("correct() computes exact corrections; closed form needs endpoint statistics (repair())")
    graph = graph or capture(model, next(model_inputs(model, [first_input(data)])))
    ndims = ndims or [len(graph.node(s.node).meta["val"].shape) for s in sites]
    return _exact(model, graph, model.state_dict(), sites, goal_mean, goal_std, ndims, data, max_examples, max_memory, fuse, alpha)


def _exact(model, graph, state, sites, goal_mean, goal_std, ndims, data, max_examples, max_memory, fuse, alpha) -> RepairResult:
    """Exact corrections of the network `state` (model's architecture) towards the goals, then fused."""
    with eval_mode(model):
        ex = exact_corrections(graph, state, sites, goal_mean, goal_std, data, max_examples, max_memory)
    rows = [SiteRepair(s, lv, gm, gs, m, sd, *ex.corrections[s.node][:2], nd)
            for s, lv, gm, gs, m, sd, nd in zip(sites, ex.levels, goal_mean, goal_std, ex.means, ex.stds, ndims)]  # fmt: skip
    return _fused(model, graph, state, rows, fuse, "exact", alpha, ex.passes, ex.peak_bytes, ex.note)


def _fused(model, graph, state, rows, fuse, method, alpha, passes, peak_bytes=0, note="") -> RepairResult:
    """The RepairResult of correction rows applied to `state`, folded where possible (`fuse`)."""
    out, folded = fuse_corrections(model, graph, state, rows, fuse)
    rows = [dataclasses.replace(r, fused=f) for r, f in zip(rows, folded)]
    return RepairResult(out, method, alpha, passes, rows, peak_bytes, note, graph)


@takes_precision
def repair(
    model_a: nn.Module,
    model_b: nn.Module,
    alpha: float,
    data: Iterable,
    *,
    spec: PermutationSpec | None = None,
    method: str = "exact",
    max_examples: int | None = 5000,
    sites: Iterable[str] | list[Site] = KINDS,
    fuse: bool = True,
    endpoints: EndpointStats | None = None,
    max_memory: int | None = 4 << 30,
    precision: str | None = None,
) -> RepairResult:
    """REPAIR the network interpolated between A and B at `alpha` (Jordan et al. 2022, Sec. 4, eqs. 3-5).

    Args:
        model_a, model_b: endpoints of one architecture, B already aligned to A; not modified.
        alpha: interpolation weight in [0, 1] (0 is A).
        data: re-iterable calibration batches, x or (x, y, ...) with x e.g. (N, 3, 32, 32); the first
            `max_examples` examples are used (paper: ~5,000 training examples).
        spec: A's PermutationSpec (traced on the first batch when None).
        method: "exact" (one forward sweep) or "closed" (eq. 5, no pass).
        sites: site kinds to correct, ("layer", "block") by default, or an explicit list of Sites.
        fuse: fold corrections into the preceding layer where possible (False: keep all as RepairAffine).
        endpoints: precomputed `endpoint_stats` (reuse across alphas); computed from `data` when None.
        max_memory: bytes of activations the one-sweep exact REPAIR may keep (None: no limit); above
            it, one streaming pass per dependency level (RepairResult.note says so).
        precision: "float64" (exact float64 sums) or "float32" (shifted float32 products added into float64
            sums: faster, ~1e-6 relative error; stats.Moments) for every statistic; None: the enclosing stats.statistics_precision, float32 by default.
    Returns:
        RepairResult with `.model` (corrected interpolated net), `.stats` (per site), `.passes`, `.fused`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown REPAIR method {method!r}; valid methods: {list(METHODS)}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    ends = endpoints if endpoints is not None else endpoint_stats(model_a, model_b, data, spec, sites, max_examples)
    graph = ends.graph or spec_and_sites(model_a, data, spec, ends.sites)[0]
    goal_mean, goal_std = ends.goal(alpha)
    state = lerp(model_a.state_dict(), model_b.state_dict(), alpha)
    if method == "closed":
        eps = torch.finfo(next(v for v in state.values() if v.is_floating_point()).dtype).eps
        before_mean, before_std = ends.predicted(alpha)
        pairs = [affine_to_goal(*row, eps) for row in zip(before_mean, before_std, goal_mean, goal_std)]
        rows = [SiteRepair(s, 0, gm, gs, bm, bs, sc, sh, nd) for s, gm, gs, bm, bs, (sc, sh), nd in
                zip(ends.sites, goal_mean, goal_std, before_mean, before_std, pairs, ends.ndims)]  # fmt: skip
        return _fused(model_a, graph, state, rows, fuse, method, float(alpha), 0)
    return _exact(model_a, graph, state, ends.sites, goal_mean, goal_std, ends.ndims, data, max_examples, max_memory, fuse, float(alpha))


def repair_errors(result: RepairResult, data: Iterable, max_examples: int | None = 5000, graph: Captured | None = None) -> list[dict]:
    """How far `result.model`'s statistics are from the goals on `data` (one pass), per site.

    Returns rows {node, kind, mean_err, std_err, std_err_mean}: the largest |mean - goal_mean| and
    |std - goal_std| over the site's units, each divided by that unit's goal std (relative to the unit's
    scale), and the mean over units of the latter.
    """
    sites = [s.site for s in result.stats]
    means, stds = site_stats(result.model, sites, data, max_examples, graph or result.graph)
    rows = []
    for s, mean, std in zip(result.stats, means, stds):
        unit = s.goal_std.clamp_min(1e-300)
        rows.append({"node": s.site.node, "kind": s.site.kind,
                     "mean_err": float(((mean - s.goal_mean).abs() / unit).max()),
                     "std_err": float(((std - s.goal_std).abs() / unit).max()),
                     "std_err_mean": float(((std - s.goal_std).abs() / unit).mean())})  # fmt: skip
    return rows
