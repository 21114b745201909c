"""repair="auto" (issue 25): REPAIR is kept only where it does not raise the loss on held-out labelled examples;
both losses are recorded, and the CLI's JSON line and warning say when REPAIR raised it. Oracle: the held-out
cross-entropy of the uncorrected interpolation (state_dicts averaged by hand) and of exact REPAIR's model,
computed with torch's cross_entropy on their outputs."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from cli_helpers import checkpoint, run_cli, use_fake_data
from onebasin.errors import InvalidOptionError
from onebasin.pipeline import held_out_batches, merge
from onebasin.repair import repair
from reference_models import mlp


def make(seed, logit_scale=1.0):
    torch.manual_seed(seed)
    model = mlp(width=32, depth=3, in_features=12, num_classes=5).eval()
    with torch.no_grad():
        list(model.modules())[-1].weight.mul_(logit_scale)
    return model


def by_hand_midpoint(a, b):
    """(A + B) / 2, every tensor averaged by hand."""
    mid = copy.deepcopy(a)
    mid.load_state_dict({k: (v + b.state_dict()[k]) / 2 for k, v in a.state_dict().items()})
    return mid


def held_out_loss(model, batches):
    with torch.no_grad():
        return sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in batches) / sum(len(y) for _, y in batches)


def batches_of(x, y, size=100):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def test_auto_keeps_the_uncorrected_midpoint_where_repair_raises_the_held_out_loss():
    """A constructed case: the labels are the uncorrected midpoint's own (very confident) predictions, so any
    change REPAIR makes to its units can only raise the loss."""
    a, b = make(0, logit_scale=1000), make(1, logit_scale=1000)
    x = torch.randn(600, 12, generator=torch.Generator().manual_seed(0))
    plain = by_hand_midpoint(a, b)
    with torch.no_grad():
        y = plain(x).argmax(1)
    calib, held = batches_of(x, y)[:4], batches_of(x, y)[4:]
    corrected = repair(a, b, 0.5, calib).model
    loss_plain, loss_repair = held_out_loss(plain, held), held_out_loss(corrected, held)
    assert loss_repair > loss_plain + 1  # REPAIR hurts here
    merged, result = merge(a, b, method="none", repair="auto", data=calib, held_out=held)
    check = result.repair_check
    assert check["kept"] == "none" and check["repair_raised_loss"] is True and check["examples"] == 200
    assert check["loss_without_repair"] == pytest.approx(loss_plain, rel=1e-5)
    assert check["loss_with_repair"] == pytest.approx(loss_repair, rel=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), plain(x), rtol=1e-5, atol=1e-3)
    _, exact = merge(a, b, method="none", repair="exact", data=calib, held_out=held)  # exact keeps it, and says so
    assert exact.repair_check["kept"] == "repair" and exact.repair_check["repair_raised_loss"] is True


def test_auto_keeps_repair_where_it_lowers_the_held_out_loss():
    """A and a permuted copy of A averaged without alignment collapse; REPAIR restores the units' statistics and
    lowers the loss of A's own labels: auto keeps the REPAIRed network (its outputs are exact REPAIR's)."""
    from onebasin.permute import permute_model, random_perms
    from onebasin.spec import trace

    a = make(0)
    x = torch.randn(600, 12, generator=torch.Generator().manual_seed(1))
    spec = trace(a, x[:4])
    b = permute_model(a, spec, random_perms(spec, seed=3))
    with torch.no_grad():
        y = a(x).argmax(1)
    data = batches_of(x, y)  # 600 examples: with max_examples=400 the last 200 are held out by default
    merged, result = merge(a, b, method="none", repair="auto", data=data, max_examples=400)
    check = result.repair_check
    corrected = repair(a, b, 0.5, data[:4]).model
    assert check["kept"] == "repair" and check["examples"] == 200
    assert check["loss_with_repair"] == pytest.approx(held_out_loss(corrected, data[4:]), rel=1e-5)
    assert check["loss_without_repair"] == pytest.approx(held_out_loss(by_hand_midpoint(a, b), data[4:]), rel=1e-5)
    assert check["loss_with_repair"] < check["loss_without_repair"]
    with torch.no_grad():
        torch.testing.assert_close(merged(x), corrected(x), rtol=1e-5, atol=1e-5)


def test_auto_without_held_out_examples_names_the_remedy():
    a, b = make(0), make(1)
    x = torch.randn(64, 12)
    with pytest.raises(InvalidOptionError, match="held-out labelled examples.*held_out="):
        merge(a, b, method="none", repair="auto", data=[x], max_examples=64)


def test_held_out_batches_are_the_examples_after_the_calibration_set():
    x, y = torch.arange(250.0)[:, None], torch.arange(250)
    held = held_out_batches(batches_of(x, y, 60), skip=100, limit=90)
    assert torch.equal(torch.cat([h[1] for h in held]), torch.arange(100, 190))
    assert held_out_batches(batches_of(x, y, 60), skip=250) == []
    assert held_out_batches([x[:10]], skip=0) == []  # unlabelled batches: nothing to judge with
    assert held_out_batches([(x, x[:, 0])], skip=0) == []  # float targets: not class labels
    assert held_out_batches([({"x": x}, y)], skip=0) == []  # keyword inputs: evaluate takes a tensor


def test_exact_repair_is_not_judged_on_data_evaluate_cannot_score():
    """A regression-style loader (float targets) past max_examples: exact REPAIR merges as before, unjudged
    (the judge would have run cross-entropy on float targets and failed the merge)."""
    a, b = make(0), make(1)
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(2))
    data = [(x[i:i + 100], x[i:i + 100, :5]) for i in range(0, 300, 100)]
    _, result = merge(a, b, method="none", repair="exact", data=data, max_examples=100)
    assert result.repair_check == {}


def test_cli_merge_reports_when_repair_raised_the_held_out_loss(tmp_path, monkeypatch, capsys):
    """merge's JSON line carries repair_raised_loss (judged on the training images after the calibration set),
    a warning line says when it is true, and --repair auto needs such images."""
    use_fake_data(monkeypatch)
    a, b = checkpoint(tmp_path / "a.safetensors", seed=0), checkpoint(tmp_path / "b.safetensors", seed=1)
    code, out, err = run_cli(["merge", a, b, "--repair", "auto", "--calib-examples", "32", "--out", tmp_path / "m.safetensors"], capsys)
    assert code == 0, err
    line = json.loads(out.strip().splitlines()[-1])
    sidecar = json.loads((tmp_path / "m.json").read_text())
    check = next(v for k, v in _walk(sidecar) if k == "repair_check")
    assert line["repair_raised_loss"] == check["repair_raised_loss"] and check["examples"] == 32
    assert ("REPAIR raised the loss" in err) == check["repair_raised_loss"]
    code, out, err = run_cli(["merge", a, b, "--repair", "auto", "--out", tmp_path / "n.safetensors"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "held-out" in err


def _walk(d):
    """(key, value) of every nested dict entry."""
    for k, v in d.items():
        yield k, v
        if isinstance(v, dict):
            yield from _walk(v)


def test_reports_say_when_the_correction_raised_the_midpoint_loss():
    """compare's summary (the demo's table, report.json, index.html) names a correction that raised the midpoint
    test loss above the aligned midpoint's, and is silent when it lowered it."""
    from onebasin.experiment import summary_table
    from onebasin.interpolate import BarrierCurve
    from onebasin.comparison import Comparison

    def comparison(repaired_mid_loss):
        curve = lambda mid: BarrierCurve([0.0, 0.5, 1.0], {"test": [0.1, mid, 0.1]}, {"test": [0.9, 0.5, 0.9]})  # noqa: E731
        curves = {"plain": curve(2.0), "aligned": curve(0.8), "aligned+REPAIR": curve(repaired_mid_loss)}
        return Comparison(curves, {}, {}, {})

    worse, better = comparison(1.2), comparison(0.3)
    assert "raised the midpoint test loss (0.8000 aligned -> 1.2000 aligned+REPAIR)" in summary_table(worse)
    assert worse.to_dict()["repair_raised_loss"] is True
    assert "note" not in summary_table(better) and better.to_dict()["repair_raised_loss"] is False
