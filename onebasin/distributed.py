"""Devices and processes: where onebasin runs, and how it joins a torchrun job.

Under `torchrun --nproc_per_node N onebasin merge ...` every process reads its shard of the calibration
and evaluation data (`batches`), statistics are all-reduced (exact float64 sums, so the result equals
one process's), and only rank 0 writes files and prints.
"""

from __future__ import annotations

import os

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from .errors import OnebasinError
from .graph import batch_size, take_rows, to_device


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device` if given, else this process's CUDA device when CUDA is available, else the CPU."""
    if device not in (None, "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU); whether one was joined."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return dist.is_available() and dist.is_initialized()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def distributed() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reduce_device(like: torch.device | None = None) -> torch.device:
    """Where collective tensors must live: the current CUDA device for NCCL, else `like` or the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return like or torch.device("cpu")


def presharded(data) -> bool:
    """Whether a DataLoader already gives each process its own shard (a DistributedSampler)."""
    sampler = getattr(data, "sampler", None)
    return isinstance(sampler, torch.utils.data.distributed.DistributedSampler)


def _shard_limit(sampler, max_examples: int | None) -> int | None:
    """This process's share of the first `max_examples` examples of a DistributedSampler's order: rank r of w
    holds positions r, r + w, r + 2w, ..., so all ranks together read the examples one process would."""
    if max_examples is None:
        return None
    total = min(max_examples, len(sampler.dataset), sampler.total_size)  # padding repeats examples: never read it
    return max(0, -(-(total - sampler.rank) // sampler.num_replicas))


def batches(data: Iterable, max_examples: int | None = None, device: torch.device | str | None = None) -> Iterator:
    """Input batches from a loader of x or (x, y, ...) batches, cut at `max_examples`, moved to `device`.

    x may be a tensor or a dict of tensors (keyword inputs). When torch.distributed is initialised,
    rank r of w keeps batches r, r+w, r+2w, ... so that sums gathered on every rank and all-reduced equal
    those of one process over all data. A loader whose DistributedSampler already shards it is read whole,
    `max_examples` then counting the examples of all processes together (each reads its share of them).
    A batch with no rows is an error (it would otherwise look like missing statistics).
    """
    rank, world = distributed()
    if presharded(data):
        rank, world, max_examples = 0, 1, _shard_limit(data.sampler, max_examples)
    seen = 0
    for i, batch in enumerate(data):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        n = batch_size(x)
        if n == 0:
            raise OnebasinError(f"batch {i} of the data has no rows")
        if max_examples is not None:
            if seen >= max_examples:
                return
            if n > max_examples - seen:
                n = max_examples - seen
                x = take_rows(x, slice(0, n))
        seen += n
        if i % world == rank:
            yield to_device(x, device) if device is not None else x


def all_reduce_count(n: int) -> int:
    """Sum of an integer over the processes of an initialised torch.distributed group (n itself otherwise)."""
    if distributed()[1] == 1:
        return n
    t = torch.tensor([float(n)], dtype=torch.float64, device=reduce_device())
    dist.all_reduce(t)
    return int(t.item())


def any_rank(value) -> bool:
    """Whether `value` is not None on any process (a collective: every rank calls it)."""
    flag = torch.tensor([0.0 if value is None else 1.0], dtype=torch.float64, device=reduce_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def gathered(value) -> list:
    """Every rank's `value` (all_gather_object: small picklable results, e.g. solved permutations)."""
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def spread_owners(costs: dict, world: int) -> dict:
    """key -> the rank owning it: the largest cost first, each to the rank holding the least so far (so each
    rank holds about 1 / world of the total)."""
    load, owners = [0] * world, {}
    for key, cost in sorted(costs.items(), key=lambda kv: -kv[1]):
        r = min(range(world), key=load.__getitem__)
        load[r] += cost
        owners[key] = r
    return owners
