"""Alignment methods: recover a known permutation, one-pass exact statistics, real MNIST midpoints."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from onebasin.align import (
    AlignmentError,
    AlignResult,
    align,
    anneal_many,
    get_method,
    input_moments,
    list_methods,
    site_moments,
)
from onebasin.align.functional import layer_input_matrix, producing_layers
from onebasin.errors import ArchitectureMismatchError, InvalidWeightsError
from onebasin.interpolate import lerp
from onebasin.permute import apply_perms, invert_perms, permute_model, random_perms
from onebasin.spec import from_groups, trace
from conftest import CountConvs, hooked_site_values
from reference_models import ResNet20ish, VGGish, mlp, mnist_tensors, randomize_norm_stats, train_mnist_mlp

DETERMINISTIC = ["activation", "weight", "functional"]  # recover an exact permutation; annealing is tested apart
MODELS = {
    "mlp": (lambda: mlp(), (12,)),
    "vgg_bn": (lambda: VGGish(bn=True), (3, 16, 16)),
    "vgg_plain": (lambda: VGGish(bn=False), (3, 16, 16)),
    "resnet20_bn": (lambda: ResNet20ish("bn"), (3, 16, 16)),
    "resnet20_ln": (lambda: ResNet20ish("ln"), (3, 16, 16)),
    "resnet20_fixup": (lambda: ResNet20ish("none"), (3, 16, 16)),
}


def build(name, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    factory, shape = MODELS[name]
    model = randomize_norm_stats(factory().to(dtype))  # non-trivial norms, so permuting them matters
    return model, shape


def random_data(shape, sizes=(32, 32, 32, 20), dtype=torch.float32, labels=False, seed=1):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, *shape, generator=gen, dtype=dtype) for n in sizes]
    return [(x, torch.randint(0, 5, (len(x),), generator=gen)) for x in xs] if labels else xs


def permuted_copy(name, seed=0):
    model, shape = build(name, seed)
    data = random_data(shape)
    spec = trace(model, data[0])
    perms = random_perms(spec, seed=7)
    return model, permute_model(model, spec, perms), spec, invert_perms(perms), data


def midpoint_loss(model_a, model_b, x, y):
    scratch = copy.deepcopy(model_a).eval()
    scratch.load_state_dict(lerp(model_a.state_dict(), model_b.state_dict(), 0.5))
    with torch.no_grad():
        return F.cross_entropy(scratch(x), y).item()


# --- the registry -----------------------------------------------------------------------------------


REFERENCES = {  # the paper each method implements, by its arXiv number (written down from the papers)
    "activation": "1511.07543",  # Li et al. 2015, Convergent learning
    "annealing": "2110.06296",  # Entezari et al. 2021, The Role of Permutation Invariance...
    "functional": "1805.09791",  # He et al. 2018, Multi-task zipping
    "learned": "2209.04836",  # Ainsworth et al., Git Re-Basin, Sec. 3.3
    "orthogonal": "2506.22712",  # Theus et al. 2025, Generalized Linear Mode Connectivity for Transformers
    "weight": "2209.04836",  # Ainsworth et al., Git Re-Basin, Alg. 1
}


def test_registry_lists_methods_with_references():
    assert list_methods() == sorted(REFERENCES)
    for name in list_methods():
        method = get_method(name)
        assert method.name == name and f"arXiv:{REFERENCES[name]}" in method.reference
    with pytest.raises(ValueError, match="activation, annealing, functional, learned, orthogonal, weight"):
        get_method("optimal_transport")


# --- synthetic: B is a permuted copy of A --------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", DETERMINISTIC)
def test_recovers_the_inverse_permutation(method, name):
    a, b, spec, want, data = permuted_copy(name)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    result = get_method(method)(spec, a, b, data)
    assert isinstance(result, AlignResult) and result.record["method"] == method
    assert set(result.perms) == set(spec.groups)
    wrong = [g for g in spec.groups if not torch.equal(result.perms[g], want[g])]
    assert not wrong, f"{method} on {name}: wrong permutation for groups {wrong}"
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items()), "model B was modified"
    aligned = apply_perms(spec, result.perms, b.state_dict())
    assert all(torch.equal(aligned[k], v) for k, v in a.state_dict().items())


def test_annealing_drives_the_barrier_to_zero_on_a_permuted_mlp():
    torch.manual_seed(0)
    a = mlp(width=8, depth=3)
    data = random_data((12,), sizes=(256,))
    spec = trace(a, data[0])
    b = permute_model(a, spec, random_perms(spec, seed=1))
    result = get_method("annealing")(spec, a, b, data, budget=2000, seed=0)
    initial, best = result.record["objective"]
    assert initial > 1e-3, "a misaligned midpoint should have a barrier to remove"
    assert abs(best) < 1e-6 * initial, result.record["history"]
    assert result.record["evaluations"] == 2000 and 0 < result.record["accepted"] < 2000


def test_annealing_refines_from_init_and_searches_n_models():
    torch.manual_seed(0)
    a = mlp(width=6, depth=3)
    data = random_data((12,), sizes=(128,))  # no labels: MSE to the endpoints' mean output
    spec = trace(a, data[0])
    perms = [random_perms(spec, seed=s) for s in (1, 2)]
    b, c = (permute_model(a, spec, p) for p in perms)
    exact = get_method("annealing")(spec, a, b, data, init=invert_perms(perms[0]), budget=50)
    assert exact.record["objective"][1] <= 1e-9 and all(torch.equal(exact.perms[g], invert_perms(perms[0])[g]) for g in spec.groups)
    results = anneal_many(spec, [a, b, c], data, budget=3000, seed=0)
    initial, best = results[0].record["objective"]
    assert best < 0.05 * initial
    assert all(torch.equal(p, torch.arange(len(p))) for p in results[0].perms.values())  # model 0 is the reference


@pytest.mark.parametrize("name", ["fused_attention", "gqa_rope"])
def test_annealing_moves_keep_heads_and_blocks_intact(name):
    """Structured groups (heads as blocks, fixed insides under rotary embeddings, grouped-query heads):
    every state the search keeps must leave B's function unchanged, and a permuted copy is re-aligned."""
    from rule_models import FusedAttention, GQARope

    torch.manual_seed(0)
    a, x = {"fused_attention": (FusedAttention(), torch.randn(64, 4, 5)), "gqa_rope": (GQARope(), torch.randint(0, 13, (64, 6)))}[name]
    a, x = a.double(), x.double() if x.is_floating_point() else x
    spec = trace(a, x[:2])
    assert any(g.structured for g in spec.groups.values())
    b = permute_model(a, spec, random_perms(spec, seed=1))
    result = get_method("annealing")(spec, a, b, [x], budget=1500, seed=0, progress=False)
    moved = permute_model(b, spec, result.perms)
    with torch.no_grad():
        assert torch.allclose(moved(x), b(x), rtol=0, atol=1e-12), "a move broke the block structure"
    initial, best = result.record["objective"]
    assert best < (0.05 if name == "fused_attention" else 0.5) * initial, result.record["objective"]


def numpy_mlp_barrier(model_a, model_b, spec, perms_b, x, y, alphas=(0.5,)):
    """Eq. 1 of Entezari et al. on (x, y) in numpy: B's hidden units re-indexed by hand (unit i of the
    permuted B is unit perms_b[g][i] of B), weights averaged, plain forward passes, cross-entropy."""
    linears = [k[: -len(".weight")] for k, v in model_a.state_dict().items() if k.endswith(".weight")]
    out_perm = {}  # linear layer -> the permutation of its output units
    for g in spec.groups.values():
        for m in g.members:
            if m.axis == 0 and m.key.endswith(".weight"):
                out_perm[m.key[: -len(".weight")]] = np.asarray(perms_b[g.name])
    sd_a = {k: v.detach().double().numpy() for k, v in model_a.state_dict().items()}
    sd_b = {k: v.detach().double().numpy() for k, v in model_b.state_dict().items()}
    layers_a, layers_b, prev = [], [], None
    for name in linears:
        w, b = sd_b[name + ".weight"], sd_b[name + ".bias"]
        if name in out_perm:
            w, b = w[out_perm[name]], b[out_perm[name]]
        if prev is not None:
            w = w[:, prev]
        prev = out_perm.get(name)
        layers_a.append((sd_a[name + ".weight"], sd_a[name + ".bias"]))
        layers_b.append((w, b))

    def loss(layers):
        h = x.reshape(len(x), -1).double().numpy()
        for i, (w, b) in enumerate(layers):
            h = h @ w.T + b
            h = np.maximum(h, 0) if i < len(layers) - 1 else h
        h = h - h.max(1, keepdims=True)
        logp = h - np.log(np.exp(h).sum(1, keepdims=True))
        return -logp[np.arange(len(y)), y.numpy()].mean()

    ends = loss(layers_a), loss(layers_b)
    mixed = lambda a: [((1 - a) * wa + a * wb, (1 - a) * ba + a * bb) for (wa, ba), (wb, bb) in zip(layers_a, layers_b)]  # noqa: E731
    return max(loss(mixed(a)) - ((1 - a) * ends[0] + a * ends[1]) for a in alphas)


def test_annealing_record_matches_the_barrier_recomputed_in_numpy():
    torch.manual_seed(0)
    a, b = mlp(width=6, depth=3), mlp(width=6, depth=3)  # two different random nets: no zero-barrier state
    data = random_data((12,), sizes=(40, 40), labels=True)
    spec = trace(a, data[0][0])
    alphas = (0.25, 0.5, 0.75)
    result = get_method("annealing")(spec, a, b, data, budget=400, seed=0, alphas=alphas, max_examples=64, progress=False)
    x, y = torch.cat([d[0] for d in data])[:64], torch.cat([d[1] for d in data])[:64]
    initial, best = result.record["objective"]
    identity = {g: torch.arange(spec.groups[g].size) for g in spec.groups}
    assert initial == pytest.approx(numpy_mlp_barrier(a, b, spec, identity, x, y, alphas), abs=1e-5)
    assert best == pytest.approx(numpy_mlp_barrier(a, b, spec, result.perms, x, y, alphas), abs=1e-5)
    assert best < initial - 1e-3, "400 swaps of 6-unit layers should find a lower barrier"
    history = result.record["history"]
    assert history[0] == (1, initial, initial) and history[-1][0] == 400 and history[-1][2] == best
    assert all(h1[2] <= h0[2] and h1[2] <= h1[1] for h0, h1 in zip(history, history[1:]))  # best never rises


# --- exact one-pass statistics -------------------------------------------------------------------------


def numpy_units(t, dim):
    return np.moveaxis(t.numpy(), dim, -1).reshape(-1, t.shape[dim])


@pytest.mark.usefixtures("float64_statistics")
@pytest.mark.parametrize("name", ["vgg_bn", "resnet20_bn"])
def test_one_pass_statistics_equal_a_whole_data_float64_reference(name):
    a, shape = build(name, seed=0, dtype=torch.float64)
    b, _ = build(name, seed=1, dtype=torch.float64)
    data = random_data(shape, sizes=(7, 16, 9, 16), dtype=torch.float64)
    spec = trace(a, data[0])
    moments, examples = site_moments(spec, a, b, data)
    assert examples == 48
    x = torch.cat(data)
    a.eval(), b.eval()
    ref_a, ref_b = hooked_site_values(a, spec, x), hooked_site_values(b, spec, x)
    for group, ms in moments.items():
        for site, m in zip(spec.groups[group].sites, ms):
            ua, ub = numpy_units(ref_a[site.node], site.dim), numpy_units(ref_b[site.node], site.dim)
            k = ua.shape[1]
            assert m.n == len(ua)
            assert np.abs(m.mean_x.numpy() - ua.mean(0)).max() < 1e-10
            assert np.abs(m.cov_xy.numpy() - np.cov(ua.T, ub.T, bias=True)[:k, k:]).max() < 1e-10
            assert np.abs(m.corr_xy().numpy() - np.corrcoef(ua.T, ub.T)[:k, k:]).max() < 1e-10
    assert any(s.kind == "block" for g in spec.groups.values() for s in g.sites) == (name == "resnet20_bn")


@pytest.mark.usefixtures("float64_statistics")
def test_sites_are_read_before_in_place_ops_overwrite_them():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(inplace=True), nn.Linear(8, 3)).double().eval()
    data = random_data((12,), dtype=torch.float64)
    spec = trace(a, data[0])
    (m,) = site_moments(spec, a, a, data)[0]["0"]
    x = torch.cat(data)
    with torch.no_grad():
        pre_relu = a[1](a[0](x))
    assert spec.groups["0"].sites[0].module == "1" and (pre_relu < 0).any()
    assert (m.mean_x - pre_relu.mean(0)).abs().max() < 1e-10  # torchvision ResNets use ReLU(inplace=True)


@pytest.mark.usefixtures("float64_statistics")
def test_layer_input_moments_equal_a_whole_data_reference():
    a, shape = build("vgg_bn", seed=0, dtype=torch.float64)
    b, _ = build("vgg_bn", seed=1, dtype=torch.float64)
    data = random_data(shape, sizes=(7, 16, 9), dtype=torch.float64)
    spec = trace(a, data[0])
    moments, _ = input_moments(spec, a, b, data)
    x = torch.cat(data)
    for model, side in ((a, 0), (b, 1)):
        seen = {}
        hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: seen.setdefault(n, args[0])) for n in moments]
        with torch.no_grad():
            model.eval()(x)
        for h in hooks:
            h.remove()
        layers = {layer.name: layer for group in producing_layers(spec, spec.graph).values() for layer in group}
        for layer, ms in moments.items():
            module = model.get_submodule(layer)
            rows = layer_input_matrix(layers[layer], seen[layer])
            if isinstance(module, nn.Conv2d):  # patches reproduce the conv: rows @ W^T + b is its output
                out = (rows @ module.weight.reshape(len(module.weight), -1).T + module.bias).reshape(len(x), -1, module.weight.shape[0])
                assert torch.allclose(out.transpose(1, 2).reshape_as(module(seen[layer])), module(seen[layer]), atol=1e-10)
            r = rows.numpy()
            assert np.abs(ms[side].second_moment_x.numpy() - r.T @ r / len(r)).max() < 1e-10
    hidden = {(m.key, m.axis) for g in spec.groups.values() for m in g.members}  # the output layer's units are not
    assert set(moments) == {n for n, m in a.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and (f"{n}.weight", 0) in hidden}


@pytest.mark.parametrize("method", ["activation", "functional"])
def test_statistics_run_each_network_once_per_batch(method):
    a, b, spec, _, data = permuted_copy("resnet20_bn")
    with CountConvs() as convs:
        get_method(method)(spec, a, b, data)
    convs_per_run = sum(isinstance(m, nn.Conv2d) for m in a.modules())
    if method == "functional":  # reads layer inputs only: the graph stops before the last conv, whose output no layer reads
        convs_per_run -= 1
    assert convs.n == 2 * len(data) * convs_per_run


def test_max_examples_limits_the_data_read():
    """max_examples=40 of batches of 32 rows: the statistics are those of exactly the first 40 examples
    (numpy on A's and B's hooked activations of rows 0-39; all 116 rows give other means)."""
    a, b, spec, _, data = permuted_copy("mlp")
    result = get_method("activation")(spec, a, b, data, max_examples=40)
    assert result.record["examples"] == 40
    x = torch.cat(data)
    for rows, close in ((slice(0, 40), True), (slice(None), False)):
        ref_a, ref_b = hooked_site_values(a, spec, x[rows]), hooked_site_values(b, spec, x[rows])
        for g in spec.groups.values():
            for s, st in zip(g.sites, result.plain_site_stats[g.name]):  # B's units unpermuted
                for got, values in ((st["mean_a"], ref_a), (st["mean_b"], ref_b)):
                    want = values[s.node].double().numpy().mean(0)
                    assert np.allclose(got.numpy(), want, rtol=1e-5, atol=1e-6) == close, (g.name, rows)


# --- align(): the entry point ---------------------------------------------------------------------


@pytest.mark.parametrize("method", [m for m in list_methods() if m != "orthogonal"])  # transformers: test_orthogonal
def test_align_returns_b_in_a_basin_without_touching_the_inputs(method):
    torch.manual_seed(0)
    a = mlp(width=6, depth=3)
    data = random_data((12,), sizes=(64, 64), labels=method != "annealing")  # random labels mislead annealing
    spec = trace(a, data[0][0] if method != "annealing" else data[0])
    b = permute_model(a, spec, random_perms(spec, seed=3)).train()
    before = copy.deepcopy(b.state_dict())
    options = {"budget": 1500} if method == "annealing" else {}
    aligned, result = align(a, b, method, data, **options)
    assert b.training and all(m.training for m in b.modules()), "align must restore B's mode"
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())
    assert result.record["check_max_diff"] < 1e-5
    assert all(torch.allclose(v, a.state_dict()[k]) for k, v in aligned.state_dict().items())


def test_align_raises_when_the_spec_changes_the_function():
    torch.manual_seed(0)
    a, b = mlp(width=6, depth=3), mlp(width=6, depth=3)
    x = torch.randn(16, 12)
    broken = from_groups({"h1": [("1.weight", 0), ("1.bias", 0)]}, a.state_dict())  # misses 3.weight's inputs
    with pytest.raises(AlignmentError, match="different function"):
        align(a, b, "weight", spec=broken, example_input=x)
    aligned, _ = align(a, b, "weight", spec=broken, example_input=x, check=False)
    assert aligned is not b


def test_align_validates_its_inputs():
    a, b = mlp(width=6), mlp(width=7)
    with pytest.raises(ArchitectureMismatchError):
        align(a, b, "weight", example_input=torch.randn(2, 12))
    c = mlp(width=6)
    with torch.no_grad():
        c[1].weight[0, 0] = float("nan")
    with pytest.raises(InvalidWeightsError):
        align(a, c, "weight", example_input=torch.randn(2, 12))
    with pytest.raises(ValueError, match="needs data"):
        get_method("activation")(trace(a, torch.randn(2, 12)), a, copy.deepcopy(a))


def test_group_without_sites_falls_back_to_weight_matching():
    torch.manual_seed(0)
    a = mlp(width=6, depth=3)
    spec = from_groups(
        {"h1": [("1.weight", 0), ("1.bias", 0), ("3.weight", 1)], "h2": [("3.weight", 0), ("3.bias", 0), ("5.weight", 1)]},
        a.state_dict(),
        sites={"h1": ["1"]},  # h2 has no site
    )
    perms = random_perms(spec, seed=2)
    b = permute_model(a, spec, perms)
    result = get_method("activation")(spec, a, b, random_data((12,)))
    assert result.record["weight_fallback"] == ["h2"]
    assert all(torch.equal(result.perms[g], invert_perms(perms)[g]) for g in spec.groups)


def test_weight_matching_is_seeded_and_takes_modules_or_state_dicts():
    """Modules and parameter dicts give the permutations and objective of the from-scratch numpy descent
    with the same seed (which orders the visits); two seeds, on the GroupNorm ResNet20."""
    a, _ = build("resnet20_ln", seed=0, dtype=torch.float64)
    b, _ = build("resnet20_ln", seed=1, dtype=torch.float64)
    spec = trace(a, torch.randn(2, 3, 16, 16, dtype=torch.float64))
    run = get_method("weight")
    for seed in (3, 4):
        want, values = numpy_weight_matching(spec, dict(a.named_parameters()), dict(b.named_parameters()), seed=seed)
        for args in ((a, b), (dict(a.named_parameters()), dict(b.named_parameters()))):
            result = run(spec, *args, seed=seed)
            assert {g: p.numpy().tolist() for g, p in result.perms.items()} == {g: p.tolist() for g, p in want.items()}
            np.testing.assert_allclose(result.record["objective"], values, rtol=1e-10)


def numpy_weight_matching(spec, sd_a, sd_b, seed, max_iter=100):
    """Git Re-Basin Alg. 1 from scratch in numpy/scipy: every score and objective recomputed in full.

    A group moves to the assignment of its score when the whole objective rises by more than 1e-12
    (relative); the visiting order is torch.randperm of a generator seeded with `seed`, each sweep.
    """
    from scipy.optimize import linear_sum_assignment

    a = {k: v.detach().double().numpy() for k, v in sd_a.items()}
    b = {k: v.detach().double().numpy() for k, v in sd_b.items()}
    axes = {}
    for g in spec.groups.values():
        for m in g.members:
            if m.key in a:  # buffers (running statistics) are not matched
                axes.setdefault(m.key, []).append((m.axis, g.name, m.block))

    def permuted(key, perms, skip=None):  # B[key] with every permuted axis but `skip` re-indexed
        t = b[key]
        for ax, g, block in axes[key]:
            if ax != skip:
                t = np.take(t, (perms[g][:, None] * block + np.arange(block)).reshape(-1), axis=ax)
        return t

    def objective(perms):
        return sum(float((a[k] * permuted(k, perms)).sum()) for k in axes)

    perms = {name: np.arange(g.size) for name, g in spec.groups.items()}
    names, gen, values = list(spec.groups), torch.Generator().manual_seed(seed), [objective(perms)]
    for _ in range(max_iter):
        changed = False
        for i in torch.randperm(len(names), generator=gen).tolist():
            g = spec.groups[names[i]]
            score = sum(np.moveaxis(a[m.key], m.axis, 0).reshape(g.size, -1) @ np.moveaxis(permuted(m.key, perms, m.axis), m.axis, 0).reshape(g.size, -1).T
                        for m in g.members if m.key in a)  # fmt: skip
            rows, cols = linear_sum_assignment(score, maximize=True)
            new = {**perms, g.name: cols[np.argsort(rows)]}
            old_value = score[np.arange(g.size), perms[g.name]].sum()
            if objective(new) - objective(perms) > 1e-12 * max(1.0, abs(old_value)):
                perms, changed = new, True
        values.append(objective(perms))
        if not changed:
            break
    return perms, values


def tangled_state_dict(seed, dtype=torch.float64):
    """Tensors whose groups meet every case: two groups per tensor, a group on two axes of one tensor,
    three groups on one tensor, units owning blocks of 2 indices, and a tensor no other group permutes."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w1": (6, 5), "b1": (6,), "w2": (5, 6), "r": (5, 5), "t": (4, 5, 6), "w3": (3, 10), "v": (4, 7)}
    sd = {k: torch.randn(*s, generator=gen, dtype=dtype) for k, s in shapes.items()}
    groups = {
        "g1": [("w1", 0), ("b1", 0), ("w2", 1), ("t", 2)],
        "g2": [("w2", 0), ("r", 0), ("r", 1), ("t", 1), ("w3", 1, 2)],
        "g3": [("t", 0), ("v", 0)],
    }
    return from_groups(groups, sd), sd


@pytest.mark.parametrize("case", ["resnet20_bn", "vgg_bn", "tangled"])
def test_weight_matching_follows_a_from_scratch_numpy_descent(case):
    """Cached scores and skipped solves give the from-scratch algorithm's permutations and objective (float64)."""
    if case == "tangled":
        spec, sd_a = tangled_state_dict(0)
        _, sd_b = tangled_state_dict(1)
    else:
        a, shape = build(case, seed=0, dtype=torch.float64)
        b, _ = build(case, seed=1, dtype=torch.float64)
        spec = trace(a, torch.randn(2, *shape, dtype=torch.float64))
        sd_a, sd_b = dict(a.named_parameters()), dict(b.named_parameters())
    want, values = numpy_weight_matching(spec, sd_a, sd_b, seed=5)
    result = get_method("weight")(spec, sd_a, sd_b, seed=5)
    assert len(values) > 3, "the descent should take several sweeps"
    assert {g: p.numpy().tolist() for g, p in result.perms.items()} == {g: p.tolist() for g, p in want.items()}
    np.testing.assert_allclose(result.record["objective"], values, rtol=1e-10)
    assert result.record["solves"] < len(spec.groups) * result.record["iterations"]  # unchanged scores are not solved


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_weight_matching_recovers_a_permuted_tangled_state_dict(dtype):
    spec, sd = tangled_state_dict(0, dtype)
    perms = random_perms(spec, seed=3)
    result = get_method("weight")(spec, sd, apply_perms(spec, perms, sd))
    assert all(torch.equal(result.perms[g], invert_perms(perms)[g]) for g in spec.groups)


@pytest.mark.parametrize("name", list(MODELS))
def test_weight_matching_recovers_the_inverse_permutation_in_float64(name):
    a, shape = build(name, seed=0, dtype=torch.float64)
    spec = trace(a, torch.randn(2, *shape, dtype=torch.float64))
    perms = random_perms(spec, seed=7)
    result = get_method("weight")(spec, a, permute_model(a, spec, perms), seed=1)
    wrong = [g for g in spec.groups if not torch.equal(result.perms[g], invert_perms(perms)[g])]
    assert not wrong, f"weight matching on float64 {name}: wrong permutation for groups {wrong}"


# --- real data: two MLPs trained from different seeds on MNIST ------------------------------------------


def train_mlp(seed, x, y):
    return train_mnist_mlp(seed, x, y, width=64, depth=3, epochs=3)


@pytest.mark.slow
def test_alignment_lowers_the_midpoint_loss_of_mnist_mlps():
    x, y = mnist_tensors(5000)
    x_test, y_test = mnist_tensors(2000, train=False)
    a, b = train_mlp(0, x, y), train_mlp(1, x, y)
    loader = list(zip(x.split(500), y.split(500)))
    losses = {"none": midpoint_loss(a, b, x_test, y_test)}
    for method in ("activation", "weight"):
        aligned, result = align(a, b, method, loader)
        losses[method] = midpoint_loss(a, aligned, x_test, y_test)
    refined, annealed = align(a, b, "annealing", loader, init=result, budget=300, max_examples=500, progress=False)
    losses["weight+annealing"] = midpoint_loss(a, refined, x_test, y_test)
    spec = trace(a, x[:2])
    recomputed = numpy_mlp_barrier(a, b, spec, annealed.perms, x[:500], y[:500])  # the held-out batch: the first 500
    assert annealed.record["objective"][1] == pytest.approx(recomputed, abs=1e-4)
    with torch.no_grad():
        endpoints = [F.cross_entropy(m(x_test), y_test).item() for m in (a, b)]
    print(f"\nMNIST MLP 784-64-64-10, test loss: endpoints {endpoints}, midpoints {losses}")
    assert max(endpoints) < 0.5, "the endpoint networks did not train"
    assert losses["activation"] < losses["none"] and losses["weight"] < losses["none"]
    assert math.isfinite(losses["none"])


STRUCTURED = ["fused_attention", "explicit_attention", "torch_mha", "gqa_rope", "grouped_conv", "depth_multiplier",
              "group_norm", "rel_pos_bias", "channel_shuffle", "concat"]


@pytest.mark.parametrize("method", ["activation", "weight"])
@pytest.mark.parametrize("name", STRUCTURED)
def test_structured_permutations_are_recovered_exactly(name, method):
    """Issue 13/15: a random permutation of every group (attention heads shuffled and permuted inside,
    grouped-query heads, conv groups, concatenated parts) is undone exactly, respecting the structure."""
    from onebasin.permute import check_perms
    from rule_models import RULE_MODELS

    factory, shape, _ = RULE_MODELS[name]
    torch.manual_seed(0)
    a = factory().double().eval()
    x = shape(torch.float64) if callable(shape) else torch.randn(*shape, dtype=torch.float64)
    data = [x, shape(torch.float64) if callable(shape) else torch.randn(*shape, dtype=torch.float64)]
    spec = trace(a, x)
    perms = random_perms(spec, seed=11)
    b = permute_model(a, spec, perms)
    _, result = align(a, b, method, data, spec=spec)
    check_perms(spec, result.perms)
    want = invert_perms(perms)
    wrong = [g for g in spec.groups if not torch.equal(result.perms[g], want[g])]
    assert not wrong, f"{method} did not recover {wrong}"


@pytest.mark.usefixtures("float64_statistics")
def test_statistics_in_row_slices_equal_whole_batches():
    """Activation matching's paired sums with a memory budget of a few rows (every batch run in slices)
    give the means, variances and cross-covariances of numpy on A's and B's hooked activations (float64,
    1e-10), and the slices really happen (3 rows at a time)."""
    from onebasin.align.activation import site_moments
    from onebasin.stats import rows_per_slice

    torch.manual_seed(0)
    a, b = ResNet20ish("bn").double().eval(), ResNet20ish("bn").double().eval()
    data = [torch.randn(20, 3, 8, 8, dtype=torch.float64) for _ in range(2)]
    spec = trace(a, data[0])
    sites = [s for g in spec.groups.values() for s in g.sites]
    per_row = 2 * 8 * sum(torch.Size(spec.graph.node(n).meta["val"].shape[1:]).numel() for n in {s.node for s in sites})
    assert rows_per_slice(spec.graph, sites, 3 * per_row) == 3
    sliced, n = site_moments(spec, a, b, data, max_examples=None, max_memory=3 * per_row)
    assert n == 40
    x = torch.cat(data)
    values_a, values_b = hooked_site_values(a, spec, x), hooked_site_values(b, spec, x)
    for g in spec.groups.values():
        for s, m in zip(g.sites, sliced[g.name]):
            ua, ub = (np.moveaxis(v[s.node].numpy(), s.dim, -1).reshape(-1, v[s.node].shape[s.dim]) for v in (values_a, values_b))
            assert m.n == len(ua)
            np.testing.assert_allclose(m.mean_x.numpy(), ua.mean(0), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(m.var_y.numpy(), ub.var(0), rtol=1e-10, atol=1e-12)
            cov = (ua - ua.mean(0)).T @ (ub - ub.mean(0)) / len(ua)
            np.testing.assert_allclose(m.cov_xy.numpy(), cov, rtol=1e-10, atol=1e-12)


class KeywordMLP(nn.Module):
    """Called like a Hugging Face model: model(inputs_embeds=..., attention_mask=...)."""

    def __init__(self, width=8):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, width), nn.Linear(width, width), nn.Linear(width, 3)

    def forward(self, inputs_embeds, attention_mask):
        h = torch.relu(self.fc1(inputs_embeds * attention_mask[..., None]))
        return self.fc3(torch.relu(self.fc2(h)))


def test_functional_matching_takes_keyword_inputs():
    """Dict batches (keyword inputs) feed the layer-input moments; a permuted copy is recovered."""
    torch.manual_seed(0)
    a, gen = KeywordMLP(), torch.Generator().manual_seed(1)
    data = [{"inputs_embeds": torch.randn(4, 5, 6, generator=gen), "attention_mask": torch.ones(4, 5)} for _ in range(3)]
    spec = trace(a, data[0])
    perms = random_perms(spec, seed=3)
    b = permute_model(a, spec, perms)
    result = get_method("functional")(spec, a, b, data)
    assert result.record["examples"] == 12
    assert set(result.perms) == {"fc1", "fc2"}
    assert all(torch.equal(result.perms[g], p) for g, p in invert_perms(perms).items())


class EmbeddingMLP(nn.Module):
    """Token ids -> embedding -> MLP: the embedding's units are produced by no Linear/Conv."""

    def __init__(self, vocab=11, width=8):
        super().__init__()
        self.embed, self.fc1, self.fc2 = nn.Embedding(vocab, 6), nn.Linear(6, width), nn.Linear(width, 3)

    def forward(self, input_ids):
        return self.fc2(torch.relu(self.fc1(self.embed(input_ids))))


def test_functional_matching_aligns_groups_without_layers_before_the_layers_they_feed():
    """The embedding group (matched by weight matching) is matched first, so fc1's costs see aligned inputs and
    a permuted copy is recovered (it was matched last: fc1 was paired on unaligned inputs)."""
    torch.manual_seed(0)
    a, gen = EmbeddingMLP(), torch.Generator().manual_seed(1)
    data = [torch.randint(0, 11, (4, 5), generator=gen) for _ in range(3)]
    spec = trace(a, data[0])
    perms = random_perms(spec, seed=3)
    result = get_method("functional")(spec, a, permute_model(a, spec, perms), data)
    assert result.record["weight_fallback"] == ["embed"]
    assert all(torch.equal(result.perms[g], p) for g, p in invert_perms(perms).items())
