"""Shared pieces of the permutation rules: axes, layouts, unifying labels, weights that meet a permuted
tensor, and where an unpermuted tensor varies (label types: ../labels.py; reshapes: _reshape.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch.fx as fx

from .._spec import Layout
from ..labels import Axis, Heads, Parts, Seg, WeightView, label_dims, plain_axis, remap
from ..ops import BROADCASTS, ELEMENTWISE, FILLS, REDUCES

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


def input_label(t: Tracer, node: fx.Node):
    """(label, number of axes) of the op's first input, or None when that input carries no permuted axis."""
    lab = t.label(node.args[0])
    return None if lab is None else (lab, len(t.shape(node.args[0])))


def norm_dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def moved(t: Tracer, node: fx.Node, lab, old_to_new: dict[int, int | None]):
    """A label after an op that renames axes (None: the axis is gone)."""
    if lab is None:
        return None
    if isinstance(lab, WeightView):
        ndim = len(t.shape(node))
        axes = [None] * ndim
        for old, new in old_to_new.items():
            if new is not None:
                axes[new] = lab.axes[old]
        return WeightView(lab.key, tuple(axes))
    if any(old_to_new.get(d) is None for d in label_dims(lab)):
        raise t.refuse(node, "an op that drops a permuted axis")
    return remap(lab, old_to_new)


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
    if packet in FILLS:  # one value everywhere
        out = set()
    elif packet == "lift_fresh_copy" and src is not None:
        out &= varying_dims(t, src, depth + 1)
    elif src is not None and depth < 64:
        if packet in BROADCASTS:
            shift = len(shape) - len(t.shape(src))
            out &= {d + shift for d in varying_dims(t, src, depth + 1)}  # expanded axes do not vary
        elif packet in REDUCES and isinstance(node.args[1] if len(node.args) > 1 else None, (int, list, tuple)):
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


__all__ = [
    "Axis", "Heads", "Parts", "Seg", "WeightView", "tensor_args", "norm_dim", "fit_layout",
    "unify_labels", "weight_joins", "constant_joins", "moved", "plain_axis",
]  # fmt: skip
