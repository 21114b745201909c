"""The op-knowledge table (`onebasin.ops`), row by row, against a module that calls the op itself.

For every layer row: permuting the weight along `out_axis` (and the bias) permutes the output along the
feature axis, permuting it along `in_axis` undoes a permutation of the input's features, the tracer makes
those weight axes one group, and folding a per-unit affine into the layer (REPAIR's fusion) equals
applying it after the layer. For every norm row: the same for the affine parameters' `param_axis`
(running statistics too), and fusion into the norm. The oracle is always the module's own eager output.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from onebasin.ops import LAYERS, NORMS
from onebasin.repair.fuse import fuse_corrections
from onebasin.spec import trace

aten = torch.ops.aten
OUT, IN = 4, 5  # output units, input features

# op -> (input shape, number of kernel axes, static arguments); the weight is (OUT, IN) on (out_axis, in_axis)
LAYER_CASES = {
    aten.linear.default: ((3, 2, IN), 0, {}),
    aten.addmm.default: ((6, IN), 0, {}),
    aten.conv1d.default: ((2, IN, 7), 1, {}),
    aten.conv2d.default: ((2, IN, 6, 6), 2, {"stride": [2, 1]}),
    aten.conv3d.default: ((2, IN, 4, 4, 4), 3, {}),
    aten.conv1d.padding: ((2, IN, 7), 1, {"padding": "same"}),
    aten.conv2d.padding: ((2, IN, 6, 6), 2, {"padding": "same"}),
    aten.conv3d.padding: ((2, IN, 4, 4, 4), 3, {"padding": "same"}),
    aten.conv_transpose1d.default: ((2, IN, 5), 1, {"stride": [2]}),
    aten.conv_transpose2d.input: ((2, IN, 4, 4), 2, {}),
    aten.conv_transpose3d.input: ((2, IN, 3, 3, 3), 3, {}),
}
C = 4  # channels of a per-channel norm's input (2, C, 3, 5); a norm over the last axes gets (2, 3, 4, 5)
# op -> static arguments (normalized_shape (4, 5): the units on axis 2 are the parameters' axis 0)
NORM_CASES = {
    aten._native_batch_norm_legit_no_training.default: {"momentum": 0.1, "eps": 1e-5},
    aten.batch_norm.default: {"training": False, "momentum": 0.1, "eps": 1e-5, "cudnn_enabled": False},
    aten.group_norm.default: {"num_groups": 2},
    aten.native_group_norm.default: {"group": 2, "eps": 1e-5},
    aten.layer_norm.default: {"normalized_shape": [4, 5]},
    aten.native_layer_norm.default: {"normalized_shape": [4, 5], "eps": 1e-5},
    aten.rms_norm.default: {"normalized_shape": [4, 5], "eps": 1e-5},
}


class OpModule(nn.Module):
    """Calls `op` on its input with its parameters and buffers as keyword arguments (item 0 of a tuple)."""

    def __init__(self, op, input_name: str, params: dict, buffers: dict, static: dict):
        super().__init__()
        self.op, self.input_name, self.static = op, input_name, static
        for k, v in params.items():
            self.register_parameter(k, nn.Parameter(v))
        for k, v in buffers.items():
            self.register_buffer(k, v)
        self.names = [*params, *buffers]

    def forward(self, x):
        extra = {"N": x.shape[0], "C": x.shape[1], "HxW": x.shape[2] * x.shape[3]} if self.op is aten.native_group_norm.default else {}
        out = self.op(**{self.input_name: x, **{k: getattr(self, k) for k in self.names}, **self.static, **extra})
        return out[0] if isinstance(out, tuple) else out


class Net(nn.Module):
    """pre -> op -> relu -> sum over the unit axis: the op's units are hidden (a group), not an output."""

    def __init__(self, op_module: nn.Module, dim: int, pre: nn.Module | None = None):
        super().__init__()
        self.pre, self.op, self.dim = pre or nn.Identity(), op_module, dim

    def forward(self, x):
        return self.post(self.op(self.pre(x)))

    def post(self, h):
        return torch.relu(h).sum(self.dim)


def layer_module(op, seed=0) -> tuple[OpModule, torch.Tensor]:
    row, (x_shape, kernel_axes, static) = LAYERS[op], LAYER_CASES[op]
    g = torch.Generator().manual_seed(seed)
    shape = [0] * (2 + kernel_axes)
    shape[row.out_axis], shape[row.in_axis] = OUT, IN
    shape[2:] = [3] * kernel_axes
    params = {row.weight: torch.randn(shape, generator=g) / 3, row.bias: torch.randn(OUT, generator=g)}
    return OpModule(op, row.input, params, {}, static), torch.randn(x_shape, generator=g)


def norm_module(op, seed=0) -> tuple[OpModule, torch.Tensor, int]:
    """The norm's module, an input, and the unit axis of that input (channels, or the first normalised axis)."""
    row, static = NORMS[op], NORM_CASES[op]
    g = torch.Generator().manual_seed(seed)
    pshape = (C,) if row.over == "channel" else tuple(static["normalized_shape"])
    params = {k: 1 + torch.randn(pshape, generator=g) / 4 for k in (row.weight, row.bias) if k}
    buffers = {k: torch.rand(pshape, generator=g) + (0.5 if "var" in k else -0.5) for k in row.stats}
    x = torch.randn((2, C, 3, 5) if row.over == "channel" else (2, 3, 4, 5), generator=g)
    return OpModule(op, row.input, params, buffers, static), x, 1 if row.over == "channel" else 2


def permuted(t: torch.Tensor, dim: int, perm: torch.Tensor) -> torch.Tensor:
    return t.index_select(dim, perm)


def fold_and_compare(net: Net, x: torch.Tensor, site, scale, shift) -> bool:
    """Fuse y -> scale * y + shift at `site` into `net`; assert the result equals applying it after the op.
    Returns whether it was folded into the op's own parameters."""
    spec = trace(net, x)
    h = net.op(net.pre(x)).detach()
    along = [-1 if d == site.dim else 1 for d in range(h.ndim)]
    expected = net.post(h * scale.view(along) + shift.view(along))
    row = SimpleNamespace(site=site, scale=scale, shift=shift, ndim=h.ndim)
    fused, folded = fuse_corrections(net, spec.graph, net.state_dict(), [row])
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
    return folded[0]


def test_every_row_has_a_case():
    assert set(LAYER_CASES) == set(LAYERS) and set(NORM_CASES) == set(NORMS)


@pytest.mark.parametrize("op", list(LAYERS), ids=str)
def test_layer_axes(op):
    """out_axis of the weight (and the bias) carries the output units on the feature axis; in_axis the input's."""
    row = LAYERS[op]
    m, x = layer_module(op)
    with torch.no_grad():
        y = m(x)
        dim, w, b = row.dim(y.ndim), getattr(m, row.weight), getattr(m, row.bias)
        p, q = torch.randperm(OUT, generator=torch.Generator().manual_seed(1)), torch.randperm(IN, generator=torch.Generator().manual_seed(2))
        w.copy_(permuted(w, row.out_axis, p)), b.copy_(b[p])
        torch.testing.assert_close(m(x), permuted(y, dim, p))
        w.copy_(permuted(w, row.in_axis, q))
        torch.testing.assert_close(m(permuted(x, row.dim(x.ndim), q)), permuted(y, dim, p))


@pytest.mark.parametrize("op", list(LAYERS), ids=str)
def test_layer_rule_and_fusion(op):
    """The tracer makes the output units one group of those weight axes; fusion into the layer is exact."""
    row = LAYERS[op]
    m, x = layer_module(op)
    net = Net(m, row.dim(len(LAYER_CASES[op][0])))
    spec = trace(net, x)
    assert [{(mm.key, mm.axis) for mm in g.members} for g in spec.groups.values()] == [{(f"op.{row.weight}", row.out_axis), (f"op.{row.bias}", 0)}]
    (site,) = next(iter(spec.groups.values())).sites
    assert site.dim == net.dim
    g = torch.Generator().manual_seed(3)
    assert fold_and_compare(net, x, site, torch.rand(OUT, generator=g) + 0.5, torch.randn(OUT, generator=g))


@pytest.mark.parametrize("op", list(NORMS), ids=str)
def test_norm_axes(op):
    """Permuting the units of the input and the affine parameters and statistics along `param_axis`
    permutes the output; `param_axis` is None on an axis the norm does not act on per unit."""
    row = NORMS[op]
    m, x, dim = norm_module(op)
    a = {"normalized_shape": NORM_CASES[op].get("normalized_shape")}
    axis = row.param_axis(a, dim, x.ndim)
    assert axis == 0 and row.param_axis(a, 0, x.ndim) is None
    p = torch.tensor([1, 0, 3, 2])  # inside GroupNorm's two groups of two
    with torch.no_grad():
        y = m(x)
        for k in m.names:
            getattr(m, k).copy_(permuted(getattr(m, k), axis, p))
        torch.testing.assert_close(m(permuted(x, dim, p)), permuted(y, dim, p))


@pytest.mark.parametrize("op", list(NORMS), ids=str)
def test_norm_rule_and_fusion(op):
    """After a layer, the norm's parameters join the layer's group on `param_axis`; the layer's site moves to the
    norm's output, and a correction there folds into the norm's affine (not when it has no bias)."""
    row = NORMS[op]
    m, x, dim = norm_module(op)
    pre = nn.Conv2d(C, C, 1) if row.over == "channel" else nn.Linear(5, 5)
    dim = 1 if row.over == "channel" else 3  # the Linear writes the last axis: the parameters' axis 1
    net = Net(m, dim, pre)
    spec = trace(net, x)
    (group,) = [g for g in spec.groups.values() if any(mm.key == "pre.weight" for mm in g.members)]
    pax = 0 if row.over == "channel" else 1
    members = {(mm.key, mm.axis) for mm in group.members}
    assert {(f"op.{k}", pax) for k in m.names} <= members and ("pre.weight", 0) in members
    (site,) = group.sites
    layer_node = next(n.name for n in spec.graph.graph.nodes if n.op == "call_function")
    assert site.dim == dim and site.node != layer_node  # moved to the norm's output
    g = torch.Generator().manual_seed(3)
    units = C if row.over == "channel" else 5
    folded = fold_and_compare(net, x, site, torch.rand(units, generator=g) + 0.5, torch.randn(units, generator=g))
    assert folded == (row.bias is not None)
