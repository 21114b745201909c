"""REPAIR (Jordan et al. 2022): corrected statistics hit the goals, fusion is exact, permuted copies are untouched."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from onebasin.errors import OnebasinError
from onebasin.interpolate import interpolate_model
from onebasin.permute import invert_perms, permute_model, random_perms
from onebasin.repair import RepairAffine, endpoint_stats, fuse_corrections, repair, reset_bn, restore_affines
from onebasin.spec import from_groups, trace
from conftest import hooked_site_values
from reference_models import ConvLN, ResNet20ish, TinyTransformer, VGGish, mlp, randomize_norm_stats

pytestmark = pytest.mark.usefixtures("float64_statistics")  # sums held to numpy at 1e-10: the exact path

# name -> (factory, input shape, exact passes with layer+block sites, with layer sites only)
MODELS = {
    "mlp": (lambda: mlp(width=16, depth=4), (12,), 3, 3),
    "vgg_bn": (lambda: VGGish(bn=True), (3, 16, 16), 4, 4),
    "vgg_plain": (lambda: VGGish(bn=False), (3, 16, 16), 4, 4),
    "resnet20_bn": (lambda: ResNet20ish("bn"), (3, 8, 8), 28, 19),
    "resnet20_ln": (lambda: ResNet20ish("ln"), (3, 8, 8), 28, 19),
    "resnet20_fixup": (lambda: ResNet20ish("none"), (3, 8, 8), 28, 19),
    "conv_ln_chw": (lambda: ConvLN(), (3, 8, 8), 2, 2),  # LayerNorm([C, H, W]) after each conv
}
FIRST_LAYER_LINEAR = {"mlp", "vgg_plain", "resnet20_fixup"}  # no norm on the first site: eq. (5) is exact there


def build(name, seed):
    """A float64 reference model in eval mode with non-trivial norm parameters and running statistics."""
    torch.manual_seed(seed)
    return randomize_norm_stats(MODELS[name][0]().double().eval())


def calib(name, n=64, batch=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = MODELS[name][1]
    return [torch.randn(batch, *shape, generator=gen, dtype=torch.float64) + 0.3 for _ in range(n // batch)]


def numpy_stats(values: dict, spec_sites) -> dict:
    """{node: (mean, std)} per unit, population statistics in numpy (conv positions pooled)."""
    out = {}
    for s in spec_sites:
        u = np.moveaxis(values[s.node].numpy(), s.dim, -1).reshape(-1, values[s.node].shape[s.dim])
        out[s.node] = (u.mean(0), u.std(0))
    return out


def corrected_values(model, data):
    """Output of every RepairAffine of an unfused REPAIR wrapper, read with forward hooks."""
    seen, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, RepairAffine):
            hooks.append(mod.register_forward_hook(lambda m, a, o, n=name: seen.setdefault(n.removeprefix("repair_"), []).append(o)))
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_repair_hits_goal_statistics(name):
    """Goals from A's and B's activations read with plain hooks (numpy statistics, eqs. 3-4); the repaired
    net's corrected activations read from its RepairAffine modules: an oracle apart from the taps."""
    a, b, data = build(name, 0), build(name, 1), calib(name)
    spec = trace(a, data[0])
    result = repair(a, b, 0.4, data, spec=spec, fuse=False)
    assert result.passes == 1  # one forward sweep, whatever the depth
    sites = [s.site for s in result.stats]
    x = torch.cat(data)
    ref_a, ref_b = numpy_stats(hooked_site_values(a, spec, x), sites), numpy_stats(hooked_site_values(b, spec, x), sites)
    got = numpy_stats(corrected_values(result.model, data), sites)
    if name == "conv_ln_chw":  # a LayerNorm over (C, H, W) keeps the mean std near the goal, units still move
        assert max(float((s.before_std / s.goal_std - 1).abs().max()) for s in result.stats) > 0.1
    else:
        collapse = min(float((s.before_std / s.goal_std).mean()) for s in result.stats)
        assert collapse < 0.9, "the test needs variance collapse to correct"
    for s in sites:
        (ma, sa), (mb, sb), (m, sd) = ref_a[s.node], ref_b[s.node], got[s.node]
        goal_mean, goal_std = 0.6 * ma + 0.4 * mb, 0.6 * sa + 0.4 * sb
        assert np.abs(m - goal_mean).max() < 1e-9 * max(1, np.abs(goal_mean).max()), s
        assert np.abs(sd - goal_std).max() < 1e-9 * max(1, goal_std.max()), s
    if name in FIRST_LAYER_LINEAR:  # closed form: exact at the first layer, approximate deeper
        closed = repair(a, b, 0.4, data, spec=spec, method="closed", fuse=False)
        assert closed.passes == 0
        site = closed.stats[0].site  # eq. (5) predicts the interpolated net's first-layer std exactly
        (_, interp_std), = numpy_stats(hooked_site_values(interpolate_model(a, b, 0.4), spec, x, [site]), [site]).values()
        np.testing.assert_allclose(closed.stats[0].before_std.numpy(), interp_std, rtol=1e-9)
        m, sd = numpy_stats(corrected_values(closed.model, data), [site])[site.node]
        (ma, sa), (mb, sb) = ref_a[site.node], ref_b[site.node]
        np.testing.assert_allclose(m, 0.6 * ma + 0.4 * mb, rtol=0, atol=1e-9 * max(1, np.abs(m).max()))
        np.testing.assert_allclose(sd, 0.6 * sa + 0.4 * sb, rtol=1e-9)


@pytest.mark.parametrize("widths", [(5, 6), (8, 8)])
def test_correction_folded_into_a_layernorm_over_channels_and_map_hits_the_goals(widths):
    """Conv -> LayerNorm([C, H, W]): the fused correction scales the norm's (C, H, W) weight and bias along
    C (was the last axis: a RuntimeError with C != W, a silently wrong model with C == W = 8; test failed
    before the fix). Goals: numpy statistics of A's and B's hooked LayerNorm outputs (eqs. 3-4); the
    fused model's LayerNorm outputs, hooked, must reach them and equal the unfused corrected model."""
    torch.manual_seed(0)
    a, b = (randomize_norm_stats(ConvLN(widths).double().eval()) for _ in range(2))
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 3, 8, 8, generator=gen, dtype=torch.float64) + 0.3 for _ in range(4)]
    result = repair(a, b, 0.3, data, sites=("layer",))
    assert result.fused and type(result.model) is ConvLN and [s.site.module for s in result.stats] == ["features.1", "features.4"]

    def channel_stats(model):
        outs, hooks = {}, [model.features[i].register_forward_hook(lambda m, a, o, i=i: outs.setdefault(i, []).append(o)) for i in (1, 4)]
        with torch.no_grad():
            for x in data:
                model(x)
        for h in hooks:
            h.remove()
        units = {i: np.moveaxis(torch.cat(v).numpy(), 1, -1).reshape(-1, v[0].shape[1]) for i, v in outs.items()}
        return {i: (u.mean(0), u.std(0)) for i, u in units.items()}

    ref_a, ref_b, got = channel_stats(a), channel_stats(b), channel_stats(result.model)
    for i in (1, 4):
        goal_mean, goal_std = 0.7 * ref_a[i][0] + 0.3 * ref_b[i][0], 0.7 * ref_a[i][1] + 0.3 * ref_b[i][1]
        np.testing.assert_allclose(got[i][0], goal_mean, rtol=0, atol=1e-9)
        np.testing.assert_allclose(got[i][1], goal_std, rtol=1e-9)
    state = interpolate_model(a, b, 0.3).state_dict()
    unfused = fuse_corrections(a, result.graph, state, result.stats, fuse=False)[0]
    with torch.no_grad():
        assert (result.model(data[0]) - unfused(data[0])).abs().max() < 1e-12


class InplaceBlockNet(nn.Module):
    """torchvision-style in-place ops: ReLU(inplace=True) right after a site and `out += x` on a site's tensor."""

    def __init__(self, w=6):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.conv2, self.bn2 = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(w, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(x))
        out += x
        out = self.relu(out)
        return self.fc(out.mean((2, 3)))


class TwoReaders(nn.Module):
    """One hidden tensor read by two sites (two Linear layers), one of them inside a residual addition."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.out = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.out(torch.relu(self.b(h) + h) * torch.sigmoid(self.c(h)))


SWEEP_MODELS = {
    **{n: (MODELS[n][0], MODELS[n][1], MODELS[n][2]) for n in ("resnet20_bn", "resnet20_ln", "resnet20_fixup", "mlp")},
    "transformer": (lambda: TinyTransformer(), (4, 6), None),
    "two_readers": (TwoReaders, (12,), None),
    "in_place": (InplaceBlockNet, (3, 6, 6), None),
}


def assert_hits_goals(result, a, b, alpha, data, spec):
    """The corrected activations of `result.model` (its RepairAffine outputs, or for a fused model its
    hooked module outputs) have the per-unit mean and std of eqs. (3)-(4), computed in numpy from A's and
    B's hooked activations, to 1e-9 of the unit scale."""
    sites, x = [s.site for s in result.stats], torch.cat(data)
    ref_a, ref_b = (numpy_stats(hooked_site_values(m, spec, x, sites), sites) for m in (a, b))
    assert result.fused or not any(s.fused for s in result.stats), "hooks read a model wholly fused or wholly unfused"
    values = hooked_site_values(result.model, spec, x, sites) if result.fused else corrected_values(result.model, data)
    got = numpy_stats(values, sites)
    for s in sites:
        (ma, sa), (mb, sb), (m, sd) = ref_a[s.node], ref_b[s.node], got[s.node]
        goal_mean, goal_std = (1 - alpha) * ma + alpha * mb, (1 - alpha) * sa + alpha * sb
        assert np.abs(m - goal_mean).max() < 1e-9 * max(1, np.abs(goal_mean).max()), s
        assert np.abs(sd - goal_std).max() < 1e-9 * max(1, goal_std.max()), s


@pytest.mark.parametrize("name", list(SWEEP_MODELS))
def test_one_sweep_and_per_level_passes_both_hit_the_numpy_goals(name):
    """Exact REPAIR in one sweep and with one streaming pass per dependency level (max_memory=0): each
    result's corrected activations reach the goals computed in numpy from hooked activations of A and B
    (not one path against the other: they share the correction code). ResNet20 with BatchNorm, LayerNorm
    and Fixup, a pre-norm transformer (layer and norm sites), a tensor read by two sites, in-place ops
    after sites; the number of levels as counted by hand (MODELS)."""
    factory, shape, passes = SWEEP_MODELS[name]
    torch.manual_seed(0)
    a, b = (randomize_norm_stats(factory().double().eval()) for _ in range(2))
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(16, *shape, generator=gen, dtype=torch.float64) + 0.3 for _ in range(4)]
    spec = trace(a, data[0])
    kinds = ("layer", "norm") if name == "transformer" else ("layer", "block")  # its additions sit in the root forward
    sweep = repair(a, b, 0.5, data, spec=spec, sites=kinds, fuse=False)
    levels = repair(a, b, 0.5, data, spec=spec, sites=kinds, fuse=False, max_memory=0)
    assert sweep.passes == 1 and levels.passes > 1 and "per dependency level" in levels.note
    if passes is not None:
        assert levels.passes == passes
    for result in (sweep, levels):
        assert_hits_goals(result, a, b, 0.5, data, spec)
    assert sweep.peak_bytes > 0


@pytest.mark.parametrize("method", ["exact", "closed"])
def test_repair_at_an_endpoint_is_the_identity(method):
    """Why barrier curves skip REPAIR at alpha 0 and 1: the goals are the endpoint's own statistics."""
    a, b, data = build("resnet20_bn", 0), build("resnet20_bn", 1), calib("resnet20_bn")
    x = data[0]
    for alpha, end in ((0.0, a), (1.0, b)):
        out = repair(a, b, alpha, data, method=method).model(x)
        assert torch.allclose(out, end(x), atol=1e-8)


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_model_equals_affine_modules_and_loads_strictly(name):
    a, b, data = build(name, 0), build(name, 1), calib(name)
    spec = trace(a, data[0])
    result = repair(a, b, 0.5, data, spec=spec, sites=("layer",))
    state = interpolate_model(a, b, 0.5).state_dict()
    unfused, folded = fuse_corrections(a, spec.graph, state, result.stats, fuse=False)
    assert not any(folded) and sum(isinstance(m, RepairAffine) for m in unfused.modules()) == len(result.stats)
    fused = result.model
    if name == "resnet20_fixup":  # its 1x1 shortcut convs have no bias and no norm: the shift cannot fold
        assert [s.site.module for s in result.stats if not s.fused] == ["blocks.3.shortcut.0", "blocks.6.shortcut.0"]
        fused, folded = fuse_corrections(a, spec.graph, state, [s for s in result.stats if s.fused])
        assert all(folded)
    assert type(fused) is type(a)
    fresh = MODELS[name][0]().double().eval()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(8, *MODELS[name][1], dtype=torch.float64)
    with torch.no_grad():
        assert (result.model(x) - unfused(x)).abs().max() < 1e-10
        foldable_unfused = fuse_corrections(a, spec.graph, state, [s for s in result.stats if s.fused], fuse=False)[0]
        assert (fresh(x) - foldable_unfused(x)).abs().max() < 1e-10
        assert (fresh(x) - interpolate_model(a, b, 0.5)(x)).abs().max() > 1e-3  # the corrections did something


@pytest.mark.parametrize("name", ["resnet20_bn", "resnet20_ln"])
def test_residual_block_corrections_stay_as_named_modules(name):
    """Block corrections cannot fold: they stay as `repair_<node>` modules beside the original keys. The
    saved model, and the one reloaded with `restore_affines`, compute ResNet20ish's forward written out by
    hand with y -> weight * y + bias after each block's addition (weights from the saved state_dict)."""
    a, b, data = build(name, 0), build(name, 1), calib(name, n=32)
    result = repair(a, b, 0.5, data)
    blocks = [s.site.node for s in result.stats if s.site.kind == "block"]
    assert not result.fused and result.unfused == blocks and len(blocks) == 9
    model = result.model
    assert type(model).__name__ == "RepairedResNet20ish"
    extra = set(model.state_dict()) - set(a.state_dict())
    assert extra == {f"repair_{n}.{p}" for n in blocks for p in ("weight", "bias")}
    assert set(a.state_dict()) <= set(model.state_dict())
    # the documented reload path: identity affines of the saved sizes on a fresh model, then load_state_dict
    blank = restore_affines(MODELS[name][0]().double(), result.affines, model.state_dict(), data[0])
    blank.load_state_dict(model.state_dict(), strict=True)
    state = model.state_dict()
    net = MODELS[name][0]().double().eval()
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith("repair_")})
    affines = [(state[f"repair_{n}.weight"].view(1, -1, 1, 1), state[f"repair_{n}.bias"].view(1, -1, 1, 1)) for n in blocks]
    x = torch.randn(4, *MODELS[name][1], dtype=torch.float64)
    with torch.no_grad():
        h = torch.relu(net.n1(net.conv1(x)))
        for blk, (w, bias) in zip(net.blocks, affines):  # Block.forward with the correction after the addition
            out = blk.n2(blk.conv2(torch.relu(blk.n1(blk.conv1(h)))))
            h = torch.relu((out + blk.shortcut(h)) * w + bias)
        expected = net.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))
        assert (model(x) - expected).abs().max() < 1e-12 and (blank(x) - expected).abs().max() < 1e-12
        assert (expected - net(x)).abs().max() > 1e-3  # the block corrections matter


def test_bias_free_layer_keeps_its_shift_as_a_module_unless_a_norm_follows():
    def net(norm, seed):
        torch.manual_seed(seed)
        norm_layers = [nn.LayerNorm(16)] if norm else []
        return nn.Sequential(nn.Linear(12, 16, bias=False), *norm_layers, nn.ReLU(), nn.Linear(16, 5)).double()

    data = [torch.randn(32, 12, dtype=torch.float64) for _ in range(2)]
    for norm in (False, True):
        a, b = net(norm, 0), net(norm, 1)
        spec = trace(a, data[0])
        result = repair(a, b, 0.5, data, spec=spec)
        if norm:
            assert result.fused and result.stats[0].site.module == "1"  # the shift went into the LayerNorm's bias
            net(True, 2).load_state_dict(result.model.state_dict(), strict=True)
        else:
            assert not result.fused and [s.site.module for s in result.stats] == ["0"]
            assert isinstance(result.model.get_submodule(f"repair_{result.unfused[0]}"), RepairAffine)
        assert_hits_goals(result, a, b, 0.5, data, spec)


@pytest.mark.parametrize("name", ["mlp", "resnet20_bn"])
@pytest.mark.parametrize("method", ["exact", "closed"])
def test_repair_of_aligned_permuted_copy_changes_nothing(name, method):
    a, data = build(name, 0), calib(name, n=32)
    spec = trace(a, data[0])
    perms = random_perms(spec, seed=3)
    b = permute_model(a, spec, perms)
    aligned = permute_model(b, spec, invert_perms(perms))
    x = torch.randn(8, *MODELS[name][1], dtype=torch.float64)
    for alpha in (0.3, 0.5) if name == "mlp" else (0.5,):
        result = repair(a, aligned, alpha, data, spec=spec, method=method)
        assert all(torch.allclose(s.scale, torch.ones_like(s.scale), atol=1e-9) for s in result.stats)
        assert all(s.shift.abs().max() < 1e-9 for s in result.stats)
        with torch.no_grad():
            assert (result.model(x) - interpolate_model(a, aligned, alpha)(x)).abs().max() < 1e-9
    # without the alignment REPAIR does change the (collapsed) interpolated net
    plain = repair(a, b, 0.5, data, spec=spec, method=method)
    assert max(float((s.scale - 1).abs().max()) for s in plain.stats) > 0.05


def test_reset_bn_reestimates_running_statistics_on_the_calibration_data():
    """Several batches of different sizes (and one of a single row, skipped): each BatchNorm's running mean
    and variance become the plain average over batches of its input's per-batch mean and unbiased variance
    (momentum=None), computed here in numpy from inputs written out by hand, with every earlier BatchNorm
    normalising by its batch statistics (train mode) as the re-estimation does."""
    a, b = build("vgg_bn", 0), build("vgg_bn", 1)
    interp = interpolate_model(a, b, 0.5)
    before = {k: v.clone() for k, v in interp.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(n, 3, 16, 16, generator=gen, dtype=torch.float64) + 0.3 for n in (16, 24, 1, 8)]
    new = reset_bn(interp, data)
    assert all(torch.equal(v, interp.state_dict()[k]) for k, v in before.items()), "input model modified"

    def batch_stats(h):  # per channel over (N, H, W): mean, biased variance (normalises), unbiased (stored)
        u = np.moveaxis(h.numpy(), 1, -1).reshape(-1, h.shape[1])
        return u.mean(0), u.var(0), u.var(0, ddof=1)

    f, want = interp.features, {1: [], 5: []}
    with torch.no_grad():
        for x in data[:2] + data[3:]:  # the one-row batch is skipped
            h = f[0](x)
            mean, var, unbiased = batch_stats(h)
            want[1].append((mean, unbiased))
            bn = f[1]
            h = (h - torch.from_numpy(mean).view(1, -1, 1, 1)) / torch.from_numpy(np.sqrt(var + bn.eps)).view(1, -1, 1, 1)
            h = f[4](f[3](torch.relu(h * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))))
            mean, _, unbiased = batch_stats(h)
            want[5].append((mean, unbiased))
    for i, rows in want.items():
        np.testing.assert_allclose(new.features[i].running_mean.numpy(), np.mean([m for m, _ in rows], 0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(new.features[i].running_var.numpy(), np.mean([v for _, v in rows], 0), rtol=1e-10, atol=1e-12)
        assert int(new.features[i].num_batches_tracked) == 3
    assert new.features[1].momentum == interp.features[1].momentum and not new.training
    with pytest.raises(OnebasinError, match="no BatchNorm"):
        reset_bn(build("mlp", 0), calib("mlp"))


def test_bad_arguments_name_the_valid_choices():
    a, b, data = build("mlp", 0), build("mlp", 1), calib("mlp")
    with pytest.raises(ValueError, match="exact"):
        repair(a, b, 0.5, data, method="fast")
    with pytest.raises(ValueError, match="block"):
        repair(a, b, 0.5, data, sites=("conv",))
    with pytest.raises(ValueError, match="alpha"):
        repair(a, b, 1.5, data)


def test_in_place_ops_do_not_corrupt_the_measured_statistics():
    torch.manual_seed(0)
    a, b = InplaceBlockNet().double().eval(), InplaceBlockNet().double().eval()
    data = [torch.randn(16, 3, 6, 6, dtype=torch.float64) for _ in range(2)]
    spec = trace(a, data[0])
    result = repair(a, b, 0.5, data, spec=spec, fuse=False)
    assert [s.site.kind for s in result.stats] == ["layer", "layer", "block"] and result.passes == 1
    assert_hits_goals(result, a, b, 0.5, data, spec)
    with torch.no_grad():  # A's bn2 output, read before `out += x` changes it in place
        bn2_out = torch.cat([a.bn2(a.conv2(torch.relu(a.bn1(a.conv1(x))))) for x in data])
    ends = endpoint_stats(a, b, data)
    assert torch.allclose(ends.mean_a[1], bn2_out.mean((0, 2, 3)), atol=1e-12)
    assert torch.allclose(ends.var_a[1], bn2_out.var((0, 2, 3), unbiased=False), atol=1e-12)


def test_hand_written_spec_needs_the_traced_graph():
    a, b, data = build("mlp", 0), build("mlp", 1), calib("mlp")
    groups = {f"h{i}": [(f"{i}.weight", 0), (f"{i}.bias", 0), (f"{i + 2}.weight", 1)] for i in (1, 3, 5)}
    spec = from_groups(groups, a.state_dict(), sites={f"h{i}": [str(i)] for i in (1, 3, 5)})
    with pytest.raises(OnebasinError, match="traced spec"):
        repair(a, b, 0.5, data, spec=spec)


def test_layer_and_norm_sites_of_a_transformer_all_fold_into_weights_and_norms():
    """REPAIR of a LayerNorm network at ("layer", "norm") sites keeps it a plain model of its class, whose
    hooked module outputs reach the numpy goals of A's and B's hooked outputs."""
    torch.manual_seed(0)
    a, b = TinyTransformer().double().eval(), TinyTransformer().double().eval()
    data = [torch.randn(16, 4, 6, dtype=torch.float64) for _ in range(3)]
    spec = trace(a, data[0])
    result = repair(a, b, 0.5, data, spec=spec, sites=("layer", "norm"))
    kinds = {s.site.kind for s in result.stats}
    assert kinds == {"layer", "norm"} and result.fused and type(result.model) is TinyTransformer
    assert sum(s.site.kind == "norm" for s in result.stats) == 5  # ln1, ln2 of two blocks and the final norm
    assert_hits_goals(result, a, b, 0.5, data, spec)  # the folded model's LayerNorm and Linear outputs, hooked


class _ViewThenBase(nn.Module):
    """h = fc(x); v = h viewed as (N, 2, 3); the output reads both v (scaled) and h itself."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        h = self.fc(x)
        v = h.view(-1, 2, 3)
        return v.flatten(1) * 2 + h


def test_walk_callbacks_may_write_in_place_without_touching_other_values():
    """A callback that zeroes a view of a live tensor in place must not change the tensor it views
    (walk hands it a private copy): the output becomes 0 * 2 + h = h, computed independently."""
    from onebasin.graph import capture, walk

    torch.manual_seed(0)
    model, x = _ViewThenBase().double(), torch.randn(5, 4, dtype=torch.float64)
    graph = capture(model, x)
    view = next(n.name for n in graph.graph.nodes if n.op == "call_function" and "view" in str(n.target))
    out = graph.user_outputs()[0].name
    seen = {}

    def zero(values):
        return [v.mul_(0) for v in values]

    walk(graph, model.state_dict(), [x], [out], {view: zero, out: lambda vs: seen.setdefault("out", vs)})
    expected = x @ model.fc.weight.detach().T + model.fc.bias.detach()
    torch.testing.assert_close(seen["out"][0], expected, rtol=0, atol=1e-12)


def numpy_paired(values_a: dict, values_b: dict, sites) -> dict:
    """{statistic: [per site (units,)]}: means, population variances and per-unit covariance in numpy."""
    out = {k: [] for k in ("mean_a", "var_a", "mean_b", "var_b", "cov_ab")}
    for s in sites:
        ua, ub = (np.moveaxis(v[s.node].numpy(), s.dim, -1).reshape(-1, v[s.node].shape[s.dim]) for v in (values_a, values_b))
        out["mean_a"].append(ua.mean(0)), out["var_a"].append(ua.var(0))
        out["mean_b"].append(ub.mean(0)), out["var_b"].append(ub.var(0))
        out["cov_ab"].append(((ua - ua.mean(0)) * (ub - ub.mean(0))).mean(0))
    return out


@pytest.mark.parametrize("make, shape, kinds", [(lambda: mlp(10, 4, 12, 3), (12,), ("layer", "block")),
                                                (lambda: ResNet20ish("bn"), (3, 8, 8), ("layer", "block")),
                                                (lambda: TinyTransformer(), (4, 6), ("layer",))])
def test_goals_from_the_alignment_pass_equal_numpy_statistics(make, shape, kinds):
    """REPAIR's endpoint statistics assembled from activation matching's own pass (A with the unaligned B,
    indexed by the found permutation) equal numpy statistics of A's and the aligned B's hooked activations
    (float64, 1e-10), and with the identity (`plain_site_stats`) those of A and the unaligned B; the
    transformer's qkv projection is read by several groups (heads, query/key, value) and assembled from
    their parts (its residual additions sit in the root forward, which the hook oracle cannot split)."""
    from onebasin.align import align
    from onebasin.repair import endpoints_from_alignment

    torch.manual_seed(0)
    a, b = make().double().eval(), make().double().eval()
    randomize_norm_stats(a), randomize_norm_stats(b)
    data = [torch.randn(32, *shape, dtype=torch.float64) for _ in range(2)]
    spec = trace(a, data[0])
    aligned_b, result = align(a, b, "activation", data, spec=spec, max_examples=None)
    assert not all(torch.equal(p, torch.arange(len(p))) for p in result.perms.values())  # B did move
    x = torch.cat(data)
    for stats, other in ((result.site_stats, aligned_b), (result.plain_site_stats, b)):
        mine = endpoints_from_alignment(spec, stats, kinds)
        assert mine is not None and {s.kind for s in mine.sites} <= set(kinds)
        sites, values_a = mine.sites, hooked_site_values(a, spec, x, mine.sites)
        assert kinds != ("layer",) or sum(s.module.endswith("qkv") for s in sites) == 2  # the transformer's fused qkv
        want = numpy_paired(values_a, hooked_site_values(other, spec, x, sites), sites)
        assert mine.ndims == [values_a[s.node].ndim for s in sites]
        for key, columns in want.items():
            for got, expected, s in zip(getattr(mine, key), columns, sites):
                np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12, err_msg=f"{key} at {s.node}")


def test_unfused_repair_wrapper_runs_on_inputs_that_are_not_views():
    """Calibration batches that are views of a larger tensor (x[:, :3] of a 4-channel array): the Repaired wrapper,
    built from the captured graph, must still run on an ordinary tensor of another batch size (export had
    guarded the view's base shape: 'Guard failed: x._base.size()[1] != 4'; test failed before the fix)."""
    a, b = build("resnet20_bn", 0), build("resnet20_bn", 1)
    big = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    data = [big[i:i + 16, :3] for i in range(0, 64, 16)]  # views
    result = repair(a, b, 0.0, data, fuse=True)  # alpha 0: the goals are A's own statistics
    assert not result.fused  # block corrections stay as modules: the wrapper is what runs
    fresh = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(result.model(fresh), a(fresh), rtol=1e-6, atol=1e-6)
