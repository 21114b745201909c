"""Merging N models (issue 17): endpoints from seeds 0..N-1 (cached), merged by every method of `merge_many`.

    python benchmarks/merge_many.py --train            # train every endpoint not yet cached (resumable per epoch)
    python benchmarks/merge_many.py                    # every setting not yet in merge_many.csv, in priority order
    python benchmarks/merge_many.py --only mlp-mnist-128-n5     # one setting (comma-separated list allowed)
    python benchmarks/merge_many.py --list | --table   # the settings | the markdown tables of docs/results.md

For each setting (a model family and N), calibration draw (`--draws`: the calibration images, used for the
alignment statistics and for REPAIR, sampled with seeds 0, 1, 2) and method (plain averaging = "none",
anchor, mergemany, universe) one CSV row: test accuracy and loss of the merged model without correction, with exact N-way
REPAIR (and BN reset for BatchNorm nets), beside the endpoints' mean and the output ensemble (mean softmax);
the cycle-consistency measures; wall times: `seconds_align` (statistics pass and solver, from the call
without correction), `seconds_repair` (N-way REPAIR: goal statistics and one pass per dependency level; the
corrected merges reuse the permutations of the uncorrected one). Endpoints are cached under $ONEBASIN_CACHE (default /work/cache) and trained with the
recipes below; rows already in benchmarks/results/merge_many/merge_many.csv are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from pathlib import Path

import torch

from onebasin.checkpoint import checkpoint_paths, load_model
from _common import commit_hash
from onebasin.diagnostics import merge_diagnostics
from onebasin.pipeline import merge_many
from onebasin.data import batches, dataset_info, load_dataset, take
from onebasin.experiment import Experiment, endpoint, endpoint_path, evaluation_data
from onebasin.models import create_model, data_kwargs, model_info
from onebasin.interpolate import evaluate
from onebasin.report import read_csv, write_csv
from onebasin.train import default_recipe, get_recipe, seed_everything, train

print = functools.partial(print, flush=True)  # noqa: A001

RESULTS = Path(__file__).resolve().parent / "results" / "merge_many"
CSV = RESULTS / "merge_many.csv"
DATA_DIR = os.environ.get("ONEBASIN_DATA", "/work/shared/data")
CACHE = os.environ.get("ONEBASIN_CACHE", "/work/cache")
MLP_RECIPE = {"lr": 0.1, "warmup": 0.25}  # the demo's: 8 epochs at lr 0.1, warmup 25 % (docs/training.md)
RN_RECIPE = {"batch_size": 100, "lr": 0.1, "warmup": 0.05}  # benchmarks/reproduce.py's RN_OVERRIDES
# Git Re-Basin's MergeMany (src/mnist_mlp_wm_many.py): Adam at a constant lr 1e-3, batch 500, no augmentation
GRB_RECIPE = {"optimizer": "adamw", "weight_decay": 0.0, "lr": 1e-3, "schedule": "constant", "warmup": 0.0,
              "batch_size": 500, "augment": ()}
HALF_SEED = 1000  # model i trains on the random half of the training set drawn with seed HALF_SEED + i
METHODS = ("none", "anchor", "mergemany", "universe")


@dataclasses.dataclass
class Family:
    name: str
    exp: Experiment
    note: str
    half: bool = False  # each model on its own seeded random half of the training set (Git Re-Basin's MergeMany)


@dataclasses.dataclass
class Setting:
    family: Family
    n_models: int
    alignment: str = "activation"

    @property
    def name(self) -> str:
        tag = "" if self.alignment == "activation" else f"-{self.alignment}"
        return f"{self.family.name}-n{self.n_models}{tag}"


def _mlp(dataset: str, width: int, depth: int = 10, epochs: int = 8) -> Family:
    """The demo's shortened recipe (8 epochs at lr 0.1), benchmarks/reproduce.py's longer one (`epochs` < 100:
    the recipe's lr 0.2, warmup 25 %), or the paper's whole recipe (100 epochs, warmup 5 %)."""
    recipe = MLP_RECIPE if epochs == 8 else {"warmup": 0.25} if epochs < 100 else {}
    exp = Experiment(dataset=dataset, model="mlp", model_kwargs={"width": width, "depth": depth}, epochs=epochs,
                     recipe_overrides=recipe, calib_examples=5000, train_eval_examples=5000, data_dir=DATA_DIR,
                     cache_dir=CACHE)
    if epochs == 8:
        note = "8 of 100 epochs, lr 0.1 (recipe: 0.2), warmup 25 % (2 epochs)"
    elif epochs < 100:
        note = f"{epochs} of 100 epochs, lr 0.2, warmup 25 % ({epochs / 4:g} epochs)"
    else:
        note = "the paper recipe: 100 epochs, lr 0.2, warmup 5 %"
    note += "; 5,000 calibration images; full test set"
    name = f"mlp-{dataset}-{width}" + (f"-d{depth}" if depth != 10 else "") + (f"-e{epochs}" if epochs != 8 else "")
    return Family(name, exp, note)


def _resnet() -> Family:
    exp = Experiment(dataset="fashionmnist", model="resnet20", model_kwargs={"width": 1, "norm": "batchnorm"},
                     epochs=2, train_limit=10000, recipe_overrides=RN_RECIPE, calib_examples=500,
                     train_eval_examples=500, test_examples=2000, data_dir=DATA_DIR, cache_dir=CACHE)
    note = ("2 of 200 epochs on the first 10,000 training images, batch 100, lr 0.1, warmup 5 %; "
            "500 calibration images; first 2,000 test images")
    return Family("resnet20-fashionmnist-x1", exp, note)


def _grb(epochs: int) -> Family:
    """Git Re-Basin's MergeMany setting (their Table 3): MLPs 784-512-512-512-10, Adam lr 1e-3, batch 500, each
    model on its own random half of MNIST; their recipe trains 100 epochs."""
    exp = Experiment(dataset="mnist", model="mlp", model_kwargs={"width": 512, "depth": 4}, epochs=epochs,
                     recipe_overrides=GRB_RECIPE, calib_examples=5000, train_eval_examples=5000, data_dir=DATA_DIR,
                     cache_dir=CACHE)
    note = (f"Git Re-Basin MergeMany: {epochs} of 100 epochs, Adam lr 1e-3 constant, batch 500, no augmentation, each "
            "model on its own random half of MNIST (30,000 images); 5,000 calibration images; full test set")
    return Family(f"mlp-mnist-512-d4-grb-e{epochs}", exp, note, half=True)


MNIST, FMNIST, MNIST256, RESNET = _mlp("mnist", 128), _mlp("fashionmnist", 128), _mlp("mnist", 256), _resnet()
SHALLOW = _mlp("mnist", 512, depth=4)  # 3 hidden layers: where N-way merging of MLPs is easy (C2M3's MLP is of this kind)
SHALLOW20 = _mlp("mnist", 512, depth=4, epochs=20)  # the same, trained 2.5x longer: does training close the gap?
SHALLOW100 = _mlp("mnist", 512, depth=4, epochs=100)  # and with the paper's whole recipe
WIDE20 = _mlp("mnist", 1024, depth=4, epochs=20)  # twice as wide: does width close the gap?
GRB_EPOCHS = int(os.environ.get("GRB_EPOCHS", 100))  # shortened where the CPU allows less (docs/results.md says so)
GRB = _grb(GRB_EPOCHS)  # Git Re-Basin's own MergeMany setting (Adam, random halves, weight matching)
SETTINGS = [  # priority order
    Setting(MNIST, 5), Setting(MNIST, 3), Setting(MNIST, 2), Setting(FMNIST, 5), Setting(FMNIST, 3),
    Setting(FMNIST, 2), Setting(RESNET, 3), Setting(RESNET, 5), Setting(MNIST, 8), Setting(FMNIST, 8),
    Setting(MNIST256, 5), Setting(MNIST256, 3), Setting(MNIST256, 2), Setting(MNIST, 5, "weight"),
    Setting(RESNET, 5, "weight"), Setting(SHALLOW, 5), Setting(SHALLOW, 3), Setting(SHALLOW, 2),
    Setting(SHALLOW20, 5), Setting(SHALLOW20, 2), Setting(SHALLOW100, 5), Setting(SHALLOW100, 2),
    Setting(WIDE20, 5), Setting(WIDE20, 2), Setting(GRB, 5, "weight"), Setting(GRB, 5),
]
BY_NAME = {s.name: s for s in SETTINGS}


def half_endpoint(family: Family, seed: int) -> tuple[torch.nn.Module, dict, bool]:
    """`endpoint` for a family whose model `seed` trains on its own random half of the training set (the
    sample of len // 2 images drawn with seed HALF_SEED + seed), cached beside the full-data endpoints."""
    exp = family.exp
    path = endpoint_path(exp, seed)
    path = path.with_name(path.name.replace(f"_s{seed}.safetensors", f"_half{HALF_SEED + seed}_s{seed}.safetensors"))
    cached = checkpoint_paths(path)[0].exists()
    if not cached:
        info = dataset_info(exp.dataset)
        full = load_dataset(exp.dataset, True, exp.data_dir)
        half = full.subset(take(len(full), len(full) // 2, HALF_SEED + seed))
        test = load_dataset(exp.dataset, False, exp.data_dir)
        kwargs = {**exp.model_kwargs, **data_kwargs(exp.model, info)}
        seed_everything(seed)
        net = create_model(exp.model, **kwargs)
        recipe = get_recipe(default_recipe(exp.model), epochs=exp.epochs, **exp.recipe_overrides)
        meta = {"model": exp.model, "model_kwargs": kwargs, "dataset": info.name, "train_examples": len(half),
                "train_subset_seed": HALF_SEED + seed}
        train(net, half, test, recipe, seed, checkpoint_path=path, meta=meta, progress=False,
              on_epoch_end=lambda e, r: print(f"  {family.name} seed {seed} epoch {e}: test acc {r['test_acc']:.4f} "
                                               f"({r['epoch_time_s']:.1f} s)"))
    model, meta = load_model(path, expect={"model": exp.model, "seed": seed})
    return model, meta, cached


def _endpoint(family: Family, seed: int) -> tuple[torch.nn.Module, dict, bool]:
    return half_endpoint(family, seed) if family.half else endpoint(family.exp, seed, progress=False)


def train_all(settings: list[Setting]) -> None:
    """Every endpoint the settings need, trained (resumably) unless cached."""
    done = set()
    for s in settings:
        for seed in range(s.n_models):
            if (s.family.name, seed) in done:
                continue
            t0 = time.perf_counter()
            _, meta, cached = _endpoint(s.family, seed)
            done.add((s.family.name, seed))
            print(f"{s.family.name} seed {seed}: test acc {meta.get('test_acc')} "
                  f"({'cached' if cached else f'{time.perf_counter() - t0:.0f} s'})")


def calibration(exp: Experiment, draw: int) -> list:
    """Draw `draw` of the calibration set: `exp.calib_examples` training images sampled with seed `draw`
    (draw 0 is the calibration set of `evaluation_data`, and of benchmarks/reproduce.py)."""
    size = model_info(exp.model).image_size or dataset_info(exp.dataset).image_size
    train = load_dataset(exp.dataset, True, exp.data_dir, image_size=size, limit=exp.calib_examples, seed=draw)
    return list(batches(train, 500))


def run_setting(s: Setting, draw: int, threads: int) -> list[dict]:
    """One row per method: merged accuracy with and without correction beside the endpoints and the ensemble."""
    exp = s.family.exp
    models = [_endpoint(s.family, seed)[0] for seed in range(s.n_models)]
    test, calib = evaluation_data(exp)[0]["test"], calibration(exp, draw)
    t0 = time.perf_counter()
    base = merge_diagnostics(models, models[0], test)
    t_eval = time.perf_counter() - t0
    repairs = ("none", "exact", "reset_bn") if exp.model_kwargs.get("norm") == "batchnorm" else ("none", "exact")
    rows = []
    for method in METHODS:
        row = {"setting": s.name, "family": s.family.name, "n_models": s.n_models, "alignment": s.alignment,
               "calib_draw": draw, "method": method, "endpoint_accs": " ".join(f"{e['acc']:.4f}" for e in base["endpoints"]),
               "endpoint_mean_acc": base["endpoint_mean"]["acc"], "endpoint_mean_loss": base["endpoint_mean"]["loss"],
               "ensemble_acc": base["ensemble"]["acc"], "ensemble_loss": base["ensemble"]["loss"]}
        perms = None
        for repair in repairs:  # "none" first: the others reuse its permutations
            merged, result = merge_many(models, method=method, repair=repair, data=calib, alignment=s.alignment,
                                        max_examples=exp.calib_examples, perms=perms)
            perms = result.perms
            loss, acc = evaluate(merged, test)
            row |= {f"acc_{repair}": acc, f"loss_{repair}": loss, f"seconds_{repair}": round(result.seconds["total"], 2)}
            if repair == "none":
                objective = result.record.get("objective") or {}
                row |= {"cycle_consistency": result.cycle_consistency, "pairwise_consistency": result.pairwise_consistency,
                        "pairwise_agreement": result.pairwise_agreement, "sweeps": json.dumps(result.record.get("sweeps")),
                        "mean_matched_corr": sum(objective.values()) / len(objective) if objective else "",
                        "seconds_align": round(result.seconds["align"], 2)}
            if repair == "exact":
                row |= {"repair_passes": result.repair_passes, "seconds_repair": round(result.seconds["repair"], 2)}
            print(f"  {s.name} draw {draw} {method:<9} {repair:<8} acc {acc:.4f} ({result.seconds['total']:.1f} s)")
        rows.append(row)
    recipe = dataclasses.asdict(get_recipe(default_recipe(exp.model), epochs=exp.epochs, **exp.recipe_overrides))
    extra = {"code": commit_hash(RESULTS), "calib_examples": exp.calib_examples, "test_examples": exp.test_examples or "all", "threads": threads,
             "seconds_evaluate_endpoints_and_ensemble": round(t_eval, 1), "model_kwargs": json.dumps(exp.model_kwargs),
             "recipe": json.dumps(recipe), "note": s.family.note}
    return [r | extra for r in rows]


# --- output ----------------------------------------------------------------------------------------------


def _pct(v) -> str:
    return f"{100 * float(v):.2f}" if v not in ("", None) else "-"


def _mean(rows: list[dict], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) not in ("", None)]
    return sum(values) / len(values) if values else None


def print_tables() -> None:
    """The markdown tables of docs/results.md section 7 from the CSV: means over the calibration draws."""
    rows = read_csv(CSV)
    order = {name: i for i, name in enumerate(BY_NAME)}
    settings = sorted({r["setting"] for r in rows}, key=lambda n: order.get(n, len(order)))
    print("| setting | N | draws | endpoints (mean) | ensemble | plain | plain + REPAIR | anchor | anchor + REPAIR "
          "| mergemany | mergemany + REPAIR | universe | universe + REPAIR | universe - mergemany, + REPAIR, per draw |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in settings:
        mine = [r for r in rows if r["setting"] == name]
        by = {m: [r for r in mine if r["method"] == m] for m in METHODS}
        first, draws = mine[0], sorted({int(r["calib_draw"]) for r in mine})
        cells = [f"{_pct(_mean(by[m], 'acc_none'))} | {_pct(_mean(by[m], 'acc_exact'))}" for m in METHODS]
        label = first["family"] + (f" ({first['alignment']} alignment)" if first["alignment"] != "activation" else "")
        acc = {(r["method"], int(r["calib_draw"])): float(r["acc_exact"]) for r in mine}
        diffs = " / ".join(f"{100 * (acc[('universe', d)] - acc[('mergemany', d)]):+.2f}" for d in draws
                           if ("universe", d) in acc and ("mergemany", d) in acc)
        print(f"| {label} | {first['n_models']} | {len(draws)} | {_pct(first['endpoint_mean_acc'])} | "
              f"{_pct(first['ensemble_acc'])} | " + " | ".join(cells) + f" | {diffs} |")
    print("\n| setting | N | method | mean matched corr. | cycle consistency (method / pairwise) | agreement with pairwise "
          "| sweeps (max) | align s | REPAIR s | BN reset acc |\n|---|---|---|---|---|---|---|---|---|---|")
    num = lambda v, f="{:.3f}": f.format(v) if v is not None else "n/a"  # noqa: E731
    for name in settings:
        for method in METHODS[1:]:
            mine = [r for r in rows if r["setting"] == name and r["method"] == method]
            if not mine:
                continue
            sweeps = [json.loads(r["sweeps"]) for r in mine if r["sweeps"] not in ("", "null")]
            most = max((max(x.values()) if isinstance(x, dict) else x) for x in sweeps) if sweeps else "-"
            label = mine[0]["family"] + (f" ({mine[0]['alignment']} alignment)" if mine[0]["alignment"] != "activation" else "")
            print(f"| {label} | {mine[0]['n_models']} | {method} | {num(_mean(mine, 'mean_matched_corr'), '{:.4f}')} | "
                  f"{num(_mean(mine, 'cycle_consistency'))} / {num(_mean(mine, 'pairwise_consistency'))} | "
                  f"{num(_mean(mine, 'pairwise_agreement'))} | {most} | {num(_mean(mine, 'seconds_align'), '{:.1f}')} | "
                  f"{num(_mean(mine, 'seconds_repair'), '{:.1f}')} | {_pct(_mean(mine, 'acc_reset_bn'))} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", action="store_true", help="only train the endpoints")
    parser.add_argument("--only", help="comma-separated settings (see --list)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the markdown tables of docs/results.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on shared cores)")
    parser.add_argument("--draws", type=int, default=3, help="calibration sets drawn per setting (seeds 0..DRAWS-1)")
    args = parser.parse_args()
    if args.table:
        return print_tables()
    if args.list:
        for s in SETTINGS:
            print(f"{s.name:<36} {s.family.exp.model} {s.family.exp.model_kwargs} {s.family.exp.dataset}, N = {s.n_models}: {s.family.note}")
        return
    torch.set_num_threads(args.threads)
    names = args.only.split(",") if args.only else list(BY_NAME)
    if unknown := [n for n in names if n not in BY_NAME]:
        raise SystemExit(f"unknown settings {unknown}; valid: {', '.join(BY_NAME)}")
    if args.train:
        return train_all([BY_NAME[n] for n in names])
    for draw in range(args.draws):
        for name in names:
            if any(r["setting"] == name and int(r["calib_draw"]) == draw for r in read_csv(CSV)):
                print(f"{name} draw {draw}: already in {CSV.name}, skipped")
                continue
            t0 = time.perf_counter()
            rows = run_setting(BY_NAME[name], draw, args.threads)
            keep = [r for r in read_csv(CSV) if not (r["setting"] == name and int(r["calib_draw"]) == draw)]
            write_csv(CSV, keep + rows)  # re-read: parts may run in parallel
            print(f"{name} draw {draw}: done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
