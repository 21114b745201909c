"""Shared helpers of the benchmarks: wall time and peak memory of one call.

Time is wall time (time.perf_counter) unless `use_cpu_clock()` switches to the process's CPU time
(time.process_time: on a shared machine a one-thread run's own cost, without the time other processes hold
the core; CPU only). Peak memory on CPU is the peak RSS (/proc/self/status VmHWM, reset through /proc/self/clear_refs) above
the RSS held when the window started; on CUDA, torch.cuda.max_memory_allocated above the allocation then.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import time

import torch


_libc = ctypes.CDLL("libc.so.6")


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def reset_peak(device: torch.device) -> float:
    """Start a new peak-memory window; returns the memory held now (MiB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    gc.collect()
    _libc.malloc_trim(0)  # hand freed heap back to the OS, so the window starts from live memory only
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return _rss_mb("VmRSS:")


def peak_since(device: torch.device, base: float) -> float:
    """Peak memory (MiB) above `base` since the matching `reset_peak`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20 - base
    return _rss_mb("VmHWM:") - base


_clock = [time.perf_counter]


def use_cpu_clock() -> None:
    """Time every later `timed` call by this process's CPU time (all its threads) instead of wall time."""
    _clock[0] = time.process_time


def timed(fn, device: torch.device):
    """(fn(), seconds), synchronising CUDA around the call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = _clock[0]()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, _clock[0]() - t0


def minor_faults() -> int:
    """Minor page faults of this process so far (pages the kernel mapped in on first touch: glibc hands large
    freed blocks back to the OS and faults them in again on reuse, which can cost a CPU step 10 % of its time)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(fn, device: torch.device):
    """(fn(), seconds, peak MiB above the memory held before the call)."""
    base = reset_peak(device)
    out, seconds = timed(fn, device)
    return out, seconds, peak_since(device, base)


def commit_hash(folder) -> str:
    """The short hash of the commit checked out in `folder`'s repository (what produced a row), or "unknown"."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
