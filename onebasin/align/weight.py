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

from ..permute import Perms, StateDict, permute_tensor
from ..spec import PermutationSpec
from ._registry import AlignResult, assign, initial_perms, matched, register_method, weights_of


def unit_rows(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """(size, rest) float64 view of tensor t with the units of axis `axis` (size units, blocks kept) as rows."""
    return t.movedim(axis, 0).reshape(size, -1).double()


def other_axes_permuted(spec: PermutationSpec, key: str, axis: int | None, perms: Perms, t: torch.Tensor, axes_of=None) -> torch.Tensor:
    """t (tensor `key` of B) with every permuted axis except `axis` (None: all) re-indexed by `perms`."""
    for ax, group, block in (axes_of or spec.axes_of)[key]:
        if ax != axis and group in perms:
            t = permute_tensor(t, ax, perms[group], block)
    return t


def weight_scores(spec: PermutationSpec, group: str, perms: Perms, sd_a: StateDict, sd_b: StateDict) -> torch.Tensor:
    """(n, n) float64 S[i, j] = sum over the group's tensors of <unit i of A, unit j of B>, others permuted.

    Ainsworth et al. 2022, eq. 3 (the linear assignment for one layer given its neighbours).
    """
    g, axes_of = spec.groups[group], spec.axes_of
    score = torch.zeros(g.size, g.size, dtype=torch.float64)
    for m in g.members:
        if m.key in sd_a:
            wb = other_axes_permuted(spec, m.key, m.axis, perms, sd_b[m.key], axes_of)
            score += (unit_rows(sd_a[m.key], m.axis, g.size) @ unit_rows(wb, m.axis, g.size).T).cpu()
    return score


def weight_objective(spec: PermutationSpec, perms: Perms, sd_a: StateDict, sd_b: StateDict) -> float:
    """sum over the permuted tensors of <W_A, P(W_B)> (the quantity weight matching maximises)."""
    axes_of = spec.axes_of
    return sum(_inner(sd_a[k], other_axes_permuted(spec, k, None, perms, sd_b[k], axes_of)) for k in axes_of if k in sd_a)


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
        if len(others) > 1 or any(o[1] == name for o in others):
            score.whole.append((m.key, m.axis))
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
    for key, axis in score.whole:
        used = [perms[g] for _, g, _ in w.axes_of[key] if g in perms]
        before = score.whole_seen.get((key, axis))
        if before is not None and all(p is q or torch.equal(p, q) for p, q in zip(before[0], used)):
            continue
        wb = other_axes_permuted(w.spec, key, axis, perms, w.b[key], w.axes_of)
        value = _add_product(torch.zeros_like(score.value), _rows(w.a[key], axis, n), _rows(wb, axis, n))
        score.value += value if before is None else value - before[1]
        score.whole_seen[(key, axis)] = (used, value)
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
    for key in dict.fromkeys(key for key, _ in score.whole):
        after, before = (other_axes_permuted(w.spec, key, None, p, w.b64[key], w.axes_of) for p in (moved, perms))
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
    gen = torch.Generator().manual_seed(seed)
    objective, it, solves, changed = [weight_objective(spec, perms, w.a64, w.b64)], 0, 0, bool(names)
    while changed and it < max_iter:
        it, changed, total = it + 1, False, objective[-1]
        for i in torch.randperm(len(names), generator=gen).tolist():
            name, score = names[i], scores[names[i]]
            _refresh(w, name, score, perms)
            if not score.stale:
                continue  # the same score as at its last solve gives the same assignment
            score.stale, solves = False, solves + 1
            new = assign(score.value)
            if torch.equal(new, perms[name]):
                continue
            gain = _gain(w, name, score, perms, new)
            if gain > 1e-12 * max(1.0, abs(matched(score.value, perms[name]))):
                perms[name], changed, total = new, True, total + gain
        objective.append(total)
    return perms, {"iterations": it, "objective": objective, "converged": not changed, "solves": solves}


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
