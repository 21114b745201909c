"""Rules for normalisation layers: BatchNorm/InstanceNorm (per channel), LayerNorm and RMSNorm over the
permuted axis (equivariant: weight and bias follow it), GroupNorm (its groups become blocks). A norm
right after a Linear/Conv moves that layer's site to the norm's output (REPAIR corrects there); any other
norm's output is a site of kind "norm" (REPAIR of LayerNorm networks, folded into the norm's affine)."""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from .._spec import Site
from ..graph import module_path
from ..labels import Axis, Heads, Multi
from ..ops import NORMS, args_of

if TYPE_CHECKING:  # annotations only: the tracer imports the rules
    from ..tracer import Tracer


def _members(t: Tracer, node: fx.Node, lab, keys, axis: int) -> None:
    """Per-unit norm tensors (weight, bias, running stats) follow the input's units on `axis`."""
    for arg in keys:
        if arg is None:
            continue
        view = t.weight(arg)
        if view is None:
            if t.label(arg) is not None:
                raise t.refuse(node, "a norm whose affine parameters are permuted activations")
            t.fix_label(lab, node, "a norm with computed per-unit parameters")
            return
        for s in lab.segs:
            t.add_member(s.var, view.key, view.axes[axis], s.layout)


def norm_site(t: Tracer, src: fx.Node, out: fx.Node, lab) -> None:
    """A norm directly after a Linear/Conv (its only reader): read that layer's units after the norm.
    Any other norm output (a pre-norm transformer's LayerNorm of the residual stream) is a "norm" site."""
    moved = False
    if len(src.users) == 1:
        for i, (var, site) in enumerate(t.sites):
            if site.node == src.name and site.kind == "layer":
                t.sites[i] = (var, Site(out.name, site.dim, "layer", module_path(out) or site.module))
                moved = True
    if not moved and isinstance(lab, Axis) and len(lab.segs) == 1 and lab.segs[0].layout.is_plain() and lab.segs[0].layout.block_size() == 1:
        t.add_site(lab.segs[0].var, out, lab.dim, "norm")


def _channel_norm(t: Tracer, node: fx.Node, x, params) -> object:
    lab = t.label(x)
    if lab is None:
        return None
    if not isinstance(lab, Axis) or lab.dim != 1:
        raise t.refuse(node, "a per-channel norm on a tensor permuted along another axis")
    _members(t, node, lab, params, 0)
    return lab


def norm(t: Tracer, node: fx.Node):
    """Any op of `ops.NORMS`: per-channel norms (groups become blocks) or norms over the last axes; the
    affine parameters and running statistics follow the units. A multi-output op's site is placed by
    `getitem` (item 0 is the output)."""
    row, a = NORMS[node.target], args_of(node)
    x, params = a[row.input], tuple(a[k] for k in (row.weight, row.bias, *row.stats) if k is not None)
    if row.over == "last":
        lab = _last_dims_norm(t, node, x, len(a["normalized_shape"]), params)
    elif row.groups is not None:
        lab = _group_norm(t, node, x, a[row.groups], params)
    else:
        lab = _channel_norm(t, node, x, params)
    if row.multi:
        t.pending_norms[node] = x
        return Multi((lab, None, None))
    if isinstance(lab, Axis):
        norm_site(t, x, node, lab)
    return lab


def batch_norm(t: Tracer, node: fx.Node):
    """`norm`, unless the batch_norm standardises a weight (`_standardized_weight`)."""
    standardized = _standardized_weight(t, args_of(node))
    if standardized is not None:
        t.standardized[node] = standardized
        return None
    return norm(t, node)


def _standardized_weight(t: Tracer, a: dict):
    """(key, gain view or None) when the batch_norm standardises a weight W: F.batch_norm(W.reshape(1, C, -1),
    None, None, gain, training=True) (NFNet's ScaledStdConv2d, BiT's StdConv2d). Each output channel's row is
    normalised by its own statistics, which no permutation of its entries changes; its gain follows it."""
    x, gain = a["input"], a["weight"]
    if not a["training"] or any(a[k] is not None for k in ("running_mean", "running_var", "bias")):
        return None
    if not isinstance(x, fx.Node) or x.op != "call_function" or x.target not in (aten.reshape.default, aten.view.default):
        return None
    w = t.weight(x.args[0])
    if w is None or w.axes != tuple(range(len(t.shapes[w.key]))):
        return None
    shape = t.shapes[w.key]
    if t.shape(x) != (1, shape[0], math.prod(shape[1:])):
        return None
    g = t.weight(gain) if gain is not None else None
    if gain is not None and (g is None or len(g.axes) != 1 or g.axes[0] is None):
        return None
    return w.key, g


def _last_dims_norm(t: Tracer, node: fx.Node, x, normalized: int, params):
    """LayerNorm/RMSNorm over the last `normalized` axes."""
    lab = t.label(x)
    if lab is None:
        return None
    ndim = len(t.shape(x))
    first = ndim - normalized
    if isinstance(lab, Axis):
        if lab.dim >= first:
            _members(t, node, lab, params, lab.dim - first)
        return lab
    if isinstance(lab, Heads):  # e.g. a per-head query/key norm: shared parameters keep the inside fixed
        if lab.head_dim >= first:
            raise t.refuse(node, "a norm over attention heads")
        if lab.inner_dim >= first and any(p is not None for p in params):
            t.vars.fix_inner(lab.var)
            t.notes.append(f"{node.name}: a norm shared by all heads keeps the inside of heads in place")
        return lab
    raise t.refuse(node, "a norm over a tensor split into parts")


def _group_norm(t: Tracer, node: fx.Node, x, groups: int, params):
    lab = t.label(x)
    if lab is None:
        return None
    channels = t.shape(x)[1]
    if 1 < groups < channels:
        if not (isinstance(lab, Axis) and len(lab.segs) == 1 and lab.segs[0].layout.is_plain() and lab.segs[0].layout.block_size() == 1):
            raise t.refuse(node, f"GroupNorm with {groups} groups on concatenated channels")
        t.vars.structure(lab.segs[0].var, groups)  # groups permute as blocks, channels inside each
    return _channel_norm(t, node, x, params)


def getitem(t: Tracer, node: fx.Node):
    """Item i of a multi-output op (a norm's output moves the site of the layer before it)."""
    src, i = node.args
    lab = t.labels.get(src)
    if i == 0 and src in t.pending_norms and isinstance(lab, Multi) and isinstance(lab.items[0], Axis):
        norm_site(t, t.pending_norms[src], node, lab.items[0])
    return lab.items[i] if isinstance(lab, Multi) else None


aten = torch.ops.aten
RULES = {
    **{op: norm for op in NORMS},
    aten.batch_norm.default: batch_norm,
    operator.getitem: getitem,
}
