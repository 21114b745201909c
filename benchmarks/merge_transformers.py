"""Merging two transformers trained from different seeds (issues 15, 25): ViT on FashionMNIST, character GPTs on
pydoc (untied head with a bias; nanoGPT's tied head without one), and the demo's 10-layer MNIST MLP.

    python benchmarks/merge_transformers.py                 # every pair, every method, resumable
    python benchmarks/merge_transformers.py --only vit --table
    python benchmarks/merge_transformers.py --only gpt_tied --learned epochs=4,lr=0.1

Endpoints: `onebasin train --model vit|gpt` seeds 0 and 1 with the recipes of docs/training.md, read from
$ONEBASIN_CACHE/endpoints (the demo's cache names). For each pair and alignment (plain = none, activation,
weight, orthogonal = permutations + an orthogonal map of the residual stream from activations, Theus et al.
2025; orthogonal_weights = their data-free weight matching; learned_<init> = learned matching, issue 25, started
from weight matching, the orthogonal method or activation matching, with REPAIR in its loop; on the tied GPT the
orthogonal and learned rows give the LM head its own copy, `untie=True`) and each
correction (none; exact REPAIR at the Linear outputs and LayerNorm outputs, ("layer", "norm"), all folded
into weights and norms): the barrier curve over 11 alphas on `--test` held-out examples, the loss barrier
(eq. 1) and the midpoint's metric (test accuracy for the ViT, validation loss in bits per character for
the GPT), the wall time of the alignment and, beside it, that of one training epoch of endpoint A (the
median epoch of its checkpoint's history). Rows go to benchmarks/results/transformers/results.csv,
curves to curves_<pair>.png; with --variance, the per-site variance ratios of each pair's midpoint (plain /
aligned / aligned + REPAIR) to variance_<pair>.png and variance.csv.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from _circuits import expand_pair
from onebasin.align import align
from onebasin.checkpoint import load_model
from onebasin.diagnostics import variance_ratios
from onebasin.experiment import evaluation_batches
from onebasin.barrier import barrier_curve
from onebasin.interpolate import interpolate_model
from onebasin.plots import plot_series
from onebasin.repair import endpoint_stats, repair
from onebasin.report import read_csv, write_csv
from onebasin.spec import trace

print = functools.partial(print, flush=True)  # noqa: A001
OUT = Path(__file__).resolve().parent / "results" / "transformers"
PAIRS = {  # endpoint cache name, dataset, image size, calibration examples, held-out examples
    "vit": ("vit_width128_fashionmnist_e3_s{}", "fashionmnist", 28, 2000, 2000),
    "gpt": ("gpt_tieFalse_width192_pydoc_e6_s{}", "pydoc", None, 512, 2000),  # untied head with a bias
    "gpt_tied": ("gpt_width192_pydoc_e6_s{}", "pydoc", None, 512, 2000),  # nanoGPT's shape: tied head, no bias
    "mlp": ("mlp_depth10_width128_mnist_e8_lr0.1_warmup0.25_s{}", "mnist", 28, 2000, 10000),  # the demo's pair
}
TRANSFORMER_METHODS = ["none", "activation", "weight", "orthogonal", "orthogonal_weights", "orthogonal_heads",
                       "orthogonal_weights_heads", "learned_weight", "learned_orthogonal", "learned_orthogonal_heads",
                       "learned_weight_heads", "learned_orthogonal_linear", "learned_weight_linear"]
MLP_METHODS = ["none", "activation", "weight", "learned_weight", "learned_activation"]
OPTIONS = {  # row name -> (alignment method, its options)
    "orthogonal_weights": ("orthogonal", {"stream": "weights"}),  # Theus et al.'s data-free weight matching
    "orthogonal_heads": ("orthogonal", {"heads": "orthogonal"}),  # with orthogonal maps inside heads (session 10)
    "orthogonal_weights_heads": ("orthogonal", {"stream": "weights", "heads": "orthogonal"}),
    "learned_weight": ("learned", {"init": "weight"}),
    "learned_orthogonal": ("learned", {"init": "orthogonal"}),
    "learned_activation": ("learned", {"init": "activation"}),
    "learned_orthogonal_heads": ("learned", {"init": "orthogonal", "heads": "orthogonal"}),  # maps inside heads learnt
    "learned_weight_heads": ("learned", {"init": "weight", "heads": "orthogonal"}),
    "learned_orthogonal_linear": ("learned", {"init": "orthogonal", "heads": "linear"}),  # any invertible map inside heads
    "learned_weight_linear": ("learned", {"init": "weight", "heads": "linear"}),
}
LEARNED = {"vit": {"batch_size": 100}, "gpt": {"batch_size": 16}, "gpt_tied": {"batch_size": 16}, "mlp": {"batch_size": 100}}
SITES = ("layer", "norm")
ALPHAS = [i / 10 for i in range(11)]


def methods(pair: str) -> list[str]:
    return MLP_METHODS if pair == "mlp" else TRANSFORMER_METHODS


def alignment(pair: str, method: str, learned: dict) -> tuple[str, dict]:
    """(method, options) of a row: the tied GPT's orthogonal and learned rows give the head its own copy."""
    name, options = OPTIONS.get(method, (method, {}))
    if name == "learned":
        options = {**options, **LEARNED[pair], **learned, "progress": False}
    if pair == "gpt_tied" and name in ("orthogonal", "learned"):
        options = {**options, "untie": True}
    return name, options


def endpoints(pair: str, cache: Path):
    name = PAIRS[pair][0]
    return [load_model(cache / "endpoints" / f"{name.format(s)}.safetensors")[0].eval() for s in (0, 1)]


def epoch_seconds(pair: str, cache: Path) -> float:
    """Median wall time of one training epoch of endpoint A (its checkpoint's history)."""
    meta = json.loads((cache / "endpoints" / f"{PAIRS[pair][0].format(0)}.json").read_text())
    return statistics.median(e["epoch_time_s"] for e in meta["history"])


def data(pair: str, data_dir: str, calib: int, test: int):
    _, dataset, size, _, _ = PAIRS[pair]
    loaders, calib_batches = evaluation_batches(dataset, size, data_dir=data_dir, calib_examples=calib,
                                                train_examples=calib, test_examples=test)
    return {"test": loaders["test"]}, calib_batches


def run_pair(pair: str, args, rows: list[dict]) -> None:
    a, b = endpoints(pair, Path(args.cache))
    n_calib, n_test = args.calib or PAIRS[pair][3], args.test or PAIRS[pair][4]
    loaders, calib = data(pair, args.data_dir, n_calib, n_test)
    first = calib[0][0][:64] if isinstance(calib[0], (tuple, list)) else calib[0]
    spec = trace(a, first)
    done = {(r["pair"], r["method"], r["correction"]) for r in rows}
    learned = dict(kv.split("=") for kv in args.learned.split(",") if kv)
    learned = {k: v if v.isalpha() else json.loads(v) for k, v in learned.items()}  # init=identity, epochs=2, lr=1e-2
    circuits = args.circuits and pair != "mlp"
    for method in [m for m in methods(pair) if not args.methods or m in args.methods]:
        names = [method] + ([f"{method}:circuits"] if circuits else [])
        if all((pair, m, c) in done for m in names for c in ("none", "repair")):
            continue
        t0 = time.perf_counter()
        if method == "none":
            a_m, b_m, record = a, b, {}
        else:
            name, options = alignment(pair, method, learned)
            b_m, result = align(a, b, name, calib, spec=spec, max_examples=n_calib, precision=args.precision, **options)
            a_m, record = (result.models[0] if result.models is not None else a), result.record
        align_s = time.perf_counter() - t0
        pairs = {method: (a_m, b_m, spec)}
        if circuits:
            wide = expand_pair(a_m, b_m)
            pairs[f"{method}:circuits"] = (*wide, trace(wide[0], first))
        for row_name, (m_a, m_b, m_spec) in pairs.items():
            for correction in ("none", "repair"):
                if (pair, row_name, correction) not in done:
                    row = curve_row(pair, row_name, correction, m_a, m_b, m_spec, loaders, calib, args, align_s, record)
                    rows.append(row)
                    save_row(row)


def save_row(row: dict) -> None:
    """Add (or replace) one row of results.csv, read afresh: runs of other pairs or methods at the same time keep
    their rows (each used to write back the rows it had read at its start, dropping those written since)."""
    key = (row["pair"], row["method"], row["correction"])
    old = [r for r in read_csv(OUT / "results.csv") if (r["pair"], r["method"], r["correction"]) != key]
    write_csv(OUT / "results.csv", old + [row])


def curve_row(pair, method, correction, a_m, b_m, spec, loaders, calib, args, align_s, record) -> dict:
    """One row of results.csv: the barrier curve of (a_m, b_m), REPAIRed or not, and what it cost."""
    n_calib, n_test = args.calib or PAIRS[pair][3], args.test or PAIRS[pair][4]
    t1 = time.perf_counter()
    alphas = args.repair_alphas if correction == "repair" else ALPHAS
    curve = barrier_curve(a_m, b_m, loaders, alphas, "repair_exact" if correction == "repair" else None,
                          calib_data=calib, max_examples=n_calib, spec=spec, sites=SITES, precision=args.precision)
    mid = alphas.index(0.5)
    loss = curve.loss["test"]
    row = {"pair": pair, "method": method, "correction": correction,
           "loss_a": loss[0], "loss_b": loss[-1], "mid_loss": loss[mid], "loss_barrier": curve.barrier("test", "loss"),
           "acc_a": curve.acc["test"][0], "acc_b": curve.acc["test"][-1], "mid_acc": curve.acc["test"][mid],
           "mid_bpc": loss[mid] / math.log(2), "align_s": round(align_s, 1), "curve_s": round(time.perf_counter() - t1, 1),
           "losses": " ".join(f"{v:.4f}" for v in loss), "alphas": " ".join(f"{v:g}" for v in alphas), "calib": n_calib, "test": n_test,
           "epoch_s": round(epoch_seconds(pair, Path(args.cache)), 1), "steps": record.get("steps", ""),
           "chosen": record.get("chosen", ""), "precision": args.precision, "options": args.learned if "learned" in method else ""}  # fmt: skip
    print(f"{pair} {method:>10} {correction:>6}: mid loss {row['mid_loss']:.4f} (endpoints {loss[0]:.4f}, "
          f"{loss[-1]:.4f}), barrier {row['loss_barrier']:.4f}, mid acc {row['mid_acc']:.4f}, align {align_s:.0f} s")
    return row


def variance_study(pair: str, args) -> None:
    """Per-site variance ratios of a pair's midpoint: plain, activation-aligned, aligned + REPAIR at SITES."""
    a, b = endpoints(pair, Path(args.cache))
    n_calib = args.calib or PAIRS[pair][3]
    _, calib = data(pair, args.data_dir, n_calib, args.test or PAIRS[pair][4])
    spec = trace(a, calib[0][0][:64] if isinstance(calib[0], (tuple, list)) else calib[0])
    b_al, _ = align(a, b, "activation", calib, spec=spec, max_examples=n_calib)
    ends = {"plain": endpoint_stats(a, b, calib, spec, max_examples=n_calib),
            "aligned": endpoint_stats(a, b_al, calib, spec, max_examples=n_calib)}
    mids = {"plain": (interpolate_model(a, b, 0.5), "plain"), "aligned": (interpolate_model(a, b_al, 0.5), "aligned"),
            "aligned+REPAIR": (repair(a, b_al, 0.5, calib, spec=spec, sites=SITES, max_examples=n_calib).model, "aligned")}
    old = [r for r in read_csv(OUT / "variance.csv") if r["pair"] != pair]
    rows, series = [], {}
    for label, (model, ends_key) in mids.items():
        other = b if ends_key == "plain" else b_al
        ratios = variance_ratios(a, other, model, calib, endpoints=ends[ends_key], max_examples=n_calib)
        series[label] = ([i for i in range(len(ratios))], [r for _, r in ratios])
        rows += [{"pair": pair, "curve": label, "index": i, "site": s.module or s.node, "kind": s.kind, "ratio": r}
                 for i, (s, r) in enumerate(ratios)]
    write_csv(OUT / "variance.csv", old + rows)
    plot_series(series, OUT / f"variance_{pair}.png", "site (forward order: layer, norm and residual sites)",
                "std_alpha / mean(std_A, std_B)", title=f"{pair} midpoint: variance collapse per site")
    print(f"wrote {OUT / f'variance_{pair}.png'}")


def plot_curves(rows: list[dict]) -> None:
    for pair in dict.fromkeys(r["pair"] for r in rows):
        series = {}
        for r in rows:
            if r["pair"] == pair and ":circuits" not in r["method"] and not r["method"].endswith("_heads"):  # in the table only
                losses = [float(v) for v in r["losses"].split()]
                alphas = [float(v) for v in r["alphas"].split()] if r.get("alphas") else ALPHAS
                series[f"{r['method']}{' + REPAIR' if r['correction'] == 'repair' else ''}"] = (alphas, losses)
        plot_series(series, OUT / f"curves_{pair}.png", "alpha", "test loss" if PAIRS[pair][1] != "pydoc" else "validation loss (nats/char)",
                    title=f"{pair}: loss along the interpolation path")


def table(rows: list[dict]) -> None:
    print("| pair | alignment | REPAIR | loss barrier | removed | midpoint | endpoints | align (s) | 1 epoch (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    plain = {r["pair"]: float(r["loss_barrier"]) for r in rows if r["method"] == "none" and r["correction"] == "none"}
    for r in rows:
        metric = (f"{float(r['mid_acc']) * 100:.2f} %", f"{float(r['acc_a']) * 100:.2f} / {float(r['acc_b']) * 100:.2f} %") if PAIRS[r["pair"]][1] != "pydoc" \
            else (f"{float(r['mid_bpc']):.3f} bpc", f"{float(r['loss_a']) / math.log(2):.3f} / {float(r['loss_b']) / math.log(2):.3f} bpc")
        removed = 1 - float(r["loss_barrier"]) / plain[r["pair"]] if r["pair"] in plain else float("nan")
        print(f"| {r['pair']} | {r['method']} | {'yes' if r['correction'] == 'repair' else 'no'} | {float(r['loss_barrier']):.3f} | "
              f"{removed * 100:.0f} % | {metric[0]} | {metric[1]} | {r['align_s']} | {r.get('epoch_s') or ''} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="vit,gpt,gpt_tied,mlp")
    p.add_argument("--cache", default=os.environ.get("ONEBASIN_CACHE", str(Path.home() / ".cache" / "onebasin")))
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--calib", type=int, help="calibration examples (alignment and REPAIR statistics; default: PAIRS')")
    p.add_argument("--test", type=int, help="held-out examples of each curve (default: PAIRS')")
    p.add_argument("--repair-alphas", default=",".join(f"{a:g}" for a in ALPHAS),
                   type=lambda v: [float(a) for a in v.split(",")], help="alphas of the REPAIRed curves (default: all 11)")
    p.add_argument("--learned", default="", help="options of the learned rows, e.g. epochs=2,lr=0.1")
    p.add_argument("--methods", type=lambda v: v.split(","), help="only these rows' alignments (default: all)")
    p.add_argument("--circuits", action="store_true", help="also each transformer row in Theus et al.'s merge space: every "
                   "head's QK and OV circuits interpolated (_circuits.py; rows '<method>:circuits')")
    p.add_argument("--precision", default="float32", choices=["float32", "float64"], help="of every statistic")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", action="store_true", help="only print results.csv as markdown and redraw the plots")
    p.add_argument("--variance", action="store_true", help="only the variance-collapse study of each --only pair")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    rows = [{**r, "precision": r.get("precision") or "float64"} for r in read_csv(OUT / "results.csv")]  # issue 15's: float64
    if args.table:
        table(rows), plot_curves(rows)
        return
    if args.variance:
        for pair in args.only.split(","):
            variance_study(pair, args)
        return
    for pair in args.only.split(","):
        run_pair(pair, args, rows)
    plot_curves(rows)
    table(rows)


if __name__ == "__main__":
    main()
