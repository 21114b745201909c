"""The memory and time model of activation matching's statistics at the scale of real networks (issue 26).

    python benchmarks/scaling.py            # ResNet50 (ImageNet), ViT-B/16, GPT-2 small, a 7B Llama-shaped config

Memory: per site of n units the paired float64 sums hold the (n, n) cross sums x^T y and four (n,) per-unit
sums: 8 (n^2 + 4 n) bytes (`align.activation._sum_bytes`). Their total over a network's sites is what one
process holds with no budget; `max_memory` packs whole families of groups into passes over the data
(`statistics_passes`), and under torchrun each family is owned by one rank (`family_owners`), so a rank holds
about total / world, never less than the largest family. Time: the floor of activation matching is one
forward pass of A and B plus the cross products, 2 n^2 multiply-adds per sample per site; their ratio to
the forward pass's FLOPs (torch.utils.flop_counter) is printed.

Measured, not assumed: each network is traced (onebasin.trace) at its real widths; transformers at depths 1,
2 and 3 (and the 7B config at 1 and 2, with a 256-token vocabulary: the vocabulary holds no site), and the
totals extrapolated linearly in depth, which the depth-3 trace checks (printed as the extrapolation error).
"""

from __future__ import annotations

import math

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from onebasin.align._structured import family_root
from onebasin.align.activation import _sum_bytes, family_owners, statistics_passes
from onebasin.graph import as_call
from onebasin.spec import trace

GiB = 2**30


def measure(model, x) -> dict:
    """Sums' bytes (total, largest family), sites, and per input example: cross-product and forward FLOPs."""
    model.eval()
    spec = trace(model, x)
    groups = [g for g in spec.groups.values() if g.sites]
    families: dict[str, list[str]] = {}
    for g in groups:
        families.setdefault(family_root(spec, g.name), []).append(g.name)
    rows = next(iter(x.values())).shape[0] if isinstance(x, dict) else x.shape[0]
    cross = 0.0
    for g in groups:
        for s in g.sites:
            shape = [_hint(d) for d in spec.graph.node(s.node).meta["val"].shape]
            cross += 2 * g.size**2 * math.prod(shape) / shape[s.dim] / rows  # samples per example x 2 n^2
    args, kwargs = as_call(x)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return {"total": _sum_bytes(spec, [g.name for g in groups]), "family": max(_sum_bytes(spec, f) for f in families.values()),
            "sites": sum(len(g.sites) for g in groups), "cross_flops": cross, "forward_flops": counter.get_total_flops() / rows,
            "spec": spec, "groups": [g.name for g in groups]}


def _hint(d) -> int:
    """A dimension of a traced shape as the example's number (a dynamic batch axis is symbolic)."""
    return int(d.node.hint) if isinstance(d, torch.SymInt) else int(d)


def gpt2(depth, width=768, heads=12):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=depth, n_embd=width, n_head=heads, vocab_size=256, n_positions=1024, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg), {"input_ids": torch.randint(256, (2, 1024))}


def llama(depth, width=4096, inter=11008, heads=32, kv=32, tokens=512):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=width, intermediate_size=inter, num_hidden_layers=depth, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=256, max_position_embeddings=tokens, use_cache=False)
    return LlamaForCausalLM(cfg), {"input_ids": torch.randint(256, (1, tokens))}


def extrapolated(build, depths, target):
    """measure() at two depths, extrapolated linearly to `target` blocks; with a third depth, its error."""
    m = [measure(*build(d)) for d in depths[:2]]
    keys = ("total", "sites", "cross_flops", "forward_flops")
    per_block = {k: (m[1][k] - m[0][k]) / (depths[1] - depths[0]) for k in keys}
    out = {k: m[0][k] + per_block[k] * (target - depths[0]) for k in keys}
    out["family"] = max(m[0]["family"], m[1]["family"] + (m[1]["family"] - m[0]["family"]) * (target - depths[1]))
    if len(depths) > 2:
        check = measure(*build(depths[2]))
        predicted = m[0]["total"] + per_block["total"] * (depths[2] - depths[0])
        out["check"] = f"depth {depths[2]}: predicted {predicted / 2**20:.1f} MiB, traced {check['total'] / 2**20:.1f} MiB"
    return out


def report(name, r, budget=4 * GiB, world=8) -> None:
    passes = max(1, math.ceil(r["total"] / budget)) if r["family"] <= budget else "family > budget"
    per_rank = max(r["total"] / world, r["family"])
    print(f"| {name} | {r['sites']:.0f} | {r['total'] / GiB:.2f} | {r['family'] / GiB:.2f} | {passes} | "
          f"{per_rank / GiB:.2f} | {r['cross_flops'] / r['forward_flops']:.2f} | {r.get('check', '')} |")


def main() -> None:
    torch.set_num_threads(2)
    print("| network | sites | float64 sums, one process (GiB) | largest family (GiB) | passes at 4 GiB | per rank of 8 (GiB) "
          "| cross-product / forward FLOPs | extrapolation check |")
    print("|---|---|---|---|---|---|---|---|")
    report("ResNet50, ImageNet 224x224", measure(torchvision.models.resnet50(), torch.randn(2, 3, 224, 224)))
    report("ViT-B/16, 224x224", measure(torchvision.models.vit_b_16(), torch.randn(2, 3, 224, 224)))
    report("GPT-2 small, 1024 tokens", extrapolated(gpt2, (1, 2, 3), 12))
    report("Llama-shaped 7B (32 x 4096, MLP 11008), 512 tokens", extrapolated(llama, (1, 2), 32))
    narrow = extrapolated(lambda d: llama(d, width=256, inter=688, heads=8, kv=8, tokens=64), (1, 2, 3), 32)
    print(f"\nthe linear extrapolation in depth, checked on a narrow Llama (256 x 688): {narrow['check']}")


if __name__ == "__main__":
    main()
