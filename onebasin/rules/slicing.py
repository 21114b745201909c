"""Rules for ops that cut a tensor or put pieces together: select, slice, split, chunk, unbind, cat, stack,
writes into a slice (copy, slice/select scatter) and padding (symmetries note, Sec. 5). A concatenation
along the permuted axis is the direct sum of its parts; a split cuts a variable into parts."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from ..labels import Axis, Heads, Multi, Parts, Pieces, Seg, WeightView, label_dims, remap
from ..ops import args_of
from ._common import (constant_joins, cut_segs, heads_to_parts, moved, norm_dim, seg_end, unify_labels,
                      varying_dims, weight_joins)

if TYPE_CHECKING:  # annotations only: the tracer imports the rules
    from ..tracer import Tracer

aten = torch.ops.aten


def select(t: Tracer, node: fx.Node):
    x, dim, index = node.args[0], node.args[1], node.args[2]
    ndim = len(t.shape(x))
    dim = norm_dim(dim, ndim)
    lab = t.labels.get(x)
    mapping = {d: (d if d < dim else d - 1) if d != dim else None for d in range(ndim)}
    if isinstance(lab, Heads) and lab.head_dim == dim:
        lab = heads_to_parts(t, node, lab)
    if isinstance(lab, Parts) and lab.dim == dim:
        part = lab.parts[index]
        return None if part is None else remap(part, {d: mapping[d] for d in label_dims(part)})
    if lab is not None and not isinstance(lab, WeightView) and dim in label_dims(lab):
        t.fix_label(lab, node, "one unit is picked out")
        return None
    return moved(t, node, lab, mapping)


def _ranges_label(t: Tracer, node: fx.Node, lab, dim: int, ranges: list[tuple[int, int]], keep_dim: bool = True):
    """Labels of the slices [start, end) of axis `dim` (a split, chunk or slice)."""
    if lab is None:
        return [None] * len(ranges)
    if isinstance(lab, WeightView):
        axes = tuple(None if d == dim else a for d, a in enumerate(lab.axes))
        return [WeightView(lab.key, axes)] * len(ranges)
    if dim not in label_dims(lab):
        return [lab] * len(ranges)
    if isinstance(lab, Heads) and lab.head_dim == dim and all(e - s == 1 for s, e in ranges):
        lab = heads_to_parts(t, node, lab)
    if isinstance(lab, Parts) and lab.dim == dim and all(e - s == 1 for s, e in ranges):
        return [lab.parts[s] for s, _ in ranges]
    if not isinstance(lab, Axis):
        if isinstance(lab, Heads) and dim == lab.inner_dim:  # e.g. rotary halves: the inside stays in place
            t.vars.fix_inner(lab.var)
            t.notes.append(f"{node.name}: a slice inside attention heads keeps their inside in place")
            heads = Axis(lab.head_dim, (Seg(t.vars.root(lab.var).heads, lab.heads),))
            return [heads] * len(ranges)
        raise t.refuse(node, "a slice across attention heads or parts")
    segs = cut_segs(t, node, lab.segs, sorted({b for r in ranges for b in r}))
    out = []
    for s, e in ranges:
        inside = [Seg(g.var, _shift(g.layout, -s)) for g in segs if s <= g.layout.start and seg_end(g) <= e]
        out.append(Axis(dim, tuple(inside)) if inside else None)
    return out


def _shift(layout, by: int):
    return replace(layout, start=layout.start + by)


def slice_(t: Tracer, node: fx.Node):
    a = args_of(node)
    x = a["self"]
    size = t.shape(x)
    dim = norm_dim(a["dim"], len(size))
    start, end, step = a["start"] or 0, a["end"], a["step"] or 1
    start = start + size[dim] if start < 0 else start
    end = size[dim] if end is None or end > size[dim] else (end + size[dim] if end < 0 else end)
    lab = t.labels.get(x)
    if (start, end, step) == (0, size[dim], 1):
        return lab
    if step != 1 and lab is not None and not isinstance(lab, WeightView) and dim in label_dims(lab):
        t.fix_label(lab, node, "a strided slice of the permuted axis")
        return None
    return _ranges_label(t, node, lab, dim, [(start, end)])[0]


def _split(t: Tracer, node: fx.Node, sizes: list[int], dim: int, squeeze_dim: bool = False):
    x = node.args[0]
    ndim = len(t.shape(x))
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    labs = _ranges_label(t, node, t.labels.get(x), dim, list(zip(bounds, bounds[1:])))
    if squeeze_dim:
        mapping = {d: (d if d < dim else d - 1) if d != dim else None for d in range(ndim)}
        labs = [None if lab is None else _moved_squeezed(lab, mapping) for lab in labs]
    return Multi(tuple(labs))


def _moved_squeezed(lab, mapping):
    if isinstance(lab, WeightView):
        return WeightView(lab.key, tuple(lab.axes[d] for d in range(len(lab.axes)) if mapping[d] is not None))
    return remap(lab, mapping)


def split(t: Tracer, node: fx.Node):
    x = node.args[0]
    size = t.shape(x)
    dim = norm_dim(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), len(size))
    step = node.args[1]
    if isinstance(step, int):
        sizes = [min(step, size[dim] - i) for i in range(0, size[dim], step)]
    else:
        sizes = list(step)
    return _split(t, node, sizes, dim)


def chunk(t: Tracer, node: fx.Node):
    x = node.args[0]
    size = t.shape(x)
    dim = norm_dim(node.args[2] if len(node.args) > 2 else 0, len(size))
    step = -(-size[dim] // node.args[1])
    return _split(t, node, [min(step, size[dim] - i) for i in range(0, size[dim], step)], dim)


def unbind(t: Tracer, node: fx.Node):
    x = node.args[0]
    size = t.shape(x)
    dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, len(size))
    return _split(t, node, [1] * size[dim], dim, squeeze_dim=True)


def cat(t: Tracer, node: fx.Node):
    tensors = list(node.args[0])
    out_shape = t.shape(node)
    dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, len(out_shape))
    tensors = [x for x in tensors if t.shape(x) is not None and t.shape(x) != (0,)]
    return _join_along(t, node, tensors, dim, out_shape)


def stack(t: Tracer, node: fx.Node):
    tensors = list(node.args[0])
    out_shape = t.shape(node)
    dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, len(out_shape))
    labs = []
    for x in tensors:
        lab = t.labels.get(x)
        ndim = len(t.shape(x))
        labs.append(None if lab is None else moved(t, node, lab, {d: d + (d >= dim) for d in range(ndim)}))
    acts = [lab for lab in labs if lab is not None and not isinstance(lab, WeightView)]
    if not acts:
        return None
    ref = acts[0]
    for lab in acts[1:]:
        unify_labels(t, node, ref, lab)
    for x, lab in zip(tensors, labs):
        shape = list(t.shape(x))
        shape.insert(dim, 1)
        if isinstance(lab, WeightView):
            weight_joins(t, node, ref, out_shape, x, lab, tuple(shape))
        elif lab is None and {d + (d >= dim) for d in varying_dims(t, x)} & label_dims(ref):
            t.fix_label(ref, node, f"{x.name} varies along a permuted axis: kept in place")
            return None
    return ref


def _join_along(t: Tracer, node: fx.Node, tensors, dim: int, out_shape):
    """cat: along a permuted axis the segments of each input are placed at its offset; along another axis
    every input shares the permutation (class token + patches: the token is a member)."""
    labs = [t.labels.get(x) for x in tensors]
    acts = [(x, lab) for x, lab in zip(tensors, labs) if t.label(x) is not None]
    if not acts:
        t.pieces[node] = _weight_pieces(t, tensors, labs, dim)
        return None
    along = [dim in label_dims(lab) for _, lab in acts]
    if all(along):
        if not all(isinstance(lab, Axis) for _, lab in acts):
            raise t.refuse(node, "a concatenation of attention heads or parts")
        segs, offset = [], 0
        for x, lab in zip(tensors, labs):
            if lab is not None and not isinstance(lab, WeightView):
                segs += [Seg(s.var, _shift(s.layout, offset)) for s in lab.segs]
            offset += t.shape(x)[dim]
        return Axis(dim, tuple(segs))
    if any(along):
        raise t.refuse(node, "a concatenation mixing tensors permuted along different axes")
    ref = acts[0][1]
    for _, lab in acts[1:]:
        unify_labels(t, node, ref, lab)
    for x, lab in zip(tensors, labs):
        if isinstance(lab, WeightView):
            weight_joins(t, node, ref, out_shape, x, lab)
        elif lab is None:
            constant_joins(t, node, ref, out_shape, x)
    return ref


def copy(t: Tracer, node: fx.Node):
    """copy(self, src): src's values broadcast to self's shape (a functionalised `x[...] = src`)."""
    src = node.args[1]
    lab = t.labels.get(src) if isinstance(src, fx.Node) else None
    if lab is None or isinstance(lab, WeightView):
        return None if lab is None or t.shape(src) != t.shape(node) else lab
    shift = len(t.shape(node)) - len(t.shape(src))
    for d in label_dims(lab):
        if t.shape(src)[d] != t.shape(node)[d + shift]:
            raise t.refuse(node, "a copy that broadcasts along the permuted axis")
    return remap(lab, {d: d + shift for d in label_dims(lab)})


def scatter(t: Tracer, node: fx.Node):
    """slice_scatter/select_scatter(base, src, dim, ...): src written into a slice of base (an in-place write,
    functionalised). Along another axis both share the permutation; along the permuted axis they stay."""
    a = args_of(node)
    base, src = a["self"], a["src"]
    ndim = len(t.shape(base))
    dim = norm_dim(a["dim"], ndim)
    lb, ls = t.label(base), t.label(src)
    if ls is not None and node.target == aten.select_scatter.default:
        ls = remap(ls, {d: d + (d >= dim) for d in label_dims(ls)})
    if lb is None and ls is None:
        return None
    if dim in label_dims(lb) | label_dims(ls):
        for lab in (lb, ls):
            t.fix_label(lab, node, "a write into a slice of the permuted axis keeps its units in place")
        return None
    ref = lb if lb is not None else ls
    if lb is not None and ls is not None:
        unify_labels(t, node, lb, ls)
    other = src if lb is not None else base
    if t.weight(other) is not None:
        raise t.refuse(node, "a weight written into a slice of a permuted tensor")
    if t.labels.get(other) is None:  # a constant: where it varies along a permuted axis, that axis stays
        varies = varying_dims(t, other)
        if other is src and node.target == aten.select_scatter.default:
            varies = {d + (d >= dim) for d in varies}
        if varies & label_dims(ref):
            t.fix_label(ref, node, f"{other.name} varies along a permuted axis: kept in place")
            return None
    return ref


def _weight_pieces(t: Tracer, tensors, labs, dim: int):
    """A concatenation of weights and constants (no activation): Pieces, so that a layer using it as its bias
    can permute each weight (BEiT's cat(q_bias, zeros, v_bias)); None when no weight is in it."""
    if not any(isinstance(lab, WeightView) for lab in labs):
        return None
    items, offset = [], 0
    for x, lab in zip(tensors, labs):
        items.append((offset, t.shape(x)[dim], lab if isinstance(lab, WeightView) else x))
        offset += t.shape(x)[dim]
    return Pieces(dim, tuple(items))


def pad(t: Tracer, node: fx.Node):
    x, pads = node.args[0], node.args[1]
    lab = t.labels.get(x)
    if lab is None or isinstance(lab, WeightView):
        return None if isinstance(lab, WeightView) else lab
    ndim = len(t.shape(x))
    left = {ndim - 1 - i: pads[2 * i] for i in range(len(pads) // 2)}
    right = {ndim - 1 - i: pads[2 * i + 1] for i in range(len(pads) // 2)}
    for d in label_dims(lab):
        if left.get(d, 0) < 0 or right.get(d, 0) < 0:
            raise t.refuse(node, "a crop of the permuted axis")
        if left.get(d, 0) or right.get(d, 0):
            if not isinstance(lab, Axis):
                raise t.refuse(node, "padding inside attention heads")
            return Axis(lab.dim, tuple(Seg(s.var, _shift(s.layout, left.get(d, 0))) for s in lab.segs))
    return lab


RULES = {
    aten.select.int: select,
    aten.slice.Tensor: slice_,
    aten.split.Tensor: split,
    aten.split_with_sizes.default: split,
    aten.chunk.default: chunk,
    aten.unbind.int: unbind,
    aten.cat.default: cat,
    aten.stack.default: stack,
    aten.copy.default: copy,
    aten.slice_scatter.default: scatter,
    aten.select_scatter.default: scatter,
    aten.constant_pad_nd.default: pad,
    aten.pad.default: pad,
}
