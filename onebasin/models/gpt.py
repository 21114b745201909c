"""A small pre-norm character-level GPT (Radford et al. 2019, GPT-2's layout; Karpathy's nanoGPT).

Token ids (B, T) -> token embedding + learned position embedding -> `depth` pre-norm causal blocks
(the ViT's `Block` with causal scaled_dot_product_attention) -> final LayerNorm -> LM head, whose weight
is the token embedding's (tied, as in GPT-2) unless `tie=False` (then its own). The head has a bias when
`head_bias` says so; by default only when untied (None), so the default is nanoGPT's shape (tied, no head bias)
and checkpoints of `tie=False` from before the option (which hold `lm_head.bias`) still load.
Output: next-token logits (B, T, vocab).
No dropout; nanoGPT's init (normal(0, 0.02), residual projections scaled by 1/sqrt(2 * depth)).

Permutation groups: the residual stream (embeddings, positions, every block's output projections and
norms, the final norm; with a tied head the LM head shares the embedding's rows), each block's MLP
units, and the attention heads as structured groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ._registry import register_model
from .vit import Block, init_weights


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 97  # characters (pydoc: newline + 95 printable ASCII + one id for any other character)
    block_size: int = 128  # longest sequence: rows of the learned position embedding
    width: int = 192  # residual-stream dimension
    depth: int = 4  # transformer blocks
    heads: int = 4  # attention heads per block; head size = width / heads
    mlp_ratio: int = 4  # hidden units of each block's MLP = mlp_ratio * width
    tie: bool = True  # LM head weight = token embedding weight
    head_bias: bool | None = None  # LM head bias; None: only when untied


class GPT(nn.Module):
    """(B, T) int64 token ids, T <= block_size -> (B, T, vocab_size) logits of the next token."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.block_size, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, causal=True) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=not cfg.tie if cfg.head_bias is None else cfg.head_bias)
        init_weights(self, cfg.depth)
        nn.init.normal_(self.pos_embed, 0.0, 0.02)
        if cfg.tie:
            self.lm_head.weight = self.tok_embed.weight

    def forward(self, ids):
        x = self.tok_embed(ids) + self.pos_embed[:, : ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# `onebasin demo --model gpt`: pydoc, width 192; a GPT example is a sequence of 128 characters (256 of them for
# calibration and train-split evaluation: 32,768 positions)
_DEMO = {"dataset": "pydoc", "model_kwargs": {"width": 192}, "calib_examples": 256, "train_eval_examples": 256}


@register_model(tokens=True, default_dataset="pydoc", recipe="gpt", demo=_DEMO)
def gpt(width=192, depth=4, heads=4, mlp_ratio=4, tie=True, vocab_size=97, block_size=128, head_bias=None):
    """Pre-norm character-level GPT: width 192, 4 blocks of 4 heads, 128 positions, tied LM head without bias
    (nanoGPT's shape); head_bias None: a bias only when tie=False."""
    return GPT(GPTConfig(vocab_size, block_size, width, depth, heads, mlp_ratio, tie, head_bias))
