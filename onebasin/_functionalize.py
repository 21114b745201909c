"""In-place writes in an exported graph (relu_, add_, a masked fill of a slice...) rewritten as out-of-place
ops, so that every node's value is final when computed (`functionalize`; `graph.capture` falls back to
torch.export's own `run_decompositions` when the rewrite cannot be proven the same function)."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .ops import ALIASING, MAY_COPY, WRITE_BACK


def _mutated_arg(node: fx.Node):
    """The argument an in-place aten op writes (x of relu_(x), out += y), or None for a functional op."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or not schema.is_mutable:
        return None
    writes = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    return node.args[writes[0]] if writes == [0] and node.args else False


def _packet(node: fx.Node) -> str | None:
    packet = getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None
    return packet.__name__ if packet is not None else None


def _is_view(node: fx.Node) -> bool:
    """Whether a node's value may share memory with its first argument (a view op, or an item of a split)."""
    if node.op == "call_function" and node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and _is_view(node.args[0])
    return _packet(node) in ALIASING


def _aliases(node: fx.Node) -> set[fx.Node]:
    """Every node whose value may share memory with `node`'s: its bases and all views of them."""
    out, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in out:
            continue
        out.add(n)
        if _is_view(n) and isinstance(n.args[0], fx.Node):
            stack.append(n.args[0])
        stack.extend(u for u in n.users if _is_view(u))
    return out


def _chain(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(base, [views from the base down to node]) when every view on the way can be written back, else None."""
    chain = []
    while _is_view(node):
        if _packet(node) not in WRITE_BACK:
            return None
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def _functional(node: fx.Node):
    """The out-of-place twin of an in-place aten op (relu_ -> relu, fill_.Tensor -> fill.Tensor), or None."""
    packet = getattr(torch.ops.aten, node.target.overloadpacket.__name__.rstrip("_"), None)
    return getattr(packet, node.target._overloadname, None)


def functionalize(gm: fx.GraphModule) -> bool:
    """Rewrite in-place ops (relu_, add_, dropout_, a masked fill of a slice...) as out-of-place ones, in
    place: the new value of the written tensor is computed, written back through the views it was reached
    by (slice_scatter, select_scatter, inverse transposes), and later readers of the base tensor, or of
    views made from it earlier, read the new value. Returns False (graph unchanged) when that is not
    provably the same function: a write into a weight or an input, through a view that cannot be written
    back, an in-place op without a functional twin, or a possible copy of the tensor taken before the
    write and read after it (replaying it would read the new values)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        arg = _mutated_arg(node)
        if arg is None:
            continue
        found = _chain(arg) if isinstance(arg, fx.Node) else None
        if found is None or _functional(node) is None or found[0].op != "call_function":
            return False
        aliases = _aliases(found[0])
        if any(n.op != "call_function" for n in aliases) or _copy_read_after(node, found[0], aliases, order):
            return False
    for node in list(gm.graph.nodes):
        if _mutated_arg(node) is not None:
            _rewrite(gm.graph, node)
    gm.recompile()
    return True


def _copy_read_after(write: fx.Node, base: fx.Node, aliases: set[fx.Node], order: dict) -> bool:
    """Whether a value made from `base` (`aliases`: it and its views) before `write` through an op that may
    copy (reshape of a non-contiguous tensor, .to, .contiguous) is read after `write`."""
    for old in aliases - {base}:
        if order[old] > order[write] or not any(order[u] > order[write] for u in old.users):
            continue
        node = old
        while node is not base and isinstance(node, fx.Node):
            if _packet(node) in MAY_COPY:
                return True
            node = node.args[0]
    return False


def _rewrite(graph: fx.Graph, node: fx.Node) -> None:
    """One in-place op as its functional twin, written back to its base; later readers rewired."""
    base, chain = _chain(node.args[0])
    node.target = _functional(node)
    new = [node]
    for view in reversed(chain):  # the new value of each view's input
        new.append(_write_back(graph, view, new[-1]))
    order = {n: i for i, n in enumerate(graph.nodes)}
    after = lambda u: order[u] > order[node] and u not in new  # noqa: E731
    for user in [u for u in base.users if after(u)]:
        user.replace_input_with(base, new[-1])
    for old in _aliases(base) - {base}:  # views taken before the write and read after it: taken again
        later = [u for u in old.users if after(u)]
        if later:
            again = _replay(graph, old, base, new[-1])
            for user in later:
                user.replace_input_with(old, again)


def _write_back(graph: fx.Graph, view: fx.Node, value: fx.Node) -> fx.Node:
    """The value of `view`'s input after `view` was overwritten by `value` (inserted after `value`)."""
    aten, parent, kind = torch.ops.aten, view.args[0], _packet(view)
    rest = list(view.args[1:])
    if kind == "slice":
        rest += [0, None, None, 1][len(rest):]
        target, args = aten.slice_scatter.default, (parent, value, *rest)
    elif kind == "select":
        target, args = aten.select_scatter.default, (parent, value, *rest)
    elif kind in ("alias", "detach"):
        return value
    elif kind == "t":
        target, args = aten.t.default, (value,)
    elif kind == "transpose":
        target, args = aten.transpose.int, (value, *rest)
    elif kind == "permute":
        dims = [d % len(rest[0]) for d in rest[0]]
        target, args = aten.permute.default, (value, [dims.index(i) for i in range(len(dims))])
    else:  # unsqueeze
        target, args = aten.squeeze.dim, (value, rest[0])
    with graph.inserting_after(value):
        out = graph.call_function(target, tuple(args), dict(view.kwargs) if kind in ("slice", "select") else {})
    out.meta = {**parent.meta}
    return out


def _replay(graph: fx.Graph, old: fx.Node, base: fx.Node, new_base: fx.Node) -> fx.Node:
    """The views that made `old` from `base`, taken again from `new_base` (inserted after it)."""
    chain = []
    while old is not base:
        chain.append(old)
        old = old.args[0]
    prev = new_base
    for view in reversed(chain):
        with graph.inserting_after(prev):
            prev = graph.call_function(view.target, (prev, *view.args[1:]), dict(view.kwargs))
        prev.meta = {**view.meta}
    return prev
