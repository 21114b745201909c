"""Weight matching (Ainsworth, Hayase, Srinivasa 2022, "Git Re-Basin", Sec. 3.2, Algorithm 1).

Maximise sum_k <W_A[k], P(W_B[k])> over the permutations of every group: coordinate descent that, for
one group at a time (in a random order each sweep), solves the linear assignment on the sum of the
inner products of all tensors the group permutes, the other groups held fixed, until a whole sweep
improves no group. Needs no data.

Cost. Each group's (n, n) score S is kept between visits and updated only where a neighbouring group's
permutation changed since: a tensor with axes (g, h) adds A[:, D] @ (B[:, p_new[D]] - B[:, p_old[D]])^T
over the units D of h that moved, so a sweep costs in proportion to the units that moved, not to the
model, and a group whose S did not change is not solved again (the solver would return the same
assignment). S is float32 for float32 (or narrower) weights, float64 for float64 weights, and only
proposes the assignment: a group moves when the exact float64 change of the objective (from the rows
that move) is positive, and the recorded objective is the sum of these exact changes, so it rises
strictly and the loop ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..permute import Perms, StateDict, permute_member, permute_tensor
from ..spec import Member, PermutationSpec
from ._registry import AlignResult, assign, initial_perms, matched, register_method, weights_of
from ._structured import family_root, solve_families


def unit_rows(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """(size, rest) float64 view of tensor t with the units of axis `axis` (size units, blocks kept) as rows."""
    return t.movedim(axis, 0).reshape(size, -1).double()


def other_axes_permuted(spec: PermutationSpec, key: str, axis: int | None, perms: Perms, t: torch.Tensor, axes_of=None) -> torch.Tensor:
    """t (tensor `key` of B) with every permuted axis except `axis` (None: all) re-indexed by `perms` (any
    member layout; the inside of a grouped conv's groups after its rows). `axes_of` is unused (kept for callers)."""
    members = sorted(spec.members_of[key], key=lambda gm: gm[1].diag)
    for group, m in members:
        if m.axis != axis and group in perms:
            t = permute_member(t, m, perms[group])
    return t


def member_rows(t: torch.Tensor, m: Member, n: int) -> torch.Tensor:
    """(n, rest) matrix of tensor t with the group's n units of member m as rows: the entries each unit owns.

    A grouped conv's in-group axis (m.diag, weight (g*ko, ki, ...)) is read as its block-diagonal full
    weight (g*ko, g*ki, ...): unit u's row holds the weights of its group's rows and zeros elsewhere.
    """
    if m.diag:
        ki = t.shape[m.axis]
        g = n // ki
        blocks = t.reshape(g, t.shape[0] // g, ki, -1)  # (g, ko, ki, rest)
        full = torch.zeros(g, blocks.shape[1], g, ki, blocks.shape[3], dtype=t.dtype, device=t.device)
        full[torch.arange(g), :, torch.arange(g)] = blocks
        return full.permute(2, 3, 0, 1, 4).reshape(n, -1)
    if m.layout is None:
        return t.movedim(m.axis, 0).reshape(n, -1)
    rows = t.movedim(m.axis, 0)
    pos = m.layout.positions().to(t.device)  # (n, r)
    return rows[pos.reshape(-1)].reshape(n, -1)


def weight_scores(spec: PermutationSpec, group: str, perms: Perms, sd_a: StateDict, sd_b: StateDict) -> torch.Tensor:
    """(n, n) float64 S[i, j] = sum over the group's tensors of <unit i of A, unit j of B>, others permuted.

    Ainsworth et al. 2022, eq. 3 (the linear assignment for one layer given its neighbours).
    """
    g = spec.groups[group]
    score = torch.zeros(g.size, g.size, dtype=torch.float64)
    for m in g.members:
        if m.key in sd_a:
            wb = other_axes_permuted(spec, m.key, m.axis, perms, sd_b[m.key])
            score += (member_rows(sd_a[m.key].double(), m, g.size) @ member_rows(wb.double(), m, g.size).T).cpu()
    return score


def weight_objective(spec: PermutationSpec, perms: Perms, sd_a: StateDict, sd_b: StateDict, keys=None) -> float:
    """sum over the permuted tensors (or `keys`) of <W_A, P(W_B)> (the quantity weight matching maximises)."""
    keys = spec.members_of.keys() if keys is None else keys
    return sum(_inner(sd_a[k], other_axes_permuted(spec, k, None, perms, sd_b[k])) for k in keys if k in sd_a)


def _inner(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> summed in float64."""
    return torch.dot(a.reshape(-1).double(), b.reshape(-1).double()).item()


# --- coordinate descent with each group's score kept between visits --------------------------------------


@dataclass
class _Weights:
    """The permuted tensors of A and B: `a`, `b` in the dtype of the scores, `a64`, `b64` in float64."""

    spec: PermutationSpec
    axes_of: dict
    a: StateDict
    b: StateDict
    a64: StateDict
    b64: StateDict
    dtype: torch.dtype
    device: torch.device | None


def _weights(spec: PermutationSpec, sd_a: StateDict, sd_b: StateDict) -> _Weights:
    """Each tensor converted once (on its device): float64 for exact objective changes, float32 for S
    (float64 when any weight is float64)."""
    axes_of = spec.axes_of
    keys = [k for k in axes_of if k in sd_a]
    device = sd_a[keys[0]].device if keys else None
    a64, b64 = ({k: sd[k].detach().double() for k in keys} for sd in (sd_a, sd_b))
    if any(sd[k].dtype == torch.float64 for sd in (sd_a, sd_b) for k in keys):
        return _Weights(spec, axes_of, a64, b64, a64, b64, torch.float64, device)
    a, b = ({k: sd[k].detach().float() for k in keys} for sd in (sd_a, sd_b))
    return _Weights(spec, axes_of, a, b, a64, b64, torch.float32, device)


@dataclass
class _Term:
    """Tensor `key`'s share of a group's score, the group's units on `axis` (`block` indices each);
    `other`: (axis, group, block) of the one other group permuting the tensor (None: none), `seen`: the
    permutation of that group that the score includes."""

    key: str
    axis: int
    block: int
    other: tuple[int, str, int] | None
    seen: torch.Tensor | None = None


@dataclass
class _Score:
    """A group's (n, n) score S (in the weights' dtype, float32 at least), its terms, and the tensors
    whose share is recomputed whole.

    Whole: tensors permuted by two or more other groups, or by the group itself on another axis;
    `whole_seen[(key, axis)]` = (the permutations it used, its share of S).
    """

    value: torch.Tensor
    terms: list[_Term]
    whole: list[tuple[str, int]]
    whole_seen: dict = field(default_factory=dict)
    stale: bool = True  # S changed since the group was last solved


def _rows(t: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    """(n, rest) matrix of t with the units of `axis` (n units, blocks kept) as rows."""
    return t.movedim(axis, 0).reshape(n, -1)


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out += a @ b.T in place: out (n, n), a and b (n, k)."""
    return out.addmm_(a, b.T)


def _build(w: _Weights, name: str, perms: Perms) -> _Score:
    """The group's score under `perms` (Ainsworth et al. 2022, eq. 3) and the terms that keep it current."""
    g = w.spec.groups[name]
    score = _Score(torch.zeros(g.size, g.size, dtype=w.dtype, device=w.device), [], [])
    for m in g.members:
        if m.key not in w.a:
            continue
        others = [o for o in w.axes_of[m.key] if o[0] != m.axis and o[1] in perms]
        plain = all(mm.layout is None and not mm.diag for _, mm in w.spec.members_of[m.key])
        if len(others) > 1 or any(o[1] == name for o in others) or not plain:
            score.whole.append((m.key, m.axis, m))
            continue
        term, b = _Term(m.key, m.axis, m.block, others[0] if others else None), w.b[m.key]
        if term.other:
            term.seen = perms[term.other[1]]
            b = permute_tensor(b, term.other[0], term.seen, term.other[2])
        _add_product(score.value, _rows(w.a[m.key], m.axis, g.size), _rows(b, m.axis, g.size))
        score.terms.append(term)
    _refresh_whole(w, name, score, perms)
    return score


def _refresh(w: _Weights, name: str, score: _Score, perms: Perms) -> None:
    """Bring S up to date with `perms`: a tensor with axes (group, h) adds A[:, D] @ (B[:, p_new[D]] - B[:, p_old[D]])^T
    over the units D of h that moved since S last included it (exact in exact arithmetic, cost ~ |D|)."""
    n = w.spec.groups[name].size
    for t in score.terms:
        if t.other is None or t.seen is perms[t.other[1]]:
            continue
        ax, group, block = t.other
        now = perms[group]
        d = (now != t.seen).nonzero().squeeze(1)
        if len(d):
            b = w.b[t.key]
            diff = permute_tensor(b, ax, now[d], block) - permute_tensor(b, ax, t.seen[d], block)
            _add_product(score.value, _rows(permute_tensor(w.a[t.key], ax, d, block), t.axis, n), _rows(diff, t.axis, n))
            score.stale = True
        t.seen = now
    _refresh_whole(w, name, score, perms)


def _refresh_whole(w: _Weights, name: str, score: _Score, perms: Perms) -> None:
    """Recompute the share of S of each whole tensor one of whose permutations changed."""
    n = w.spec.groups[name].size
    for key, axis, m in score.whole:
        used = [perms[g] for _, g, _ in w.axes_of[key] if g in perms]
        before = score.whole_seen.get((key, axis, m))
        if before is not None and all(p is q or torch.equal(p, q) for p, q in zip(before[0], used)):
            continue
        wb = other_axes_permuted(w.spec, key, axis, perms, w.b[key])
        value = _add_product(torch.zeros_like(score.value), member_rows(w.a[key], m, n), member_rows(wb, m, n))
        score.value += value if before is None else value - before[1]
        score.whole_seen[(key, axis, m)] = (used, value)
        score.stale = True


def _gain(w: _Weights, name: str, score: _Score, perms: Perms, new: torch.Tensor) -> float:
    """Exact float64 change of the objective when the group's permutation becomes `new`, the others fixed.

    Only the rows that move count: sum over them of <A[i], B[new[i]] - B[old[i]]>, other axes permuted.
    """
    old = perms[name]
    rows = (new != old).nonzero().squeeze(1)
    gain = 0.0
    for t in score.terms:
        b = w.b64[t.key]
        diff = permute_tensor(b, t.axis, new[rows], t.block) - permute_tensor(b, t.axis, old[rows], t.block)
        if t.other:
            diff = permute_tensor(diff, t.other[0], t.seen, t.other[2])
        gain += _inner(permute_tensor(w.a64[t.key], t.axis, rows, t.block), diff)
    moved = {**perms, name: new}
    for key in dict.fromkeys(key for key, _, _ in score.whole):
        after, before = (other_axes_permuted(w.spec, key, None, p, w.b64[key]) for p in (moved, perms))
        gain += _inner(w.a64[key], after - before)
    return gain


def match_weights(
    spec: PermutationSpec,
    sd_a: StateDict,
    sd_b: StateDict,
    *,
    max_iter: int = 100,
    seed: int = 0,
    init=None,
    groups: list[str] | None = None,
) -> tuple[Perms, dict]:
    """Coordinate descent over `groups` (default all) on state_dicts; returns (perms, record).

    A group's permutation changes only when its assignment strictly improves the objective (its exact
    float64 change), so the loop ends (a sweep with no change) and ties never flip back and forth.
    Deterministic in `seed`. record: iterations (sweeps), objective (after each sweep), converged,
    solves (assignments solved: a group whose score did not change since its last solve is skipped).
    """
    w = _weights(spec, sd_a, sd_b)
    perms = initial_perms(spec, init)
    names = list(groups if groups is not None else spec.groups)
    scores = {name: _build(w, name, perms) for name in names}
    units = _update_units(spec, names)
    gen = torch.Generator().manual_seed(seed)
    objective, it, solves, changed = [weight_objective(spec, perms, w.a64, w.b64)], 0, 0, bool(names)
    while changed and it < max_iter:
        it, changed, total = it + 1, False, objective[-1]
        for i in torch.randperm(len(units), generator=gen).tolist():
            family = units[i]
            for name in family:
                _refresh(w, name, scores[name], perms)
            if not any(scores[name].stale for name in family):
                continue  # the same scores as at their last solve give the same assignment
            for name in family:
                scores[name].stale = False
            solves += 1
            if len(family) == 1 and not spec.groups[family[0]].structured:
                name, score = family[0], scores[family[0]]
                new = assign(score.value)
                if torch.equal(new, perms[name]):
                    continue
                gain, bar = _gain(w, name, score, perms, new), abs(matched(score.value, perms[name]))
                new = {name: new}
            else:
                new, gain, bar = _family_step(w, spec, family, scores, perms)
                if new is None:
                    continue
            if gain > 1e-12 * max(1.0, bar):
                perms.update(new)
                changed, total = True, total + gain
        objective.append(total)
    return perms, {"iterations": it, "objective": objective, "converged": not changed, "solves": solves}


def _update_units(spec: PermutationSpec, names: list[str]) -> list[list[str]]:
    """The groups solved together: a free group alone; a group with block structure with every group that
    shares its blocks (its family: attention heads with their query/key and value/output groups)."""
    families: dict[str, list[str]] = {}
    for name in names:
        g = spec.groups[name]
        key = family_root(spec, name) if (g.structured or spec.children(name)) else name
        families.setdefault(key, []).append(name)
    return list(families.values())


def _family_step(w: _Weights, spec: PermutationSpec, family: list[str], scores: dict, perms: Perms):
    """(new perms of the family, exact float64 objective change, scale for the tolerance) from the joint
    structured assignment of its scores (onebasin.align._structured), or (None, 0, 0) if nothing moves."""
    new = solve_families(spec, {name: scores[name].value for name in family}, family, given=perms)
    moved = {name: p for name, p in new.items() if not torch.equal(p, perms[name])}
    if not moved:
        return None, 0.0, 0.0
    keys = {m.key for name in moved for m in spec.groups[name].members}
    after = weight_objective(spec, {**perms, **moved}, w.a64, w.b64, keys)
    before = weight_objective(spec, perms, w.a64, w.b64, keys)
    return moved, after - before, abs(before)


@register_method(name="weight", reference="Ainsworth, Hayase, Srinivasa 2022, Git Re-Basin, arXiv:2209.04836, Alg. 1")
def weight_matching(
    spec: PermutationSpec,
    model_a,
    model_b,
    data=None,
    *,
    max_iter: int = 100,
    seed: int = 0,
    init=None,
    params_only: bool = True,
    max_examples=None,
    device=None,
) -> AlignResult:
    """Align B to A by weight matching (Ainsworth et al. 2022, Sec. 3.2, Alg. 1; `data` is not used).

    Args:
        spec: the PermutationSpec of the architecture.
        model_a, model_b: nn.Modules or state_dicts of the same architecture.
        max_iter: at most this many sweeps over all groups (each sweep visits groups in a random order).
        seed: seeds the visiting order; the result is deterministic in it.
        init: an AlignResult or perms dict to start from (identity otherwise).
        params_only: with nn.Modules, match parameters only, not buffers such as BatchNorm running
            statistics (as Git Re-Basin does). State_dicts always use every floating tensor.
        max_examples, device: accepted for a uniform call signature and unused (no data is read).
    Returns:
        AlignResult; record: iterations (sweeps), objective (sum of inner products after each sweep),
        converged, solves, seconds.
    """
    t0 = time.perf_counter()
    sd_a, sd_b = weights_of(model_a, params_only), weights_of(model_b, params_only)
    perms, record = match_weights(spec, sd_a, sd_b, max_iter=max_iter, seed=seed, init=init)
    return AlignResult(perms, {"method": "weight", **record, "seconds": time.perf_counter() - t0, "examples": 0})
