"""Hostile input (issue 12): every bad input ends in one clear error and leaves nothing behind.

API cases: an OnebasinError subclass whose message names the cause. CLI cases: exit code 2, exactly one
line on stderr that names the cause, and no output (or temporary) file left behind. Every case is tiny.
"""

import json
import math

import pytest
import torch
import torch.nn as nn

import onebasin
from onebasin.checks import check_example_input
from onebasin.errors import (ArchitectureMismatchError, EmptyDataError, InputMismatchError, InvalidOptionError,
                             InvalidWeightsError)
from reference_models import mlp


def pair(seed=0, **kw):
    torch.manual_seed(seed)
    return mlp(**kw).eval(), mlp(**kw).eval()


def batches(n=2, rows=16, features=12, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(rows, features, generator=g, dtype=dtype), torch.randint(5, (rows,), generator=g))
            for _ in range(n)]


# --- the Python API: merge, compare, check_example_input ------------------------------------------------


def test_merge_with_no_batch_names_the_empty_data():
    """Issue 12: merge(data=[]) raised a bare StopIteration."""
    with pytest.raises(EmptyDataError, match="holds no batch"):
        onebasin.merge(*pair(), data=[])


def test_merge_without_data_says_which_step_needs_it():
    with pytest.raises(EmptyDataError, match="needs data"):
        onebasin.merge(*pair(), method="activation", data=None)


def test_zero_row_batch_is_named_not_blamed_on_nan_weights():
    """Issue 12: a zero-row batch was reported as NaN/inf weights or activations."""
    with pytest.raises(EmptyDataError, match="0 rows") as err:
        onebasin.merge(*pair(), data=[(torch.zeros(0, 12), torch.zeros(0, dtype=torch.long))])
    assert "NaN" not in str(err.value)


def test_wrong_input_shape_names_model_input_and_torch_error(capsys):
    """Issue 12: a model whose input shape did not fit the data gave 78 lines of ShapeProp tracebacks."""
    with pytest.raises(InputMismatchError) as err:
        onebasin.merge(*pair(), data=batches(features=13))
    message = str(err.value)
    assert "Sequential" in message and "float32 (16, 13)" in message and "mat1 and mat2 shapes cannot be multiplied" in message
    assert "\n" not in message and capsys.readouterr().err == ""  # nothing printed, even though the error was caught


def test_float64_data_for_a_float32_model_is_a_clear_error(capsys):
    with pytest.raises(InputMismatchError, match="float64.*float32") as err:
        onebasin.merge(*pair(), data=batches(dtype=torch.float64))
    assert "Sequential" in str(err.value) and capsys.readouterr().err == ""


def test_models_of_different_dtypes_are_a_clear_error():
    a, b = pair()
    with pytest.raises(ArchitectureMismatchError, match="different dtypes.*float32 in A, float64 in B"):
        onebasin.merge(a, b.double(), data=batches())


def test_different_architectures_list_the_difference():
    a, _ = pair()
    _, b = pair(width=8)
    with pytest.raises(ArchitectureMismatchError, match=r"'1.weight': shape \(16, 12\) in A vs \(8, 12\) in B"):
        onebasin.merge(a, b, data=batches())


def test_nan_weights_name_the_tensor():
    a, b = pair()
    with torch.no_grad():
        b[3].weight[0, 0] = math.nan
    with pytest.raises(InvalidWeightsError, match="model B has non-finite .* 3.weight"):
        onebasin.merge(a, b, data=batches())


@pytest.mark.parametrize("option,cause", [
    ({"method": "nosuch"}, "unknown alignment method 'nosuch'"),
    ({"repair": "sometimes"}, "unknown repair 'sometimes'"),
    ({"alpha": 1.5}, "alpha must be a number in [0, 1]"),
    ({"alpha": math.nan}, "alpha must be a number in [0, 1]"),
    ({"alpha": "0.5"}, "alpha must be a number in [0, 1]"),
])
def test_bad_merge_options_are_named(option, cause):
    with pytest.raises(InvalidOptionError) as err:
        onebasin.merge(*pair(), data=batches(), **option)
    assert cause in str(err.value)


def test_compare_with_an_empty_test_split_names_the_split():
    with pytest.raises(EmptyDataError, match=r"loaders\['test'\] holds no batch"):
        onebasin.compare(*pair(), {"test": []}, batches(), progress=False)


def test_compare_with_bad_alphas_is_a_clear_error():
    with pytest.raises(InvalidOptionError, match="alpha must be a number in"):
        onebasin.compare(*pair(), {"test": batches()}, batches(), alphas=[0, 0.5, 2], progress=False)


def test_input_on_another_device_is_named():
    a, _ = pair()
    with pytest.raises(InputMismatchError, match="the input is on meta, the model on cpu"):
        check_example_input(a, torch.empty(4, 12, device="meta"))


class KeywordNet(nn.Module):
    """A model called with keyword inputs, like a Hugging Face model: model(input_ids=..., attention_mask=...)."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(50, 8), nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids) * attention_mask[..., None]
        return self.head(h.mean(1))


def test_keyword_and_tuple_inputs_are_checked():
    net, ids = KeywordNet(), torch.randint(50, (2, 7))
    check_example_input(net, {"input_ids": ids, "attention_mask": torch.ones(2, 7)})  # fits: no error
    with pytest.raises(InputMismatchError, match=r"KeywordNet .*\{input_ids: int64 \(2, 7\)\}.*attention_mask"):
        check_example_input(net, {"input_ids": ids})
    with pytest.raises(InputMismatchError, match=r"\(int64 \(2, 7\), float64 \(2, 7\)\).*float64"):
        check_example_input(net, (ids, torch.ones(2, 7, dtype=torch.float64)))


def test_the_input_check_leaves_training_flags_and_statistics_alone():
    net = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    net[3].eval()  # a submodule in its own mode stays there
    before = {k: v.clone() for k, v in net.state_dict().items()}
    check_example_input(net, torch.randn(4, 12))
    assert [m.training for m in net] == [True, True, True, False]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BatchNorm statistics untouched
    with pytest.raises(InputMismatchError):
        check_example_input(net, torch.randn(4, 13))
    assert [m.training for m in net] == [True, True, True, False]


def test_models_on_the_meta_device_are_one_clear_error():
    """Models built under torch.device("meta") hold shapes without values: merge raised a raw RuntimeError
    ("Tensor.item() cannot be called on meta tensors"; test failed before the fix)."""
    with torch.device("meta"):
        a, b = mlp(), mlp()
    for merge in (lambda: onebasin.merge(a, b, data=batches()), lambda: onebasin.merge_many([a, b], data=batches())):
        with pytest.raises(InvalidWeightsError, match=r"model A is on the meta device .* 1\.weight|model 0 is on the meta device") as err:
            merge()
        assert "\n" not in str(err.value)


# --- checkpoints -----------------------------------------------------------------------------------------


def saved(path, kw=None, **meta):
    """An onebasin checkpoint of a reference_models.mlp, with metadata `meta` on top of the usual."""
    kw = kw or {"width": 16, "depth": 3}
    torch.manual_seed(0)
    model = mlp(**kw)
    return onebasin.save_checkpoint(path, model.state_dict(), {"model": "reference_models:mlp", "model_kwargs": kw, **meta})


def test_truncated_checkpoint_is_reported_as_truncated(tmp_path):
    """Issue 12: a truncated onebasin checkpoint was reported as "not an onebasin checkpoint, say --model"."""
    path = saved(tmp_path / "a.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    for load in (lambda: onebasin.load_any(path), lambda: onebasin.load_any(path, "reference_models:mlp")):
        with pytest.raises(onebasin.CheckpointError, match="truncated or corrupt onebasin checkpoint"):
            load()


@pytest.mark.parametrize("case,cause", [("missing", "no checkpoint at"), ("directory", "is a directory"),
                                        ("empty", "is empty"), ("text", "not a readable checkpoint")])
def test_unusable_checkpoint_files_are_named(tmp_path, case, cause):
    path = tmp_path / "a.safetensors"
    {"missing": lambda: None, "directory": path.mkdir, "empty": path.touch,
     "text": lambda: path.write_text("weights")}[case]()
    with pytest.raises(onebasin.CheckpointError, match=cause):
        onebasin.load_any(path, "reference_models:mlp")


def test_checkpoint_metadata_that_does_not_fit_the_factory_is_a_checkpoint_error(tmp_path):
    """Issue 12: metadata the model factory does not take raised a raw TypeError."""
    path = saved(tmp_path / "a", model="mlp")
    tensors, meta = onebasin.load_checkpoint(path)
    onebasin.save_checkpoint(path, tensors, {**{k: v for k, v in meta.items() if k != "sha256"},
                                             "model_kwargs": {"width": 16, "depht": 3}})
    with pytest.raises(onebasin.CheckpointError, match="unexpected keyword argument 'depht'"):
        onebasin.load_model(path)


def test_unknown_model_in_metadata_is_named(tmp_path):
    with pytest.raises(onebasin.CheckpointError, match="unknown model 'nosuchnet'"):
        onebasin.load_model(saved(tmp_path / "a", model="nosuchnet"))


def test_a_checkpoint_cannot_make_onebasin_import_and_call_a_factory_it_names(tmp_path):
    path = saved(tmp_path / "a", model="os:system", model_kwargs={"command": f"touch {tmp_path / 'ran'}"})
    with pytest.raises(onebasin.CheckpointError, match="name it to allow importing and calling it"):
        onebasin.load_model(path)
    assert not (tmp_path / "ran").exists()


def test_bad_model_options_for_a_state_dict_file_are_named(tmp_path):
    """Issue 12: bad --model-opts raised a raw TypeError."""
    torch.save(mlp().state_dict(), tmp_path / "a.pt")
    with pytest.raises(InvalidOptionError, match="unexpected keyword argument 'hidden'"):
        onebasin.load_any(tmp_path / "a.pt", "reference_models:mlp", {"hidden": 3})


# --- sweep configs (API) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text,cause", [
    (None, "no sweep config at"),
    ("[base\nmodel = 'mlp'", "is not valid TOML"),
    ("outdir = 'x'", "unknown top-level keys ['outdir']"),
    ("[base]\nwidth = 8", "unknown [base] keys ['width']"),
    ("[grid]\nwidth = []", "every [grid] entry must be a non-empty list"),
    ("[grid]\nmodel_kwargs = [{ width = 8 }]", "cannot vary ['model_kwargs']"),
])
def test_load_config_errors_name_the_cause(tmp_path, text, cause):
    from onebasin.sweep import SweepConfigError, load_config

    config = tmp_path / "sweep.toml"
    if text is not None:
        config.write_text(text)
    with pytest.raises(SweepConfigError) as err:
        load_config(config)
    assert cause in str(err.value)


# --- the command line: exit 2, one line, nothing written -------------------------------------------------

from cli_helpers import checkpoint, files, run_cli, use_fake_data  # noqa: E402


def assert_refused(argv, capsys, root, cause):
    """`onebasin ARGV` exits 2 with one stderr line naming `cause` and leaves `root` as it was."""
    before = files(root)
    code, stdout, err = run_cli(argv, capsys)
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.startswith("onebasin"), err
    assert cause in err, err
    assert files(root) == before and stdout == ""


@pytest.fixture
def ab(tmp_path, monkeypatch):
    """Two onebasin checkpoints of MNIST MLPs and synthetic data for merge/barrier."""
    use_fake_data(monkeypatch)
    return checkpoint(tmp_path / "a.safetensors"), checkpoint(tmp_path / "b.safetensors", seed=1)


def test_cli_out_is_a_directory_even_with_force(tmp_path, ab, capsys):
    (tmp_path / "m.safetensors").mkdir()
    assert_refused(["merge", *ab, "--out", tmp_path / "m.safetensors", "--force"], capsys, tmp_path, "is a directory")


def test_cli_does_not_overwrite_the_sidecar_beside_out(tmp_path, ab, capsys):
    """Issue 12: an existing X.json beside --out was overwritten without --force."""
    (tmp_path / "m.json").write_text('{"mine": true}')
    assert_refused(["merge", *ab, "--out", tmp_path / "m.safetensors"], capsys, tmp_path, "m.json exists; pass --force")


def test_cli_train_does_not_overwrite_the_sidecar_beside_out(tmp_path, capsys):
    (tmp_path / "a.json").write_text("{}")
    assert_refused(["train", "--model", "mlp", "--dataset", "mnist", "--out", tmp_path / "a.safetensors"], capsys,
                   tmp_path, "a.json exists; pass --force")


def test_cli_report_folder_that_is_a_file(tmp_path, ab, capsys):
    (tmp_path / "report").write_text("")
    assert_refused(["barrier", *ab, "--out", tmp_path / "report"], capsys, tmp_path, "is a file")


def test_cli_bad_model_opts_name_the_option(tmp_path, capsys):
    """Issue 12: a --model-opts key the factory does not take gave a TypeError traceback."""
    torch.save(mlp().state_dict(), tmp_path / "a.pt")
    assert_refused(["merge", tmp_path / "a.pt", tmp_path / "a.pt", "--model", "reference_models:mlp",
                    "--model-opts", "hidden=3", "--data", "mnist", "--out", tmp_path / "m.safetensors"], capsys,
                   tmp_path, "unexpected keyword argument 'hidden'")


def test_cli_model_opts_without_equals(tmp_path, capsys):
    torch.save(mlp().state_dict(), tmp_path / "a.pt")
    assert_refused(["merge", tmp_path / "a.pt", tmp_path / "a.pt", "--model", "reference_models:mlp",
                    "--model-opts", "width", "--out", tmp_path / "m.safetensors"], capsys, tmp_path, "KEY=VALUE")


def test_cli_checkpoint_metadata_that_does_not_fit_the_factory(tmp_path, ab, capsys):
    """Issue 12: checkpoint metadata the factory does not take gave a TypeError traceback."""
    tensors, meta = onebasin.load_checkpoint(ab[0])
    onebasin.save_checkpoint(ab[0], tensors, {**meta, "model_kwargs": {**meta["model_kwargs"], "widht": 3}})
    assert_refused(["merge", *ab, "--out", tmp_path / "m.safetensors"], capsys, tmp_path,
                   "unexpected keyword argument 'widht'")


def test_cli_edited_metadata(tmp_path, ab, capsys):
    from safetensors.torch import save_file

    tensors, meta = onebasin.load_checkpoint(ab[1])
    save_file(tensors, str(ab[1]), metadata={"onebasin": json.dumps({**meta, "dataset": "mnist-edited"})})
    assert_refused(["merge", *ab, "--out", tmp_path / "m.safetensors"], capsys, tmp_path, "corrupt or was edited")


@pytest.mark.parametrize("case,cause", [("truncated", "truncated or corrupt onebasin checkpoint"),
                                        ("empty", "is empty"), ("directory", "is a directory"),
                                        ("missing", "no checkpoint at")])
def test_cli_unusable_checkpoint(tmp_path, ab, capsys, case, cause):
    bad = tmp_path / "bad.safetensors"
    if case == "truncated":
        bad.write_bytes(ab[1].read_bytes()[:-64])
    elif case == "empty":
        bad.touch()
    elif case == "directory":
        bad.mkdir()
    assert_refused(["merge", ab[0], bad, "--out", tmp_path / "m.safetensors"], capsys, tmp_path, cause)


def test_cli_nan_weights(tmp_path, ab, capsys):
    tensors, meta = onebasin.load_checkpoint(ab[1])
    tensors["layers.0.weight"][0, 0] = math.nan
    onebasin.save_checkpoint(ab[1], tensors, {k: v for k, v in meta.items() if k != "sha256"})
    assert_refused(["merge", *ab, "--out", tmp_path / "m.safetensors"], capsys, tmp_path, "non-finite (NaN/inf)")


def test_cli_model_that_does_not_fit_the_data(tmp_path, monkeypatch, capsys):
    """Issue 12: a model whose input shape does not match the data gave 78 lines of ShapeProp tracebacks."""
    use_fake_data(monkeypatch)
    torch.save(mlp(in_features=12).state_dict(), tmp_path / "a.pt")
    assert_refused(["merge", tmp_path / "a.pt", tmp_path / "a.pt", "--model", "reference_models:mlp", "--data", "mnist",
                    "--out", tmp_path / "m.safetensors"], capsys, tmp_path, "mat1 and mat2 shapes cannot be multiplied")


def test_cli_factory_named_by_a_checkpoint_needs_model(tmp_path, ab, capsys):
    tensors, meta = onebasin.load_checkpoint(ab[0])
    onebasin.save_checkpoint(ab[0], tensors, {**meta, "model": "reference_models:mlp"})
    assert_refused(["merge", *ab, "--out", tmp_path / "m.safetensors"], capsys, tmp_path,
                   "--model reference_models:mlp")


@pytest.mark.parametrize("extra,cause", [
    (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--alpha", "half"], "invalid float value: 'half'"),
    (["--method", "nosuch"], "invalid choice: 'nosuch'"),
    (["--data", "imagenet"], "unknown dataset 'imagenet'"),
    (["--calib-examples", "0"], "--calib-examples must be >= 1"),
    (["--calib-examples", "many"], "invalid int value: 'many'"),
    (["--model", "nosuchnet"], "does not match the requested model"),
    (["--verbose"], "unrecognized arguments: --verbose"),
])
def test_cli_bad_merge_options(tmp_path, ab, capsys, extra, cause):
    assert_refused(["merge", *ab, "--out", tmp_path / "m.safetensors", *extra], capsys, tmp_path, cause)


@pytest.mark.parametrize("extra,cause", [(["--alphas", "1"], "--alphas is a count and must be >= 2"),
                                         (["--alphas", "0.5"], "invalid int value: '0.5'")])
def test_cli_bad_barrier_alphas(tmp_path, ab, capsys, extra, cause):
    assert_refused(["barrier", *ab, "--out", tmp_path / "r", *extra], capsys, tmp_path, cause)


@pytest.mark.parametrize("extra,cause", [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--model", "nosuchnet"], "unknown model 'nosuchnet'"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--width", "wide"], "invalid float value: 'wide'"),
    (["--depth", "3", "--model", "resnet20"], "has no option --depth"),
])
def test_cli_bad_train_options(tmp_path, capsys, extra, cause):
    argv = ["train", "--model", "mlp", "--dataset", "mnist", "--out", tmp_path / "a.safetensors", "--no-download"]
    assert_refused(argv + extra, capsys, tmp_path, cause)


def test_cli_train_out_is_a_directory(tmp_path, capsys):
    (tmp_path / "a.safetensors").mkdir()
    assert_refused(["train", "--model", "mlp", "--dataset", "mnist", "--out", tmp_path / "a.safetensors", "--force"],
                   capsys, tmp_path, "is a directory")


@pytest.mark.parametrize("extra,cause", [(["--epochs", "0"], "epochs must be an integer >= 1"),
                                         (["--repair", "reset_bn"], "needs BatchNorm"),
                                         (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
                                         (["--width", "0"], "has an empty layer")])
def test_cli_bad_demo_settings_fail_before_training(tmp_path, capsys, extra, cause):
    assert_refused(["demo", "--out", tmp_path / "r", "--cache-dir", tmp_path / "cache", "--data-dir", tmp_path / "d",
                    "--no-progress", *extra], capsys, tmp_path, cause)


def test_cli_sweep_config_errors(tmp_path, capsys):
    assert_refused(["sweep", tmp_path / "none.toml"], capsys, tmp_path, "no sweep config at")
    (tmp_path / "bad.toml").write_text(f'out = "{tmp_path / "sweep"}"\n[grid]\nseeds = [[0]]\nwidth = [8]\n')
    assert_refused(["sweep", tmp_path / "bad.toml"], capsys, tmp_path, "seeds must be two integers")


@pytest.mark.parametrize("command", ["merge", "barrier", "train", "sweep"])
def test_cli_output_inside_a_file_is_refused_before_any_work(tmp_path, ab, capsys, command):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "out"
    config = tmp_path / "sweep.toml"
    config.write_text(f'out = "{out}"\n[base]\nmodel = "mlp"\n')
    argv = {"merge": ["merge", *ab, "--out", out], "barrier": ["barrier", *ab, "--out", out],
            "train": ["train", "--model", "mlp", "--dataset", "mnist", "--out", out], "sweep": ["sweep", config]}[command]
    assert_refused(argv, capsys, tmp_path, "afile is a file, not a folder")


def test_cli_sidecar_given_instead_of_the_weights(tmp_path, ab, capsys):
    assert_refused(["merge", tmp_path / "a.json", ab[1], "--out", tmp_path / "m.safetensors"], capsys, tmp_path,
                   "is a checkpoint's JSON sidecar: pass its weights file")


def test_cli_without_a_command(tmp_path, capsys):
    assert_refused([], capsys, tmp_path, "required: command")


def test_a_failed_checkpoint_write_is_a_checkpoint_error_and_leaves_nothing(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def fail(tensors, filename, metadata=None):
        open(filename, "wb").write(b"part")
        raise SafetensorError("Error while serializing: I/O error")

    monkeypatch.setattr("onebasin.checkpoint.save_file", fail)
    with pytest.raises(onebasin.CheckpointError, match="cannot write .*m.safetensors: .*I/O error"):
        onebasin.save_checkpoint(tmp_path / "m.safetensors", mlp().state_dict(), {})
    assert list(tmp_path.iterdir()) == []
