"""Functional-difference matching (He, Zhou, Thiele 2018, "Multi-task zipping via layer-wise neuron
sharing", Sec. 3.2, eq. 6; Entezari et al. 2021 use it to improve on annealing).

Pairing unit i of A with unit j of B costs the increase in layer-wise error of sharing one weight vector:

    d_ij = 1/2 (w~A_i - w~B_j)^T ((H~A)^-1 + (H~B)^-1)^-1 (w~A_i - w~B_j),

where w~ is the unit's incoming weight vector with its bias appended and H~ the layer-wise Hessian of
the squared output error, E[x~ x~^T] over the layer's inputs x~ = [x; 1] (conv: unfolded patches). We
use this UNCENTRED second moment (not the covariance) because it is exactly that Hessian, the appended
1 carrying the bias; it is damped, H~ + damping * mean(diag H~) I, so that it can be inverted. The
costs of all layers writing a group's units are summed and minimised with the Hungarian algorithm.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UnsupportedOpError
from ..graph import as_call, batch_size
from ..permute import Perms, permute_tensor
from ..spec import PermutationSpec
from ..stats import Moments, batches, eval_mode
from ._registry import AlignmentError, AlignResult, all_reduce_count, assign, device_of, initial_perms, matched, register_method, require_module, weights_of
from .weight import other_axes_permuted, match_weights

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def producing_layers(spec: PermutationSpec, model: nn.Module) -> dict[str, list[str]]:
    """{group: names of the Linear/Conv modules whose output units are the group's units}."""
    modules = dict(model.named_modules())
    out = {}
    for g in spec.groups.values():
        names = [m.key[: -len(".weight")] for m in g.members if m.axis == 0 and m.key.endswith(".weight")]
        out[g.name] = [n for n in names if isinstance(modules.get(n), _LAYERS)]
    return out


def layer_input_matrix(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(samples, fan_in) float64 inputs seen by each output unit: Linear rows, or conv unfolded patches."""
    if isinstance(module, nn.Linear):
        return x.detach().reshape(-1, x.shape[-1]).double()
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if isinstance(module, nn.Conv1d):
        x, kernel, dilation, stride = x.unsqueeze(-2), (1, *kernel), (1, *dilation), (1, *stride)
    padding = _padding(module)
    if module.padding_mode != "zeros":
        x, padding = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), 0
    patches = F.unfold(x.detach(), kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C*k, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()


def _padding(module) -> tuple[int, ...] | int:
    pad = module.padding
    if pad == "valid":
        return 0
    if pad == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if any(t % 2 for t in total):
            raise UnsupportedOpError("functional matching: padding='same' with an even kernel (asymmetric padding)")
        pad = tuple(t // 2 for t in total)
    return (0, *pad) if isinstance(module, nn.Conv1d) else pad


def input_moments(
    spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, data, *, max_examples: int | None = 10_000, device=None
) -> tuple[dict[str, tuple[Moments, Moments]], int]:
    """Full float64 moments of the inputs of every producing layer of A and of B, in one pass.

    One forward of each network per batch; forward pre-hooks read each layer's input. Under
    torch.distributed the sums are all-reduced. Returns ({layer: (moments of A, moments of B)}, examples).
    """
    layers = sorted({n for names in producing_layers(spec, model_a).values() for n in names})
    moments = {n: (Moments(full=True), Moments(full=True)) for n in layers}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(_collector(moments[n][side]))
        for n in layers
        for side, model in enumerate((model_a, model_b))
    ]
    examples = 0
    try:
        with torch.no_grad(), eval_mode(model_a, model_b):
            for x in batches(data, max_examples, device_of(model_a, device)):
                args, kwargs = as_call(x)
                model_a(*args, **kwargs), model_b(*args, **kwargs)
                examples += batch_size(x)
    finally:
        for h in hooks:
            h.remove()
    for ma, mb in moments.values():
        ma.all_reduce_(), mb.all_reduce_()
    return moments, all_reduce_count(examples)


def _collector(m: Moments, max_rows: int = 1 << 16):
    """A pre-hook adding a layer's input rows to `m`, a few images at a time (conv patches are large)."""

    def hook(module, args):
        x = args[0]
        positions = max(1, layer_input_matrix(module, x[:1]).shape[0])
        for chunk in x.split(max(1, max_rows // positions)):
            m.update(layer_input_matrix(module, chunk))

    return hook


def hessian(m: Moments, bias: bool, damping: float, perm: torch.Tensor | None = None, block: int = 1) -> torch.Tensor:
    """Damped E[x~ x~^T] (fan_in [+1], fan_in [+1]) of a layer's inputs, inputs re-indexed by `perm`."""
    s, mu = m.second_moment_x, m.mean_x
    if perm is not None:
        s = permute_tensor(permute_tensor(s, 0, perm, block), 1, perm, block)
        mu = permute_tensor(mu, 0, perm, block)
    if bias:
        s = torch.cat([torch.cat([s, mu[:, None]], 1), torch.cat([mu, mu.new_ones(1)])[None]], 0)
    return s + damping * s.diagonal().mean().clamp_min(1e-12) * torch.eye(len(s), dtype=s.dtype, device=s.device)


def pair_costs(wa: torch.Tensor, wb: torch.Tensor, ha: torch.Tensor, hb: torch.Tensor) -> torch.Tensor:
    """(n, n) d_ij = 1/2 (wa_i - wb_j)^T (ha^-1 + hb^-1)^-1 (wa_i - wb_j) (He et al. 2018, eq. 6).

    wa, wb: (n, d) incoming weights (bias appended); ha, hb: (d, d) damped Hessians, B's in A's input
    order. Uses (ha^-1 + hb^-1)^-1 = ha (ha + hb)^-1 hb with one Cholesky factor and 2n right-hand sides.
    """
    wa, wb = wa.to(ha.device), wb.to(ha.device)
    factor = torch.linalg.cholesky(ha + hb)
    ua, ub = wa @ ha, wb @ ha  # rows w^T ha
    va, vb = torch.cholesky_solve(hb @ wa.T, factor), torch.cholesky_solve(hb @ wb.T, factor)  # (ha+hb)^-1 hb w
    qa, qb, cross = (ua * va.T).sum(1), (ub * vb.T).sum(1), ua @ vb
    return 0.5 * (qa[:, None] + qb[None, :] - 2 * cross)


@dataclass
class _Problem:
    """The data of one functional matching: weights, layer-input moments, and a cache of cost matrices."""

    spec: PermutationSpec
    sd_a: dict
    sd_b: dict
    moments: dict
    modules: dict
    damping: float
    output_group: dict  # layer -> the group its units belong to
    cache: dict = field(default_factory=dict)

    def input_perm(self, layer: str, perms: Perms) -> tuple[torch.Tensor | None, int]:
        """The permutation of the layer's inputs (None: unpermuted) and the fan-in per input unit."""
        key = f"{layer}.weight"
        inp = [(g, block) for ax, g, block in self.spec.axes_of[key] if ax == 1 and g in perms]
        return (perms[inp[0][0]], inp[0][1] * math.prod(self.sd_a[key].shape[2:])) if inp else (None, 1)

    def costs(self, layer: str, perms: Perms) -> torch.Tensor:
        """(n, n) costs of pairing unit i of A with unit j of B in one layer, B's inputs in A's order."""
        perm, block = self.input_perm(layer, perms)
        tag = (layer, None if perm is None else tuple(perm.tolist()))
        if tag not in self.cache:
            key, bias = f"{layer}.weight", self.modules[layer].bias is not None
            n = self.sd_a[key].shape[0]
            wa = self.sd_a[key].double().reshape(n, -1)
            wb = other_axes_permuted(self.spec, key, 0, perms, self.sd_b[key]).double().reshape(n, -1)
            if bias:
                wa = torch.cat([wa, self.sd_a[f"{layer}.bias"].double()[:, None]], 1)
                wb = torch.cat([wb, self.sd_b[f"{layer}.bias"].double()[:, None]], 1)
            ha = hessian(self.moments[layer][0], bias, self.damping)
            hb = hessian(self.moments[layer][1], bias, self.damping, perm, block)
            self.cache[tag] = pair_costs(wa, wb, ha, hb).cpu()
        return self.cache[tag]

    def value(self, layers, perms: Perms) -> float:
        """sum over `layers` of the costs of their matched units under `perms`."""
        return sum(matched(self.costs(n, perms), perms[self.output_group[n]]) for n in layers)

    def forget_except(self, perms: Perms) -> None:
        """Drop cached costs for input permutations other than the current ones."""
        keep = {(n, None if p is None else tuple(p.tolist())) for n in self.output_group for p in [self.input_perm(n, perms)[0]]}
        self.cache = {k: v for k, v in self.cache.items() if k in keep}


def _lowers(before: float, after: float) -> bool:
    return after < before - 1e-12 * max(1.0, abs(before))


def _consumers(problem: _Problem) -> dict[str, list[str]]:
    """group -> the producing layers whose inputs it permutes."""
    out: dict[str, list[str]] = {}
    for layer in problem.output_group:
        for ax, g, _ in problem.spec.axes_of[f"{layer}.weight"]:
            if ax == 1:
                out.setdefault(g, []).append(layer)
    return out


@register_method(name="functional", reference="He, Zhou, Thiele 2018, Multi-task zipping via layer-wise neuron sharing, arXiv:1805.09791, eq. 6")
def functional_matching(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data=None,
    *,
    max_examples: int | None = 10_000,
    device=None,
    damping: float = 1e-2,
    max_iter: int = 20,
    init=None,
) -> AlignResult:
    """Align B to A by minimising the summed functional difference of paired units (He et al. 2018, eq. 6).

    Args:
        spec: the PermutationSpec; model_a, model_b: nn.Modules with Linear/Conv1d/Conv2d layers.
        data: iterable of x or (x, y) batches; max_examples inputs feed the layer-input Hessians.
        damping: added to each Hessian as damping * mean(diag H) * I.
        max_iter: at most this many sweeps over the groups in forward order. A layer's costs depend on
            the permutation of its inputs, so each group's Hungarian step uses the current perms. The
            first sweep keeps every step: He et al.'s layer-by-layer matching, exact for a feed-forward
            net. Later sweeps keep a step only if it lowers the total cost J = sum over layers of
            d_i,p(i) (over the group's own layers and the layers it feeds), so they end; they refine
            residual streams, which feed the layers that feed them.
        init: an AlignResult or perms dict to start from.
    Returns:
        AlignResult; record: iterations (sweeps), objective (J initially and after each sweep),
        converged, examples, seconds, weight_fallback (groups with no Linear/Conv producing their
        units, matched by weight matching).
    """
    if data is None:
        raise ValueError("functional matching needs data: an iterable of x or (x, y) batches")
    t0 = time.perf_counter()
    model_a, model_b = require_module(model_a, "functional"), require_module(model_b, "functional")
    if structured := [g.name for g in spec.groups.values() if g.structured]:
        raise AlignmentError(f"functional matching permutes free groups only; {structured[0]!r} has block structure "
                             "(attention heads or conv groups): use activation or weight matching")
    moments, examples = input_moments(spec, model_a, model_b, data, max_examples=max_examples, device=device)
    layers = producing_layers(spec, model_a)
    owner = {n: g for g, names in layers.items() for n in names}
    problem = _Problem(spec, weights_of(model_a, False), weights_of(model_b, False), moments, dict(model_a.named_modules()), damping, owner)
    consumers, perms = _consumers(problem), initial_perms(spec, init)
    objective, it, changed = [problem.value(owner, perms)], 0, True
    while changed and it < max_iter:
        it, changed = it + 1, False
        for g, names in layers.items():
            new = assign(sum(problem.costs(n, perms) for n in names), maximize=False) if names else perms[g]
            if torch.equal(new, perms[g]):
                continue
            trial, affected = {**perms, g: new}, set(names) | set(consumers.get(g, ()))
            if it == 1 or _lowers(problem.value(affected, perms), problem.value(affected, trial)):
                perms, changed = trial, True
            problem.forget_except(perms)
        objective.append(problem.value(owner, perms))
    fallback = [g for g, names in layers.items() if not names]
    if fallback:
        perms, _ = match_weights(spec, weights_of(model_a), weights_of(model_b), init=perms, groups=fallback)
    record = {"method": "functional", "iterations": it, "objective": objective, "converged": not changed, "examples": examples,
              "damping": damping, "weight_fallback": fallback, "seconds": time.perf_counter() - t0}  # fmt: skip
    return AlignResult(perms, record)
