"""REPAIR (Jordan et al. 2022): renormalise the hidden units of an interpolated network, and BN reset.

An interpolated network theta_alpha = (1 - alpha) theta_A + alpha theta_B suffers *variance collapse*:
its hidden units vary less over the data than the same units of A and B (Sec. 3). REPAIR (Sec. 4) gives
every selected unit the statistics of eqs. (3)-(4),

    E[X_alpha] = (1 - alpha) E[X_A] + alpha E[X_B],    std(X_alpha) = (1 - alpha) std(X_A) + alpha std(X_B),

with a per-unit affine correction y -> scale * y + shift applied at the spec's sites: kind "layer"
(output of a Linear/Conv, or of the norm right after it) and kind "block" (output of a residual addition).

* `method="exact"` (Sec. 4.2) measures the interpolated network's statistics on calibration data with
  every earlier correction already in place. A site's statistics depend only on corrections of sites
  upstream of it, so sites are grouped into dependency *levels* (level 0: no corrected site upstream;
  level k: the deepest corrected site upstream is at level k-1) and one forward pass corrects a whole
  level. Passes over the interpolated net = number of levels = the longest chain of corrected sites:
  an MLP with H hidden layers takes H passes; the CIFAR ResNet20 layout with layer and block sites
  takes 1 (stem) + 3 per block (conv1, conv2 with its shortcut, the addition) = 28, with layer sites only
  1 + 2 per block = 19. Each pass runs the network only up to the deepest site it reads. The
  paper's one-pass version (train-mode BatchNorm wrappers, App. B.2) uses per-batch statistics; this one
  uses exact whole-calibration-set float64 sums, so the corrected statistics match the goals to rounding.
* `method="closed"` (Sec. 4.1, eq. 5) predicts std(X_alpha) = sqrt((1-a)^2 Var_A + a^2 Var_B + 2a(1-a) Cov_AB)
  and E[X_alpha] = (1-a) E[X_A] + a E[X_B] from the endpoints alone: no pass over the interpolated net.
  Exact for sites whose input does not depend on other hidden units (the first layer); an approximation
  deeper (measure how far with `repair_errors`).

Fusion. A correction after a Linear/Conv output folds into its weight and bias; after a norm layer
(BatchNorm, LayerNorm, GroupNorm, InstanceNorm with affine parameters) into the norm's weight and bias
(for BatchNorm nets this is BN reset, Sec. 5.2). The result is then an instance of the original class.
A correction cannot be folded, and stays as a `RepairAffine` module named `repair_<fx node>`, when it
follows a residual addition (the identity shortcut carries an upstream tensor that other layers also
read), a Linear/Conv without bias or a norm without affine bias (the shift has nowhere to go), a module
called more than once, or a function call. The model is then a `torch.fx.GraphModule` named
`Repaired<Class>`: the original modules and parameters (same state_dict keys) plus those modules.
All statistics are taken in eval mode (BatchNorm uses its running statistics, dropout is off).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import OnebasinError
from .interpolate import interpolate_model
from .spec import PermutationSpec, Site, symbolic_trace, trace
from .stats import Moments, batches, clone_before_inplace, eval_mode, is_inplace, unit_matrix

KINDS = ("layer", "block")
METHODS = ("exact", "closed")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


class RepairAffine(nn.Module):
    """y = weight * x + bias per unit along axis `dim`: a REPAIR correction that could not be fused.

    weight, bias: (units,). Its state_dict keys are `<name>.weight` and `<name>.bias`.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, dim: int):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[self.dim] = -1
        return x * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"units={self.weight.numel()}, dim={self.dim}"


# --- sites and taps ------------------------------------------------------------------------------------


def select_sites(spec: PermutationSpec, model: nn.Module, kinds: Iterable[str] = KINDS) -> list[Site]:
    """The spec's sites of the given kinds, each once, in forward (graph) order; module-only sites get their node."""
    kinds = tuple(kinds)
    if bad := [k for k in kinds if k not in KINDS]:
        raise ValueError(f"unknown site kind(s) {bad}; valid kinds: {list(KINDS)}")
    graph = symbolic_trace(model).graph
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    calls = {n.target: n.name for n in graph.nodes if n.op == "call_module"}
    found: dict[str, Site] = {}
    for group in spec.groups.values():
        for s in group.sites:
            if s.kind in kinds:
                s = s if s.node else dataclasses.replace(s, node=calls[s.module])
                found.setdefault(s.node, s)
    return sorted(found.values(), key=lambda s: order[s.node])


def _is_wrapper(model: nn.Module) -> bool:
    return isinstance(model, fx.GraphModule) and any(isinstance(m, RepairAffine) for m in model.modules())


def _tap(model: nn.Module, nodes: list[str], corrected: bool = True) -> fx.GraphModule:
    """A GraphModule sharing `model`'s parameters that returns the tensors at fx nodes `nodes` (a tuple).

    It computes only what those tensors need (a truncated forward; in-place ops are kept). A tensor that
    a later op modifies in place (`out += x`, ReLU(inplace=True)) is cloned first. In a repaired wrapper,
    a site is read after its RepairAffine when `corrected`, before it otherwise.
    """
    gm = model if _is_wrapper(model) else symbolic_trace(model)
    graph, env = fx.Graph(), {}
    graph.graph_copy(gm.graph, env)
    by_name = {n.name: n for n in gm.graph.nodes}
    affine = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    picks = [env[(affine.get(f"repair_{name}") if corrected else None) or by_name[name]] for name in nodes]
    graph.output(tuple(clone_before_inplace(gm, n) for n in picks))
    tap = fx.GraphModule(gm, graph)
    tap.graph.eliminate_dead_code(lambda n: n.is_impure() or is_inplace(tap, n))
    tap.recompile()
    return tap


@contextlib.contextmanager
def _eval_mode(*models: nn.Module):
    """Run without gradients with every module in eval mode, then restore each module's own training flag."""
    with torch.no_grad(), eval_mode(*models):
        yield


def _inputs(data: Iterable, model: nn.Module, max_examples: int | None) -> Iterator[torch.Tensor]:
    """Input batches on `model`'s device; floating inputs in its dtype."""
    p = next(model.parameters())
    for x in batches(data, max_examples, p.device):
        yield x.to(p.dtype) if x.is_floating_point() else x


def site_moments(
    model: nn.Module, sites: list[Site], data: Iterable, max_examples: int | None = 5000, corrected: bool = True
) -> list[Moments]:
    """Exact float64 per-unit sums of `model`'s activations at `sites`, in one (truncated) forward pass.

    Returns one Moments per site (x: (samples, units), conv positions pooled as samples).
    """
    tap = _tap(model, [s.node for s in sites], corrected)
    moments = [Moments() for _ in sites]
    with _eval_mode(tap):
        for x in _inputs(data, model, max_examples):
            for m, s, t in zip(moments, sites, tap(x)):
                m.update(unit_matrix(t, s.dim))
    return [m.all_reduce_() for m in moments]


def site_stats(
    model: nn.Module, sites: list[Site], data: Iterable, max_examples: int | None = 5000
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-unit mean and std (population, float64, (units,) each) of `model` at every site, one pass."""
    moments = site_moments(model, sites, data, max_examples)
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


def endpoint_stats(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable,
    spec: PermutationSpec | None = None,
    sites: Iterable[str] | list[Site] = KINDS,
    max_examples: int | None = 5000,
) -> EndpointStats:
    """Means, variances and per-unit cross-covariance of A and B (B aligned to A) at the selected sites.

    Args:
        model_a, model_b: the endpoints (same architecture; unit i of B is matched to unit i of A).
        data: re-iterable of x or (x, y, ...) batches; the first `max_examples` examples are used.
        spec: A's PermutationSpec (traced on the first batch when None).
        sites: site kinds ("layer", "block") or an explicit list of Sites.
    Returns:
        EndpointStats: one paired pass of A and B over the data (both in eval mode).
    """
    site_list = _resolve_sites(model_a, data, spec, sites)
    names = [s.node for s in site_list]
    tap_a, tap_b = _tap(model_a, names), _tap(model_b, names)
    moments, ndims = [Moments() for _ in site_list], [0] * len(site_list)
    with _eval_mode(tap_a, tap_b):
        for x in _inputs(data, model_a, max_examples):
            for i, (s, a, b) in enumerate(zip(site_list, tap_a(x), tap_b(x))):
                ua, ub = unit_matrix(a, s.dim), unit_matrix(b.to(a.device), s.dim)
                moments[i].update(torch.cat([ua, ub, ua * ub], 1))  # E[ab] gives the per-unit covariance
                ndims[i] = a.ndim
    return _split_paired(site_list, [m.all_reduce_() for m in moments], ndims)


def _split_paired(sites: list[Site], moments: list[Moments], ndims: list[int]) -> EndpointStats:
    """EndpointStats from Moments over [a, b, a*b] columns."""
    cols = {k: [] for k in ("mean_a", "var_a", "mean_b", "var_b", "cov_ab")}
    for m in moments:
        p = m.mean_x.numel() // 3
        mean, var = m.mean_x, m.var_x
        cols["mean_a"].append(mean[:p])
        cols["var_a"].append(var[:p])
        cols["mean_b"].append(mean[p : 2 * p])
        cols["var_b"].append(var[p : 2 * p])
        cols["cov_ab"].append(mean[2 * p :] - mean[:p] * mean[p : 2 * p])
    return EndpointStats(sites, **cols, ndims=ndims)


def _resolve_sites(model: nn.Module, data: Iterable, spec: PermutationSpec | None, sites) -> list[Site]:
    """An explicit site list, or the spec's sites of the given kinds (tracing `model` on 2 examples if no spec)."""
    if sites and all(isinstance(s, Site) for s in sites):
        return list(sites)
    if spec is None:
        example = next(_inputs(data, model, 2), None)
        if example is None:
            raise ValueError("no data: the calibration data yielded no batch")
        spec = trace(model, example)
    return select_sites(spec, model, sites)


# --- corrections ---------------------------------------------------------------------------------------


def _affine(mean, std, goal_mean, goal_std, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) taking a unit of mean `mean`, std `std` to the goal; units constant to within
    rounding of the model's dtype (machine epsilon `eps`) keep scale 1 and only get their mean shifted."""
    tol = 100 * eps * mean.abs() + torch.finfo(torch.float64).tiny
    scale = torch.where(std > tol, goal_std / std.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(std))
    return scale, goal_mean - scale * mean


def with_affines(model: nn.Module, affines: dict[str, RepairAffine]) -> fx.GraphModule:
    """A GraphModule computing `model` with `affines[node]` applied to the output of each fx node.

    The module for node X is registered as `repair_X`; every other module and parameter keeps its
    state_dict key. To reload a saved wrapper, use `restore_affines`. `model` is not modified (the wrapper shares its parameters).
    """
    gm = symbolic_trace(model)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, mod in affines.items():
        target = f"repair_{name}"
        gm.add_submodule(target, mod)
        with gm.graph.inserting_after(nodes[name]):
            new = gm.graph.call_module(target, (nodes[name],))
        nodes[name].replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
    gm.recompile()
    gm.__class__.__name__ = f"Repaired{type(model).__name__}"
    return gm


def restore_affines(model: nn.Module, affines: dict[str, int], state: dict[str, torch.Tensor]) -> fx.GraphModule:
    """`model` wrapped as `with_affines` with identity RepairAffines sized from `state`, ready for `load_state_dict(state)`.

    Args:
        model: a fresh instance of the merged model's original class.
        affines: fx node -> unit axis, as `RepairResult.affines` (saved in a merged checkpoint's metadata).
        state: the saved state_dict; `repair_<node>.weight` (units,) gives each correction's size.
    """
    identity = {}
    for node, dim in affines.items():
        units = state[f"repair_{node}.weight"].numel()
        identity[node] = RepairAffine(torch.ones(units), torch.zeros(units), dim)
    return with_affines(model, identity)


def _levels(graph: fx.Graph, names: set[str]) -> dict[str, int]:
    """Dependency level of each site node: 0 if no other site is upstream, else 1 + the deepest upstream site's."""
    depth: dict[fx.Node, int] = {}
    level: dict[str, int] = {}
    for n in graph.nodes:
        d = max((depth[i] for i in n.all_input_nodes), default=0)
        if n.name in names:
            level[n.name] = d
            d += 1
        depth[n] = d
    return level


def _exact(interp, sites, goal_mean, goal_std, data, max_examples):
    """Exact REPAIR (Sec. 4.2): one pass per dependency level, earlier corrections in place.

    Returns (levels, measured means, measured stds, scales, shifts), lists aligned with `sites`.
    """
    p = next(interp.parameters())
    identity = [(torch.ones_like(m, dtype=p.dtype), torch.zeros_like(m, dtype=p.dtype)) for m in goal_mean]
    affines = {s.node: RepairAffine(w, b, s.dim) for s, (w, b) in zip(sites, identity)}
    gm = with_affines(interp, affines)
    levels = _levels(gm.graph, set(affines))
    n = len(sites)
    means, stds, scales, shifts = [None] * n, [None] * n, [None] * n, [None] * n
    for k in range(max(levels.values(), default=-1) + 1):
        idx = [i for i, s in enumerate(sites) if levels[s.node] == k]
        moments = site_moments(gm, [sites[i] for i in idx], data, max_examples, corrected=False)
        for i, m in zip(idx, moments):
            means[i], stds[i] = m.mean_x, m.var_x.sqrt()
            scales[i], shifts[i] = _affine(means[i], stds[i], goal_mean[i], goal_std[i], torch.finfo(p.dtype).eps)
            with torch.no_grad():
                affines[sites[i].node].weight.copy_(scales[i])
                affines[sites[i].node].bias.copy_(shifts[i])
    return [levels[s.node] for s in sites], means, stds, scales, shifts


@dataclass
class SiteRepair:
    """The correction of one site: goal, statistics before it, the affine map, whether it was folded."""

    site: Site
    level: int  # exact: index of the pass that measured it; closed: 0
    goal_mean: torch.Tensor  # (units,) float64
    goal_std: torch.Tensor
    before_mean: torch.Tensor  # measured with earlier corrections in place (exact) or predicted by eq. 5 (closed)
    before_std: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    ndim: int  # number of axes of the site's activation tensor
    fused: bool = False  # folded into the producing layer (else a RepairAffine module)


def _closed(ends: EndpointStats, alpha: float, eps: float):
    """Closed-form REPAIR (Sec. 4.1): corrections from the eq. (5) prediction, no pass over the interpolated net."""
    goal_mean, goal_std = ends.goal(alpha)
    means, stds = ends.predicted(alpha)
    scales, shifts = [], []
    for row in zip(means, stds, goal_mean, goal_std):
        scale, shift = _affine(*row, eps)
        scales.append(scale)
        shifts.append(shift)
    return [0] * len(means), means, stds, scales, shifts


# --- fusion --------------------------------------------------------------------------------------------


def _unit_axis(mod: nn.Module, dim: int, ndim: int) -> int | None:
    """Axis of `mod.weight` indexed by its output units, or None if `mod` is not a per-unit affine output."""
    if isinstance(mod, nn.Linear) or (isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed):
        return 0
    if isinstance(mod, _NORMS):
        return 0
    if isinstance(mod, nn.LayerNorm):
        axis = dim - (ndim - len(mod.normalized_shape))
        return axis if axis >= 0 else None
    return None


def _along(v: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """(units,) vector shaped to broadcast along `axis` of an ndim tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.view(shape)


def _folded(sd: dict, name: str, mod: nn.Module, site: Site, ndim: int, scale, shift) -> dict | None:
    """New `weight` and `bias` of module `name` with y -> scale * y + shift folded into its output, or None."""
    axis = _unit_axis(mod, site.dim, ndim)
    w, b = sd.get(f"{name}.weight"), sd.get(f"{name}.bias")
    if axis is None or w is None or b is None:
        return None
    s, t = scale.to(w), shift.to(w)
    new_b = b * _along(s, axis, b.ndim) + _along(t, axis, b.ndim)
    return {f"{name}.weight": w * _along(s, axis, w.ndim), f"{name}.bias": new_b}


def fuse_corrections(model: nn.Module, corrections: list[SiteRepair], fuse: bool = True) -> tuple[nn.Module, list[bool]]:
    """`model` with y -> scale * y + shift after each correction's site, folded into the producing module if possible.

    Args:
        model: the network (not modified).
        corrections: SiteRepair rows (only `site`, `scale`, `shift` (units,), `ndim` are read).
        fuse: False keeps every correction as a RepairAffine module.
    Returns:
        (new model, per-correction True if folded). The new model is an instance of model's class when
        every correction folded, else a `Repaired<Class>` GraphModule holding the rest as `repair_<node>`.
    """
    graph = symbolic_trace(model).graph
    nodes = {n.name: n for n in graph.nodes}
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    p = next(model.parameters())
    sd, left, folded = dict(model.state_dict()), {}, []
    for c in corrections:
        node, new = nodes[c.site.node], None
        if fuse and node.op == "call_module" and calls[node.target] == 1:
            new = _folded(sd, node.target, model.get_submodule(node.target), c.site, c.ndim, c.scale, c.shift)
        sd.update(new or {})
        folded.append(new is not None)
        if new is None:
            left[c.site.node] = RepairAffine(c.scale.to(p), c.shift.to(p), c.site.dim)
    out = copy.deepcopy(model)
    out.load_state_dict(sd)
    return (with_affines(out, left) if left else out), folded


# --- public API ----------------------------------------------------------------------------------------


@dataclass
class RepairResult:
    """A REPAIRed interpolated network and what was done to it."""

    model: nn.Module  # original class if `fused`, else a Repaired<Class> GraphModule with RepairAffine modules
    method: str
    alpha: float
    passes: int  # forward passes over the calibration data through the interpolated net (closed: 0)
    stats: list[SiteRepair]

    @property
    def fused(self) -> bool:
        return all(s.fused for s in self.stats)

    @property
    def unfused(self) -> list[str]:
        """fx nodes whose correction stays a RepairAffine module (`repair_<node>`)."""
        return [s.site.node for s in self.stats if not s.fused]

    @property
    def affines(self) -> dict[str, int]:
        """fx node -> unit axis of each unfused correction: what `restore_affines` needs to reload the model."""
        return {s.site.node: s.site.dim for s in self.stats if not s.fused}

    def summary(self) -> list[dict]:
        """One JSON-ready row per site: node, kind, level, fused, mean std ratio before (actual / goal)."""
        return [
            {"node": s.site.node, "kind": s.site.kind, "level": s.level, "fused": s.fused,
             "std_ratio_before": float((s.before_std / s.goal_std.clamp_min(1e-300)).mean())}
            for s in self.stats
        ]  # fmt: skip


def repair(
    model_a: nn.Module,
    model_b: nn.Module,
    alpha: float,
    data: Iterable,
    *,
    spec: PermutationSpec | None = None,
    method: str = "exact",
    max_examples: int | None = 5000,
    sites: Iterable[str] | list[Site] = KINDS,
    fuse: bool = True,
    endpoints: EndpointStats | None = None,
) -> RepairResult:
    """REPAIR the network interpolated between A and B at `alpha` (Jordan et al. 2022, Sec. 4, eqs. 3-5).

    Args:
        model_a, model_b: endpoints of one architecture, B already aligned to A; not modified.
        alpha: interpolation weight in [0, 1] (0 is A).
        data: re-iterable calibration batches, x or (x, y, ...) with x e.g. (N, 3, 32, 32); the first
            `max_examples` examples are used (paper: ~5,000 training examples).
        spec: A's PermutationSpec (traced on the first batch when None).
        method: "exact" (forward passes, one per dependency level) or "closed" (eq. 5, no pass).
        sites: site kinds to correct, ("layer", "block") by default, or an explicit list of Sites.
        fuse: fold corrections into the preceding layer where possible (False: keep all as RepairAffine).
        endpoints: precomputed `endpoint_stats` (reuse across alphas); computed from `data` when None.
    Returns:
        RepairResult with `.model` (corrected interpolated net), `.stats` (per site), `.passes`, `.fused`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown REPAIR method {method!r}; valid methods: {list(METHODS)}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    ends = endpoints or endpoint_stats(model_a, model_b, data, spec, sites, max_examples)
    site_list = ends.sites
    goal_mean, goal_std = ends.goal(alpha)
    interp = interpolate_model(model_a, model_b, alpha)
    if method == "exact":
        fixed = correct(interp, site_list, goal_mean, goal_std, data, max_examples=max_examples, fuse=fuse, ndims=ends.ndims)
        return dataclasses.replace(fixed, alpha=float(alpha))
    eps = torch.finfo(next(interp.parameters()).dtype).eps
    levels, before_mean, before_std, scales, shifts = _closed(ends, alpha, eps)
    rows = zip(site_list, levels, goal_mean, goal_std, before_mean, before_std, scales, shifts, ends.ndims)
    return _fused(interp, [SiteRepair(*row) for row in rows], fuse, "closed", float(alpha), 0)


def correct(
    model: nn.Module,
    sites: list[Site],
    goal_mean: list[torch.Tensor],
    goal_std: list[torch.Tensor],
    data: Iterable,
    *,
    method: str = "exact",
    max_examples: int | None = 5000,
    fuse: bool = True,
    ndims: list[int] | None = None,
) -> RepairResult:
    """REPAIR `model` so that every site's units have the given goal statistics (Jordan et al. 2022, Sec. 4.2).

    What `repair` does to an interpolated net, for any goals: e.g. the weighted mean of N endpoints'
    means and stds (eqs. 3-4 generalised, `onebasin.merge_many`).

    Args:
        model: the network to correct (not modified).
        sites: Sites with fx node names (`select_sites`), in forward order.
        goal_mean, goal_std: one (units,) float64 tensor per site.
        data: re-iterable calibration batches; the first `max_examples` examples are used.
        method: "exact" (one forward pass per dependency level, earlier corrections in place).
        fuse: fold corrections into the preceding layer where possible.
        ndims: number of axes of each site's activation tensor (read from one batch when None).
    Returns:
        RepairResult (alpha is nan: no interpolation is involved).
    """
    if method != "exact":
        raise ValueError(f"correct: unknown method {method!r}; valid methods: ['exact']")
    sites = list(sites)
    ndims = ndims if ndims is not None else _ndims(model, sites, data)
    levels, before_mean, before_std, scales, shifts = _exact(model, sites, goal_mean, goal_std, data, max_examples)
    rows = zip(sites, levels, goal_mean, goal_std, before_mean, before_std, scales, shifts, ndims)
    return _fused(model, [SiteRepair(*row) for row in rows], fuse, method, float("nan"), max(levels, default=-1) + 1)


def _fused(model: nn.Module, stats: list[SiteRepair], fuse: bool, method: str, alpha: float, passes: int) -> RepairResult:
    """RepairResult of `model` with the corrections `stats` folded in where possible."""
    fixed, folded = fuse_corrections(model, stats, fuse)
    stats = [dataclasses.replace(s, fused=f) for s, f in zip(stats, folded)]
    return RepairResult(fixed, method, alpha, passes, stats)


def _ndims(model: nn.Module, sites: list[Site], data: Iterable) -> list[int]:
    """Number of axes of the activation at each site, from one batch of two examples."""
    tap = _tap(model, [s.node for s in sites])
    with _eval_mode(tap):
        return [t.ndim for t in tap(next(_inputs(data, model, 2)))]


def repair_errors(result: RepairResult, data: Iterable, max_examples: int | None = 5000) -> list[dict]:
    """How far `result.model`'s statistics are from the goals on `data` (one pass), per site.

    Returns rows {node, kind, mean_err, std_err, std_err_mean}: the largest |mean - goal_mean| and
    |std - goal_std| over the site's units, each divided by that unit's goal std (relative to the unit's
    scale), and the mean over units of the latter.
    """
    sites = [s.site for s in result.stats]
    means, stds = site_stats(result.model, sites, data, max_examples)
    rows = []
    for s, mean, std in zip(result.stats, means, stds):
        unit = s.goal_std.clamp_min(1e-300)
        rows.append({"node": s.site.node, "kind": s.site.kind,
                     "mean_err": float(((mean - s.goal_mean).abs() / unit).max()),
                     "std_err": float(((std - s.goal_std).abs() / unit).max()),
                     "std_err_mean": float(((std - s.goal_std).abs() / unit).mean())})  # fmt: skip
    return rows


def reset_bn(model: nn.Module, data: Iterable, max_examples: int | None = 5000) -> nn.Module:
    """A copy of `model` whose BatchNorm running statistics are re-estimated on `data` (Jordan et al. 2022, Sec. 5.2).

    Every BatchNorm's statistics are reset and re-accumulated as a cumulative average (momentum=None)
    over the first `max_examples` examples, with the BatchNorms in train mode and everything else
    (dropout...) in eval mode, without gradients; each BatchNorm sees inputs normalised by the batch
    statistics of earlier ones, so use large batches. Batches of one example are skipped. For a net with
    BatchNorm after every conv this is the paper's equivalent of REPAIR of the conv outputs. Raises OnebasinError if there is
    no BatchNorm layer. `model` is not modified.
    """
    new = copy.deepcopy(model)
    bns = [m for m in new.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise OnebasinError(f"reset_bn: {type(model).__name__} has no BatchNorm layer (nothing to reset)")
    new.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        for x in _inputs(data, new, max_examples):
            if x.shape[0] > 1:
                new(x)
    for bn, old in zip(bns, (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))):
        bn.momentum = old.momentum
    return new.train(model.training)
