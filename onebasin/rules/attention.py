"""Rules for attention (symmetries note, Sec. 2): products of two activations and fused attention.

q @ k^T contracts the inside of each head: the query and key groups share one permutation inside every
head; softmax(q k^T) @ v contracts tokens and keeps the head axis: the value group's heads move with the
query/key heads. A matmul with a weight is a linear layer; `scaled_dot_product_attention` is both at once.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx

from ..spec import Layout
from ..tracer import Axis, Heads, Seg, Tracer, WeightView, label_dims
from ._common import args_of, constant_joins, plain_axis, unify_labels, weight_joins


def _heads_of(t: Tracer, lab: Heads) -> Axis:
    """The head axis of a Heads label, as an Axis label of its block variable."""
    return Axis(lab.head_dim, (Seg(t.vars.root(lab.var).heads, lab.heads),))


def _same_heads(t: Tracer, node: fx.Node, a: Axis, b: Axis) -> None:
    if a.dim != b.dim or [s.layout for s in a.segs] != [s.layout for s in b.segs]:
        raise t.refuse(node, "attention whose heads are laid out differently")
    for x, y in zip(a.segs, b.segs):
        t.unify(node, x.var, y.var)


def _as_heads_axis(t: Tracer, lab) -> Axis | None:
    if isinstance(lab, Heads):
        return _heads_of(t, lab)
    return lab if isinstance(lab, Axis) else None


def matmul(t: Tracer, node: fx.Node):
    """a @ b over the last two axes (batch axes broadcast)."""
    a, b = node.args[0], node.args[1]
    la, lb = t.labels.get(a), t.labels.get(b)
    sa, sb, so = t.shape(a), t.shape(b), t.shape(node)
    if isinstance(lb, WeightView) and not isinstance(la, WeightView):
        return _times_weight(t, node, la, lb, sa, sb, so)
    if la is None or isinstance(la, WeightView):
        if lb is None or isinstance(lb, WeightView):
            return None
        if len(sb) - 2 in label_dims(lb):  # the contracted axis of b is permuted by an unpermuted a
            t.fix_label(lb, node, "a product contracts units with an unpermuted matrix")
            return None
        return _batch_shift(lb, len(so) - len(sb))
    if lb is None:
        if len(sa) - 1 in label_dims(la):
            t.fix_label(la, node, "a product contracts units with an unpermuted matrix")
            return None
        return _batch_shift(la, len(so) - len(sa))
    return _two_activations(t, node, la, lb, sa, sb, so)


def _batch_shift(lab, shift: int):
    from ..tracer import remap

    return remap(lab, {d: d + shift for d in label_dims(lab)}) if shift else lab


def _times_weight(t: Tracer, node: fx.Node, la, w: WeightView, sa, sb, so):
    """x @ W: W's rows follow x's units; its columns are a new variable (a linear layer without bias)."""
    last = len(sa) - 1
    if la is not None and not (isinstance(la, Axis) and la.dim == last) or any(s != 1 for s in sb[:-2]):
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


def _two_activations(t: Tracer, node: fx.Node, la, lb, sa, sb, so):
    """q @ k^T (contract inside heads) and p @ v (contract tokens, keep heads)."""
    na, nb, no = len(sa), len(sb), len(so)
    a_batch = {d + no - na for d in label_dims(la) if d < na - 2}
    if isinstance(la, Heads) and isinstance(lb, Heads) and la.inner_dim == na - 1 and lb.inner_dim == nb - 2:
        if la.heads != lb.heads:
            t.vars.fix_inner(la.var)
            t.vars.fix_inner(lb.var)
        else:
            t.unify(node, la.var, lb.var)  # q and k share the permutation inside each head
        _same_heads(t, node, _heads_of(t, la), _heads_of(t, lb))
        return _batch_shift(_heads_of(t, la), no - na)
    if isinstance(lb, Heads) and lb.inner_dim == nb - 1 and not (label_dims(la) & {na - 1}):
        ha = _as_heads_axis(t, la)
        if ha is None or ha.dim >= na - 2:
            raise t.refuse(node, "a product of attention weights and values with mismatched heads")
        hb = _heads_of(t, lb)
        _same_heads(t, node, _batch_shift(ha, no - na), _batch_shift(hb, no - nb))
        return _batch_shift(lb, no - nb)
    if label_dims(la) <= set(range(na - 2)) and label_dims(lb) <= set(range(nb - 2)) and a_batch:
        from ._common import unify_labels

        unify_labels(t, node, _batch_shift(la, no - na), _batch_shift(lb, no - nb))
        return _batch_shift(la, no - na)
    raise t.refuse(node, "a product of two permuted tensors that is not attention")


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
