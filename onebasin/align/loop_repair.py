"""REPAIR inside the loop of learned matching: the interpolated network's layer sites renormalised, from each
batch's statistics, to the interpolation of the endpoints' unit statistics (Jordan et al. 2022, eq. 4), so that
the permutations are learnt for the network REPAIR will return. `learned._Run.repair` installs the hooks.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..checks import eval_mode
from ..graph import as_call, take_rows
from ..graph import batch_size as batch_size_of
from ..spec import PermutationSpec, Site
from ..stats import Moments


def repair_sites(spec: PermutationSpec) -> list[tuple[str, Site]]:
    """(group, site) of every layer site (a module's output) holding a whole group. A group with a map (a residual
    stream, attention heads) mixes B's units, so its goals come from B's covariance (`mapped_goal`), not from a
    permutation of B's unit statistics."""
    return [(g.name, s) for g in spec.groups.values()
            for s in g.sites if s.kind == "layer" and s.module is not None and s.size is None]  # fmt: skip


def _units(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(samples, units) view of an activation with its units on axis `dim`."""
    return t.movedim(dim, -1).reshape(-1, t.shape[dim])


def unit_moments(model: nn.Module, sites: list[tuple[str, Site]], x, batch_size: int = 100, full: tuple = ()) -> dict:
    """{site: (mean, std)} float64 (units,) of each site's units over the inputs x (population std), summed by
    `stats.Moments` over forwards of `batch_size` rows (no float64 copy of a whole site's activations); for the
    sites of the groups in `full`, (mean, covariance (units, units)) instead."""
    moments = {s: Moments(full=g in full) for g, s in sites}
    hooks = [model.get_submodule(s.module).register_forward_hook(lambda m, i, o, s=s: moments[s].update(_units(o.detach(), s.dim)))
             for _, s in sites]  # fmt: skip
    try:
        with torch.no_grad(), eval_mode(model):
            for idx in torch.arange(batch_size_of(x)).split(batch_size):
                args, kwargs = as_call(take_rows(x, idx))
                model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return {s: (m.mean_x, m.cov_x if m.full else m.var_x.clamp_min(0).sqrt()) for s, m in moments.items()}


def mapped_goal(mean: torch.Tensor, cov: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) (units,) of the units R x of a site whose units x have `mean` (n,) and covariance `cov` (n, n):
    R mean and sqrt(diag(R cov R^T)), R (n, n) the dense map of the site's units (a permutation times a map)."""
    r = r.to(cov)
    return r @ mean, ((r @ cov) * r).sum(1).clamp_min(0).sqrt()


def renormalise(out: torch.Tensor, dim: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """`out` with each unit (axis `dim`) standardised over the batch, then given `mean` and `std` (units,): REPAIR's
    correction (Jordan et al. 2022, eq. 4) with the batch's own statistics, differentiable."""
    y = out.movedim(dim, -1)
    samples = tuple(range(y.dim() - 1))
    centred = y - y.mean(samples)
    var = centred.square().mean(samples)  # two passes: torch's std over the sample dims is ~10x slower
    sd = var.clamp_min(1e-24).sqrt()  # a constant unit (one example): no infinite gradient of sqrt at 0
    return (centred / (sd + 1e-12) * std.to(y) + mean.to(y)).movedim(-1, dim)
