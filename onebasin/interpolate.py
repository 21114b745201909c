"""Linear interpolation of weights: theta_alpha = (1 - alpha) * theta_A + alpha * theta_B."""

from __future__ import annotations

import torch

from .checks import check_same_architecture

StateDict = dict[str, torch.Tensor]


def lerp(sd_a: StateDict, sd_b: StateDict, alpha: float) -> StateDict:
    """The state_dict (1 - alpha) * sd_a + alpha * sd_b (Entezari et al. 2021, eq. 1).

    Floating tensors are interpolated in their own dtype. Integer buffers (BatchNorm's
    `num_batches_tracked`) are interpolated and rounded, so equal counters stay equal and the result
    is the count nearest the interpolated one. Raises ArchitectureMismatchError if keys or shapes differ.
    """
    check_same_architecture(sd_a, sd_b)
    out = {}
    for k, a in sd_a.items():
        b = sd_b[k].to(a.device)
        if a.is_floating_point() or a.is_complex():
            out[k] = torch.lerp(a, b.to(a.dtype), alpha)  # exact at alpha = 0 and 1
        else:
            out[k] = torch.round((1 - alpha) * a.double() + alpha * b.double()).to(a.dtype)
    return out
