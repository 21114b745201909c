"""Hostile but realistic inputs to the N-model path and to `onebasin merge` (issue 23): the API raises an
OnebasinError naming the cause, the CLI exits 2 with exactly one line on stderr, and nothing is written
outside --out."""

import json
import math
import re

import pytest
import torch
import torch.nn as nn

import onebasin
from cli_helpers import checkpoint, files, run_cli, use_fake_data
from onebasin.checkpoint import load_checkpoint, save_checkpoint
from onebasin.errors import ArchitectureMismatchError, InvalidOptionError, InvalidWeightsError, OnebasinError
from onebasin.permute import permute_model, random_perms
from onebasin.spec import trace
from reference_models import mlp


def three():
    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        out.append(mlp(width=16).double().eval())
    return out


def data(n=3):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(16, 12, generator=gen, dtype=torch.float64) for _ in range(n)]


# --- API: weights --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights, shown", [
    ([1, math.inf, 1], "[1, inf, 1]"),
    ([1, math.nan, 1], "[1, nan, 1]"),
    (["a", 1, 1], "['a', 1, 1]"),
    ([1, -1, 1], "[1, -1, 1]"),
    ([0, 0, 0], "[0, 0, 0]"),
    ([1, 2], "[1, 2]"),
    ([True, 1, 1], "[True, 1, 1]"),
    (2.0, "2.0"),
], ids=["inf", "nan", "string", "negative", "all-zero", "too-few", "bool", "not-a-list"])
def test_bad_weights_are_refused_showing_what_was_given(weights, shown):
    with pytest.raises(InvalidOptionError, match="weights") as err:
        onebasin.merge_many(three(), weights=weights, data=data(), repair="none")
    assert shown in str(err.value)


def test_weights_as_a_tensor_or_numpy_numbers_are_accepted():
    ms, d = three(), data()
    a, ra = onebasin.merge_many(ms, weights=torch.tensor([1.0, 2.0, 1.0]), data=d, repair="none")
    assert ra.weights == [0.25, 0.5, 0.25]


# --- API: models and perms ------------------------------------------------------------------------------------


def test_a_state_dict_among_the_models_is_named():
    ms = three()
    with pytest.raises(InvalidOptionError, match=r"models\[2\] is a \w*Dict, not an nn.Module"):
        onebasin.merge_many(ms[:2] + [ms[2].state_dict()], data=data())


def test_nan_weights_in_the_third_model_are_named():
    ms = three()
    with torch.no_grad():
        ms[2][1].weight[0, 0] = float("nan")
    with pytest.raises(InvalidWeightsError, match="model 2"):
        onebasin.merge_many(ms, data=data())


def test_a_float32_third_model_is_named():
    ms = three()
    with pytest.raises(ArchitectureMismatchError, match="model 2"):
        onebasin.merge_many(ms[:2] + [ms[2].float()], data=data())


def test_models_from_a_generator_merge_like_a_list():
    ms, d = three(), data()
    got, _ = onebasin.merge_many((m for m in ms), data=d, repair="none")
    want, _ = onebasin.merge_many(ms, data=d, repair="none")
    assert all(torch.equal(v, want.state_dict()[k]) for k, v in got.state_dict().items())


def given_perms():
    ms, d = three(), data()
    return ms, d, trace(ms[0], d[0]), onebasin.merge_many(ms, data=d, repair="none")[1].perms


def test_perms_for_two_of_three_models_are_refused():
    ms, d, _, perms = given_perms()
    with pytest.raises(InvalidOptionError, match="perms: 2 given for 3 models"):
        onebasin.merge_many(ms, data=d, perms=perms[:2])


@pytest.mark.parametrize("bad, cause", [
    (lambda p: torch.zeros(len(p), dtype=torch.long), "not a permutation"),
    (lambda p: p[:-1], r"shape \(15,\)"),
    (lambda p: p.double(), "integers"),
    (lambda p: p.tolist(), "not a permutation|integers|tensor"),
], ids=["zeros", "one-short", "float", "list"])
def test_perms_that_are_not_permutations_are_refused(bad, cause):
    ms, d, spec, perms = given_perms()
    g = next(iter(perms[1]))
    perms[1] = {**perms[1], g: bad(perms[1][g])}
    with pytest.raises(InvalidOptionError, match=f"perms\\[1\\].*{re.escape(repr(g))}.*({cause})"):
        onebasin.merge_many(ms, data=d, perms=perms)


def test_perms_with_an_unknown_or_missing_group_are_refused():
    ms, d, spec, perms = given_perms()
    g = next(iter(perms[2]))
    with pytest.raises(InvalidOptionError, match="unknown group 'nope'"):
        onebasin.merge_many(ms, data=d, perms=[*perms[:2], {**perms[2], "nope": perms[2][g]}])
    missing = {k: v for k, v in perms[2].items() if k != g}
    with pytest.raises(InvalidOptionError, match=f"perms\\[2\\] has no permutation for group {re.escape(repr(g))}"):
        onebasin.merge_many(ms, data=d, perms=[*perms[:2], missing])


def test_permute_model_refuses_an_index_tensor_that_is_not_a_permutation():
    m, d = three()[0], data()
    spec = trace(m, d[0])
    g = next(iter(spec.groups))
    with pytest.raises(InvalidOptionError, match=f"{re.escape(repr(g))}.*not a permutation"):
        permute_model(m, spec, {g: torch.zeros(spec.groups[g].size, dtype=torch.long)})


def test_max_examples_below_one_is_refused():
    with pytest.raises(InvalidOptionError, match="max_examples"):
        onebasin.merge_many(three(), data=data(), max_examples=0)


class SpectralMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.utils.parametrizations.spectral_norm(nn.Linear(12, 16))
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_model_with_spectral_norm_merges_with_every_permuted_model_keeping_its_function():
    """Issue 23 item 5: merge_many checks that every aligned model keeps its function, as merge does (a spectral_norm
    layer merged to a network off by 42-510 %; since trace keeps such a layer in place, the check passes): here the
    permuted models are compared with their models by plain forwards on held-out inputs."""
    ms = []
    for seed in range(3):
        torch.manual_seed(seed)
        ms.append(SpectralMLP().double().eval())
    d = data()
    _, result = onebasin.merge_many(ms, data=d, repair="none")
    spec = trace(ms[0], d[0])
    x = torch.randn(32, 12, dtype=torch.float64)
    with torch.no_grad():
        for m, p in zip(ms, result.perms):
            assert torch.allclose(permute_model(m, spec, p)(x), m(x), rtol=0, atol=1e-12)


def test_merge_many_checks_the_function_of_given_perms():
    """A spec that misses an axis (a hand-written spec without fc2's input axis) breaks the permuted model: refused."""
    from onebasin.spec import from_groups

    ms, d = three(), data()
    spec = from_groups({"h0": [("1.weight", 0), ("1.bias", 0)]}, ms[0].state_dict())  # misses 3.weight's input axis
    perms = [{"h0": torch.arange(16)}, {"h0": torch.randperm(16, generator=torch.Generator().manual_seed(0))},
             {"h0": torch.arange(16)}]
    with pytest.raises(OnebasinError, match="model 1.*different function"):
        onebasin.merge_many(ms, data=d, perms=perms, spec=spec, repair="none")


# --- CLI ------------------------------------------------------------------------------------------------------


@pytest.fixture
def ckpts(tmp_path, monkeypatch):
    use_fake_data(monkeypatch)
    return [checkpoint(tmp_path / f"m{i}.safetensors", seed=i) for i in range(3)]


def refused(tmp_path, capsys, argv, *needles):
    """Run `onebasin merge ARGV`; require exit 2, one stderr line holding every needle, and no file changed."""
    before = files(tmp_path)
    code, out, err = run_cli(["merge", *argv], capsys)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("onebasin merge: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert files(tmp_path) == before
    return err


def test_cli_refuses_a_third_checkpoint_trained_on_other_data(tmp_path, capsys, ckpts):
    """Issue 23 item 2: the dataset of every checkpoint is checked, not only of the first two."""
    fashion = checkpoint(tmp_path / "f.safetensors", seed=5, dataset="fashionmnist")
    refused(tmp_path, capsys, [*ckpts[:2], fashion, "--out", tmp_path / "o.safetensors"], str(fashion), "fashionmnist",
            "--allow-different-data")


def test_cli_warns_once_per_other_dataset_with_allow_different_data(tmp_path, capsys, ckpts):
    fashion = checkpoint(tmp_path / "f.safetensors", seed=5, dataset="fashionmnist")
    out = tmp_path / "o.safetensors"
    code, _, err = run_cli(["merge", *ckpts[:2], fashion, "--out", out, "--allow-different-data", "--no-progress"], capsys)
    assert code == 0 and err.count("warning") == 1 and str(fashion) in err and "fashionmnist" in err


@pytest.mark.parametrize("weights, shown", [(["1", "inf", "1"], "1 inf 1"), (["1", "-2", "1"], "1 -2 1"),
                                            (["0", "0", "0"], "0 0 0"), (["1", "2"], "1 2"), (["1", "x", "1"], "1 x 1")],
                         ids=["inf", "negative", "zeros", "count", "text"])
def test_cli_refuses_bad_weights_showing_what_was_typed(tmp_path, capsys, ckpts, weights, shown):
    refused(tmp_path, capsys, [*ckpts, "--out", tmp_path / "o.safetensors", "--weights", *weights], f"--weights {shown}")


def test_cli_two_models_with_weights_honours_them(tmp_path, capsys, ckpts):
    """Issue 23 item 8: --weights 1 2 with two models is alpha 2/3 (it was ignored: alpha 0.5)."""
    out = tmp_path / "w.safetensors"
    code, _, err = run_cli(["merge", *ckpts[:2], "--out", out, "--weights", "1", "2", "--no-progress"], capsys)
    assert code == 0, err
    _, meta = load_checkpoint(out)
    assert meta["merge"]["alpha"] == pytest.approx(2 / 3)
    code, _, _ = run_cli(["merge", *ckpts[:2], "--out", tmp_path / "a.safetensors", "--alpha", str(2 / 3), "--no-progress"], capsys)
    tensors = [load_checkpoint(p)[0] for p in (out, tmp_path / "a.safetensors")]
    assert code == 0 and all(torch.equal(v, tensors[1][k]) for k, v in tensors[0].items())


def test_cli_refuses_alpha_and_weights_together(tmp_path, capsys, ckpts):
    refused(tmp_path, capsys, [*ckpts[:2], "--out", tmp_path / "o.safetensors", "--alpha", "0.3", "--weights", "1", "2"],
            "--alpha", "--weights")


def test_cli_sites_reach_merge_many(tmp_path, capsys, ckpts, monkeypatch):
    """Issue 23 item 8: --sites is passed on with three models (it was ignored)."""
    import onebasin.pipeline

    seen = {}
    real = onebasin.pipeline.merge_many

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(onebasin.pipeline, "merge_many", spy)
    code, _, err = run_cli(["merge", *ckpts, "--out", tmp_path / "o.safetensors", "--sites", "layer", "--no-progress"], capsys)
    assert code == 0, err
    assert tuple(seen["sites"]) == ("layer",)


def test_cli_prints_the_path_it_wrote(tmp_path, capsys, ckpts):
    out = tmp_path / "r" / "x.pt"
    out.parent.mkdir()
    code, printed, err = run_cli(["merge", *ckpts, "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    written = json.loads(printed)["out"]
    assert written == str(tmp_path / "r" / "x.pt.safetensors") and (tmp_path / "r" / "x.pt.safetensors").is_file()


def test_cli_refuses_model_opts_for_onebasin_checkpoints(tmp_path, capsys, ckpts):
    refused(tmp_path, capsys, [*ckpts, "--out", tmp_path / "o.safetensors", "--model-opts", "width=32"], "--model-opts")


@pytest.mark.parametrize("which", [0, 2])
def test_cli_never_overwrites_an_input(tmp_path, capsys, ckpts, which):
    before = ckpts[which].read_bytes()
    refused(tmp_path, capsys, [*ckpts, "--out", ckpts[which], "--force"], "input")
    assert ckpts[which].read_bytes() == before


def test_cli_names_a_missing_third_checkpoint(tmp_path, capsys, ckpts):
    refused(tmp_path, capsys, [*ckpts[:2], tmp_path / "nope.safetensors", "--out", tmp_path / "o.safetensors"], "nope.safetensors")


def test_cli_names_a_third_checkpoint_of_another_width(tmp_path, capsys, ckpts):
    narrow = checkpoint(tmp_path / "narrow.safetensors", width=8, seed=4)
    refused(tmp_path, capsys, [*ckpts[:2], narrow, "--out", tmp_path / "o.safetensors"], str(narrow))


def test_cli_names_an_unknown_combine_method(tmp_path, capsys, ckpts):
    refused(tmp_path, capsys, [*ckpts, "--out", tmp_path / "o.safetensors", "--combine", "average"], "average", "universe")


def test_cli_refuses_a_sidecar_as_the_third_model(tmp_path, capsys, ckpts):
    refused(tmp_path, capsys, [*ckpts[:2], ckpts[2].with_suffix(".json"), "--out", tmp_path / "o.safetensors"], "sidecar")


def test_cli_refuses_alpha_with_three_models(tmp_path, capsys, ckpts):
    refused(tmp_path, capsys, [*ckpts, "--out", tmp_path / "o.safetensors", "--alpha", "0.3"], "--weights")


def test_cli_refuses_a_two_model_method_with_three_models(tmp_path, capsys, ckpts):
    refused(tmp_path, capsys, [*ckpts, "--out", tmp_path / "o.safetensors", "--method", "annealing"], "activation or weight")


def test_cli_refuses_an_unknown_site_kind(tmp_path, capsys, ckpts):
    refused(tmp_path, capsys, [*ckpts, "--out", tmp_path / "o.safetensors", "--sites", "blok"], "blok")


def test_cli_refuses_a_plain_state_dict_without_model(tmp_path, capsys, ckpts):
    plain = tmp_path / "plain.pt"
    torch.save(load_checkpoint(ckpts[2])[0], plain)
    refused(tmp_path, capsys, [*ckpts[:2], plain, "--out", tmp_path / "o.safetensors"], "plain.pt", "--model")


def test_progress_bars_write_one_line_each_when_stderr_is_not_a_terminal(capsys):
    """A log (stderr not a terminal) gets one line per bar, not a carriage-return redraw per step (issue 23: the
    demo's log was mostly '\\r' lines). compare() draws one bar over its five steps."""
    ms, d = three()[:2], data()
    loaders = {"test": [(x, torch.zeros(len(x), dtype=torch.long)) for x in d]}
    onebasin.compare(*ms, loaders, d, alphas=[0, 0.5, 1], progress=True)
    err = capsys.readouterr().err
    assert err.count("\r") == 1 and err.count("\n") == 1 and "compare" in err and "5/5" in err, repr(err)


def test_cli_merge_of_three_writes_only_out_and_its_sidecar(tmp_path, capsys, ckpts):
    before = set(files(tmp_path))
    code, _, err = run_cli(["merge", *ckpts, "--out", tmp_path / "m.safetensors", "--no-progress"], capsys)
    assert code == 0, err
    assert set(files(tmp_path)) - before == {"m.safetensors", "m.json"} and before <= set(files(tmp_path))


def test_cli_names_a_folder_given_as_the_third_checkpoint(tmp_path, capsys, ckpts):
    folder = tmp_path / "hf_model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    refused(tmp_path, capsys, [*ckpts[:2], folder, "--out", tmp_path / "o.safetensors"], "hf_model")


def test_two_model_merge_names_a_state_dict_and_a_bad_max_examples():
    """The same validation for merge: a state_dict as model B was an AttributeError, max_examples=0 a KeyError 'xx'."""
    a, b = three()[:2]
    with pytest.raises(InvalidOptionError, match="model_b is a \\w*Dict, not an nn.Module"):
        onebasin.merge(a, b.state_dict(), data=data())
    with pytest.raises(InvalidOptionError, match="max_examples must be an integer >= 1"):
        onebasin.merge(a, b, data=data(), max_examples=0)


@pytest.mark.parametrize("option", [["--combine", "mergemany"], ["--calib-text", "corpus.txt"], ["--allow-onebasin-checkpoint"]],
                         ids=["combine-with-two", "calib-text", "allow-onebasin-checkpoint"])
def test_cli_refuses_options_two_checkpoints_would_ignore(tmp_path, capsys, ckpts, option):
    """--combine with two models and the Hugging Face options with checkpoints were ignored without a word."""
    refused(tmp_path, capsys, [*ckpts[:2], "--out", tmp_path / "o.safetensors", *option], option[0])
