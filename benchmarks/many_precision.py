"""merge_many's joint statistics at float64 and float32 (issue 26): time, and whether the permutations agree.

    python benchmarks/many_precision.py                  # 5 random-init MLPs 10 x 512, 2,048 inputs, one thread

`align_many` (the alignment of `merge_many`) of N random-init models on random inputs at each precision, twice
in turn (float64, float32, float64, float32); prints the seconds of the joint statistics
(`record["seconds_statistics"]`: N forwards per batch plus the N(N-1)/2 cross products per site), one forward
pass of the N models over the same inputs for scale, and whether the two precisions' permutations are equal.
"""

from __future__ import annotations

import argparse
import time

import torch

from onebasin.align.many import align_many
from onebasin.models import create_model
from onebasin.spec import trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = []
    for seed in range(args.models):
        torch.manual_seed(seed)
        models.append(create_model("mlp", width=args.width, depth=args.depth).eval())
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(args.batch, 1, 28, 28, generator=g) for _ in range(args.examples // args.batch)]
    spec = trace(models[0], data[0])
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in data:
            for m in models:
                m(x)
    forward = time.perf_counter() - t0
    seconds, perms = {"float64": [], "float32": []}, {}
    for precision in ("float64", "float32") * 2:
        perms[precision], _, record = align_many(spec, models, "anchor", data=data, max_examples=None, precision=precision)
        seconds[precision].append(record["seconds_statistics"])
    same = all(torch.equal(p, perms["float32"][i][g]) for i, ps in enumerate(perms["float64"]) for g, p in ps.items())
    print(f"{args.models} MLPs {args.depth} x {args.width}, {args.examples} inputs, {args.threads} thread(s)")
    print(f"forward of the {args.models} models: {forward:.2f} s")
    for precision, ts in seconds.items():
        print(f"joint statistics {precision}: " + ", ".join(f"{t:.2f} s" for t in ts) + f" ({min(ts) / forward:.2f}x forward)")
    print(f"permutations equal: {same}")


if __name__ == "__main__":
    main()
