"""Functional-difference matching (He, Zhou, Thiele 2018, "Multi-task zipping via layer-wise neuron
sharing", Sec. 3.2, eq. 6; Entezari et al. 2021 use it to improve on annealing).

Pairing unit i of A with unit j of B costs the increase in layer-wise error of sharing one weight vector:

    d_ij = 1/2 (w~A_i - w~B_j)^T ((H~A)^-1 + (H~B)^-1)^-1 (w~A_i - w~B_j),

where w~ is the unit's incoming weight vector with its bias appended and H~ the layer-wise Hessian of
the squared output error, E[x~ x~^T] over the layer's inputs x~ = [x; 1] (conv: unfolded patches). We
use this UNCENTRED second moment (not the covariance) because it is exactly that Hessian, the appended
1 carrying the bias; it is damped, H~ + damping * mean(diag H~) I, so that it can be inverted. The
costs of all layers writing a group's units are summed and minimised with the Hungarian algorithm.
The layers (ops of `ops.LAYERS`) and their inputs are read from the captured graph, like every method.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.fx as fx
import torch.nn.functional as F

from ..checks import first_input
from ..errors import UnsupportedOpError
from ..graph import Captured, batch_size, capture
from ..ops import LAYERS, Layer, args_of
from ..permute import Perms, permute_tensor
from ..spec import PermutationSpec
from ..distributed import batches
from ..stats import Moments
from ._registry import AlignmentError, AlignResult, all_reduce_count, assign, device_of, initial_perms, matched, register_method, require_module, weights_of
from .weight import other_axes_permuted, match_weights


@dataclass(frozen=True)
class ProducingLayer:
    """A layer of the captured graph (an op of `ops.LAYERS`) whose output units are a group's units.

    name: its weight's key without ".weight" (the module's name for nn.Linear/Conv); inputs: the graph
    nodes of its input, one per call; conv: (kernel, stride, padding, dilation) of a conv, None for a
    layer on the last axis (Linear, addmm).
    """

    name: str
    weight: str
    bias: str | None
    row: Layer
    inputs: tuple[str, ...]
    conv: tuple | None

    def positions(self) -> int:
        """Input-matrix columns per input feature (the kernel's size for a conv)."""
        return math.prod(self.conv[0]) if self.conv else 1


def producing_layers(spec: PermutationSpec, graph: Captured) -> dict[str, list[ProducingLayer]]:
    """{group: the layers of `graph` whose output units are the group's units}: Linear, addmm and conv (1d,
    2d, groups=1) ops of `ops.LAYERS` whose weight's output axis is a member of the group."""
    owner = {(m.key, m.axis): g.name for g in spec.groups.values() for m in g.members}
    found: dict[str, tuple[str, dict]] = {}
    for node in graph.graph.nodes:
        row = LAYERS.get(node.target) if node.op == "call_function" else None
        if row is None:
            continue
        a = args_of(node)
        key, bias = (graph.keys.get(a[k].name) if isinstance(a.get(k), fx.Node) else None for k in (row.weight, row.bias))
        if key in found:
            found[key][1]["inputs"].append(a[row.input].name)
        elif (key, row.out_axis) in owner and (conv := _conv_geometry(row, a, graph.model.state_dict()[key].shape)) is not False:
            name = key.removesuffix(".weight")
            found[key] = (owner[(key, row.out_axis)], dict(name=name, weight=key, bias=bias, row=row, inputs=[a[row.input].name], conv=conv))
    out: dict[str, list[ProducingLayer]] = {g: [] for g in spec.groups}
    for group, kw in found.values():
        out[group].append(ProducingLayer(**{**kw, "inputs": tuple(kw["inputs"])}))
    return out


def _conv_geometry(row: Layer, a: dict, weight_shape):
    """(kernel, stride, padding, dilation) of a 1d/2d conv, None for a layer on the last axis, False for an
    op functional matching cannot unfold (a transposed, grouped or 3d conv)."""
    if row.feature_dim == -1:
        return None
    if row.out_axis != 0 or (a.get("groups") or 1) != 1 or len(weight_shape) not in (3, 4):
        return False
    padding = a["padding"] if isinstance(a["padding"], str) else tuple(a["padding"])
    return (tuple(weight_shape[2:]), tuple(a["stride"]), padding, tuple(a["dilation"]))


def layer_input_matrix(layer: ProducingLayer, x: torch.Tensor) -> torch.Tensor:
    """(samples, fan_in) float64 inputs seen by each output unit: a Linear's rows, or a conv's unfolded patches."""
    if layer.conv is None:
        return x.detach().reshape(-1, x.shape[-1]).double()
    kernel, stride, padding, dilation = layer.conv
    padding = _padding(padding, kernel, dilation)
    if len(kernel) == 1:
        x, kernel, dilation, stride, padding = x.unsqueeze(-2), (1, *kernel), (1, *dilation), (1, *stride), (0, *padding)
    patches = F.unfold(x.detach(), kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C*k, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()


def _padding(pad, kernel, dilation) -> tuple[int, ...]:
    if pad == "valid":
        return (0,) * len(kernel)
    if pad == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        if any(t % 2 for t in total):
            raise UnsupportedOpError("functional matching: padding='same' with an even kernel (asymmetric padding)")
        return tuple(t // 2 for t in total)
    return tuple(pad)


def input_moments(
    spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, data, *, max_examples: int | None = 10_000, device=None,
    graph: Captured | None = None,
) -> tuple[dict[str, tuple[Moments, Moments]], int]:
    """Full float64 moments of the inputs of every producing layer of A and of B, in one pass.

    Each network's captured graph (`spec.graph`, or one captured from A on the first batch for a
    hand-written spec; or `graph`) runs once per batch with its weights, returning every layer's input. Under
    torch.distributed the sums are all-reduced. Returns ({layer name: (moments of A, moments of B)}, examples).
    """
    graph = graph or _graph(spec, model_a, data, device)
    layers = [layer for group in producing_layers(spec, graph).values() for layer in group]
    moments = {layer.name: (Moments(full=True), Moments(full=True)) for layer in layers}
    taps = sorted({n for layer in layers for n in layer.inputs})
    states = [model_a.state_dict(), model_b.state_dict()]
    examples = 0
    for x in batches(data, max_examples, device_of(model_a, device)):
        for side, state in enumerate(states):
            values = dict(zip(taps, graph.run(state, x, taps, outputs=False)))
            for layer in layers:
                for name in layer.inputs:
                    _add_rows(moments[layer.name][side], layer, values[name])
        examples += batch_size(x)
    for ma, mb in moments.values():
        ma.all_reduce_(), mb.all_reduce_()
    return moments, all_reduce_count(examples)


def _graph(spec: PermutationSpec, model: nn.Module, data, device=None) -> Captured:
    """The spec's captured graph, or (a hand-written spec) one captured from `model` on the first batch."""
    return spec.graph if spec.graph is not None else capture(model, first_input(data, device=device_of(model, device)))


def _add_rows(m: Moments, layer: ProducingLayer, x: torch.Tensor, max_rows: int = 1 << 16) -> None:
    """Add a layer's input rows to `m`, a few images at a time (conv patches are large)."""
    positions = max(1, layer_input_matrix(layer, x[:1]).shape[0])
    for chunk in x.split(max(1, max_rows // positions)):
        m.update(layer_input_matrix(layer, chunk))


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
    layers: dict  # name -> ProducingLayer
    damping: float
    output_group: dict  # layer -> the group its units belong to
    cache: dict = field(default_factory=dict)

    def input_perm(self, layer: str, perms: Perms) -> tuple[torch.Tensor | None, int]:
        """The permutation of the layer's inputs (None: unpermuted) and the fan-in per input unit."""
        info = self.layers[layer]
        inp = [(g, block) for ax, g, block in self.spec.axes_of[info.weight] if ax == info.row.in_axis and g in perms]
        return (perms[inp[0][0]], inp[0][1] * info.positions()) if inp else (None, 1)

    def costs(self, layer: str, perms: Perms) -> torch.Tensor:
        """(n, n) costs of pairing unit i of A with unit j of B in one layer, B's inputs in A's order."""
        perm, block = self.input_perm(layer, perms)
        tag = (layer, None if perm is None else tuple(perm.tolist()))
        if tag not in self.cache:
            info = self.layers[layer]
            key, out, bias = info.weight, info.row.out_axis, info.bias is not None
            wa = self.sd_a[key].double().movedim(out, 0).flatten(1)  # (units, fan_in): inputs major, kernel minor
            wb = other_axes_permuted(self.spec, key, out, perms, self.sd_b[key]).double().movedim(out, 0).flatten(1)
            if bias:
                wa = torch.cat([wa, self.sd_a[info.bias].double()[:, None]], 1)
                wb = torch.cat([wb, self.sd_b[info.bias].double()[:, None]], 1)
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
        info = problem.layers[layer]
        for ax, g, _ in problem.spec.axes_of[info.weight]:
            if ax == info.row.in_axis:
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
        spec: the PermutationSpec; model_a, model_b: nn.Modules; the layers are those of `ops.LAYERS` in
            their captured graph (Linear, addmm, 1d/2d conv with groups=1).
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
    graph = _graph(spec, model_a, data, device)
    moments, examples = input_moments(spec, model_a, model_b, data, max_examples=max_examples, device=device, graph=graph)
    found = producing_layers(spec, graph)
    layers = {g: [layer.name for layer in group] for g, group in found.items()}
    owner = {n: g for g, names in layers.items() for n in names}
    by_name = {layer.name: layer for group in found.values() for layer in group}
    problem = _Problem(spec, weights_of(model_a, False), weights_of(model_b, False), moments, by_name, damping, owner)
    consumers, perms = _consumers(problem), initial_perms(spec, init)
    fallback = [g for g, names in layers.items() if not names]
    if fallback:  # first, so that the layers they feed (after an embedding, say) are costed on aligned inputs
        perms, _ = match_weights(spec, weights_of(model_a), weights_of(model_b), init=perms, groups=fallback)
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
    if fallback:  # again, given the groups matched functionally
        perms, _ = match_weights(spec, weights_of(model_a), weights_of(model_b), init=perms, groups=fallback)
    record = {"method": "functional", "iterations": it, "objective": objective, "converged": not changed, "examples": examples,
              "damping": damping, "weight_fallback": fallback, "seconds": time.perf_counter() - t0}  # fmt: skip
    return AlignResult(perms, record)
