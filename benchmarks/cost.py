"""Cost of merging: time and peak memory of each step, as ratios to forward passes measured in the same run.

    python benchmarks/cost.py                    # ResNet20 x1/x4, ResNet50 (64x64), MLP 10x512, ViT, GPT; all threads
    python benchmarks/cost.py --models resnet20x8 --examples 256 --append
    python benchmarks/cost.py --threads 1 --clock cpu   # a shared machine: this process's CPU time, not wall time

For each model: two differently seeded random-init copies A and B (eval mode) and `--examples` random
inputs of the model's shape in batches of `--batch` (default 512 examples in batches of 256, all threads;
doubled for small networks until one forward pass takes 0.5 s, so that ratios are not timer noise).
Steps: trace (PermutationSpec), weight matching, then at each statistics precision (float64: exact sums;
float32: shifted float32 products into float64 sums) activation matching (`align(..., check=False)`:
statistics, assignment, permuting B), endpoint statistics (one paired pass of A and B: the goals of REPAIR)
and exact REPAIR (the correction itself, given the endpoint statistics: one forward sweep of the
interpolated net); closed-form REPAIR, BN reset; and first, `cross products <precision>`: the products
x^T y of activation matching alone (timed without the forward passes, casts and sums around them).
`ratio` = step time / one no-grad forward pass of model A over the same examples; each step runs once to measure
its peak memory, then `--repeat` rounds (default 3), each round timing the forward pass (and the cross products)
beside the step, and the columns are medians over rounds of these per-round ratios (the machine's speed drifts
within a run); activation matching and the endpoint statistics are also given per forward pass of A *and* B
(`ratio_ab`); `ratio_floor` = step time / its floor: one forward of A and B plus the cross products of its precision (activation matching), one forward of A and B (endpoint
statistics), one forward pass (exact REPAIR, BN reset). `faults_k` = thousands of minor page faults during the step
(median over rounds; the forward row: per forward after warm-up), the kernel mapping in pages that glibc handed back
to the OS: a warm eager forward takes none. `peak` = peak memory above what was held before
the step (see _common.py); `sweep_MiB` = the activations one-sweep REPAIR kept (its own count). Rows go to
benchmarks/results/cost.csv.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

import torch
import torchvision

from _common import measure, minor_faults, timed, use_cpu_clock
from onebasin.align import align
from onebasin.interpolate import interpolate_model
from onebasin.models import create_model
from onebasin.repair import endpoint_stats, repair, reset_bn
from onebasin.report import read_csv, write_csv
from onebasin.spec import trace
from onebasin.sums import full_float32_matmul, site_matrix
from onebasin.taps import SiteTaps

print = functools.partial(print, flush=True)  # noqa: A001

CSV = Path(__file__).resolve().parent / "results" / "cost.csv"


def _resnet20(width):
    return lambda: (create_model("resnet20", width=width, num_classes=10), (3, 32, 32))


def _vit():
    return lambda: (create_model("vit", num_classes=10), (1, 28, 28))


def _mlp(depth):
    return lambda: (create_model("mlp", width=512, depth=depth), (1, 28, 28))


MODELS = {
    **{f"resnet20x{w}": _resnet20(w) for w in (1, 2, 4, 8)},
    "resnet50": lambda: (torchvision.models.resnet50(num_classes=10), (3, 64, 64)),
    "vit": _vit(),
    "gpt": lambda: (create_model("gpt"), None),  # token ids (batch, 128) of its 97-character vocabulary
    **{f"mlp512d{d}": _mlp(d) for d in (4, 8, 10, 16)},
}
DEFAULT = "resnet20x1,resnet20x4,resnet50,mlp512d10,vit,gpt"
PRECISIONS = ("float64", "float32")


def inputs(shape, batch: int, g: torch.Generator) -> torch.Tensor:
    """One batch of random inputs: images of `shape`, or (shape None) GPT token ids (batch, 128)."""
    if shape is None:
        return torch.randint(97, (batch, 128), generator=g)
    return torch.randn(batch, *shape, generator=g)


def forward(model, data):
    with torch.no_grad():
        for x in data:
            model(x)


def steps(a, b, data, n):
    """name -> zero-argument callable returning a detail, in order; later steps reuse `state` (aligned B...)."""
    state = {}

    def act(precision):
        def run():
            state["b"], res = align(a, b, "activation", data, spec=state["spec"], check=False, max_examples=n, precision=precision)
            return f"{res.record.get('statistics_passes')} pass(es) of statistics"

        return run

    def ends(precision):
        def run():
            state["ends"] = endpoint_stats(a, state["b"], data, state["spec"], max_examples=n, precision=precision)
            return f"{len(state['ends'].sites)} sites"

        return run

    def rep(method, precision="float64"):
        def run():
            result = repair(a, state["b"], 0.5, data, spec=state["spec"], method=method, max_examples=n,
                            endpoints=state["ends"], precision=precision)
            state[f"{method}_sweep_MiB"] = result.peak_bytes / 2**20
            return f"{result.passes} pass(es)"

        return run

    per_precision = {}
    for p in PRECISIONS:  # the float32 steps last: they leave state["ends"] at float32, which REPAIR closed reads
        per_precision |= {f"activation matching {p}": act(p), f"endpoint statistics {p}": ends(p), f"REPAIR exact {p}": rep("exact", p)}
    return {
        "trace": lambda: state.__setitem__("spec", trace(a, data[0])) or len(state["spec"]),
        "weight matching": lambda: align(a, b, "weight", spec=state["spec"], check=False)[1].record.get("iterations"),
        **per_precision,
        "REPAIR closed": rep("closed"),
        "BN reset": lambda: reset_bn(interpolate_model(a, state["b"], 0.5), data, n) and None,
    }, state


def cross_products(a, b, spec, data, device, precision: str) -> float:
    """Seconds of activation matching's cross products alone (x^T y of every site's (samples, units) matrices of
    A and B, batch by batch, in `precision`): its floor beyond the two forward passes."""
    sites = [s for g in spec.groups.values() for s in g.sites]
    taps_a, taps_b = SiteTaps(a, sites, spec.graph, False), SiteTaps(b, sites, spec.graph, False)
    dtype = getattr(torch, precision)
    total = 0.0
    with torch.no_grad(), full_float32_matmul():
        for x in data:
            (_, va), (_, vb) = taps_a(x), taps_b(x)
            for s, p, q in zip(sites, va, vb):
                xa, xb = site_matrix(p, s).to(dtype), site_matrix(q, s).to(dtype)
                total += timed(lambda xa=xa, xb=xb: xa.T @ xb, device)[1]
    return total


def floor_of(step: str, t_fwd: float, products: dict[str, float]) -> float | None:
    """The floor of a step: one forward of A and B plus (activation matching) the cross products alone, in the
    step's precision; None for the steps without one."""
    precision = step.rsplit(" ", 1)[-1]
    if step.startswith("activation matching"):
        return 2 * t_fwd + products[precision]
    if step.startswith("endpoint statistics"):
        return 2 * t_fwd
    if step.startswith("REPAIR exact") or step == "BN reset":
        return t_fwd
    return None


def rounds(step, fn, a, b, spec, data, device, repeat: int) -> tuple[float, float, float | None, float]:
    """(median seconds of the step, median of step / forward of A, median of step / floor, median thousands of
    minor page faults of the step) over `repeat` rounds, each round timing the forward pass (and for activation
    matching the cross products) right before the step: the machine's speed drifts over a run (the eager ViT
    forward took 0.62 s in one run and 0.81 s in another), so a step is set against the floor measured beside it,
    not one measured minutes earlier."""
    times, ratios, floors, faults = [], [], [], []
    precision = step.rsplit(" ", 1)[-1]
    for _ in range(repeat):
        t_fwd = timed(lambda: forward(a, data), device)[1]
        products = {precision: cross_products(a, b, spec, data, device, precision)} if step.startswith("activation matching") else {}
        before = minor_faults()
        t = timed(fn, device)[1]
        faults.append((minor_faults() - before) / 1000)
        floor = floor_of(step, t_fwd, products)
        times.append(t)
        ratios.append(t / t_fwd)
        floors.append(None if floor is None else t / floor)
    medians = [statistics.median(v) for v in (times, ratios, faults)]
    return medians[0], medians[1], None if floors[0] is None else statistics.median(floors), medians[2]


def bench(name, args, device) -> list[dict]:
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model, shape = MODELS[name]()
        models.append(model.to(device).eval())
    a, b = models
    g = torch.Generator().manual_seed(2)
    data = [inputs(shape, args.batch, g).to(device) for _ in range(args.examples // args.batch)]
    forward(a, data[:1])  # warm-up
    while timed(lambda: forward(a, data), device)[1] < 0.5 and len(data) < 64:  # small nets: enough examples to time
        data += [inputs(shape, args.batch, g).to(device) for _ in range(len(data))]
    n = len(data) * args.batch
    before = minor_faults()
    t_fwd = statistics.median(timed(lambda: forward(a, data), device)[1] for _ in range(3))
    fwd_faults = (minor_faults() - before) / 3000
    params = sum(p.numel() for p in a.parameters()) / 1e6
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in a.modules())
    base = {"model": name, "params_M": round(params, 3), "examples": n, "input": "x".join(map(str, shape or ("128 tokens",))),
            "batch": args.batch, "threads": torch.get_num_threads(), "device": device.type, "clock": args.clock}
    _, _, fwd_peak = measure(lambda: forward(a, data), device)
    rows = [{**base, "step": "forward (1 model)", "seconds": round(t_fwd, 4), "ratio": 1.0,
             "peak_MiB": round(fwd_peak, 1), "detail": "", "faults_k": round(fwd_faults, 1)}]
    print(f"\n{name}: {params:.2f}M params, {n} examples of {base['input']}")
    print(f"  {'forward (1 model)':<28} {t_fwd:8.3f} s  ratio {1:6.2f}  peak {fwd_peak:7.0f} MiB  faults {fwd_faults:6.1f}k")
    todo, state = steps(a, b, data, n)
    todo["trace"]()  # the spec, before the cross products that the floors need
    products = {}
    for p in PRECISIONS:
        products[p] = t = statistics.median(cross_products(a, b, state["spec"], data, device, p) for _ in range(args.repeat))
        rows.append({**base, "step": f"cross products {p}", "seconds": round(t, 4), "ratio": round(t / t_fwd, 2),
                     "ratio_ab": round(t / (2 * t_fwd), 2), "detail": "part of activation matching"})
        print(f"  {'cross products ' + p:<28} {t:8.3f} s  ratio {t / t_fwd:6.2f}  per A+B {t / (2 * t_fwd):5.2f}  (part of activation matching)")
    for step, fn in todo.items():
        if step == "BN reset" and not has_bn:
            continue
        detail, t, peak = measure(fn, device)
        floor = floor_of(step, t_fwd, products)  # the run's first floor; replaced by the rounds' own below
        ratio, ratio_floor, faults = t / t_fwd, None if floor is None else t / floor, None
        if step != "trace" and args.repeat > 1:  # medians of rounds, each timing the step beside its own floor
            t, ratio, ratio_floor, faults = rounds(step, fn, a, b, state["spec"], data, device, args.repeat)
        sweep = state.get("exact_sweep_MiB") if step.startswith("REPAIR exact") else None
        ab = ratio / 2 if step.startswith(("activation matching", "endpoint statistics")) else None
        rows.append({**base, "step": step, "seconds": round(t, 4), "ratio": round(ratio, 2),
                     "ratio_ab": "" if ab is None else round(ab, 2), "ratio_floor": "" if ratio_floor is None else round(ratio_floor, 2),
                     "peak_MiB": round(peak, 1), "sweep_MiB": "" if sweep is None else round(sweep, 1),
                     "detail": detail if detail is not None else "", "faults_k": "" if faults is None else round(faults, 1)})
        extra = (f"  per A+B {ab:5.2f}" if ab is not None else "") + (f"  floor x{ratio_floor:5.2f}" if ratio_floor is not None else "")
        extra += (f"  sweep {sweep:6.0f} MiB" if sweep is not None else "") + (f"  faults {faults:6.1f}k" if faults is not None else "")
        print(f"  {step:<28} {t:8.3f} s  ratio {ratio:6.2f}  peak {peak:7.0f} MiB{extra}  ({detail})")
    return rows


STEPS = ["trace", "weight matching", *(f"{s} {p}" for p in PRECISIONS for s in ("activation matching", "endpoint statistics", "REPAIR exact")),
         "REPAIR closed", "BN reset"]


def _cell(r: dict) -> str:
    """'seconds (ratio to one forward[, per A+B][, to the floor], peak)' of one cost.csv row."""
    per_ab = f", {float(r['ratio_ab']):.2f}x per A+B" if r.get("ratio_ab") else ""
    floor = f", {float(r['ratio_floor']):.2f}x floor" if r.get("ratio_floor") else ""
    peak = f", {float(r['peak_MiB']):.0f} MiB" if r.get("peak_MiB") else ""
    return f"{float(r['seconds']):.2f} s ({float(r['ratio']):.2f}x{per_ab}{floor}{peak})"


def print_table() -> None:
    """cost.csv as the markdown table of docs/results.md: seconds (ratio to one forward) and peak MiB per step."""
    rows = read_csv(CSV)
    steps = STEPS + [f"cross products {p}" for p in PRECISIONS]
    print("| model | params (M) | examples | forward (s) | " + " | ".join(steps) + " |")
    print("|---" * (4 + len(steps)) + "|")
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["step"]: r for r in rows if r["model"] == model}
        fwd = by["forward (1 model)"]
        cells = [_cell(by[s]) if s in by else "n/a" for s in steps]
        print(f"| {model} | {fwd['params_M']} | {fwd['examples']} | {float(fwd['seconds']):.3f} | " + " | ".join(cells) + " |")


def plot_growth() -> Path:
    """cost_growth.png: each step's time as a ratio to one forward pass, vs ResNet20 width and MLP depth, from cost.csv.

    Ratios, not seconds: rows may differ in example count (the ratio of a data-bound step does not).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(CSV)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, prefix, label in ((axes[0], "resnet20x", "ResNet20 width multiplier"), (axes[1], "mlp512d", "MLP depth (width 512)")):
        for step in STEPS:
            pts = sorted((int(r["model"].removeprefix(prefix)), float(r["ratio"])) for r in rows
                         if r["model"].startswith(prefix) and r["step"] == step)
            if pts:
                ax.plot(*zip(*pts), "o-", label=step)
        ax.set_xscale("log", base=2), ax.set_yscale("log"), ax.set_xlabel(label)
        ax.set_ylabel("time / one forward pass of one model"), ax.grid(alpha=0.3)
        counts = sorted({r["examples"] for r in rows if r["model"].startswith(prefix)}, key=int)
        ax.set_title(f"{' or '.join(counts)} random examples", fontsize=9)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=(len(STEPS) + 1) // 2, fontsize=8)
    threads = sorted({r["threads"] for r in rows}, key=int)
    fig.suptitle(f"Cost of merging steps ({' or '.join(threads)} threads, CPU); trace and weight matching do not grow with examples")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    out = CSV.with_name("cost_growth.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=DEFAULT, help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="median of this many runs of each step (trace: one)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="default: all")
    parser.add_argument("--append", action="store_true", help="keep rows of other models already in cost.csv")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: seconds of this process's CPU time (CPU device only; with --threads 1 on a shared machine, "
                             "the run's own cost without the time other processes hold the core)")
    parser.add_argument("--table", action="store_true", help="only print cost.csv as a markdown table")
    args = parser.parse_args()
    if args.table:
        return print_table(), plot_growth()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "cpu":
        if device.type != "cpu":
            parser.error("--clock cpu times the CPU device only")
        use_cpu_clock()
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock")
    names = args.models.split(",")
    old = [r for r in read_csv(CSV) if r["model"] not in names] if args.append else []
    rows = list(old)
    for name in names:
        rows += bench(name, args, device)
        write_csv(CSV, rows)
    print(f"\nwrote {CSV} and {plot_growth()}")


if __name__ == "__main__":
    main()
