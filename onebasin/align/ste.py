"""The straight-through estimator of learned matching (Ainsworth, Hayase, Srinivasa 2023, Git Re-Basin, Sec. 3.3):
the projection of a latent matrix to the nearest permutation (or orthogonal map of a residual stream) and the
gradient of the loss with respect to the hard map, read as a dense matrix. `learned.py` runs the loop.
"""

from __future__ import annotations

import torch

from ..permute import Perms, StateDict
from ..spec import PermutationSpec
from ._structured import solve_families
from .orthogonal import map_streams, procrustes
from .weight import weight_scores


def permutation_matrix(p: torch.Tensor) -> torch.Tensor:
    """(n, n) float64 P with P[i, p[i]] = 1: P @ rows(B) is B with its units re-indexed by p (permute.py)."""
    m = torch.zeros(len(p), len(p), dtype=torch.float64)
    m[torch.arange(len(p)), p.cpu()] = 1.0
    return m


def project(spec: PermutationSpec, latents: dict[str, torch.Tensor], names: list[str] | None = None) -> Perms:
    """The permutation of each group in `names` (default: the latents') nearest its latent (n, n): argmax <L, P>.

    Free groups: one linear assignment each. Block-structured families (heads with their query/key and
    value/output groups, GQA, rotary's fixed insides) are solved jointly (`_structured.solve_families`).
    """
    return solve_families(spec, latents, list(latents) if names is None else names)


def nearest_orthogonal(latent: torch.Tensor) -> torch.Tensor:
    """The orthogonal Q with Q 1 = 1 nearest `latent` (n, n) in Frobenius norm (SVD on the complement of 1)."""
    return procrustes(latent)


def ste_gradients(spec: PermutationSpec, perms: Perms, grads: StateDict, mapped_b: StateDict, b: StateDict,
                  maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """dloss/dP (n, n) float64 of every group of `perms` and every stream of `maps`, P read as a dense matrix.

    grads: dloss/dT(B) per permuted tensor; mapped_b: B with every stream mapped (unpermuted); b: B unmapped.
    A group's gradient is its weight-matching score against `grads` with B's other axes mapped.
    """
    out = {g: weight_scores(spec, g, perms, grads, mapped_b) for g in perms if g not in maps}
    for name in maps:
        others = map_streams(spec, b, {s: q for s, q in maps.items() if s != name}) if len(maps) > 1 else b
        out[name] = weight_scores(spec, name, {**perms, name: torch.arange(spec.groups[name].size)}, grads, others)
    return out
