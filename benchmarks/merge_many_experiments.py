"""Two experiments on N-way merging (issue 17, docs/results.md section 7), on the endpoints of merge_many.py --train.

    python benchmarks/merge_many_experiments.py refine mnist 5     # re-align the endpoints to the merged network
    python benchmarks/merge_many_experiments.py starts mnist 5     # start and objective of the universe method

refine: for each calibration draw (0, 1, 2) and method (mergemany, universe), merge with exact N-way REPAIR,
then 4 rounds of: activation-match every endpoint to the current merged network (the correlations of one
joint pass of the merged network and the N endpoints), average and REPAIR again; prints the test accuracy
after each round.

starts: all 60,000 training images as calibration data (alignment statistics and REPAIR: no draw
noise); merged test accuracy of mergemany, universe, and two variants that separate the universe method's start from its objective: the synchronised start ascended
on MergeMany's score (`sync+mean`), and MergeMany's result ascended on the universe objective
(`mergemany+universe`).
"""

from __future__ import annotations

import sys

import torch

from merge_many import FMNIST, MNIST, SHALLOW, calibration

from onebasin.align import many
from onebasin.pipeline import merge_many
from onebasin.stats import joint_moments
from onebasin.align._registry import assign
from onebasin.data import batches, dataset_info, load_dataset
from onebasin.experiment import endpoint, evaluation_data
from onebasin.interpolate import evaluate
from onebasin.models import model_info
from onebasin.spec import trace

FAMILIES = {"mnist": MNIST, "fmnist": FMNIST, "shallow": SHALLOW}


def realigned(merged, models, spec, calib) -> list[dict]:
    """One permutation per endpoint: its units matched to the merged network's (activation matching)."""
    groups = [g for g in spec.groups.values() if g.sites]
    moments, _ = joint_moments([merged, *models], [s for g in groups for s in g.sites], calib, 5000, graph=spec.graph)
    it, perms = iter(moments), [{} for _ in models]
    for g in groups:
        corr = sum(many._correlation(cov, std) for cov, std in (many._blocks(next(it), len(models) + 1) for _ in g.sites))
        for k in range(len(models)):
            perms[k][g.name] = assign(corr[0, k + 1])
    return perms


def refine(models, exp, test, name) -> None:
    for draw in (0, 1, 2):
        calib = calibration(exp, draw)
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
        print(f"{name} N={len(models)} draw {draw}: " + " | ".join(line), flush=True)


@many.register_combiner(name="sync+mean", reference="benchmark variant: universe's start, MergeMany's objective")
def _sync_mean(problem):
    return problem.ascend(problem.synchronised(), "mean")


@many.register_combiner(name="mergemany+universe", reference="benchmark variant: MergeMany, then the universe objective")
def _mergemany_universe(problem):
    p, _, _ = problem.ascend([problem.identity] * problem.n_models, "mean")
    return problem.ascend(p, "pairs")


def starts(models, exp, test, name) -> None:
    size = model_info(exp.model).image_size or dataset_info(exp.dataset).image_size
    calib = list(batches(load_dataset(exp.dataset, True, exp.data_dir, image_size=size), 500))
    spec = trace(models[0], calib[0][0])
    for method in ("mergemany", "universe", "sync+mean", "mergemany+universe"):
        merged, _ = merge_many(models, method, "exact", data=calib, max_examples=None, spec=spec)
        print(f"{name} N={len(models)}, all training images: {method:<20} {100 * evaluate(merged, test)[1]:.2f}", flush=True)


def main() -> None:
    experiment, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    exp = FAMILIES[name].exp
    models = [endpoint(exp, s, progress=False)[0] for s in range(n)]
    {"refine": refine, "starts": starts}[experiment](models, exp, evaluation_data(exp)[0]["test"], name)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
