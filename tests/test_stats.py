"""Streaming float64 statistics equal a whole-data numpy reference; taps read sites in one forward."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from onebasin.spec import from_groups, trace
from conftest import CountConvs
from onebasin.distributed import batches
from onebasin.stats import Moments
from onebasin.sums import unit_matrix
from onebasin.taps import SiteTaps
from reference_models import ResNet20ish, mlp

pytestmark = pytest.mark.usefixtures("float64_statistics")  # sums held to numpy at 1e-10: the exact path


def test_moments_equal_whole_data_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 5, generator=gen, dtype=torch.float64) * 3 + 1
    y = x[:, :3] * 0.5 + torch.randn(1000, 3, generator=gen, dtype=torch.float64)
    m = Moments(paired=True)
    for i in range(0, 1000, 77):  # uneven batches
        m.update(x[i : i + 77], y[i : i + 77])
    full = Moments(full=True)
    full.update(x)
    xn, yn = x.numpy(), y.numpy()
    ref_cov = np.cov(xn.T, yn.T, bias=True)[:5, 5:]
    assert np.abs(m.cov_xy.numpy() - ref_cov).max() < 1e-10
    assert np.abs(m.var_x.numpy() - xn.var(0)).max() < 1e-10
    assert np.abs(m.corr_xy().numpy() - np.corrcoef(xn.T, yn.T)[:5, 5:]).max() < 1e-10
    assert np.abs(full.cov_x.numpy() - np.cov(xn.T, bias=True)).max() < 1e-10


def test_constant_units_have_no_correlation():
    """Issue 12 #3: a dead ReLU (exactly 0) or a constant unit whose float64 sums leave a rounding-level variance
    must get correlation 0 with everything, not a huge value from a small epsilon; the other units keep
    numpy's correlations."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(999, 4, generator=gen, dtype=torch.float64)
    y = x[:, :3] + 0.5 * torch.randn(999, 3, generator=gen, dtype=torch.float64)
    x[:, 1] = 0.0  # dead
    y[:, 2] = 0.1  # constant: sum x^2 - (sum x)^2 / n is rounding noise, not 0
    m = Moments(paired=True)
    for i in range(0, 999, 100):
        m.update(x[i : i + 100], y[i : i + 100])
    corr = m.corr_xy().numpy()
    assert (corr[1] == 0).all() and (corr[:, 2] == 0).all()
    live_x, live_y = [0, 2, 3], [0, 1]
    ref = np.corrcoef(x.numpy()[:, live_x].T, y.numpy()[:, live_y].T)[:3, 3:]
    assert np.abs(corr[np.ix_(live_x, live_y)] - ref).max() < 1e-10


def test_unit_matrix_pools_spatial_positions_as_samples():
    t = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    u = unit_matrix(t, 1)
    assert u.shape == (40, 3) and u.dtype == torch.float64
    assert torch.equal(u[:, 1].sort().values, t[:, 1].reshape(-1).double().sort().values)


def test_taps_read_every_site_in_one_forward():
    model = ResNet20ish("bn").double().eval()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    spec = trace(model, x)
    sites = [s for g in spec.groups.values() for s in g.sites]
    assert any(s.kind == "block" for s in sites)
    taps = SiteTaps(model, sites, spec.graph)
    with CountConvs() as convs:
        out, acts = taps(x)
    assert convs.n == sum(isinstance(m, nn.Conv2d) for m in model.modules())  # every layer runs once
    assert torch.allclose(out, model(x))
    # a layer site equals the output of its module read by a plain hook
    seen = {}
    model.blocks[0].n1.register_forward_hook(lambda m, a, o: seen.setdefault("n1", o))
    model(x)
    i = next(i for i, s in enumerate(sites) if s.module == "blocks.0.n1")
    assert torch.equal(acts[i], seen["n1"])


def test_paired_pass_visits_both_networks_values_and_frees_them_as_it_goes():
    """visit_pairs gives visit(k, a, b) the tensors two separate tapped forwards give, once per site (graph sites: in
    the graph's order), and a site's pair is freed once its last reader has run, not held to the end of the pass."""
    import weakref

    from onebasin.taps import visit_pairs

    a, b = ResNet20ish("bn").double().eval(), ResNet20ish("bn").double().eval()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    spec = trace(a, x)
    sites = [s for g in spec.groups.values() for s in g.sites]
    (_, want_a), (_, want_b) = SiteTaps(a, sites, spec.graph)(x), SiteTaps(b, sites, spec.graph)(x)
    got, refs, alive_at_end = [], [], []

    def visit(k, va, vb):
        got.append((k, va.clone(), vb.clone()))
        refs.append(weakref.ref(va))
        if len(got) == len(sites):
            alive_at_end.extend(r() is not None for r in refs[:-1])

    with torch.no_grad():
        visit_pairs(a, b, sites, spec.graph, x, visit)
    assert sorted(k for k, _, _ in got) == list(range(len(sites)))
    for k, va, vb in got:
        assert torch.equal(va, want_a[k]) and torch.equal(vb, want_b[k])
    assert sum(alive_at_end) < len(sites) // 2  # SiteTaps holds all of them until the pass ends


def test_taps_of_hand_written_sites_use_hooks():
    model = mlp(width=8, depth=3)
    spec = from_groups({"h1": [("1.weight", 0), ("1.bias", 0), ("3.weight", 1)]}, model.state_dict(), sites={"h1": ["1"]})
    x = torch.randn(5, 12)
    _, (act,) = SiteTaps(model, list(spec.groups["h1"].sites))(x)
    assert torch.allclose(act, model[1](model[0](x)))


def test_batches_cut_at_max_examples():
    data = [(torch.randn(4, 2), torch.zeros(4)) for _ in range(5)]
    assert [b.shape[0] for b in batches(data, max_examples=10)] == [4, 4, 2]


def test_sums_over_many_blocks_equal_numpy(monkeypatch):
    """Per-unit sums, squares and cross products accumulated block by block (a block budget of a few rows,
    so every tensor spans several blocks) equal numpy's on the whole float32 activation, in float64:
    a conv map (units on axis 1), a token matrix (units last) and a slice of a fused last axis."""
    from onebasin import sums
    from onebasin.spec import Site

    monkeypatch.setattr(sums, "_BLOCK_BYTES", 1000)
    g = torch.Generator().manual_seed(0)
    cases = [(torch.randn(7, 5, 4, 3, generator=g) + 2, Site(None, 1)),  # (N, C, H, W): 5 units, N*H*W samples
             (torch.randn(9, 6, 8, generator=g) - 1, Site(None, 2)),  # (N, T, C): 8 units
             (torch.randn(9, 6, 12, generator=g), Site(None, 2, start=4, size=5)),  # units 4..8 of a fused projection
             (torch.randn(40, 8, dtype=torch.float64, generator=g), Site(None, 1))]  # float64: blocks are still copies
    for t, site in cases:
        before = t.clone()
        u = t.narrow(site.dim, site.start, site.size) if site.size else t
        ref = np.moveaxis(u.double().numpy(), site.dim, -1).reshape(-1, u.shape[site.dim])  # (samples, units)
        other = t.flip(0)  # a second activation of the same shape
        ref_b = np.moveaxis((other.narrow(site.dim, site.start, site.size) if site.size else other).double().numpy(), site.dim, -1).reshape(ref.shape)
        n, total, squares = sums.unit_sums(t, site)
        assert n == ref.shape[0] and len(list(sums._unit_blocks(t, site))) > 1
        np.testing.assert_allclose(total.numpy(), ref.sum(0), rtol=1e-12)
        np.testing.assert_allclose(squares.numpy(), (ref**2).sum(0), rtol=1e-12)
        m = Moments(paired=True)
        m.update_pair(t, other, site)
        m.update_pair(t, other, site)  # a second batch: the cross product is added in place
        np.testing.assert_allclose(m.sums["xy"].numpy(), 2 * ref.T @ ref_b, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m.sums["yy"].numpy(), 2 * (ref_b**2).sum(0), rtol=1e-12)
        _, diag = sums.paired_sums(t, other, site, cross="diag")
        np.testing.assert_allclose(diag["xy"].numpy(), (ref * ref_b).sum(0), rtol=1e-12, atol=1e-12)
        assert torch.equal(t, before)  # the activations themselves are not changed (squares are taken in copies)
