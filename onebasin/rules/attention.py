"""Rules for attention (symmetries note, Sec. 2): products of two activations and fused attention.

q @ k^T contracts the inside of each head: the query and key groups share one permutation inside every
head; softmax(q k^T) @ v contracts tokens and keeps the head axis: the value group's heads move with the
query/key heads. A matmul with a weight is a linear layer; `scaled_dot_product_attention` is both at once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from .._spec import Layout
from ..labels import Axis, Heads, Seg, WeightView, label_dims, remap
from ..ops import args_of
from ._common import constant_joins, plain_axis, unify_labels, varying_dims, weight_joins

if TYPE_CHECKING:  # annotations only: the tracer imports the rules
    from ..tracer import Tracer


def _heads_of(t: Tracer, lab: Heads) -> Axis:
    """The head axis of a Heads label, as an Axis label of its block variable."""
    return Axis(lab.head_dim, (Seg(t.vars.root(lab.var).heads, lab.heads),))


def _same_heads(t: Tracer, node: fx.Node, a: Axis, b: Axis) -> None:
    if a.dim != b.dim or [s.layout for s in a.segs] != [s.layout for s in b.segs]:
        raise t.refuse(node, "attention whose heads are laid out differently")
    for x, y in zip(a.segs, b.segs):
        t.unify(node, x.var, y.var)


def matmul(t: Tracer, node: fx.Node):
    """a @ b over the last two axes (batch axes broadcast): a linear layer when b is a weight, else a product
    of activations (`_product`)."""
    a, b = node.args[0], node.args[1]
    la, lb = t.labels.get(a), t.labels.get(b)
    sa, sb, so = t.shape(a), t.shape(b), t.shape(node)
    if isinstance(lb, WeightView) and not isinstance(la, WeightView) and len(sa) >= 2:
        return _times_weight(t, node, la, lb, sa, sb, so)
    if isinstance(la, WeightView) and isinstance(lb, Axis) and lb.dim == len(sb) - 2 and len(sa) == 2:
        if la.axes[1] is None:
            raise t.refuse(node, "a product of permuted rows with a weight sliced along its columns")
        for s in lb.segs:  # W @ x: W's columns follow x's rows (MLP-Mixer's token mixing as a product)
            t.add_member(s.var, la.key, la.axes[1], s.layout)
        return None
    la = None if isinstance(la, WeightView) else la
    lb = None if isinstance(lb, WeightView) else lb
    if la is None and lb is None:
        return None
    if len(sa) < 2 or len(sb) < 2:
        for lab in (la, lb):
            t.fix_label(lab, node, "a product with a vector")
        return None
    return _product(t, node, la, lb, sa, sb, so)


def _times_weight(t: Tracer, node: fx.Node, la, w: WeightView, sa, sb, so):
    """x @ W: W's rows follow x's units; its columns are a new variable (a linear layer without bias)."""
    last = len(sa) - 1
    if any(s != 1 for s in sb[:-2]):
        raise t.refuse(node, "a product with a weight that has batch axes")
    if isinstance(la, Axis) and la.dim < last - 1 or isinstance(la, Heads) and max(la.head_dim, la.inner_dim) < last - 1:
        return remap(la, {d: d + len(so) - len(sa) for d in label_dims(la)})  # W acts on each unit alike
    if la is not None and not (isinstance(la, Axis) and la.dim == last):
        raise t.refuse(node, "a product of a permuted tensor with a weight along another axis")
    rows, cols = w.axes[-2], w.axes[-1]  # leading axes of size 1: a weight broadcast over the batch (einsum)
    if rows is None or cols is None:
        raise t.refuse(node, "a product with a weight viewed in a way that mixes its axes")
    for s in la.segs if la is not None else ():
        t.add_member(s.var, w.key, rows, s.layout)
    var = t.new_var(node, so[-1])
    t.add_member(var, w.key, cols)
    t.add_site(var, node, len(so) - 1)
    return plain_axis(var, len(so) - 1, so[-1])


@dataclass(frozen=True)
class _Comp:
    """One permuted axis of a product's operand: an Axis label ("axis"), or a Heads label's head axis
    ("heads") or its inside ("inner"); `out` is its axis in the output (None: contracted)."""

    kind: str
    dim: int
    out: int | None
    label: object


def _comps(t: Tracer, node: fx.Node, lab, n: int, no: int, side: str) -> list[_Comp]:
    """The permuted axes of an operand of n axes (side "a": rows n-2 kept, n-1 contracted; "b": the reverse)."""
    if lab is None:
        return []

    def out(d: int) -> int | None:
        if d < n - 2:
            return d + no - n
        kept = n - 2 if side == "a" else n - 1
        return (no - 2 if side == "a" else no - 1) if d == kept else None

    if isinstance(lab, Axis):
        return [_Comp("axis", lab.dim, out(lab.dim), lab)]
    if isinstance(lab, Heads):
        return [_Comp("heads", lab.head_dim, out(lab.head_dim), lab), _Comp("inner", lab.inner_dim, out(lab.inner_dim), lab)]
    raise t.refuse(node, "a product of a tensor split into parts")


def _fix(t: Tracer, node: fx.Node, c: _Comp, why: str) -> None:
    if c.kind == "axis":
        t.fix_label(c.label, node, why)
    elif c.kind == "heads":
        t.vars.fix(t.vars.root(c.label.var).heads or c.label.var)
    else:
        t.vars.fix_inner(c.label.var)
    t.notes.append(f"{node.name}: {why}")


def _axis_of(t: Tracer, c: _Comp) -> Axis | None:
    """An "axis" or "heads" component as an Axis label on its output axis."""
    if c.kind == "axis":
        return replace(c.label, dim=c.out)
    if c.kind == "heads":
        return Axis(c.out, (Seg(t.vars.root(c.label.var).heads or c.label.var, c.label.heads),))
    return None


def _match(t: Tracer, node: fx.Node, x: _Comp, y: _Comp) -> bool:
    """Unify two components that meet on one axis (a batch axis, or the contracted one); False if they
    cannot share a permutation here (the caller keeps both in place)."""
    if x.kind == "inner" or y.kind == "inner":
        if x.kind == y.kind == "inner" and x.label.heads == y.label.heads:
            t.unify(node, x.label.var, y.label.var)  # q and k share the inside of every head (and the heads)
            return True
        return False
    ax, ay = _axis_of(t, replace(x, out=0)), _axis_of(t, replace(y, out=0))
    if [s.layout for s in ax.segs] != [s.layout for s in ay.segs]:
        return False
    for sx, sy in zip(ax.segs, ay.segs):
        t.unify(node, sx.var, sy.var)
    return True


def _varies(t: Tracer, operand: fx.Node, lab, d: int) -> bool:
    """Whether an operand's values may differ along its axis d (an activation does; a constant maybe not)."""
    if t.shape(operand)[d] == 1:
        return False
    return lab is not None or d in varying_dims(t, operand)


def _product(t: Tracer, node: fx.Node, la, lb, sa, sb, so):
    """a @ b of activations. A contracted axis permuted on both sides shares one permutation (q @ k^T inside
    heads), a batch axis likewise (heads); the rows of a and the columns of b carry over (p @ v keeps v's
    inside of heads). Whatever cannot be expressed in one output label stays in place (both insides of a
    cross-covariance q^T k: the query side is kept)."""
    a, b = node.args[0], node.args[1]
    na, nb, no = len(sa), len(sb), len(so)
    A, B = _comps(t, node, la, na, no, "a"), _comps(t, node, lb, nb, no, "b")
    ca, cb = [c for c in A if c.out is None], [c for c in B if c.out is None]
    if ca and cb and not _match(t, node, ca[0], cb[0]):
        _fix(t, node, ca[0], "a product contracting two differently permuted axes")
        _fix(t, node, cb[0], "a product contracting two differently permuted axes")
    elif ca and not cb and _varies(t, b, lb, nb - 2):
        _fix(t, node, ca[0], "a product contracts units with an unpermuted matrix")
    elif cb and not ca and _varies(t, a, la, na - 1):
        _fix(t, node, cb[0], "a product contracts units with an unpermuted matrix")
    batch = {}
    for od in range(no - 2):
        xa = [c for c in A if c.out == od and c.dim < na - 2]
        xb = [c for c in B if c.out == od and c.dim < nb - 2]
        if xa and xb:
            if _match(t, node, xa[0], xb[0]):
                batch[od] = xa[0]
            else:
                _fix(t, node, xa[0], "a product over differently permuted batch axes")
                _fix(t, node, xb[0], "a product over differently permuted batch axes")
        elif xa or xb:
            c, other, lab, n = (xa[0], b, lb, nb) if xa else (xb[0], a, la, na)
            d = od - (no - n)
            if d >= 0 and _varies(t, other, lab, d):
                _fix(t, node, c, "a product with a tensor that varies along a permuted batch axis")
            else:
                batch[od] = c
    free = [c for c in A if c.out == no - 2] + [c for c in B if c.out == no - 1]
    return _product_label(t, node, batch, free)


def _product_label(t: Tracer, node: fx.Node, batch: dict, free: list):
    """One label for the product from its surviving components; the others stay in place. A free inside of
    heads whose heads survive on a batch axis makes a Heads label (p @ v); else a single free Axis, else the
    first batch component."""
    keep = None
    for od, c in sorted(batch.items()):
        block = _axis_of(t, c)
        for f in free:
            if keep is None and f.kind == "inner" and len(block.segs) == 1 and block.segs[0].layout == f.label.heads \
                    and t.vars.find(block.segs[0].var) == t.vars.find(t.vars.root(f.label.var).heads or f.label.var):  # fmt: skip
                keep = (f, c, Heads(f.label.var, od, f.out, f.label.heads))
    if keep is None and not batch and len(free) == 1 and free[0].kind == "axis":
        keep = (free[0], None, replace(free[0].label, dim=free[0].out))
    if keep is None and batch:
        od, c = sorted(batch.items())[0]
        keep = (None, c, _axis_of(t, c))
    why = "a product keeping several differently permuted axes: the others stay in place"
    for c in [*free, *batch.values()]:
        if keep is None or c not in keep[:2]:
            _fix(t, node, c, why)
    return keep[2] if keep is not None else None


def sdpa(t: Tracer, node: fx.Node):
    """scaled_dot_product_attention(q, k, v, mask): q/k share the inside of heads, v's heads follow."""
    a = args_of(node)
    q, k, v = (t.label(a[n]) for n in ("query", "key", "value"))
    out_ndim = len(t.shape(node))
    if q is None and k is None and v is None:
        return None
    if not all(isinstance(x, Heads) for x in (q, k, v)):
        for x in (q, k, v):
            if x is not None:
                t.fix_label(x, node, "attention with some of q, k, v unpermuted")
        return None
    if q.heads != k.heads or a.get("enable_gqa"):
        t.vars.fix_inner(q.var)
        t.vars.fix_inner(k.var)
        _gqa_heads(t, node, q, k)
    else:
        t.unify(node, q.var, k.var)
    if q.heads == v.heads:
        _same_heads(t, node, _heads_of(t, q), _heads_of(t, v))
    else:
        _gqa_heads(t, node, q, v)
    mask = a.get("attn_mask")
    if mask is not None:  # added to the scores (B, heads, queries, keys): a relative position bias follows the heads
        scores = (*t.shape(node)[:-1], t.shape(a["key"])[-2])
        if t.label(mask) is not None:
            unify_labels(t, node, _heads_of(t, q), t.label(mask))
        elif t.weight(mask) is not None:
            weight_joins(t, node, _heads_of(t, q), scores, mask, t.weight(mask))
        else:
            constant_joins(t, node, _heads_of(t, q), scores, mask)
    if _head_positions(v.heads) == _head_positions(q.heads):
        return replace(v, inner_dim=out_ndim - 1)
    g = q.heads.units // v.heads.units  # enable_gqa: query head j reads kv head j // g
    return Heads(v.var, v.head_dim, out_ndim - 1, Layout(0, (v.heads.units,), (g,), (g,), (1,)))


def _head_positions(layout: Layout) -> int:
    return int(layout.positions().numel())


def _gqa_heads(t: Tracer, node: fx.Node, q: Heads, kv: Heads) -> None:
    """Grouped-query attention: query head j reads key/value head j // g; the g query heads of one kv
    head move as a block with it (not among themselves)."""
    hq, hk = q.heads.units, kv.heads.units
    if hq == hk:
        _same_heads(t, node, _heads_of(t, q), _heads_of(t, kv))
        return
    if hq % hk:
        raise t.refuse(node, f"{hq} query heads cannot share {hk} key/value heads")
    qheads = t.vars.root(q.var).heads
    kv_of_q = t.vars.structure(qheads, hk)
    t.vars.root(qheads).inner = False
    t.unify(node, kv_of_q, t.vars.root(kv.var).heads)


aten = torch.ops.aten
RULES = {
    aten.matmul.default: matmul,
    aten.bmm.default: matmul,
    aten.mm.default: matmul,
    aten.scaled_dot_product_attention.default: sdpa,
}
