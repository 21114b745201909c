"""A small pre-norm Vision Transformer for 28x28 images (Dosovitskiy et al. 2021, "An Image is Worth 16x16
Words"), written like nanoGPT's model.py: a config, then one short module per part.

Patches of `patch_size` x `patch_size` pixels are embedded by a strided convolution (28 / 7 = 4 x 4 = 16
tokens), a learned class token is prepended and a learned position embedding added; `depth` pre-norm
blocks x + attn(ln(x)), x + mlp(ln(x)) follow (separate query/key/value Linear layers, torch's
scaled_dot_product_attention, GELU MLP), then a final LayerNorm and a linear head on the class token (`pool="cls"`) or on the mean of
the patch tokens (`pool="mean"`). No dropout. Init as nanoGPT: normal(0, 0.02) weights, zero biases, the
residual projections scaled by 1/sqrt(2 * depth) (GPT-2), class token and positions normal(0, 0.02).

Every hidden axis permutes: the residual stream (one group shared by the patch embedding, class token,
positions, every block's output projections and norms, the final norm and the head's input), each
block's MLP units, and its attention heads (structured groups: heads move as blocks, q/k share a
permutation inside each head, v/proj another).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._registry import register_model


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 28  # input height = width in pixels
    patch_size: int = 7  # side of a square patch in pixels: (28 / 7)^2 = 16 patch tokens
    in_channels: int = 1  # image channels
    num_classes: int = 10
    width: int = 128  # residual-stream dimension (embedding size)
    depth: int = 6  # transformer blocks
    heads: int = 4  # attention heads per block; head size = width / heads
    mlp_ratio: int = 4  # hidden units of each block's MLP = mlp_ratio * width
    pool: str = "cls"  # "cls": classify the class token; "mean": the mean of the patch tokens


class SelfAttention(nn.Module):
    """Multi-head self-attention, (B, T, C) -> (B, T, C); `causal` masks future tokens (for the GPT)."""

    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads, self.causal = heads, causal
        self.query = nn.Linear(width, width)  # the queries of all heads, head h in rows h*d .. (h+1)*d - 1
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        q = self.query(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, heads, T, head size)
        k = self.key(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = self.value(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """Linear -> GELU -> Linear, (B, T, C) -> (B, T, C) through `hidden` units."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(hidden, width)

    def forward(self, x):
        return self.proj(self.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, causal: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio * width)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def init_weights(model: nn.Module, depth: int) -> None:
    """nanoGPT's init: Linear/Embedding weights normal(0, 0.02), biases 0, residual projections
    (attention and MLP outputs) normal(0, 0.02 / sqrt(2 * depth)) (GPT-2, Radford et al. 2019)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    for name, p in model.named_parameters():
        if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
            nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * depth))


class ViT(nn.Module):
    """(B, in_channels, image_size, image_size) images -> (B, num_classes) logits."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        if cfg.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {cfg.pool!r}")
        self.cfg = cfg
        tokens = (cfg.image_size // cfg.patch_size) ** 2 + (cfg.pool == "cls")
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width)) if cfg.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.num_classes)
        init_weights(self, cfg.depth)
        nn.init.normal_(self.pos_embed, 0.0, 0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, 0.0, 0.02)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, patches, width)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(1))


# `onebasin demo --model vit`: FashionMNIST, width 128, calibration and train-split evaluation cut to fit a CPU
_DEMO = {"dataset": "fashionmnist", "model_kwargs": {"width": 128}, "calib_examples": 2000, "train_eval_examples": 2000}


@register_model(image_size=28, default_dataset="fashionmnist", recipe="vit", demo=_DEMO)
def vit(width=128, depth=6, heads=4, patch_size=7, mlp_ratio=4, pool="cls", in_channels=1, num_classes=10):
    """Pre-norm ViT for 28x28 images: patch 7 (16 tokens + class token), width 128, 6 blocks of 4 heads."""
    return ViT(ViTConfig(28, patch_size, in_channels, num_classes, width, depth, heads, mlp_ratio, pool))
