"""`trace` and its driver: walk a captured ATen graph once, labelling every tensor's permuted axes.

Each hidden axis gets a variable in a union-find (`Vars`). A variable may carry structure: blocks of k
units whose block permutation is another variable (attention heads, conv groups), or a split into
parts (a fused query/key/value projection). Per-op rules (`onebasin.rules`, one table per op family)
read the labels of an op's inputs, add members (weight axes) and sites (where activations are read),
unify variables that must share a permutation, and return the output's label. The driver owns the
variables and turns them into a `PermutationSpec` at the end.

The labels and the union-find of variables are in `onebasin.labels`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch.fx as fx

from ._spec import Group, Layout, Member, PermutationSpec, Site
from .errors import UnsupportedOpError
from .graph import Captured, capture, module_path, shape_of
from .labels import Multi, StructureError, Vars, WeightView, label_vars
from .rules import RULES


# --- the walk ------------------------------------------------------------------------------------------


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
    opaque: dict = field(default_factory=dict)  # weight key -> node of an op without a rule that reads it

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
        """Axis `axis` of weight `key` (and of every key tied to it) follows variable `var` at `layout`.
        `axis` None (a slice of the weight, or a new axis) raises StructureError, which names the node."""
        if axis is None:
            raise StructureError(f"a slice of weight {key!r} on an axis that a permutation would move")
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
        self._fix_opaque_weights()
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

    def _fix_opaque_weights(self) -> None:
        """A weight read by an op without a rule (spectral_norm's sigma = u . (W v) with buffers u, v) feeds
        a value onebasin cannot permute along: every axis of that weight keeps its units in place."""
        for var, m in self.members:
            if m.key in self.opaque:
                self.vars.fix(var)
                self.notes.append(f"{self.opaque[m.key]}: reads weight {m.key!r} without a permutation rule: kept in place")

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
    for a in node.all_input_nodes:
        if t.weight(a) is not None:
            t.opaque.setdefault(t.weight(a).key, node.name)
    if not labelled:
        return None
    op = str(getattr(node.target, "__name__", node.target))
    if t.unknown == "fix":
        for a in labelled:
            t.fix_label(t.label(a), node, f"no rule for {op}: its inputs stay unpermuted")
        return None
    raise t.refuse(node, f"{op} has no permutation rule")


def trace(model, example_input, *, unknown: str = "refuse") -> PermutationSpec:
    """Discover the permutation groups of `model` from its graph on `example_input` (torch.export).

    Args:
        model: any nn.Module (a Hugging Face model too); evaluated in eval mode, its mode restored.
        example_input: the model's input: a tensor (N, ...) (N >= 2 keeps the batch axis dynamic), a
            tuple of positional inputs, or a dict of keyword inputs such as {"input_ids": ...}.
        unknown: "refuse" (default) raises UnsupportedOpError at an op without a permutation rule
            that touches a permuted tensor; "fix" keeps that tensor's units in place instead and says
            so in `spec.notes` (always correct, possibly fewer groups).
    Returns:
        PermutationSpec with one group per independent permutation, attention heads and grouped convs
        as structured groups. Tensors reaching the model's outputs are never permuted.
    Raises:
        InputMismatchError: the input does not fit the model (dtype, device, shape).
        UntraceableModelError: torch.export cannot follow the model (names the error and source line).
        UnsupportedOpError: an op touching a permuted axis has no rule (names the node and op).
    """
    if unknown not in ("refuse", "fix"):
        raise ValueError(f"unknown must be 'refuse' or 'fix', got {unknown!r}")
    walker = Tracer(capture(model, example_input), unknown)
    walker.run()
    return walker.spec()
