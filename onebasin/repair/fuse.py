"""Folding REPAIR's corrections into the network: into the producing layer's weight and bias or the
following norm's affine parameters where possible, else as `RepairAffine` modules in a GraphModule, and
reloading such a model from a saved state_dict."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from .._copy import module_with
from ..graph import Captured, capture
from ..ops import LAYERS, NORMS, args_of, produced_by
from ..spec import Site
from .affine import RepairAffine


def _param_key(graph: Captured, arg) -> str | None:
    """The state_dict key of a weight placeholder used by exactly one op and tied to no other key."""
    if not isinstance(arg, fx.Node) or arg.op != "placeholder" or arg.name not in graph.keys or len(arg.users) != 1:
        return None
    key = graph.keys[arg.name]
    return key if len(graph.aliases.get(key, (key,))) == 1 else None


def _fold_targets(graph: Captured, site: Site, ndim: int) -> tuple[str, str, int, int] | None:
    """(weight key, bias key, unit axis of the weight, unit axis of the bias) a site's correction folds
    into, or None: the producing op of `ops.LAYERS` (bias (units,)) or `ops.NORMS`, whose weight and
    bias share a shape (e.g. (C, H, W) for a LayerNorm over (C, H, W), whose unit axis is then 0 in both)."""
    node = produced_by(graph.node(site.node))
    if node.op != "call_function" or not (node.target in LAYERS or node.target in NORMS):
        return None
    a = args_of(node)
    if node.target in LAYERS:
        row = LAYERS[node.target]
        w, b, axis, bias_axis = row.weight, row.bias, row.out_axis, 0
    else:
        row = NORMS[node.target]
        w, b, axis = row.weight, row.bias, row.param_axis(a, site.dim, ndim)
        bias_axis = axis
    if axis is None or w is None or b is None:
        return None
    wk, bk = _param_key(graph, a.get(w)), _param_key(graph, a.get(b))
    return (wk, bk, axis, bias_axis) if wk and bk else None


def _along(v: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """(units,) vector shaped to broadcast along `axis` of an ndim tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.view(shape)


def fuse_corrections(model: nn.Module, graph: Captured, state: dict, corrections: list, fuse: bool = True) -> tuple[nn.Module, list[bool]]:
    """A model computing `state` with y -> scale * y + shift after each correction's site, folded into the
    producing layer or norm where possible.

    Args:
        model: a module of the architecture (not modified; a copy receives the weights).
        graph: its captured graph; state: the weights (e.g. the interpolated state_dict).
        corrections: SiteRepair rows (only `site`, `scale`, `shift` (units,), `ndim` are read).
        fuse: False keeps every correction as a RepairAffine module.
    Returns:
        (new model, per-correction True if folded). The new model is an instance of model's class when
        every correction folded, else a `Repaired<Class>` GraphModule holding the rest as `repair_<node>`.
    """
    sd, left, folded = dict(state), {}, []
    for c in corrections:
        target = _fold_targets(graph, c.site, c.ndim) if fuse else None
        if target is not None:
            wk, bk, axis, bias_axis = target
            w, b = sd[wk], sd[bk]
            sd[wk] = w * _along(c.scale.to(w), axis, w.ndim)
            sd[bk] = b * _along(c.scale.to(b), bias_axis, b.ndim) + _along(c.shift.to(b), bias_axis, b.ndim)
        else:
            p = next(v for v in state.values() if v.is_floating_point())
            left[c.site.node] = RepairAffine(c.scale.to(p), c.shift.to(p), c.site.dim)
        folded.append(target is not None)
    if not left:
        return module_with(model, sd), folded
    return with_affines(graph, sd, left, type(model).__name__), folded


def with_affines(graph: Captured, state: dict, affines: dict[str, RepairAffine], class_name: str | None = None) -> fx.GraphModule:
    """A GraphModule computing the captured graph with weights `state` and `affines[node]` applied to the
    output of each node (registered as `repair_<node>`; every other parameter keeps its state_dict key).
    To reload a saved wrapper, use `restore_affines`."""
    gm = graph.module()
    gm.load_state_dict(state, strict=False)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, mod in affines.items():
        target = f"repair_{name}"
        gm.add_submodule(target, mod)
        with gm.graph.inserting_after(nodes[name]):
            new = gm.graph.call_module(target, (nodes[name],))
        nodes[name].replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
    gm.recompile()
    gm.__class__.__name__ = f"Repaired{class_name or type(graph.model).__name__}"
    return gm.eval()


def restore_affines(model: nn.Module, affines: dict[str, int], state: dict[str, torch.Tensor], example) -> fx.GraphModule:
    """`model` wrapped as `with_affines` with identity RepairAffines sized from `state`, ready for `load_state_dict(state)`.

    Args:
        model: a fresh instance of the merged model's original class.
        affines: node -> unit axis, as `RepairResult.affines` (saved in a merged checkpoint's metadata).
        state: the saved state_dict; `repair_<node>.weight` (units,) gives each correction's size.
        example: an input of the model (saved as the checkpoint's "example_input" shape/dtype).
    """
    graph = capture(model, example)
    identity = {}
    for node, dim in affines.items():
        w = state[f"repair_{node}.weight"]
        identity[node] = RepairAffine(torch.ones_like(w), torch.zeros_like(w), dim)
    base = {k: v for k, v in state.items() if not k.startswith("repair_")}
    return with_affines(graph, base, identity, type(model).__name__)
