"""The tracer's vocabulary: labels (where a tensor's permuted units are) and the union-find of variables.

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

Below both the driver (`onebasin.tracer`) and the per-op rules (`onebasin.rules`), which import it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ._spec import Layout

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


def label_vars(label) -> list[int]:
    if isinstance(label, Axis):
        return [s.var for s in label.segs]
    if isinstance(label, Heads):
        return [label.var]
    if isinstance(label, (Parts, Multi)):
        items = label.parts if isinstance(label, Parts) else label.items
        return [v for p in items if p is not None for v in label_vars(p)]
    return []



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
