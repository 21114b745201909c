"""Rules for composite ops (einsum) and wrapped blocks (autocast, no_grad): trace the op's own decomposition into simpler ATen ops (permute, view,
bmm, mul, sum) on meta tensors of the same shapes, then walk that small graph with the same rules and the
same variables. The decomposition is the op's definition, so every constraint it implies is found, and an
op inside it without a rule is refused as usual (named with the composite node)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.experimental.proxy_tensor import make_fx

from ..errors import UnsupportedOpError
from .._spec import Layout
from ..labels import Axis, Multi, StructureError, label_vars

if TYPE_CHECKING:  # annotations only: the tracer imports the rules
    from ..tracer import Tracer


def _decompose(node: fx.Node) -> fx.GraphModule:
    """The op of `node` on meta tensors of its inputs' shapes, traced below autograd (composites decompose);
    one trace per op, arguments, shapes and dtypes (MaxViT has dozens of identical einsums)."""
    leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
    tensors = [i for i, x in enumerate(leaves) if isinstance(x, fx.Node)]
    metas = [(tuple(int(s) for s in leaves[i].meta["val"].shape), leaves[i].meta["val"].dtype) for i in tensors]
    key = (node.target, str(spec), tuple(str(x) if i not in tensors else metas[tensors.index(i)] for i, x in enumerate(leaves)))
    if key not in _TRACES:

        def call(*xs):
            full = list(leaves)
            for i, x in zip(tensors, xs):
                full[i] = x
            args, kwargs = pytree.tree_unflatten(full, spec)
            return node.target(*args, **kwargs)

        _TRACES[key] = make_fx(call)(*[torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in metas])
    return _TRACES[key]


_TRACES: dict = {}


def decomposed(t: Tracer, node: fx.Node):
    """Walk the decomposition of `node` with the inputs' labels; its output's label is the node's."""
    inputs = [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, fx.Node)]
    if not any(t.labels.get(a) is not None for a in inputs):
        return None
    gm = _decompose(node)
    before = len(t.sites)
    stack = node.meta.get("nn_module_stack")
    try:
        out = t.walk(gm.graph, [t.labels.get(a) for a in inputs], stack)
    except (UnsupportedOpError, StructureError) as err:
        raise t.refuse(node, f"{node.target} decomposed: {str(err).split(' touches ')[0]}") from None
    del t.sites[before:]  # sites inside the decomposition are not nodes of the captured graph
    for sub in gm.graph.nodes:  # the decomposition is reused for the next node like this one
        t.labels.pop(sub, None)
        t.varying.pop(sub, None)
    if isinstance(out, Axis) and len(out.segs) == 1 and out.segs[0].layout == Layout.plain(out.segs[0].layout.units):
        old = {t.vars.find(v) for a in inputs for v in label_vars(t.labels.get(a))}
        if t.vars.find(out.segs[0].var) not in old:  # a new hidden axis (a product with a weight): its site
            t.add_site(out.segs[0].var, node, out.dim)
    return out


def wrapped(submodule_arg: int):
    """A block the export wrapped in a higher-order op (`with torch.autocast(...)` or `torch.no_grad()` inside
    forward): its subgraph is walked in place, the operands following the submodule argument."""

    def rule(t: Tracer, node: fx.Node):
        sub = t.captured.program.graph_module.get_submodule(node.args[submodule_arg].target)
        operands = list(node.args[submodule_arg + 1 :])
        before = len(t.sites)
        try:
            out = t.walk(sub.graph, [t.labels.get(a) for a in operands], node.meta.get("nn_module_stack"))
        except (UnsupportedOpError, StructureError) as err:
            raise t.refuse(node, f"inside {node.target}: {str(err).split(' touches ')[0]}") from None
        del t.sites[before:]  # nodes of the subgraph cannot be tapped by name
        return out if isinstance(out, Multi) else Multi((out,))

    return rule


aten = torch.ops.aten
RULES = {
    aten.einsum.default: decomposed,
    torch.ops.higher_order.wrap_with_autocast: wrapped(4),  # (device, dtype, enabled, cache, submodule, *operands)
    torch.ops.higher_order.wrap_with_set_grad_enabled: wrapped(1),  # (enabled, submodule, *operands)
}
