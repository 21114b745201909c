"""Simulated annealing over permutations (Entezari, Sedghi, Saukh, Neyshabur 2021, "The role of
permutation invariance in linear mode connectivity", Algorithm 1).

State: one permutation per group per model. A move swaps two units of one group of one model; in a
structured group (attention heads, conv groups) it swaps two whole blocks (carrying along the groups
whose blocks follow it) or two units inside one block, so every state keeps the block structure. It is
accepted by the Metropolis rule, always if the objective drops and with probability exp(-delta / T)
otherwise, T cooling geometrically from `t0` to `t0 * cooling` over the evaluation budget. Objective
(Entezari et al. eq. 1, on one held-out batch): the barrier of the models' average,
loss(sum_i w_i theta_i) - sum_i w_i loss(theta_i), with w uniform for n models, or for n = 2 the
largest barrier over the interpolation weights `alphas` (default the midpoint).

The record keeps the objective over the search, `history`: (evaluation, current barrier, best barrier)
every max(1, budget // 500) evaluations (fewer than 1,000 entries), always at the first and the last evaluation.
"""

from __future__ import annotations

import math
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .._progress import progress_bar
from ..permute import StateDict, apply_perms, block_perm, permute_member
from ..spec import Group, PermutationSpec
from ..stats import eval_mode
from ._registry import AlignResult, device_of, first_examples, initial_perms, register_method, require_module


class _Objective:
    """Barrier of weighted averages of the permuted models on one batch (x, y)."""

    def __init__(self, scratch: nn.Module, sds: list[StateDict], mixes: list[list[float]], x, y, loss_fn):
        self.scratch, self.mixes, self.x = scratch, mixes, x
        outs = [self.run(sd) for sd in sds]
        self.target = y if y is not None else torch.stack(outs).mean(0)
        self.loss_fn = loss_fn or _default_loss(self.target)
        losses = [self.loss_fn(o, self.target).item() for o in outs]
        self.endpoint = [sum(w * l for w, l in zip(mix, losses)) for mix in mixes]
        self.endpoint_losses = losses

    def run(self, sd: StateDict) -> torch.Tensor:
        with torch.no_grad():
            return functional_call(self.scratch, sd, (self.x,), tie_weights=False)  # tied keys are permuted alike

    def __call__(self, merged: list[StateDict]) -> float:
        return max(self.loss_fn(self.run(sd), self.target).item() - e for sd, e in zip(merged, self.endpoint))


def _default_loss(target: torch.Tensor):
    """Cross-entropy for integer labels; mean squared error for float targets (or no labels)."""
    return F.cross_entropy if not target.is_floating_point() else F.mse_loss


def _mix(sds: list[StateDict], weights: list[float], keys) -> StateDict:
    """sum_i weights[i] * sds[i][k] for floating keys; other tensors (counters) from the first model."""
    return {k: sum(w * sd[k] for w, sd in zip(weights, sds)) if sds[0][k].is_floating_point() else sds[0][k] for k in keys}


def _swap(size: int, u: int, v: int) -> torch.Tensor:
    """The transposition of units u and v, as a permutation of `size` units."""
    t = torch.arange(size)
    t[u], t[v] = v, u
    return t


def _moves(spec: PermutationSpec) -> list[tuple[Group, str]]:
    """Every kind of move that keeps the block structure: (group, "units" | "blocks" | "inside")."""
    out = []
    for g in spec.groups.values():
        if not g.structured and g.parent is None and g.size >= 2:
            out.append((g, "units"))
        if g.structured and g.parent is None and not g.fixed_blocks and g.blocks >= 2:
            out.append((g, "blocks"))
        if g.structured and g.inner and g.block >= 2:
            out.append((g, "inside"))
    return out


def _draw(rng: random.Random, spec: PermutationSpec, group: Group, kind: str) -> dict[str, torch.Tensor]:
    """One random transposition as {group name: permutation of its units}, with the groups whose blocks
    follow a moved group (e.g. each head's query/key and value units when the heads swap)."""
    if kind == "inside":
        b, (u, v) = rng.randrange(group.blocks), rng.sample(range(group.block), 2)
        t = _swap(group.size, b * group.block + u, b * group.block + v)
    elif kind == "blocks":
        t = block_perm(_swap(group.blocks, *rng.sample(range(group.blocks), 2)), torch.arange(group.block).expand(group.blocks, -1))
    else:
        t = _swap(group.size, *rng.sample(range(group.size), 2))
    moved = {group.name: t}
    _follow(spec, group.name, t, moved)
    return moved


def _follow(spec: PermutationSpec, name: str, t: torch.Tensor, moved: dict) -> None:
    """Add the block permutation of every group whose blocks follow the units of group `name`, moved by t
    (recursively)."""
    for c in spec.children(name):
        moved[c.name] = block_perm(t, torch.arange(c.block).expand(len(t), -1))
        _follow(spec, c.name, moved[c.name], moved)


def _swapped(sd: StateDict, spec: PermutationSpec, moved: dict[str, torch.Tensor]) -> StateDict:
    """A new state_dict with each moved group's units re-indexed by its permutation on every axis it permutes."""
    out = dict(sd)
    for name, t in moved.items():
        for m in spec.groups[name].members:
            out[m.key] = permute_member(out[m.key], m, t)
    return out


def _metropolis(rng: random.Random, delta: float, temperature: float) -> bool:
    """Accept a move that raises the objective by delta with probability min(1, exp(-delta / T))."""
    return delta <= 0 or rng.random() < math.exp(-delta / max(temperature, 1e-300))


def anneal_many(
    spec: PermutationSpec,
    models: list[nn.Module],
    data,
    *,
    budget: int = 2000,
    seed: int = 0,
    t0: float | None = None,
    cooling: float = 1e-3,
    alphas: tuple[float, ...] = (0.5,),
    loss_fn=None,
    max_examples: int = 512,
    init: list | None = None,
    fix_first: bool = True,
    device=None,
    progress: bool = True,
) -> list[AlignResult]:
    """Search permutations of n >= 2 models at once by simulated annealing (Entezari et al. 2021, Alg. 1).

    Args:
        spec: the shared PermutationSpec; models: n >= 2 nn.Modules of that architecture (evaluated in
            eval mode through torch.func.functional_call on models[0]; none is modified).
        data: iterable of x or (x, y) batches; the first `max_examples` inputs form the held-out batch
            (the same on every process: this search does not shard). Integer labels: cross-entropy;
            float labels: MSE; no labels: MSE to the mean of the endpoints' outputs.
        budget: objective evaluations (the initial one included).
        t0: initial temperature, default 0.1 * |initial barrier|; cooling: final T = t0 * cooling.
        alphas: for n = 2, the interpolation weights of B whose largest barrier is the objective.
        init: per model, None or an AlignResult / perms dict to start from (refinement).
        fix_first: keep model 0 as the reference (the objective is invariant to permuting all models
            alike, so this loses nothing and halves the search space for n = 2).
        progress: show a tqdm bar over the evaluations (with the best barrier so far).
    Returns:
        one AlignResult per model (the best state seen); all share one record: evaluations, accepted,
        objective [initial, best], history [(evaluation, current barrier, best barrier)] (every
        max(1, budget // 500) evaluations and the last), t0, endpoint_losses, seconds, examples.
    """
    if len(models) < 2:
        raise ValueError(f"annealing needs at least 2 models, got {len(models)}")
    t_start, rng, n = time.perf_counter(), random.Random(seed), len(models)
    models = [require_module(m, "annealing") for m in models]
    dev = device_of(models[0], device)
    x, y = first_examples(data, max_examples)
    mixes = [[1 - a, a] for a in alphas] if n == 2 else [[1 / n] * n]
    perms = [initial_perms(spec, (init or [None] * n)[i]) for i in range(n)]
    cur = [apply_perms(spec, p, {k: v.detach().to(dev) for k, v in m.state_dict().items()}) for p, m in zip(perms, models)]
    moves, chosen = _moves(spec), list(range(1 if fix_first else 0, n))
    evaluations = budget if moves else 1
    with eval_mode(models[0]):
        objective = _Objective(models[0], cur, mixes, x.to(dev), None if y is None else y.to(dev), loss_fn)
        merged = [_mix(cur, w, cur[0].keys()) for w in mixes]
        value = initial = best = objective(merged)
        best_perms, accepted, history = [dict(p) for p in perms], 0, [(1, value, value)]
        t0 = t0 if t0 is not None else 0.1 * max(abs(value), 1e-6)
        every = max(1, budget // 500)
        with progress_bar(total=evaluations, initial=1, unit="eval", desc="annealing", disable=not progress) as bar:
            for k in range(1, evaluations):
                i, moved = rng.choice(chosen), _draw(rng, spec, *rng.choice(moves))
                trial = cur[:i] + [_swapped(cur[i], spec, moved)] + cur[i + 1 :]
                keys = {m.key for name in moved for m in spec.groups[name].members}
                trial_merged = [{**mg, **_mix(trial, w, keys)} for mg, w in zip(merged, mixes)]
                trial_value = objective(trial_merged)
                if _metropolis(rng, trial_value - value, t0 * cooling ** (k / budget)):
                    cur, merged, value, accepted = trial, trial_merged, trial_value, accepted + 1
                    perms[i] = {**perms[i], **{name: perms[i][name][t] for name, t in moved.items()}}
                    if value < best:
                        best, best_perms = value, [dict(p) for p in perms]
                if k % every == 0 or k == evaluations - 1:
                    history.append((k + 1, value, best))
                    bar.set_postfix(best=f"{best:.4g}", current=f"{value:.4g}", refresh=False)
                bar.update(1)
    record = {"method": "annealing", "iterations": evaluations, "evaluations": evaluations, "accepted": accepted,
              "objective": [initial, best], "history": history, "t0": t0, "endpoint_losses": objective.endpoint_losses,
              "examples": x.shape[0], "seconds": time.perf_counter() - t_start}  # fmt: skip
    return [AlignResult(p, record) for p in best_perms]


@register_method(name="annealing", reference="Entezari, Sedghi, Saukh, Neyshabur 2021, The Role of Permutation Invariance in Linear Mode Connectivity of Neural Networks, arXiv:2110.06296, Alg. 1")
def annealing(spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, data=None, *, init=None, **options) -> AlignResult:
    """Align B to A by simulated annealing on the barrier (Entezari et al. 2021, Alg. 1; the n = 2 case).

    A stays fixed; `init` (an AlignResult or perms of B, e.g. activation matching's) is refined. Options
    as `anneal_many`: budget (default 2000 evaluations), seed, t0, cooling, alphas, loss_fn, max_examples,
    progress.
    """
    if data is None:
        raise ValueError("annealing needs data: an iterable of x or (x, y) batches (the held-out batch)")
    options.pop("fix_first", None)
    return anneal_many(spec, [model_a, model_b], data, init=[None, init], **options)[1]
