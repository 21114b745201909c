"""Each permutation rule on a tiny module: a random permutation of every group (structured groups included)
leaves the output unchanged in float64, permuting moves weights, and permute-then-invert is the identity."""

import pytest
import torch

from onebasin.graph import capture
from onebasin.permute import apply_perms, check_perms, invert_perms, permute_model, random_perms
from onebasin.spec import trace
from rule_models import RULE_MODELS


def build(name):
    factory, shape, expected = RULE_MODELS[name]
    torch.manual_seed(0)
    model = factory().double().eval()
    for m in model.modules():  # non-trivial norm statistics, so permuting them matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    x = shape(torch.float64) if callable(shape) else torch.randn(*shape, dtype=torch.float64)
    return model, x, expected


@pytest.mark.parametrize("name", list(RULE_MODELS))
def test_random_structured_permutation_keeps_the_function(name):
    model, x, expected = build(name)
    spec = trace(model, x)
    perms = random_perms(spec, seed=1)
    check_perms(spec, perms)
    permuted = permute_model(model, spec, perms)
    with torch.no_grad():
        y, y_perm = model(x), permuted(x)
    assert (y - y_perm).abs().max().item() < 1e-9 * max(1.0, y.abs().max().item())
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, permuted.state_dict()[k])]
    assert moved, "a random permutation should move some weights"
    sd = model.state_dict()
    back = apply_perms(spec, invert_perms(perms), apply_perms(spec, perms, sd))
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    if "groups" in expected:
        assert len(spec) == expected["groups"], str(spec)
    if "structured" in expected:
        assert sum(g.structured for g in spec.groups.values()) == expected["structured"], str(spec)


@pytest.mark.parametrize("name", list(RULE_MODELS))
def test_the_captured_graph_computes_the_model(name):
    """The functional graph (in-place writes rewritten) gives the eager model's outputs on other weights too."""
    model, x, _ = build(name)
    captured = capture(model, x)
    other = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    for state in (model.state_dict(), other):
        model.load_state_dict(state)
        with torch.no_grad():
            expected = model(x)
        got = captured.run(state, x)[0]
        assert torch.allclose(got, expected, rtol=0, atol=1e-12 * max(1.0, expected.abs().max().item()))


class CopyThenWrite(torch.nn.Module):
    """A copy-or-view of x taken before an in-place write must keep the old values (eager semantics)."""

    def __init__(self, kind):
        super().__init__()
        self.lin, self.kind = torch.nn.Linear(4, 4), kind

    def forward(self, x):
        x = self.lin(x)
        h = {"contiguous": lambda: x.t().contiguous(), "to": lambda: x.to(torch.float64), "reshape": lambda: x.t().reshape(-1)}[self.kind]()
        x.mul_(2)
        return (h.view(4, -1).t() if self.kind == "reshape" else h.t() if self.kind == "contiguous" else h).to(x.dtype) + x


@pytest.mark.parametrize("kind", ["contiguous", "to", "reshape"])
def test_a_copy_taken_before_an_in_place_write_keeps_the_old_values(kind):
    model, x = CopyThenWrite(kind).eval(), torch.randn(4, 4)
    with torch.no_grad():
        expected = model(x)
    got = capture(model, x).run(model.state_dict(), x)[0]
    assert torch.allclose(got, expected, rtol=0, atol=1e-6), (got - expected).abs().max()


def test_rows_times_a_column_sliced_weight_is_refused_not_a_crash():
    class SlicedWeight(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.w = torch.nn.Linear(3, 5), torch.nn.Parameter(torch.randn(4, 8))

        def forward(self, x):  # (B, 6, 3) -> units (5) on axis -2, then W[:, :5] @ h contracts the units
            return (self.w[:, :5] @ self.lin(x).transpose(1, 2)).sum((1, 2))

    from onebasin.errors import OnebasinError

    model = SlicedWeight()
    try:
        spec = trace(model, torch.randn(2, 6, 3))
    except OnebasinError:
        return  # refused with a clear error: fine
    perms = random_perms(spec, seed=0)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    model = model.double()
    assert torch.allclose(permute_model(model, spec, perms)(x), model(x), rtol=1e-10)


class _SlicedLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.w = torch.nn.Linear(6, 16), torch.nn.Parameter(torch.randn(8, 24))
        self.mid, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(torch.nn.functional.linear(torch.relu(self.fc(x)), self.w[:, :16]))
        return self.out(torch.relu(self.mid(h)))


class _SlicedEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = torch.nn.Embedding(10, 6), torch.nn.Linear(4, 3)

    def forward(self, ids):
        return self.fc(torch.nn.functional.embedding(ids, self.emb.weight[:, :4]))


def test_a_layer_whose_weight_is_a_slice_keeps_its_units_or_is_refused_by_node():
    """F.linear(h, w[:, :16]) was a TypeError in the tracer (test failed before the fix): its units stay in
    place with a note naming the node, `mid` still permutes and the permuted copy (`mid`'s rows moved by
    hand as the oracle) computes the same; an embedding over a sliced table is refused naming the node."""
    from onebasin.errors import UnsupportedOpError

    torch.manual_seed(0)
    model, x = _SlicedLinear().double().eval(), torch.randn(4, 6, dtype=torch.float64)
    spec = trace(model, x)
    assert list(spec.groups) == ["mid"] and any("linear_1" in n and "'w'" in n for n in spec.notes)
    perms = random_perms(spec, seed=1)
    permuted = permute_model(model, spec, perms)
    p = perms["mid"]
    assert torch.equal(permuted.mid.weight, model.mid.weight[p]) and torch.equal(permuted.out.weight, model.out.weight[:, p])
    with torch.no_grad():
        assert (permuted(x) - model(x)).abs().max() < 1e-12
    with pytest.raises(UnsupportedOpError, match="node 'embedding'.*slice of weight 'emb.weight'"):
        trace(_SlicedEmbedding(), torch.randint(0, 10, (2, 5)))


def test_attention_heads_share_the_block_permutation():
    model, x, _ = build("explicit_attention")
    spec = trace(model, x)
    qk = next(g for g in spec.groups.values() if any(m.key == "q.weight" and m.axis == 0 for m in g.members))
    vo = next(g for g in spec.groups.values() if any(m.key == "v.weight" and m.axis == 0 for m in g.members))
    assert qk is not vo and qk.block == vo.block == 4 and qk.inner and vo.inner
    assert qk.parent is not None and qk.parent == vo.parent
    assert {m.key for m in qk.members} >= {"k.weight", "k.bias", "q.bias"}
    assert ("o.weight", 1) in {(m.key, m.axis) for m in vo.members}


def test_rotary_embeddings_fix_the_inside_of_query_key_heads_but_not_the_heads():
    model, x, _ = build("gqa_rope")
    spec = trace(model, x)
    qk = next(g for g in spec.groups.values() if any(m.key == "k.weight" and m.axis == 0 for m in g.members))
    assert qk.structured and not qk.inner
    assert qk.parent is not None or not qk.fixed_blocks
    vo = next(g for g in spec.groups.values() if any(m.key == "v.weight" and m.axis == 0 for m in g.members))
    assert vo.inner, "rotary embeddings do not touch values: their heads stay free inside"


def test_tied_embedding_and_lm_head_are_one_member_each():
    model, x, _ = build("gqa_rope")
    spec = trace(model, x)
    stream = next(g for g in spec.groups.values() if any(m.key == "embed.weight" for m in g.members))
    keys = {(m.key, m.axis) for m in stream.members}
    assert ("embed.weight", 1) in keys and ("lm_head.weight", 1) in keys


def test_a_module_called_twice_keeps_its_function():
    """Issue 12 #2: both calls of one Linear share its weight's axes, so their groups are one."""
    model, x, _ = build("called_twice")
    spec = trace(model, x)
    h_rows = [g.name for g in spec.groups.values() if any(m.key == "h.weight" and m.axis == 0 for m in g.members)]
    assert len(h_rows) <= 1


def test_unknown_op_is_refused_by_name_or_fixed_on_request():
    from onebasin.errors import UnsupportedOpError

    class Sorts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.out = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.out(torch.special.bessel_j0(self.a(x)))

    model, x = Sorts().double(), torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(UnsupportedOpError, match="bessel_j0"):
        trace(model, x)
    spec = trace(model, x, unknown="fix")
    assert len(spec) == 0 and any("bessel_j0" in n for n in spec.notes)
