"""The command line: the demo end to end on a tiny setting, merge/barrier/sweep, and every input error."""

import json
from pathlib import Path

import matplotlib.image
import pytest
import torch

from cli_helpers import checkpoint, files, run_cli, use_fake_data
from onebasin.checkpoint import load_checkpoint
from onebasin.models import create_model
from reference_models import mlp

TINY = ["--width", "16", "--depth", "3", "--epochs", "1", "--train-limit", "2000", "--calib-examples", "500",
        "--test-examples", "1000", "--no-progress"]


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
    from onebasin.comparison import Comparison

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


def test_ctrl_c_during_sweep_exits_130_with_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("onebasin.sweep.run_experiment", interrupted)
    code, _, err = run_cli(["sweep", write_sweep(tmp_path, epochs=1), "--no-progress"], capsys)
    assert code == 130 and err.count("\n") == 1 and "interrupted" in err and "resume" in err


def test_merge_of_models_trained_on_different_datasets(tmp_path, monkeypatch, capsys):
    """Issue 12 #4: merging a MNIST model with a FashionMNIST model exited 0 with no warning."""
    use_fake_data(monkeypatch)
    a, b = checkpoint(tmp_path / "a.safetensors"), checkpoint(tmp_path / "b.safetensors", seed=1, dataset="fashionmnist")
    before = files(tmp_path)
    argv = ["merge", a, b, "--out", tmp_path / "m.safetensors", "--calib-examples", "64", "--no-progress"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "trained on mnist" in err and "on fashionmnist" in err and "--allow-different-data" in err
    assert files(tmp_path) == before
    code, stdout, err = run_cli([*argv, "--allow-different-data"], capsys)
    assert code == 0 and err.count("\n") == 1 and "warning" in err and "fashionmnist" in err
    assert json.loads(stdout)["out"] == str(tmp_path / "m.safetensors")
    assert load_checkpoint(tmp_path / "m.safetensors")[1]["dataset"] == "mnist"  # calibrated on A's dataset


def test_barrier_command_end_to_end(tmp_path, monkeypatch, capsys):
    use_fake_data(monkeypatch)
    a, b = checkpoint(tmp_path / "a.safetensors"), checkpoint(tmp_path / "b.safetensors", seed=1)
    out = tmp_path / "report"
    code, stdout, err = run_cli(["barrier", a, b, "--out", out, "--alphas", "3", "--repair", "closed",
                                 "--calib-examples", "64", "--no-progress"], capsys)
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0].split() == ["model", "test", "acc", "test", "loss", "loss", "barrier", "error", "barrier"]
    assert [line.split()[0:2] for line in lines[2:7]] == [["model", "A"], ["model", "B"], ["midpoint", "plain"],
                                                          ["midpoint", "aligned"], ["midpoint", "aligned+closed"]]
    assert lines[-1] == f"report: {(out / 'index.html').resolve()}"
    report = json.loads((out / "report.json").read_text())
    assert set(report["curves"]) == {"plain", "aligned", "aligned+closed"}
    plain = report["curves"]["plain"]
    assert plain["alphas"] == [0.0, 0.5, 1.0]  # --alphas is a count
    acc, loss = plain["acc"]["test"], plain["loss"]["test"]
    assert plain["barrier"]["test"]["loss"] == pytest.approx(max(0.0, loss[1] - (loss[0] + loss[2]) / 2))
    assert plain["barrier"]["test"]["error"] == pytest.approx(max(0.0, (1 - acc[1]) - (2 - acc[0] - acc[2]) / 2))
    assert report["run"]["a"] == str(a) and report["settings"]["repair"] == "closed"
    assert (out / "barrier.csv").read_text().count("\n") == 1 + 3 * 3
    assert sorted(p.name for p in out.iterdir()) == ["barrier.csv", "barrier.png", "index.html", "report.json",
                                                     "variance.png"]  # no temporary file left


@pytest.fixture
def tests_package(monkeypatch):
    """`tests.custom_nets` importable, as `--model tests.custom_nets:make_net` needs from the repository root."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))


def custom_pair(tmp_path):
    from custom_nets import make_net

    for seed, name in ((0, "a.pt"), (1, "b.pt")):
        torch.manual_seed(seed)
        torch.save(make_net().state_dict(), tmp_path / name)
    return tmp_path / "a.pt", tmp_path / "b.pt"


CUSTOM = ["--model", "tests.custom_nets:make_net", "--data", "mnist", "--calib-examples", "64", "--no-progress"]


def test_merged_custom_class_with_unfused_repair_reloads(tmp_path, monkeypatch, capsys, tests_package):
    """Issue 12: a merged model of the user's own class (--model mypkg:make_net) could not be reloaded."""
    import onebasin

    use_fake_data(monkeypatch)
    returned = {}

    def keep(*args, **kwargs):
        returned["model"], result = merge(*args, **kwargs)
        return returned["model"], result

    from onebasin.pipeline import merge

    monkeypatch.setattr("onebasin.pipeline.merge", keep)
    a, b = custom_pair(tmp_path)
    out = tmp_path / "merged.safetensors"
    code, stdout, err = run_cli(["merge", a, b, "--out", out, *CUSTOM], capsys)
    assert code == 0, err
    assert json.loads(stdout)["fused"] is False  # corrections after the residual additions stay as modules
    meta = load_checkpoint(out)[1]
    assert meta["model"] == "tests.custom_nets:make_net" and len(meta["repair_affines"]) == 2
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        expected = returned["model"].eval()(x)
        loaded, _ = onebasin.load_model(out, expect={"model": "tests.custom_nets:make_net"})
        assert torch.equal(loaded(x), expected)
        reread, _ = onebasin.load_any(out, "tests.custom_nets:make_net")  # how merge and barrier read it
        assert torch.equal(reread(x), expected)
    with pytest.raises(onebasin.CheckpointError, match="name it"):  # a checkpoint alone never runs a factory
        onebasin.load_model(out)


def test_merge_and_barrier_accept_a_merged_custom_class_file(tmp_path, monkeypatch, capsys, tests_package):
    """Issue 12: `onebasin merge`/`barrier` refused a merged module:factory checkpoint (unknown model)."""
    use_fake_data(monkeypatch)
    a, b = custom_pair(tmp_path)
    merged = tmp_path / "merged.safetensors"
    code, _, err = run_cli(["merge", a, b, "--repair", "reset_bn", "--out", merged, *CUSTOM], capsys)
    assert code == 0, err
    code, _, err = run_cli(["barrier", merged, b, "--out", tmp_path / "report", "--alphas", "3", *CUSTOM], capsys)
    assert code == 0, err
    code, _, err = run_cli(["merge", merged, a, "--out", tmp_path / "again.safetensors", *CUSTOM], capsys)
    assert code == 0, err


def test_barrier_of_two_merged_files_with_unfused_corrections(tmp_path, monkeypatch, capsys, tests_package):
    use_fake_data(monkeypatch)
    a, b = custom_pair(tmp_path)
    merged = tmp_path / "merged.safetensors"
    assert run_cli(["merge", a, b, "--out", merged, *CUSTOM], capsys)[0] == 0
    code, _, err = run_cli(["barrier", merged, merged, "--out", tmp_path / "report", "--alphas", "3", *CUSTOM], capsys)
    assert code == 0, err


@pytest.fixture
def toy_registrations():
    """A toy model and a toy alignment method in the registries, removed again afterwards."""
    from onebasin.align import AlignResult, register_method
    from onebasin.align._registry import _METHODS
    from onebasin.models._registry import _REGISTRY, register_model
    from onebasin.permute import identity_perms

    @register_model(flat_input=True, image_size=28, default_dataset="mnist")
    def toy_mlp(width=8, in_features=784, num_classes=10):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, width), torch.nn.ReLU(),
                                   torch.nn.Linear(width, num_classes))

    @register_method(name="toy_identity", reference="a test: B is already in A's unit order")
    def toy_identity(spec, model_a, model_b, data=None, **options):
        return AlignResult(identity_perms(spec), {"method": "toy_identity"})

    yield toy_mlp
    _REGISTRY.pop("toy_mlp")
    _METHODS.pop("toy_identity")


def test_registered_model_and_method_are_usable(tmp_path, monkeypatch, capsys, toy_registrations):
    import onebasin

    assert onebasin.list_models("toy*") == ["toy_mlp"] and "toy_identity" in onebasin.list_methods()
    models = []
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        models.append(onebasin.create_model("toy_mlp", width=8))
        onebasin.save_checkpoint(tmp_path / name, models[-1].state_dict(),
                                 {"model": "toy_mlp", "model_kwargs": {"width": 8}, "dataset": "mnist"})
    a, b = models
    x = torch.randn(16, 1, 28, 28)
    merged, result = onebasin.merge(a, b, method="toy_identity", repair="none", data=[x])
    assert result.align_record["method"] == "toy_identity"
    sa, sb = a.state_dict(), b.state_dict()
    by_hand = toy_registrations(width=8)
    by_hand.load_state_dict({k: (sa[k] + sb[k]) / 2 for k in sa})  # identity permutation: the plain average
    with torch.no_grad():
        assert torch.allclose(merged(x), by_hand(x), atol=1e-6)
    use_fake_data(monkeypatch)  # the registered model through the command line, then reloaded
    code, _, err = run_cli(["merge", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--method", "weight",
                            "--repair", "none", "--out", tmp_path / "m.safetensors", "--no-progress"], capsys)
    assert code == 0, err
    reloaded, meta = onebasin.load_model(tmp_path / "m.safetensors")
    assert meta["model"] == "toy_mlp" and isinstance(reloaded, torch.nn.Sequential)


def test_ctrl_c_during_merge_exits_130_with_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    use_fake_data(monkeypatch)
    monkeypatch.setattr("onebasin.pipeline.merge", interrupted)
    a, b = checkpoint(tmp_path / "a.safetensors"), checkpoint(tmp_path / "b.safetensors", seed=1)
    before = files(tmp_path)
    code, _, err = run_cli(["merge", a, b, "--out", tmp_path / "m.safetensors", "--no-progress"], capsys)
    assert code == 130 and err == "onebasin merge: interrupted\n" and files(tmp_path) == before
