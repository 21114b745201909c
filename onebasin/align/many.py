"""Merge N networks of one architecture into one: align all of them into a shared unit order, average, REPAIR.

    merged, result = onebasin.merge_many([m0, m1, m2], method="universe", repair="exact", data=loader)
    result.perms[i]   # {group: LongTensor}: apply_perms(spec, result.perms[i], sd_i) is model i in the universe

Every method gives one permutation p_i per model into a shared unit order, the *universe* (universe unit u
of model i is its unit p_i[u], the permute.py convention). The merged network is the weighted mean of the
permuted models; N-way REPAIR then gives every unit the weighted mean of the N endpoints' means and stds
(Jordan et al. 2022, eqs. 3-4 with N weights instead of 1 - alpha and alpha).

Methods (`alignment` chooses the pairwise score: "activation", the correlation of unit activations, Li et
al. 2015; or "weight", inner products of weights, Ainsworth et al. 2022):

* "anchor": every model aligned to model 0 by pairwise matching; model 0's order is the universe.
* "mergemany": Ainsworth, Hayase, Srinivasa 2022 (Git Re-Basin, Sec. 4 "MergeMany"): start unaligned and
  align each model, in a random order, to the mean of the others in the current universe, until a whole
  sweep changes nothing. Weight alignment: weight matching to the mean of the others' permuted weights
  (the paper's algorithm). Activation alignment: a unit's score is its correlation with the mean of the
  others' matched units, from the joint second moments (no further pass over the data).
* "universe": the multi-model objective of C2M3 (Crisostomi et al. 2024): the sum over ALL pairs of the
  pairwise score of the induced maps P_j^-1 P_i. Started by permutation synchronisation (Pachauri, Kondor,
  Singh 2013: the n leading eigenvectors of the block matrix of the N(N-1)/2 optimal pairwise matchings,
  rounded to one permutation per model), then block-coordinate ascent: with the other models held fixed the
  objective is linear in model k's permutation, so its exact maximiser is one linear assignment.

Why synchronisation + block-coordinate ascent, not C2M3's Frank-Wolfe: the exact block update never lowers
the objective and the loop ends (a sweep that changes nothing), with no step size and no rounding, whereas
Frank-Wolfe walks through doubly-stochastic matrices, needs a line search per step and a final projection
that can undo what the steps gained. The spectral start uses every pairwise matching at once: no model is
privileged (as in "anchor") and the start is not the blur of unaligned models (MergeMany's). With
activation alignment every group is solved on its own (a unit's activations do not depend on the other
groups' permutations). With weight alignment the block update of one model is weight matching to the sum
of the others, i.e. MergeMany's step, so there the two methods differ only in where they start.

Cycle consistency. For maps derived from one permutation per model, P_ij = P_j^-1 P_i, going round any cycle
i -> j -> k -> i is the identity, so every method here scores 1.0 by construction (`cycle_consistency`).
`pairwise_consistency` is the same measure for the N(N-1)/2 independently computed pairwise matchings (what
pairwise alignment would give), `pairwise_agreement` the fraction of units on which a method's P_ij agrees
with that direct matching.

Measured (docs/results.md, section 7; shortened-recipe MLPs and ResNet20s, 2-8 models): universe reaches
the highest objective and always converges, but its merged accuracy after REPAIR is within the noise of
MergeMany's and anchor's (better on 7 of 15 settings on average, worse by 0.2-0.9 points on every 4-layer
MLP setting).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import check_example_input, check_finite, check_same_architecture, check_same_dtype, first_input
from ..errors import EmptyDataError, InvalidOptionError, OnebasinError
from ..graph import batch_size, describe_input, model_inputs, take_rows
from ..interpolate import evaluate
from ..permute import Perms, StateDict, permute_model
from ..repair import KINDS, correct, reset_bn, select_sites
from ..spec import PermutationSpec, Site, trace
from ..stats import Moments, SiteTaps, accumulate_product, batches, eval_mode, site_matrix
from ._registry import all_reduce_count, assign, device_of, matched, weights_of
from .weight import match_weights, other_axes_permuted

METHODS = ("universe", "mergemany", "anchor")
ALIGNMENTS = ("activation", "weight")
REPAIRS = ("exact", "reset_bn", "none")
Pairwise = dict[tuple[int, int], Perms]  # (i, j), i < j -> {group: q}: unit u of model i matches unit q[u] of model j


@dataclass
class ManyResult:
    """What `merge_many` did and measured: JSON-ready via `to_dict`."""

    method: str  # "universe" | "mergemany" | "anchor" | "none" (plain averaging)
    alignment: str  # "activation" | "weight"
    repair: str  # "exact" | "reset_bn" | "none"
    weights: list[float]  # of each model in the average and in the REPAIR goals, summing to 1
    perms: list[Perms]  # per model: apply_perms(spec, perms[i], sd_i) is model i in the universe
    cycle_consistency: float | None  # of the maps P_j^-1 P_i over all triples (None for N < 3): 1.0 by construction
    pairwise_consistency: float | None  # of the direct pairwise matchings (None for N < 3 or method "none")
    pairwise_agreement: float | None  # fraction of units where P_j^-1 P_i equals the direct pairwise matching of (i, j)
    record: dict = field(default_factory=dict)  # sweeps, converged, objective (activation), examples
    seconds: dict = field(default_factory=dict)  # statistics, align, average, repair, diagnostics, total
    repair_passes: int = 0
    fused: bool = True  # False: the model holds RepairAffine modules (see `affines`)
    affines: dict = field(default_factory=dict)  # fx node -> unit axis of each unfused correction
    example_input: dict = field(default_factory=dict)  # shapes/dtypes of the input (rebuilds the graph on reload)

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out["perms"] = [{g: p.tolist() for g, p in perms.items()} for perms in self.perms]
        return out


# --- statistics ----------------------------------------------------------------------------------------


def joint_moments(
    models: Sequence[nn.Module], sites: list[Site], data: Iterable, max_examples: int | None = 5000, cross: bool = True,
    chunk: int = 64, graph=None,
) -> tuple[list[Moments], int]:
    """Float64 sums of [units of model 0 | ... | model N-1] at every site, in ONE pass (N forwards per batch).

    Returns (one Moments per site over (samples, N * units) columns: count, per-unit sums and sums of squares,
    and with `cross` the cross sums between models, sums[f"xy{i}"] = x_i^T [x_{i+1} | ... | x_{N-1}] of shape
    (units, (N-1-i) * units) for i < N-1; examples read). The within-model cross sums x_i^T x_i are not
    computed: no method reads them (only the variances on their diagonals), so the products are (N-1)/(2N)
    of the whole Gram matrix's (2.5x fewer for 5 models). `_blocks` assembles the covariances.
    Conv activations (B, C, H, W) count as B*H*W samples. Models run in eval mode, on at most `chunk` inputs
    at a time (every site of N models is held at once; the sums do not depend on it). `graph`: the captured
    graph the sites' node names refer to (`spec.graph`).
    """
    taps = [SiteTaps(m, sites, graph, outputs=False) for m in models]
    moments = [Moments() for _ in sites]
    examples = 0
    with torch.no_grad(), eval_mode(*models):
        for x in model_inputs(models[0], batches(data, max_examples, device_of(models[0]))):
            n = batch_size(x)
            for start in range(0, n, chunk):
                acts = [tap(take_rows(x, slice(start, start + chunk)))[1] for tap in taps]
                for i, (m, s) in enumerate(zip(moments, sites)):
                    joint = torch.cat([site_matrix(a[i], s) for a in acts], 1)  # (samples, N * units)
                    m.update(joint)
                    if cross:
                        _add_cross_sums(m.sums, joint, len(models))
                del acts
            examples += n
    return [m.all_reduce_() for m in moments], all_reduce_count(examples)


def _add_cross_sums(sums: dict[str, torch.Tensor], joint: torch.Tensor, n_models: int) -> None:
    """sums[f"xy{i}"] += x_i^T [x_{i+1} | ... ] for a (samples, N * units) block (model i's units: columns i*n..)."""
    n = joint.shape[1] // n_models
    for i in range(n_models - 1):
        accumulate_product(sums, f"xy{i}", joint[:, i * n:(i + 1) * n].T, joint[:, (i + 1) * n:])


def _blocks(m: Moments, n_models: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(covariance (N, N, n, n), std (N, n)) of a joint Moments over N models' n units, on the CPU.

    Block (i, j), i != j, is the cross-covariance of model i's units with model j's; a within-model block
    (i, i) holds only the variances on its diagonal (zeros elsewhere: those covariances are not measured).
    """
    mean, var = m.mean_x.cpu().reshape(n_models, -1), m.var_x.cpu().reshape(n_models, -1)
    n = mean.shape[1]
    cov = torch.zeros(n_models, n_models, n, n, dtype=torch.float64)
    for i in range(n_models):
        cov[i, i] = torch.diag(var[i])
    for i in range(n_models - 1):
        later = m.sums[f"xy{i}"].cpu() / m.n  # (n, (N-1-i) n): model i against models i+1..N-1
        for j in range(i + 1, n_models):
            cov[i, j] = later[:, (j - i - 1) * n:(j - i) * n] - torch.outer(mean[i], mean[j])
            cov[j, i] = cov[i, j].T
    return cov, var.sqrt()


def _correlation(cov: torch.Tensor, std: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(N, N, n, n) corr[i, j, a, b] between unit a of model i and unit b of model j (i != j; see `_blocks`)."""
    s = std + eps
    return cov / (s[:, None, :, None] * s[None, :, None, :])


# --- one permutation per model ---------------------------------------------------------------------------


def synchronise(pairwise: dict[tuple[int, int], torch.Tensor], n_models: int) -> list[torch.Tensor]:
    """Permutation synchronisation (Pachauri, Kondor, Singh 2013, NeurIPS): one permutation per model.

    Args:
        pairwise: (i, j), i < j -> q (n,): unit u of model i matches unit q[u] of model j.
    Returns:
        p_0..p_{N-1}: universe unit u is unit p_i[u] of model i (universe order = model 0's where consistent).
        Block matrix W (Nn, Nn) with W_ij the matching of (i, j) and W_ii = I; its n leading eigenvectors U
        give U_0 U_i^T ~ the map from model 0 to model i, rounded by linear assignment. Exact (returns the
        matchings themselves) when they are cycle-consistent.
    """
    n = len(next(iter(pairwise.values())))
    w = torch.eye(n_models * n, dtype=torch.float64)
    for (i, j), q in pairwise.items():
        w[i * n + torch.arange(n), j * n + q.cpu()] = 1.0
        w[j * n + q.cpu(), i * n + torch.arange(n)] = 1.0
    u = torch.linalg.eigh(w).eigenvectors[:, -n:].reshape(n_models, n, n)
    return [assign(u[0] @ u[i].T) for i in range(n_models)]


def _ascend(score, p: list[torch.Tensor], order, max_iter: int) -> tuple[list[torch.Tensor], int, bool]:
    """Block-coordinate ascent: p_k <- argmax_p sum_u score(k, p)[u, p[u]], accepted only if strictly better.

    `score(k, p)` is (n universe units, n units of model k); `order(it)` the models visited in sweep `it`.
    Returns (p, sweeps, converged: the last sweep changed nothing).
    """
    p, changed, it = list(p), True, 0
    while changed and it < max_iter:
        changed = False
        for k in order(it):
            s = score(k, p)
            new = assign(s)
            old_value, new_value = matched(s, p[k]), matched(s, new)
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                p[k], changed = new, True
        it += 1
    return p, it, not changed


def _universe_score(corr: torch.Tensor):
    """score(k, p): sum over j != k of corr(model k, model j) at j's universe units: the universe objective's block."""
    def score(k, p):
        return sum(corr[k, j][:, p[j]] for j in range(len(p)) if j != k).T
    return score


def _mean_score(sites: list[tuple[torch.Tensor, torch.Tensor]], eps: float = 1e-12):
    """score(k, p): sum over sites of corr(unit of model k, mean of the other models' units at universe unit u)."""
    def score(k, p):
        others = [j for j in range(len(p)) if j != k]
        total = 0.0
        for cov, std in sites:
            cross = sum(cov[k, j][:, p[j]] for j in others)  # (n of k, n universe): N-1 times cov(x_k, mean)
            var = sum(cov[j, l][p[j], p[l]] for j in others for l in others)  # (N-1)^2 var(mean)
            total = total + cross / torch.outer(std[k] + eps, var.clamp_min(0).sqrt() + eps)
        return total.T
    return score


def _pairwise_objective(corr: torch.Tensor, p: list[torch.Tensor]) -> float:
    """Mean over pairs i < j and units of corr(model i, model j) at matched units (per site: divide by sites)."""
    pairs = list(combinations(range(len(p)), 2))
    return sum(corr[i, j][p[i], p[j]].mean().item() for i, j in pairs) / max(len(pairs), 1)


def _orders(n_models: int, seed: int):
    """order(it): a seeded random order of the models for each sweep (as Git Re-Basin's MergeMany)."""
    gen = torch.Generator().manual_seed(seed)
    cache = {}

    def order(it):
        if it not in cache:
            cache[it] = torch.randperm(n_models, generator=gen).tolist()
        return cache[it]
    return order


def _activation_perms(spec, models, data, method, max_examples, max_iter, seed) -> tuple[list[Perms], Pairwise, dict]:
    """Per-group solution from the joint moments of one pass; groups without sites are left to the caller."""
    groups = [g for g in spec.groups.values() if g.sites]
    sites = [s for g in groups for s in g.sites]
    t0 = time.perf_counter()
    moments, examples = joint_moments(models, sites, data, max_examples, graph=spec.graph)
    record = {"examples": examples, "seconds_statistics": time.perf_counter() - t0, "objective": {}, "sweeps": {}, "converged": True}
    n_models, it = len(models), iter(moments)
    perms: list[Perms] = [{} for _ in models]
    direct: Pairwise = {pair: {} for pair in combinations(range(n_models), 2)}
    for g in groups:
        blocks = [_blocks(next(it), n_models) for _ in g.sites]
        corr = sum(_correlation(cov, std) for cov, std in blocks)
        for i, j in direct:
            direct[(i, j)][g.name] = assign(corr[i, j])
        p, sweeps, converged = _solve(method, corr, blocks, {pair: q[g.name] for pair, q in direct.items()}, max_iter, seed)
        for i in range(n_models):
            perms[i][g.name] = p[i]
        record["objective"][g.name] = _pairwise_objective(corr, p) / len(g.sites)
        record["sweeps"][g.name] = sweeps
        record["converged"] &= converged
    return perms, direct, record


def _solve(method, corr, blocks, direct, max_iter, seed):
    """(p per model, sweeps, converged) for one group from its correlations (N, N, n, n)."""
    n_models, n = corr.shape[0], corr.shape[-1]
    if method == "anchor":
        return [torch.arange(n)] + [direct[(0, i)] for i in range(1, n_models)], 0, True
    if method == "mergemany":
        return _ascend(_mean_score(blocks), [torch.arange(n)] * n_models, _orders(n_models, seed), max_iter)
    start = synchronise(direct, n_models) if n_models > 2 else [torch.arange(n), direct[(0, 1)]]
    return _ascend(_universe_score(corr), start, _orders(n_models, seed), max_iter)


def _sum_of_others(spec: PermutationSpec, sds: list[StateDict], perms: list[Perms], k: int) -> StateDict:
    """Sum over models j != k of model j's weights in the universe (argmax-equivalent to their mean)."""
    others = [j for j in range(len(sds)) if j != k]
    return {key: sum(other_axes_permuted(spec, key, None, perms[j], sds[j][key]) for j in others) for key in sds[k]}


def _weight_sweeps(spec, sds, perms, groups, max_iter, seed) -> tuple[list[Perms], int, bool]:
    """MergeMany (Ainsworth et al. 2022): weight-match each model to the others' sum, until a sweep changes nothing."""
    perms, order, it, changed = [dict(p) for p in perms], _orders(len(sds), seed), 0, True
    while changed and it < max_iter:
        changed = False
        for k in order(it):
            new, _ = match_weights(spec, _sum_of_others(spec, sds, perms, k), sds[k], init=perms[k], seed=seed + it, groups=groups)
            changed |= any(not torch.equal(new[g], perms[k][g]) for g in new)
            perms[k] = new
        it += 1
    return perms, it, not changed


def _weight_perms(spec, models, method, max_iter, seed) -> tuple[list[Perms], Pairwise, dict]:
    """Weight-based anchor / MergeMany / universe on the models' parameters (float64)."""
    sds = [{k: v.double() for k, v in weights_of(m).items() if k in spec.axes_of} for m in models]
    n_models = len(sds)
    direct = {(i, j): match_weights(spec, sds[i], sds[j], seed=seed)[0] for i, j in combinations(range(n_models), 2)}
    identity = {g: torch.arange(grp.size) for g, grp in spec.groups.items()}
    if method == "anchor":
        return [identity] + [direct[(0, i)] for i in range(1, n_models)], direct, {"sweeps": 0, "converged": True}
    if method == "mergemany":
        start = [identity] * n_models
    elif n_models > 2:
        per_group = {g: synchronise({pair: q[g] for pair, q in direct.items()}, n_models) for g in spec.groups}
        start = [{g: per_group[g][i] for g in spec.groups} for i in range(n_models)]
    else:
        start = [identity, direct[(0, 1)]]
    perms, sweeps, converged = _weight_sweeps(spec, sds, start, None, max_iter, seed)
    return perms, direct, {"sweeps": sweeps, "converged": converged}


def align_many(
    spec: PermutationSpec,
    models: Sequence[nn.Module],
    method: str = "universe",
    alignment: str = "activation",
    data: Iterable | None = None,
    *,
    max_examples: int | None = 5000,
    max_iter: int = 100,
    seed: int = 0,
) -> tuple[list[Perms], Pairwise, dict]:
    """One permutation per model into a shared universe (see the module docstring for the methods).

    Args:
        spec: the architecture's PermutationSpec (groups with sites for activation alignment).
        models: N >= 2 nn.Modules of one architecture (not modified).
        method: "universe" | "mergemany" | "anchor" | "none" (identity: plain averaging); alignment:
            "activation" (needs `data`) | "weight".
        data: re-iterable x or (x, y) batches; the first `max_examples` inputs are read once (N forwards each).
        max_iter: sweeps of the iterative methods; seed: their visiting order.
    Returns:
        (perms: one {group: LongTensor (n,)} per model, universe unit u = unit perms[i][g][u] of model i;
         direct pairwise matchings {(i, j): perms}, i < j; record: sweeps, converged, objective per group, examples).
        Activation alignment matches groups without sites by weight (MergeMany sweeps over those groups only).
    """
    if method not in (*METHODS, "none"):
        raise InvalidOptionError(f"unknown merge method {method!r}; valid methods: {', '.join(METHODS)}, none")
    if alignment not in ALIGNMENTS:
        raise InvalidOptionError(f"unknown alignment {alignment!r}; valid: {', '.join(ALIGNMENTS)}")
    if structured := [g.name for g in spec.groups.values() if g.structured]:
        raise OnebasinError(f"merge_many aligns free permutations only; groups with a block structure: {', '.join(structured)}")
    if method == "none":
        return [{g: torch.arange(grp.size) for g, grp in spec.groups.items()} for _ in models], {}, {}
    if alignment == "weight":
        return _weight_perms(spec, models, method, max_iter, seed)
    if data is None:
        raise EmptyDataError("activation alignment needs data: an iterable of x or (x, y) batches")
    perms, direct, record = _activation_perms(spec, models, data, method, max_examples, max_iter, seed)
    fallback = [g for g, grp in spec.groups.items() if not grp.sites]
    if fallback:
        sds = [{k: v.double() for k, v in weights_of(m).items() if k in spec.axes_of} for m in models]
        start = [{**{g: torch.arange(spec.groups[g].size) for g in fallback}, **p} for p in perms]
        perms, *_ = _weight_sweeps(spec, sds, start, fallback, max_iter, seed)
    record["weight_fallback"] = fallback
    return perms, direct, record


# --- cycle consistency -------------------------------------------------------------------------------------


def induced_maps(perms: list[Perms]) -> Pairwise:
    """P_ij = P_j^-1 P_i for i < j: unit a of model i -> the unit of model j in the same universe slot."""
    return {(i, j): {g: perms[j][g][torch.argsort(perms[i][g])] for g in perms[i]}
            for i, j in combinations(range(len(perms)), 2)}  # fmt: skip


def cycle_consistency(maps: Pairwise, n_models: int) -> float | None:
    """Fraction of units that come back to themselves around i -> j -> k -> i, averaged over triples and groups.

    maps[(i, j)], i < j: {group: q}, unit u of model i -> unit q[u] of model j (k -> i is the inverse of i -> k).
    None for fewer than 3 models.
    """
    fractions = []
    for i, j, k in combinations(range(n_models), 3):
        for g, q_ij in maps[(i, j)].items():
            units = torch.arange(len(q_ij))
            back = torch.argsort(maps[(i, k)][g])[maps[(j, k)][g][q_ij]]
            fractions.append((back == units).double().mean().item())
    return sum(fractions) / len(fractions) if fractions else None


def agreement(maps: Pairwise, direct: Pairwise) -> float | None:
    """Fraction of units where two sets of pairwise maps agree, averaged over pairs and groups (None: no maps)."""
    values = [(maps[pair][g] == q).double().mean().item() for pair, qs in direct.items() for g, q in qs.items()]
    return sum(values) / len(values) if values else None


# --- averaging and N-way REPAIR ------------------------------------------------------------------------------


def weighted_mean(state_dicts: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """sum_i weights[i] * state_dicts[i], summed in float64 and cast back; integer buffers rounded."""
    out = {}
    for key, t in state_dicts[0].items():
        total = sum(w * sd[key].double() for w, sd in zip(weights, state_dicts))
        out[key] = total.to(t.dtype) if t.is_floating_point() else torch.round(total).to(t.dtype)
    return out


def goal_statistics(
    models: Sequence[nn.Module], sites: list[Site], weights: Sequence[float], data: Iterable, max_examples: int | None = 5000,
    graph=None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Goals of N-way REPAIR at each site: sum_i w_i E[X_i] and sum_i w_i std(X_i) (eqs. 3-4 with N weights).

    `models` are the aligned endpoints (unit u of each in the same universe slot); one pass, N forwards per batch.
    Returns ([(units,) float64 goal mean per site], [goal std per site]).
    """
    moments, _ = joint_moments(models, sites, data, max_examples, cross=False, graph=graph)
    w = torch.tensor(list(weights), dtype=torch.float64)[:, None]
    means, stds = [], []
    for m in moments:
        mean, std = m.mean_x.cpu().reshape(len(models), -1), m.var_x.sqrt().cpu().reshape(len(models), -1)
        means.append((w * mean).sum(0))
        stds.append((w * std).sum(0))
    return means, stds


def _normalised(weights, n_models: int) -> list[float]:
    if weights is None:
        return [1.0 / n_models] * n_models
    weights = [float(w) for w in weights]
    if len(weights) != n_models or any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise InvalidOptionError(f"weights must be {n_models} non-negative numbers with a positive sum, got {weights}")
    return [w / sum(weights) for w in weights]


def _check_models(models: Sequence[nn.Module]) -> None:
    if len(models) < 2:
        raise InvalidOptionError(f"merge_many needs at least 2 models, got {len(models)}")
    sds = [m.state_dict() for m in models]
    for i, sd in enumerate(sds):
        check_finite(sd, f"model {i}")
        if i:
            check_same_architecture(sds[0], sd, ("model 0", f"model {i}"))
            check_same_dtype(sds[0], sd, ("model 0", f"model {i}"))


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
) -> tuple[nn.Module, ManyResult]:
    """Merge N networks of one architecture into one: align into a universe, average, correct.

    Args:
        models: N >= 2 trained nn.Modules of one architecture (not modified).
        method: "universe" (cycle-consistent multi-model objective, C2M3's), "mergemany" (Ainsworth et al.
            2022), "anchor" (all aligned to model 0), or "none" (plain averaging); see the module docstring.
        repair: "exact" N-way REPAIR (goals: weighted mean of the endpoints' unit means and stds, Jordan et
            al. 2022 eqs. 3-4 generalised), "reset_bn" (BatchNorm statistics re-estimated, Sec. 5.2) or "none".
        weights: N non-negative weights of the average and of the goals (normalised; default uniform).
        data: re-iterable x or (x, y) batches of training data: alignment statistics and REPAIR calibration
            (first `max_examples` inputs). Only alignment="weight" with repair="none" and a `spec` needs none.
        alignment: "activation" (correlations from one pass with all N models) or "weight" (no data).
        spec: the PermutationSpec (traced from model 0 on the first batch when None).
        perms: one {group: LongTensor} per model (e.g. `result.perms` of an earlier call) to use instead of
            aligning; `method` is then only recorded, and the pairwise measures are None.
    Returns:
        (merged model, ManyResult with per-model perms, cycle-consistency measures, record and timings).
        The model has model 0's class when every REPAIR correction could be fused.
    """
    if repair not in REPAIRS:
        raise InvalidOptionError(f"unknown repair {repair!r}; valid: {', '.join(REPAIRS)}")
    _check_models(models)
    w = _normalised(weights, len(models))
    if data is None and (spec is None or repair != "none"):
        raise EmptyDataError("merge_many needs data (training batches) to trace the model and to REPAIR")
    start = time.perf_counter()
    example = first_input(data, 64, device_of(models[0])) if data is not None else None
    if example is not None:
        check_example_input(models[0], example)
    spec = spec or trace(models[0], example)
    if perms is None:
        perms, direct, record = align_many(spec, models, method, alignment, data, max_examples=max_examples, max_iter=max_iter, seed=seed)
    else:
        direct, record = {}, {"given_perms": True}
    aligned_at = time.perf_counter()
    aligned = [permute_model(m, spec, p) for m, p in zip(models, perms)]
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(weighted_mean([m.state_dict() for m in aligned], w))
    averaged_at = time.perf_counter()
    passes, fused, affines = 0, True, {}
    if repair == "exact":
        sites = select_sites(spec, KINDS)
        goal_mean, goal_std = goal_statistics(aligned, sites, w, data, max_examples, spec.graph)
        fixed = correct(merged, sites, goal_mean, goal_std, data, graph=spec.graph, max_examples=max_examples)
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


# --- diagnostics --------------------------------------------------------------------------------------------


def ensemble_evaluate(models: Sequence[nn.Module], loader: Iterable, weights: Sequence[float] | None = None) -> tuple[float, float]:
    """(loss, accuracy) of the output ensemble: the weighted mean of the models' softmax probabilities."""
    w = _normalised(weights, len(models))
    loss, correct_, n = 0.0, 0, 0
    with torch.no_grad(), eval_mode(*models):
        for x, y, *_ in loader:
            prob = sum(wi * F.softmax(m(x), -1) for wi, m in zip(w, models))
            loss += float(F.nll_loss(prob.clamp_min(1e-30).log(), y, reduction="sum"))
            correct_, n = correct_ + int((prob.argmax(-1) == y).sum()), n + len(y)
    return loss / n, correct_ / n


def merge_diagnostics(models: Sequence[nn.Module], merged: nn.Module, loader: Iterable,
                      weights: Sequence[float] | None = None) -> dict:
    """Barrier-like numbers for N models on (x, y) batches: the merged model's loss and accuracy beside the
    endpoints' (each and their weighted mean) and the output ensemble's; `gap` = endpoint mean - merged."""
    w = _normalised(weights, len(models))
    ends = [dict(zip(("loss", "acc"), evaluate(m, loader))) for m in models]
    mean = {k: sum(wi * e[k] for wi, e in zip(w, ends)) for k in ("loss", "acc")}
    merged_ = dict(zip(("loss", "acc"), evaluate(merged, loader)))
    ensemble = dict(zip(("loss", "acc"), ensemble_evaluate(models, loader, w)))
    gap = {"acc": mean["acc"] - merged_["acc"], "loss": merged_["loss"] - mean["loss"]}
    return {"merged": merged_, "endpoints": ends, "endpoint_mean": mean, "ensemble": ensemble, "gap": gap}
