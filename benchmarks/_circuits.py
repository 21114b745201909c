"""Theus et al. 2025's merge space for the zoo's transformers: interpolate every head's QK and OV circuits.

Their merger (alexandertheus/Generalized-LMC-for-Transformers, `project_to_attn_circuits`) rewrites each head as
its full circuits, W_Q^T W_K and W_O W_V, and interpolates those: the merged network's attention scores are
(1 - l) q_A.k_A + l q_B.k_B and its head outputs (1 - l) O_A v_A + l O_B v_B. Linear interpolation of the zoo's
weights instead interpolates the factors, whose products are not linear in l.

`expand_pair(A, B)` gives the same merge as a plain interpolation between two wider endpoints: every head of E_A and
E_B holds both models' query, key and value dims (head size 2d), E_A's B half and E_B's A half muted (their queries and
their output projections zero), so E_A computes A, E_B computes B, and lerp(E_A, E_B, l) has queries
[(1 - l) q_A, l q_B] against keys [k_A, k_B] and values [v_A, v_B] read by [(1 - l) O_A, l O_B]: the circuits'
interpolation. Every onebasin step (barrier curves, REPAIR) then runs on the pair unchanged. The merged network is
not of the original architecture: its attention has twice the query, key and value dims.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from onebasin.models.vit import SelfAttention


class WideAttention(nn.Module):
    """The zoo's SelfAttention with heads of `size` dims (q, k, v: heads * size rows; proj reads heads * size),
    scaled by 1 / sqrt(size)."""

    def __init__(self, width: int, heads: int, size: int, causal: bool):
        super().__init__()
        self.heads, self.size, self.causal = heads, size, causal
        self.query, self.key, self.value = (nn.Linear(width, heads * size) for _ in range(3))
        self.proj = nn.Linear(heads * size, width)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (m(x).view(B, T, self.heads, self.size).transpose(1, 2) for m in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.heads * self.size))


def _per_head(heads: int, parts: list[torch.Tensor]) -> torch.Tensor:
    """Rows (heads * d, ...) of each part, concatenated head by head: (heads * d * len(parts), ...)."""
    return torch.cat([p.reshape(heads, -1, *p.shape[1:]) for p in parts], 1).reshape(-1, *parts[0].shape[1:])


def _wide(own: SelfAttention, a: SelfAttention, b: SelfAttention, side: int) -> WideAttention:
    """`own` (= a or b) as a WideAttention holding a's and b's keys and values; queries and output only on `side`."""
    heads, width = own.heads, own.query.in_features
    d = own.query.out_features // heads
    wide = WideAttention(width, heads, 2 * d, own.causal).to(own.query.weight)
    with torch.no_grad():
        for w, halves in ((wide.query.weight, own.query.weight), (wide.query.bias, own.query.bias)):
            q = math.sqrt(2.0) * halves  # the scale 1 / sqrt(2d) of the wide head becomes 1 / sqrt(d)
            w.copy_(_per_head(heads, [q, torch.zeros_like(q)][:: 1 if side == 0 else -1]))
        for name in ("key", "value"):
            getattr(wide, name).weight.copy_(_per_head(heads, [getattr(a, name).weight, getattr(b, name).weight]))
            getattr(wide, name).bias.copy_(_per_head(heads, [getattr(a, name).bias, getattr(b, name).bias]))
        out = own.proj.weight.view(width, heads, d)
        wide.proj.weight.copy_(torch.cat([out, torch.zeros_like(out)][:: 1 if side == 0 else -1], 2).reshape(width, -1))
        wide.proj.bias.copy_(own.proj.bias)
    return wide


def expand_pair(a: nn.Module, b: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(E_A, E_B): copies of A and B (B aligned to A) with every SelfAttention widened as the module docstring says."""
    wide = copy.deepcopy(a).eval(), copy.deepcopy(b).eval()
    for name, att in a.named_modules():
        if isinstance(att, SelfAttention):
            other = b.get_submodule(name)
            parent, _, child = name.rpartition(".")
            for side, (own, model) in enumerate(zip((att, other), wide)):
                setattr(model.get_submodule(parent), child, _wide(own, att, other, side))
    return wide
