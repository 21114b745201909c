"""Cost of each alignment method relative to one plain forward pass of both models, and its peak memory.

    python benchmarks/align_speed.py        # ResNet20 x4 and torchvision ResNet50, 256 images 3x32x32
    python benchmarks/align_speed.py --examples 1000 --batch 100 --methods all

For each model and method, in a fresh process: two differently seeded random-init copies A and B and
`--examples` random inputs; `ratio` = the method's wall time / the time of one plain forward of A and of
B over the same batches (no_grad, eval mode), both measured in that process, one right after the other.
`peak` = peak memory above what was held before the step (CPU: peak RSS from /proc/self/status VmHWM,
reset through /proc/self/clear_refs; CUDA: torch.cuda.max_memory_allocated). "functional" costs
~fan_in / fan_out (9 for 3x3 convs) plain forwards in float64 for its layer-input second moments.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys

import torch
import torchvision

from _common import peak_since, reset_peak, timed
from onebasin.align import get_method, list_methods
from onebasin.spec import trace

print = functools.partial(print, flush=True)  # noqa: A001  (progress shows up when piped)


def resnet20x4() -> torch.nn.Module:
    from onebasin.models import create_model

    return create_model("resnet20", width=4, num_classes=10)


MODELS = {"resnet20x4": resnet20x4, "resnet50": lambda: torchvision.models.resnet50(num_classes=10)}


def plain_forward(a, b, data):
    with torch.no_grad():
        for x in data:
            a(x), b(x)


def measure(name: str, method: str, args, device: torch.device) -> dict:
    """In this process: build A, B and the data, time a plain forward of both, then the method."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(MODELS[name]().to(device).eval())
    a, b = models
    gen = torch.Generator().manual_seed(2)
    data = [torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen).to(device) for _ in range(args.examples // args.batch)]
    spec = trace(a, data[0])
    plain_forward(a, b, data[:1])  # warm-up
    base = reset_peak(device)
    _, t_fwd = timed(lambda: plain_forward(a, b, data), device)
    peak_fwd = peak_since(device, base)
    options = {"budget": args.budget} if method == "annealing" else {}
    base = reset_peak(device)
    result, t = timed(lambda: get_method(method)(spec, a, b, data, **options), device)
    return {"params": sum(p.numel() for p in a.parameters()), "groups": len(spec), "examples": len(data) * args.batch,
            "forward_s": t_fwd, "forward_peak": peak_fwd, "seconds": t, "peak": peak_since(device, base),
            "iterations": result.record.get("iterations")}  # fmt: skip


def in_fresh_process(name: str, method: str, argv: list[str]) -> dict:
    """Run `measure` in a new interpreter, so that each peak starts from a clean allocator."""
    cmd = [sys.executable, __file__, *argv, "--child", f"{name}:{method}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet20x4,resnet50")
    parser.add_argument("--methods", default="activation,weight", help="comma list; 'all' for every registered method")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--budget", type=int, default=200, help="annealing evaluations, if annealing is listed")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child:
        print(json.dumps(measure(*args.child.split(":"), args, device)))
        return
    argv = sys.argv[1:]
    methods = list_methods() if args.methods == "all" else args.methods.split(",")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.examples} random examples of 3x{args.image_size}x{args.image_size}, batch {args.batch}")  # fmt: skip
    print("ratio = method time / time of one plain forward of A and B over the same data (same process);")
    print("peak = peak memory during the step above what was held before it (MiB)")
    for name in args.models.split(","):
        for method in methods:
            r = in_fresh_process(name, method, argv)
            print(f"{name:<11} {r['params'] / 1e6:6.2f}M params {r['groups']:3d} groups | forward A+B {r['forward_s']:7.2f} s "
                  f"peak {r['forward_peak']:6.0f} | {method:<10} {r['seconds']:7.2f} s  ratio {r['seconds'] / r['forward_s']:6.2f}  "
                  f"peak {r['peak']:6.0f}  iterations {r['iterations']}")  # fmt: skip


if __name__ == "__main__":
    main()
