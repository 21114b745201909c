"""The per-unit affine map of REPAIR, y -> scale * y + shift along a unit axis: the map that takes a unit to
its goal statistics, the one kernel that applies it, and the module that holds it when it cannot be folded."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class RepairAffine(nn.Module):
    """y = weight * x + bias per unit along axis `dim`: a REPAIR correction that could not be fused.

    weight, bias: (units,). Its state_dict keys are `<name>.weight` and `<name>.bias`.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, dim: int):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return affine(x, self.weight, self.bias, self.dim)

    def extra_repr(self) -> str:
        return f"units={self.weight.numel()}, dim={self.dim}"


def affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dim: int, in_place: bool = False) -> torch.Tensor:
    """x * scale + shift with (units,) vectors along axis `dim` (the one formula every path uses), written
    into x itself with `in_place` (no new activation-sized allocation). One fused addcmul, except where each
    unit spans 16 or more contiguous positions (a conv's channels of 4x4 or larger maps): there a multiply
    and an add, each vectorised along the positions, are 2-3x faster than addcmul's broadcast loop
    ((256, 512, 8, 8) to (256, 64, 32, 32) maps; 1.4x slower on 2x2 maps)."""
    dim = dim % x.ndim
    shape = [1] * x.ndim
    shape[dim] = -1
    scale, shift = scale.to(x).view(shape), shift.to(x).view(shape)
    if math.prod(x.shape[dim + 1:]) < 16:
        return torch.addcmul(shift, x, scale, out=x if in_place else None)
    return (x.mul_(scale) if in_place else x * scale).add_(shift)


def affine_to_goal(mean, std, goal_mean, goal_std, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) taking a unit of mean `mean`, std `std` to the goal; units constant to within
    rounding of the model's dtype (machine epsilon `eps`) keep scale 1 and only get their mean shifted."""
    tol = 100 * eps * mean.abs() + torch.finfo(torch.float64).tiny
    scale = torch.where(std > tol, goal_std / std.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(std))
    return scale, goal_mean - scale * mean
