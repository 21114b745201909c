"""Rules for layers with weights: every op of `ops.LAYERS` (Linear, GPT-2's transposed Conv1D `addmm`, Conv,
grouped and depthwise too, transposed Conv) and Embedding. A layer's output axis is a new variable; its input axis joins the
input's variable; a grouped conv gives both the block structure of its groups (symmetries note, Sec. 4)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from ..labels import Axis, WeightView
from ..ops import LAYERS, args_of
from ._common import plain_axis, varying_dims

if TYPE_CHECKING:  # annotations only: the tracer imports the rules
    from ..tracer import Tracer


def _weight(t: Tracer, node: fx.Node, arg, out_axis: int, in_axis: int):
    """(key, weight axis of the outputs, weight axis of the inputs) of a weight argument, or None if computed
    (or a slice of a stored weight along one of those axes: its units stay in place, with a note)."""
    view = t.weight(arg)
    if view is None:
        if t.label(arg) is not None:
            raise t.refuse(node, "a layer whose weight is a permuted activation")
        return None
    if view.axes[out_axis] is None or view.axes[in_axis] is None:
        t.notes.append(f"{node.name}: its weight is a slice of {view.key!r}: kept in place")
        return None
    return view.key, view.axes[out_axis], view.axes[in_axis]


def _bias_key(t: Tracer, arg) -> str | None:
    view = t.weight(arg)
    return view.key if view is not None and view.axes == (0,) else None


def _layer(t: Tracer, node: fx.Node, x, weight, bias, in_dim: int, out_dim: int, w_out: int, w_in: int, units: int):
    """Common body of linear/addmm/1x1-style layers: input members, a new output variable, its members and site."""
    lab = t.label(x)
    w = _weight(t, node, weight, w_out, w_in)
    if lab is not None and not (isinstance(lab, Axis) and lab.dim == in_dim):
        if isinstance(lab, Axis) and lab.dim != in_dim and lab.dim != out_dim:
            return lab  # permuted along another axis (token mixing): the layer acts on each unit alike
        raise t.refuse(node, f"a layer reading features from axis {in_dim} of a tensor permuted otherwise")
    if lab is not None:
        if w is None:
            t.fix_label(lab, node, "a computed weight reads the permuted axis")
        else:
            for s in lab.segs:
                t.add_member(s.var, w[0], w[2], s.layout)
    var = t.new_var(node, units)
    if w is None:
        t.vars.fix(var)
    else:
        t.add_member(var, w[0], w[1])
        _bias(t, var, bias)
    t.add_site(var, node, out_dim)
    return plain_axis(var, out_dim, units)


def _bias(t: Tracer, var: int, bias) -> None:
    """The bias follows the output units: a weight is a member; weights concatenated with constants (Pieces)
    split the output into parts, each following its piece (a constant piece that varies keeps its part)."""
    if bias is None:
        return
    if _bias_key(t, bias) is not None:
        t.add_member(var, _bias_key(t, bias), 0)
        return
    pieces = t.pieces.get(bias)
    if pieces is None or t.label(bias) is not None:
        t.vars.fix(var)
        return
    parts = t.vars.split(var, [n for _, n, _ in pieces.items])
    for part, (_, _, item) in zip(parts, pieces.items):
        if isinstance(item, WeightView) and item.axes[pieces.dim] is not None:
            t.add_member(part, item.key, item.axes[pieces.dim])
        elif isinstance(item, WeightView) or varying_dims(t, item):
            t.vars.fix(part)


def layer(t: Tracer, node: fx.Node):
    """Any op of `ops.LAYERS`: its row names the input, weight and bias and their axes; a conv with groups
    > 1 is `_grouped_conv`."""
    row, a = LAYERS[node.target], args_of(node)
    if (a.get("groups") or 1) > 1:
        if row.out_axis != 0:
            raise t.refuse(node, "a transposed conv with groups > 1")
        return _grouped_conv(t, node, a, a["groups"])
    dim = row.dim(len(t.shape(node)))
    return _layer(t, node, a[row.input], a[row.weight], a[row.bias], dim, dim, row.out_axis, row.in_axis, t.shape(node)[dim])


def _grouped_conv(t: Tracer, node: fx.Node, a: dict, g: int):
    """Conv with g groups: blocks = groups; input and output share the block permutation, each block is
    free inside (depthwise: each filter follows its channel; depth multiplier m: blocks of m outputs)."""
    lab = t.label(a["input"])
    cin, cout = t.shape(a["input"])[1], t.shape(node)[1]
    w = _weight(t, node, a["weight"], 0, 1)
    bias = a["bias"]
    if cin == g == cout and isinstance(lab, Axis) and lab.dim == 1 and w is not None and (bias is None or _bias_key(t, bias)):
        return _depthwise(t, node, lab, w[0], w[1], bias)
    if lab is not None and not (isinstance(lab, Axis) and lab.dim == 1 and len(lab.segs) == 1 and lab.segs[0].layout.is_plain()
                                and lab.segs[0].layout.block_size() == 1):  # fmt: skip
        raise t.refuse(node, f"a conv with groups={g} on channels that are concatenated or laid out otherwise")
    if w is None or (bias is not None and _bias_key(t, bias) is None):
        if lab is not None:
            t.fix_label(lab, node, "a grouped conv with a computed weight")
        out = t.new_var(node, cout)
        t.vars.fix(out)
        t.add_site(out, node, 1)
        return plain_axis(out, 1, cout)
    if lab is None:
        out = t.new_var(node, cout)
        t.vars.fix(t.vars.structure(out, g))  # inputs stay: so do the groups
    else:
        vin = lab.segs[0].var
        heads = t.vars.structure(vin, g)
        out = t.new_var(node, cout)
        t.unify(node, t.vars.structure(out, g), heads)
        if cin != g:
            t.add_member(vin, w[0], w[2], diag=True)
    t.add_member(out, w[0], w[1])
    if bias is not None:
        t.add_member(out, _bias_key(t, bias), 0)
    t.add_site(out, node, 1)
    return plain_axis(out, 1, cout)


def _depthwise(t: Tracer, node: fx.Node, lab: Axis, key: str, axis: int, bias) -> Axis:
    """Depthwise conv: each filter (and bias) follows its channel, wherever the channel lies (concatenated
    or shuffled channels too); the output is labelled as the input."""
    for s in lab.segs:
        t.add_member(s.var, key, axis, s.layout)
        if bias is not None:
            t.add_member(s.var, _bias_key(t, bias), 0, s.layout)
    if len(lab.segs) == 1 and lab.segs[0].layout.is_plain():
        t.add_site(lab.segs[0].var, node, 1)
    return lab


def embedding(t: Tracer, node: fx.Node):
    """Rows of the weight looked up by token ids: the embedding axis is a new variable (a stream writer)."""
    a = args_of(node)
    w = t.weight(a["weight"])
    if t.label(a["weight"]) is not None or w is None:
        raise t.refuse(node, "an embedding with a computed table")
    units = t.shape(node)[-1]
    var = t.new_var(node, units)
    t.add_member(var, w.key, w.axes[1])
    return plain_axis(var, len(t.shape(node)) - 1, units)


aten = torch.ops.aten
RULES = {
    **{op: layer for op in LAYERS},
    aten.embedding.default: embedding,
}
