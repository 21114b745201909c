"""How a label goes through a reshape (view, flatten, unflatten): where each unit's positions land
in the new shape, as a layout, block structure (heads) or parts; used by `movement.reshape`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch.fx as fx

from ..labels import Axis, Heads, Parts, Seg, StructureError, WeightView, label_dims, remap
from ._common import fit_layout, seg_positions

if TYPE_CHECKING:  # annotations only: the tracer imports the rules
    from ..tracer import Tracer


def reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Minimal groups of consecutive source and destination axes with equal sizes (size-1 axes alone)."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        si, dj, ps, pd = [i], [j], src[i], dst[j]
        i, j = i + 1, j + 1
        while ps != pd:
            if ps < pd:
                ps *= src[i]
                si.append(i)
                i += 1
            else:
                pd *= dst[j]
                dj.append(j)
                j += 1
        groups.append((si, dj))
    return groups


def _flat(src: tuple[int, ...], dims: list[int], coord_of: dict[int, np.ndarray]) -> np.ndarray:
    """Flat positions (units, r) in the space of axes `dims`: given coordinate arrays (units, r_d) on some
    axes, every value on the others (carried)."""
    strides = {d: math.prod(src[e] for e in dims[k + 1 :]) for k, d in enumerate(dims)}
    units = next(iter(coord_of.values())).shape[0]
    flat = np.zeros((units, 1), dtype=np.int64)
    for d in dims:
        vals = coord_of[d] if d in coord_of else np.broadcast_to(np.arange(src[d]), (units, src[d]))
        flat = (flat[:, :, None] + vals[:, None, :] * strides[d]).reshape(units, -1)
    return flat


def _unit_dims(coords, dst_dims) -> list[int]:
    """Destination axes (indices into dst_dims) whose coordinate sets differ between units."""
    out = []
    for k, _ in enumerate(dst_dims):
        c = np.sort(coords[k], axis=1)
        if not (c == c[:1]).all():
            out.append(k)
    return out


def _per_unit(c: np.ndarray) -> np.ndarray:
    """(units, r') unique sorted values per row (each row must have the same count)."""
    s = np.sort(c, axis=1)
    keep = np.ones(s.shape, dtype=bool)
    keep[:, 1:] = s[:, 1:] != s[:, :-1]
    counts = keep.sum(1)
    if (counts != counts[0]).any():
        raise StructureError("a reshape that spreads units unevenly")
    return s[keep].reshape(len(s), counts[0])


def _constants(coords, udims: list[int], dst_dims: list[int]) -> dict[int, int]:
    """{destination axis: value} for the axes where every one of these positions has the same coordinate."""
    out = {}
    for k, d in enumerate(dst_dims):
        if k not in udims and coords[k].min() == coords[k].max() and len(dst_dims) > 1:
            out[d] = int(coords[k].flat[0])
    return out


def map_positions(t: Tracer, node, var: int, flat: np.ndarray, dst: tuple[int, ...], dst_dims: list[int], prefer: int | None = None):
    """(label, constants) of one variable's units at flat positions (units, r) of a group, after viewing the
    group as the destination axes `dst_dims`. The label is Axis or Heads (Parts for a split into parts);
    constants are the axes on which all its positions share one coordinate {axis: value}. A variable of one
    unit lies on axis `prefer` (that of the tensor's other pieces), else on the last axis."""
    coords = np.unravel_index(flat, tuple(dst[d] for d in dst_dims))
    udims = _unit_dims(coords, dst_dims)
    units = flat.shape[0]
    if len(udims) == 0 and units == 1:
        udims = [dst_dims.index(prefer) if prefer in dst_dims else len(dst_dims) - 1]
    consts = _constants(coords, udims, dst_dims)
    if len(udims) == 0:
        raise StructureError("a reshape that makes units indistinguishable")
    if len(udims) == 1:
        k = udims[0]
        lay = fit_layout(_per_unit(coords[k]))
        if lay is None or lay.units != units:
            raise StructureError("a reshape giving units an irregular layout")
        return Axis(dst_dims[k], (Seg(var, lay),)), consts
    outer, innermost = udims[0], udims[-1]
    first = _per_unit(coords[outer])
    if len(udims) == 3:  # (parts, heads, inside): a fused projection split into q, k, v and heads
        p = int(first.max()) + 1
        size = units // p
        if first.shape[1] != 1 or not (first[:, 0] == np.arange(units) // size).all():
            raise StructureError("a reshape that splits units into interleaved parts")
        parts = t.vars.split(var, [size] * p)
        labels = [map_positions(t, node, part, flat[i * size : (i + 1) * size], dst, dst_dims)[0] for i, part in enumerate(parts)]
        return Parts(dst_dims[outer], tuple(labels)), consts
    inner = _per_unit(coords[innermost])
    k = int(inner.max()) + 1
    if inner.shape[1] != 1 or not (inner[:, 0] == np.arange(units) % k).all() or units % k:
        raise StructureError("a reshape that splits units irregularly")
    heads_pos = first.reshape(units // k, k, -1)
    if not (heads_pos == heads_pos[:, :1]).all():
        raise StructureError("a reshape that splits heads irregularly")
    lay = fit_layout(heads_pos[:, 0])
    if lay is None or lay.units != units // k:
        raise StructureError("a reshape giving heads an irregular layout")
    t.vars.structure(var, units // k)
    return Heads(var, dst_dims[outer], dst_dims[innermost], lay), consts


def reshape_label(t: Tracer, node: fx.Node, label, src: tuple[int, ...], dst: tuple[int, ...]):
    """The label of a reshaped tensor (view, reshape, flatten, unflatten)."""
    groups = reshape_groups(src, dst)
    group_of = {d: g for g in groups for d in g[0]}
    if isinstance(label, WeightView):
        axes = [None] * len(dst)
        for si, dj in groups:
            if len(si) == 1 and len(dj) == 1:
                axes[dj[0]] = label.axes[si[0]]
            elif any(label.axes[d] is not None and src[d] != 1 for d in si):  # dropping a size-1 axis loses nothing
                return None
        return WeightView(label.key, tuple(axes))
    untouched = {d: group_of[d][1][0] for d in range(len(src)) if len(group_of[d][0]) == 1 and len(group_of[d][1]) == 1}
    if all(d in untouched for d in label_dims(label)):
        return remap(label, untouched)
    if isinstance(label, Heads) and group_of[label.head_dim] is not group_of[label.inner_dim]:
        return _reshape_heads_axis(t, node, label, src, dst, group_of)
    pieces = [(var, _flat(src, si, coords), dj) for var, coords, (si, dj) in _unit_coords(t, node, label, group_of)]
    outs = {i: map_positions(t, node, var, flat, dst, dj) for i, (var, flat, dj) in enumerate(pieces) if len(flat) > 1}
    dims = [lab.dim for lab, _ in outs.values() if isinstance(lab, Axis)]
    for i, (var, flat, dj) in enumerate(pieces):  # one-unit variables (a shuffle's finest parts) lie beside the others
        if i not in outs:
            outs[i] = map_positions(t, node, var, flat, dst, dj, prefer=dims[0] if dims else None)
    return _combine(t, node, [outs[i] for i in range(len(pieces))])


def _reshape_heads_axis(t: Tracer, node, label: Heads, src, dst, group_of) -> Heads:
    """A reshape that moves the head axis (e.g. merges it with the batch axis) but not the inside of heads."""
    (si, dj), (ii, ij) = group_of[label.head_dim], group_of[label.inner_dim]
    if len(ii) != 1 or len(ij) != 1:
        raise t.refuse(node, "a reshape of the axis inside attention heads")
    heads = t.vars.root(label.var).heads
    flat = _flat(src, si, {label.head_dim: label.heads.positions().numpy()})
    moved, _ = map_positions(t, node, heads, flat, dst, dj)
    if not isinstance(moved, Axis):
        raise t.refuse(node, "a reshape that splits attention heads")
    return Heads(label.var, moved.dim, ij[0], moved.segs[0].layout)


def _unit_coords(t: Tracer, node, label, group_of) -> list:
    """Per variable of a label: (var, {source axis: coordinates (units, r)}, its reshape group)."""
    if isinstance(label, Axis):
        return [(s.var, {label.dim: seg_positions(s)}, group_of[label.dim]) for s in label.segs]
    if isinstance(label, Heads):
        gh, gi = group_of[label.head_dim], group_of[label.inner_dim]
        k = t.vars.root(label.var).block
        hpos = label.heads.positions().numpy()
        if gh is not gi:
            raise t.refuse(node, "a reshape of the axis inside attention heads")
        head_c = np.repeat(hpos, k, axis=0)
        inner_c = np.tile(np.arange(k), hpos.shape[0])[:, None]
        return [(label.var, {label.head_dim: head_c, label.inner_dim: inner_c}, gh)]
    if isinstance(label, Parts):
        out = []
        for i, part in enumerate(label.parts):
            if part is None:
                continue
            if not isinstance(part, Axis) or group_of[part.dim] is not group_of[label.dim]:
                raise t.refuse(node, "a reshape of a tensor split into parts")
            for s in part.segs:
                pos = seg_positions(s)
                out.append((s.var, {part.dim: pos, label.dim: np.full((pos.shape[0], 1), i)}, group_of[label.dim]))
        return out
    raise t.refuse(node, "a reshape of this tensor")


def _combine(t: Tracer, node, outs: list):
    """Labels of the pieces of one tensor after a reshape, combined into one label: segments of one axis,
    or parts told apart by a coordinate they do not share (a channel shuffle's halves)."""
    labels = [lab for lab, _ in outs]
    if len(outs) == 1:
        return labels[0]
    if not all(isinstance(lab, Axis) for lab in labels) or len({lab.dim for lab in labels}) != 1:
        raise t.refuse(node, "a reshape that separates concatenated parts")
    positions = np.concatenate([seg_positions(s).reshape(-1) for lab in labels for s in lab.segs])
    if len(np.unique(positions)) == len(positions):
        return Axis(labels[0].dim, tuple(s for lab in labels for s in lab.segs))
    axes = set.intersection(*(set(c) for _, c in outs))
    for d in sorted(axes):
        by_value: dict[int, list] = {}
        for lab, c in outs:
            by_value.setdefault(c[d], []).extend(lab.segs)
        if all(_disjoint(segs) for segs in by_value.values()):
            parts = [None] * (max(by_value) + 1)
            for v, segs in by_value.items():
                parts[v] = Axis(labels[0].dim, tuple(segs))
            return Parts(d, tuple(parts))
    raise t.refuse(node, "a reshape that overlaps concatenated parts")


def _disjoint(segs) -> bool:
    positions = np.concatenate([seg_positions(s).reshape(-1) for s in segs])
    return len(np.unique(positions)) == len(positions)


def weight_view_through(label, dims_map: dict[int, int | None], ndim: int):
    """A WeightView after an op that moves axes: dims_map[new axis] = old axis (None: a new axis)."""
    return WeightView(label.key, tuple(label.axes[dims_map[d]] if dims_map.get(d) is not None else None for d in range(ndim)))
