"""The command line's alignment options: --learned-init/-epochs/-steps/-lr/-batch-size reach learned matching (merge,
barrier, demo), --untie reaches demo's orthogonal and learned alignment of a tied GPT, and every misuse is one line
(exit 2) naming the flag, with no file written."""

import json
import math

import pytest
import torch

from cli_helpers import checkpoint, files, run_cli, use_fake_data
from onebasin.checkpoint import load_checkpoint, save_checkpoint
from onebasin.data import dataset_info
from onebasin.experiment import Experiment, endpoint_path
from onebasin.models import create_model, data_kwargs

LEARNED = ["--method", "learned", "--calib-examples", "64", "--no-progress"]


@pytest.fixture
def pair(tmp_path, monkeypatch):
    use_fake_data(monkeypatch)  # 64 calibration images in two batches of 32
    return [checkpoint(tmp_path / "a.safetensors"), checkpoint(tmp_path / "b.safetensors", seed=1)]


def test_merge_passes_the_learned_options_to_the_method(tmp_path, pair, capsys):
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli(["merge", *pair, *LEARNED, "--learned-init", "identity", "--learned-steps", "3",
                            "--learned-lr", "0.02", "--learned-batch-size", "16", "--out", out], capsys)
    assert code == 0, err
    record = load_checkpoint(out)[1]["merge"]["align_record"]
    assert record["init"] == "identity" and record["init_record"] == {"method": "identity"}
    assert record["steps"] == 3 and len(record["loss"]) == 3 and len(record["moved"]) == 3
    assert record["lr"] == 0.02 and record["batch_size"] == 16 and record["examples"] == 64
    # epochs instead of steps: ceil(2 passes * 64 examples / 16 per step) = 8 steps
    code, _, err = run_cli(["merge", *pair, *LEARNED, "--learned-epochs", "2", "--learned-batch-size", "16",
                            "--out", tmp_path / "e.safetensors"], capsys)
    assert code == 0, err
    record = load_checkpoint(tmp_path / "e.safetensors")[1]["merge"]["align_record"]
    assert record["steps"] == math.ceil(2 * 64 / 16) == len(record["loss"]) and record["init"] == "weight"


def test_barrier_passes_the_learned_options_to_the_method(tmp_path, pair, capsys):
    code, _, err = run_cli(["barrier", *pair, *LEARNED, "--learned-steps", "2", "--learned-lr", "0.03",
                            "--learned-init", "activation", "--alphas", "3", "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "r" / "report.json").read_text())["alignment"]
    assert record["steps"] == 2 and len(record["loss"]) == 2 and record["lr"] == 0.03
    assert record["init"] == "activation" and record["init_record"]["method"] == "activation"


def tied_gpt_endpoints(cache, width=16, depth=1):
    """Cached endpoints of `demo --model gpt --width W --depth D --epochs 1` (no training): tied, no head bias,
    every parameter random, so the final LayerNorm's gain is far from uniform."""
    kw = {"width": width, "depth": depth, **data_kwargs("gpt", dataset_info("pydoc"))}
    exp = Experiment(model="gpt", dataset="pydoc", model_kwargs={"width": width, "depth": depth}, epochs=1, cache_dir=str(cache))
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model("gpt", **kw)
        assert model.lm_head.weight is model.tok_embed.weight and model.lm_head.bias is None
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
        save_checkpoint(endpoint_path(exp, seed), model.state_dict(), {"model": "gpt", "model_kwargs": kw, "dataset": "pydoc",
                                                                       "seed": seed, "epochs_done": 1})
    return kw


def fake_text_batches(kw):
    """Stands in for experiment.evaluation_batches on pydoc: 32 random sequences of ids per split (no files)."""
    def fake(name, image_size=None, *, calib_examples=5000, **_):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(kw["vocab_size"], (32, kw["block_size"] + 1), generator=g)
        split = [(ids[i:i + 16, :-1], ids[i:i + 16, 1:]) for i in range(0, 32, 16)]
        return {"test": split, "train": split}, split
    return fake


def test_demo_untie_lets_orthogonal_and_learned_align_the_tied_gpt(tmp_path, monkeypatch, capsys):
    kw = tied_gpt_endpoints(tmp_path / "cache")
    monkeypatch.setattr("onebasin.experiment.evaluation_batches", fake_text_batches(kw))
    demo = ["demo", "--model", "gpt", "--width", "16", "--depth", "1", "--epochs", "1", "--calib-examples", "32",
            "--cache-dir", tmp_path / "cache", "--no-progress"]
    code, _, err = run_cli([*demo, "--method", "orthogonal", "--out", tmp_path / "no"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "tied" in err and "untie" in err
    code, _, err = run_cli([*demo, "--method", "orthogonal", "--untie", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["alignment"]["untied"] == ["lm_head.weight"] and report["run"]["experiment"]["align_options"] == {"untie": True}
    assert all(e["cached"] for e in report["run"]["endpoints"])  # the endpoints above, not trained anew
    code, _, err = run_cli([*demo, "--method", "learned", "--untie", "--learned-steps", "3", "--learned-lr", "0.01",
                            "--learned-stream-lr", "0.002", "--learned-batch-size", "8", "--out", tmp_path / "l"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "l" / "report.json").read_text())["alignment"]
    assert record["untied"] == ["lm_head.weight"] and record["orthogonal"]  # the stream is mapped: the gain folded
    assert record["steps"] == 3 and len(record["loss"]) == 3 and record["lr"] == 0.01 and record["batch_size"] == 8
    assert record["stream_lr"] == 0.002
    assert record["examples"] == 32
    code, _, err = run_cli([*demo, "--method", "learned", "--untie", "--heads", "orthogonal", "--learned-steps", "2",
                            "--out", tmp_path / "h"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "h" / "report.json").read_text())["alignment"]
    assert record["heads"] == "orthogonal" and record["steps"] == 2
    code, _, err = run_cli([*demo, "--method", "learned", "--untie", "--heads", "linear", "--learned-steps", "2",
                            "--out", tmp_path / "hl"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "hl" / "report.json").read_text())["alignment"]
    assert record["heads"] == "linear" and record["steps"] == 2
    code, _, err = run_cli([*demo, "--method", "orthogonal", "--untie", "--heads", "orthogonal", "--out", tmp_path / "oh"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "oh" / "report.json").read_text())["alignment"]
    assert record["heads"] == "orthogonal" and len(record["head_maps"]) == 2  # one block: query/key and value/output


BAD = [
    (["--method", "learned", "--learned-steps", "0"], "--learned-steps"),
    (["--method", "learned", "--learned-steps", "2.5"], "--learned-steps"),
    (["--method", "learned", "--learned-epochs", "0"], "--learned-epochs"),
    (["--method", "learned", "--learned-epochs", "-1"], "--learned-epochs"),
    (["--method", "learned", "--learned-epochs", "nan"], "--learned-epochs"),
    (["--method", "learned", "--learned-epochs", "inf"], "--learned-epochs"),
    (["--method", "learned", "--learned-lr", "0"], "--learned-lr"),
    (["--method", "learned", "--learned-lr", "nan"], "--learned-lr"),
    (["--method", "learned", "--learned-lr", "-inf"], "--learned-lr"),
    (["--method", "learned", "--learned-stream-lr", "0"], "--learned-stream-lr"),
    (["--method", "learned", "--learned-stream-lr", "nan"], "--learned-stream-lr"),
    (["--method", "orthogonal", "--learned-stream-lr", "0.1"], "--learned-stream-lr"),
    (["--method", "learned", "--learned-batch-size", "0"], "--learned-batch-size"),
    (["--method", "learned", "--learned-init", "random"], "--learned-init"),
    (["--method", "learned", "--learned-epochs", "1", "--learned-steps", "3"], "--learned-steps"),
    (["--method", "activation", "--learned-steps", "3"], "--learned-steps"),
    (["--method", "orthogonal", "--learned-lr", "0.1"], "--learned-lr"),
    (["--learned-init", "weight"], "--learned-init"),  # the default method, activation
    (["--method", "weight", "--untie"], "--untie"),
    (["--method", "activation", "--heads", "orthogonal"], "--heads"),
    (["--method", "learned", "--heads", "rotate"], "--heads"),
    (["--method", "orthogonal", "--heads", "linear"], "--heads linear"),  # data-free head maps are orthogonal only
]


@pytest.mark.parametrize("command", ["merge", "barrier", "demo"])
@pytest.mark.parametrize("flags,flag", BAD)
def test_bad_alignment_options_are_one_line_naming_the_flag_and_write_nothing(tmp_path, monkeypatch, capsys, command, flags, flag):
    def reached(*args, **kwargs):
        raise AssertionError("the options were checked after loading data or training")

    monkeypatch.setattr("onebasin.experiment.evaluation_batches", reached)
    monkeypatch.setattr("onebasin.experiment.endpoint", reached)
    a, b = checkpoint(tmp_path / "a.safetensors"), checkpoint(tmp_path / "b.safetensors", seed=1)
    argv = {"merge": ["merge", a, b, "--out", tmp_path / "m.safetensors"], "barrier": ["barrier", a, b, "--out", tmp_path / "r"],
            "demo": ["demo", "--cache-dir", tmp_path / "cache", "--data-dir", tmp_path / "data", "--out", tmp_path / "r"]}[command]
    before = files(tmp_path)
    code, out, err = run_cli([*argv, *flags], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith(f"onebasin {command}: error: ") and flag in err
    assert files(tmp_path) == before


def test_alignment_options_are_refused_for_three_models(tmp_path, capsys):
    paths = [checkpoint(tmp_path / f"{i}.safetensors", seed=i) for i in range(3)]
    before = files(tmp_path)
    code, _, err = run_cli(["merge", *paths, "--method", "weight", "--learned-steps", "3", "--out", tmp_path / "m.safetensors"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--learned-steps applies to --method learned" in err
    assert files(tmp_path) == before


def test_the_cli_offers_every_start_of_learned_matching():
    from onebasin._cli_common import LEARNED_INITS
    from onebasin.align.learned import INITS

    assert LEARNED_INITS == list(INITS)


@pytest.mark.parametrize("method,options,match", [
    ("activation", {"untie": True}, r"method 'activation' takes no align_options \['untie'\]"),
    ("weight", {"steps": 3}, r"method 'weight' takes no align_options \['steps'\]"),
    ("learned", {"steps": 0}, r"learned matching: steps must be an integer >= 1"),
    ("learned", {"lr": float("nan")}, r"learned matching: lr must be a finite number > 0"),
    ("learned", {"stream_lr": -1}, r"learned matching: stream_lr must be a finite number > 0"),
    ("learned", {"lam": (0.7, 0.2)}, r"learned matching: lam must be a range"),
    ("learned", {"init": "random"}, r"learned matching: unknown init 'random'"),
    ("learned", {"max_examples": 10}, r"takes no align_options \['max_examples'\]"),  # compare sets it
    ("orthogonal", ["untie"], r"align_options must be a table"),
])
def test_an_experiment_refuses_bad_align_options_before_training(tmp_path, monkeypatch, method, options, match):
    from onebasin.errors import InvalidOptionError
    from onebasin.experiment import run_experiment

    def reached(*args, **kwargs):
        raise AssertionError("an endpoint was trained or loaded before the options were checked")

    monkeypatch.setattr("onebasin.experiment.endpoint", reached)
    with pytest.raises(InvalidOptionError, match=match):
        run_experiment(Experiment(method=method, align_options=options, out=str(tmp_path / "r"), cache_dir=str(tmp_path)))
    assert not (tmp_path / "r").exists()


def test_settings_key_of_an_experiment_without_align_options_is_the_one_before_they_existed():
    """Sweeps keep their finished cells: the default Experiment's key as main computed it before align_options."""
    from onebasin.experiment import settings_key

    assert settings_key(Experiment()) == "84664b5d4322"
    assert settings_key(Experiment(method="learned", align_options={"steps": 3})) != settings_key(Experiment(method="learned"))
