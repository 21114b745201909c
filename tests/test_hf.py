"""Hugging Face checkpoints as users keep them: save_pretrained folders of small random-init models merge
into a folder that from_pretrained loads as it is. The oracle: a randomly permuted copy of A computes what A
computes, so merging A with it must give A's outputs back (from the reloaded folder, compared with A's own)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_models as H  # noqa: E402
from cli_helpers import run_cli, use_fake_data  # noqa: E402

import onebasin  # noqa: E402
from onebasin.errors import OutputError  # noqa: E402
from onebasin.hf import merge_pretrained  # noqa: E402


def close(y, ref, rtol=2e-4):
    return (y - ref).abs().max().item() <= rtol * ref.abs().max().item()


def pair(root, kind, **cfg):
    """Folders a (random init) and p (a permuted copy of a): the same function, other weights."""
    a = H.build(kind, **cfg)
    H.save(a, root / "a"), H.save(H.permuted_copy(a, kind), root / "p")
    return a


def merge_cli(root, capsys, *args, out="m", text=True):
    calib = ["--calib-text", H.corpus(root / "corpus.txt")] if text else ["--data", "mnist"]
    return run_cli(["merge", *args, *calib, "--calib-examples", 32, "--seq-len", 16, "--device", "cpu", "--no-progress",
                    "--out", root / out], capsys)


def test_merging_bert_with_its_permuted_copy_gives_bert_back_through_from_pretrained(tmp_path, capsys):
    a = pair(tmp_path, "bert")
    sd_a, sd_p = a.state_dict(), transformers.AutoModel.from_pretrained(tmp_path / "p").state_dict()
    assert sum(not torch.equal(sd_a[k], sd_p[k]) for k in sd_a) > 10  # the copy's weights really differ
    code, out, err = merge_cli(tmp_path, capsys, tmp_path / "a", tmp_path / "p")
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["fused"] and report["format"] == "save_pretrained"
    merged = transformers.AutoModel.from_pretrained(tmp_path / "m").eval()
    assert type(merged) is type(a)
    assert close(H.outputs(merged, "bert"), H.outputs(a, "bert"))
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "m")("abc")["input_ids"]
    assert json.loads((tmp_path / "m" / "onebasin.json").read_text())["merged_from"] == [str(tmp_path / "a"), str(tmp_path / "p")]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_lms_saved_with_use_cache_merge_and_keep_their_config(tmp_path, capsys, kind):
    """GPT2LMHeadModel / LlamaForCausalLM (GQA) as saved (use_cache=True): was "Found DynamicCache in output".
    Llama's Linear layers have no bias: REPAIR folds into zero biases added by its own config flags (was an
    error advising --sites layer, the default)."""
    a = pair(tmp_path, kind)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["use_cache"] is True
    code, out, err = merge_cli(tmp_path, capsys, tmp_path / "a", tmp_path / "p")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["format"] == "save_pretrained", err
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["use_cache"] is True
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(merged) is type(a) and close(H.outputs(merged, kind), H.outputs(a, kind))
    if kind == "llama":
        assert config["attention_bias"] is True and config["mlp_bias"] is True
        assert merged.model.layers[0].self_attn.q_proj.bias.abs().max() > 0  # REPAIR's shift lives there


def test_llama_fallback_checkpoint_reloads_with_load_model(tmp_path, capsys):
    """Corrections after residual additions cannot fold: the onebasin checkpoint (was: "no 'model' in its
    metadata" from load_model) reloads and computes A's function."""
    a = pair(tmp_path, "llama")
    code, _, err = merge_cli(tmp_path, capsys, tmp_path / "a", tmp_path / "p", "--sites", "layer,block")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--allow-onebasin-checkpoint" in err
    assert not (tmp_path / "m").exists()
    code, out, err = merge_cli(tmp_path, capsys, tmp_path / "a", tmp_path / "p", "--sites", "layer,block",
                               "--allow-onebasin-checkpoint")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["format"] == "onebasin", err
    model, meta = onebasin.load_model(tmp_path / "m" / "onebasin.safetensors")
    assert close(H.outputs(model, "llama"), H.outputs(a, "llama"))


def test_bias_free_model_without_a_bias_flag_names_the_options_that_work(tmp_path, capsys):
    pair(tmp_path, "mistral")
    code, _, err = merge_cli(tmp_path, capsys, tmp_path / "a", tmp_path / "p")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "without a bias" in err and "--repair none" in err and "--allow-onebasin-checkpoint" in err
    assert "--sites layer" not in err  # layer is the default already: no advice that cannot help
    code, _, err = merge_cli(tmp_path, capsys, tmp_path / "a", tmp_path / "p", "--repair", "none")
    assert code == 0, err


def test_three_folders_go_through_merge_many_with_their_weights(tmp_path, capsys, monkeypatch):
    """Weights 0, 0, 1: the merge is the third folder's model (aligned to the others: the same function)."""
    use_fake_data(monkeypatch)
    a = pair(tmp_path, "resnet")
    c = H.build("resnet", seed=7)
    H.save(c, tmp_path / "c")
    code, _, err = merge_cli(tmp_path, capsys, tmp_path / "a", tmp_path / "p", tmp_path / "c", "--weights", 0, 0, 1,
                             "--repair", "none", text=False)
    assert code == 0, err
    merged = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "m").eval()
    assert close(H.outputs(merged, "resnet"), H.outputs(c, "resnet"))
    assert not close(H.outputs(merged, "resnet"), H.outputs(a, "resnet"), rtol=1e-2)
    H.save(H.permuted_copy(a, "resnet", seed=2), tmp_path / "p2")
    code, out, err = merge_cli(tmp_path, capsys, tmp_path / "a", tmp_path / "p", tmp_path / "p2", "--combine", "anchor",
                               "--force", text=False)  # REPAIR exact at layer sites: folded (BatchNorm, biases)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["fused"], err
    merged = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "m").eval()
    assert close(H.outputs(merged, "resnet"), H.outputs(a, "resnet"), rtol=1e-3)
    record = json.loads((tmp_path / "m" / "onebasin.json").read_text())
    assert record["merge"]["method"] == "anchor" and len(record["merged_from"]) == 3


def test_vit_with_orthogonal_alignment_merges_to_its_function(tmp_path, capsys, monkeypatch):
    """Was: AttributeError ('dict' object has no attribute 'dtype') in the canonical-form check."""
    use_fake_data(monkeypatch)
    a = pair(tmp_path, "vit")
    code, _, err = merge_cli(tmp_path, capsys, tmp_path / "a", tmp_path / "p", "--method", "orthogonal", text=False)
    assert code == 0, err
    merged = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "m").eval()
    assert close(H.outputs(merged, "vit"), H.outputs(a, "vit"), rtol=1e-3)


def test_no_progress_silences_transformers(tmp_path, capsys):
    pair(tmp_path, "bert")
    code, _, err = merge_cli(tmp_path, capsys, tmp_path / "a", tmp_path / "p")
    assert code == 0 and err == ""  # was: "Loading weights ..." and "Writing model shards ..." bars


def test_force_replaces_an_earlier_output_and_cleans_a_stale_temporary_folder(tmp_path, capsys):
    pair(tmp_path, "bert")
    stale = tmp_path / ".m.999999999.tmp"  # left by a killed merge (no such process)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert merge_cli(tmp_path, capsys, tmp_path / "a", tmp_path / "p")[0] == 0
    assert not stale.exists()
    code, _, err = merge_cli(tmp_path, capsys, tmp_path / "a", tmp_path / "p", "--force")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "corpus.txt", "m", "p"]


def test_api_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    pair(tmp_path, "bert")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="not written by onebasin"):
        merge_pretrained([tmp_path / "a", tmp_path / "p"], out=tmp_path / "mine", calib_text=H.corpus(tmp_path / "c.txt"),
                         force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_merge_of_folders_needs_calibration_data(tmp_path, capsys):
    pair(tmp_path, "bert")
    code, _, err = run_cli(["merge", tmp_path / "a", tmp_path / "p", "--out", tmp_path / "m"], capsys)
    assert code == 2 and "--calib-text" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_two_folders_take_weights_as_alpha(tmp_path, capsys):
    """--weights 1 3 with two folders: alpha = 3 / (1 + 3) (was ignored: alpha 0.5)."""
    pair(tmp_path, "bert")
    code, _, err = merge_cli(tmp_path, capsys, tmp_path / "a", tmp_path / "p", "--weights", 1, 3, "--repair", "none")
    assert code == 0, err
    assert json.loads((tmp_path / "m" / "onebasin.json").read_text())["merge"]["alpha"] == 0.75
    code, _, err = merge_cli(tmp_path, capsys, tmp_path / "a", tmp_path / "p", "--weights", 1, 3, "--alpha", 0.2, out="n")
    assert code == 2 and "alpha or weights" in err and not (tmp_path / "n").exists()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_lms_in_memory_with_use_cache_trace_and_merge(kind):
    """A causal LM as from_pretrained gives it (use_cache=True) traces and merges in memory (was "Found
    DynamicCache in output" from torch.export): merged with a permuted copy of itself it computes its logits,
    and its config still asks for the cache afterwards."""
    a = H.build(kind)
    assert a.config.use_cache is True
    p = H.permuted_copy(a, kind)
    x = H.example(kind)
    merged, _ = onebasin.merge(a, p, method="activation", repair="none", data=[x, H.example(kind, seed=1)])
    with torch.no_grad():
        ref, got = a(**x).logits, merged(**x).logits
    assert close(got, ref, rtol=1e-4)
    assert a.config.use_cache is True and p.config.use_cache is True
