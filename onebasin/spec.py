"""Permutation structure of a network: which (tensor, axis) pairs must share one permutation.

A hidden unit of a network can be moved to another index without changing the function, as long as
every tensor axis that indexes that unit moves with it: the producing layer's output rows and bias,
the norm layer's parameters and running statistics, the next layer's input columns, and every
tensor added into the same residual stream. A `PermutationSpec` lists those axes, grouped: one group
per independent permutation. It is pure data (after git-re-basin's `PermutationSpec`, Ainsworth et
al. 2022): `trace` derives it from any `nn.Module` with torch.fx, `from_groups` accepts a
hand-written one, and every algorithm consumes it without looking at module types again.
"""

from __future__ import annotations

import math
import operator
import traceback
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from .errors import UnsupportedOpError, UntraceableModelError


@dataclass(frozen=True)
class Member:
    """Axis `axis` of tensor `key` (a state_dict name) is indexed by the group's units.

    `block` > 1 means unit c owns the `block` consecutive indices [c*block, (c+1)*block) of that axis
    (a conv channel flattened into a linear layer's inputs).
    """

    key: str
    axis: int
    block: int = 1


@dataclass(frozen=True)
class Site:
    """A tensor in the forward pass whose axis `dim` holds the group's units (where activations are read).

    `node` is the torch.fx node name in `torch.fx.symbolic_trace(model)`; `module` is the module whose
    output it is (None for a residual addition). `kind` is "layer" (output of a Linear/Conv, or of the
    norm layer directly after it) or "block" (output of a residual addition).
    """

    node: str | None
    dim: int
    kind: str = "layer"
    module: str | None = None


@dataclass(frozen=True)
class Group:
    """One permutation: `size` units, the tensor axes it acts on, and where its units can be observed."""

    name: str
    size: int
    members: tuple[Member, ...]
    sites: tuple[Site, ...] = ()


@dataclass(frozen=True)
class PermutationSpec:
    """All permutation groups of a network, in forward order. Keys are state_dict names."""

    groups: dict[str, Group] = field(default_factory=dict)

    @property
    def axes_of(self) -> dict[str, list[tuple[int, str, int]]]:
        """key -> [(axis, group name, block)] for every permuted tensor (the inverse view)."""
        out: dict[str, list[tuple[int, str, int]]] = {}
        for g in self.groups.values():
            for m in g.members:
                out.setdefault(m.key, []).append((m.axis, g.name, m.block))
        return out

    def __len__(self) -> int:
        return len(self.groups)

    def __str__(self) -> str:
        rows = [("group", "size", "members")]
        for g in self.groups.values():
            members = ", ".join(f"{m.key}[{m.axis}]" + (f"x{m.block}" if m.block > 1 else "") for m in g.members)
            rows.append((g.name, str(g.size), members))
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows)


def from_groups(
    groups: dict[str, list[tuple[str, int] | tuple[str, int, int]]],
    state_dict: dict[str, torch.Tensor],
    sites: dict[str, list[str]] | None = None,
) -> PermutationSpec:
    """Build a hand-written spec: {group: [(key, axis) or (key, axis, block)]}, checked against a state_dict.

    `sites` optionally maps a group to module names whose outputs (channel dim 1) carry its units, which
    activation-based methods read through forward hooks. Sizes are inferred and must agree.
    """
    out = {}
    for name, entries in groups.items():
        members = tuple(Member(*e) for e in entries)
        sizes = set()
        for m in members:
            if m.key not in state_dict:
                raise KeyError(f"group {name!r}: {m.key!r} is not in the state_dict")
            sizes.add(state_dict[m.key].shape[m.axis] // m.block)
        if len(sizes) != 1:
            raise ValueError(f"group {name!r}: members disagree on the group size: {sorted(sizes)}")
        group_sites = tuple(Site(None, 1, "layer", mod) for mod in (sites or {}).get(name, []))
        out[name] = Group(name, sizes.pop(), members, group_sites)
    return PermutationSpec(out)


# --- tracing -----------------------------------------------------------------------------------------

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
)  # fmt: skip
_ELEMENTWISE_FUNCS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.softplus, F.dropout, F.dropout1d, F.dropout2d, torch.relu,
    torch.sigmoid, torch.tanh, torch.abs, torch.clamp, operator.neg, torch.neg,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_min_",
    "abs", "neg", "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type_as",
}  # fmt: skip
_POOL_FUNCS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}  # fmt: skip
_JOIN_FUNCS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub,
               operator.mul, operator.imul, torch.mul, operator.truediv, torch.div}  # fmt: skip
_JOIN_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_RESHAPE_FUNCS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape"}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax, torch.amin}
_SHAPE_METHODS = {"size", "dim"}
_NORM_MODULES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class _Label:
    """The permuted axis of one traced tensor: union-find variable `var` on axis `dim`, `block` per unit."""

    var: int
    dim: int
    block: int = 1


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)  # the earlier variable names the merged group


class _ScopeTracer(torch.fx.Tracer):
    """A Tracer that remembers which module it was in, so a failure can name it."""

    current = ""

    def call_module(self, m, forward, args, kwargs):
        outer, self.current = self.current, self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.current = outer


def symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    """torch.fx.symbolic_trace, but failures raise UntraceableModelError naming the module, node and line."""
    tracer = _ScopeTracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError... depending on the construct
        last = list(tracer.graph.nodes)[-1].name if tracer.graph.nodes else "<input>"
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename]
        where = f" at {frames[-1].filename}:{frames[-1].lineno} `{frames[-1].line}`" if frames else ""
        module = tracer.current or type(model).__name__
        raise UntraceableModelError(
            f"cannot trace {type(model).__name__} with torch.fx: in module {module!r}, after node {last!r}{where}: "
            f"{type(e).__name__}: {e}. Data-dependent control flow cannot be traced; make it static, or write "
            f"the permutation spec by hand with onebasin.spec.from_groups(...)."
        ) from e
    return torch.fx.GraphModule(model, graph, class_name=type(model).__name__)


class _Tracer:
    """Walks a shape-annotated fx graph once, giving each tensor's permuted axis a union-find variable."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.uf = _UnionFind()
        self.labels: dict[torch.fx.Node, _Label | None] = {}
        self.members: list[tuple[int, Member]] = []
        self.sites: list[tuple[int, Site]] = []
        self.fixed: set[int] = set()
        self.var_names: dict[int, str] = {}
        self.params = dict(gm.named_parameters()) | dict(gm.named_buffers())

    # helpers ------------------------------------------------------------------------------------------
    def shape(self, node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def label(self, arg) -> _Label | None:
        return self.labels.get(arg) if isinstance(arg, torch.fx.Node) else None

    def unsupported(self, node, what: str) -> UnsupportedOpError:
        return UnsupportedOpError(
            f"node {node.name!r} ({what}) touches a permuted axis and onebasin cannot permute through it; "
            f"write the permutation spec by hand (onebasin.spec.from_groups) or change the model."
        )

    def add_member(self, var: int, key: str, axis: int, block: int = 1) -> None:
        if key in self.params:
            self.members.append((var, Member(key, axis, block)))

    def new_var(self, name: str) -> int:
        v = self.uf.new()
        self.var_names[v] = name
        return v

    # the walk -----------------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.labels[node] = None
            elif node.op == "output":
                for n in node.all_input_nodes:
                    if self.label(n) is not None:
                        self.fixed.add(self.label(n).var)  # the network's outputs are never permuted
            elif node.op == "call_module":
                self.labels[node] = self.visit_module(node, self.gm.get_submodule(node.target))
            else:
                self.labels[node] = self.visit_function(node)

    def visit_module(self, node, mod: nn.Module) -> _Label | None:
        inp = self.label(node.args[0]) if node.args else None
        prefix = f"{node.target}."
        if isinstance(mod, nn.Linear):
            return self.visit_weight_layer(node, inp, prefix, in_dim=len(self.shape(node.args[0])) - 1)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if mod.groups != 1:
                if inp is None:
                    return None  # a grouped conv on unpermuted data only needs its own output fixed
                raise self.unsupported(node, f"{type(mod).__name__} with groups={mod.groups}; only groups=1 is supported")
            return self.visit_weight_layer(node, inp, prefix, in_dim=1)
        if inp is None:
            return None  # nothing permuted flows in: this module and its parameters stay as they are
        if isinstance(mod, _NORM_MODULES):
            return self.visit_norm(node, mod, inp, prefix)
        if isinstance(mod, _ELEMENTWISE_MODULES):
            return inp
        if isinstance(mod, nn.PReLU):
            if mod.num_parameters > 1:
                self.add_member(inp.var, prefix + "weight", 0)
            return inp
        if isinstance(mod, _POOL_MODULES):
            return self.require_channel_dim(node, inp)
        if isinstance(mod, nn.Flatten):
            return self.reshaped(node, inp)
        raise self.unsupported(node, f"module {node.target!r} of type {type(mod).__name__}")

    def visit_weight_layer(self, node, inp: _Label | None, prefix: str, in_dim: int) -> _Label:
        """Linear/Conv: output axis 0 of weight and bias is a new group; weight axis 1 joins the input's."""
        if inp is not None:
            if inp.dim != in_dim:
                raise self.unsupported(node, f"a layer reading its features from axis {in_dim}, permuted axis is {inp.dim}")
            self.add_member(inp.var, prefix + "weight", 1, inp.block)
        var = self.new_var(str(node.target))
        self.add_member(var, prefix + "weight", 0)
        self.add_member(var, prefix + "bias", 0)
        out_dim = len(self.shape(node)) - 1 if in_dim != 1 else 1
        self.sites.append((var, Site(node.name, out_dim, "layer", str(node.target))))
        return _Label(var, out_dim)

    def visit_norm(self, node, mod, inp: _Label, prefix: str) -> _Label:
        """Norms are per-channel affine maps: their parameters and running statistics join the input's group."""
        ndim = len(self.shape(node))
        if isinstance(mod, nn.LayerNorm):
            axis = inp.dim - (ndim - len(mod.normalized_shape))
            if axis < 0:
                raise self.unsupported(node, "LayerNorm that does not normalise over the permuted axis")
        else:
            if isinstance(mod, nn.GroupNorm) and mod.num_groups not in (1, mod.num_channels):
                raise self.unsupported(node, f"GroupNorm with {mod.num_groups} groups (only 1 or one per channel)")
            axis = 0
            self.require_channel_dim(node, inp)
        if inp.block != 1:
            raise self.unsupported(node, "a norm layer after a flatten of permuted channels")
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.add_member(inp.var, prefix + name, axis)
        self.move_layer_site(node, inp)
        return inp

    def move_layer_site(self, node, inp: _Label) -> None:
        """A norm directly after a Linear/Conv: read that layer's units after the norm instead."""
        src = node.args[0]
        for i, (var, site) in enumerate(self.sites):
            if site.node == src.name and len(src.users) == 1:
                self.sites[i] = (var, Site(node.name, inp.dim, "layer", str(node.target)))

    def require_channel_dim(self, node, inp: _Label) -> _Label:
        if inp.dim != 1:
            raise self.unsupported(node, f"a channel-wise op on tensors permuted along axis {inp.dim}")
        return inp

    def reshaped(self, node, inp: _Label) -> _Label:
        """flatten/view/reshape: the permuted axis may absorb the trailing axes (channel -> block of features)."""
        src, dst = self.shape(node.args[0]), self.shape(node)
        d = inp.dim
        if src == dst:
            return inp
        if dst[:d] == src[:d] and len(dst) == d + 1 and dst[d] == math.prod(src[d:]):
            return _Label(inp.var, d, inp.block * math.prod(src[d + 1 :]))
        raise self.unsupported(node, f"reshape {src} -> {dst} that moves the permuted axis {d}")

    def visit_function(self, node) -> _Label | None:
        target = node.target
        is_method = node.op == "call_method"
        labelled = [a for a in node.all_input_nodes if self.label(a) is not None]
        if (is_method and target in _JOIN_METHODS) or (not is_method and target in _JOIN_FUNCS):
            return self.join(node)
        if not labelled:
            return None
        inp = self.label(node.args[0])
        if inp is None or len(labelled) > 1:
            raise self.unsupported(node, f"{node.op} {getattr(target, '__name__', target)} on several permuted tensors")
        if (is_method and target in _ELEMENTWISE_METHODS) or (not is_method and target in _ELEMENTWISE_FUNCS):
            return inp
        if not is_method and target in _POOL_FUNCS:
            return self.require_channel_dim(node, inp)
        if (is_method and target in _RESHAPE_METHODS) or (not is_method and target in _RESHAPE_FUNCS):
            return self.reshaped(node, inp)
        if (is_method and target in _REDUCE_METHODS) or (not is_method and target in _REDUCE_FUNCS):
            return self.reduced(node, inp)
        if (is_method and target in _SHAPE_METHODS) or (node.op == "call_function" and target is getattr):
            return None  # shape queries: integers, not permuted tensors
        raise self.unsupported(node, f"{node.op} {getattr(target, '__name__', target)}")

    def reduced(self, node, inp: _Label) -> _Label:
        """mean/sum over axes other than the permuted one keeps the units (shifted if axes vanish)."""
        src, dst = self.shape(node.args[0]), self.shape(node)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None or dst is None:
            raise self.unsupported(node, "a reduction over all axes")
        dims = [d % len(src) for d in ((dims,) if isinstance(dims, int) else dims)]
        if inp.dim in dims:
            raise self.unsupported(node, "a reduction over the permuted axis")
        dim = inp.dim if len(dst) == len(src) else inp.dim - sum(d < inp.dim for d in dims)
        return _Label(inp.var, dim, inp.block)

    def join(self, node) -> _Label | None:
        """Elementwise +,-,*,/: every permuted operand is one group (a residual stream); constants join as members."""
        out_shape = self.shape(node)
        if out_shape is None:
            return None
        operands = [a for a in node.args if isinstance(a, torch.fx.Node) and self.shape(a) is not None]
        labels = [self.label(a) for a in operands]
        aligned = {(lab.dim + len(out_shape) - len(self.shape(a)), lab.block) for a, lab in zip(operands, labels) if lab}
        if not aligned:
            return None
        if len(aligned) > 1:
            raise self.unsupported(node, "an elementwise op joining tensors permuted along different axes")
        dim, block = aligned.pop()
        var = next(lab.var for lab in labels if lab)
        for a, lab in zip(operands, labels):
            if lab is not None:
                self.uf.union(var, lab.var)
                continue
            shape = self.shape(a)
            axis = dim - (len(out_shape) - len(shape))
            if axis < 0 or shape[axis] == 1:
                continue  # broadcast along the permuted axis: nothing to permute
            if a.op == "get_attr":
                self.add_member(var, str(a.target), axis, block)
            else:
                self.fixed.add(var)  # combined with an unpermuted tensor: this group must stay as it is
        if sum(lab is not None for lab in labels) > 1 and node.target in (operator.add, operator.iadd, torch.add, "add", "add_"):
            self.sites.append((var, Site(node.name, dim, "block", None)))
        return _Label(var, dim, block)

    # result ---------------------------------------------------------------------------------------------
    def spec(self) -> PermutationSpec:
        fixed = {self.uf.find(v) for v in self.fixed}
        members: dict[int, list[Member]] = {}
        for var, m in self.members:
            root = self.uf.find(var)
            if root not in fixed and m not in members.setdefault(root, []):
                members[root].append(m)
        sites: dict[int, list[Site]] = {}
        for var, s in self.sites:
            sites.setdefault(self.uf.find(var), []).append(s)
        groups = {}
        for root, ms in sorted(members.items()):
            name = self.var_names[root]
            sizes = {self.params[m.key].shape[m.axis] // m.block for m in ms}
            if len(sizes) != 1:
                raise UnsupportedOpError(f"group {name!r}: members disagree on the number of units: {sorted(sizes)}")
            groups[name] = Group(name, sizes.pop(), tuple(ms), tuple(sites.get(root, ())))
        return PermutationSpec(groups)


def trace(model: nn.Module, example_input: torch.Tensor | tuple) -> PermutationSpec:
    """Discover the permutation groups of `model` by tracing it with torch.fx on `example_input`.

    Args:
        model: any nn.Module built from Linear, Conv (groups=1), BatchNorm/LayerNorm/GroupNorm(1 or C)/
            InstanceNorm, elementwise activations, dropout, pooling, flatten and residual additions.
        example_input: a tensor (or tuple of tensors) of the model's input shape, e.g. (2, 3, 32, 32);
            used once to propagate shapes (flatten block sizes).
    Returns:
        PermutationSpec with one group per independent permutation. Tensors reaching the model's output
        (the classifier's logits) are never permuted.
    Raises:
        UntraceableModelError: torch.fx cannot trace the model (names the module, node and source line).
        UnsupportedOpError: an op that touches a permuted axis is not understood (names the node).
    """
    gm = symbolic_trace(model)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    finally:
        model.train(was_training)
    walker = _Tracer(gm)
    walker.run()
    return walker.spec()
