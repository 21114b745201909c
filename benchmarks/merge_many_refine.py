"""Experiment (issue 17): does re-aligning every endpoint to the REPAIRed merged network improve an N-way merge?

    python benchmarks/merge_many_refine.py mnist 5     # family (mnist | fmnist | shallow), N; endpoints of merge_many.py --train

For each calibration draw (0, 1, 2) and method (mergemany, universe): merge with exact N-way REPAIR, then
4 rounds of: activation-match every endpoint to the current merged network (the correlations of one
joint pass of the merged network and the N endpoints), average and REPAIR again. Prints the test
accuracy after each round. Result (docs/results.md section 7): every round makes the merge worse.
"""

from __future__ import annotations

import sys

import torch

from merge_many import FMNIST, MNIST, SHALLOW, calibration
from onebasin.align._registry import assign
from onebasin.align.many import _blocks, _correlation, joint_moments, merge_many
from onebasin.experiment import endpoint, evaluation_data
from onebasin.interpolate import evaluate
from onebasin.spec import trace


def realigned(merged, models, spec, calib) -> list[dict]:
    """One permutation per endpoint: its units matched to the merged network's (activation matching)."""
    groups = [g for g in spec.groups.values() if g.sites]
    moments, _ = joint_moments([merged, *models], [s for g in groups for s in g.sites], calib, 5000, graph=spec.graph)
    it, perms = iter(moments), [{} for _ in models]
    for g in groups:
        corr = sum(_correlation(cov, std) for cov, std in (_blocks(next(it), len(models) + 1) for _ in g.sites))
        for k in range(len(models)):
            perms[k][g.name] = assign(corr[0, k + 1])
    return perms


def main() -> None:
    family, n = {"mnist": MNIST, "fmnist": FMNIST, "shallow": SHALLOW}[sys.argv[1]], int(sys.argv[2])
    models = [endpoint(family.exp, s, progress=False)[0] for s in range(n)]
    test = evaluation_data(family.exp)[0]["test"]
    for draw in (0, 1, 2):
        calib = calibration(family.exp, draw)
        spec = trace(models[0], calib[0][0])
        line = []
        for method in ("mergemany", "universe"):
            merged, _ = merge_many(models, method, "exact", data=calib, max_examples=5000, spec=spec)
            accs = [evaluate(merged, test)[1]]
            for _ in range(4):
                merged, _ = merge_many(models, method, "exact", data=calib, max_examples=5000, spec=spec,
                                       perms=realigned(merged, models, spec, calib))
                accs.append(evaluate(merged, test)[1])
            line.append(f"{method}: " + " -> ".join(f"{100 * a:.2f}" for a in accs))
        print(f"{sys.argv[1]} N={n} draw {draw}: " + " | ".join(line), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
