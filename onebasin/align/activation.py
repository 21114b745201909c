"""Activation matching (Li, Yosinski, Clune, Lipson, Hopcroft 2015, "Convergent learning"; as used by
REPAIR, Jordan et al. 2022, Sec. 2, eq. 2).

For every group, P maximises sum_i corr(X_A[i], X_B[P i]) over the data, where X are the group's unit
activations at its sites; a group read at several sites (a residual stream: every block output and
every layer writing into it) sums their correlation matrices. All statistics come from ONE pass over
the data with one forward of each network per batch: permuting earlier layers of B changes only the
order of a later layer's units, never their values, so every group can be matched from the same pass.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn as nn

from ..spec import PermutationSpec
from ..graph import batch_size, model_inputs, take_rows
from ..distributed import batches, distributed, gathered, spread_owners
from ..stats import Moments, eval_mode, owned_moments, pack_passes, paired_shapes, rows_per_slice, sum_bytes
from ..taps import SiteTaps, visit_pairs
from ._registry import AlignResult, all_reduce_count, device_of, matched, register_method, require_module, weights_of
from ._structured import family_root, solve_families
from .weight import match_weights


def site_moments(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data,
    *,
    max_examples: int | None = 10_000,
    device=None,
    max_memory: int | None = 1 << 30,
    precision: str | None = None,
    groups: list[str] | None = None,
) -> tuple[dict[str, list[Moments]], int]:
    """Paired moments of A's and B's activations at every group's sites, in one pass.

    Args:
        spec: groups with their `sites` (groups without sites are skipped).
        model_a, model_b: the networks (run in eval mode, restored afterwards).
        data: iterable of x or (x, y) batches; at most `max_examples` inputs are used. Under
            torch.distributed each rank reads its shard (distributed.batches) and the sums are all-reduced.
        max_memory: bytes the tapped activations of A and B may hold at once: a batch whose sites would
            need more runs in slices of rows (the sums do not depend on it; None: whole batches).
        precision: "float64" (exact sums) or "float32" (shifted float32 products into float64 sums: stats.Moments);
            None: the enclosing stats.statistics_precision (float32, the default, outside any).
        groups: the groups to measure (default: every group with sites).
    Returns:
        ({group: [Moments(paired=True) per site, x = A's units (samples, n), y = B's units]}, examples).
        Conv activations (N, C, H, W) count as N*H*W samples of C units. (Activation matching under
        torch.distributed holds each site's sums on one rank instead: `_owned_site_moments`.)
    """
    groups = [g for g in spec.groups.values() if g.sites and (groups is None or g.name in groups)]
    sites = [s for g in groups for s in g.sites]
    moments = [Moments(paired=True, precision=precision) for _ in sites]
    rows = rows_per_slice(spec.graph, sites, max_memory)
    examples = 0

    def visit(k, a, b):
        moments[k].update_pair(a, b, sites[k])

    with torch.no_grad(), eval_mode(model_a, model_b):
        for x in model_inputs(model_a, batches(data, max_examples, device_of(model_a, device))):
            n = batch_size(x)
            for start in range(0, n, rows or n):
                part = x if rows is None or rows >= n else take_rows(x, slice(start, start + rows))
                visit_pairs(model_a, model_b, sites, spec.graph, part, visit)
            examples += n
    for m in moments:
        m.all_reduce_()
    it = iter(moments)
    return {g.name: [next(it) for _ in g.sites] for g in groups}, all_reduce_count(examples)


def correlation_matrix(moments: list[Moments]) -> torch.Tensor:
    """(n, n) float64 sum over a group's sites of corr(unit i of A, unit j of B)."""
    return sum(m.corr_xy().cpu() for m in moments)


@register_method(name="activation", reference="Li et al. 2015, Convergent learning: do different neural networks learn the same representations?, arXiv:1511.07543")
def activation_matching(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data=None,
    *,
    max_examples: int | None = 10_000,
    device=None,
    max_memory: int | None = 1 << 30,
    precision: str | None = None,
) -> AlignResult:
    """Align B to A by maximising the summed correlation of matched units (Li et al. 2015; REPAIR eq. 2).

    Args:
        spec: PermutationSpec whose groups carry sites (from `trace`, or `from_groups(..., sites=)`).
        model_a, model_b: nn.Modules of the same architecture; data: iterable of x or (x, y) batches.
        max_examples: inputs read from `data`; device: where to run (default: model A's device).
        max_memory: bytes the tapped activations of one batch may hold (larger batches run in row slices).
        precision: "float64" or "float32" statistics (stats.Moments; float32: relative error ~1e-6); None: the
            enclosing stats.statistics_precision, as align(..., precision=) sets it.
    Returns:
        AlignResult; record: iterations (1), objective {group: mean matched correlation} and
        identity {group: the same before alignment}, examples, seconds, weight_fallback (groups without
        sites, which are matched by weight matching with every other group held at its activation match).
    """
    if data is None:
        raise ValueError("activation matching needs data: an iterable of x or (x, y) batches")
    t0 = time.perf_counter()
    require_module(model_a, "activation"), require_module(model_b, "activation")
    passes = statistics_passes(spec, max_memory)
    world = distributed()[1]
    solved, examples, peak = {"perms": {}, "objective": {}, "identity": {}, "site_stats": {}, "plain": {}}, 0, 0
    for groups in passes:  # each pass: the sums of whole families only, solved and freed before the next
        options = {"max_examples": max_examples, "device": device, "max_memory": max_memory, "precision": precision}
        if world == 1:
            moments, examples = site_moments(spec, model_a, model_b, data, groups=groups, **options)
            held = sum(m.nbytes for ms in moments.values() for m in ms)
        else:  # each rank holds, and solves, the families it owns; the (small) solutions are shared
            owners = family_owners(spec, groups, world)
            moments, examples, held = _owned_site_moments(spec, [spec.groups[g] for g in groups], model_a, model_b, data,
                                                          owners, **options)
        peak = max(peak, held)
        part = _solve(spec, moments)
        del moments
        for got in gathered(part) if world > 1 else [part]:
            for k in solved:
                solved[k] |= got[k]
    perms = solved["perms"]
    fallback = [g for g in spec.groups if g not in perms]
    if fallback:
        perms, _ = match_weights(spec, weights_of(model_a), weights_of(model_b), init=perms, groups=fallback)
    record = {"method": "activation", "iterations": 1, "objective": solved["objective"], "identity": solved["identity"],
              "examples": examples, "weight_fallback": fallback, "statistics_passes": len(passes),
              "statistics_bytes": peak, "seconds": time.perf_counter() - t0}  # fmt: skip
    return AlignResult(perms, record, site_stats=solved["site_stats"], plain_site_stats=solved["plain"])


def _solve(spec: PermutationSpec, moments: dict[str, list[Moments]]) -> dict[str, dict]:
    """The permutations of the families whose moments are given, the matched and unmatched mean correlations
    of each group (objective, identity), and the per-unit statistics of A and the aligned / unaligned B."""
    corrs = {name: correlation_matrix(ms) for name, ms in moments.items()}
    roots = {family_root(spec, g) for g in corrs}
    perms = solve_families(spec, corrs, [g for g in spec.groups if family_root(spec, g) in roots])
    out = {"perms": perms, "objective": {}, "identity": {}, "site_stats": {}, "plain": {}}
    for name, corr in corrs.items():
        units = corr.shape[0] * len(moments[name])
        identity = torch.arange(len(perms[name]))
        out["objective"][name] = matched(corr, perms[name]) / units
        out["identity"][name] = matched(corr, identity) / units
        out["site_stats"][name] = [{k: v.cpu() for k, v in aligned_stats(m, perms[name]).items()} for m in moments[name]]
        out["plain"][name] = [{k: v.cpu() for k, v in aligned_stats(m, identity).items()} for m in moments[name]]
    return out


def statistics_passes(spec: PermutationSpec, max_memory: int | None) -> list[list[str]]:
    """The groups with sites, packed into passes over the data whose float64 sums (per site: the (n, n) cross
    sums and four (n,) per-unit sums, 8 bytes each) fit in `max_memory` bytes; a family of structured groups
    (spec.parent) stays in one pass, and a family larger than the budget has a pass of its own. None: one pass."""
    families: dict[str, list[str]] = {}
    for g in spec.groups.values():
        if g.sites:
            families.setdefault(family_root(spec, g.name), []).append(g.name)
    passes = pack_passes({root: _sum_bytes(spec, names) for root, names in families.items()}, max_memory)
    return [[g for root in roots for g in families[root]] for roots in passes]


def aligned_stats(m: Moments, p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-unit mean, variance and covariance of A's unit i with the aligned B's unit i (B's unit p[i]), float64
    (units,) each, from the paired moments of A and the unaligned B (their full cross sums hold every pair)."""
    p = p.to(m.sums["xy"].device)
    return {"mean_a": m.mean_x, "var_a": m.var_x, "mean_b": m.mean_y[p], "var_b": m.var_y[p],
            "cov_ab": m.cov_xy_matched(p)}


def _owned_site_moments(spec, groups, model_a, model_b, data, owners, *, max_examples, device, max_memory, precision):
    """site_moments under torch.distributed with site ownership: every site's sums are held by one rank only
    (`owners`: group -> rank; `stats.owned_moments`: partial sums of each row slice reduced to the owner).
    Returns (the owned groups' moments, examples, peak bytes of sums held at once on this rank)."""
    sites = [(g, s) for g in groups for s in g.sites]
    taps_a = SiteTaps(model_a, [s for _, s in sites], spec.graph, False)
    taps_b = SiteTaps(model_b, [s for _, s in sites], spec.graph, False)
    rows = rows_per_slice(spec.graph, [s for _, s in sites], max_memory)
    dev, seen = device_of(model_a, device), [0]

    def chunks():
        for x in model_inputs(model_a, batches(data, max_examples, dev)):
            seen[0] += batch_size(x)
            for i in range(0, batch_size(x), rows or batch_size(x)):
                part = take_rows(x, slice(i, i + rows)) if rows else x
                acts = (taps_a(part)[1], taps_b(part)[1])
                yield acts
                del acts

    def update(m, acts, k):
        m.update_pair(acts[0][k], acts[1][k], sites[k][1])

    new = functools.partial(Moments, paired=True, precision=precision)
    with torch.no_grad(), eval_mode(model_a, model_b):
        mine, held = owned_moments(new, chunks(), update, [owners[g.name] for g, _ in sites],
                                   [paired_shapes(g.size) for g, _ in sites])
    owned = {}
    for k, (g, _) in enumerate(sites):
        if k in mine:
            owned.setdefault(g.name, []).append(mine[k])
    return owned, all_reduce_count(seen[0]), held


def family_owners(spec: PermutationSpec, groups: list[str], world: int) -> dict[str, int]:
    """group -> rank owning its statistics: whole families, the largest first, each to the rank holding the
    fewest bytes of sums so far (`distributed.spread_owners`: each rank holds about 1 / world of them)."""
    families: dict[str, list[str]] = {}
    for g in groups:
        families.setdefault(family_root(spec, g), []).append(g)
    owners = spread_owners({root: _sum_bytes(spec, names) for root, names in families.items()}, world)
    return {g: owners[root] for root, names in families.items() for g in names}


def _sum_bytes(spec: PermutationSpec, groups: list[str]) -> int:
    """float64 bytes of the paired sums of these groups' sites: per site (n, n) cross sums and four (n,) sums."""
    return sum(len(spec.groups[g].sites) * sum_bytes(paired_shapes(spec.groups[g].size)) for g in groups)
