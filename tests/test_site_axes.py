"""The site axes traced for Hugging Face and timm models against their hooked module outputs (issue 23).

Oracle, apart from onebasin's graph: each layer site names a module and an axis. A forward hook reads that
module's output in the model and in a randomly permuted copy; the axis must be the module's unit axis (by
hand: the last axis of a Linear / HF Conv1D / LayerNorm / RMSNorm output, axis 1 of a Conv2d or a channels-
first LayerNorm2d output; the traced node may be a flat 2-D view of it, as GPT-2's addmm), and along it
the copy's units must be the model's units reordered: every unit's activations (over batch, tokens, pixels)
equal exactly one unit's of the model, a bijection, and not the identity for most sites (a permutation
along a wrong axis mixes the values of a unit and finds no match).
"""

import pytest
import torch
import torch.nn as nn

from onebasin.graph import as_call
from onebasin.permute import permute_model, random_perms
from onebasin.spec import trace

transformers = pytest.importorskip("transformers")
import hf_models as H  # noqa: E402

LAST = ("Linear", "Conv1D", "LayerNorm", "LlamaRMSNorm")  # unit axis: the last one
FIRST = ("Conv2d", "LayerNorm2d", "BatchNorm2d")  # unit axis: 1 (channels first)


def convnext():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.convnext.ConvNeXt(in_chans=3, num_classes=5, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
    return model.eval(), torch.randn(2, 3, 32, 32)


def hf(kind):
    model = H.build(kind)
    model.config.use_cache = False
    return model, H.example(kind, n=2)


BUILDERS = {"bert": lambda: hf("bert"), "gpt2": lambda: hf("gpt2"), "llama_gqa": lambda: hf("llama"), "convnext": convnext}


def unit_axis(module: nn.Module, ndim: int) -> int:
    name = type(module).__name__
    if name in FIRST:
        return 1
    assert name in LAST, f"no hand-derived unit axis for {name}"
    return ndim - 1


def hooked(model, modules, x) -> dict:
    out, hooks = {}, [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: out.setdefault(n, o)) for n in modules]
    args, kwargs = as_call(x)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return out


def matching(a: torch.Tensor, p: torch.Tensor) -> torch.Tensor | None:
    """For each unit of p (rows), the unit of a with the same activations; None unless it is a bijection."""
    dist = torch.cdist(p, a, compute_mode="donot_use_mm_for_euclid_dist")
    best = dist.argmin(1)
    exact = dist.min(1).values <= 1e-5 * a.abs().max()  # float32 level: Llama's RMSNorm computes in float32
    return best if bool(exact.all()) and len(set(best.tolist())) == len(best) else None


@pytest.mark.parametrize("name", BUILDERS)
def test_site_axes_are_the_unit_axes_of_the_hooked_outputs(name):
    model, x = BUILDERS[name]()
    model = model.double()
    x = {k: v.double() if v.is_floating_point() else v for k, v in x.items()} if isinstance(x, dict) else x.double()
    spec = trace(model, x)
    sites = [(g, s) for g in spec.groups.values() for s in g.sites if s.kind == "layer" and s.module is not None]
    assert len(sites) >= 4, str(spec)
    permuted = permute_model(model, spec, random_perms(spec, seed=5))
    ya, yp = hooked(model, {s.module for _, s in sites}, x), hooked(permuted, {s.module for _, s in sites}, x)
    moved = 0
    for group, s in sites:
        out, traced = ya[s.module], spec.graph.node(s.node).meta["val"]  # the node may be a flat view (addmm)
        axis = unit_axis(model.get_submodule(s.module), out.ndim)
        assert s.dim - traced.ndim == axis - out.ndim, (s, type(model.get_submodule(s.module)), tuple(out.shape))
        size = s.size or out.shape[axis]
        assert s.start + size <= out.shape[axis] and (group.structured or size == group.size), (s, group)
        a = out.narrow(axis, s.start, size).movedim(axis, 0).reshape(size, -1)
        p = yp[s.module].narrow(axis, s.start, size).movedim(axis, 0).reshape(size, -1)
        found = matching(a, p)
        assert found is not None, f"{s.module}: the permuted copy's units along axis {s.dim} are not the model's units"
        moved += not torch.equal(found, torch.arange(size))
    assert moved >= 0.75 * len(sites)


def test_the_oracle_rejects_a_wrong_axis():
    """The bijection test fails when read along a wrong axis (tokens instead of units) of a permuted output."""
    model, x = hf("bert")
    model = model.double()
    spec = trace(model, x)
    permuted = permute_model(model, spec, random_perms(spec, seed=5))
    name = "encoder.layer.0.intermediate.dense"
    a, p = hooked(model, [name], x)[name], hooked(permuted, [name], x)[name]
    assert matching(a.movedim(2, 0).reshape(a.shape[2], -1), p.movedim(2, 0).reshape(a.shape[2], -1)) is not None
    assert matching(a.movedim(1, 0).reshape(a.shape[1], -1), p.movedim(1, 0).reshape(a.shape[1], -1)) is None
