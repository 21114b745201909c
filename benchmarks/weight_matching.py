"""Time of weight matching on large random-init pairs: seconds, sweeps, time per sweep, and where it goes.

    python benchmarks/weight_matching.py                      # 16-layer width-512 MLP and ResNet50, 2 threads
    python benchmarks/weight_matching.py --threads 1 --models mlp512d16

For each model: two differently seeded random inits A and B, built as in benchmarks/cost.py (the MLP of
`create_model("mlp", width=512, depth=16)` on 1x28x28; torchvision resnet50 with 10 classes, traced on
3x32x32), then `weight_matching(spec, A, B)` (Ainsworth et al. 2022, Alg. 1). Printed: wall and CPU
seconds, sweeps, assignments solved (of sweeps x groups visits), wall seconds per sweep, and the share of
the wall time spent in the score products (matmuls with their gathers), in the linear assignment (scipy),
in the exact float64 objective changes, and in the rest. GFLOP counts the score products; "from scratch"
is what recomputing every score at every visit would cost (one full pass over the groups per sweep).
Wall seconds above CPU seconds, or a high load average, means other jobs shared the machine; there,
OpenMP's default spin-waiting makes every parallel op wait for a descheduled thread (try
OMP_WAIT_POLICY=passive, printed in the header). The output also goes to results/weight_matching.txt
(--append: after what is there).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import time
from pathlib import Path

import torch
import torchvision

from onebasin._io import atomic_write_text
from onebasin.align import weight
from onebasin.models import create_model
from onebasin.spec import trace

OUT = Path(__file__).resolve().parent / "results" / "weight_matching.txt"
MODELS = {
    "mlp512d16": lambda: (create_model("mlp", width=512, depth=16), (1, 1, 28, 28)),
    "resnet50": lambda: (torchvision.models.resnet50(num_classes=10), (1, 3, 32, 32)),
}
PARTS = {"_add_product": "products", "assign": "assignment", "_gain": "exact changes"}


@contextlib.contextmanager
def timers():
    """Wrap weight.py's score products, assignment and exact changes; yields {part: seconds} and the product GFLOP."""
    spent = {part: 0.0 for part in PARTS.values()} | {"GFLOP": 0.0}
    originals = {name: getattr(weight, name) for name in PARTS}

    def wrap(name, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[PARTS[name]] += time.perf_counter() - t0
            if name == "_add_product":  # (out, a, b): out += a @ b.T
                spent["GFLOP"] += 2 * len(args[2]) * args[1].numel() / 1e9
            return out

        return timed

    for name, fn in originals.items():
        setattr(weight, name, wrap(name, fn))
    try:
        yield spent
    finally:
        for name, fn in originals.items():
            setattr(weight, name, fn)


def bench(name: str) -> str:
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model, shape = MODELS[name]()
        models.append(model.eval())
    a, b = models
    spec = trace(a, torch.randn(*shape))
    sd_a = {k: v.detach() for k, v in a.named_parameters()}
    full = sum(2 * g.size * sd_a[m.key].numel() for g in spec.groups.values() for m in g.members if m.key in sd_a) / 1e9
    with timers() as spent:
        t0, c0 = time.perf_counter(), time.process_time()
        result = weight.weight_matching(spec, a, b)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rec, sweeps = result.record, result.record["iterations"]
    rest = wall - sum(spent[p] for p in PARTS.values())
    shares = ", ".join(f"{p} {spent[p] / wall:.0%}" for p in PARTS.values())
    params = sum(p.numel() for p in sd_a.values()) / 1e6
    return (
        f"{name}: {params:.1f}M params, {len(spec)} groups ({sum(g.size for g in spec.groups.values())} units)\n"
        f"  {wall:.2f} s wall ({cpu:.2f} s CPU), {sweeps} sweeps, {rec['solves']} of {sweeps * len(spec)} assignments solved, "
        f"{wall / sweeps:.3f} s per sweep, converged {rec['converged']}\n"
        f"  time: {shares}, rest {rest / wall:.0%}\n"
        f"  score products: {spent['GFLOP']:.1f} GFLOP (from scratch: {sweeps} x {full:.1f} = {sweeps * full:.0f} GFLOP); "
        f"objective {rec['objective'][0]:.2f} -> {rec['objective'][-1]:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--append", action="store_true", help="keep what results/weight_matching.txt holds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average {os.getloadavg()[0]:.1f} at start")  # fmt: skip
    lines = [header]
    print(lines[0], flush=True)
    for name in args.models.split(","):
        lines.append(bench(name))
        print(lines[-1], flush=True)
    lines.append(f"load average {os.getloadavg()[0]:.1f} at end")
    print(lines[-1])
    before = OUT.read_text() + "\n" if args.append and OUT.exists() else ""
    atomic_write_text(OUT, before + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
