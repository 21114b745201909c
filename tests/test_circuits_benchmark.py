"""benchmarks/_circuits.py: the widened pair computes the endpoints, and its interpolation is the interpolation of
every head's QK and OV circuits (computed here by hand, head by head)."""

import math
import sys
from pathlib import Path

import torch

from onebasin.interpolate import interpolate_model
from onebasin.models import create_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _circuits import expand_pair  # noqa: E402


def _pair():
    torch.manual_seed(0)
    a = create_model("gpt", width=16, depth=2, heads=4, vocab_size=11, block_size=8).double().eval()
    torch.manual_seed(1)
    b = create_model("gpt", width=16, depth=2, heads=4, vocab_size=11, block_size=8).double().eval()
    for m in (a, b):  # nonzero biases, so that the circuits' bias terms are exercised
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.3)
    return a, b, torch.randint(0, 11, (3, 8))


def test_widened_endpoints_compute_the_endpoints():
    a, b, ids = _pair()
    ea, eb = expand_pair(a, b)
    with torch.no_grad():
        assert (ea(ids) - a(ids)).abs().max() < 1e-10 and (eb(ids) - b(ids)).abs().max() < 1e-10


def _circuit_attention(att_a, att_b, lam, x):
    """(B, T, C) output of the head-wise interpolated circuits: softmax((1-l) q_A k_A^T + l q_B k_B^T) / sqrt(d)
    (causal), each head's (1 - l) O_A v_A + l O_B v_B, plus the interpolated output bias."""
    B, T, C = x.shape
    H = att_a.heads
    d = C // H
    out = torch.lerp(att_a.proj.bias, att_b.proj.bias, lam).expand(B, T, C).clone()
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for h in range(H):
        rows = slice(h * d, (h + 1) * d)
        proj = lambda m: (x @ m.weight[rows].T + m.bias[rows])  # noqa: E731
        score = ((1 - lam) * proj(att_a.query) @ proj(att_a.key).transpose(1, 2)
                 + lam * proj(att_b.query) @ proj(att_b.key).transpose(1, 2)) / math.sqrt(d)
        weights = score.masked_fill(~mask, -math.inf).softmax(-1)
        out += (1 - lam) * (weights @ proj(att_a.value)) @ att_a.proj.weight[:, rows].T
        out += lam * (weights @ proj(att_b.value)) @ att_b.proj.weight[:, rows].T
    return out


def test_interpolating_the_widened_pair_interpolates_each_heads_circuits():
    a, b, ids = _pair()
    ea, eb = expand_pair(a, b)
    lam = 0.3
    mid = interpolate_model(ea, eb, lam)
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    for i in range(2):
        want = _circuit_attention(a.blocks[i].attn, b.blocks[i].attn, lam, x)
        with torch.no_grad():
            got = mid.blocks[i].attn(x)
        assert (got - want).abs().max() < 1e-10
    plain = interpolate_model(a, b, lam)  # the factors' interpolation differs: the test can tell them apart
    with torch.no_grad():
        assert (plain.blocks[0].attn(x) - _circuit_attention(a.blocks[0].attn, b.blocks[0].attn, lam, x)).abs().max() > 1e-3
