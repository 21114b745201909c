"""The transformers of the zoo (vit, gpt): their attention against a hand-written one, heads found as structured
groups, permutations that keep the function, sequence losses, the AdamW recipes, and the demo's settings."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import onebasin
from onebasin.data import TextData, TextInfo, dataset_info, encode
from onebasin.errors import InvalidOptionError
from onebasin.interpolate import evaluate
from onebasin.models import create_model, data_kwargs
from onebasin.permute import permute_model, random_perms
from onebasin.train import RECIPES, get_recipe, lr_at, make_optimizer, resume_path, seed_everything, train


def _randomise(model: nn.Module) -> nn.Module:
    """float64, eval mode, every parameter random (LayerNorm gains and biases too), so that a wrong
    permutation of any of them shows."""
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def _vit_input():
    return torch.randn(3, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _gpt_input(t=40):
    return torch.randint(0, 97, (3, t), generator=torch.Generator().manual_seed(1))


def test_attention_matches_a_hand_written_softmax_attention():
    from onebasin.models.vit import SelfAttention

    torch.manual_seed(0)
    for causal in (False, True):
        attn = SelfAttention(12, 3, causal).double()
        x = torch.randn(2, 5, 12, dtype=torch.float64)
        q, k, v = (x @ m.weight.T + m.bias for m in (attn.query, attn.key, attn.value))
        out = torch.zeros_like(x)
        for h in range(3):  # head h: columns 4h .. 4h + 3
            cols = slice(4 * h, 4 * h + 4)
            scores = q[:, :, cols] @ k[:, :, cols].transpose(1, 2) / math.sqrt(4)
            if causal:
                scores = scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
            out[:, :, cols] = torch.softmax(scores, -1) @ v[:, :, cols]
        torch.testing.assert_close(attn(x), out @ attn.proj.weight.T + attn.proj.bias)


def test_default_configs_sizes():
    vit, gpt = create_model("vit"), create_model("gpt")
    assert vit.patch_embed.kernel_size == (7, 7) and vit.pos_embed.shape == (1, 17, 128)
    assert len(vit.blocks) == 6 and vit.blocks[0].attn.heads == 4 and vit.blocks[0].mlp.fc.out_features == 512
    assert gpt.pos_embed.shape == (1, 128, 192) and len(gpt.blocks) == 4 and gpt.blocks[0].attn.heads == 4
    assert gpt.lm_head.weight is gpt.tok_embed.weight  # tied
    assert create_model("gpt", tie=False).lm_head.weight is not create_model("gpt", tie=False).tok_embed.weight
    assert 1.0e6 < sum(p.numel() for p in vit.parameters()) < 1.4e6
    assert 1.6e6 < sum(p.numel() for p in gpt.parameters()) < 2.0e6


def test_gpt_is_causal():
    gpt = _randomise(create_model("gpt", width=32, depth=2))
    ids = _gpt_input(20)
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 97
    with torch.no_grad():
        a, b = gpt(ids), gpt(changed)
    assert a.shape == (3, 20, 97)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


def test_vit_mean_pool_has_no_class_token():
    vit = create_model("vit", pool="mean")
    assert vit.cls_token is None and vit.pos_embed.shape == (1, 16, 128)
    assert vit(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="pool"):
        create_model("vit", pool="max")
    with pytest.raises(ValueError, match="not a multiple"):
        create_model("vit", patch_size=5)


@pytest.mark.parametrize("name,kwargs,x", [("vit", {}, _vit_input), ("vit", {"pool": "mean", "patch_size": 4}, _vit_input),
                                           ("gpt", {}, _gpt_input), ("gpt", {"tie": False}, _gpt_input)])
def test_trace_finds_heads_and_a_permutation_keeps_the_function(name, kwargs, x):
    torch.manual_seed(0)
    model, x = _randomise(create_model(name, **kwargs)), x()
    spec = onebasin.trace(model, x)
    cfg = model.cfg
    head = cfg.width // cfg.heads
    structured = [g for g in spec.groups.values() if g.block > 1]
    assert len(structured) == 2 * cfg.depth  # per block: query/key and value/proj
    assert all(g.block == head and g.size == cfg.width and g.parent is not None for g in structured)
    assert f"{cfg.heads} blocks of {head}" in str(spec)
    assert sorted(g.size for g in spec.groups.values() if g.block == 1 and g.parent is None and g.members) == \
        sorted([cfg.width] + [cfg.mlp_ratio * cfg.width] * cfg.depth)  # the residual stream, one MLP per block
    perms = random_perms(spec, seed=1)
    permuted = permute_model(model, spec, perms)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), permuted.state_dict().values()))
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), rtol=1e-10, atol=1e-10)


def test_evaluate_scores_every_position_of_a_sequence():
    logits = torch.randn(4, 6, 5, dtype=torch.float64)  # (B, T, V)
    targets = torch.randint(0, 5, (4, 6))

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1, dtype=torch.float64))

        def forward(self, x):
            return logits[x] + self.w

    loss, acc = evaluate(Fixed(), [(torch.arange(0, 2), targets[:2]), (torch.arange(2, 4), targets[2:])])
    lg = logits.numpy()
    log_softmax = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    t = targets.numpy()
    expected_loss = -np.take_along_axis(log_softmax, t[..., None], -1).mean()
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    assert acc == pytest.approx((lg.argmax(-1) == t).mean())


def test_data_kwargs_fit_models_to_their_kind_of_data():
    assert data_kwargs("gpt", dataset_info("pydoc")) == {"vocab_size": 97, "block_size": 128}
    assert data_kwargs("vit", dataset_info("mnist")) == {"in_channels": 1, "num_classes": 10}
    with pytest.raises(InvalidOptionError, match="'gpt' takes token ids, but dataset 'mnist' is images"):
        data_kwargs("gpt", dataset_info("mnist"))
    with pytest.raises(InvalidOptionError, match="'vit' takes images, but dataset 'pydoc' is text"):
        data_kwargs("vit", dataset_info("pydoc"))


def test_transformer_recipes_are_adamw_with_warmup_cosine_and_clipping():
    for name in ("vit", "gpt"):
        r = RECIPES[name]
        assert (r.optimizer, r.schedule, r.grad_clip, r.augment) == ("adamw", "cosine", 1.0, ())
        assert 0 < r.warmup <= 0.1 and r.weight_decay > 0
        lrs = [lr_at(s, 1000, r) for s in range(1000)]
        peak = max(range(1000), key=lrs.__getitem__)
        assert abs(peak - 1000 * r.warmup) <= 1 and lrs[peak] == pytest.approx(r.lr, rel=0.01) and lrs[-1] < 1e-3 * r.lr


def test_adamw_decays_weight_matrices_only():
    model = create_model("gpt", width=16, depth=1)
    opt = make_optimizer(model, RECIPES["gpt"])
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert all(names[id(p)].endswith(("bias", "weight")) and p.dim() == 1 for p in no_decay["params"])
    assert opt.defaults["betas"] == (0.9, 0.99)


def test_gradient_clipping_bounds_the_step():
    """One plain SGD step (no momentum, no decay) at lr_at(0, 1, recipe) = lr / 2: clipped, the weights move by
    exactly lr / 2 * clip in L2 norm; the unclipped gradient, computed here by hand, is larger."""
    data = _text_data("abcd" * 200, seq_len=8)
    seed_everything(0)
    model = create_model("gpt", width=16, depth=1, vocab_size=97, block_size=8)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data.ids[data.starts[:, None] + torch.arange(9)][:, :-1], data.ids[data.starts[:, None] + torch.arange(9)][:, 1:]
    F.cross_entropy(model(x).reshape(-1, 97), y.reshape(-1)).backward()
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    model.zero_grad()
    recipe = get_recipe("gpt", epochs=1, batch_size=len(data), lr=2.0, warmup=0.0, momentum=0.0, weight_decay=0.0, optimizer="sgd",
                        grad_clip=0.01)
    train(model, data, data, recipe, progress=False)
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert grad_norm > 0.1 and moved.item() == pytest.approx(1.0 * 0.01, rel=1e-4)


def _text_data(text: str, seq_len: int) -> TextData:
    info = TextInfo("toy", dataset_info("pydoc").vocab, seq_len, 0.0, "a test string")
    ids = encode(text)
    return TextData(ids, torch.arange(0, len(ids) - seq_len, seq_len), info)


def test_gpt_learns_a_repeating_text(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 40
    data = _text_data(text, 16)
    seed_everything(0)
    model = create_model("gpt", width=32, depth=1, heads=2, block_size=16)
    recipe = get_recipe("gpt", epochs=6, batch_size=8, lr=1e-2)
    result = train(model, data, data, recipe, progress=False, checkpoint_path=tmp_path / "g.safetensors",
                   meta={"model": "gpt"})
    # after the first few characters of a window the text is predictable: far below the 3.2 nats of unigrams
    assert result.test_loss < 0.8 and result.test_acc > 0.8
    assert result.history[0]["train_loss"] > 2 * result.history[-1]["train_loss"]


class Interrupt(Exception):
    pass


def test_adamw_resume_after_interruption_gives_the_same_weights(tmp_path):
    data = _text_data("pack my box with five dozen liquor jugs. " * 12, 16)

    def run(path, init_seed=0, stop_after=None):
        seed_everything(init_seed)
        model = create_model("gpt", width=16, depth=1, heads=2, block_size=16)

        def hook(epoch, record):
            if epoch == stop_after:
                raise Interrupt

        train(model, data, data, get_recipe("gpt", epochs=3, batch_size=8), seed=0, progress=False,
              checkpoint_path=path, meta={"model": "gpt"}, on_epoch_end=hook)
        return model.state_dict()

    straight = run(tmp_path / "a.safetensors")
    with pytest.raises(Interrupt):
        run(tmp_path / "b.safetensors", stop_after=1)
    assert resume_path(tmp_path / "b.safetensors").exists()
    resumed = run(tmp_path / "b.safetensors", init_seed=123)  # the resume overwrites the init
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_demo_settings_find_the_endpoints_onebasin_train_writes(tmp_path):
    """`onebasin demo --model vit|gpt` looks for the checkpoint names that the training commands of
    docs/training.md write, and option given on the command line replace the preset's."""
    from onebasin.cli import _parser, _transformer_demo
    from onebasin.experiment import Experiment, endpoint_path

    def experiment(*argv):
        args = _parser().parse_args(["demo", *argv])
        return Experiment(model=args.model, cache_dir=str(tmp_path), **_transformer_demo(args))

    vit, gpt = experiment("--model", "vit"), experiment("--model", "gpt")
    assert endpoint_path(vit, 0).name == "vit_width128_fashionmnist_e3_s0.safetensors"
    assert endpoint_path(gpt, 1).name == "gpt_width192_pydoc_e6_s1.safetensors"
    assert endpoint_path(experiment("--model", "vit", "--dataset", "mnist"), 1).name == "vit_width128_mnist_e3_s1.safetensors"
    assert (vit.calib_examples, gpt.calib_examples, gpt.recipe_overrides) == (2000, 256, {})
    small = experiment("--model", "gpt", "--width", "32", "--depth", "2", "--lr", "0.01", "--calib-examples", "8")
    assert (small.model_kwargs, small.recipe_overrides, small.calib_examples) == ({"width": 32, "depth": 2}, {"lr": 0.01}, 8)


@pytest.mark.slow
def test_gpt_demo_end_to_end_prints_bits_per_character(tmp_path, capsys):
    import json

    from cli_helpers import run_cli

    code, out, err = run_cli(["demo", "--model", "gpt", "--width", "16", "--depth", "1", "--epochs", "1",
                              "--train-limit", "32", "--calib-examples", "16", "--test-examples", "16",
                              "--cache-dir", tmp_path / "cache", "--out", tmp_path / "r", "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(report["curves"]) == {"plain", "aligned", "aligned+REPAIR"}
    assert "nats" in report["run"]["loss"]
    a_loss = report["curves"]["plain"]["loss"]["test"][0]
    assert f"model A {a_loss / math.log(2):.4f}" in out and "bits per character" in out
