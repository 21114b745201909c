"""Hostile input (issue 12): every bad input ends in one clear error and leaves nothing behind.

API cases: an OnebasinError subclass whose message names the cause. CLI cases: exit code 2, exactly one
line on stderr that names the cause, and no output (or temporary) file left behind. Every case is tiny.
"""

import math

import pytest
import torch
import torch.nn as nn

import onebasin
from onebasin.checks import check_example_input
from onebasin.errors import (ArchitectureMismatchError, EmptyDataError, InputMismatchError, InvalidOptionError,
                             InvalidWeightsError, OnebasinError)
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


def test_every_api_error_is_caught_as_an_onebasin_error():
    for data in ([], batches(features=13), batches(dtype=torch.float64)):
        with pytest.raises(OnebasinError):
            onebasin.merge(*pair(), data=data)


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
