"""The permutation spec's data classes, pure data (documented in `onebasin.spec`, which re-exports them
with `trace`). Below the tracer and its rules, which build these classes."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Layout:
    """Where a group's units lie on one tensor axis when it is not `block` consecutive positions per unit.

    Unit u, written as a multi-index over `unit_shape` (row-major), owns the positions
    start + sum_i u_i * unit_strides[i] + sum_j c_j * carry_strides[j] for every multi-index c over
    `carry_shape`. Examples: a concatenation puts a group at an offset (start); a channel shuffle
    interleaves two groups (unit_strides (2,)); grouped-query attention repeats each key/value head's
    units for the query heads that read it (carry_shape (g,)).
    """

    start: int
    unit_shape: tuple[int, ...]
    unit_strides: tuple[int, ...]
    carry_shape: tuple[int, ...] = ()
    carry_strides: tuple[int, ...] = ()

    @property
    def units(self) -> int:
        n = 1
        for s in self.unit_shape:
            n *= s
        return n

    def positions(self) -> torch.Tensor:
        """(units, positions per unit) LongTensor of axis positions."""
        idx = torch.tensor([self.start])
        for size, stride in zip(self.unit_shape + self.carry_shape, self.unit_strides + self.carry_strides):
            idx = (idx[..., None] + torch.arange(size) * stride).reshape(*idx.shape, size)
        return idx.reshape(self.units, -1)

    @staticmethod
    def plain(units: int, block: int = 1, start: int = 0) -> "Layout":
        """Unit u owns positions start + [u*block, (u+1)*block)."""
        return Layout(start, (units,), (block,), (block,) if block > 1 else (), (1,) if block > 1 else ())

    def member(self, key: str, axis: int, length: int, diag: bool = False) -> "Member":
        """A Member of axis `axis` (of `length` positions) of tensor `key` at this layout."""
        if self.covers(length):
            return Member(key, axis, self.block_size(), None, diag)
        return Member(key, axis, 1, self, diag)

    def is_plain(self) -> bool:
        """Whether unit u owns the `block_size()` consecutive positions from start + u * block_size()."""
        return self == Layout.plain(self.units, self.block_size(), self.start)

    def block_size(self) -> int:
        return self.carry_shape[0] if len(self.carry_shape) == 1 else 1

    def covers(self, length: int) -> bool:
        """Whether this is the plain layout of a whole axis of `length` positions (a `Member.block`)."""
        return self.start == 0 and self.is_plain() and self.units * self.block_size() == length


@dataclass(frozen=True)
class Member:
    """Axis `axis` of tensor `key` (a state_dict name) is indexed by the group's units.

    `block` > 1 means unit c owns the `block` consecutive indices [c*block, (c+1)*block) of that axis
    (a conv channel flattened into a linear layer's inputs). `layout` replaces that rule for any other
    arrangement (see `Layout`). `diag` marks the input axis of a grouped convolution (weight
    (Cout, Cin/g, ...)): the axis holds the index inside a conv group, and the group of each row is
    the one of its output channel (axis 0), so only the inside-group part of the permutation applies.
    """

    key: str
    axis: int
    block: int = 1
    layout: Layout | None = None
    diag: bool = False

    def positions(self, units: int) -> torch.Tensor:
        """(units, positions per unit) LongTensor: the axis positions each unit owns."""
        return self.layout.positions() if self.layout is not None else Layout.plain(units, self.block).positions()

    def __str__(self) -> str:
        extra = f"x{self.block}" if self.block > 1 else ""
        if self.layout is not None:
            extra += f"@{self.layout.start}+{self.layout.units}" + ("" if self.layout.is_plain() else "~")
        return f"{self.key}[{self.axis}]{extra}" + ("(in-group)" if self.diag else "")


@dataclass(frozen=True)
class Site:
    """A tensor in the forward pass whose axis `dim` holds the group's units (where activations are read).

    `node` is the name of a node of the captured graph (`onebasin.graph.capture`); `module` is the
    module whose output it is (None for a residual addition; a hand-written spec may give a module
    only, read with a forward hook). `kind` is "layer" (output of a Linear/Conv, or of the norm layer
    directly after it) or "block" (output of a residual addition). `sums.site_matrix` reads its units.
    """

    node: str | None
    dim: int
    kind: str = "layer"
    module: str | None = None
    start: int = 0  # the group's units are positions [start, start + size) of axis `dim` (a part of a
    size: int | None = None  # fused projection, e.g. the query block of a qkv Linear); None: the whole axis


@dataclass(frozen=True)
class Group:
    """One permutation: `size` units, the tensor axes it acts on, and where its units can be observed.

    block, parent, inner, fixed_blocks: the block structure (module docstring); block = 1 is a free
    permutation of all units.
    """

    name: str
    size: int
    members: tuple[Member, ...]
    sites: tuple[Site, ...] = ()
    block: int = 1
    parent: str | None = None
    inner: bool = True
    fixed_blocks: bool = False

    @property
    def blocks(self) -> int:
        return self.size // self.block

    @property
    def structured(self) -> bool:
        return self.block > 1

    def describe(self) -> str:
        """'free', or e.g. '4 blocks of 16 (blocks from heads, free inside)'."""
        if not self.structured:
            return "free"
        moves = f"blocks from {self.parent}" if self.parent else ("blocks fixed" if self.fixed_blocks else "blocks free")
        return f"{self.blocks} blocks of {self.block} ({moves}, {'free' if self.inner else 'fixed'} inside)"


@dataclass(frozen=True)
class PermutationSpec:
    """All permutation groups of a network, in forward order (a parent before its children).

    Keys are state_dict names. `notes` says which parts of the network were left unpermuted and why
    (e.g. an input to an op whose units must stay in place). `graph` is the captured graph the sites'
    node names refer to (None for a hand-written spec); it is not part of the spec's identity.
    """

    groups: dict[str, Group] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    graph: object = field(default=None, compare=False, repr=False)

    @functools.cached_property
    def members_of(self) -> dict[str, list[tuple[str, Member]]]:
        """key -> [(group name, member)] for every permuted tensor (the inverse view; built once: read, do not change)."""
        out: dict[str, list[tuple[str, Member]]] = {}
        for g in self.groups.values():
            for m in g.members:
                out.setdefault(m.key, []).append((g.name, m))
        return out

    @functools.cached_property
    def axes_of(self) -> dict[str, list[tuple[int, str, int]]]:
        """key -> [(axis, group name, block)]: the view for plain members (see `members_of` for all)."""
        return {k: [(m.axis, g, m.block) for g, m in ms] for k, ms in self.members_of.items()}

    def children(self, name: str) -> list[Group]:
        """Groups whose block permutation is group `name`'s permutation."""
        return [g for g in self.groups.values() if g.parent == name]

    def __len__(self) -> int:
        return len(self.groups)

    def __str__(self) -> str:
        rows = [("group", "size", "structure", "members")]
        for g in self.groups.values():
            rows.append((g.name, str(g.size), g.describe(), ", ".join(str(m) for m in g.members) or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


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
