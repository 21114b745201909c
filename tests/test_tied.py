"""A GPT of nanoGPT's shape (embedding and LM head tied, LM head without bias, LayerNorms with gains and biases):
every alignment method keeps B's function (1e-9, float64) and the tie, or says that it untied the head."""

import pytest
import torch

from onebasin.align import AlignmentError, align
from onebasin.align.orthogonal import canonical, rebase, stream_groups
from onebasin.interpolate import lerp
from onebasin.models import create_model
from onebasin.permute import permute_model, random_perms
from onebasin.spec import trace
from test_orthogonal import random_stream_rotation

VOCAB, T = 11, 8


def tiny_gpt(seed, **kwargs):
    """float64, eval mode, every parameter random (LayerNorm gains far from uniform, biases non-zero)."""
    torch.manual_seed(seed)
    model = create_model("gpt", width=16, depth=2, heads=2, vocab_size=VOCAB, block_size=T, **kwargs).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def data(n=64):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (n, T + 1), generator=g)
    return [(ids[i : i + 16, :-1], ids[i : i + 16, 1:]) for i in range(0, n, 16)]


def same_function(m1, m2, batches):
    x = torch.cat([x for x, _ in batches])
    with torch.no_grad():
        return (m1(x) - m2(x)).abs().max().item()


def is_tied(model):
    return model.lm_head.weight is model.tok_embed.weight


def test_the_zoo_gpt_defaults_to_nanogpt_shape_and_takes_head_bias():
    model = tiny_gpt(0)
    assert is_tied(model) and model.lm_head.bias is None  # tied, no head bias (nanoGPT)
    assert tiny_gpt(0, tie=False).lm_head.bias is not None  # checkpoints of tie=False hold lm_head.bias
    assert tiny_gpt(0, tie=False, head_bias=False).lm_head.bias is None
    tied_bias = tiny_gpt(0, head_bias=True)
    assert is_tied(tied_bias) and tied_bias.lm_head.bias.shape == (VOCAB,)


@pytest.mark.parametrize("method,options", [("activation", {}), ("weight", {}),
                                            ("learned", {"steps": 3, "orthogonal": False, "progress": False})])
def test_permutation_methods_keep_the_function_and_the_tie(method, options):
    a, b, batches = tiny_gpt(0), tiny_gpt(1), data()
    aligned, result = align(a, b, method, batches, **options)
    assert is_tied(aligned)
    assert same_function(aligned, b, batches) < 1e-9
    assert not torch.equal(aligned.tok_embed.weight, b.tok_embed.weight), "nothing moved: the test shows nothing"


def test_orthogonal_refuses_a_tied_head_under_a_non_uniform_gain_naming_the_tie_and_untie():
    a, b, batches = tiny_gpt(0), tiny_gpt(1), data()
    with pytest.raises(AlignmentError, match=r"'lm_head.weight', which is tied to 'tok_embed.weight'.*untie=True"):
        align(a, b, "orthogonal", batches)


@pytest.mark.parametrize("method,options", [("orthogonal", {}), ("learned", {"steps": 3, "progress": False})])
def test_untie_returns_untied_models_that_compute_a_and_b(method, options):
    a, b, batches = tiny_gpt(0), tiny_gpt(1), data()
    aligned, result = align(a, b, method, batches, untie=True, **options)
    a2 = result.models[0]
    assert result.record["untied"] == ["lm_head.weight"]
    assert method != "learned" or result.record["orthogonal"]
    assert not is_tied(aligned) and not is_tied(a2)
    assert same_function(aligned, b, batches) < 1e-9
    assert same_function(a2, a, batches) < 1e-9
    assert torch.equal(a2.ln_f.weight, torch.ones(16, dtype=torch.float64))  # the final gain folded into the head


def test_learned_without_untie_keeps_the_tie_and_says_why_there_is_no_stream_map():
    a, b, batches = tiny_gpt(0), tiny_gpt(1), data()
    aligned, result = align(a, b, "learned", batches, steps=3, progress=False)
    assert not result.record["orthogonal"] and "tied to 'tok_embed.weight'" in result.record["orthogonal_note"]
    assert is_tied(aligned) and same_function(aligned, b, batches) < 1e-9


@pytest.mark.usefixtures("float64_statistics")
def test_a_tied_bias_free_head_under_a_uniform_gain_keeps_the_tie_and_a_rotated_copy_is_recovered():
    """The exact treatment without untying: a uniform final gain c commutes with the stream map and stays in the
    norm; the final shift, which the bias-free head cannot take, stays as a stream vector rotated with the stream."""
    a, batches = tiny_gpt(0), data()
    with torch.no_grad():
        a.ln_f.weight.fill_(1.3)
    spec = trace(a, batches[0][0])
    (stream,) = stream_groups(spec)
    other = permute_model(a, spec, {k: v for k, v in random_perms(spec, seed=2).items() if k != stream.name})
    b = rebase(canonical(spec, other, [stream]), stream, random_stream_rotation(stream.size, seed=4))
    assert is_tied(b) and same_function(b, a, batches) < 1e-9
    aligned, result = align(a, b, "orthogonal", batches, spec=spec)
    a2 = result.models[0]
    assert is_tied(aligned) and is_tied(a2) and result.record["untied"] == []
    assert same_function(aligned, b, batches) < 1e-9 and same_function(a2, a, batches) < 1e-9
    assert torch.equal(a2.ln_f.weight, a.ln_f.weight) and a2.ln_f.bias.abs().max() > 0.1
    mid = lerp(a2.state_dict(), aligned.state_dict(), 0.5)
    assert max((mid[k] - v).abs().max().item() for k, v in a2.state_dict().items()) < 1e-8, "B was not brought onto A"


def test_data_free_stream_map_recovers_a_rotated_tied_copy():
    """orthogonal(stream="weights") on the tied, bias-free-head GPT: no data read, the exact inverse rotation
    (orthogonal to 1e-12) and permutations found, the tie kept, B's function kept."""
    from onebasin.permute import invert_perms

    a, batches = tiny_gpt(0), data()
    with torch.no_grad():
        a.ln_f.weight.fill_(1.3)
    spec = trace(a, batches[0][0])
    (stream,) = stream_groups(spec)
    perms = {k: v for k, v in random_perms(spec, seed=3).items() if k != stream.name}
    q = random_stream_rotation(stream.size, seed=5)
    b = rebase(canonical(spec, permute_model(a, spec, perms), [stream]), stream, q)
    aligned, result = align(a, b, "orthogonal", example_input=batches[0][0], spec=spec, stream="weights")
    assert len(result.record["head_families"]) == 2
    found = result.maps[stream.name]
    assert (found.T @ found - torch.eye(16, dtype=torch.float64)).abs().max() < 1e-12
    assert (found - q.T).abs().max() < 1e-10 and result.record["examples"] == 0
    want = invert_perms(perms)
    assert all(torch.equal(result.perms[g], want[g]) for g in perms)
    assert is_tied(aligned) and same_function(aligned, b, batches) < 1e-9


def test_head_products_are_qk_and_ov_per_head_and_ignore_permutations_inside_heads():
    """head_products of the query/key group: [W_Q,h b_Q,h]^T [W_K,h b_K,h] per head (numpy); of the value/output
    group: [W_V,h b_V,h]^T W_O[:, h]^T; unchanged when the units inside each head are permuted."""
    import numpy as np

    from onebasin.align.orthogonal import head_products
    from onebasin.permute import identity_perms

    model = tiny_gpt(0)
    spec = trace(model, data()[0][0])
    sd, d = model.state_dict(), 8
    qk, vo = spec.groups["blocks.0.attn.query"], spec.groups["blocks.0.attn.value"]
    got_qk, got_vo = (head_products(spec, g, sd, identity_perms(spec)).numpy() for g in (qk, vo))
    w = {k: v.numpy() for k, v in sd.items()}
    for h in range(2):
        rows = slice(h * d, (h + 1) * d)
        q, k, v = (np.concatenate([w[f"blocks.0.attn.{n}.weight"][rows], w[f"blocks.0.attn.{n}.bias"][rows, None]], 1)
                   for n in ("query", "key", "value"))
        np.testing.assert_allclose(got_qk[h], (q.T @ k).ravel(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got_vo[h], (v.T @ w["blocks.0.attn.proj.weight"][:, rows].T).ravel(), rtol=1e-12, atol=1e-12)
    inside = {g: p for g, p in identity_perms(spec).items()}
    inside[qk.name] = torch.cat([torch.randperm(d) + h * d for h in range(2)])
    inside[vo.name] = torch.cat([torch.randperm(d) + h * d for h in range(2)])
    moved = permute_model(model, spec, inside).state_dict()
    assert np.abs(head_products(spec, qk, moved, identity_perms(spec)).numpy() - got_qk).max() < 1e-12
    assert np.abs(head_products(spec, vo, moved, identity_perms(spec)).numpy() - got_vo).max() < 1e-12


@pytest.mark.parametrize("sites", [("layer",), ("layer", "block")])
def test_merge_with_untie_repairs_the_untied_network(sites):
    """merge(..., untie=True) REPAIRs the untied network it returns, traced anew: at alpha 0 the goals are A's own
    statistics, so the corrected network computes A (with the tied graph, REPAIR read one tensor for both the
    embedding and the head, and the merged model held the head's weight as its embedding)."""
    from onebasin.pipeline import merge

    a, b, batches = tiny_gpt(0), tiny_gpt(1), data()
    merged, result = merge(a, b, method="orthogonal", untie=True, repair="exact", alpha=0.0, data=batches, sites=sites)
    assert result.align_record["untied"] == ["lm_head.weight"]
    assert same_function(merged, a, batches) < 1e-6


def test_cli_untie_merges_and_compares_a_tied_gpt(tmp_path, monkeypatch, capsys):
    """`onebasin merge/barrier --method orthogonal --untie` on tied GPT checkpoints: without --untie one line naming
    the tie and --untie (exit 2); with it a merged checkpoint whose head is untied, and a barrier report whose
    aligned curve starts at A's loss; --untie with a permutation method is refused."""
    import json

    from cli_helpers import run_cli
    from onebasin.checkpoint import load_model, save_checkpoint

    kw = {"width": 16, "depth": 2, "heads": 2, "vocab_size": VOCAB, "block_size": T}
    paths = []
    for seed in (0, 1):
        path = tmp_path / f"g{seed}.safetensors"
        save_checkpoint(path, tiny_gpt(seed).float().state_dict(), {"model": "gpt", "model_kwargs": kw, "dataset": "pydoc"})
        paths.append(path)
    batches = [(x, y) for x, y in data()]
    fake = lambda *a, **k: ({"test": batches, "train": batches}, batches)  # noqa: E731
    monkeypatch.setattr("onebasin.experiment.evaluation_batches", fake)
    merge = ["merge", *paths, "--method", "orthogonal", "--calib-examples", "64", "--no-progress"]
    code, _, err = run_cli([*merge, "--out", tmp_path / "m.safetensors"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "tied" in err and "--untie" in err
    code, out, err = run_cli([*merge, "--untie", "--out", tmp_path / "m.safetensors"], capsys)
    assert code == 0, err
    merged, meta = load_model(tmp_path / "m.safetensors")
    assert not is_tied(merged) and meta["merge"]["align_record"]["untied"] == ["lm_head.weight"]
    code, out, err = run_cli(["barrier", *paths, "--method", "orthogonal", "--untie", "--calib-examples", "64", "--no-progress",
                              "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["alignment"]["untied"] == ["lm_head.weight"]
    code, _, err = run_cli(["merge", *paths, "--method", "weight", "--untie", "--out", tmp_path / "w.safetensors"], capsys)
    assert code == 2 and "--untie applies to --method orthogonal or learned" in err
