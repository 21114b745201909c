"""Orthogonal alignment of the residual stream (Theus et al. 2025): the canonical form and any re-basis keep the
function; a re-based, permuted copy is aligned back exactly; networks that are not pre-norm are refused."""

import pytest
import torch

from onebasin.align import AlignmentError, align
from onebasin.align.orthogonal import canonical, procrustes, rebase, stream_groups
from onebasin.interpolate import lerp
from onebasin.permute import permute_model, random_perms
from onebasin.spec import trace
from reference_models import TinyTransformer
from rule_models import FusedAttention


def random_stream_rotation(n, seed):
    """A random orthogonal (n, n) matrix that maps the ones vector to itself (float64)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.eye(n, dtype=torch.float64) - 1.0 / n)
    basis = basis[:, : n - 1]
    r, _ = torch.linalg.qr(torch.randn(n - 1, n - 1, generator=g, dtype=torch.float64))
    return basis @ r @ basis.T + 1.0 / n


def setup(seed=0):
    torch.manual_seed(seed)
    model = TinyTransformer().double().eval()
    x = torch.randn(16, 4, 6, dtype=torch.float64)
    return model, x, trace(model, x)


def test_canonical_form_and_rebase_keep_the_function():
    model, x, spec = setup()
    (stream,) = stream_groups(spec)
    canon = canonical(spec, model, [stream])
    q = random_stream_rotation(stream.size, seed=1)
    assert torch.allclose(q @ torch.ones(stream.size, dtype=torch.float64), torch.ones(stream.size, dtype=torch.float64))
    rebased = rebase(canon, stream, q)
    with torch.no_grad():
        y = model(x)
        assert (canon(x) - y).abs().max() < 1e-10
        assert (rebased(x) - y).abs().max() < 1e-10
    norms = [k for k in canon.state_dict() if k.endswith("ln1.weight") or k == "norm.weight"]
    assert all(torch.equal(canon.state_dict()[k], torch.ones_like(canon.state_dict()[k])) for k in norms)
    assert not torch.allclose(rebased.state_dict()["embed.weight"], canon.state_dict()["embed.weight"])


def test_procrustes_recovers_a_rotation():
    q = random_stream_rotation(6, seed=3)
    xb = torch.randn(200, 6, dtype=torch.float64)
    xb = xb - xb.mean(1, keepdim=True)  # stream vectors are centred
    xa = xb @ q.T
    assert (procrustes(xa.T @ xb) - q).abs().max() < 1e-10


@pytest.mark.usefixtures("float64_statistics")
def test_orthogonal_alignment_undoes_a_rotation_and_permutation():
    model, x, spec = setup()
    (stream,) = stream_groups(spec)
    other = permute_model(model, spec, {k: v for k, v in random_perms(spec, seed=2).items() if k != stream.name})
    b = rebase(canonical(spec, other, [stream]), stream, random_stream_rotation(stream.size, seed=4))
    data = [x[:8], x[8:]]
    aligned_b, result = align(model, b, "orthogonal", data, spec=spec)
    a_canon = result.models[0]
    with torch.no_grad():
        assert (aligned_b(x) - model(x)).abs().max() < 1e-9  # b computes what model computes
        mid = lerp(a_canon.state_dict(), aligned_b.state_dict(), 0.5)
        assert all((mid[k] - a_canon.state_dict()[k]).abs().max() < 1e-8 for k in mid), "B was not brought onto A"


def test_orthogonal_alignment_refuses_a_stream_read_without_layernorm():
    torch.manual_seed(0)
    model = FusedAttention().double().eval()  # its head reads the stream directly
    x = torch.randn(4, 4, 5, dtype=torch.float64)
    with pytest.raises(AlignmentError, match="pre-norm"):
        align(model, model, "orthogonal", [x])


def test_activation_matching_recovers_shuffled_and_inside_permuted_heads():
    """Issue 15: a random structured permutation (heads shuffled, each head permuted inside, QK and VO apart)
    of a small transformer is undone exactly by activation matching (Verma & Elbayad 2024 head matching)."""
    from onebasin.permute import check_perms, invert_perms

    model, x, spec = setup()
    assert any(g.structured and g.inner for g in spec.groups.values())
    perms = random_perms(spec, seed=5)
    b = permute_model(model, spec, perms)
    _, result = align(model, b, "activation", [x[:8], x[8:]], spec=spec)
    check_perms(spec, result.perms)
    want = invert_perms(perms)
    assert all(torch.equal(result.perms[g], want[g]) for g in spec.groups), "not the exact inverse"


def test_weight_based_stream_map_recovers_a_permuted_and_rotated_copy_without_data():
    """stream="weights" (Theus et al. 2025, data-free): weight matching alternated with Procrustes on the canonical
    weights finds the exact inverse of a random rotation of the stream and of a random permutation of every other
    group (heads shuffled and permuted inside); the map is orthogonal to 1e-12 and B's function is kept."""
    from onebasin.permute import invert_perms

    model, x, spec = setup()
    (stream,) = stream_groups(spec)
    perms = {k: v for k, v in random_perms(spec, seed=2).items() if k != stream.name}
    q = random_stream_rotation(stream.size, seed=4)
    b = rebase(canonical(spec, permute_model(model, spec, perms), [stream]), stream, q)
    aligned_b, result = align(model, b, "orthogonal", example_input=x, spec=spec, stream="weights")
    assert len(result.record["head_families"]) == 2  # fused qkv: heads matched by their QK and OV products
    found = result.maps[stream.name]
    eye = torch.eye(stream.size, dtype=torch.float64)
    assert (found.T @ found - eye).abs().max() < 1e-12
    assert (found - q.T).abs().max() < 1e-10  # B's stream is A's rotated by q: the map back is q^T
    want = invert_perms(perms)
    assert all(torch.equal(result.perms[g], want[g]) for g in perms)
    a_canon = result.models[0]
    with torch.no_grad():
        assert (aligned_b(x) - b(x)).abs().max() < 1e-9 and (a_canon(x) - model(x)).abs().max() < 1e-9
    mid = lerp(a_canon.state_dict(), aligned_b.state_dict(), 0.5)
    assert max((mid[k] - v).abs().max().item() for k, v in a_canon.state_dict().items()) < 1e-8


def rotate_inside_heads(model, seed):
    """A copy of a TinyTransformer with a random orthogonal map inside every head (by hand: query and key rows of
    head h by R, value rows by S and the output projection's columns by S^T), which keeps its function."""
    import copy

    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    dim, heads = model.embed.out_features, model.h
    d = dim // heads
    with torch.no_grad():
        for blk in out.blocks:
            w, b, proj = blk["qkv"].weight, blk["qkv"].bias, blk["proj"].weight
            for h in range(heads):
                r, s = (torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0] for _ in range(2))
                for part, m in ((0, r), (1, r), (2, s)):
                    rows = slice(part * dim + h * d, part * dim + (h + 1) * d)
                    w[rows], b[rows] = m @ w[rows], m @ b[rows]
                proj[:, h * d:(h + 1) * d] = proj[:, h * d:(h + 1) * d] @ s.T
    return out


def head_rows(model, blk: int, h: int, kind: str) -> torch.Tensor:
    """(d, columns) rows of head h of a TinyTransformer block, read by hand: query and key rows with their biases
    side by side ("qk"), or value rows with bias and the output projection's columns ("vo")."""
    dim, d = model.embed.out_features, model.embed.out_features // model.h
    w, b = model.blocks[blk]["qkv"].weight, model.blocks[blk]["qkv"].bias
    rows = [torch.cat([w[p * dim + h * d:p * dim + (h + 1) * d], b[p * dim + h * d:p * dim + (h + 1) * d, None]], 1)
            for p in ((0, 1) if kind == "qk" else (2,))]
    if kind == "vo":
        rows.append(model.blocks[blk]["proj"].weight[:, h * d:(h + 1) * d].T)
    return torch.cat(rows, 1).detach()


@pytest.mark.usefixtures("float64_statistics")
def test_head_maps_are_the_procrustes_solution_of_each_head_and_keep_the_function():
    """Issue 25, maps inside heads: on two random transformers, B's head rows after `heads="orthogonal"` are M_h times
    its rows with the heads permuted only, M_h = scipy's orthogonal Procrustes of that head's rows onto A's (query
    and key rows by one map, value rows and the output projection's columns by another), orthogonal to 1e-12; B
    still computes what it computed, and its rows are closer to A's than before."""
    from scipy.linalg import orthogonal_procrustes

    model, x, spec = setup()
    torch.manual_seed(1)
    b = TinyTransformer().double().eval()
    data = [x[:8], x[8:]]
    b_maps, result = align(model, b, "orthogonal", data, spec=spec, heads="orthogonal")
    b_perm, plain = align(model, b, "orthogonal", data, spec=spec)  # default: permutations inside heads
    a = result.models[0]
    assert len(result.record["head_maps"]) == 4 and plain.record["head_maps"] == []
    with torch.no_grad():
        assert (b_maps(x) - b(x)).abs().max() < 1e-9
    for blk in range(2):
        for h in range(2):
            for kind in ("qk", "vo"):
                ra, rp, rm = (head_rows(m, blk, h, kind).numpy() for m in (a, b_perm, b_maps))
                r, _ = orthogonal_procrustes(rp.T, ra.T)  # rp^T r ~ ra^T: the map is r^T
                assert abs(r @ r.T - torch.eye(len(r)).numpy()).max() < 1e-12
                assert abs(rm - r.T @ rp).max() < 1e-10
                assert ((rm - ra) ** 2).sum() <= ((rp - ra) ** 2).sum() + 1e-12


def test_head_maps_recover_a_copy_rotated_inside_every_head():
    """A copy with its groups permuted, its stream rotated and a random orthogonal map inside every head is brought
    back onto A exactly by the data-free orthogonal alignment with maps inside heads (heads paired by their QK and
    OV products, which the maps keep; then Procrustes inside each head); with permutations inside heads only, it is
    not (a rotation inside a head is no permutation)."""
    model, x, spec = setup()
    (stream,) = stream_groups(spec)
    perms = {k: v for k, v in random_perms(spec, seed=2).items() if k != stream.name}
    rotated = rotate_inside_heads(permute_model(model, spec, perms), seed=6)
    b = rebase(canonical(spec, rotated, [stream]), stream, random_stream_rotation(stream.size, seed=4))
    with torch.no_grad():
        assert (b(x) - model(x)).abs().max() < 1e-9
    for heads, close in (("orthogonal", True), ("permutation", False)):
        aligned_b, result = align(model, b, "orthogonal", example_input=x, spec=spec, stream="weights", heads=heads)
        a_canon = result.models[0]
        gap = max((v - aligned_b.state_dict()[k]).abs().max().item() for k, v in a_canon.state_dict().items())
        assert (gap < 1e-8) == close, (heads, gap)


def test_orthogonal_alignment_refuses_an_unknown_heads_option():
    from onebasin.errors import InvalidOptionError

    model, x, spec = setup()
    with pytest.raises(InvalidOptionError, match="heads='rotate'"):
        align(model, model, "orthogonal", [x], spec=spec, heads="rotate")
