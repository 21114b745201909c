"""merge and merge_many under two gloo processes equal one process: the same examples (max_examples counts
examples of the whole job, also under a DistributedSampler) and the same unit order (issue 23, item 10)."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import onebasin
from conftest import gloo_results
from reference_models import mlp

pytestmark = pytest.mark.usefixtures("float64_statistics")  # sums held to numpy at 1e-10: the exact path

WORLD, MAX_EXAMPLES = 2, 40


def models(n=3):
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(mlp(width=12, depth=3).double().eval())
    return out


def dataset():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(100, 12, generator=gen, dtype=torch.float64)
    return TensorDataset(x, torch.zeros(100, dtype=torch.long))


def loader(sharded: bool):
    """Batches of 6 in dataset order; `sharded`: this process's share from a DistributedSampler (no shuffle)."""
    data = dataset()
    sampler = DistributedSampler(data, shuffle=False) if sharded else None
    return DataLoader(data, batch_size=6, sampler=sampler)


def results(sharded: bool) -> dict:
    """Weights and perms of merge and of merge_many (3 models, universe) on the first MAX_EXAMPLES examples."""
    ms, data = models(), loader(sharded)
    pair, _ = onebasin.merge(ms[0], ms[1], data=data, max_examples=MAX_EXAMPLES)
    many, result = onebasin.merge_many(ms, data=data, max_examples=MAX_EXAMPLES)
    out = {f"pair/{k}": v for k, v in pair.state_dict().items()} | {f"many/{k}": v for k, v in many.state_dict().items()}
    out |= {f"perm/{i}/{g}": p for i, perms in enumerate(result.perms) for g, p in perms.items()}
    out["examples"] = torch.tensor(result.record["examples"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True], ids=["plain-loader", "distributed-sampler"])
def test_two_processes_merge_the_examples_and_unit_order_of_one_process(sharded):
    torch.set_num_threads(1)
    ranks = gloo_results(results, sharded, world=WORLD)
    single = results(sharded=False)
    assert single["examples"].item() == MAX_EXAMPLES
    for got in ranks:
        assert got["examples"].item() == MAX_EXAMPLES
        for key, want in single.items():
            if key.startswith("perm/"):
                assert torch.equal(got[key], want), key
            elif want.is_floating_point():
                assert (got[key] - want).abs().max().item() <= 1e-10, key
