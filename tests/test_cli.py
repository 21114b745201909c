"""The command line: the demo end to end on a tiny setting, merge/barrier/sweep, and every input error."""

import json

import matplotlib.image
import pytest
import torch

from onebasin.checkpoint import load_checkpoint, save_checkpoint
from onebasin.cli import main
from onebasin.models import create_model
from reference_models import mlp

TINY = ["--width", "16", "--depth", "3", "--epochs", "1", "--train-limit", "2000", "--calib-examples", "500",
        "--test-examples", "1000", "--no-progress"]


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `onebasin ARGV`."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def checkpoint(path, width=16, seed=0):
    torch.manual_seed(seed)
    kw = {"width": width, "depth": 3, "in_features": 784, "num_classes": 10}
    save_checkpoint(path, create_model("mlp", **kw).state_dict(), {"model": "mlp", "model_kwargs": kw, "dataset": "mnist", "seed": seed})
    return path


@pytest.mark.slow
def test_demo_end_to_end_writes_the_report(tmp_path, shared_data, capsys):
    out = tmp_path / "report"
    code, stdout, _ = run_cli(["demo", "--data-dir", shared_data, "--cache-dir", tmp_path / "cache", "--out", out, *TINY], capsys)
    assert code == 0
    assert "midpoint aligned+REPAIR" in stdout and str(out / "index.html") in stdout
    report = json.loads((out / "report.json").read_text())
    assert {"summary", "curves", "variance_ratio", "alignment", "settings", "run"} <= set(report)
    assert set(report["curves"]) == {"plain", "aligned", "aligned+REPAIR"}
    assert len(report["curves"]["plain"]["acc"]["test"]) == 11 and "barrier" in report["curves"]["aligned"]
    for png in ("barrier.png", "variance.png"):
        image = matplotlib.image.imread(out / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0
    html = (out / "index.html").read_text()
    assert 'src="barrier.png"' in html and 'src="variance.png"' in html and "midpoint aligned" in html
    assert (out / "barrier.csv").read_text().startswith("curve,alpha,test_acc,test_loss,train_acc,train_loss")
    # a second run reuses the cached endpoints
    code, _, _ = run_cli(["demo", "--data-dir", shared_data, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "again", *TINY], capsys)
    assert code == 0 and all(e["cached"] for e in json.loads((tmp_path / "again" / "report.json").read_text())["run"]["endpoints"])


@pytest.mark.slow
def test_merge_checkpoints_and_user_factory(tmp_path, shared_data, capsys):
    a, b = checkpoint(tmp_path / "a.safetensors"), checkpoint(tmp_path / "b.safetensors", seed=1)
    out = tmp_path / "merged.safetensors"
    common = ["--data-dir", shared_data, "--calib-examples", "500", "--no-progress"]
    code, stdout, err = run_cli(["merge", a, b, "--out", out, *common], capsys)
    assert code == 0, err
    state, meta = load_checkpoint(out)
    assert meta["merge"]["method"] == "activation" and meta["merge"]["repair"] == "exact"
    assert set(meta["measured"]) == {"model_a", "model_b", "merged"} and meta["model"] == "mlp"
    create_model("mlp", **meta["model_kwargs"]).load_state_dict(state)  # strict: the original architecture
    assert meta["merge"]["fused"] and "repair_affines" not in meta
    # a user's own model: module:factory and plain torch.save'd state_dicts
    torch.manual_seed(0)
    for name in ("a.pt", "b.pt"):
        torch.save(mlp(width=8, depth=3, in_features=784, num_classes=10).state_dict(), tmp_path / name)
    code, _, err = run_cli(["merge", tmp_path / "a.pt", tmp_path / "b.pt", "--model", "reference_models:mlp",
                            "--model-opts", "width=8", "depth=3", "in_features=784", "num_classes=10",
                            "--data", "mnist", "--method", "weight", "--repair", "closed",
                            "--out", tmp_path / "own.safetensors", *common], capsys)
    assert code == 0, err
    # never overwrite without --force
    code, _, err = run_cli(["merge", a, b, "--out", out, *common], capsys)
    assert code == 2 and "exists; pass --force" in err


@pytest.mark.parametrize("case", ["missing", "mismatch", "model_name", "unreadable", "no_model"])
def test_merge_input_errors_exit_2_with_one_line(case, tmp_path, capsys):
    a = checkpoint(tmp_path / "a.safetensors")
    b = {"missing": tmp_path / "nope.safetensors", "mismatch": checkpoint(tmp_path / "b.safetensors", width=8)}.get(case)
    argv = ["merge", a, b, "--out", tmp_path / "m.safetensors", "--no-progress"]
    expected = {"missing": "no checkpoint at", "mismatch": "different architectures"}.get(case)
    if case in ("model_name", "unreadable", "no_model"):
        bad = tmp_path / "b.pt"
        if case == "unreadable":
            bad.write_bytes(b"not a checkpoint")
            argv = ["merge", bad, bad, "--model", "mlp", "--out", tmp_path / "m.safetensors"]
            expected = "not a readable checkpoint"
        else:
            torch.save(mlp().state_dict(), bad)
            argv = ["merge", bad, bad, "--out", tmp_path / "m.safetensors"] + (["--model", "nosuchnet"] if case == "model_name" else [])
            expected = "unknown model 'nosuchnet'" if case == "model_name" else "not an onebasin checkpoint"
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert expected in err and err.count("\n") == 1, err


def test_demo_rejects_unknown_model_and_existing_output(tmp_path, capsys):
    code, _, err = run_cli(["demo", "--model", "nosuchnet", "--out", tmp_path / "r"], capsys)
    assert code == 2 and "unknown model 'nosuchnet'" in err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.json").write_text("{}")
    code, _, err = run_cli(["demo", "--out", tmp_path / "r"], capsys)
    assert code == 2 and "exists; pass --force" in err


def test_demo_missing_data_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torchvision.datasets.utils.download_url", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    code, _, err = run_cli(["demo", "--data-dir", tmp_path / "empty", "--cache-dir", tmp_path / "c", "--out", tmp_path / "r", *TINY], capsys)
    assert code == 2 and "train-images-idx3-ubyte" in err and str(tmp_path / "empty") in err


def test_every_command_has_help_with_examples(capsys):
    for command in ("train", "demo", "merge", "barrier", "sweep"):
        code, stdout, _ = run_cli([command, "--help"], capsys)
        assert code == 0 and "example" in stdout


@pytest.mark.slow
def test_sweep_skips_finished_cells(tmp_path, shared_data, capsys):
    config = tmp_path / "sweep.toml"
    config.write_text(f'''out = "{tmp_path / 'sweep'}"
[base]
model = "mlp"
dataset = "mnist"
epochs = 1
train_limit = 2000
calib_examples = 500
test_examples = 500
train_eval_examples = 500
alphas = [0.0, 0.5, 1.0]
data_dir = "{shared_data}"
cache_dir = "{tmp_path / 'cache'}"
model_kwargs = {{ depth = 3 }}
[grid]
width = [8, 16]
method = ["weight"]
''')
    code, stdout, err = run_cli(["sweep", config, "--no-progress"], capsys)
    assert code == 0, err
    rows = (tmp_path / "sweep" / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and "aligned+REPAIR_loss_barrier" in rows[0]
    assert matplotlib.image.imread(tmp_path / "sweep" / "summary.png").ndim == 3
    before = (tmp_path / "sweep" / "results.csv").stat().st_mtime_ns
    code, _, _ = run_cli(["sweep", config, "--no-progress"], capsys)
    assert code == 0 and len((tmp_path / "sweep" / "results.csv").read_text().splitlines()) == 3
    assert (tmp_path / "sweep" / "results.csv").stat().st_mtime_ns == before  # nothing re-run, nothing rewritten


def fake_comparison(barrier):
    """A Comparison whose plain curve rises `barrier` above the chord at alpha 0.5 (no training needed)."""
    from onebasin.interpolate import BarrierCurve
    from onebasin.pipeline import Comparison

    curve = BarrierCurve([0.0, 0.5, 1.0], {"test": [0.1, 0.1 + barrier, 0.1]}, {"test": [0.9, 0.5, 0.9]})
    return Comparison({"plain": curve}, {}, {}, {})


def write_sweep(tmp_path, epochs, grid='width = [8, 16]\nmethod = ["weight"]'):
    config = tmp_path / "sweep.toml"
    config.write_text(f'out = "{tmp_path / "sweep"}"\n[base]\nmodel = "mlp"\ndataset = "mnist"\nepochs = {epochs}\n'
                      f'model_kwargs = {{ depth = 3 }}\n[grid]\n{grid}\n')
    return config


def test_sweep_reruns_cells_after_base_is_edited(tmp_path, monkeypatch, capsys):
    """Issue 12 #5: after an edit of [base] a resumed sweep silently kept the old rows (keyed by grid cell only)."""
    runs = []

    def run(exp, progress=True):
        runs.append((exp.epochs, exp.model_kwargs["width"], exp.out))
        return fake_comparison(exp.epochs / 10), {}

    monkeypatch.setattr("onebasin.sweep.run_experiment", run)
    config = write_sweep(tmp_path, epochs=1)
    assert run_cli(["sweep", config, "--no-progress"], capsys)[0] == 0
    assert run_cli(["sweep", config, "--no-progress"], capsys)[0] == 0  # nothing new to run
    assert [r[:2] for r in runs] == [(1, 8), (1, 16)]
    write_sweep(tmp_path, epochs=2)  # the [base] section changes: every cell must run again
    assert run_cli(["sweep", config, "--no-progress"], capsys)[0] == 0
    assert [r[:2] for r in runs] == [(1, 8), (1, 16), (2, 8), (2, 16)]
    assert len({r[2] for r in runs}) == 4  # each setting gets its own report folder
    import csv

    rows = list(csv.DictReader((tmp_path / "sweep" / "results.csv").open()))
    assert [(r["width"], round(float(r["plain_loss_barrier"]), 6)) for r in rows] == [("8", 0.1), ("16", 0.1), ("8", 0.2), ("16", 0.2)]
    assert len({r["settings"] for r in rows}) == 4  # old rows kept, told apart by their settings
    write_sweep(tmp_path, epochs=1)  # back to the first settings: their rows are reused
    assert run_cli(["sweep", config, "--no-progress"], capsys)[0] == 0 and len(runs) == 4


@pytest.mark.parametrize("grid,cause", [
    ("seeds = [[0]]", "seeds must be two integers"),
    ('method = ["weight", "nosuch"]', "unknown method 'nosuch'"),
    ('repair = ["reset_bn"]', "needs BatchNorm"),
    ('width = [8, "wide"]', "width"),
    ("widht = [8]", "unexpected keyword argument 'widht'"),
    ("epochs = [0]", "epochs must be an integer >= 1"),
    ("alphas = [[0.0, 1.5]]", "alphas must be a list of numbers in [0, 1]"),
    ('dataset = ["imagenet"]', "unknown dataset 'imagenet'"),
])
def test_sweep_validates_every_cell_before_training(tmp_path, monkeypatch, capsys, grid, cause):
    """Issue 12: seeds = [[0]] failed with an IndexError after training the endpoints."""
    monkeypatch.setattr("onebasin.sweep.run_experiment", lambda *a, **k: pytest.fail("trained before validating"))
    config = write_sweep(tmp_path, epochs=1, grid=f"width = [8]\n{grid}" if not grid.startswith("width") else grid)
    code, _, err = run_cli(["sweep", config, "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1 and cause in err, err
    assert not (tmp_path / "sweep").exists()

