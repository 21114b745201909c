"""Statistics at scale (issue 26): precision="float32" (shifted float32 blocks into float64 sums) against numpy
float64 on the raw values and against precision="float64"; sums under a memory budget (several passes); and
site ownership under torch.distributed (each rank holds part of the sums)."""

import numpy as np
import pytest
import torch

from onebasin.align import get_method
from onebasin.align._registry import matched
from onebasin.align.activation import correlation_matrix, site_moments
from onebasin.spec import Site, trace
from onebasin.stats import Moments
from conftest import gloo_results
from reference_models import TinyTransformer, reference_models


def offset_data(n=4000, p=6, q=5, offset=1000.0, seed=0):
    """x (n, p) and y (n, q) float32 with means ~offset and stds ~0.1-1: float32 sums of raw squares lose
    every digit of their variances here (offset^2 / var ~ 1e8 > 1 / float32 eps)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g) * torch.linspace(0.1, 1, p) + offset
    y = 0.5 * (x[:, :q] - offset) + 0.3 * torch.randn(n, q, generator=g) - offset
    return x, y


def test_float32_moments_equal_numpy_float64_on_offset_data():
    x, y = offset_data()
    m = Moments(paired=True, precision="float32")
    for i in range(0, len(x), 500):
        m.update(x[i:i + 500], y[i:i + 500])
    xd, yd = x.double().numpy(), y.double().numpy()
    np.testing.assert_allclose(m.mean_x.numpy(), xd.mean(0), rtol=1e-9)
    np.testing.assert_allclose(m.var_x.numpy(), xd.var(0), rtol=1e-5)
    np.testing.assert_allclose(m.cov_xy.numpy(), np.cov(xd.T, yd.T, bias=True)[:6, 6:], atol=1e-5 * xd.std(0).max() ** 2)
    np.testing.assert_allclose(m.corr_xy().numpy(), np.corrcoef(xd.T, yd.T)[:6, 6:], atol=1e-5)
    naive = Moments(paired=True)  # the same float32 values summed as float32 without a shift: for contrast
    naive.sums = {"x": x.sum(0).double(), "xx": (x * x).sum(0).double()}
    naive.n = len(x)
    assert np.abs(naive.var_x.numpy() - xd.var(0)).max() > 100 * np.abs(m.var_x.numpy() - xd.var(0)).max()


def test_float32_site_sums_of_conv_and_token_maps_equal_numpy():
    """update_pair / update_units on a conv map (units on axis 1) and a token matrix (units last), float32."""
    g = torch.Generator().manual_seed(1)
    for t, site in [(torch.randn(16, 5, 6, 6, generator=g) * 0.2 + 50, Site(None, 1)),
                    (torch.randn(16, 7, 8, generator=g) * 0.5 - 30, Site(None, 2))]:
        other = t.flip(0) * 2 + 1
        ref_a = np.moveaxis(t.double().numpy(), site.dim, -1).reshape(-1, t.shape[site.dim])
        ref_b = np.moveaxis(other.double().numpy(), site.dim, -1).reshape(ref_a.shape)
        paired, single = Moments(paired=True, precision="float32"), Moments(precision="float32")
        for i in range(0, 16, 4):
            paired.update_pair(t[i:i + 4], other[i:i + 4], site)
            single.update_units(t[i:i + 4], site)
        np.testing.assert_allclose(paired.corr_xy().numpy(), np.corrcoef(ref_a.T, ref_b.T)[:ref_a.shape[1], ref_a.shape[1]:], atol=1e-5)
        np.testing.assert_allclose(single.var_x.numpy(), ref_a.var(0), rtol=1e-5)
        np.testing.assert_allclose(single.mean_x.numpy(), ref_a.mean(0), rtol=1e-9)
        diag = Moments(paired=True, precision="float32")
        diag.update_pair(t, other, site, cross="diag")
        ref_cov = ((ref_a - ref_a.mean(0)) * (ref_b - ref_b.mean(0))).mean(0)
        np.testing.assert_allclose(diag.cov_xy_diag.numpy(), ref_cov, rtol=1e-5, atol=1e-7)


def test_float32_sums_of_centred_token_maps_read_the_activation_in_place_and_equal_numpy():
    """Units whose first-rows |mean| <= std take a zero shift: their float32 token matrices (units last, fused
    projections' slices included) are summed without a copy. The sums equal numpy float64 on the raw values and
    the activations are left as they were (squares are never taken in place on them). A site with one unit
    whose mean exceeds its std keeps the shifted copy."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(24, 7, 12, generator=g) * torch.linspace(0.5, 2, 12) + torch.linspace(-0.4, 0.4, 12)
    other = torch.randn(24, 7, 12, generator=g) + 0.3 * qkv
    for site in (Site(None, 2), Site(None, 2, start=4, size=4)):  # whole tensor; the middle third (a fused projection's k)
        cols = slice(site.start or 0, (site.start or 0) + (site.size or 12))
        ref_a, ref_b = (t[..., cols].double().reshape(-1, cols.stop - cols.start).numpy() for t in (qkv, other))
        before = (qkv.clone(), other.clone())
        paired, single, diag = Moments(paired=True, precision="float32"), Moments(precision="float32"), Moments(paired=True, precision="float32")
        for i in range(0, 24, 8):
            paired.update_pair(qkv[i:i + 8], other[i:i + 8], site)
            single.update_units(qkv[i:i + 8], site)
            diag.update_pair(qkv[i:i + 8], other[i:i + 8], site, cross="diag")
        assert not paired.shift["x"].any() and not paired.shift["y"].any() and not single.shift["x"].any()
        assert torch.equal(qkv, before[0]) and torch.equal(other, before[1])
        p = ref_a.shape[1]
        np.testing.assert_allclose(paired.corr_xy().numpy(), np.corrcoef(ref_a.T, ref_b.T)[:p, p:], atol=1e-6)
        np.testing.assert_allclose(single.var_x.numpy(), ref_a.var(0), rtol=1e-6)
        np.testing.assert_allclose(single.mean_x.numpy(), ref_a.mean(0), rtol=1e-6, atol=1e-7)
        ref_cov = ((ref_a - ref_a.mean(0)) * (ref_b - ref_b.mean(0))).mean(0)
        np.testing.assert_allclose(diag.cov_xy_diag.numpy(), ref_cov, rtol=1e-5, atol=1e-7)
    offset = qkv.clone()
    offset[..., 5] += 10.0  # one unit's mean is ten times its std
    m = Moments(paired=True, precision="float32")
    m.update_pair(offset, other, Site(None, 2))
    assert m.shift["x"][5] > 9 and not m.shift["y"].any()


def test_float32_sums_of_centred_conv_maps_read_by_position_equal_numpy(monkeypatch):
    """Conv maps (N, C, H, W) with a zero shift and at least as many positions as units are read where they lie,
    as (batch, units, positions) blocks with per-example products (`sums._by_position`); a fused slice of the
    channels too. Sums, variances and correlations equal numpy float64 on the raw values over several blocks,
    and the maps are unchanged. A map with fewer positions than units (and one needing a shift) takes the copy."""
    from onebasin import sums

    monkeypatch.setattr(sums, "_BLOCK_BYTES", 4000)  # several blocks per batch
    g = torch.Generator().manual_seed(5)
    for shape, site, by_position in (((12, 6, 5, 4), Site(None, 1), True),
                                     ((12, 6, 5, 4), Site(None, 1, start=1, size=4), True),
                                     ((12, 8, 2, 2), Site(None, 1), False)):
        a = torch.randn(*shape, generator=g) * torch.linspace(0.5, 2, shape[1]).view(-1, 1, 1)
        b = torch.randn(*shape, generator=g) - 0.5 * a
        before = (a.clone(), b.clone())
        assert sums._by_position((a, b), site, torch.float32, (None, None)) is by_position
        paired, single, diag = Moments(paired=True, precision="float32"), Moments(precision="float32"), Moments(paired=True, precision="float32")
        for i in range(0, shape[0], 4):
            paired.update_pair(a[i:i + 4], b[i:i + 4], site)
            single.update_units(a[i:i + 4], site)
            diag.update_pair(a[i:i + 4], b[i:i + 4], site, cross="diag")
        assert not paired.shift["x"].any() and not paired.shift["y"].any()
        assert torch.equal(a, before[0]) and torch.equal(b, before[1])
        units = slice(site.start or 0, (site.start or 0) + (site.size or shape[1]))
        ref_a, ref_b = (np.moveaxis(t[:, units].double().numpy(), 1, -1).reshape(-1, units.stop - units.start) for t in (a, b))
        p = ref_a.shape[1]
        assert paired.n == single.n == ref_a.shape[0]
        np.testing.assert_allclose(paired.corr_xy().numpy(), np.corrcoef(ref_a.T, ref_b.T)[:p, p:], atol=1e-6)
        np.testing.assert_allclose(single.var_x.numpy(), ref_a.var(0), rtol=1e-6)
        np.testing.assert_allclose(single.mean_x.numpy(), ref_a.mean(0), rtol=1e-5, atol=1e-7)
        ref_cov = ((ref_a - ref_a.mean(0)) * (ref_b - ref_b.mean(0))).mean(0)
        np.testing.assert_allclose(diag.cov_xy_diag.numpy(), ref_cov, rtol=1e-5, atol=1e-7)
    offset = torch.randn(4, 6, 5, 4, generator=g) + 10.0  # every mean ten times its std: a shifted copy
    m = Moments(paired=True, precision="float32")
    m.update_pair(offset, offset.flip(0), Site(None, 1))
    assert m.shift["x"].min() > 9
    np.testing.assert_allclose(m.corr_xy().numpy(), np.corrcoef(np.moveaxis(offset.double().numpy(), 1, -1).reshape(-1, 6).T,
                                                               np.moveaxis(offset.flip(0).double().numpy(), 1, -1).reshape(-1, 6).T)[:6, 6:], atol=1e-5)


def test_rebase_keeps_every_statistic():
    """Re-expressing shifted sums about another shift (what all_reduce_ does across ranks) changes no statistic,
    also the covariances between models of joint sums (`Moments.update_joint`)."""
    x, y = offset_data(n=1000)
    for full in (False, True):
        m = Moments(full=full, paired=not full, precision="float32")
        for i in range(0, 1000, 250):
            m.update(x[i:i + 250], y[i:i + 250] if not full else None)
        before = {k: getattr(m, k).clone() for k in ("mean_x", "var_x")}
        before |= {"cov": (m.cov_x if full else m.cov_xy).clone()}
        if full:
            before["second"] = m.second_moment_x.clone()
        new = {k: v + torch.randn(v.shape, dtype=torch.float64) for k, v in m.shift.items()}
        m.rebase_(new)
        assert all(torch.equal(m.shift[k], new[k].float().double()) for k in new)  # rounded to float32
        after = {"mean_x": m.mean_x, "var_x": m.var_x, "cov": m.cov_x if full else m.cov_xy}
        if full:
            after["second"] = m.second_moment_x
        for k, v in before.items():
            torch.testing.assert_close(after[k], v, rtol=1e-9, atol=1e-9)
    joint = Moments(models=3, precision="float32")  # three models' units side by side, with cross sums between them
    for i in range(0, 1000, 250):
        joint.update_joint([x[i:i + 250, :5], y[i:i + 250], x[i:i + 250, 1:]], Site(None, 1))
    from onebasin.align.many import _blocks

    before = _blocks(joint, 3)
    joint.rebase_({"x": joint.shift["x"] + torch.randn(15, dtype=torch.float64)})
    for b, a in zip(before, _blocks(joint, 3)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    full = Moments(full=True, precision="float32")
    full.update(x)
    np.testing.assert_allclose(full.second_moment_x.numpy(), x.double().numpy().T @ x.double().numpy() / len(x), rtol=1e-6)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="float32, float64"):
        Moments(precision="float16")


def pair(name):
    """Two differently seeded float32 models of reference model `name` and 6 batches of inputs."""
    if name == "transformer":
        factory, shape = TinyTransformer, (8, 4, 6)
    else:
        factory, shape = reference_models()[name]
        shape = (8, *shape[1:])
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(factory().eval())
    g = torch.Generator().manual_seed(2)
    return models, [torch.randn(*shape, generator=g) for _ in range(6)]


@pytest.mark.parametrize("name", ["mlp", "vgg_bn", "resnet20_bn", "resnet20_ln", "conv_ln_chw", "transformer"])
def test_float32_activation_matching_gives_float64_permutations(name):
    """The same permutations at both precisions, except exact ties: where a group's permutations differ, both
    must reach the same float64 objective to within the float32 statistics' error (1e-5 per unit); that is
    how a tie is detected. The correlations themselves agree to 1e-5."""
    (a, b), data = pair(name)
    spec = trace(a, data[0])
    m64, _ = site_moments(spec, a, b, data)
    m32, _ = site_moments(spec, a, b, data, precision="float32")
    for g in m64:
        c64, c32 = correlation_matrix(m64[g]), correlation_matrix(m32[g])
        assert (c64 - c32).abs().max() < 1e-5 * len(m64[g])
    p64 = get_method("activation")(spec, a, b, data).perms
    p32 = get_method("activation")(spec, a, b, data, precision="float32").perms
    for g in p64:
        if torch.equal(p64[g], p32[g]):
            continue
        corr = correlation_matrix(m64[g]) if g in m64 else None
        assert corr is not None, f"group {g} (no sites) differs"
        assert abs(matched(corr, p64[g]) - matched(corr, p32[g])) < 1e-5 * len(p64[g]) * len(m64[g])


def sharded_stats_of(counts) -> dict:
    return {n: sharded_stats(n) for n in counts}


def sharded_stats(n_batches: int) -> dict:
    """Float32 paired moments over batches 0..n_batches-1 (rank r of w reads batches r, r+w, ...), all-reduced."""
    from onebasin.distributed import distributed

    x, y = offset_data(n=700)
    data = [(torch.cat([x[i:i + 100], y[i:i + 100]], 1),) for i in range(0, 700, 100)][:n_batches]
    m = Moments(paired=True, precision="float32")
    rank, world = distributed()
    for i, (xy,) in enumerate(data):
        if i % world == rank:
            m.update(xy[:, :6], xy[:, 6:])
    m.all_reduce_()
    return {"n": m.n, "mean": m.mean_x, "var": m.var_x, "cov": m.cov_xy, "corr": m.corr_xy()}


@pytest.mark.slow
def test_float32_sums_of_two_gloo_processes_equal_one_process():
    """Each rank shifts by its own first batch; all_reduce_ re-bases them on one shift: the statistics equal one
    process's to float32 accuracy, with uneven shards (7 batches) and with a rank that saw no batch (1)."""
    ranks = gloo_results(sharded_stats_of, (1, 7))
    for r, n_batches in [(r, n) for r in range(2) for n in (1, 7)]:
        single = sharded_stats(n_batches)
        got = ranks[r][n_batches]
        assert got["n"] == single["n"] == 100 * n_batches
        torch.testing.assert_close(got["mean"], single["mean"], rtol=1e-9, atol=0)
        for k in ("var", "cov", "corr"):
            torch.testing.assert_close(got[k], single[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "resnet20_bn", "conv_ln_chw"])
def test_float32_repair_hits_goals_within_1e5(name, monkeypatch):
    """Exact REPAIR of a float32 network with float32 statistics: the corrected activations (read from the
    RepairAffine modules with hooks, numpy float64 statistics) are within 1e-5 (relative to each unit's goal
    std) of the goals computed by numpy from A's and B's hooked activations."""
    from onebasin.repair import repair
    from test_repair import MODELS, corrected_values, numpy_stats
    from conftest import hooked_site_values
    from reference_models import randomize_norm_stats

    factory, shape = MODELS[name][:2]
    ends = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ends.append(randomize_norm_stats(factory().eval()))
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(32, *shape, generator=g) * 0.5 + 3 for _ in range(4)]  # means far from 0
    a, b = ends
    spec = trace(a, data[0])
    seen = []
    update = Moments.update_units
    with monkeypatch.context() as mp:  # which precision the sums were taken in
        mp.setattr(Moments, "update_units", lambda self, *args: (seen.append(self.dtype), update(self, *args)))
        result = repair(a, b, 0.4, data, spec=spec, fuse=False, precision="float32")
    assert seen and set(seen) == {torch.float32}
    sites = [s.site for s in result.stats]
    x = torch.cat(data)
    ref_a, ref_b = numpy_stats(hooked_site_values(a, spec, x), sites), numpy_stats(hooked_site_values(b, spec, x), sites)
    got = numpy_stats({k: v.double() for k, v in corrected_values(result.model, data).items()}, sites)
    for s in sites:
        (ma, sa), (mb, sb), (m, sd) = ref_a[s.node], ref_b[s.node], got[s.node]
        goal_std = 0.6 * sa + 0.4 * sb
        unit = np.maximum(goal_std, 1e-12)
        assert (np.abs(m - (0.6 * ma + 0.4 * mb)) / unit).max() < 1e-5, s.node
        assert (np.abs(sd - goal_std) / unit).max() < 1e-5, s.node


def test_statistics_precision_sets_the_default_of_moments_made_inside():
    from onebasin.stats import statistics_precision

    x, _ = offset_data(n=200)
    assert Moments().precision == "float32"  # the default (issue 26)
    with statistics_precision("float64"):
        assert Moments().precision == "float64"
        with statistics_precision(None):  # None: unchanged
            assert Moments().precision == "float64"
        with statistics_precision("float32"):
            inner = Moments()
        assert Moments(precision="float32").precision == "float32"  # an explicit precision wins
    assert Moments().precision == "float32"
    inner.update(x)
    assert inner.sums["x"].dtype == torch.float64 and set(inner.shift) == {"x"}  # float64 sums of shifted float32 blocks
    with pytest.raises(ValueError, match="valid: float32, float64"):
        with statistics_precision("half"):
            pass


@pytest.mark.usefixtures("float64_statistics")
@pytest.mark.parametrize("name", ["resnet20_bn", "transformer"])
def test_statistics_under_a_quarter_budget_equal_one_pass(name):
    """Activation matching whose float64 sums may take a quarter of their total: several passes over the data
    (each holding whole families of groups), the same permutations, objectives and REPAIR goals as one pass."""
    from onebasin.align.activation import statistics_passes

    (a, b), data = pair(name)
    a, b, data = a.double(), b.double(), [x.double() for x in data]
    spec = trace(a, data[0])
    whole = sum(8 * len(g.sites) * (g.size ** 2 + 4 * g.size) for g in spec.groups.values() if g.sites)
    one = get_method("activation")(spec, a, b, data, max_memory=None)
    split = get_method("activation")(spec, a, b, data, max_memory=whole // 4)
    assert one.record["statistics_passes"] == 1
    assert split.record["statistics_passes"] == len(statistics_passes(spec, whole // 4)) >= 3
    for g in one.perms:
        assert torch.equal(one.perms[g], split.perms[g]), g
    for g, value in one.record["objective"].items():
        assert abs(value - split.record["objective"][g]) < 1e-10
    for key in ("site_stats", "plain_site_stats"):
        for g, rows in getattr(one, key).items():
            for r1, r2 in zip(rows, getattr(split, key)[g]):
                for k in r1:
                    torch.testing.assert_close(r1[k], r2[k], rtol=1e-10, atol=1e-10)
    from onebasin.align._structured import family_root

    tiny = statistics_passes(spec, 1)  # a budget below every family: one pass per family (heads with their groups)
    assert sorted(g for p in tiny for g in p) == sorted(g.name for g in spec.groups.values() if g.sites)
    assert [len({family_root(spec, g) for g in p}) for p in tiny] == [1] * len(tiny)
    roots = [family_root(spec, g) for p in tiny for g in p[:1]]
    assert len(roots) == len(set(roots))  # no family split across passes


def test_entry_points_take_precision(monkeypatch):
    """align(..., precision=) reaches the method's statistics (float64 sums when asked; float32, the default,
    otherwise), and both give the same permutations on a model without ties; the default is restored afterwards."""
    from onebasin.align import align

    (a, b), data = pair("mlp")
    seen = []
    update = Moments.update_pair
    monkeypatch.setattr(Moments, "update_pair", lambda self, *args, **kw: (seen.append(self.dtype), update(self, *args, **kw)))
    _, r64 = align(a, b, "activation", data, precision="float64")
    assert seen and set(seen) == {torch.float64}
    seen.clear()
    _, r32 = align(a, b, "activation", data)
    assert seen and set(seen) == {torch.float32}
    assert all(torch.equal(r32.perms[g], r64.perms[g]) for g in r64.perms)
    with pytest.raises(ValueError, match="unknown precision 'float16'"):
        align(a, b, "activation", data, precision="float16")


OWNERSHIP_CASES = [("resnet20_bn", "float64", 7), ("resnet20_bn", "float64", 1), ("resnet20_bn", "float32", 5),
                   ("transformer", "float32", 5)]


def owned_alignments() -> dict:
    return {key: owned_alignment(*key) for key in OWNERSHIP_CASES}


def owned_alignment(name: str, precision: str, n_batches: int) -> dict:
    """Activation matching (perms, objectives, REPAIR goals, bytes of sums held) on the first n_batches."""
    (a, b), data = pair(name)
    if precision == "float64":
        a, b, data = a.double(), b.double(), [x.double() for x in data]
    g = torch.Generator().manual_seed(3)
    data = (data + [x + 0.1 * torch.randn(x.shape, generator=g, dtype=x.dtype) for x in data])[:n_batches]
    r = get_method("activation")(trace(a, data[0]), a, b, data, precision=precision)
    return {"perms": r.perms, "objective": r.record["objective"], "examples": r.record["examples"],
            "bytes": r.record["statistics_bytes"], "site_stats": r.site_stats, "plain": r.plain_site_stats}


@pytest.mark.slow
def test_site_ownership_under_two_gloo_processes_equals_one_process():
    """Two gloo ranks, each holding the sums of the families it owns (partial sums reduced to the owner per
    row slice): the permutations equal one process's, objectives and REPAIR goals agree to 1e-10 (float64)
    or 1e-6 (float32), and each rank holds at most 0.6x the bytes of sums one process holds (ResNet; measured as
    the bytes of the sums each rank held, plus its largest per-slice buffer); also with uneven shards and with a
    rank that reads no batch, and for a transformer's structured families."""
    ranks = gloo_results(owned_alignments)
    for key in OWNERSHIP_CASES:
        one = owned_alignment(*key)
        tol = 1e-10 if key[1] == "float64" else 1e-6
        for got in (r[key] for r in ranks):
            assert got["examples"] == one["examples"]
            assert got["perms"].keys() == one["perms"].keys()
            assert all(torch.equal(got["perms"][g], p) for g, p in one["perms"].items()), key
            assert all(abs(got["objective"][g] - v) < tol for g, v in one["objective"].items()), key
            for k in ("site_stats", "plain"):
                for g, rows in one[k].items():
                    for r1, r2 in zip(rows, got[k][g]):
                        for name in r1:
                            torch.testing.assert_close(r2[name], r1[name].cpu(), rtol=tol, atol=tol)
            if key[0] != "transformer":  # its residual-stream family alone holds 2/3 of the sums: no even split
                assert got["bytes"] < 0.6 * one["bytes"], (key, got["bytes"], one["bytes"])


def test_merge_compare_and_the_cli_take_precision(tmp_path, monkeypatch, capsys):
    """merge(precision="float64") and `onebasin merge --precision float64` take float64 sums (seen in the
    statistics), the default float32 sums, with the same permutations on a model without ties; compare records
    the precision."""
    from cli_helpers import checkpoint, run_cli, use_fake_data
    from onebasin.comparison import compare
    from onebasin.pipeline import merge

    (a, b), data = pair("mlp")
    seen = []
    update = Moments.update_pair
    monkeypatch.setattr(Moments, "update_pair", lambda self, *args, **kw: (seen.append(self.dtype), update(self, *args, **kw)))
    _, r64 = merge(a, b, data=data, precision="float64")
    assert set(seen) == {torch.float64}
    seen.clear()
    _, r32 = merge(a, b, data=data)
    assert set(seen) == {torch.float32}
    assert r32.align_record["objective"].keys() == r64.align_record["objective"].keys()
    assert all(abs(r32.align_record["objective"][g] - v) < 1e-5 for g, v in r64.align_record["objective"].items())
    x = torch.cat(data)
    y = torch.zeros(len(x), dtype=torch.long)
    assert compare(a, b, {"test": [(x, y)]}, data, precision="float64", progress=False).settings["precision"] == "float64"
    assert compare(a, b, {"test": [(x, y)]}, data, progress=False).settings["precision"] == "float32"
    use_fake_data(monkeypatch)
    ca, cb = checkpoint(tmp_path / "a.safetensors", seed=0), checkpoint(tmp_path / "b.safetensors", seed=1)
    seen.clear()
    code, _, err = run_cli(["merge", ca, cb, "--precision", "float64", "--out", tmp_path / "m.safetensors"], capsys)
    assert code == 0, err
    assert seen and set(seen) == {torch.float64}
    seen.clear()
    code, _, err = run_cli(["merge", ca, cb, "--out", tmp_path / "d.safetensors"], capsys)
    assert code == 0, err
    assert seen and set(seen) == {torch.float32}
    code, _, err = run_cli(["merge", ca, cb, "--precision", "half", "--out", tmp_path / "n.safetensors"], capsys)
    assert code == 2 and "invalid choice: 'half'" in err


@pytest.mark.slow
def test_float32_permutations_of_trained_mnist_mlps_equal_float64():
    """Two MLPs trained on MNIST from different seeds (real activations: skewed, dead units, large means):
    activation matching with float32 sums gives float64's permutations in every group, the correlations agree
    to 1e-6, and the merged midpoints' test accuracies to 0.05 points."""
    from onebasin.pipeline import merge
    from reference_models import mnist_tensors, train_mnist_mlp

    x, y = mnist_tensors(4000)
    a, b = (train_mnist_mlp(s, x, y, width=64, depth=4, epochs=2) for s in (0, 1))
    data = list(zip(x.split(500), y.split(500)))
    spec = trace(a, x[:2])
    m64, _ = site_moments(spec, a, b, data)
    m32, _ = site_moments(spec, a, b, data, precision="float32")
    for g in m64:
        assert (correlation_matrix(m64[g]) - correlation_matrix(m32[g])).abs().max() < 1e-6
    p64 = get_method("activation")(spec, a, b, data).perms
    p32 = get_method("activation")(spec, a, b, data, precision="float32").perms
    assert all(torch.equal(p64[g], p32[g]) for g in p64)
    x_test, y_test = mnist_tensors(2000, train=False)
    acc = {}
    for p in ("float64", "float32"):
        merged, _ = merge(a, b, data=data, precision=p)
        with torch.no_grad():
            acc[p] = (merged(x_test).argmax(1) == y_test).float().mean().item()
    assert abs(acc["float64"] - acc["float32"]) <= 0.0005


def offset_models(kind: str, n_models: int = 3) -> list:
    """Float32 networks whose one hidden site has means ~1000 and stds ~1 per unit (bias 1000): a Linear (dense)
    or a Conv2d whose positions count as samples (conv)."""
    out = []
    for seed in range(n_models):
        torch.manual_seed(seed)
        if kind == "dense":
            net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        else:
            net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                      torch.nn.Flatten(), torch.nn.Linear(4, 3))
        with torch.no_grad():
            net[0].weight.normal_(0, 1 / net[0].weight[0].numel() ** 0.5)
            net[0].bias.fill_(1000.0)
        out.append(net.eval())
    return out


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_float32_joint_covariances_of_offset_activations_equal_numpy_float64(kind):
    """N-model joint statistics at float32 (shifted float32 blocks and cross sums into float64 sums) against numpy
    float64 on the hooked activations, whose means are ~1000x their stds: every between-model covariance within
    1e-6 of std_i std_j, variances within 1e-6 relative, means within 1e-9 relative."""
    from onebasin.align.many import _blocks
    from onebasin.stats import joint_moments
    from test_merge_many import hooked_units

    models = offset_models(kind)
    g = torch.Generator().manual_seed(4)
    data = [torch.randn(48, 6, generator=g) if kind == "dense" else torch.randn(16, 3, 8, 8, generator=g) for _ in range(6)]
    spec = trace(models[0], data[0])
    sites = [s for grp in spec.groups.values() for s in grp.sites if s.module == "0"]
    assert len(sites) == 1
    (m,), _ = joint_moments(models, sites, data, chunk=20, graph=spec.graph, precision="float32")
    assert set(m.shift) == {"x"} and m.sums["xy0"].dtype == torch.float64
    cov, std = _blocks(m, 3)
    joint = np.concatenate([hooked_units(net, ["0"], data)["0"] for net in models], 1)
    n = joint.shape[1] // 3
    ref, sd = np.cov(joint.T, bias=True), joint.std(0)
    assert (np.abs(joint.mean(0)) > 500 * sd).all()  # the offsets the test is about
    for i, j in [(i, j) for i in range(3) for j in range(3) if i != j]:
        block = ref[i * n:(i + 1) * n, j * n:(j + 1) * n]
        assert (np.abs(cov[i, j].numpy() - block) / np.outer(sd[i * n:(i + 1) * n], sd[j * n:(j + 1) * n])).max() < 1e-6
    np.testing.assert_allclose(std.reshape(-1).numpy() ** 2, sd**2, rtol=1e-6)
    np.testing.assert_allclose(m.mean_x.numpy(), joint.mean(0), rtol=1e-9)


@pytest.mark.parametrize("name", ["mlp", "vgg_bn", "resnet20_bn"])
def test_float32_merge_many_gives_float64_permutations(name):
    """merge_many of 4 models (every combiner, activation alignment) with float32 joint statistics gives the
    permutations of float64, except exact ties. A tie is detected by value: where model i's permutation of a
    group differs, every pair (i, j) must match units whose float64 correlations (`joint_moments` at float64,
    held to numpy in test_merge_many) sum to the same value within the float32 error, 1e-5 per unit and site."""
    import onebasin
    from onebasin.align.many import _blocks, _correlation, list_combiners
    from onebasin.stats import joint_moments
    from test_merge_many import build, data_for

    models, data = [build(name, s) for s in range(4)], data_for(name)
    spec = trace(models[0], data[0])
    for method in list_combiners():
        got = {p: onebasin.merge_many(models, method, "none", data=data, precision=p)[1].perms for p in ("float64", "float32")}
        for i, g in [(i, g) for i in range(4) for g in spec.groups if not torch.equal(got["float64"][i][g], got["float32"][i][g])]:
            sites = spec.groups[g].sites
            assert sites, f"{method}: group {g} (matched by weight) differs"
            moments, _ = joint_moments(models, sites, data, graph=spec.graph, precision="float64")
            corr = sum(_correlation(*_blocks(m, 4)) for m in moments)
            for j in set(range(4)) - {i}:
                value = [corr[i, j][p[i][g], p[j][g]].sum().item() for p in got.values()]
                assert abs(value[0] - value[1]) < 1e-5 * spec.groups[g].size * len(sites), (method, g, i, j)


@pytest.mark.usefixtures("float64_statistics")
def test_joint_statistics_under_a_quarter_budget_equal_one_pass():
    """align_many (3 ResNets, universe) whose joint sums may take a quarter of their total: several passes over
    the data (each reading slices of 1-7 rows, not whole batches of 16: the same budget bounds the tapped
    activations), the same permutations, direct matchings and objectives (1e-10) as one pass; the bytes held in
    one pass are the total of the formula written out here (per site: N(N-1)/2 units^2 cross sums, 2 N units)."""
    from onebasin.align.many import align_many
    from test_merge_many import build, data_for

    models, data = [build("resnet20_bn", s) for s in range(3)], data_for("resnet20_bn")
    spec = trace(models[0], data[0])
    whole = sum(8 * len(g.sites) * (3 * g.size ** 2 + 6 * g.size) for g in spec.groups.values() if g.sites)
    one = align_many(spec, models, "universe", data=data, max_memory=None)
    split = align_many(spec, models, "universe", data=data, max_memory=whole // 4)
    assert one[2]["statistics_passes"] == 1 and one[2]["statistics_bytes"] == whole
    assert split[2]["statistics_passes"] > 1 and split[2]["statistics_bytes"] < whole
    assert split[2]["examples"] == one[2]["examples"] == 64
    assert one[2]["statistics_rows"] == [None]
    assert len(split[2]["statistics_rows"]) == split[2]["statistics_passes"]
    assert all(1 <= rows <= 7 for rows in split[2]["statistics_rows"]), split[2]["statistics_rows"]
    for i in range(3):
        assert all(torch.equal(one[0][i][g], split[0][i][g]) for g in spec.groups), i
    assert all(torch.equal(q, split[1][pair][g]) for pair, qs in one[1].items() for g, q in qs.items())
    for g, value in one[2]["objective"].items():
        assert abs(value - split[2]["objective"][g]) < 1e-10, g


@pytest.mark.usefixtures("float64_statistics")
def test_joint_statistics_of_hooked_sites_under_a_budget_run_in_64_row_slices():
    """align_many with a hand-written spec (sites read by hooks: no shapes to size the slices by) and a memory
    budget runs every model on at most 64 input rows at a time, counted by a hook on each model's input (batches
    of 100 rows; before, whole batches held the N models' activations at every site); no budget: whole batches.
    Both give the same permutations and objectives (1e-10). A graph exported for one batch size keeps whole batches."""
    import dataclasses

    from onebasin.align.many import align_many
    from onebasin.spec import from_groups
    from onebasin.stats import rows_per_slice
    from test_merge_many import build

    models = [build("mlp", s) for s in range(3)]
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(100, 12, generator=gen, dtype=torch.float64) for _ in range(2)]
    layers = {"h0": "1", "h1": "3", "h2": "5"}
    members = {g: [(f"{m}.weight", 0), (f"{m}.bias", 0), (f"{int(m) + 2}.weight", 1)] for g, m in layers.items()}
    spec = from_groups(members, models[0].state_dict(), sites={g: [m] for g, m in layers.items()})
    seen = {}
    for i, m in enumerate(models):
        m.register_forward_pre_hook(lambda _, args, i=i: seen.setdefault(i, []).append(len(args[0])))
    budget = align_many(spec, models, "universe", data=data, max_memory=1 << 30)
    assert all(max(rows) <= 64 and sum(rows) == 200 for rows in seen.values()), seen
    assert budget[2]["statistics_rows"] == [64]
    seen.clear()
    whole = align_many(spec, models, "universe", data=data, max_memory=None)
    assert all(rows == [100, 100] for rows in seen.values()) and whole[2]["statistics_rows"] == [None]
    for i in range(3):
        assert all(torch.equal(whole[0][i][g], budget[0][i][g]) for g in spec.groups), i
    assert all(abs(v - budget[2]["objective"][g]) < 1e-10 for g, v in whole[2]["objective"].items())
    traced = trace(models[0], data[0])
    sites = [s for g in traced.groups.values() for s in g.sites]
    assert rows_per_slice(dataclasses.replace(traced.graph, batch=100), sites, 1, 3, 64) is None


JOINT_CASES = [("float64", 3), ("float64", 1), ("float32", 3)]


def owned_joint_alignments() -> dict:
    return {key: owned_joint_alignment(*key) for key in JOINT_CASES}


def owned_joint_alignment(precision: str, n_batches: int) -> dict:
    """align_many of 3 ResNets (universe) on the first n_batches batches: perms, direct matchings, objectives,
    examples and the bytes of joint sums held."""
    from onebasin.align.many import align_many
    from test_merge_many import build, data_for

    models, data = [build("resnet20_bn", s) for s in range(3)], data_for("resnet20_bn")[:n_batches]
    perms, direct, record = align_many(trace(models[0], data[0]), models, "universe", data=data, precision=precision)
    return {"perms": perms, "direct": direct, "objective": record["objective"], "examples": record["examples"],
            "bytes": record["statistics_bytes"]}


@pytest.mark.slow
def test_joint_site_ownership_under_two_gloo_processes_equals_one_process():
    """align_many under two gloo ranks, each group's joint sums of 3 models held by one rank (partial sums reduced
    to the owner per chunk): the permutations and direct matchings of one process, objectives to 1e-10 (float64)
    or 1e-6 (float32), also with uneven shards (3 batches) and a rank that reads no batch (1); each rank holds
    below 0.6x the bytes of sums one process holds (the owned sums plus its largest per-chunk buffer)."""
    ranks = gloo_results(owned_joint_alignments)
    for key in JOINT_CASES:
        one = owned_joint_alignment(*key)
        tol = 1e-10 if key[0] == "float64" else 1e-6
        for got in (r[key] for r in ranks):
            assert got["examples"] == one["examples"] == 16 * key[1]
            for i, perms in enumerate(one["perms"]):
                assert all(torch.equal(got["perms"][i][g], p) for g, p in perms.items()), (key, i)
            assert all(torch.equal(got["direct"][pair][g], q) for pair, qs in one["direct"].items() for g, q in qs.items())
            assert got["objective"].keys() == one["objective"].keys()
            assert all(abs(got["objective"][g] - v) < tol for g, v in one["objective"].items()), key
            assert got["bytes"] < 0.6 * one["bytes"], (key, got["bytes"], one["bytes"])
