"""What each ATen op is, in one table read by every part of onebasin that needs to know.

Per op family: pass-through ops (elementwise: an output element depends only on the operands'
elements at the same position, after broadcasting), reductions.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten

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
