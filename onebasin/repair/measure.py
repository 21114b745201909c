"""What REPAIR measures: per-unit statistics of a (corrected) network at its sites, and the endpoint
statistics of A and B that give the goals of eqs. (3)-(4) and the closed-form prediction of eq. (5)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..graph import Captured, capture, model_inputs, walk
from ..spec import PermutationSpec, Site
from ..stats import Moments, eval_mode, takes_precision
from .affine import RepairAffine, affine
from .sites import KINDS, calibration, first_input, select_sites, spec_and_sites


@dataclass
class Corrected:
    """A network as the graph's weights plus corrections at some nodes (node -> (scale, shift, dim))."""

    graph: Captured
    state: dict
    corrections: dict = field(default_factory=dict)

    def moments(self, sites: list[Site], chunks: list) -> list[Moments]:
        """Per-unit sums (stats.Moments, the enclosing precision) at `sites` over this process's input chunks
        (`_chunks`), corrections applied, one streaming pass; all-reduced over processes."""
        moments = {s.node: Moments() for s in sites}
        sites_by = {s.node: s for s in sites}

        def visitor(name):
            def visit(values):
                if name in self.corrections:
                    values = [affine(v, *self.corrections[name], in_place=True) for v in values]  # walk's own copies
                if name in moments:
                    for v in values:
                        moments[name].update_units(v, sites_by[name])
                return values

            return visit

        nodes = set(moments) | set(self.corrections)
        visits = {n: visitor(n) for n in nodes}
        for x in chunks:
            if self.corrections:
                walk(self.graph, self.state, [x], moments, visits)
            else:
                values = self.graph.run(self.state, x, list(moments), outputs=False)
                for name, v in zip(moments, values):
                    moments[name].update_units(v, sites_by[name])
        return [moments[s.node].all_reduce_() for s in sites]


def as_corrected(model: nn.Module, graph: Captured) -> Corrected:
    """A model (plain, or a Repaired wrapper) as graph weights plus corrections."""
    state = model.state_dict()
    corrections = {}
    for name, mod in model.named_modules():
        if isinstance(mod, RepairAffine):
            corrections[name.removeprefix("repair_")] = (mod.weight.detach(), mod.bias.detach(), mod.dim)
    base = {k: v for k, v in state.items() if not k.startswith("repair_")}
    return Corrected(graph, base, corrections)


def site_moments(model: nn.Module, sites: list[Site], data: Iterable, max_examples: int | None = 5000, graph: Captured | None = None) -> list[Moments]:
    """Exact float64 per-unit sums of `model`'s activations at `sites` (a Repaired wrapper: after its corrections).

    Returns one Moments per site (x: (samples, units), conv positions pooled as samples).
    """
    graph = graph or capture(model, next(model_inputs(model, [first_input(data)])))
    with eval_mode(model):
        return as_corrected(model, graph).moments(sites, calibration(graph, data, max_examples))


def site_stats(model: nn.Module, sites: list[Site], data: Iterable, max_examples: int | None = 5000, graph: Captured | None = None):
    """Per-unit mean and std (population, float64, (units,) each) of `model` at every site, one pass."""
    moments = site_moments(model, sites, data, max_examples, graph)
    return [m.mean_x for m in moments], [m.var_x.sqrt() for m in moments]


# --- endpoint statistics: the goals of eqs. (3)-(4) and the prediction of eq. (5) ----------------------


@dataclass
class EndpointStats:
    """Per-unit statistics of A and B at each site (float64 (units,) tensors), from one paired pass."""

    sites: list[Site]
    mean_a: list[torch.Tensor]
    var_a: list[torch.Tensor]
    mean_b: list[torch.Tensor]
    var_b: list[torch.Tensor]
    cov_ab: list[torch.Tensor]
    ndims: list[int]  # number of axes of each site's activation tensor
    graph: Captured | None = field(default=None, repr=False)

    def goal(self, alpha: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Goal mean and std of every unit: eqs. (3) and (4)."""
        means = [(1 - alpha) * a + alpha * b for a, b in zip(self.mean_a, self.mean_b)]
        stds = [(1 - alpha) * a.sqrt() + alpha * b.sqrt() for a, b in zip(self.var_a, self.var_b)]
        return means, stds

    def predicted(self, alpha: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Mean and std of X_alpha = (1-a) X_A + a X_B (eq. 5): the interpolated unit's, exactly, in a first layer."""
        means = [(1 - alpha) * a + alpha * b for a, b in zip(self.mean_a, self.mean_b)]
        var = [
            (1 - alpha) ** 2 * va + alpha**2 * vb + 2 * alpha * (1 - alpha) * c
            for va, vb, c in zip(self.var_a, self.var_b, self.cov_ab)
        ]
        return means, [v.clamp_min(0).sqrt() for v in var]


@takes_precision
def endpoint_stats(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable,
    spec: PermutationSpec | None = None,
    sites: Iterable[str] | list[Site] = KINDS,
    max_examples: int | None = 5000,
    precision: str | None = None,
) -> EndpointStats:
    """Means, variances and per-unit cross-covariance of A and B (B aligned to A) at the selected sites.

    Args:
        model_a, model_b: the endpoints (same architecture; unit i of B is matched to unit i of A).
        data: re-iterable of x or (x, y, ...) batches; the first `max_examples` examples are used.
        spec: A's PermutationSpec (traced on the first batch when None).
        sites: site kinds ("layer", "block") or an explicit list of Sites.
        precision: of the sums, "float64" or "float32" (stats.Moments); None: the enclosing one (float32 by default).
    Returns:
        EndpointStats: one paired pass of A and B over the data (both in eval mode).
    """
    graph, site_list = spec_and_sites(model_a, data, spec, sites)
    names = [s.node for s in site_list]
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    moments, ndims = [Moments(paired=True) for _ in site_list], [0] * len(site_list)

    def visit(i, a, b):
        moments[i].update_pair(a, b, site_list[i], cross="diag")  # unit i of A with unit i of B: the per-unit covariance
        ndims[i] = a.ndim

    for x in calibration(graph, data, max_examples):
        graph.run_paired(sd_a, sd_b, x, names, visit)
    return _split_paired(site_list, [m.all_reduce_() for m in moments], ndims, graph)


def endpoints_from_alignment(spec: PermutationSpec, site_stats: dict | None, sites: Iterable[str] = KINDS) -> EndpointStats | None:
    """The EndpointStats of A and the aligned B at the REPAIR sites of the given kinds, assembled from an
    alignment's own statistics (`AlignResult.site_stats`, from the same data), without another pass.

    A site that is a part of a fused projection is assembled from the parts of every group that reads it.
    Returns None when there are no such statistics or they do not cover every site (then measure them
    with `endpoint_stats`).
    """
    if not site_stats or spec.graph is None:
        return None
    parts: dict[tuple[str, int], list] = {}  # (node, unit axis) -> [(start, size, statistics)]
    for g in spec.groups.values():
        for s, st in zip(g.sites, site_stats.get(g.name, [])):
            parts.setdefault((s.node, s.dim), []).append((s.start, s.size, st))
    chosen, cols = select_sites(spec, sites), {k: [] for k in ("mean_a", "var_a", "mean_b", "var_b", "cov_ab")}
    ndims = []
    for site in chosen:
        shape = spec.graph.node(site.node).meta["val"].shape
        n = shape[site.dim]
        pieces = sorted({(start, n - start if size is None else size): st for start, size, st in parts.get((site.node, site.dim), [])}.items())
        at = 0
        for (start, size), _ in pieces:  # the pieces must tile the unit axis: [0, n) in order, no gap or overlap
            if start != at:
                return None
            at += size
        if at != n:
            return None
        for k in cols:
            cols[k].append(torch.cat([st[k] for _, st in pieces]))
        ndims.append(len(shape))
    return EndpointStats(chosen, **cols, ndims=ndims, graph=spec.graph)


def _split_paired(sites: list[Site], moments: list[Moments], ndims: list[int], graph) -> EndpointStats:
    """EndpointStats from paired Moments whose cross sums are per unit (diagonal)."""
    cols = {k: [] for k in ("mean_a", "var_a", "mean_b", "var_b", "cov_ab")}
    for m in moments:
        cols["mean_a"].append(m.mean_x)
        cols["var_a"].append(m.var_x)
        cols["mean_b"].append(m.mean_y)
        cols["var_b"].append(m.var_y)
        cols["cov_ab"].append(m.cov_xy_diag)
    return EndpointStats(sites, **cols, ndims=ndims, graph=graph)
