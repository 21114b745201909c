"""BatchNorm reset (Jordan et al. 2022, Sec. 5.2): re-estimate running statistics on calibration data."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from .._copy import copy_module
from ..errors import OnebasinError
from ..distributed import batches, distributed


def reset_bn(model: nn.Module, data: Iterable, max_examples: int | None = 5000) -> nn.Module:
    """A copy of `model` whose BatchNorm running statistics are re-estimated on `data` (Jordan et al. 2022, Sec. 5.2).

    Every BatchNorm's statistics are reset and re-accumulated as a cumulative average (momentum=None)
    over the batches of the first `max_examples` examples, with the BatchNorms in train mode and
    everything else (dropout...) in eval mode, without gradients; each BatchNorm sees inputs normalised
    by the batch statistics of earlier ones, so use large batches. Batches of one example are skipped.
    Under torch.distributed every rank reads its shard and the per-batch averages are combined across
    ranks, so the result equals one process's. For a net with BatchNorm after every conv this is the
    paper's equivalent of REPAIR of the conv outputs. Raises OnebasinError if there is no BatchNorm
    layer. `model` is not modified.
    """
    new = copy_module(model)
    bns = [m for m in new.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise OnebasinError(f"reset_bn: {type(model).__name__} has no BatchNorm layer (nothing to reset)")
    new.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    p = next(new.parameters())
    with torch.no_grad():
        for x in batches(data, max_examples, p.device):
            x = x.to(p.dtype) if x.is_floating_point() else x
            if x.shape[0] > 1:
                new(x)
    if distributed()[1] > 1:
        _combine_bn_stats(bns)
    for bn, old in zip(bns, (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))):
        bn.momentum = old.momentum
    return new.train(model.training)


def _combine_bn_stats(bns: list) -> None:
    """Cumulative per-batch averages of every rank -> the average over all batches of all ranks."""
    for bn in bns:
        count = bn.num_batches_tracked.double()
        sums = torch.cat([bn.running_mean.double() * count, bn.running_var.double() * count, count.view(1)])
        dist.all_reduce(sums)
        n = sums[-1].clamp_min(1)
        c = bn.running_mean.numel()
        bn.running_mean.copy_(sums[:c] / n)
        bn.running_var.copy_(sums[c : 2 * c] / n)
        bn.num_batches_tracked.fill_(int(sums[-1].item()))
