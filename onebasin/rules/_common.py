"""Shared pieces of the permutation rules: op arguments, broadcasting, unifying labels, and moving labels
through reshapes by tracking where each unit's positions go (see ../tracer.py for the label types)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch.fx as fx

from .._spec import Layout
from ..labels import Axis, Heads, Parts, Seg, StructureError, WeightView, label_dims, plain_axis, remap
from ..ops import ELEMENTWISE, args_of  # noqa: F401  (args_of: re-exported for the rules)

if TYPE_CHECKING:  # annotations only: the tracer imports the rules
    from ..tracer import Tracer


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """Node arguments (flattened from lists) in argument order."""
    out = []
    for a in (*node.args, *node.kwargs.values()):
        for x in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(x, fx.Node):
                out.append(x)
    return out


def norm_dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


# --- layouts -------------------------------------------------------------------------------------------


def fit_grid(offsets) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(shape, strides) with offsets[idx] = sum idx_i * strides_i in row-major order over shape, or None."""
    off = np.asarray(offsets, dtype=np.int64) - int(offsets[0])
    shape, strides = [], []
    while len(off) > 1:
        s = int(off[1])
        if s <= 0:
            return None
        r = 1
        while r < len(off) and off[r] == r * s:
            r += 1
        while len(off) % r:
            r -= 1
        rows = off.reshape(-1, r)
        if not (rows - rows[:, :1] == np.arange(r) * s).all() or (r == 1 and len(off) > 1):
            return None
        shape.insert(0, r)
        strides.insert(0, s)
        off = rows[:, 0]
    return tuple(shape), tuple(strides)


def simplify(shape, strides) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Drop size-1 dims and merge a dim into the next when they form one arithmetic run."""
    pairs = [(n, s) for n, s in zip(shape, strides) if n != 1]
    out: list[list[int]] = []
    for n, s in reversed(pairs):
        if out and out[0][1] * out[0][0] == s:
            out[0] = [out[0][0] * n, out[0][1]]
        else:
            out.insert(0, [n, s])
    return tuple(n for n, _ in out), tuple(s for _, s in out)


def fit_layout(pos: np.ndarray) -> Layout | None:
    """The Layout whose positions are `pos` (units, r): rows in unit order, same carry pattern per row."""
    pos = np.sort(pos, axis=1)
    carry = pos - pos[:, :1]
    if not (carry == carry[:1]).all():
        return None
    cfit = fit_grid(carry[0]) if carry.shape[1] > 1 else ((), ())
    ufit = fit_grid(pos[:, 0]) if pos.shape[0] > 1 else ((1,), (1,))
    if cfit is None or ufit is None:
        return None
    ushape, ustrides = simplify(*ufit)
    cshape, cstrides = simplify(*cfit)
    return Layout(int(pos[0, 0]), ushape or (1,), ustrides or (1,), cshape, cstrides)


def seg_positions(seg: Seg) -> np.ndarray:
    return seg.layout.positions().numpy()


# --- unification ---------------------------------------------------------------------------------------


def unify_labels(t: Tracer, node: fx.Node, a, b) -> None:
    """Two labels of tensors that must share every permutation (operands of an add, of a cat...)."""
    if {type(a), type(b)} == {Heads, Axis}:
        h, x = (a, b) if isinstance(a, Heads) else (b, a)
        if x.dim != h.head_dim or len(x.segs) != 1 or x.segs[0].layout != h.heads:
            raise t.refuse(node, "operands permuted differently (heads vs another axis)")
        t.vars.fix_inner(h.var)  # one operand keeps the inside of heads in place (e.g. rotary halves)
        t.unify(node, t.vars.root(h.var).heads, x.segs[0].var)
        return
    if type(a) is not type(b):
        raise t.refuse(node, f"operands permuted differently ({type(a).__name__} vs {type(b).__name__})")
    if isinstance(a, Axis):
        if a.dim != b.dim:
            raise t.refuse(node, f"operands permuted along different axes ({a.dim} vs {b.dim})")
        sa, sb = align_segs(t, node, a.segs, b.segs)
        for x, y in zip(sa, sb):
            t.unify(node, x.var, y.var)
    elif isinstance(a, Heads):
        if (a.head_dim, a.inner_dim, a.heads) != (b.head_dim, b.inner_dim, b.heads):
            raise t.refuse(node, "operands with different head layouts")
        t.unify(node, a.var, b.var)
    elif isinstance(a, Parts):
        if a.dim != b.dim or len(a.parts) != len(b.parts):
            raise t.refuse(node, "operands split into different parts")
        for x, y in zip(a.parts, b.parts):
            if (x is None) != (y is None):
                raise t.refuse(node, "a permuted part meets an unpermuted one")
            if x is not None:
                unify_labels(t, node, x, y)


def align_segs(t: Tracer, node, sa: tuple[Seg, ...], sb: tuple[Seg, ...]):
    """Segments of two labels of one axis, split so that they match one to one (a concatenation, or a
    zero-padded tensor, meets one variable: the variable is cut into parts at the segments' edges)."""
    if [s.layout for s in sa] == [s.layout for s in sb]:
        return sa, sb
    for one, many, swap in ((sa, sb, False), (sb, sa, True)):
        if len(one) == 1 and all(is_run(s.layout) for s in (*one, *many)):
            bounds = sorted({b for s in many for b in (s.layout.start, s.layout.start + s.layout.units)})
            by_start = {p.layout.start: p for p in cut_segs(t, node, one, bounds)}
            matched = tuple(by_start.get(s.layout.start) for s in many)
            if all(m is not None and m.layout == s.layout for m, s in zip(matched, many)):
                return (matched, many) if not swap else (many, matched)
    raise t.refuse(node, "operands whose units lie at different positions")


def is_run(layout: Layout) -> bool:
    """Whether a layout is one run of consecutive positions, one per unit."""
    return len(layout.unit_shape) == 1 and layout.unit_strides == (1,) and not layout.carry_shape


def seg_end(seg: Seg) -> int:
    return int(seg.layout.positions().max()) + 1


def cut_segs(t: Tracer, node, segs, bounds: list[int]) -> list[Seg]:
    """Segments split at the given positions: a variable whose units lie on both sides of a bound is split
    into parts of consecutive units there (a run, or units interleaved with another segment's by a
    channel shuffle); a bound through the positions of one unit is refused."""
    out = []
    for g in segs:
        pos = seg_positions(g)
        inner = [b for b in sorted(set(bounds)) if pos.min() < b <= pos.max()]
        if not inner:
            out.append(g)
            continue
        side = np.searchsorted(np.asarray(inner), pos, side="right")
        if len(g.layout.unit_shape) != 1 or not (side == side[:, :1]).all() or (np.diff(side[:, 0]) < 0).any():
            raise t.refuse(node, "a slice through units laid out in blocks")
        sizes = [int(n) for n in np.bincount(side[:, 0]) if n]
        parts = t.vars.split(g.var, sizes)
        first = np.cumsum([0, *sizes[:-1]])
        step = g.layout.unit_strides[0]
        out += [Seg(p, replace(g.layout, start=g.layout.start + int(u) * step, unit_shape=(n,))) for p, u, n in zip(parts, first, sizes)]
    return out


def heads_to_parts(t: Tracer, node, lab: Heads) -> Parts:
    """A head axis that is indexed (select, unbind) was a split into parts, not heads: q, k, v of a fused
    projection viewed as (3, C). Possible while nothing else depends on those blocks moving together."""
    if not t.vars.unstructure(lab.var) or not lab.heads.is_plain() or lab.heads.block_size() != 1:
        raise t.refuse(node, "one attention head is picked out")
    r = t.vars.root(lab.var)
    k = r.size // lab.heads.units
    parts = t.vars.split(lab.var, [k] * lab.heads.units)
    return Parts(lab.head_dim, tuple(plain_axis(p, lab.inner_dim, k) for p in parts))


# --- members from weights that meet a permuted tensor ---------------------------------------------------


def weight_joins(t: Tracer, node: fx.Node, label, out_shape, operand: fx.Node, view: WeightView, shape=None) -> None:
    """A weight (view) combined elementwise with a permuted tensor: the weight axis along each permuted
    axis becomes a member; a weight that varies along the inside of heads forces those to stay. `shape`:
    the operand's shape as the view sees it (default: the operand's own)."""
    shape = shape or t.shape(operand)
    shift = len(out_shape) - len(shape)
    broadcast = lambda d: view.axes[d] is not None and t.shapes[view.key][view.axes[d]] == 1  # noqa: E731 (an expanded axis)
    axis_of = {d + shift: view.axes[d] for d in range(len(shape)) if shape[d] != 1 and not broadcast(d)}
    if isinstance(label, Axis):
        if label.dim in axis_of:
            if axis_of[label.dim] is None:
                raise t.refuse(node, "a computed weight varies along the permuted axis")
            for s in label.segs:
                t.add_member(s.var, view.key, axis_of[label.dim], s.layout)
    elif isinstance(label, Heads):
        if label.inner_dim in axis_of:
            t.vars.fix_inner(label.var)
            t.notes.append(f"{node.name}: {view.key} varies inside the heads, which stay unpermuted inside")
        if label.head_dim in axis_of and axis_of[label.head_dim] is not None:
            t.add_member(t.vars.root(label.var).heads or label.var, view.key, axis_of[label.head_dim], label.heads)
    elif isinstance(label, Parts):
        raise t.refuse(node, "a weight combined with a tensor split into parts")


def constant_joins(t: Tracer, node: fx.Node, label, out_shape, operand: fx.Node) -> None:
    """An unpermuted computed tensor combined elementwise with a permuted one: where it varies along a
    permuted axis, that axis must stay in place (e.g. rotary embeddings inside attention heads)."""
    shape = t.shape(operand)
    if shape is None:
        return
    shift = len(out_shape) - len(shape)
    varies = {d + shift for d in varying_dims(t, operand)}
    if isinstance(label, Axis) and label.dim in varies:
        t.fix_label(label, node, f"{operand.name} varies along the permuted axis {label.dim}: kept in place")
    elif isinstance(label, Heads):
        if label.inner_dim in varies:
            t.vars.fix_inner(label.var)
            t.notes.append(f"{node.name}: {operand.name} varies inside the heads (e.g. rotary embeddings): kept in place inside")
        if label.head_dim in varies:
            t.vars.fix(t.vars.root(label.var).heads or label.var)
            t.notes.append(f"{node.name}: {operand.name} varies over the heads: heads kept in place")
    elif isinstance(label, Parts) and label_dims(label) & varies:
        t.fix_label(label, node, f"{operand.name} varies along a permuted axis")


_BROADCASTS = {"expand", "expand_as", "type_as"}  # the second argument lends only a shape or dtype
_FILLS = {"zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full", "zeros", "ones", "full", "scalar_tensor"}
_REDUCES = {"sum", "mean", "amax", "amin", "max", "min", "prod", "any", "all", "logsumexp"}


def varying_dims(t: Tracer, node: fx.Node, depth: int = 0) -> set[int]:
    """Axes along which an unpermuted computed tensor may vary: not those of size 1, nor those it was
    expanded along (a padding mask expanded over the hidden axis), through casts, elementwise ops and
    reductions. Conservative: an op it does not know varies along every axis longer than 1."""
    if node in t.varying:
        return t.varying[node]
    shape = t.shape(node) or ()
    out = {d for d in range(len(shape)) if shape[d] != 1}
    value = t.constant(node)
    if value is not None and value.shape == shape:  # a constant known here: where its values differ
        out = {d for d in out if not bool((value == value.narrow(d, 0, 1)).all())}
    packet = getattr(getattr(node.target, "overloadpacket", None), "__name__", None) if node.op == "call_function" else None
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) and t.shape(node.args[0]) is not None else None
    if packet in _FILLS:  # one value everywhere
        out = set()
    elif packet == "lift_fresh_copy" and src is not None:
        out &= varying_dims(t, src, depth + 1)
    elif src is not None and depth < 64:
        if packet in _BROADCASTS:
            shift = len(shape) - len(t.shape(src))
            out &= {d + shift for d in varying_dims(t, src, depth + 1)}  # expanded axes do not vary
        elif packet in _REDUCES and isinstance(node.args[1] if len(node.args) > 1 else None, (int, list, tuple)):
            out &= _reduced(t, node, varying_dims(t, src, depth + 1))
        elif node.target in ELEMENTWISE:
            inner: set[int] = set()
            for a in node.all_input_nodes:
                if t.shape(a) is not None:
                    inner |= {d + len(shape) - len(t.shape(a)) for d in varying_dims(t, a, depth + 1)}
            out &= inner
    t.varying[node] = out
    return out


def _reduced(t: Tracer, node: fx.Node, dims: set[int]) -> set[int]:
    """Varying axes of a reduction's input, renumbered for its output (keepdim or not)."""
    ndim = len(t.shape(node.args[0]))
    red = node.args[1]
    red = {norm_dim(d, ndim) for d in ((red,) if isinstance(red, int) else red)} or set(range(ndim))
    keep = len(t.shape(node)) == ndim
    return {d if keep else d - sum(r < d for r in red) for d in dims if d not in red}


# --- reshapes ------------------------------------------------------------------------------------------


def reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Minimal groups of consecutive source and destination axes with equal sizes (size-1 axes alone)."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        si, dj, ps, pd = [i], [j], src[i], dst[j]
        i, j = i + 1, j + 1
        while ps != pd:
            if ps < pd:
                ps *= src[i]
                si.append(i)
                i += 1
            else:
                pd *= dst[j]
                dj.append(j)
                j += 1
        groups.append((si, dj))
    return groups


def _flat(src: tuple[int, ...], dims: list[int], coord_of: dict[int, np.ndarray]) -> np.ndarray:
    """Flat positions (units, r) in the space of axes `dims`: given coordinate arrays (units, r_d) on some
    axes, every value on the others (carried)."""
    strides = {d: math.prod(src[e] for e in dims[k + 1 :]) for k, d in enumerate(dims)}
    units = next(iter(coord_of.values())).shape[0]
    flat = np.zeros((units, 1), dtype=np.int64)
    for d in dims:
        vals = coord_of[d] if d in coord_of else np.broadcast_to(np.arange(src[d]), (units, src[d]))
        flat = (flat[:, :, None] + vals[:, None, :] * strides[d]).reshape(units, -1)
    return flat


def _unit_dims(coords, dst_dims) -> list[int]:
    """Destination axes (indices into dst_dims) whose coordinate sets differ between units."""
    out = []
    for k, _ in enumerate(dst_dims):
        c = np.sort(coords[k], axis=1)
        if not (c == c[:1]).all():
            out.append(k)
    return out


def _per_unit(c: np.ndarray) -> np.ndarray:
    """(units, r') unique sorted values per row (each row must have the same count)."""
    s = np.sort(c, axis=1)
    keep = np.ones(s.shape, dtype=bool)
    keep[:, 1:] = s[:, 1:] != s[:, :-1]
    counts = keep.sum(1)
    if (counts != counts[0]).any():
        raise StructureError("a reshape that spreads units unevenly")
    return s[keep].reshape(len(s), counts[0])


def _constants(coords, udims: list[int], dst_dims: list[int]) -> dict[int, int]:
    """{destination axis: value} for the axes where every one of these positions has the same coordinate."""
    out = {}
    for k, d in enumerate(dst_dims):
        if k not in udims and coords[k].min() == coords[k].max() and len(dst_dims) > 1:
            out[d] = int(coords[k].flat[0])
    return out


def map_positions(t: Tracer, node, var: int, flat: np.ndarray, dst: tuple[int, ...], dst_dims: list[int], prefer: int | None = None):
    """(label, constants) of one variable's units at flat positions (units, r) of a group, after viewing the
    group as the destination axes `dst_dims`. The label is Axis or Heads (Parts for a split into parts);
    constants are the axes on which all its positions share one coordinate {axis: value}. A variable of one
    unit lies on axis `prefer` (that of the tensor's other pieces), else on the last axis."""
    coords = np.unravel_index(flat, tuple(dst[d] for d in dst_dims))
    udims = _unit_dims(coords, dst_dims)
    units = flat.shape[0]
    if len(udims) == 0 and units == 1:
        udims = [dst_dims.index(prefer) if prefer in dst_dims else len(dst_dims) - 1]
    consts = _constants(coords, udims, dst_dims)
    if len(udims) == 0:
        raise StructureError("a reshape that makes units indistinguishable")
    if len(udims) == 1:
        k = udims[0]
        lay = fit_layout(_per_unit(coords[k]))
        if lay is None or lay.units != units:
            raise StructureError("a reshape giving units an irregular layout")
        return Axis(dst_dims[k], (Seg(var, lay),)), consts
    outer, innermost = udims[0], udims[-1]
    first = _per_unit(coords[outer])
    if len(udims) == 3:  # (parts, heads, inside): a fused projection split into q, k, v and heads
        p = int(first.max()) + 1
        size = units // p
        if first.shape[1] != 1 or not (first[:, 0] == np.arange(units) // size).all():
            raise StructureError("a reshape that splits units into interleaved parts")
        parts = t.vars.split(var, [size] * p)
        labels = [map_positions(t, node, part, flat[i * size : (i + 1) * size], dst, dst_dims)[0] for i, part in enumerate(parts)]
        return Parts(dst_dims[outer], tuple(labels)), consts
    inner = _per_unit(coords[innermost])
    k = int(inner.max()) + 1
    if inner.shape[1] != 1 or not (inner[:, 0] == np.arange(units) % k).all() or units % k:
        raise StructureError("a reshape that splits units irregularly")
    heads_pos = first.reshape(units // k, k, -1)
    if not (heads_pos == heads_pos[:, :1]).all():
        raise StructureError("a reshape that splits heads irregularly")
    lay = fit_layout(heads_pos[:, 0])
    if lay is None or lay.units != units // k:
        raise StructureError("a reshape giving heads an irregular layout")
    t.vars.structure(var, units // k)
    return Heads(var, dst_dims[outer], dst_dims[innermost], lay), consts


def reshape_label(t: Tracer, node: fx.Node, label, src: tuple[int, ...], dst: tuple[int, ...]):
    """The label of a reshaped tensor (view, reshape, flatten, unflatten)."""
    groups = reshape_groups(src, dst)
    group_of = {d: g for g in groups for d in g[0]}
    if isinstance(label, WeightView):
        axes = [None] * len(dst)
        for si, dj in groups:
            if len(si) == 1 and len(dj) == 1:
                axes[dj[0]] = label.axes[si[0]]
            elif any(label.axes[d] is not None and src[d] != 1 for d in si):  # dropping a size-1 axis loses nothing
                return None
        return WeightView(label.key, tuple(axes))
    untouched = {d: group_of[d][1][0] for d in range(len(src)) if len(group_of[d][0]) == 1 and len(group_of[d][1]) == 1}
    if all(d in untouched for d in label_dims(label)):
        return remap(label, untouched)
    if isinstance(label, Heads) and group_of[label.head_dim] is not group_of[label.inner_dim]:
        return _reshape_heads_axis(t, node, label, src, dst, group_of)
    pieces = [(var, _flat(src, si, coords), dj) for var, coords, (si, dj) in _unit_coords(t, node, label, group_of)]
    outs = {i: map_positions(t, node, var, flat, dst, dj) for i, (var, flat, dj) in enumerate(pieces) if len(flat) > 1}
    dims = [lab.dim for lab, _ in outs.values() if isinstance(lab, Axis)]
    for i, (var, flat, dj) in enumerate(pieces):  # one-unit variables (a shuffle's finest parts) lie beside the others
        if i not in outs:
            outs[i] = map_positions(t, node, var, flat, dst, dj, prefer=dims[0] if dims else None)
    return _combine(t, node, [outs[i] for i in range(len(pieces))])


def _reshape_heads_axis(t: Tracer, node, label: Heads, src, dst, group_of) -> Heads:
    """A reshape that moves the head axis (e.g. merges it with the batch axis) but not the inside of heads."""
    (si, dj), (ii, ij) = group_of[label.head_dim], group_of[label.inner_dim]
    if len(ii) != 1 or len(ij) != 1:
        raise t.refuse(node, "a reshape of the axis inside attention heads")
    heads = t.vars.root(label.var).heads
    flat = _flat(src, si, {label.head_dim: label.heads.positions().numpy()})
    moved, _ = map_positions(t, node, heads, flat, dst, dj)
    if not isinstance(moved, Axis):
        raise t.refuse(node, "a reshape that splits attention heads")
    return Heads(label.var, moved.dim, ij[0], moved.segs[0].layout)


def _unit_coords(t: Tracer, node, label, group_of) -> list:
    """Per variable of a label: (var, {source axis: coordinates (units, r)}, its reshape group)."""
    if isinstance(label, Axis):
        return [(s.var, {label.dim: seg_positions(s)}, group_of[label.dim]) for s in label.segs]
    if isinstance(label, Heads):
        gh, gi = group_of[label.head_dim], group_of[label.inner_dim]
        k = t.vars.root(label.var).block
        hpos = label.heads.positions().numpy()
        if gh is not gi:
            raise t.refuse(node, "a reshape of the axis inside attention heads")
        head_c = np.repeat(hpos, k, axis=0)
        inner_c = np.tile(np.arange(k), hpos.shape[0])[:, None]
        return [(label.var, {label.head_dim: head_c, label.inner_dim: inner_c}, gh)]
    if isinstance(label, Parts):
        out = []
        for i, part in enumerate(label.parts):
            if part is None:
                continue
            if not isinstance(part, Axis) or group_of[part.dim] is not group_of[label.dim]:
                raise t.refuse(node, "a reshape of a tensor split into parts")
            for s in part.segs:
                pos = seg_positions(s)
                out.append((s.var, {part.dim: pos, label.dim: np.full((pos.shape[0], 1), i)}, group_of[label.dim]))
        return out
    raise t.refuse(node, "a reshape of this tensor")


def _combine(t: Tracer, node, outs: list):
    """Labels of the pieces of one tensor after a reshape, combined into one label: segments of one axis,
    or parts told apart by a coordinate they do not share (a channel shuffle's halves)."""
    labels = [lab for lab, _ in outs]
    if len(outs) == 1:
        return labels[0]
    if not all(isinstance(lab, Axis) for lab in labels) or len({lab.dim for lab in labels}) != 1:
        raise t.refuse(node, "a reshape that separates concatenated parts")
    positions = np.concatenate([seg_positions(s).reshape(-1) for lab in labels for s in lab.segs])
    if len(np.unique(positions)) == len(positions):
        return Axis(labels[0].dim, tuple(s for lab in labels for s in lab.segs))
    axes = set.intersection(*(set(c) for _, c in outs))
    for d in sorted(axes):
        by_value: dict[int, list] = {}
        for lab, c in outs:
            by_value.setdefault(c[d], []).extend(lab.segs)
        if all(_disjoint(segs) for segs in by_value.values()):
            parts = [None] * (max(by_value) + 1)
            for v, segs in by_value.items():
                parts[v] = Axis(labels[0].dim, tuple(segs))
            return Parts(d, tuple(parts))
    raise t.refuse(node, "a reshape that overlaps concatenated parts")


def _disjoint(segs) -> bool:
    positions = np.concatenate([seg_positions(s).reshape(-1) for s in segs])
    return len(np.unique(positions)) == len(positions)


def weight_view_through(label, dims_map: dict[int, int | None], ndim: int):
    """A WeightView after an op that moves axes: dims_map[new axis] = old axis (None: a new axis)."""
    return WeightView(label.key, tuple(label.axes[dims_map[d]] if dims_map.get(d) is not None else None for d in range(ndim)))


__all__ = [
    "Axis", "Heads", "Parts", "Seg", "WeightView", "args_of", "tensor_args", "norm_dim", "fit_layout",
    "unify_labels", "weight_joins", "constant_joins", "reshape_label", "plain_axis", "weight_view_through",
]  # fmt: skip
