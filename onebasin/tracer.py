"""The driver behind `spec.trace`: walk a captured ATen graph once, labelling every tensor's permuted axes.

Each hidden axis gets a variable in a union-find (`Vars`). A variable may carry structure: blocks of k
units whose block permutation is another variable (attention heads, conv groups), or a split into
parts (a fused query/key/value projection). Per-op rules (`onebasin.rules`, one table per op family)
read the labels of an op's inputs, add members (weight axes) and sites (where activations are read),
unify variables that must share a permutation, and return the output's label. The driver owns the
variables and turns them into a `PermutationSpec` at the end.

A label says where a tensor's units are:
* `Axis(dim, segs)`: along axis `dim`, one or more segments, each the units of one variable laid out
  by a `spec.Layout` (a concatenation has several);
* `Heads(var, head_dim, inner_dim, heads)`: a structured variable split over two axes, its block (head)
  index on `head_dim` at the positions `heads` gives (several per head when query heads share key/value
  heads) and the unit inside the block on `inner_dim`;
* `Parts(dim, parts)`: axis `dim` selects one of several differently labelled slices (q, k, v);
* `Multi(items)`: the outputs of an op returning several tensors;
* `WeightView(key, axes)`: not permuted yet, but a view of the weight `key` (axes[i]: the weight axis
  that tensor axis i reads, None if none), so that where it meets a permuted tensor the weight becomes a
  member (class tokens, position embeddings, layer scales, relative position bias tables);
* `Pieces(dim, items)`: weights and constants concatenated along `dim` (a bias built by `cat`); kept apart
  in `Tracer.pieces` (the node's label is None), read only by a layer taking it as its bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch.fx as fx

from .errors import UnsupportedOpError
from .graph import Captured, capture, shape_of
from .spec import Group, Layout, Member, PermutationSpec, Site

# --- labels --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seg:
    """The units of variable `var` on an axis, at the positions `layout` gives."""

    var: int
    layout: Layout


@dataclass(frozen=True)
class Axis:
    """A tensor's axis `dim` holds the units of one or more variables (a direct sum of `segs`)."""

    dim: int
    segs: tuple[Seg, ...]


@dataclass(frozen=True)
class Heads:
    """An axis split into heads: the head index on `head_dim`, the inside of each head (variable `var`) on
    `inner_dim`."""

    var: int
    head_dim: int
    inner_dim: int
    heads: Layout  # positions of each block (head) on head_dim


@dataclass(frozen=True)
class Parts:
    """Axis `dim` indexes parts (q, k, v of a fused projection viewed as (3, C)): part i, once picked out
    (select, unbind), has the label `parts[i]`."""

    dim: int
    parts: tuple


@dataclass(frozen=True)
class Multi:
    """One label per output of a node with several outputs (max with indices, native norms)."""

    items: tuple


@dataclass(frozen=True)
class WeightView:
    key: str
    axes: tuple[int | None, ...]


@dataclass(frozen=True)
class Pieces:
    """Not permuted: weights (and constants) concatenated along axis `dim`, e.g. BEiT's bias
    cat(q_bias, zeros, v_bias); items are (offset, length, WeightView or the constant's node)."""

    dim: int
    items: tuple


def plain_axis(var: int, dim: int, units: int) -> Axis:
    return Axis(dim, (Seg(var, Layout.plain(units)),))


def label_dims(label) -> set[int]:
    """The tensor axes a label permutes."""
    if isinstance(label, Axis):
        return {label.dim}
    if isinstance(label, Heads):
        return {label.head_dim, label.inner_dim}
    if isinstance(label, Parts):
        return {label.dim} | set().union(*(label_dims(p) for p in label.parts if p is not None))
    return set()


def remap(label, dims: dict[int, int]):
    """The label with every tensor axis d renamed dims[d] (all of its axes must be in `dims`)."""
    if isinstance(label, Axis):
        return replace(label, dim=dims[label.dim])
    if isinstance(label, Heads):
        return replace(label, head_dim=dims[label.head_dim], inner_dim=dims[label.inner_dim])
    if isinstance(label, Parts):
        return Parts(dims[label.dim], tuple(None if p is None else remap(p, dims) for p in label.parts))
    if isinstance(label, WeightView):
        raise TypeError("remap a WeightView with view_axes")
    return label


# --- variables -----------------------------------------------------------------------------------------


class StructureError(Exception):
    """Two constraints on one axis that no permutation family here can satisfy (the caller names the node)."""


@dataclass
class Var:
    name: str
    size: int
    parent: int
    fixed: bool = False
    block: int = 1  # > 1: blocks of `block` units, moved by variable `heads`
    heads: int | None = None
    inner: bool = True
    parts: list[tuple[int, int]] | None = None  # a direct sum: [(variable, offset)]
    used: bool = False  # a member, a site or a union refers to it (block variables only need this)


class Vars:
    """Union-find over hidden-axis variables with block structure and direct sums."""

    def __init__(self) -> None:
        self.v: list[Var] = []

    def new(self, name: str, size: int) -> int:
        self.v.append(Var(name, size, len(self.v)))
        return len(self.v) - 1

    def find(self, a: int) -> int:
        while self.v[a].parent != a:
            self.v[a].parent = self.v[self.v[a].parent].parent
            a = self.v[a].parent
        return a

    def root(self, a: int) -> Var:
        return self.v[self.find(a)]

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        a, b = min(a, b), max(a, b)  # the earlier variable names the merged group
        va, vb = self.v[a], self.v[b]
        va.used = vb.used = True
        if va.size != vb.size:
            raise StructureError(f"tensors with {va.size} and {vb.size} units must share one permutation")
        if va.parts or vb.parts:
            self._union_parts(a, b)
            return
        if va.block > 1 and vb.block > 1 and va.block != vb.block:
            raise StructureError(f"blocks of {va.block} and of {vb.block} units on one axis")
        vb.parent = a
        if vb.block > 1:
            if va.block > 1:
                self.union(va.heads, vb.heads)
            else:
                va.block, va.heads = vb.block, vb.heads
            va.inner = va.inner and vb.inner
        if vb.fixed:
            self.fix(a)

    def _union_parts(self, a: int, b: int) -> None:
        """Union of two axes of which one at least is a direct sum: both are cut at every edge of either's
        parts (nested parts where needed), then matching pieces are united."""
        edges = sorted(set(self._edges(a)) | set(self._edges(b)))
        pa, pb = self._cut(a, edges), self._cut(b, edges)
        self.v[b].parent = a
        for x, y in zip(pa, pb):
            self.union(x, y)

    def _edges(self, a: int, offset: int = 0) -> list[int]:
        """Offsets of the edges of every (nested) part of `a`, 0 and its size included."""
        r = self.root(a)
        if not r.parts:
            return [offset, offset + r.size]
        return [e for p, o in r.parts for e in self._edges(p, offset + o)]

    def _cut(self, a: int, edges: list[int]) -> list[int]:
        """The variables of the consecutive pieces of `a` between `edges` (splitting parts where needed)."""
        r = self.root(a)
        inner = [e for e in edges if 0 < e < r.size]
        if not inner:
            return [self.find(a)]
        if not r.parts:
            bounds = [0, *inner, r.size]
            return self.split(a, [y - x for x, y in zip(bounds, bounds[1:])])
        return [v for p, o in list(r.parts) for v in self._cut(p, [e - o for e in edges])]

    def part_sizes(self, a: int) -> list[int]:
        r = self.root(a)
        return [self.root(p).size for p, _ in r.parts] if r.parts else [r.size]

    def split(self, a: int, sizes: list[int]) -> list[int]:
        """The variables of consecutive parts of `sizes` units (making `a` a direct sum if it is not one)."""
        r = self.root(a)
        if r.parts:
            have = self.part_sizes(a)
            if have == sizes or len(sizes) == 1:
                return [p for p, _ in r.parts] if len(sizes) > 1 else [self.find(a)]
            raise StructureError(f"split into {sizes} of an axis already split into {have}")
        if len(sizes) == 1:
            return [self.find(a)]
        if r.block > 1:
            raise StructureError(f"split into {sizes} of an axis with blocks of {r.block}")
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        parts = [self.new(f"{r.name}.{i}", s) for i, s in enumerate(sizes)]
        r.parts = list(zip(parts, offsets))
        if r.fixed:
            for p in parts:
                self.fix(p)
        return parts

    def structure(self, a: int, blocks: int) -> int:
        """Give `a` `blocks` equal blocks; returns the variable that permutes the blocks (the heads)."""
        r = self.root(a)
        if r.size % blocks:
            raise StructureError(f"{r.size} units cannot form {blocks} equal blocks")
        k = r.size // blocks
        if k == 1:
            return self.find(a)
        if r.parts:
            raise StructureError(f"blocks of {k} units on an axis split into parts")
        if r.block > 1:
            if r.block != k:
                raise StructureError(f"blocks of {k} units on an axis that already has blocks of {r.block}")
            return self.find(r.heads)
        r.block, r.heads = k, self.new(f"{r.name}.blocks", blocks)
        if r.fixed:
            self.fix(r.heads)
        return r.heads

    def unstructure(self, a: int) -> bool:
        """Drop `a`'s block structure if nothing else uses its block variable; whether it could."""
        r = self.root(a)
        if r.block == 1:
            return True
        h = self.v[r.heads]
        if h.parent != r.heads or h.fixed or h.used:
            return False
        r.block, r.heads = 1, None
        return True

    def fix(self, a: int) -> None:
        """Keep `a`'s units in place (its permutation is the identity)."""
        r = self.root(a)
        if r.fixed:
            return
        r.fixed = True
        r.inner = False
        for p, _ in r.parts or ():
            self.fix(p)
        if r.heads is not None:
            self.fix(r.heads)

    def fix_inner(self, a: int) -> None:
        """Keep the units inside each block of `a` in place (blocks may still move)."""
        r = self.root(a)
        if r.block > 1:
            r.inner = False
        else:
            self.fix(a)


# --- the walk ------------------------------------------------------------------------------------------


def module_path(node: fx.Node) -> str | None:
    """The state_dict prefix of the module that made `node` (from export's nn_module_stack), or None."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].").removeprefix("L__self__.") or None


@dataclass
class Tracer:
    """State of one walk: the captured graph, variables, labels, members, sites and notes."""

    captured: Captured
    unknown: str = "refuse"
    vars: Vars = field(default_factory=Vars)
    labels: dict = field(default_factory=dict)
    members: list[tuple[int, Member]] = field(default_factory=list)
    sites: list[tuple[int, Site]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shapes: dict = field(default_factory=dict)  # state_dict key -> shape
    pending_norms: dict = field(default_factory=dict)  # multi-output norm node -> its input (for site moves)
    varying: dict = field(default_factory=dict)  # unpermuted node -> axes along which its value may vary
    pieces: dict = field(default_factory=dict)  # cat node of weights and constants -> Pieces
    standardized: dict = field(default_factory=dict)  # batch_norm node standardising a weight -> (key, gain view)
    companions: dict = field(default_factory=dict)  # (key, axis) -> [(key, axis)] that move with it (a gain)

    # helpers for rules -----------------------------------------------------------------------------------
    def shape(self, node) -> tuple[int, ...] | None:
        return shape_of(node)

    def label(self, arg):
        """The activation label of an argument (None when unpermuted or not a node; WeightView excluded)."""
        lab = self.labels.get(arg) if isinstance(arg, fx.Node) else None
        return None if isinstance(lab, WeightView) else lab

    def constant(self, arg):
        """The value of a constant input of the graph (a non-persistent buffer, a lifted tensor), else None."""
        if not isinstance(arg, fx.Node) or arg.op != "placeholder":
            return None
        spec = next((s for s in self.captured.program.graph_signature.input_specs if s.arg.name == arg.name), None)
        return self.captured.program.constants.get(spec.target) if spec is not None and spec.target else None

    def weight(self, arg) -> WeightView | None:
        lab = self.labels.get(arg) if isinstance(arg, fx.Node) else None
        return lab if isinstance(lab, WeightView) else None

    def key(self, arg) -> str | None:
        """The state_dict key of a weight placeholder argument, else None."""
        return self.captured.keys.get(arg.name) if isinstance(arg, fx.Node) and arg.op == "placeholder" else None

    def new_var(self, node: fx.Node, size: int, name: str | None = None) -> int:
        return self.vars.new(name or module_path(node) or node.name, size)

    def add_member(self, var: int, key: str, axis: int, layout: Layout | None = None, diag: bool = False) -> None:
        """Axis `axis` of weight `key` (and of every key tied to it) follows variable `var` at `layout`."""
        self.vars.root(var).used = True
        length = self.shapes[key][axis]
        layout = layout or Layout.plain(length if diag else self.vars.root(var).size, 1)
        for k in self.captured.aliases.get(key, (key,)):
            self.members.append((var, layout.member(k, axis, length, diag)))
        for other, other_axis in self.companions.get((key, axis), ()):
            self.add_member(var, other, other_axis, layout, diag)

    def add_site(self, var: int, node: fx.Node, dim: int, kind: str = "layer") -> None:
        self.sites.append((var, Site(node.name, dim, kind, module_path(node) if kind != "block" else None)))

    def refuse(self, node: fx.Node, why: str) -> UnsupportedOpError:
        return UnsupportedOpError(
            f"node {node.name!r} ({why}) touches a permuted axis and onebasin cannot permute through it; "
            f"write the permutation spec by hand (onebasin.spec.from_groups) or change the model."
        )

    def fix_label(self, label, node: fx.Node | None = None, why: str = "") -> None:
        """Keep every unit of a labelled tensor in place."""
        for var in label_vars(label):
            self.vars.fix(var)
        if node is not None and why:
            self.notes.append(f"{node.name}: {why}")

    def unify(self, node: fx.Node, a: int, b: int) -> None:
        try:
            self.vars.union(a, b)
        except StructureError as err:
            raise self.refuse(node, str(err)) from None

    # the walk ---------------------------------------------------------------------------------------------
    def run(self) -> None:
        self.shapes = {k: tuple(v.shape) for k, v in self.captured.model.state_dict().items()}
        for node in self.captured.graph.nodes:
            if node.op == "placeholder":
                key = self.key(node)
                shape = self.shape(node)
                stored = key in self.shapes  # a non-persistent buffer is a constant: it cannot be permuted
                self.labels[node] = WeightView(key, tuple(range(len(shape)))) if stored and shape is not None else None
            elif node.op == "output":
                for n in self.captured.user_outputs():
                    self.fix_label(self.label(n))  # the network's outputs are never permuted
            else:
                self.visit(node)

    def visit(self, node: fx.Node) -> None:
        """Label one call_function node by its rule (unknown ops: `default_rule`)."""
        from .rules import RULES

        if node.op != "call_function":
            self.labels[node] = None
            return
        rule = RULES.get(node.target)
        if rule is None:
            rule = RULES.get(getattr(node.target, "overloadpacket", None), default_rule)
        try:
            self.labels[node] = rule(self, node)
        except StructureError as err:
            raise self.refuse(node, str(err)) from None

    def walk(self, graph: fx.Graph, inputs: list, module_stack=None):
        """Label a small graph (a composite op's decomposition) whose placeholders carry `inputs`' labels;
        returns the label of its output (Multi for several)."""
        placeholders = iter(inputs)
        for node in graph.nodes:
            if node.op == "placeholder":
                self.labels[node] = next(placeholders)
            elif node.op == "output":
                outs = node.args[0]
                if not isinstance(outs, (tuple, list)):
                    return self.labels.get(outs)
                labels = tuple(self.labels.get(o) for o in outs)
                return labels[0] if len(labels) == 1 else Multi(labels)
            else:
                if module_stack:
                    node.meta["nn_module_stack"] = module_stack
                self.visit(node)
        return None

    # result -----------------------------------------------------------------------------------------------
    def spec(self) -> PermutationSpec:
        self._unify_shared_members()
        members: dict[int, list[Member]] = {}
        for var, m in self.members:
            for v, mm in self._distribute(var, m):
                r = self.vars.find(v)
                if not self.vars.v[r].fixed and mm not in members.setdefault(r, []):
                    members[r].append(mm)
        sites: dict[int, list[Site]] = {}
        for var, site in self.sites:
            for v, s in self._distribute_site(var, site):
                r = self.vars.find(v)
                if s not in sites.setdefault(r, []):
                    sites[r].append(s)
        roots = self._group_roots(members)
        names = _unique_names({r: self.vars.v[r].name for r in roots})
        state = self.captured.model.state_dict()
        groups = {}
        for r in roots:
            v = self.vars.v[r]
            heads = self.vars.find(v.heads) if v.block > 1 else None
            parent = names.get(heads) if heads is not None and not self.vars.v[heads].fixed else None
            ms = tuple(members.get(r, ()))
            _check_sizes(names[r], v.size, ms, state)
            groups[names[r]] = Group(names[r], v.size, ms, tuple(sites.get(r, ())), v.block, parent,
                                     v.inner, v.block > 1 and parent is None)  # fmt: skip
        return PermutationSpec(_parents_first(groups), tuple(dict.fromkeys(self.notes)), self.captured)

    def _unify_shared_members(self) -> None:
        """One tensor axis has one permutation: variables that own the same member are one (a module
        called twice, tied weights read in two places)."""
        owner: dict[Member, int] = {}
        for var, m in self.members:
            if m in owner:
                self.vars.union(owner[m], var)
            else:
                owner[m] = var

    def _distribute(self, var: int, m: Member) -> list[tuple[int, Member]]:
        """A member of a direct sum, as members of its parts (offsets added to its layout)."""
        r = self.vars.root(var)
        if not r.parts:
            return [(var, m)]
        if m.diag or (m.layout is not None and not (len(m.layout.unit_shape) == 1)):
            raise UnsupportedOpError(f"{m.key}: a split of an axis with a non-contiguous layout")
        lay = m.layout or Layout.plain(r.size, m.block)
        step = lay.unit_strides[0]
        out = []
        for p, offset in r.parts:
            size = self.vars.root(p).size
            part = replace(lay, start=lay.start + offset * step, unit_shape=(size,))
            out += self._distribute(p, part.member(m.key, m.axis, self.shapes[m.key][m.axis]))
        return out

    def _distribute_site(self, var: int, site: Site) -> list[tuple[int, Site]]:
        """A site of a direct sum, as sites of its parts (each a slice of the tensor's axis)."""
        r = self.vars.root(var)
        if not r.parts:
            return [(var, site)]
        out = []
        for p, offset in r.parts:
            size = self.vars.root(p).size
            out += self._distribute_site(p, replace(site, start=site.start + offset, size=size))
        return out

    def _group_roots(self, members: dict[int, list[Member]]) -> list[int]:
        """Roots that become groups: unfixed ones with members, and the block variables they need."""
        roots = {r for r in members if not self.vars.v[r].parts}
        for r in list(roots):
            v = self.vars.v[r]
            while v.block > 1 and not self.vars.root(v.heads).fixed:
                h = self.vars.find(v.heads)
                roots.add(h)
                v = self.vars.v[h]
        return sorted(roots)


def label_vars(label) -> list[int]:
    if isinstance(label, Axis):
        return [s.var for s in label.segs]
    if isinstance(label, Heads):
        return [label.var]
    if isinstance(label, (Parts, Multi)):
        items = label.parts if isinstance(label, Parts) else label.items
        return [v for p in items if p is not None for v in label_vars(p)]
    return []


def _unique_names(names: dict[int, str]) -> dict[int, str]:
    seen: dict[str, int] = {}
    out = {}
    for r, name in names.items():
        seen[name] = seen.get(name, 0) + 1
        out[r] = name if seen[name] == 1 else f"{name}#{seen[name]}"
    return out


def _parents_first(groups: dict[str, Group]) -> dict[str, Group]:
    out: dict[str, Group] = {}

    def add(g: Group) -> None:
        if g.name in out:
            return
        if g.parent is not None:
            add(groups[g.parent])
        out[g.name] = g

    for g in groups.values():
        add(g)
    return out


def _check_sizes(name: str, size: int, members: tuple[Member, ...], state: dict) -> None:
    for m in members:
        if m.diag or m.key not in state:
            continue
        units = m.layout.units if m.layout is not None else state[m.key].shape[m.axis] // m.block
        if units != size:
            raise UnsupportedOpError(f"group {name!r}: {m} has {units} units, the group {size}")


def default_rule(t: Tracer, node: fx.Node):
    """An op without a rule: fine when nothing permuted flows in; otherwise refuse (or fix, unknown='fix')."""
    labelled = [a for a in node.all_input_nodes if t.label(a) is not None]
    if not labelled:
        return None
    op = str(getattr(node.target, "__name__", node.target))
    if t.unknown == "fix":
        for a in labelled:
            t.fix_label(t.label(a), node, f"no rule for {op}: its inputs stay unpermuted")
        return None
    raise t.refuse(node, f"{op} has no permutation rule")


def trace_graph(model, example_input, *, unknown: str = "refuse") -> PermutationSpec:
    """`spec.trace`: capture the model, walk its graph, return the PermutationSpec."""
    if unknown not in ("refuse", "fix"):
        raise ValueError(f"unknown must be 'refuse' or 'fix', got {unknown!r}")
    walker = Tracer(capture(model, example_input), unknown)
    walker.run()
    return walker.spec()
