"""Reproduce Entezari, Sedghi, Saukh & Neyshabur 2021 ("The Role of Permutation Invariance in Linear Mode
Connectivity of Neural Networks", slides in ../shared/papers/) where a 2-core CPU allows.

    python benchmarks/entezari.py                      # every experiment; rows already in the CSVs are skipped
    python benchmarks/entezari.py --only width,depth   # some experiments: width, depth, task, search, fd-vs-sa
    python benchmarks/entezari.py --quick              # a few-minute smoke run into $ONEBASIN_CACHE/entezari-quick
    python benchmarks/entezari.py --plot               # only redraw the plots; --table prints the docs' tables

Experiments (each a CSV and a PNG in benchmarks/results/entezari/):
  width     barrier vs width, MLPs with 1, 2, 4, 8 hidden layers on MNIST, plain and after activation matching
  depth     barrier vs depth: MLPs of width 512 with 1..12 hidden layers, and the slides' shallow CNN (s-conv)
  task      barrier vs test error over (architecture, dataset): MLPs and s-conv on MNIST and FashionMNIST
  search    "our model" (one SGD solution and random permutations of it) vs the real world (three seeds),
            before and after permutation search: simulated annealing over n = 3 models (Alg. 1),
            activation matching, weight matching, functional difference
  fd-vs-sa  functional difference vs simulated annealing at several budgets: barrier reached and wall time

Rows `width`, `depth` and `task` share barriers.csv (one row per architecture, dataset and seed pair).
Endpoints are trained once (seeds 0, 1, 2; `onebasin.train.train`, resumable per epoch) and cached under
$ONEBASIN_CACHE/entezari (default /work/cache). Every row records its training and evaluation settings,
including what was shortened against the paper (SGD, batch 64, lr 0.001, up to 3000 epochs or train loss 0.01).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
from pathlib import Path

import torch
import torch.nn as nn

import onebasin
from onebasin.align import align, anneal_many
from onebasin.checkpoint import checkpoint_paths, load_checkpoint
from onebasin.data import batches, load_dataset
from onebasin.report import read_csv, write_csv
from onebasin.train import get_recipe, train

print = functools.partial(print, flush=True)  # noqa: A001

RESULTS = Path(__file__).resolve().parent / "results" / "entezari"
DATA_DIR = os.environ.get("ONEBASIN_DATA", "/work/shared/data")
CACHE = Path(os.environ.get("ONEBASIN_CACHE", "/work/cache"))
EXPERIMENTS = ("width", "depth", "task", "search", "fd-vs-sa")
PAPER_TRAINING = ("paper (released code and config): SGD momentum 0.9, batch 64, constant lr 0.001, up to 3000 epochs "
                  "or train loss 0.01, full train set, 32x32 inputs")


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of every experiment (the full run; QUICK shrinks them for a smoke test)."""

    train_examples: int = 10_000  # seeded sample of the training set each endpoint trains on
    epochs: int = 15  # SGD epochs over that sample
    batch_size: int = 64  # as the paper
    lr: float = 0.05  # peak lr, cosine to 0 after a 10 % linear warmup; momentum 0.9, no weight decay
    eval_examples: int = 5_000  # barriers: the first 5,000 of the training sample and of the test set
    calib_examples: int = 5_000  # activation matching / functional difference statistics (training sample)
    sa_examples: int = 512  # the batch annealing's objective is measured on (training sample)
    sa_budget: int = 5_000  # annealing evaluations in `search` (n = 3 models)
    sa_budgets: tuple[int, ...] = (500, 2_000, 8_000)  # annealing evaluations in `fd-vs-sa` (n = 2)
    sa_seeds: tuple[int, ...] = (0, 1)  # annealing runs per budget in `fd-vs-sa`
    sa_long_budget: int = 32_000  # one more budget in `fd-vs-sa`, for the archs below only (w512: ~8 min a run)
    sa_long_archs: tuple[str, ...] = ("mlp-h1-w16", "mlp-h1-w128", "mlp-h4-w64")
    seeds: tuple[int, ...] = (0, 1, 2)  # endpoints; pairs (0, 1), (0, 2), (1, 2)
    widths: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
    hidden: tuple[int, ...] = (1, 2, 4, 8)  # hidden layers of the width sweep
    depth_width: int = 512
    depth_hidden: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 12)
    conv_width: int = 16
    conv_layers: tuple[int, ...] = (2, 3, 4, 6, 8)
    task_archs: tuple[str, ...] = ("mlp-h1-w512", "mlp-h2-w512", "mlp-h4-w512", "mlp-h8-w512",
                                   "sconv-c2-w16", "sconv-c4-w16", "sconv-c8-w16")
    search_archs: tuple[str, ...] = ("mlp-h1-w16", "mlp-h1-w128", "mlp-h1-w512", "mlp-h4-w64", "sconv-c2-w16")
    search_datasets: tuple[str, ...] = ("mnist", "fashionmnist")
    fd_sa_archs: tuple[str, ...] = ("mlp-h1-w16", "mlp-h1-w128", "mlp-h1-w512", "mlp-h4-w64")
    history_arch: str = "mlp-h1-w128"  # whose largest-budget annealing runs are plotted over the evaluations


FULL = Config()
QUICK = Config(train_examples=1_000, epochs=2, eval_examples=500, calib_examples=500, sa_budget=200,
               sa_budgets=(50, 200), sa_seeds=(0,), sa_long_archs=(), search_datasets=("mnist",), widths=(4, 16, 64), hidden=(1, 2), depth_width=64, depth_hidden=(1, 2, 3),
               conv_layers=(2, 3), task_archs=("mlp-h1-w64", "sconv-c2-w16"), search_archs=("mlp-h1-w16",),
               fd_sa_archs=("mlp-h1-w16",), history_arch="mlp-h1-w16")


class SConv(nn.Module):
    """The slides' shallow CNN ("s_conv", Entezari et al.'s code): a 9x9 stride-2 conv, `layers - 2` 3x3
    convs, one conv covering the whole remaining map (-> 1x1), ReLU after each, a linear head.
    (N, C, H, W) -> (N, num_classes); init N(0, 2 / (k*k*out)) as in their code."""

    def __init__(self, layers=2, width=16, in_channels=1, num_classes=10, image_size=28):
        super().__init__()
        size = (image_size + 2 - 9) // 2 + 1
        convs = [nn.Conv2d(in_channels, width, 9, stride=2, padding=1)]
        convs += [nn.Conv2d(width, width, 3, padding=1) for _ in range(layers - 2)]
        convs += [nn.Conv2d(width, width, size)]
        self.features = nn.Sequential(*(m for c in convs for m in (c, nn.ReLU())))
        self.head = nn.Linear(width, num_classes)
        for c in convs:
            nn.init.kaiming_normal_(c.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(c.bias)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


def mlp_name(hidden: int, width: int) -> str:
    return f"mlp-h{hidden}-w{width}"


def parse_arch(name: str) -> tuple[str, int, int]:
    """"mlp-h4-w512" -> ("mlp", 4 hidden layers, 512); "sconv-c2-w16" -> ("sconv", 2 conv layers, 16)."""
    family, depth, width = name.split("-")
    return family, int(depth[1:]), int(width[1:])


def build(arch: str) -> nn.Module:
    family, depth, width = parse_arch(arch)
    if family == "mlp":  # onebasin's mlp: `depth` counts Linear layers, so hidden layers + 1
        return onebasin.create_model("mlp", width=width, depth=depth + 1, in_features=784, num_classes=10)
    return SConv(depth, width)


# --- data and endpoints ------------------------------------------------------------------------------


@functools.cache
def datasets(name: str, cfg: Config):
    """(training sample, test set, {"train", "test"} evaluation batches, calibration batches)."""
    train_data = load_dataset(name, True, DATA_DIR, limit=cfg.train_examples, seed=0)
    test_data = load_dataset(name, False, DATA_DIR)
    first = lambda d, n: d.subset(torch.arange(min(n, len(d))))  # noqa: E731
    loaders = {"train": list(batches(first(train_data, cfg.eval_examples), 1000)),
               "test": list(batches(first(test_data, cfg.eval_examples), 1000))}
    calib = list(batches(first(train_data, cfg.calib_examples), 1000))
    return train_data, test_data, loaders, calib


def recipe(cfg: Config):
    return get_recipe("mlp", batch_size=cfg.batch_size, epochs=cfg.epochs, lr=cfg.lr, schedule="cosine",
                      warmup=0.1, augment=())


def endpoint(arch: str, dataset: str, seed: int, cfg: Config, cache: Path) -> nn.Module:
    """The network `arch` trained on `dataset` from `seed` (trained and cached on first use), eval mode."""
    path = cache / "endpoints" / f"{dataset}_{arch}_n{cfg.train_examples}_e{cfg.epochs}_s{seed}.safetensors"
    torch.manual_seed(seed)
    model = build(arch)
    if not checkpoint_paths(path)[0].exists():
        train_data, test_data, _, _ = datasets(dataset, cfg)
        t0 = time.perf_counter()
        meta = {"model": arch, "dataset": dataset, "train_examples": len(train_data)}
        res = train(model, train_data, test_data.subset(torch.arange(1000)), recipe(cfg), seed, device="cpu",
                    checkpoint_path=path, meta=meta, progress=False)
        print(f"  trained {dataset} {arch} seed {seed}: train loss {res.history[-1]['train_loss']:.4f}, "
              f"test acc {res.test_acc:.4f}, {time.perf_counter() - t0:.0f} s")
    model.load_state_dict(load_checkpoint(path)[0])
    return model.eval()


def pairs(cfg: Config) -> list[tuple[int, int]]:
    s = cfg.seeds
    return [(s[i], s[j]) for i in range(len(s)) for j in range(i + 1, len(s))]


def barriers(model_a, model_b, loaders) -> dict:
    """Eq. 1 of the slides on the 11-point alpha grid: train and test loss barriers, test error barrier."""
    c = onebasin.barrier_curve(model_a, model_b, loaders, [i / 10 for i in range(11)])
    return {"train_barrier": c.barrier("train", "loss"), "test_barrier": c.barrier("test", "loss"),
            "test_error_barrier": c.barrier("test", "error"), "mid_test_acc": c.acc["test"][5],
            "test_acc_a": c.acc["test"][0], "test_acc_b": c.acc["test"][-1],
            "train_loss_a": c.loss["train"][0], "train_loss_b": c.loss["train"][-1]}


def settings_of(cfg: Config) -> dict:
    """What every row records about training and evaluation, shortenings included."""
    return {"train_examples": cfg.train_examples, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
            "lr": cfg.lr, "schedule": "cosine, 10% warmup, momentum 0.9, no augmentation",
            "eval_examples": cfg.eval_examples, "calib_examples": cfg.calib_examples, "paper": PAPER_TRAINING}


# --- experiments 1-3: barriers of seed pairs -----------------------------------------------------------


def pair_row(arch: str, dataset: str, seeds: tuple[int, int], cfg: Config, cache: Path) -> dict:
    """Plain and activation-matched barriers of one seed pair: one row of barriers.csv."""
    a, b = (endpoint(arch, dataset, s, cfg, cache) for s in seeds)
    _, _, loaders, calib = datasets(dataset, cfg)
    t0 = time.perf_counter()
    plain = barriers(a, b, loaders)
    aligned_b, _ = align(a, b, "activation", calib, max_examples=cfg.calib_examples)
    aligned = barriers(a, aligned_b, loaders)
    family, depth, width = parse_arch(arch)
    row = {"arch": arch, "dataset": dataset, "seeds": f"{seeds[0]},{seeds[1]}", "family": family,
           "depth": depth, "width": width, "params": sum(p.numel() for p in a.parameters())}
    row |= {k: plain[k] for k in ("test_acc_a", "test_acc_b", "train_loss_a", "train_loss_b")}
    row |= {f"plain_{k}": v for k, v in plain.items() if "barrier" in k or k == "mid_test_acc"}
    row |= {f"aligned_{k}": v for k, v in aligned.items() if "barrier" in k or k == "mid_test_acc"}
    return row | {"seconds_eval": round(time.perf_counter() - t0, 1), **settings_of(cfg)}


def archs_for(experiment: str, cfg: Config) -> list[tuple[str, str]]:
    """(architecture, dataset) settings of the barrier experiments."""
    if experiment == "width":
        return [(mlp_name(h, w), "mnist") for h in cfg.hidden for w in cfg.widths]
    if experiment == "depth":
        convs = [f"sconv-c{c}-w{cfg.conv_width}" for c in cfg.conv_layers]
        return [(mlp_name(h, cfg.depth_width), "mnist") for h in cfg.depth_hidden] + [(c, "mnist") for c in convs]
    return [(a, d) for d in ("mnist", "fashionmnist") for a in cfg.task_archs]


def run_barriers(experiment: str, cfg: Config, out: Path, cache: Path) -> None:
    path = out / "barriers.csv"
    for arch, dataset in archs_for(experiment, cfg):
        for seeds in pairs(cfg):
            key = (arch, dataset, f"{seeds[0]},{seeds[1]}")
            if any((r["arch"], r["dataset"], r["seeds"]) == key for r in read_csv(path)):
                continue
            row = pair_row(arch, dataset, seeds, cfg, cache)
            write_csv(path, read_csv(path) + [row])
            print(f"{experiment}: {dataset} {arch} seeds {key[2]}: test barrier plain {row['plain_test_barrier']:.3f}, "
                  f"aligned {row['aligned_test_barrier']:.3f} ({row['seconds_eval']:.0f} s)")


# --- experiment 4: "our model" vs the real world, before and after search --------------------------------

SEARCH_METHODS = ("none", "annealing", "activation", "weight", "functional")


def worlds(arch: str, dataset: str, cfg: Config, cache: Path) -> dict[str, list[nn.Module]]:
    """"real": the endpoints of every seed; "ours": seed 0's endpoint and random permutations of it."""
    real = [endpoint(arch, dataset, s, cfg, cache) for s in cfg.seeds]
    spec = onebasin.trace(real[0], datasets(dataset, cfg)[3][0][0][:64])
    ours = [real[0]] + [onebasin.permute_model(real[0], spec, onebasin.random_perms(spec, seed=100 + i))
                        for i in range(1, len(real))]
    return {"real": real, "ours": ours}


def search(method: str, models: list[nn.Module], calib, cfg: Config, **options) -> tuple[list[nn.Module], dict]:
    """Models 1.. moved into model 0's basin by `method` (annealing: all jointly, Alg. 1); (models, record)."""
    if method == "none":
        return models, {}
    spec = onebasin.trace(models[0], calib[0][0][:64])
    if method == "annealing":
        options = {"budget": cfg.sa_budget, "seed": 0, **options}
        results = anneal_many(spec, models, calib, max_examples=cfg.sa_examples, progress=False, **options)
        return [onebasin.permute_model(m, spec, r.perms) for m, r in zip(models, results)], results[0].record
    moved = [align(models[0], m, method, calib, spec=spec, max_examples=cfg.calib_examples) for m in models[1:]]
    return [models[0]] + [m for m, _ in moved], moved[-1][1].record


def pair_stats(models: list[nn.Module], loaders) -> dict:
    """Mean, min and max over all pairs of the models of the train and test loss barriers."""
    rows = [barriers(models[i], models[j], loaders) for i in range(len(models)) for j in range(i + 1, len(models))]
    out = {}
    for k in ("train_barrier", "test_barrier"):
        vals = [r[k] for r in rows]
        out |= {k: sum(vals) / len(vals), f"{k}_min": min(vals), f"{k}_max": max(vals)}
    return out


def run_search(cfg: Config, out: Path, cache: Path) -> None:
    path = out / "search.csv"
    for dataset in cfg.search_datasets:
        for arch in cfg.search_archs:
            for world, models in worlds(arch, dataset, cfg, cache).items():
                for method in SEARCH_METHODS:
                    key = (arch, dataset, world, method)
                    if any((r["arch"], r["dataset"], r["world"], r["method"]) == key for r in read_csv(path)):
                        continue
                    _, _, loaders, calib = datasets(dataset, cfg)
                    t0 = time.perf_counter()
                    moved, _ = search(method, models, calib, cfg)
                    seconds = time.perf_counter() - t0
                    row = {"arch": arch, "dataset": dataset, "world": world, "method": method, "models": len(models),
                           **pair_stats(moved, loaders), "seconds_search": round(seconds, 2),
                           "sa_budget": cfg.sa_budget if method == "annealing" else "",
                           "sa_examples": cfg.sa_examples if method == "annealing" else "", **settings_of(cfg)}
                    write_csv(path, read_csv(path) + [row])
                    print(f"search: {dataset} {arch} {world:<4} {method:<10}: test barrier {row['test_barrier']:.4f} "
                          f"(pairs {row['test_barrier_min']:.4f}..{row['test_barrier_max']:.4f}), {seconds:.1f} s")


# --- experiment 5: functional difference vs simulated annealing ------------------------------------------


def run_fd_vs_sa(cfg: Config, out: Path, cache: Path) -> None:
    """FD and annealing (n = 2) at several budgets on seed pair (0, 1) and on seed 0 vs a permuted copy."""
    path = out / "fd_vs_sa.csv"
    for arch in cfg.fd_sa_archs:
        for world, models in worlds(arch, "mnist", cfg, cache).items():
            pair = models[:2]
            budgets = cfg.sa_budgets + ((cfg.sa_long_budget,) if arch in cfg.sa_long_archs else ())
            runs = [("functional", None, None)] + [("annealing", b, s) for b in budgets for s in cfg.sa_seeds]
            for method, budget, seed in runs:
                key = (arch, world, method, str(budget or ""), str(seed if budget else ""))
                if any((r["arch"], r["world"], r["method"], r["budget"], r["sa_seed"]) == key for r in read_csv(path)):
                    continue
                _, _, loaders, calib = datasets("mnist", cfg)
                t0 = time.perf_counter()
                moved, record = search(method, pair, calib, cfg, **({"budget": budget, "seed": seed} if budget else {}))
                seconds = time.perf_counter() - t0
                row = {"arch": arch, "dataset": "mnist", "world": world, "method": method, "budget": budget or "",
                       "sa_seed": seed if budget else "",
                       **pair_stats(moved, loaders), "seconds": round(seconds, 2),
                       "sa_objective_initial": record.get("objective", ["", ""])[0] if budget else "",
                       "sa_objective_best": record.get("objective", ["", ""])[1] if budget else "", **settings_of(cfg)}
                if budget == max(cfg.sa_budgets) and seed == cfg.sa_seeds[0]:  # the objective over the search, plotted
                    hist = [{"arch": arch, "world": world, "budget": budget, "evaluation": e, "current": c, "best": b}
                            for e, c, b in record["history"]]
                    old = [h for h in read_csv(out / "sa_history.csv") if (h["arch"], h["world"]) != (arch, world)]
                    write_csv(out / "sa_history.csv", old + hist)
                write_csv(path, read_csv(path) + [row])
                print(f"fd-vs-sa: {arch} {world:<4} {method:<10} {budget or '':>5} seed {seed}: test barrier {row['test_barrier']:.4f}, "
                      f"train {row['train_barrier']:.4f}, {seconds:.1f} s")


# --- plots and tables ----------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


CHANCE_ACC = 0.2  # an endpoint below this test accuracy did not train (10 classes: chance is 0.1)


def trained(rows: list[dict]) -> list[dict]:
    """The seed pairs whose two endpoints both trained (test accuracy >= CHANCE_ACC); the plots and tables
    use only these: a net stuck at chance (dead ReLUs) or blown up has no basin to compare."""
    return [r for r in rows if min(float(r["test_acc_a"]), float(r["test_acc_b"])) >= CHANCE_ACC]


def _stats(rows, key):
    vals = [float(r[key]) for r in rows]
    return sum(vals) / len(vals), min(vals), max(vals)


def _grouped(rows, by):
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in by), []).append(r)
    return out


def _band(ax, xs, groups, key, label, style, full=3):
    """Mean over seed pairs as a line, min..max as a shaded band; points with fewer than `full` pairs say so."""
    st = [_stats(g, key) for g in groups]
    line = ax.plot(xs, [s[0] for s in st], style, label=label, ms=4)[0]
    ax.fill_between(xs, [s[1] for s in st], [s[2] for s in st], color=line.get_color(), alpha=0.15)
    for x, s, g in zip(xs, st, groups):
        if len(g) < full:
            ax.annotate(f"{len(g)} pair{'s' * (len(g) > 1)}", (x, s[0]), fontsize=6, color=line.get_color(),
                        textcoords="offset points", xytext=(3, -9))


def plot_width(rows, out: Path, cfg: Config) -> None:
    plt = _plt()
    mlp = [r for r in trained(rows) if r["family"] == "mlp" and r["dataset"] == "mnist"]
    fig, axes = plt.subplots(1, len(cfg.hidden), figsize=(4 * len(cfg.hidden), 3.6), sharey=True)
    for ax, h in zip(axes, cfg.hidden):
        g = _grouped([r for r in mlp if int(r["depth"]) == h and int(r["width"]) in cfg.widths], ["width"])
        ws = sorted(g, key=lambda k: int(k[0]))
        xs = [int(w[0]) for w in ws]
        for prefix, name in (("plain", "plain"), ("aligned", "activation matching")):
            _band(ax, xs, [g[w] for w in ws], f"{prefix}_test_barrier", f"{name}, test", "o-", len(pairs(cfg)))
            _band(ax, xs, [g[w] for w in ws], f"{prefix}_train_barrier", f"{name}, train", "s--", 0)
        ax.set_xscale("log", base=2), ax.set_title(f"{h} hidden layer{'s' * (h > 1)}"), ax.set_xlabel("width")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss barrier"), axes[0].legend(fontsize=7)
    fig.suptitle(f"MLPs on MNIST: barrier vs width ({len(pairs(cfg))} seed pairs: mean, min..max; "
                 f"{cfg.epochs} epochs on {cfg.train_examples:,} images)", fontsize=10)
    fig.tight_layout(), fig.savefig(out / "width.png", dpi=110), plt.close(fig)


def plot_depth(rows, out: Path, cfg: Config) -> None:
    plt = _plt()
    fams = [("mlp", cfg.depth_width, "hidden layers", f"MLP, width {cfg.depth_width}"),
            ("sconv", cfg.conv_width, "conv layers", f"s-conv CNN, {cfg.conv_width} channels")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (family, width, xlabel, title) in zip(axes, fams):
        sel = [r for r in trained(rows) if r["family"] == family and int(r["width"]) == width and r["dataset"] == "mnist"]
        g = _grouped(sel, ["depth"])
        ds = sorted(g, key=lambda k: int(k[0]))
        xs = [int(d[0]) for d in ds]
        for prefix, name in (("plain", "plain"), ("aligned", "activation matching")):
            _band(ax, xs, [g[d] for d in ds], f"{prefix}_test_barrier", f"{name}, test", "o-", len(pairs(cfg)))
            _band(ax, xs, [g[d] for d in ds], f"{prefix}_train_barrier", f"{name}, train", "s--", 0)
        ax.set_xlabel(xlabel), ax.set_ylabel("loss barrier"), ax.set_title(title), ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("MNIST: barrier vs depth (mean over seed pairs, min..max shaded)", fontsize=10)
    fig.tight_layout(), fig.savefig(out / "depth.png", dpi=110), plt.close(fig)


def task_points(rows, cfg: Config) -> list[dict]:
    """Per (architecture, dataset) of the task experiment: mean test error of the endpoints and mean barrier."""
    points = []
    for (arch, dataset), g in _grouped(trained(rows), ["arch", "dataset"]).items():
        if arch not in cfg.task_archs:
            continue
        err = sum(2 - float(r["test_acc_a"]) - float(r["test_acc_b"]) for r in g) / (2 * len(g))
        points.append({"arch": arch, "dataset": dataset, "test_error": err, "pairs": len(g),
                       "plain_test_barrier": _stats(g, "plain_test_barrier")[0],
                       "aligned_test_barrier": _stats(g, "aligned_test_barrier")[0],
                       "plain_test_error_barrier": _stats(g, "plain_test_error_barrier")[0]})
    return points


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation (no ties expected): Pearson correlation of the ranks."""
    rank = lambda v: [sorted(v).index(x) for x in v]  # noqa: E731
    rx, ry = rank(xs), rank(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def plot_task(rows, out: Path, cfg: Config) -> None:
    plt = _plt()
    points = task_points(rows, cfg)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    colors = {"mnist": "tab:blue", "fashionmnist": "tab:orange"}
    panels = (("plain_test_barrier", "test loss barrier", "plain"),
              ("plain_test_error_barrier", "test error barrier", "plain"),
              ("aligned_test_barrier", "test loss barrier", "after activation matching"))
    for ax, (key, ylabel, title) in zip(axes, panels):
        for p in points:
            marker = "o" if p["arch"].startswith("mlp") else "^"
            ax.scatter(100 * p["test_error"], p[key], c=colors[p["dataset"]], marker=marker)
            ax.annotate(p["arch"].replace("-w", " w"), (100 * p["test_error"], p[key]), fontsize=6,
                        textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("test error of the endpoints (%)"), ax.set_ylabel(ylabel), ax.set_title(title)
        ax.grid(alpha=0.3)
    for d, c in colors.items():
        axes[0].scatter([], [], c=c, label=d)
    axes[0].legend(fontsize=7, title="o MLP, ^ s-conv", title_fontsize=7)
    fig.suptitle("Barrier vs test error over (architecture, dataset)", fontsize=10)
    fig.tight_layout(), fig.savefig(out / "task.png", dpi=110), plt.close(fig)


def plot_search(rows, out: Path) -> None:
    plt = _plt()
    archs, sets = list(dict.fromkeys(r["arch"] for r in rows)), list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(len(sets), len(archs), figsize=(max(7, 3.4 * len(archs)), 3.6 * len(sets)), squeeze=False)
    for ax, (dataset, arch) in zip(axes.flat, [(d, a) for d in sets for a in archs]):
        for k, world in enumerate(("real", "ours")):
            sel = {r["method"]: r for r in rows if (r["arch"], r["dataset"], r["world"]) == (arch, dataset, world)}
            ms = [m for m in SEARCH_METHODS if m in sel]
            xs = [i + 0.4 * k for i in range(len(ms))]
            ys = [float(sel[m]["test_barrier"]) for m in ms]
            lo = [y - float(sel[m]["test_barrier_min"]) for y, m in zip(ys, ms)]
            hi = [float(sel[m]["test_barrier_max"]) - y for y, m in zip(ys, ms)]
            bars = ax.bar(xs, ys, 0.4, yerr=[lo, hi], label={"real": "real world (3 seeds)", "ours": "our model (permuted copies)"}[world])
            ax.bar_label(bars, fmt="%.2f", fontsize=5, padding=1)
            ax.set_xticks([i + 0.2 for i in range(len(ms))], [m[:6] for m in ms], fontsize=7, rotation=30)
        ax.set_title(f"{arch} ({dataset})", fontsize=9), ax.grid(alpha=0.3, axis="y")
    for row in axes:
        row[0].set_ylabel("test loss barrier (pairs: mean, min..max)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Real world vs our model, before (none) and after permutation search", fontsize=10)
    fig.tight_layout(), fig.savefig(out / "search.png", dpi=110), plt.close(fig)


def sa_points(rows) -> list[tuple[int, tuple, tuple]]:
    """Annealing rows per budget: (budget, (mean, min, max) seconds, (mean, min, max) test barrier) over seeds."""
    by = _grouped([r for r in rows if r["method"] == "annealing"], ["budget"])
    return [(int(b), _stats(g, "seconds"), _stats(g, "test_barrier")) for (b,), g in sorted(by.items(), key=lambda kv: int(kv[0][0]))]


def plot_fd_vs_sa(rows, history, out: Path) -> None:
    plt = _plt()
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    fig = plt.figure(figsize=(max(8, 3.4 * len(archs)), 7))
    for k, arch in enumerate(archs):
        ax = fig.add_subplot(2, len(archs), k + 1)
        for world, style in (("real", "o-"), ("ours", "s:")):
            g = [r for r in rows if (r["arch"], r["world"]) == (arch, world)]
            pts = sa_points(g)
            ys = [p[2][0] for p in pts]
            err = [[y - p[2][1] for y, p in zip(ys, pts)], [p[2][2] - y for y, p in zip(ys, pts)]]
            line = ax.errorbar([p[1][0] for p in pts], ys, yerr=err, fmt=style, ms=4, capsize=2,
                               label=f"{world}: SA {'/'.join(str(p[0]) for p in pts)}")[0]
            for r in (r for r in g if r["method"] == "functional"):
                ax.scatter(float(r["seconds"]), float(r["test_barrier"]), marker="*", s=110, color=line.get_color(),
                           label=f"{world}: FD", zorder=3)
        ax.set_xscale("log"), ax.set_xlabel("wall time (s, 1 thread)"), ax.set_title(arch, fontsize=9), ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.axes[0].set_ylabel("test loss barrier (SA: mean, min..max over seeds)")
    ax = fig.add_subplot(2, 1, 2)
    for world, h in _grouped(history, ["world"]).items():
        ev = [int(x["evaluation"]) for x in h]
        line = ax.plot(ev, [float(x["current"]) for x in h], lw=0.8, label=f"{world[0]}: current state")[0]
        ax.plot(ev, [float(x["best"]) for x in h], "--", color=line.get_color(), label=f"{world[0]}: best so far")
    if history:
        ax.set_title(f"one annealing run ({history[0]['arch']}, budget {history[0]['budget']}, seed 0): "
                     "the objective over the search", fontsize=9)
    ax.set_xlabel("objective evaluation"), ax.set_ylabel("midpoint loss barrier, annealing batch")
    ax.legend(fontsize=7), ax.grid(alpha=0.3)
    fig.suptitle("Functional difference (stars) vs simulated annealing at several budgets (n = 2: seed 0 vs seed 1, "
                 "or vs its permuted copy)", fontsize=10)
    fig.tight_layout(), fig.savefig(out / "fd_vs_sa.png", dpi=110), plt.close(fig)


def plot_all(out: Path, cfg: Config) -> None:
    rows = read_csv(out / "barriers.csv")
    if rows:
        plot_width(rows, out, cfg), plot_depth(rows, out, cfg), plot_task(rows, out, cfg)
    if read_csv(out / "search.csv"):
        plot_search(read_csv(out / "search.csv"), out)
    if read_csv(out / "fd_vs_sa.csv"):
        history = [h for h in read_csv(out / "sa_history.csv") if h["arch"] == cfg.history_arch]
        plot_fd_vs_sa(read_csv(out / "fd_vs_sa.csv"), history, out)


def print_tables(out: Path, cfg: Config) -> None:
    """The markdown tables of docs/results.md, section 6."""
    rows = read_csv(out / "barriers.csv")
    f3 = lambda st: f"{st[0]:.3f} ({st[1]:.3f}..{st[2]:.3f})"  # noqa: E731
    print("\nwidth (MNIST; plain: test / train loss barrier, aligned: test; mean over the trained seed pairs)\n| width | "
          + " | ".join(f"{h} hidden: plain | aligned" for h in cfg.hidden) + " | test acc (%), " + ", ".join(
          f"{h}h" for h in cfg.hidden) + " |\n|---|" + "---|---|" * len(cfg.hidden) + "---|")
    for w in cfg.widths:
        cells, accs = [], []
        for h in cfg.hidden:
            every = [r for r in rows if (r["arch"], r["dataset"]) == (mlp_name(h, w), "mnist")]
            g, note = trained(every), "" if len(trained(every)) == len(every) else f" ({len(trained(every))} of {len(every)} pairs)"
            if not g:
                cells += [f"no trained pair{note}", ""]
                accs.append("-")
                continue
            cells += [f"{_stats(g, 'plain_test_barrier')[0]:.3f} / {_stats(g, 'plain_train_barrier')[0]:.3f}{note}",
                      f"{_stats(g, 'aligned_test_barrier')[0]:.3f}"]
            accs.append(f"{50 * (_stats(g, 'test_acc_a')[0] + _stats(g, 'test_acc_b')[0]):.1f}")
        print(f"| {w} | " + " | ".join(cells) + f" | {', '.join(accs)} |")
    print("\ndepth (MNIST)\n| arch | pairs | test acc (%) | plain train | plain test | aligned train | aligned test |"
          "\n|---|---|---|---|---|---|---|")
    for arch, dataset in archs_for("depth", cfg):
        every = [r for r in rows if (r["arch"], r["dataset"]) == (arch, dataset)]
        g = trained(every)
        if g:
            acc = sum(float(r["test_acc_a"]) + float(r["test_acc_b"]) for r in g) / (2 * len(g))
            cells = [f3(_stats(g, f"{p}_{s}_barrier")) for p in ("plain", "aligned") for s in ("train", "test")]
            print(f"| {arch} | {len(g)} of {len(every)} | {100 * acc:.2f} | " + " | ".join(cells) + " |")
    points = task_points(rows, cfg)
    print("\ntask\n| arch | dataset | test error (%) | plain test loss barrier | plain test error barrier (%) "
          "| aligned test loss barrier |\n|---|---|---|---|---|---|")
    for p in points:
        print(f"| {p['arch']} | {p['dataset']} | {100 * p['test_error']:.2f} | {p['plain_test_barrier']:.3f} | "
              f"{100 * p['plain_test_error_barrier']:.1f} | {p['aligned_test_barrier']:.3f} |")
    if len(points) > 2:
        err = [p["test_error"] for p in points]
        print("Spearman(test error, barrier) over all points: " + ", ".join(
            f"{k} {spearman(err, [p[k] for p in points]):.2f}" for k in ("plain_test_barrier", "plain_test_error_barrier")))
    print("\nsearch\n| arch | world | " + " | ".join(SEARCH_METHODS) + " |\n|---|---|" + "---|" * len(SEARCH_METHODS))
    for (arch, dataset, world), g in _grouped(read_csv(out / "search.csv"), ["arch", "dataset", "world"]).items():
        by = {r["method"]: r for r in g}
        cells = [f"{float(by[m]['test_barrier']):.3f} / {float(by[m]['train_barrier']):.3f}" if m in by else "" for m in SEARCH_METHODS]
        print(f"| {arch} ({dataset}) | {world} | " + " | ".join(cells) + " |")
    budgets = cfg.sa_budgets + ((cfg.sa_long_budget,) if cfg.sa_long_archs else ())
    print("\nfd-vs-sa\n| arch | world | FD test / train barrier (s) | " + " | ".join(
        f"SA {b} test / train barrier (s)" for b in budgets) + " |\n|---|---|---|" + "---|" * len(budgets))
    for (arch, world), g in _grouped(read_csv(out / "fd_vs_sa.csv"), ["arch", "world"]).items():
        cell = lambda rs: f"{_stats(rs, 'test_barrier')[0]:.3f} / {_stats(rs, 'train_barrier')[0]:.3f} ({_stats(rs, 'seconds')[0]:.1f})"  # noqa: E731
        cells = [cell([r for r in g if r["method"] == "functional"])]
        cells += [cell([r for r in g if r["budget"] == str(b)]) if any(r["budget"] == str(b) for r in g) else "" for b in budgets]
        print(f"| {arch} | {world} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help=f"comma-separated experiments: {', '.join(EXPERIMENTS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, results under $ONEBASIN_CACHE/entezari-quick")
    parser.add_argument("--plot", action="store_true", help="only redraw the plots from the CSVs")
    parser.add_argument("--table", action="store_true", help="print the markdown tables of docs/results.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on shared cores)")
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    cache = CACHE / ("entezari-quick" if args.quick else "entezari")
    out = cache / "results" if args.quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    if args.table:
        return print_tables(out, cfg)
    torch.set_num_threads(args.threads)
    names = args.only.split(",") if args.only else list(EXPERIMENTS)
    unknown = sorted(set(names) - set(EXPERIMENTS))
    if unknown:
        raise SystemExit(f"unknown experiments {unknown}; valid: {', '.join(EXPERIMENTS)}")
    for name in [] if args.plot else names:
        t0 = time.perf_counter()
        print(f"{name}: running")
        if name in ("width", "depth", "task"):
            run_barriers(name, cfg, out, cache)
        elif name == "search":
            run_search(cfg, out, cache)
        else:
            run_fd_vs_sa(cfg, out, cache)
        print(f"{name}: done in {time.perf_counter() - t0:.0f} s")
        plot_all(out, cfg)
    plot_all(out, cfg)
    print(f"results in {out}")


if __name__ == "__main__":
    main()
