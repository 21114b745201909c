"""Tiny modules, one per permutation rule (symmetries note, Sec. 6): each uses one kind of op on a permuted
axis. `RULE_MODELS[name] = (factory, input shape or input factory, expected)`: `expected` holds facts
about the spec that a correct tracer must find (number of groups, a structured group's block size...)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 3), nn.Linear(4, 5), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.relu(torch.cat([self.a(x), self.b(x)], dim=1)))


class TokenMixing(nn.Module):
    """A linear layer over the token axis of a tensor permuted along channels (MLP-Mixer)."""

    def __init__(self):
        super().__init__()
        self.a, self.mix, self.out = nn.Linear(4, 6), nn.Linear(3, 3), nn.Linear(6, 2)

    def forward(self, x):  # (N, 3 tokens, 4)
        h = self.a(x).transpose(1, 2)  # (N, 6, 3)
        h = self.mix(h).swapaxes(1, 2)  # mixes tokens, channels stay
        h = torch.movedim(h[:, :, :, None], (1, 2), (3, 1)).movedim(3, 1)[..., 0]  # (N, 3, 6) again
        return self.out(torch.relu(h)).mean(1)


class GroupedConv(nn.Module):
    def __init__(self, groups=2, depth_multiplier=1):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8 * depth_multiplier if groups == 8 else 12, 3, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(self.g.out_channels)
        self.out = nn.Conv2d(self.g.out_channels, 2, 1)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.g(torch.relu(self.a(x)))))).mean((2, 3))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gn, self.out = nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(F.gelu(self.gn(self.a(x)))).flatten(1)


class FusedAttention(nn.Module):
    """timm's Attention: one qkv Linear, reshape (B, N, 3, H, d), permute, unbind, fused SDPA."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.embed, self.qkv, self.proj, self.head = nn.Linear(5, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # (B, N, 5)
        x = self.embed(x)
        B, N, C = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.head(x + self.proj(a)).mean(1)


class ExplicitAttention(nn.Module):
    """Separate q, k, v projections, q @ k^T, softmax, @ v (BERT's eager path), with a padding mask."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.embed = nn.Embedding(11, dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def split(self, t):
        return t.view(t.shape[0], t.shape[1], self.h, self.d).transpose(1, 2)

    def forward(self, ids):  # (B, T) token ids
        x = self.embed(ids)
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        mask = (ids[:, None, None, :] == 0).to(x.dtype) * -1e4
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.d) + mask, dim=-1)
        a = (p @ v).transpose(1, 2).reshape(x.shape)
        return self.head(self.ln(x + self.o(a)))


class TorchMHA(nn.Module):
    """nn.MultiheadAttention (fused in_proj_weight: Q (+) K (+) V) in a pre-norm block."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.embed, self.ln = nn.Linear(3, dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        x = self.embed(x)
        h = self.ln(x)
        return self.head(x + self.attn(h, h, h, need_weights=False)[0]).mean(1)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class GQARope(nn.Module):
    """Llama-style: RMSNorm, grouped-query attention (4 query heads, 2 kv heads), rotary embeddings,
    SwiGLU MLP, tied embedding / LM head."""

    def __init__(self, dim=16, heads=4, kv_heads=2, vocab=13):
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, dim // heads
        self.embed = nn.Embedding(vocab, dim)
        self.n1, self.n2, self.nf = RMSNorm(dim), RMSNorm(dim), RMSNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k, self.v = nn.Linear(dim, kv_heads * self.d, bias=False), nn.Linear(dim, kv_heads * self.d, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.gate, self.up, self.down = nn.Linear(dim, 24, bias=False), nn.Linear(dim, 24, bias=False), nn.Linear(24, dim, bias=False)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, self.d, 2).float() / self.d), persistent=False)

    def forward(self, ids):
        B, T = ids.shape
        x = self.embed(ids)
        h = self.n1(x)
        q = self.q(h).view(B, T, self.h, self.d).transpose(1, 2)
        k = self.k(h).view(B, T, self.kv, self.d).transpose(1, 2)
        v = self.v(h).view(B, T, self.kv, self.d).transpose(1, 2)
        freqs = torch.arange(T, dtype=self.inv_freq.dtype)[:, None] * self.inv_freq[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        g = self.h // self.kv
        k = k[:, :, None].expand(B, self.kv, g, T, self.d).reshape(B, self.h, T, self.d)
        v = v[:, :, None].expand(B, self.kv, g, T, self.d).reshape(B, self.h, T, self.d)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
        x = x + self.o(a)
        x = x + self.down(F.silu(self.gate(self.n2(x))) * self.up(self.n2(x)))
        return self.lm_head(self.nf(x))


class ViTish(nn.Module):
    """Patch embedding conv, flatten + transpose, class token, position embedding, layer scale."""

    def __init__(self, dim=8):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 5, dim))
        self.fc1, self.fc2 = nn.Linear(dim, 12), nn.Linear(12, dim)
        self.gamma = nn.Parameter(torch.rand(dim))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):  # (B, 3, 8, 8)
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1) + self.pos
        t = t + self.gamma * self.fc2(F.gelu(self.fc1(self.ln(t))))
        return self.head(self.ln(t)[:, 0])


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.r, self.e, self.out = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        s = torch.sigmoid(self.e(torch.relu(self.r(h.mean((2, 3), keepdim=True)))))
        return self.out(h * s).amax((2, 3))


class CalledTwice(nn.Module):
    """One Linear applied twice (h(h(x))): its weight axes belong to both calls."""

    def __init__(self):
        super().__init__()
        self.inp, self.h, self.out = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.h(torch.relu(self.h(torch.relu(self.inp(x))))))


class ReferenceMLP(nn.Module):
    """The REPAIR reference code's MLP: x.reshape(len(x), -1) (not traceable by torch.fx)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        x = x.reshape(len(x), -1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class RelPosBias(nn.Module):
    """Swin's relative position bias: a (positions, heads) table indexed by a buffer, added per head."""

    def __init__(self, dim=8, heads=2, n=4):
        super().__init__()
        self.h, self.n = heads, n
        self.embed, self.qkv, self.proj, self.head = nn.Linear(3, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 2)
        self.table = nn.Parameter(torch.randn(2 * n - 1, heads))
        idx = torch.arange(n)[:, None] - torch.arange(n)[None] + n - 1
        self.register_buffer("index", idx.reshape(-1), persistent=False)
        self.logit_scale = nn.Parameter(torch.rand(heads, 1, 1))

    def forward(self, x):  # (B, n, 3)
        x = self.embed(x)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * torch.clamp(self.logit_scale, max=4.6).exp()
        bias = self.table[self.index].view(N, N, -1).permute(2, 0, 1)
        attn = (attn + bias.unsqueeze(0)).softmax(-1)
        return self.head(x + self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))).mean(1)


class PadShortcut(nn.Module):
    """ResNet option-A shortcut: subsample, then zero-pad the channel axis."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        sc = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
        return self.out(torch.relu(self.b(h) + sc).mean((2, 3)))


class GLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(4, 12), nn.Linear(6, 2)

    def forward(self, x):
        u, g = self.a(x).chunk(2, dim=-1)
        return self.out(u * torch.sigmoid(g))


class WeightMatmul(nn.Module):
    """x @ W with a parameter W (CLIP's projection), and GPT-2's Conv1D (addmm with a transposed weight)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 6))
        self.w2, self.b2 = nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(5))
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.relu(x @ self.w1)
        h = torch.addmm(self.b2, h, self.w2)
        return self.out(torch.tanh(h))


class ChannelShuffle(nn.Module):
    """ShuffleNetV2's units: split channels, transform one half, concatenate, shuffle; the next unit splits
    the shuffled channels again (each half holds interleaved units of both branches)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.b2, self.c, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)

    @staticmethod
    def unit(h, branch):
        x1, x2 = h.chunk(2, dim=1)
        h = torch.cat((x1, torch.relu(branch(x2))), dim=1)
        n, c, hh, ww = h.shape
        return h.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)

    def forward(self, x):
        h = self.unit(self.unit(torch.relu(self.a(x)), self.b), self.b2)
        return self.out(torch.relu(self.c(h))).mean((2, 3))


class MaskedMeanPool(nn.Module):
    """Sentence-transformers mean pooling: mask.unsqueeze(-1).expand_as(h).type_as(h) (shape and dtype lent)."""

    def __init__(self, dim=6, vocab=11):
        super().__init__()
        self.embed, self.fc, self.out = nn.Embedding(vocab, dim), nn.Linear(dim, 8), nn.Linear(8, 2)

    def forward(self, ids):  # (B, T) token ids, 0 = padding
        h = torch.relu(self.fc(self.embed(ids)))
        mask = (ids != 0).unsqueeze(-1).expand_as(h).type_as(h)
        return self.out((h * mask).sum(1) / mask.sum(1).clamp(min=1e-9))


class ReshapeAs(nn.Module):
    """LeViT's BatchNorm on tokens: x.flatten(0, 1) -> BatchNorm1d -> reshape_as(x); view_as likewise."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.out = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)

    def forward(self, x):  # (B, N, 4)
        h = self.a(x)
        h = self.bn(h.flatten(0, 1)).reshape_as(h)
        return self.out(torch.relu(h).view_as(h)).mean(1)


class EinsumAttention(nn.Module):
    """torchvision MaxViT's attention: heads on their own axis, q.k and p.v as einsums, an einsum with a weight."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.h = heads
        self.embed, self.qkv, self.head = nn.Linear(3, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, 2)
        self.w_out = nn.Parameter(torch.randn(dim, dim) / dim**0.5)

    def forward(self, x):  # (B, G, N, 3): G windows of N tokens
        x = self.embed(x)
        B, G, N, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, G, N, self.h, C // self.h).permute(0, 1, 3, 2, 4) for t in (q, k, v))
        p = torch.einsum("bghid,bghjd->bghij", q, k).softmax(-1)
        a = torch.einsum("bghij,bghjd->bghid", p, v).permute(0, 1, 3, 2, 4).reshape(B, G, N, C)
        return self.head(x + torch.einsum("bgnc,cd->bgnd", a, self.w_out)).mean((1, 2))


class Upsample(nn.Module):
    """HRNet's fuse layer: a low-resolution branch upsampled (nearest, bilinear) and added to the high one."""

    def __init__(self):
        super().__init__()
        self.hi, self.lo, self.out = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        lo = self.lo(x)
        h = self.hi(x) + F.interpolate(lo, scale_factor=2.0, mode="nearest") + F.interpolate(lo, size=x.shape[-2:], mode="bilinear")
        return self.out(torch.relu(h)).mean((2, 3))


class AutocastBlock(nn.Module):
    """EfficientViT's `with torch.autocast(..., enabled=False)` inside forward: export wraps the block in a
    higher-order op with its own subgraph (no_grad likewise)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        with torch.autocast("cpu", enabled=False):
            h = torch.relu(self.b(h)) * h
        with torch.no_grad():
            h = h - h.mean(-1, keepdim=True)
        return self.out(h)


class SliceAssign(nn.Module):
    """In-place writes through views (functionalised as slice/select scatters): Swin's attention mask built by
    slice assignment into new_zeros, a token slice of an activation scaled in place, a transposed view written."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):  # (B, 4 tokens, 3)
        h = self.a(x)
        mask = h.new_zeros(4, 4)
        mask[:2, 2:] = -1.0
        mask[2:, :2] = -2.0
        mask.t()[0] += 0.5
        h[:, 1:3] *= 2
        h[:, 0] = h[:, 0] + 1
        return self.out(torch.relu(h) * (1 + mask.sum(-1, keepdim=True))).mean(1)


class PartialResidual(nn.Module):
    """ReXNet's shortcut into the first channels of a wider output: cat([y[:, :c] + x, y[:, c:]]), three times,
    so that the residual stream is cut at a different place in each block."""

    def __init__(self):
        super().__init__()
        self.stem, self.out = nn.Conv2d(3, 4, 1), nn.Conv2d(11, 2, 1)
        self.c = nn.ModuleList([nn.Conv2d(4, 6, 1), nn.Conv2d(6, 9, 1), nn.Conv2d(9, 11, 1)])

    def forward(self, x):
        x = self.stem(x)
        for conv in self.c:
            y = conv(torch.relu(x))
            x = torch.cat([y[:, : x.shape[1]] + x, y[:, x.shape[1] :]], dim=1)
        return self.out(x).mean((2, 3))


class ConcatenatedBias(nn.Module):
    """BEiT's attention: F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias)), k_bias a non-persistent zero
    buffer (a constant that does not vary: its part of the output is free too); fused attention whose mask is
    a relative position bias table indexed per head."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.h = heads
        self.embed, self.qkv, self.head = nn.Linear(3, dim), nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, 2)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.table = nn.Parameter(torch.randn(7, heads))
        self.register_buffer("index", (torch.arange(4)[:, None] - torch.arange(4)[None] + 3).reshape(-1), persistent=False)

    def forward(self, x):  # (B, N, 3)
        x = self.embed(x)
        B, N, C = x.shape
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index].view(N, N, -1).permute(2, 0, 1).unsqueeze(0)  # a relative position bias per head
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(B, N, C)
        return self.head(x + a).mean(1)


class StackWithWeight(nn.Module):
    """An activation stacked with a weight and a constant on a new axis, then reduced (a weight that meets a
    permuted tensor through stack must follow it)."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(3, 5), nn.Linear(5, 2)
        self.w = nn.Parameter(torch.randn(5))

    def forward(self, x):  # (B, 3)
        h = self.a(x)
        s = torch.stack([h, self.w.expand_as(h), torch.ones_like(h)], dim=1)  # (B, 3, 5)
        return self.out(torch.relu(s).prod(1))


class StdConv(nn.Conv2d):
    """NFNet's ScaledStdConv2d: the weight standardised per output channel by a functional batch_norm, with a gain."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, weight=(self.gain * 0.7).reshape(-1),
                         training=True, momentum=0.0, eps=1e-5).reshape_as(self.weight)  # fmt: skip
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class WeightStandardization(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = StdConv(3, 6, 3, padding=1), StdConv(6, 5, 1), nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


class CrossCovarianceAttention(nn.Module):
    """XCiT's XCA: attention over channels, softmax(q^T k * temperature) v with q, k normalised over tokens,
    then CoaT's factorised attention q @ (softmax(k)^T v): products whose two kept axes are both insides of
    heads (the tracer keeps one and holds the other in place)."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.h = heads
        self.embed, self.qkv, self.qkv2 = nn.Linear(3, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.proj, self.proj2, self.head = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, 2)
        self.temperature = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)

    def forward(self, x):  # (B, N, 3)
        x = self.embed(x)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 4, 1).unbind(0)  # (B, h, d, N)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(-1)  # (B, h, d, d)
        x = x + self.proj((attn @ v).permute(0, 3, 1, 2).reshape(B, N, C))
        q, k, v = self.qkv2(x).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d)
        factor = k.softmax(dim=2).transpose(-1, -2) @ v  # (B, h, d, d)
        x = x + self.proj2((q @ factor).transpose(1, 2).reshape(B, N, C))
        return self.head(x).mean(1)


def ids(shape, vocab):
    def make(dtype):
        g = torch.Generator().manual_seed(0)
        return torch.randint(1, vocab, shape, generator=g)

    return make


RULE_MODELS = {
    "concat": (Concat, (3, 4), {"groups": 2}),
    "token_mixing": (TokenMixing, (2, 3, 4), {"groups": 1}),
    "grouped_conv": (lambda: GroupedConv(groups=2), (2, 3, 6, 6), {"structured": 2}),
    "depthwise_conv": (lambda: GroupedConv(groups=8), (2, 3, 6, 6), {"groups": 1}),
    "depth_multiplier": (lambda: GroupedConv(groups=8, depth_multiplier=2), (2, 3, 6, 6), {"structured": 1}),
    "group_norm": (GroupNormNet, (2, 3, 4, 4), {"structured": 1}),
    "fused_attention": (FusedAttention, (2, 4, 5), {"structured": 2}),
    "explicit_attention": (ExplicitAttention, ids((2, 5), 11), {"structured": 2}),
    "torch_mha": (TorchMHA, (2, 4, 3), {"structured": 2}),
    "gqa_rope": (GQARope, ids((2, 5), 13), {}),
    "vit": (ViTish, (2, 3, 8, 8), {}),
    "squeeze_excite": (SqueezeExcite, (2, 3, 6, 6), {"groups": 2}),
    "called_twice": (CalledTwice, (2, 3), {}),
    "reference_mlp": (ReferenceMLP, (2, 3, 4), {"groups": 2}),
    "rel_pos_bias": (RelPosBias, (2, 4, 3), {"structured": 2}),
    "pad_shortcut": (PadShortcut, (2, 3, 8, 8), {}),
    "glu": (GLU, (3, 4), {"groups": 1}),
    "weight_matmul": (WeightMatmul, (3, 4), {"groups": 2}),
    "channel_shuffle": (ChannelShuffle, (2, 3, 4, 4), {}),
    "masked_mean_pool": (MaskedMeanPool, lambda dtype: torch.tensor([[3, 5, 7, 0], [2, 0, 0, 0]]), {"groups": 2}),
    "reshape_as": (ReshapeAs, (2, 3, 4), {"groups": 1}),
    "upsample": (Upsample, (2, 3, 6, 6), {"groups": 1}),
    "autocast_block": (AutocastBlock, (3, 4), {"groups": 1}),
    "slice_assign": (SliceAssign, (2, 4, 3), {"groups": 1}),
    "partial_residual": (PartialResidual, (2, 3, 4, 4), {"groups": 4}),
    "concatenated_bias": (ConcatenatedBias, (2, 4, 3), {"structured": 2}),
    "stack_with_weight": (StackWithWeight, (3, 3), {"groups": 1}),
    "weight_standardization": (WeightStandardization, (2, 3, 5, 5), {"groups": 2}),
    "cross_covariance_attention": (CrossCovarianceAttention, (2, 5, 3), {}),
    "einsum_attention": (EinsumAttention, (2, 3, 4, 3), {"structured": 2}),
}
