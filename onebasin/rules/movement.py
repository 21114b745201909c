"""Rules for ops that move data without computing on it: axis reorders, reshapes, pooling and indexing
(symmetries note, Sec. 5; slicing, splitting and concatenation are in `slicing.py`). A label follows its
axis; a reshape that splits a permuted axis into (heads, head size) gives it block structure."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from ..labels import Multi, WeightView, label_dims, remap
from ._common import input_label, moved, norm_dim
from ._reshape import reshape_label

if TYPE_CHECKING:  # annotations only: the tracer imports the rules
    from ..tracer import Tracer

aten = torch.ops.aten


def permute(t: Tracer, node: fx.Node):
    x, dims = node.args[0], node.args[1]
    ndim = len(t.shape(x))
    return moved(t, node, t.labels.get(x), {norm_dim(d, ndim): i for i, d in enumerate(dims)})


def transpose(t: Tracer, node: fx.Node):
    x = node.args[0]
    ndim = len(t.shape(x))
    d0, d1 = (norm_dim(node.args[1], ndim), norm_dim(node.args[2], ndim)) if len(node.args) > 2 else (0, 1)
    mapping = {d: d for d in range(ndim)} | {d0: d1, d1: d0}
    return moved(t, node, t.labels.get(x), mapping)


def movedim(t: Tracer, node: fx.Node):
    """movedim/moveaxis(x, source, destination): the same reordering torch.movedim computes."""
    x, src, dst = node.args[0], node.args[1], node.args[2]
    ndim = len(t.shape(x))
    src, dst = ([src], [dst]) if isinstance(src, int) else (list(src), list(dst))
    src, dst = [norm_dim(d, ndim) for d in src], [norm_dim(d, ndim) for d in dst]
    order = [None] * ndim  # order[new axis] = old axis
    for a, b in zip(src, dst):
        order[b] = a
    rest = iter(d for d in range(ndim) if d not in src)
    order = [next(rest) if o is None else o for o in order]
    return moved(t, node, t.labels.get(x), {old: new for new, old in enumerate(order)})


def unsqueeze(t: Tracer, node: fx.Node):
    x = node.args[0]
    ndim = len(t.shape(x))
    d = norm_dim(node.args[1], ndim + 1)
    return moved(t, node, t.labels.get(x), {i: i + (i >= d) for i in range(ndim)})


def squeeze(t: Tracer, node: fx.Node):
    x = node.args[0]
    src, dst = t.shape(x), t.shape(node)
    return reshape(t, node) if src != dst else t.labels.get(x)


def expand(t: Tracer, node: fx.Node):
    x = node.args[0]
    src, dst = t.shape(x), t.shape(node)
    shift = len(dst) - len(src)
    lab = t.labels.get(x)
    for d in (label_dims(lab) if not isinstance(lab, WeightView) and lab is not None else ()):
        if src[d] != dst[d + shift]:
            raise t.refuse(node, "an expand of a permuted axis")
    return moved(t, node, lab, {i: i + shift for i in range(len(src))})


def reshape(t: Tracer, node: fx.Node):
    x = node.args[0]
    lab = t.labels.get(x)
    if x in t.standardized and t.shape(node) == t.shapes[t.standardized[x][0]]:
        return _standardized(t, *t.standardized[x])
    if lab is None:
        return None
    return reshape_label(t, node, lab, t.shape(x), t.shape(node))


def _standardized(t: Tracer, key: str, gain) -> WeightView:
    """A standardised weight viewed back in its shape: a view of the weight whose output channels carry the gain."""
    if gain is not None:
        t.companions.setdefault((key, 0), []).append((gain.key, gain.axes[0]))
    return WeightView(key, tuple(range(len(t.shapes[key]))))


def pool(spatial: int):
    """Pooling and upsampling (interpolation) over the last `spatial` axes, each channel alike: the permuted
    axis must not be one of them."""

    def rule(t: Tracer, node: fx.Node):
        if (got := input_label(t, node)) is None:
            return None
        lab, ndim = got
        if label_dims(lab) & set(range(ndim - spatial, ndim)):
            raise t.refuse(node, "pooling or interpolation over the permuted axis")
        return lab

    return rule


def pool_with_indices(spatial: int):
    inner = pool(spatial)

    def rule(t: Tracer, node: fx.Node):
        lab = inner(t, node)
        return Multi((lab, lab))

    return rule


def order_moving(t: Tracer, node: fx.Node):
    """roll/flip/gather/index_select/repeat: along the permuted axis the units must stay in place."""
    if (got := input_label(t, node)) is None:
        return None
    lab, ndim = got
    dims = node.args[2] if node.target == aten.roll.default else node.args[1]
    if node.target == aten.repeat.default:
        shift = len(dims) - ndim
        dims = [d - shift for d, r in enumerate(dims) if r != 1 and d >= shift]
        moved = {d: d + shift for d in range(ndim)}
    else:
        moved = {d: d for d in range(ndim)}
    dims = [norm_dim(d, ndim) for d in ((dims,) if isinstance(dims, int) else dims)]
    if set(dims) & label_dims(lab):
        t.fix_label(lab, node, f"{node.target} moves units along the permuted axis")
        return None
    return remap(lab, moved)


def index(t: Tracer, node: fx.Node):
    """x[idx0, idx1, ...] (advanced indexing): indexed axes must not be permuted; others renumbered."""
    x, indices = node.args[0], node.args[1]
    lab = t.labels.get(x)
    if lab is None:
        return None
    ndim = len(t.shape(x))
    idx_dims = [i for i, ix in enumerate(indices) if ix is not None]
    if not isinstance(lab, WeightView) and set(idx_dims) & label_dims(lab):
        t.fix_label(lab, node, "units picked out by an index")
        return None
    out_ndim = len(t.shape(node))
    b = out_ndim - (ndim - len(idx_dims))
    rest = [d for d in range(ndim) if d not in idx_dims]
    consecutive = idx_dims == list(range(idx_dims[0], idx_dims[-1] + 1))
    if consecutive:
        mapping = {d: d if d < idx_dims[0] else d - len(idx_dims) + b for d in rest}
    else:
        mapping = {d: b + i for i, d in enumerate(rest)}
    mapping |= {d: None for d in idx_dims}
    return moved(t, node, lab, mapping)


def shape_only(t: Tracer, node: fx.Node):
    """Ops that read a tensor's shape or metadata, not its values."""
    return None


_UPSAMPLE = {"upsample_nearest1d": 1, "upsample_nearest2d": 2, "upsample_nearest3d": 3, "_upsample_nearest_exact1d": 1,
             "_upsample_nearest_exact2d": 2, "_upsample_nearest_exact3d": 3, "upsample_linear1d": 1,
             "upsample_bilinear2d": 2, "upsample_bicubic2d": 2, "upsample_trilinear3d": 3, "_upsample_bilinear2d_aa": 2,
             "_upsample_bicubic2d_aa": 2}  # fmt: skip
RULES = {
    aten.permute.default: permute,
    aten.transpose.int: transpose,
    aten.t.default: transpose,
    aten.swapaxes.default: transpose,
    aten.swapdims.default: transpose,
    aten.movedim.int: movedim,
    aten.movedim.intlist: movedim,
    aten.moveaxis.int: movedim,
    aten.moveaxis.intlist: movedim,
    aten.unsqueeze.default: unsqueeze,
    aten.squeeze.dim: squeeze,
    aten.squeeze.dims: squeeze,
    aten.squeeze.default: squeeze,
    aten.expand.default: expand,
    aten.expand_as.default: expand,  # the second tensor lends only its shape
    aten.view_as.default: reshape,
    aten.reshape_as.default: reshape,
    aten.view.default: reshape,
    aten.reshape.default: reshape,
    aten._unsafe_view.default: reshape,
    aten.flatten.using_ints: reshape,
    aten.unflatten.int: reshape,
    aten._reshape_alias.default: reshape,
    aten.max_pool1d.default: pool(1),
    aten.max_pool2d.default: pool(2),
    aten.max_pool3d.default: pool(3),
    aten.avg_pool1d.default: pool(1),
    aten.avg_pool2d.default: pool(2),
    aten.avg_pool3d.default: pool(3),
    aten.adaptive_avg_pool1d.default: pool(1),
    aten.adaptive_avg_pool2d.default: pool(2),
    aten._adaptive_avg_pool2d.default: pool(2),
    aten.adaptive_avg_pool3d.default: pool(3),
    aten.max_pool2d_with_indices.default: pool_with_indices(2),
    aten.max_pool3d_with_indices.default: pool_with_indices(3),
    aten.adaptive_max_pool1d.default: pool_with_indices(1),
    aten.adaptive_max_pool2d.default: pool_with_indices(2),
    **{getattr(aten, op): pool(n) for op, n in _UPSAMPLE.items()},  # every overload (.vec, .default)
    aten.roll.default: order_moving,
    aten.flip.default: order_moving,
    aten.repeat.default: order_moving,
    aten.index.Tensor: index,
    aten._assert_tensor_metadata.default: shape_only,
    aten.sym_size.int: shape_only,
    aten.sym_numel.default: shape_only,
    aten.sym_stride.int: shape_only,
    aten._assert_scalar.default: shape_only,
}
