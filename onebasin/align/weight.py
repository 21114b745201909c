"""Weight matching (Ainsworth, Hayase, Srinivasa 2022, "Git Re-Basin", Sec. 3.2, Algorithm 1).

Maximise sum_k <W_A[k], P(W_B[k])> over the permutations of every group: coordinate descent that, for
one group at a time (in a random order each sweep), solves the linear assignment on the sum of the
inner products of all tensors the group permutes, the other groups held fixed, until a whole sweep
improves no group. Needs no data.
"""

from __future__ import annotations

import time

import torch

from ..permute import Perms, StateDict, permute_tensor
from ..spec import PermutationSpec
from ._registry import AlignResult, assign, initial_perms, matched, register_method, weights_of


def unit_rows(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """(size, rest) float64 view of tensor t with the units of axis `axis` (size units, blocks kept) as rows."""
    return t.movedim(axis, 0).reshape(size, -1).double()


def other_axes_permuted(spec: PermutationSpec, key: str, axis: int | None, perms: Perms, t: torch.Tensor) -> torch.Tensor:
    """t (tensor `key` of B) with every permuted axis except `axis` (None: all) re-indexed by `perms`."""
    for ax, group, block in spec.axes_of[key]:
        if ax != axis and group in perms:
            t = permute_tensor(t, ax, perms[group], block)
    return t


def weight_scores(spec: PermutationSpec, group: str, perms: Perms, sd_a: StateDict, sd_b: StateDict) -> torch.Tensor:
    """(n, n) float64 S[i, j] = sum over the group's tensors of <unit i of A, unit j of B>, others permuted.

    Ainsworth et al. 2022, eq. 3 (the linear assignment for one layer given its neighbours).
    """
    g = spec.groups[group]
    score = torch.zeros(g.size, g.size, dtype=torch.float64)
    for m in g.members:
        if m.key in sd_a:
            wb = other_axes_permuted(spec, m.key, m.axis, perms, sd_b[m.key])
            score += (unit_rows(sd_a[m.key], m.axis, g.size) @ unit_rows(wb, m.axis, g.size).T).cpu()
    return score


def weight_objective(spec: PermutationSpec, perms: Perms, sd_a: StateDict, sd_b: StateDict) -> float:
    """sum over the permuted tensors of <W_A, P(W_B)> (the quantity weight matching maximises)."""
    keys = [k for k in spec.axes_of if k in sd_a]
    return sum((sd_a[k].double() * other_axes_permuted(spec, k, None, perms, sd_b[k]).double()).sum().item() for k in keys)


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

    A group's permutation changes only when its assignment strictly improves the objective, so the
    loop ends (a sweep with no change) and ties never flip back and forth. Deterministic in `seed`.
    """
    keys = spec.axes_of.keys() & sd_a.keys()
    sd_a, sd_b = {k: sd_a[k].double() for k in keys}, {k: sd_b[k].double() for k in keys}  # convert once
    perms = initial_perms(spec, init)
    names = list(groups if groups is not None else spec.groups)
    gen = torch.Generator().manual_seed(seed)
    objective, it, changed = [weight_objective(spec, perms, sd_a, sd_b)], 0, bool(names)
    while changed and it < max_iter:
        it, changed = it + 1, False
        for i in torch.randperm(len(names), generator=gen).tolist():
            score = weight_scores(spec, names[i], perms, sd_a, sd_b)
            new = assign(score)
            old_value, new_value = matched(score, perms[names[i]]), matched(score, new)
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                perms[names[i]], changed = new, True
        objective.append(weight_objective(spec, perms, sd_a, sd_b))
    return perms, {"iterations": it, "objective": objective, "converged": not changed}


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
        converged, seconds.
    """
    t0 = time.perf_counter()
    sd_a, sd_b = weights_of(model_a, params_only), weights_of(model_b, params_only)
    perms, record = match_weights(spec, sd_a, sd_b, max_iter=max_iter, seed=seed, init=init)
    return AlignResult(perms, {"method": "weight", **record, "seconds": time.perf_counter() - t0, "examples": 0})
