"""float32 vs float64 statistics on trained pairs (issue 26): the same permutations, the same merged accuracy?

    python benchmarks/precision.py                      # the demo's cached MLP pair (10 x 128, MNIST)
    python benchmarks/precision.py --endpoints A B --dataset fashionmnist   # any two onebasin checkpoints

Activation matching at both precisions on the calibration set the demo uses (5,000 training images): per
group, whether the permutations are equal, and where they differ whether it is a tie (both reach the same
float64 objective to 1e-5 per unit, the float32 sums' error). Then merge (activation matching + exact REPAIR)
at both precisions: midpoint test accuracy and loss, and the largest difference between the merged weights.
"""

from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path

import torch

from onebasin.align import get_method
from onebasin.align._registry import matched
from onebasin.align.activation import correlation_matrix, site_moments
from onebasin.checkpoint import load_model
from onebasin.experiment import evaluation_batches
from onebasin.interpolate import evaluate
from onebasin.models import model_info
from onebasin.pipeline import merge
from onebasin.spec import trace

CACHE = Path(os.environ.get("ONEBASIN_CACHE", Path.home() / ".cache" / "onebasin")) / "endpoints"
DEMO = "mlp_depth10_width128_mnist_e8_lr0.1_warmup0.25_s{}.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--endpoints", nargs=2, default=[str(CACHE / DEMO.format(s)) for s in (0, 1)])
    parser.add_argument("--data-dir", default=os.environ.get("ONEBASIN_DATA", "/work/shared/data"))
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--calib-examples", type=int, default=5000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    (a, meta), (b, _) = (load_model(p) for p in args.endpoints)
    a, b = a.eval(), b.eval()
    size = meta.get("image_size") or model_info(meta["model"]).image_size
    loaders, calib = evaluation_batches(args.dataset, size, data_dir=args.data_dir, calib_examples=args.calib_examples)
    spec = trace(a, calib[0][0][:64])
    moments = {p: site_moments(spec, a, b, calib, max_examples=args.calib_examples, precision=p)[0] for p in ("float64", "float32")}
    perms = {p: get_method("activation")(spec, a, b, calib, max_examples=args.calib_examples, precision=p).perms
             for p in ("float64", "float32")}
    print("| group | units | permutations equal | units differing | objective gap per unit (float64 sums) | max corr difference |")
    print("|---|---|---|---|---|---|")
    for g in perms["float64"]:
        p64, p32 = perms["float64"][g], perms["float32"][g]
        corr = correlation_matrix(moments["float64"][g]) if g in moments["float64"] else None
        gap = abs(matched(corr, p64) - matched(corr, p32)) / len(p64) if corr is not None else float("nan")
        diff = (corr - correlation_matrix(moments["float32"][g])).abs().max().item() if corr is not None else float("nan")
        print(f"| {g} | {len(p64)} | {torch.equal(p64, p32)} | {int((p64 != p32).sum())} | {gap:.2e} | {diff:.2e} |")
    print("\n| precision | midpoint test acc | midpoint test loss |")
    print("|---|---|---|")
    merged = {}
    for p in ("float64", "float32"):
        merged[p], _ = merge(a, b, method="activation", repair="exact", data=calib, max_examples=args.calib_examples, precision=p)
        loss, acc = evaluate(merged[p], loaders["test"])
        print(f"| {p} | {acc:.4f} | {loss:.4f} |")
    sd64, sd32 = merged["float64"].state_dict(), merged["float32"].state_dict()
    print(f"\nlargest |weight difference| between the two merged models: {max((sd64[k] - sd32[k]).abs().max().item() for k in sd64):.2e}")


if __name__ == "__main__":
    main()
