"""Scale-out: two gloo processes, each reading its shard, give the single-process statistics and perms."""

import pytest
import torch

from conftest import gloo_results
from onebasin.align import get_method, input_moments, site_moments
from onebasin.spec import trace
from reference_models import ResNet20ish

pytestmark = pytest.mark.usefixtures("float64_statistics")  # sums held to numpy at 1e-10: the exact path

WORLD = 2


def setup():
    """Two differently seeded float64 ResNet20s and 7 uneven batches (rank 0 reads 4, rank 1 reads 3)."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(ResNet20ish("bn").double().eval())
    gen = torch.Generator().manual_seed(2)
    data = [torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64) for n in (16, 16, 16, 16, 16, 16, 9)]
    return models[0], models[1], trace(models[0], data[0]), data


def setup_statistics() -> dict:
    """`statistics` of `setup()`: what each rank computes."""
    a, b, spec, data = setup()
    return statistics(spec, a, b, data)


def statistics(spec, a, b, data) -> dict:
    """Every sum the methods all-reduce, the examples counted, and the perms of both data methods."""
    sites, examples = site_moments(spec, a, b, data)
    inputs, _ = input_moments(spec, a, b, data)
    out = {"examples": torch.tensor(examples)}
    for group, ms in sites.items():
        for i, m in enumerate(ms):
            out |= {f"site/{group}/{i}/n": torch.tensor(m.n)} | {f"site/{group}/{i}/{k}": v for k, v in m.sums.items()}
    for layer, pair in inputs.items():
        for side, m in zip("ab", pair):
            out |= {f"input/{layer}/{side}/{k}": v for k, v in m.sums.items()}
    for method in ("activation", "functional"):
        out |= {f"perm/{method}/{g}": p for g, p in get_method(method)(spec, a, b, data).perms.items()}
    return out


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process():
    torch.set_num_threads(1)
    ranks = gloo_results(setup_statistics, world=WORLD)
    a, b, spec, data = setup()
    single = statistics(spec, a, b, data)
    assert single["examples"].item() == 105
    for got in ranks:
        assert set(got) == set(single)
        for key, want in single.items():
            if key.startswith("perm/") or key.endswith("/n") or key == "examples":
                assert torch.equal(got[key], want), key
            else:
                assert (got[key] - want).abs().max().item() <= 1e-10 * max(1.0, want.abs().max().item()), key


def merged_and_stats(n_batches: int) -> dict:
    """merge() with activation matching and exact REPAIR, plus the one-pass statistics, on the first batches."""
    from onebasin.pipeline import merge

    a, b, spec, data = setup()
    data = data[:n_batches]
    merged, result = merge(a, b, method="activation", repair="exact", data=data)
    out = {f"weight/{k}": v for k, v in merged.state_dict().items()}
    sites, examples = site_moments(spec, a, b, data)
    out["examples"] = torch.tensor(examples)
    for group, ms in sites.items():
        out |= {f"site/{group}/{i}/{k}": v for i, m in enumerate(ms) for k, v in m.sums.items()}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("n_batches", [1, 7], ids=["one-rank-without-a-batch", "uneven-shards"])
def test_merge_under_two_gloo_processes_equals_one_process(n_batches):
    """Issue 12 #7 and issue 14: with 1 batch, rank 1 reads nothing and still takes part in every all-reduce."""
    torch.set_num_threads(1)
    ranks = gloo_results(merged_and_stats, n_batches, world=WORLD)
    single = merged_and_stats(n_batches)
    for got in ranks:
        assert set(got) == set(single)
        for key, want in single.items():
            if not want.is_floating_point():
                assert torch.equal(got[key], want), key
            else:
                assert (got[key] - want).abs().max().item() <= 1e-10 * max(1.0, want.abs().max().item()), key
