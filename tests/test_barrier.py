"""Barrier curves, variance collapse diagnostic and plots; on real MNIST, REPAIR beats plain alignment."""

import copy
import json
from pathlib import Path

import numpy as np

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import CountUses
from onebasin.align import align
from onebasin.diagnostics import ratio_series, ratio_table, site_label, variance_ratios
from onebasin.errors import OnebasinError
from onebasin.barrier import barrier_curve
from onebasin.interpolate import BarrierCurve, interpolate_model
from onebasin.permute import invert_perms, permute_model, random_perms
from onebasin.comparison import compare
from onebasin.pipeline import merge
from onebasin.plots import plot_barrier_curves, plot_variance_ratios
from onebasin.repair import repair, repair_errors
from onebasin.spec import trace
from reference_models import VGGish

MNIST_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data, as tests/conftest.py


def blobs(n, seed, dim=12, classes=5):
    """Gaussian blobs around fixed class centres: (x (n, dim), y (n,))."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 1.5
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=gen)
    return centres[y] + torch.randn(n, dim, generator=gen), y


def mlp(seed, width=32, depth=4, d_in=12, d_out=5):
    """`depth` Linear layers, ReLU, Kaiming-normal init (as onebasin.models.mlp)."""
    torch.manual_seed(seed)
    dims, layers = [d_in] + [width] * (depth - 1), []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    net = nn.Sequential(nn.Flatten(), *layers, nn.Linear(dims[-1], d_out))
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


def fit(model, x, y, epochs, seed, lr=0.05, batch=128):
    """SGD with momentum and a one-cycle schedule; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * (len(x) // batch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(len(x) // batch):
            idx = order[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def loader(x, y, batch=500):
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


def test_barrier_is_the_largest_rise_above_the_endpoint_chord():
    curve = BarrierCurve([0.0, 0.5, 1.0], {"test": [1.0, 3.0, 2.0]}, {"test": [0.9, 0.5, 0.8]})
    assert curve.barrier("test", "loss") == pytest.approx(1.5)
    assert curve.barrier("test", "error") == pytest.approx(0.5 - 0.15)
    flat = BarrierCurve([0.0, 0.5, 1.0], {"test": [1.0, 0.5, 2.0]}, {"test": [0.9, 0.95, 0.8]})
    assert flat.barrier("test", "loss") == 0.0  # below the chord: the endpoints bound it at 0
    assert json.loads(json.dumps(curve.to_dict()))["barrier"]["test"]["loss"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="error"):
        curve.barrier("test", "accuracy")
    with pytest.raises(ValueError, match="include 0 and 1"):
        BarrierCurve([0.0, 0.5], {"t": [1.0, 2.0]}, {"t": [0.5, 0.5]}).barrier("t")


def test_permuted_copy_has_zero_barrier_once_aligned():
    x, y = blobs(2000, seed=0)
    a = fit(mlp(0).double(), x.double(), y, epochs=4, seed=0)
    xt, yt = blobs(1000, seed=1)
    loaders = {"train": loader(x.double(), y), "test": loader(xt.double(), yt)}
    spec = trace(a, x[:2].double())
    perms = random_perms(spec, seed=7)
    b = permute_model(a, spec, perms)
    aligned = permute_model(b, spec, invert_perms(perms))  # the exact alignment
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    plain = barrier_curve(a, b, loaders, alphas)
    assert plain.barrier("test", "loss") > 0.1 and plain.barrier("test", "error") > 0.05
    for correction in (None, "repair_exact", "repair_closed"):
        curve = barrier_curve(a, aligned, loaders, alphas, correction)
        for split in loaders:
            assert curve.barrier(split, "loss") < 1e-9 and curve.barrier(split, "error") < 1e-9
            assert max(curve.loss[split]) - min(curve.loss[split]) < 1e-9
    assert curve.acc["test"][0] > 0.8


def test_corrections_run_on_a_batchnorm_net_and_plot(tmp_path):
    torch.manual_seed(0)
    a, b = VGGish(bn=True).eval(), VGGish(bn=True).eval()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 3, 16, 16, generator=gen), torch.randint(5, (96,), generator=gen)
    loaders = {"train": loader(x[:64], y[:64], 32), "test": loader(x[64:], y[64:], 32)}
    curves = {str(c): barrier_curve(a, b, loaders, [0.5], c) for c in (None, "reset_bn", "repair_exact", "repair_closed")}
    for c in curves.values():
        assert c.alphas == [0.0, 0.5, 1.0] and all(len(v) == 3 for v in c.loss.values())
        json.dumps(c.to_dict())
    assert curves["reset_bn"].loss["test"][1] != curves["None"].loss["test"][1]
    path = plot_barrier_curves(curves, tmp_path / "plots" / "barrier.png", metrics=("acc", "loss", "error"))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["barrier.png"]  # no temp file left behind
    with pytest.raises(ValueError, match="repair_exact"):
        barrier_curve(a, b, loaders, [0.5], "repair")
    with pytest.raises(OnebasinError, match="no BatchNorm"):
        barrier_curve(mlp(0), mlp(1), {"test": loader(*blobs(64, 0))}, [0.5], "reset_bn", calib_data=loader(*blobs(64, 1)))


class CountingLoader(list):
    """A list of batches that counts how often it is iterated."""

    iterations = 0

    def __iter__(self):
        self.iterations += 1
        return super().__iter__()


@pytest.mark.parametrize("correction", ["reset_bn", "repair_exact", "repair_closed"])
def test_corrections_are_never_calibrated_on_a_test_split(correction):
    """Issue 12 #6: with no calib_data and no "train" split, barrier_curve used the first loader (a test set)."""
    torch.manual_seed(0)
    a, b = VGGish(bn=True).eval(), VGGish(bn=True).eval()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 16, 16, generator=gen), torch.randint(5, (64,), generator=gen)
    test = CountingLoader(loader(x[:32], y[:32], 16))
    with pytest.raises(OnebasinError, match="pass calib_data"):
        barrier_curve(a, b, {"test": test}, [0.5], correction)
    train = CountingLoader(loader(x[32:], y[32:], 16))
    barrier_curve(a, b, {"test": test, "train": train}, [0.5], correction)
    assert test.iterations == 3  # evaluation only: one pass per alpha (0, 0.5, 1)
    assert train.iterations > 3  # evaluation and calibration


def test_variance_ratios_show_collapse_and_its_repair(tmp_path):
    x, y = blobs(1500, seed=0)
    a, b = (fit(mlp(s, width=32, depth=6), x, y, epochs=3, seed=s) for s in (0, 1))
    data = loader(x, y)
    mid = interpolate_model(a, b, 0.5)
    fixed = repair(a, b, 0.5, data).model
    results = {"plain": variance_ratios(a, b, mid, data), "plain+REPAIR": variance_ratios(a, b, fixed, data)}
    plain, repaired = ratio_series(results).values()
    assert len(plain) == 5 and plain[-1] < 0.8 and plain[-1] < plain[0]  # collapse grows with depth
    assert all(abs(r - 1) < 1e-6 for r in repaired)  # exact on the calibration data
    table = ratio_table(results)
    assert "plain+REPAIR" in table and len(table.splitlines()) == 6
    names = [site_label(s) for s, _ in results["plain"]]
    path = plot_variance_ratios(ratio_series(results), tmp_path / "ratios.png", layer_names=names)
    assert path.read_bytes()[:4] == b"\x89PNG"


def numpy_variance_ratios(a, b, mid, data, names):
    """The diagnostic by hand: plain forward hooks, numpy std (1/n) per unit, mean of std_mid / ((std_a + std_b) / 2)."""

    def activations(model):
        out = {n: [] for n in names}
        hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: out[n].append(o.detach().numpy()))
                 for n in names]
        with torch.no_grad():
            for x, _ in data:
                model.eval()(x)
        for h in hooks:
            h.remove()
        return {n: np.concatenate(v).astype(np.float64) for n, v in out.items()}

    acts = [activations(m) for m in (a, b, mid)]
    ratios = []
    for n in names:
        std_a, std_b, std_mid = (act[n].std(axis=0) for act in acts)
        ref = (std_a + std_b) / 2
        ratios.append(float(np.mean(std_mid[ref > 0] / ref[ref > 0])))
    return ratios


def midpoint_by_hand(a, b):
    mid = copy.deepcopy(a)
    sa, sb = a.state_dict(), b.state_dict()
    mid.load_state_dict({k: (sa[k] + sb[k]) / 2 for k in sa})
    return mid


def test_compare_measures_each_statistic_once_and_matches_numpy():
    x, y = blobs(600, seed=0)
    a, b = (fit(mlp(s, width=16, depth=4), x, y, epochs=2, seed=s) for s in (0, 1))
    data, loaders = loader(x, y, 200), {"test": loader(*blobs(300, seed=1))}
    seen = []
    barrier_curve(a, b, loaders, [0.5], "repair_exact", calib_data=data, on_model=lambda alpha, m: seen.append(alpha))
    assert seen == [0.0, 0.5, 1.0]
    with CountUses(a[1].weight) as uses:  # A's first Linear weight: counts passes that run A itself
        result = compare(a, b, loaders, data, alphas=[0.0, 0.5, 1.0], progress=False)
    # the input check's one forward of the 64-row example, then one pass over the 3 calibration batches:
    # alignment, whose statistics of A with the unaligned B also give REPAIR's goals and the variance ratios'
    # endpoint stds of the plain and the aligned pair (the curves evaluate copies of the interpolated weights)
    assert uses.n == 1 + len(data)
    names = ["1", "3", "5"]  # the hidden Linear layers of Sequential(Flatten, Linear, ReLU, ..., Linear)
    assert [s.module for s, _ in result.variance["plain"]] == names
    plain = numpy_variance_ratios(a, b, midpoint_by_hand(a, b), data, names)
    assert [r for _, r in result.variance["plain"]] == pytest.approx(plain, rel=1e-5)
    assert min(plain) < 0.95  # a real collapse, so the comparison can tell the curves apart
    aligned_b, _ = align(a, b, "activation", data)
    aligned = numpy_variance_ratios(a, aligned_b, midpoint_by_hand(a, aligned_b), data, names)
    assert [r for _, r in result.variance["aligned"]] == pytest.approx(aligned, rel=1e-5)
    merged, _ = merge(a, aligned_b, method="none", repair="exact", data=data)
    repaired = numpy_variance_ratios(a, aligned_b, merged, data, names)
    assert [r for _, r in result.variance["aligned+REPAIR"]] == pytest.approx(repaired, rel=1e-5)
    assert repaired == pytest.approx([1.0] * 3, abs=1e-4)  # REPAIR's goal: std_alpha = mean endpoint std (calib data)


def mnist(train, n=None):
    import torchvision

    ds = torchvision.datasets.MNIST(root=str(MNIST_ROOT), train=train, download=False)
    x = ((ds.data[:n].float() / 255 - 0.1307) / 0.3081).reshape(-1, 784)
    return x, ds.targets[:n]


@pytest.mark.slow
@pytest.mark.skipif(not (MNIST_ROOT / "MNIST").exists(), reason=f"MNIST not found under {MNIST_ROOT}")
def test_mnist_mlps_repair_beats_alignment_beats_plain(tmp_path):
    from onebasin.align import align  # issue 4

    x, y = mnist(True, 20000)
    xt, yt = mnist(False)
    a, b = (fit(mlp(s, width=128, depth=6, d_in=784, d_out=10), x, y, epochs=3, seed=s) for s in (0, 1))
    calib, test = loader(x[:5000], y[:5000]), {"test": loader(xt, yt, 1000)}
    aligned, _ = align(a, b, method="activation", data=calib)
    curves = {
        "plain": barrier_curve(a, b, test, [0.5]),
        "aligned": barrier_curve(a, aligned, test, [0.5]),
        "aligned+REPAIR": barrier_curve(a, aligned, test, [0.5], "repair_exact", calib_data=calib),
        "aligned+closed": barrier_curve(a, aligned, test, [0.5], "repair_closed", calib_data=calib),
    }
    mid = {k: c.acc["test"][1] for k, c in curves.items()}
    ends = curves["plain"].acc["test"][0], curves["plain"].acc["test"][2]
    ratios = {
        "plain": variance_ratios(a, b, interpolate_model(a, b, 0.5), test["test"]),
        "aligned": variance_ratios(a, aligned, interpolate_model(a, aligned, 0.5), test["test"]),
        "aligned+REPAIR": variance_ratios(a, aligned, repair(a, aligned, 0.5, calib).model, test["test"]),
    }
    print(f"\nMNIST 6-layer MLP w128: endpoint test acc {ends}, midpoint test acc {mid}")
    print("barriers (test error):", {k: round(c.barrier("test", "error"), 4) for k, c in curves.items()})
    print(ratio_table(ratios))
    closed = repair(a, aligned, 0.5, calib, method="closed")
    print("closed-form REPAIR, std error vs goal on calib (mean/max over units):",
          [(round(e["std_err_mean"], 3), round(e["std_err"], 3)) for e in repair_errors(closed, calib)])
    plot_barrier_curves(curves, tmp_path / "mnist_barrier.png")
    plot_variance_ratios(ratio_series(ratios), tmp_path / "mnist_ratios.png")
    assert min(ends) > 0.95
    assert mid["aligned+REPAIR"] > mid["aligned"] > mid["plain"]
    assert all(0.9 <= r <= 1.1 for _, r in ratios["aligned+REPAIR"])
