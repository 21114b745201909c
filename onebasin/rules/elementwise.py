"""Rules for elementwise ops and reductions.

Unary ops commute with any permutation. A binary op (add, mul, where, comparisons...) joins its
permuted operands into one permutation (a residual stream: every tensor added into it); a weight that
meets a permuted tensor becomes a member (layer scale, position embedding, bias); an unpermuted computed
tensor that varies along a permuted axis keeps that axis in place (rotary embeddings inside heads).
A reduction over a permuted axis (mean, sum, norm, max) is invariant; over other axes it moves the label.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from ..labels import Axis, Heads, Multi, Seg, WeightView, label_dims, remap
from ..ops import JOINS, REDUCTIONS, UNARY
from ._common import constant_joins, input_label, norm_dim, unify_labels, weight_joins

if TYPE_CHECKING:  # annotations only: the tracer imports the rules
    from ..tracer import Tracer

aten = torch.ops.aten


def unary(t: Tracer, node: fx.Node):
    """Same units in, same units out (activations, casts, clones, scalar arithmetic, eval-mode dropout)."""
    first = node.args[0] if node.args else None
    lab = t.labels.get(first) if isinstance(first, fx.Node) else None
    others = [a for a in node.all_input_nodes if a is not first]
    if any(t.label(a) is not None or t.weight(a) is not None for a in others):
        return join(t, node)
    if isinstance(lab, WeightView):
        return lab if t.shape(node) == t.shape(first) else None
    return lab


def cast_like(t: Tracer, node: fx.Node):
    """type_as(x, other): x's values in other's dtype; `other` lends only its dtype."""
    return t.labels.get(node.args[0])


def _operands(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes]


def join(t: Tracer, node: fx.Node):
    """Elementwise op over broadcast operands: permuted operands share one permutation."""
    out_shape = t.shape(node)
    if out_shape is None:
        return None
    ops = [a for a in _operands(node) if t.shape(a) is not None]
    labelled = [(a, _aligned(t.label(a), len(out_shape) - len(t.shape(a)))) for a in ops if t.label(a) is not None]
    if not labelled:
        views = [a for a in ops if t.weight(a) is not None]
        rest = [a for a in ops if t.weight(a) is None and (t.shape(a) or ()) != () and _numel(t.shape(a)) > 1]
        if len(views) == 1 and not rest and t.shape(views[0]) == out_shape:
            return t.weight(views[0])  # arithmetic on one weight with scalars: still that weight's entries
        return None
    ref = labelled[0][1]
    for _, lab in labelled[1:]:
        unify_labels(t, node, ref, lab)
    for a in ops:
        if t.label(a) is not None:
            continue
        if t.weight(a) is not None:
            weight_joins(t, node, ref, out_shape, a, t.weight(a))
        else:
            constant_joins(t, node, ref, out_shape, a)
    if len(labelled) > 1 and node.target in (aten.add.Tensor, aten.sub.Tensor) and isinstance(ref, Axis):
        if len(ref.segs) == 1 and ref.segs[0].layout.is_plain() and ref.segs[0].layout.block_size() == 1:
            t.add_site(ref.segs[0].var, node, ref.dim, "block")
    return ref


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _aligned(lab, shift: int):
    """A label of a broadcast operand, in the output's axes (operand axis d is output axis d + shift)."""
    if shift == 0 or lab is None:
        return lab
    return remap(lab, {d: d + shift for d in label_dims(lab)})


def softmax(t: Tracer, node: fx.Node):
    """softmax along any axis commutes with permuting any axis (along the units: same permutation)."""
    return t.label(node.args[0])


def reduction(t: Tracer, node: fx.Node):
    """sum/mean/amax/norm/var over `dim`: invariant over the permuted axis; other axes renumbered."""
    x = node.args[0]
    lab = t.labels.get(x)
    if lab is None:
        return None
    if isinstance(lab, WeightView):
        return None
    ndim = len(t.shape(x))
    dims = _reduced_dims(node, ndim)
    keep = _keepdim(node)
    if isinstance(lab, Axis):
        if lab.dim in dims:
            return None
        return _renumber(lab, dims, keep)
    if isinstance(lab, Heads):
        if lab.head_dim in dims:
            t.fix_label(lab, node, "a reduction over attention heads")
            return None
        if lab.inner_dim in dims:
            heads = t.vars.root(lab.var).heads
            return _renumber(Axis(lab.head_dim, (Seg(heads, lab.heads),)), dims, keep)
        return _renumber(lab, dims, keep)
    raise t.refuse(node, "a reduction of a tensor split into parts")


def _reduced_dims(node: fx.Node, ndim: int) -> set[int]:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if node.target in (aten.linalg_vector_norm.default,):
        dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if dims is None or dims == []:
        return set(range(ndim))
    dims = [dims] if isinstance(dims, int) else dims
    return {norm_dim(d, ndim) for d in dims}


def _keepdim(node: fx.Node) -> bool:
    for i, a in enumerate(node.target._schema.arguments):
        if a.name == "keepdim":
            return bool(node.args[i]) if i < len(node.args) else bool(node.kwargs.get("keepdim", a.default_value if a.has_default_value() else False))
    return False


def _renumber(lab, dims: set[int], keep: bool):
    if keep:
        return lab
    return remap(lab, {d: d - sum(r < d for r in dims) for d in label_dims(lab)})


def multi_reduction(t: Tracer, node: fx.Node):
    """max.dim / min.dim / var_mean: (values, indices or second stat); indices over units are not invariant."""
    x = t.label(node.args[0])
    lab = reduction(t, node)
    dims = _reduced_dims(node, len(t.shape(node.args[0])))
    indices_used = any(u.args[1] == 1 and u.users for u in node.users)
    if x is not None and node.target in (aten.max.dim, aten.min.dim) and dims & label_dims(x) and indices_used:
        t.fix_label(x, node, "the index of the largest unit depends on the order of the units")
    return Multi((lab, lab))


def order_dependent(t: Tracer, node: fx.Node):
    """cumsum/sort/topk/argmax along an axis: along a permuted axis the units must stay in place."""
    if (got := input_label(t, node)) is None:
        return None
    lab, ndim = got
    dim = norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1) or 0, ndim)
    if dim in label_dims(lab):
        t.fix_label(lab, node, f"{node.target} depends on the order of the units")
        return None
    if node.target in (aten.argmax.default, aten.argmin.default):
        return None
    return lab


def constant_like(t: Tracer, node: fx.Node):
    """zeros_like/ones_like/full_like/empty_like: values that do not depend on the input's units."""
    return None


RULES = {
    **{op: unary for op in UNARY},
    **{op: join for op in JOINS},
    **{op: reduction for op in REDUCTIONS},
    aten.max.dim: multi_reduction,
    aten.min.dim: multi_reduction,
    aten.var_mean.correction: multi_reduction,
    aten._softmax.default: softmax,
    aten.softmax.int: softmax,
    aten._log_softmax.default: softmax,
    aten.log_softmax.int: softmax,
    aten.type_as.default: cast_like,
    aten.cumsum.default: order_dependent,
    aten.cumprod.default: order_dependent,
    aten.sort.default: order_dependent,
    aten.topk.default: order_dependent,
    aten.argmax.default: order_dependent,
    aten.argmin.default: order_dependent,
    aten.zeros_like.default: constant_like,
    aten.ones_like.default: constant_like,
    aten.full_like.default: constant_like,
    aten.empty_like.default: constant_like,
    aten.new_zeros.default: constant_like,
    aten.new_ones.default: constant_like,
    aten.new_full.default: constant_like,
    aten.new_empty.default: constant_like,
}
