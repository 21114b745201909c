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
