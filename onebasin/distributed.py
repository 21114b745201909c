"""Devices and processes: where onebasin runs, and how it joins a torchrun job.

Under `torchrun --nproc_per_node N onebasin merge ...` every process reads its shard of the calibration
and evaluation data (`stats.batches`), statistics are all-reduced (exact float64 sums, so the result equals
one process's), and only rank 0 writes files and prints.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


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
