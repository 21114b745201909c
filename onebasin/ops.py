"""What each ATen op is, in one table read by every part of onebasin that needs to know.

* `LAYERS`: ops with a weight whose output units are rows of one weight axis (Linear, Conv, ...): the
  argument names of input, weight and bias, the weight axes of output units and input features, and the
  tensor axis of the features. The tracer's layer rule, REPAIR's fusion, the orthogonal method's
  canonical form and functional matching read it.
* `NORMS`: normalisations: which axes they normalise ("channel": each channel over batch and positions;
  "last": each position over the last len(normalized_shape) axes), their per-unit affine parameters and
  running statistics. The tracer's norm rule, REPAIR's fusion and the orthogonal method read it.
* `VIEWS`: ops whose output elements are input elements (views, copies, eval-mode dropout);
  `UNARY`/`JOINS`: elementwise ops (an output element depends only on the operands' elements at the
  same position, after broadcasting); `REDUCTIONS`.
* By packet name: FILLS, BROADCASTS and REDUCES (where an unpermuted tensor may vary), and which view ops
  may alias their input, can be written back through, or may copy (rewriting in-place writes).

Adding a layer op is one row here plus, if the generic rule in `rules/layers.py` does not fit it, its rule.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

aten = torch.ops.aten


def args_of(node: fx.Node) -> dict:
    """The op's arguments by schema name, defaults filled in."""
    out = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


@dataclass(frozen=True)
class Layer:
    """y = x W + b along one axis: output unit u has the weights W[u] along `out_axis` and the bias b[u].

    input, weight, bias: the op's argument names; out_axis, in_axis: the weight axes of output units and of
    input features; feature_dim: the tensor axis of the features in x and y (-1: the last, 1: channels).
    """

    input: str
    weight: str
    bias: str | None
    out_axis: int
    in_axis: int
    feature_dim: int

    def dim(self, ndim: int) -> int:
        """The feature axis of an ndim input or output."""
        return self.feature_dim % ndim


_LINEAR = Layer("input", "weight", "bias", out_axis=0, in_axis=1, feature_dim=-1)
_CONV = Layer("input", "weight", "bias", out_axis=0, in_axis=1, feature_dim=1)
_CONV_T = Layer("input", "weight", "bias", out_axis=1, in_axis=0, feature_dim=1)  # weight (in, out / groups, *k)
LAYERS = {
    aten.linear.default: _LINEAR,
    aten.addmm.default: Layer("mat1", "mat2", "self", out_axis=1, in_axis=0, feature_dim=-1),  # GPT-2's Conv1D: x @ W + b
    aten.conv1d.default: _CONV, aten.conv2d.default: _CONV, aten.conv3d.default: _CONV,
    aten.conv1d.padding: _CONV, aten.conv2d.padding: _CONV, aten.conv3d.padding: _CONV,
    aten.conv_transpose1d.default: _CONV_T, aten.conv_transpose2d.input: _CONV_T, aten.conv_transpose3d.input: _CONV_T,
}  # fmt: skip


@dataclass(frozen=True)
class Norm:
    """A normalisation followed by a per-unit affine (weight, bias: argument names, None where absent).

    over: "channel" normalises each channel (axis 1) over the batch and positions (BatchNorm; GroupNorm
    over groups of channels, `groups` naming the argument); "last" normalises each position over the
    last len(normalized_shape) axes (LayerNorm, RMSNorm). stats: running statistics that follow the
    units; centred: it subtracts the mean (LayerNorm; RMSNorm does not); multi: the op returns
    (output, mean, rstd).
    """

    over: str
    weight: str | None = "weight"
    bias: str | None = "bias"
    stats: tuple[str, ...] = ()
    groups: str | None = None
    centred: bool = True
    multi: bool = False
    input: str = "input"

    def param_axis(self, a: dict, dim: int, ndim: int) -> int | None:
        """The axis of the affine parameters (args `a`) that holds the units of tensor axis `dim`, or None
        when the norm does not act per unit along `dim`."""
        if self.over == "channel":
            return 0 if dim == 1 else None
        first = ndim - len(a["normalized_shape"])
        return dim - first if dim >= first else None


_BN_STATS = ("running_mean", "running_var")
NORMS = {
    aten._native_batch_norm_legit_no_training.default: Norm("channel", stats=_BN_STATS, multi=True),
    aten.batch_norm.default: Norm("channel", stats=_BN_STATS),
    aten.group_norm.default: Norm("channel", groups="num_groups"),
    aten.native_group_norm.default: Norm("channel", groups="group", multi=True),
    aten.layer_norm.default: Norm("last"),
    aten.native_layer_norm.default: Norm("last", multi=True),
    aten.rms_norm.default: Norm("last", bias=None, centred=False),
}


def produced_by(node: fx.Node) -> fx.Node:
    """The op that produced a tensor: a multi-output op (a native norm) seen through its item 0."""
    return node.args[0] if node.target is operator.getitem and node.args[1] == 0 else node


VIEWS = {
    aten.select.int, aten.slice.Tensor, aten.view.default, aten.reshape.default, aten.permute.default,
    aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.clone.default,
    aten._to_copy.default, aten.contiguous.default, aten.dropout.default, aten.expand.default,
    aten.flatten.using_ints, aten.alias.default,
}  # fmt: skip
UNARY = [
    aten.relu.default, aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default,
    aten.hardtanh.default, aten.hardswish.default, aten.hardsigmoid.default, aten.leaky_relu.default,
    aten.elu.default, aten.selu.default, aten.celu.default, aten.mish.default, aten.softplus.default,
    aten.relu6.default, aten.abs.default, aten.neg.default, aten.exp.default, aten.log.default, aten.sqrt.default,
    aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
    aten.reciprocal.default, aten.erf.default, aten.sin.default, aten.cos.default, aten.sign.default,
    aten.square.default, aten.log1p.default, aten.expm1.default, aten.logit.default, aten._to_copy.default,
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.clone.default, aten.alias.default, aten.detach.default,
    aten.lift_fresh_copy.default, aten.dropout.default, aten.contiguous.default, aten.mul.Scalar, aten.div.Scalar,
    aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar, aten.pow.Scalar, aten.floor.default, aten.ceil.default,
    aten.round.default, aten.trunc.default,
    aten.masked_fill.Scalar, aten.nan_to_num.default, aten.threshold.default,
    aten.hardshrink.default, aten.softshrink.default, aten.logical_not.default, aten.bitwise_not.default,
    aten.isnan.default, aten.isinf.default, aten.fill.Scalar,
]  # fmt: skip
JOINS = [
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.div.Tensor_mode, aten.maximum.default,
    aten.minimum.default, aten.where.self, aten.pow.Tensor_Tensor, aten.rsub.Tensor, aten.addcmul.default,
    aten.addcdiv.default, aten.lerp.Tensor, aten.lerp.Scalar, aten.eq.Tensor, aten.ne.Tensor, aten.gt.Tensor,
    aten.lt.Tensor, aten.ge.Tensor, aten.le.Tensor, aten.eq.Scalar, aten.ne.Scalar, aten.gt.Scalar, aten.lt.Scalar,
    aten.ge.Scalar, aten.le.Scalar, aten.logical_and.default, aten.logical_or.default, aten.bitwise_and.Tensor,
    aten.bitwise_or.Tensor, aten.masked_fill.Tensor, aten.clamp.Tensor, aten.atan2.default, aten.__and__.Tensor,
    aten.__or__.Tensor, aten.copysign.Tensor, aten.fmod.Tensor, aten.remainder.Tensor, aten.floor_divide.default,
    aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar, aten.hypot.default, aten.xlogy.Tensor,
]  # fmt: skip
ELEMENTWISE = {*UNARY, *JOINS}  # outputs vary only where some operand does
REDUCTIONS = [
    aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default, aten.amax.default, aten.amin.default,
    aten.var.correction, aten.var.dim, aten.std.correction, aten.std.dim, aten.linalg_vector_norm.default,
    aten.norm.ScalarOpt_dim, aten.logsumexp.default, aten.prod.dim_int, aten.any.dim, aten.all.dim, aten.max.default,
    aten.min.default,
]  # fmt: skip

# --- by overload packet name (any overload) --------------------------------------------------------------

BROADCASTS = {"expand", "expand_as", "type_as"}  # the second argument lends only a shape or dtype
FILLS = {"zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full", "zeros", "ones", "full", "scalar_tensor"}
REDUCES = {"sum", "mean", "amax", "amin", "max", "min", "prod", "any", "all", "logsumexp"}  # reduce the axes they are given

# Memory aliasing, for rewriting in-place writes (`_functionalize`):
ALIASING = {"view", "_unsafe_view", "reshape", "slice", "select", "transpose", "t", "permute", "expand", "unsqueeze",
            "squeeze", "as_strided", "diagonal", "unfold", "alias", "split", "chunk", "unbind", "narrow", "flatten",
            "unflatten", "view_as", "expand_as", "reshape_as", "detach", "to", "contiguous", "type_as", "movedim",
            "swapaxes", "transpose_copy", "split_with_sizes", "unsafe_split", "view_as_real", "view_as_complex", "real",
            "imag", "_reshape_alias", "ravel", "conj", "resolve_conj", "resolve_neg", "positive", "lift_fresh"}  # may alias
WRITE_BACK = {"slice", "select", "alias", "detach", "transpose", "t", "permute", "unsqueeze"}  # views written back exactly
MAY_COPY = {"reshape", "reshape_as", "flatten", "ravel", "to", "contiguous", "type_as", "transpose_copy", "resolve_conj",
            "resolve_neg"}  # share memory only sometimes: taken before a write, they may hold the old values
