"""Training: recipes as in the paper, schedules, determinism, resume after interruption, the CLI."""

import json

import pytest
import torch
from safetensors import safe_open

from onebasin.checkpoint import CheckpointError, load_checkpoint
from onebasin.cli import main
from onebasin.data import ImageData, dataset_info
from onebasin.models import create_model
from onebasin.train import RECIPES, TrainingDivergedError, default_recipe, get_recipe, lr_at, resume_path, seed_everything, train


def striped_data(n=128, seed=0) -> ImageData:
    """28x28 noise images whose class k (0..9) is marked by a bright 4x4 square at a class-specific place."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.randint(0, 60, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    for i, k in enumerate(labels.tolist()):
        r, c = 3 + 14 * (k // 5), 1 + 5 * (k % 5)
        images[i, 0, r:r + 6, c:c + 4] = 255
    return ImageData(images, labels, dataset_info("mnist"))


def test_presets_are_table_1_of_the_paper():
    mlp, vgg, rn = RECIPES["mlp"], RECIPES["vgg"], RECIPES["resnet20"]
    assert (mlp.batch_size, mlp.epochs, mlp.lr, mlp.schedule, mlp.weight_decay) == (2000, 100, 0.2, "linear", 0.0)
    assert (vgg.batch_size, vgg.epochs, vgg.lr, vgg.schedule, vgg.weight_decay) == (500, 100, 0.08, "cosine", 5e-4)
    assert (rn.batch_size, rn.epochs, rn.lr, rn.schedule, rn.weight_decay) == (500, 200, 0.4, "cosine", 1e-4)
    assert mlp.augment == ("translate",) and set(vgg.augment) == {"flip", "translate"}
    assert set(rn.augment) == {"flip", "translate", "cutout"}
    assert all(r.momentum == 0.9 for r in RECIPES.values())
    assert [default_recipe(m) for m in ("mlp", "vgg16", "resnet20", "resnet50")] == ["mlp", "vgg", "resnet20", "resnet20"]


def test_overrides_and_unknown_recipe():
    r = get_recipe("resnet20", epochs=3, lr=None)
    assert r.epochs == 3 and r.lr == 0.4
    with pytest.raises(ValueError, match="valid names: mlp, vgg, resnet20"):
        get_recipe("adam")


def test_linear_schedule_is_triangular():
    r = get_recipe("mlp")  # peak at 5% of training
    lrs = [lr_at(s, 1000, r) for s in range(1000)]
    peak = max(range(1000), key=lrs.__getitem__)
    assert 45 <= peak <= 50 and lrs[peak] == pytest.approx(0.2, rel=0.02)
    assert lrs[0] < 0.01 and lrs[-1] < 0.001
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))


def test_cosine_schedule_decays_from_peak_to_zero():
    r = get_recipe("vgg")
    lrs = [lr_at(s, 200, r) for s in range(200)]
    assert lrs[0] == pytest.approx(0.08, rel=1e-3) and lrs[-1] < 1e-4
    assert lrs[100] == pytest.approx(0.04, rel=0.02)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_constant_schedule_holds_the_peak_after_warmup():
    r = get_recipe("mlp", schedule="constant", lr=1e-3, warmup=0.1)
    lrs = [lr_at(s, 100, r) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3 * 0.5 / 10) and lrs[9] == pytest.approx(1e-3 * 9.5 / 10)
    assert lrs[10:] == [1e-3] * 90


def test_training_learns_and_records_history(tmp_path):
    data = striped_data(200)
    seed_everything(0)
    model = create_model("mlp", width=32, depth=3)
    recipe = get_recipe("mlp", epochs=8, batch_size=20, lr=0.05, augment=())
    result = train(model, data, striped_data(100, seed=1), recipe, seed=0, progress=False,
                   checkpoint_path=tmp_path / "m.safetensors", meta={"model": "mlp"})
    assert result.test_acc > 0.9 and result.train_acc > 0.9
    assert [h["epoch"] for h in result.history] == list(range(1, 9))
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    state, meta = load_checkpoint(tmp_path / "m.safetensors", expect={"model": "mlp", "epochs_done": 8})
    assert meta["test_acc"] == result.test_acc and meta["recipe"]["batch_size"] == 20 and meta["seed"] == 0
    assert torch.equal(state["head.weight"], model.head.weight)
    assert not resume_path(tmp_path / "m.safetensors").exists()  # removed once the run is complete


def test_divergence_stops_training_with_a_clear_error():
    seed_everything(0)
    recipe = get_recipe("mlp", epochs=2, batch_size=20, lr=1e12, warmup=0.0, augment=())
    with pytest.raises(TrainingDivergedError, match="training diverged: the loss is (nan|inf) at epoch"):
        train(create_model("mlp", width=32, depth=3), striped_data(100), striped_data(20, seed=1), recipe, progress=False)


def _run(name, seed, path=None, init_seed=None, on_epoch_end=None, lr=None):
    seed_everything(seed if init_seed is None else init_seed)
    kwargs = {"width": 16, "depth": 3} if name == "mlp" else {"in_channels": 1}
    model = create_model(name, **kwargs)
    n, batch = (64, 32) if name == "mlp" else (16, 8)  # ResNet20 steps are slow on CPU: keep them tiny
    recipe = get_recipe("mlp" if name == "mlp" else "resnet20", epochs=3, batch_size=batch, lr=lr)
    train(model, striped_data(n), striped_data(10, seed=1), recipe, seed=seed, progress=False,
          checkpoint_path=path, meta={"model": name}, on_epoch_end=on_epoch_end)
    return model.state_dict()


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = _run("mlp", 0), _run("mlp", 0), _run("mlp", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])


class Interrupt(Exception):
    pass


def _interrupt_after(epoch):
    def hook(e, record):
        if e == epoch:
            raise Interrupt

    return hook


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_resume_after_interruption_gives_the_same_weights(tmp_path, name):
    straight = _run(name, 0, tmp_path / "a.safetensors")
    with pytest.raises(Interrupt):
        _run(name, 0, tmp_path / "b.safetensors", on_epoch_end=_interrupt_after(1))
    assert resume_path(tmp_path / "b.safetensors").exists() and not (tmp_path / "b.safetensors").exists()
    resumed = _run(name, 0, tmp_path / "b.safetensors", init_seed=123)  # init is overwritten by the resume
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    meta_a = load_checkpoint(tmp_path / "a.safetensors")[1]
    meta_b = load_checkpoint(tmp_path / "b.safetensors")[1]
    assert [h["test_acc"] for h in meta_a["history"]] == [h["test_acc"] for h in meta_b["history"]]


def test_resume_refuses_an_epoch_checkpoint_of_another_run(tmp_path):
    with pytest.raises(Interrupt):
        _run("mlp", 0, tmp_path / "a.safetensors", on_epoch_end=_interrupt_after(1))
    with pytest.raises(CheckpointError, match="different run"):
        _run("mlp", 0, tmp_path / "a.safetensors", lr=0.1)


def test_cli_train_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--epochs" in out


@pytest.mark.parametrize("argv,message", [
    (["--model", "mlp", "--dataset", "mnist", "--epochs", "0"], "--epochs must be >= 1"),
    (["--model", "resnet20", "--depth", "3", "--dataset", "mnist"], "no option --depth"),
    (["--model", "vgg12", "--dataset", "mnist"], "unknown model 'vgg12'"),
    (["--model", "gpt", "--dataset", "pydoc", "--model-opts", "tie=false", "heads=4", "untie=true"], "no option --untie"),
    (["--model", "gpt", "--dataset", "pydoc", "--model-opts", "tie"], "expects KEY=VALUE"),
    (["--model", "mlp", "--dataset", "imagenet"], "unknown dataset"),
])
def test_cli_rejects_bad_arguments_with_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(["train", *argv, "--out", str(tmp_path / "x.safetensors")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_reports_missing_data(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--model", "mlp", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--no-download",
              "--out", str(tmp_path / "x.safetensors")])
    assert exit_.value.code == 2 and "data_batch_1" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_trains_on_real_mnist_and_refuses_to_overwrite(shared_data, tmp_path, capsys):
    out = tmp_path / "mlp.safetensors"
    argv = ["train", "--model", "mlp", "--width", "32", "--depth", "3", "--dataset", "mnist",
            "--data-dir", str(shared_data), "--limit", "2000", "--epochs", "2", "--batch-size", "100",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["test_acc"] == printed["test_acc"] > 0.5
    assert meta["model_kwargs"] == {"width": 32, "depth": 3, "in_features": 784, "num_classes": 10}
    assert meta["train_examples"] == 2000 and meta["recipe"]["epochs"] == 2 and meta["dataset"] == "mnist"
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "--force" in capsys.readouterr().err
    assert main(argv + ["--force", "--seed", "1"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["seed"] == 1


def test_cli_trains_an_untied_gpt_from_model_opts(tmp_path, capsys):
    out = tmp_path / "gpt.safetensors"
    argv = ["train", "--model", "gpt", "--dataset", "pydoc", "--width", "16", "--model-opts", "tie=false", "heads=2",
            "depth=1", "--limit", "32", "--epochs", "1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["model_kwargs"]["tie"] is False and meta["model_kwargs"]["heads"] == 2 and meta["model_kwargs"]["depth"] == 1
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.bias" in keys and not torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("tok_embed.weight"))
