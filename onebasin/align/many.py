"""Align N networks of one architecture into a shared unit order (the merging itself: `pipeline.merge_many`).

    perms, direct, record = align_many(spec, [m0, m1, m2], method="universe", data=loader)
    perms[i]   # {group: LongTensor}: apply_perms(spec, perms[i], sd_i) is model i in the universe

Every method (a *combiner*, registered with `@register_combiner(name=, reference=)`: `list_combiners()`)
gives one permutation p_i per model into a shared unit order, the *universe* (universe unit u of model i is
its unit p_i[u], the permute.py convention).

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

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn as nn

from ..errors import EmptyDataError, InvalidOptionError, OnebasinError
from ..permute import Perms, StateDict
from ..spec import PermutationSpec
from ..distributed import distributed, gathered, spread_owners
from ..stats import Moments, joint_moments, joint_shapes, owned_joint_moments, pack_passes, rows_per_slice, sum_bytes, takes_precision
from ._registry import assign, matched, weights_of
from .weight import match_weights, other_axes_permuted

ALIGNMENTS = ("activation", "weight")
Pairwise = dict[tuple[int, int], Perms]  # (i, j), i < j -> {group: q}: unit u of model i matches unit q[u] of model j


# --- the combiner registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Combiner:
    """A registered N-model method: `fn(problem) -> (one permutation per model, sweeps, converged)`.

    `problem` is a `GroupProblem` (activation alignment, one group at a time) or a `WeightProblem`; both
    offer `n_models`, `identity`, `direct` (the pairwise matchings), `synchronised()` and
    `ascend(start, objective)` with objective "pairs" (the universe objective) or "mean" (MergeMany's).
    """

    name: str
    reference: str
    fn: Callable


_COMBINERS: dict[str, Combiner] = {}


def register_combiner(*, name: str, reference: str):
    """Register `fn(problem) -> (perms per model, sweeps, converged)` as N-model method `name`."""

    def add(fn):
        if name in _COMBINERS:
            raise ValueError(f"combiner {name!r} is already registered")
        _COMBINERS[name] = Combiner(name, reference, fn)
        return fn

    return add


def list_combiners() -> list[str]:
    """Names of the registered N-model methods, in registration order."""
    return list(_COMBINERS)


def get_combiner(name: str) -> Combiner:
    """The registered combiner `name`; InvalidOptionError listing the valid names (and "none") when unknown."""
    if name not in _COMBINERS:
        raise InvalidOptionError(f"unknown merge method {name!r}; valid methods: {', '.join(_COMBINERS)}, none")
    return _COMBINERS[name]


@register_combiner(name="universe", reference="Crisostomi et al. 2024, C2M3 (objective); Pachauri, Kondor, Singh "
                   "2013 (synchronisation start)")
def universe(problem):
    """Synchronised pairwise matchings, then block-coordinate ascent on the sum over all pairs."""
    return problem.ascend(problem.synchronised(), "pairs")


@register_combiner(name="mergemany", reference="Ainsworth, Hayase, Srinivasa 2022, Git Re-Basin, Sec. 4 MergeMany")
def mergemany(problem):
    """From the unaligned models, each aligned in turn to the mean of the others until a sweep changes nothing."""
    return problem.ascend([problem.identity] * problem.n_models, "mean")


@register_combiner(name="anchor", reference="pairwise matching to model 0 (Li et al. 2015; Ainsworth et al. 2022)")
def anchor(problem):
    """Every model matched to model 0 directly; model 0's order is the universe."""
    return [problem.identity] + [problem.direct[(0, i)] for i in range(1, problem.n_models)], 0, True


# --- statistics ------------------------------------------------------------------------------------------


def _blocks(m: Moments, n_models: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(covariance (N, N, n, n), std (N, n)) of a joint Moments over N models' n units, on the CPU.

    Block (i, j), i != j, is the cross-covariance of model i's units with model j's; a within-model block
    (i, i) holds only the variances on its diagonal (zeros elsewhere: those covariances are not measured).
    The cross sums are of shifted values (float32 precision), so they are centred by the shifted means.
    """
    mean, var = m.shifted_mean_x.cpu().reshape(n_models, -1), m.var_x.cpu().reshape(n_models, -1)
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
        Block matrix W (Nn, Nn) with W_ij the matching of (i, j) and W_ii = I; the projector P onto its n
        leading eigenvectors gives P_0i = U_0 U_i^T ~ the map from model 0 to model i, rounded by linear
        assignment. Exact (returns the matchings themselves) when they are cycle-consistent.

    Deterministic: inconsistent matchings often tie W's n-th eigenvalue with the next, where "the n leading
    eigenvectors" are any basis the eigensolver picks (it differed between one and two threads). P then spans
    every eigenvector tied with the n-th, which no basis choice changes, and its entries are rounded to 1e-9
    before the assignment, so that solver rounding cannot break its ties either.
    """
    n = len(next(iter(pairwise.values())))
    w = torch.eye(n_models * n, dtype=torch.float64)
    for (i, j), q in pairwise.items():
        w[i * n + torch.arange(n), j * n + q.cpu()] = 1.0
        w[j * n + q.cpu(), i * n + torch.arange(n)] = 1.0
    values, vectors = torch.linalg.eigh(w)
    u = vectors[:, values >= values[-n] - 1e-9 * values[-1]]  # the n leading eigenvectors and any tied with the n-th
    first = u[:n] @ u.T  # (n, N n): the rows of model 0 in the projector P = U U^T
    return [assign(torch.round(first[:, i * n:(i + 1) * n] * 1e9)) for i in range(n_models)]


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


@dataclass
class GroupProblem:
    """One group under activation alignment: correlations (N, N, n, n), per-site (cov, std) blocks, and the
    direct pairwise matchings {(i, j): q}."""

    corr: torch.Tensor
    blocks: list[tuple[torch.Tensor, torch.Tensor]]
    direct: dict[tuple[int, int], torch.Tensor]
    max_iter: int
    seed: int

    @property
    def n_models(self) -> int:
        return self.corr.shape[0]

    @property
    def identity(self) -> torch.Tensor:
        return torch.arange(self.corr.shape[-1])

    def synchronised(self) -> list[torch.Tensor]:
        return synchronise(self.direct, self.n_models) if self.n_models > 2 else [self.identity, self.direct[(0, 1)]]

    def ascend(self, start, objective: str):
        score = _universe_score(self.corr) if objective == "pairs" else _mean_score(self.blocks)
        return _ascend(score, start, _orders(self.n_models, self.seed), self.max_iter)


@dataclass
class WeightProblem:
    """Weight alignment of N float64 state_dicts: block updates are weight matching to the sum of the others
    (both objectives: the others' sum is argmax-equivalent to their mean), over `groups` (None: all)."""

    spec: PermutationSpec
    sds: list[StateDict]
    direct: Pairwise
    max_iter: int
    seed: int
    groups: list[str] | None = None

    @property
    def n_models(self) -> int:
        return len(self.sds)

    @property
    def identity(self) -> Perms:
        return {g: torch.arange(grp.size) for g, grp in self.spec.groups.items()}

    def synchronised(self) -> list[Perms]:
        if self.n_models == 2:
            return [self.identity, self.direct[(0, 1)]]
        per_group = {g: synchronise({pair: q[g] for pair, q in self.direct.items()}, self.n_models) for g in self.spec.groups}
        return [{g: per_group[g][i] for g in self.spec.groups} for i in range(self.n_models)]

    def ascend(self, start, objective: str):
        return _weight_sweeps(self.spec, self.sds, start, self.groups, self.max_iter, self.seed)


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


def _float64_params(spec: PermutationSpec, models) -> list[StateDict]:
    return [{k: v.double() for k, v in weights_of(m).items() if k in spec.axes_of} for m in models]


def _weight_perms(spec, models, combiner, max_iter, seed) -> tuple[list[Perms], Pairwise, dict]:
    """A combiner on the models' parameters (float64), pairwise scores by weight matching."""
    sds = _float64_params(spec, models)
    direct = {(i, j): match_weights(spec, sds[i], sds[j], seed=seed)[0] for i, j in combinations(range(len(sds)), 2)}
    perms, sweeps, converged = combiner.fn(WeightProblem(spec, sds, direct, max_iter, seed))
    return perms, direct, {"sweeps": sweeps, "converged": converged}


UNSIZED_ROWS = 64  # input rows per slice under a memory budget when the sites' sizes are unknown (read by hooks)


def joint_passes(spec: PermutationSpec, n_models: int, max_memory: int | None) -> list[list[str]]:
    """The groups with sites, packed into passes over the data whose joint sums of N models (`_joint_bytes`)
    fit in `max_memory` bytes; a group larger than the budget has a pass of its own. None: one pass."""
    costs = {g.name: _joint_bytes(g, n_models) for g in spec.groups.values() if g.sites}
    return pack_passes(costs, max_memory) or [[]]  # no sites: one pass that only counts the examples


def _joint_bytes(group, n_models: int) -> int:
    """float64 bytes of a group's joint sums: per site N(N-1)/2 units^2 cross sums and 2 N units (`joint_shapes`)."""
    return len(group.sites) * sum_bytes(joint_shapes(group.size, n_models))


def _activation_perms(spec, models, data, combiner, max_examples, max_iter, seed, max_memory) -> tuple[list[Perms], Pairwise, dict]:
    """Per-group solution from the joint moments: one pass over the data, or several when their sums exceed
    `max_memory` (`joint_passes`: each pass holds some groups' sums, solved and freed before the next). Under
    torch.distributed each group's sums are held, and the group solved, by one rank; the solutions are shared.
    Groups without sites are left to the caller."""
    passes, n_models, world = joint_passes(spec, len(models), max_memory), len(models), distributed()[1]
    record = {"objective": {}, "sweeps": {}, "converged": True, "seconds_statistics": 0.0,
              "statistics_passes": len(passes), "statistics_bytes": 0, "statistics_rows": []}
    perms: list[Perms] = [{} for _ in models]
    direct: Pairwise = {pair: {} for pair in combinations(range(n_models), 2)}
    for names in passes:
        t0, groups = time.perf_counter(), [spec.groups[g] for g in names]
        rows = rows_per_slice(spec.graph, [s for g in groups for s in g.sites], max_memory, n_models, UNSIZED_ROWS)
        record["statistics_rows"].append(rows)
        moments, record["examples"], held = _pass_moments(spec, groups, models, data, max_examples, rows, world)
        record["seconds_statistics"] += time.perf_counter() - t0
        record["statistics_bytes"] = max(record["statistics_bytes"], held)
        solved = {}
        for g in groups:
            sums = [moments.pop(0) for _ in g.sites]  # each group's sums freed once read into its blocks
            if sums[0] is not None:  # held, and solved, by this rank
                solved[g.name] = _solve_group([_blocks(m, n_models) for m in sums], combiner, max_iter, seed)
        for part in gathered(solved) if world > 1 else [solved]:
            for name, sol in part.items():
                _add_solution(name, sol, perms, direct, record)
    return perms, direct, record


def _pass_moments(spec, groups, models, data, max_examples, chunk, world) -> tuple[list[Moments | None], int, int]:
    """(joint moments of the groups' sites, in order; examples; bytes of sums held), read `chunk` input rows at a
    time (None: whole batches). Under torch.distributed each group's sums are held by one rank
    (`distributed.spread_owners`, `stats.owned_joint_moments`): None for the sites of groups another rank holds."""
    sites = [s for g in groups for s in g.sites]
    if world == 1:
        moments, examples = joint_moments(models, sites, data, max_examples, chunk=chunk, graph=spec.graph)
        return moments, examples, sum(m.nbytes for m in moments)
    owners = spread_owners({g.name: _joint_bytes(g, len(models)) for g in groups}, world)
    site_owners, units = [owners[g.name] for g in groups for _ in g.sites], [g.size for g in groups for _ in g.sites]
    mine, examples, held = owned_joint_moments(models, sites, units, site_owners, data, max_examples, chunk=chunk,
                                               graph=spec.graph)
    return [mine.get(k) for k in range(len(sites))], examples, held


def _solve_group(blocks, combiner, max_iter: int, seed: int) -> dict:
    """One group from its sites' (cov, std) blocks: the direct pairwise matchings, the combiner's permutation per
    model, sweeps and convergence, and the mean matched correlation per site (objective)."""
    corr = sum(_correlation(cov, std) for cov, std in blocks)
    direct = {(i, j): assign(corr[i, j]) for i, j in combinations(range(corr.shape[0]), 2)}
    p, sweeps, converged = combiner.fn(GroupProblem(corr, blocks, direct, max_iter, seed))
    return {"perms": p, "direct": direct, "sweeps": sweeps, "converged": converged,
            "objective": _pairwise_objective(corr, p) / len(blocks)}


def _add_solution(name: str, sol: dict, perms: list[Perms], direct: Pairwise, record: dict) -> None:
    """Write one group's `_solve_group` result into the per-model perms, the direct matchings and the record."""
    for i, p in enumerate(sol["perms"]):
        perms[i][name] = p
    for pair, q in sol["direct"].items():
        direct[pair][name] = q
    record["objective"][name], record["sweeps"][name] = sol["objective"], sol["sweeps"]
    record["converged"] &= sol["converged"]


@takes_precision
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
    max_memory: int | None = 1 << 30,
    precision: str | None = None,
) -> tuple[list[Perms], Pairwise, dict]:
    """One permutation per model into a shared universe (see the module docstring for the methods).

    Args:
        spec: the architecture's PermutationSpec (groups with sites for activation alignment).
        models: N >= 2 nn.Modules of one architecture (not modified).
        method: a registered combiner (`list_combiners()`: "universe" | "mergemany" | "anchor") or "none"
            (identity: plain averaging); alignment: "activation" (needs `data`) | "weight".
        data: re-iterable x or (x, y) batches; the first `max_examples` inputs are read once (N forwards each).
        max_iter: sweeps of the iterative methods; seed: their visiting order.
        max_memory: bytes the joint sums may hold (N(N-1)/2 units^2 float64 per site); above it the statistics
            take several passes over the data, each holding some groups' sums (`joint_passes`; recorded as
            statistics_passes, the peak bytes held as statistics_bytes), and a batch whose tapped activations
            of the N models would exceed it runs in slices of rows (`stats.rows_per_slice`; 64 rows when the
            sites are read by hooks, whose sizes are unknown; whole batches when the graph was exported for one
            batch size). None: one pass, whole batches. The sums and the activations are each bounded by it, so
            the peak is about twice max_memory (plus the models). Under torchrun each group's sums are held by one
            rank (partial sums reduced to it per chunk), so a rank holds about 1 / world of them; the passes are
            still packed by the total of the sums, not one rank's share.
        precision: of the joint statistics ("float32": shifted float32 blocks into float64 sums, ~1e-7 relative
            on covariances; "float64": exact; `stats.joint_moments`); None: the enclosing
            `stats.statistics_precision`, float32 by default.
    Returns:
        (perms: one {group: LongTensor (n,)} per model, universe unit u = unit perms[i][g][u] of model i, in
         model 0's unit order (perms[0] is the identity: `in_model0_order`);
         direct pairwise matchings {(i, j): perms}, i < j; record: sweeps, converged, objective per group, examples,
         statistics_passes, statistics_bytes, statistics_rows (input rows per slice in each pass, None: whole
         batches)).
        Activation alignment matches groups without sites by weight (MergeMany sweeps over those groups only).
    """
    combiner = None if method == "none" else get_combiner(method)
    if alignment not in ALIGNMENTS:
        raise InvalidOptionError(f"unknown alignment {alignment!r}; valid: {', '.join(ALIGNMENTS)}")
    if structured := [g.name for g in spec.groups.values() if g.structured]:
        raise OnebasinError(f"merge_many aligns free permutations only; groups with a block structure: {', '.join(structured)}")
    if combiner is None:
        return [{g: torch.arange(grp.size) for g, grp in spec.groups.items()} for _ in models], {}, {}
    if alignment == "weight":
        perms, direct, record = _weight_perms(spec, models, combiner, max_iter, seed)
        return in_model0_order(perms), direct, record
    if data is None:
        raise EmptyDataError("activation alignment needs data: an iterable of x or (x, y) batches")
    perms, direct, record = _activation_perms(spec, models, data, combiner, max_examples, max_iter, seed, max_memory)
    fallback = [g for g, grp in spec.groups.items() if not grp.sites]
    if fallback:
        start = [{**{g: torch.arange(spec.groups[g].size) for g in fallback}, **p} for p in perms]
        perms, *_ = _weight_sweeps(spec, _float64_params(spec, models), start, fallback, max_iter, seed)
    record["weight_fallback"] = fallback
    return in_model0_order(perms), direct, record


def in_model0_order(perms: list[Perms]) -> list[Perms]:
    """The same maps P_j^-1 P_i with the universe relabelled into model 0's unit order (perms[0] the identity).

    Every objective here is invariant to relabelling the universe, so which of the equivalent orders a solver
    ends in can hang on rounding (e.g. sums all-reduced in another order under torchrun); this one is unique.
    """
    back = {g: torch.argsort(p) for g, p in perms[0].items()}
    return [{g: p[back[g]] for g, p in model.items()} for model in perms]


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
