"""The straight-through estimator of learned matching (Ainsworth, Hayase, Srinivasa 2023, Git Re-Basin, Sec. 3.3):
the projection of a latent matrix to the nearest permutation (or orthogonal map of a residual stream) and the
gradient of the loss with respect to the hard map, read as a dense matrix. `learned.py` runs the loop.
"""

from __future__ import annotations

import torch

from ..permute import Perms, StateDict
from ..spec import PermutationSpec
from ._structured import solve_families
from .orthogonal import map_group, procrustes
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


def block_orthogonal(latent: torch.Tensor, block: int) -> torch.Tensor:
    """The block-diagonal orthogonal matrix nearest `latent` (n, n) in Frobenius norm, blocks of `block` (one per
    attention head): U V^T of the SVD of each diagonal block (the off-diagonal blocks are ignored)."""
    out = torch.zeros_like(latent, dtype=torch.float64)
    for i in range(0, len(latent), block):
        u, _, vh = torch.linalg.svd(latent[i:i + block, i:i + block].double())
        out[i:i + block, i:i + block] = u @ vh
    return out


def ste_gradients(spec: PermutationSpec, perms: Perms, grads: StateDict, mapped_b: StateDict,
                  maps: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """dloss/dP (n, n) float64 of every group in `names` and dloss/dM of every map in `maps`, each read as a dense matrix.

    T(B) = perms applied to mapped_b, mapped_b = B with every map M_g applied along its group's axes first (a stream's
    orthogonal map; a head group's block-diagonal map, in B's order). grads: dloss/dT(B) per permuted tensor.
    A permuted group's gradient is its weight-matching score against `grads` with B's other axes transformed. A
    mapped group's axes carry R = P M (P = its permutation, the identity for a stream): dloss/dR is that score with
    the group's own map undone (M^T along its axes: M is orthogonal), and dloss/dM = P^T dloss/dR.
    """
    out = {g: weight_scores(spec, g, perms, grads, mapped_b) for g in names}
    for name, q in maps.items():
        n = spec.groups[name].size
        others = map_group(spec, mapped_b, name, q.T)  # every axis but this group's mapped
        score = weight_scores(spec, name, {**perms, name: torch.arange(n)}, grads, others)
        out[name] = permutation_matrix(perms[name]).T @ score if name in perms else score
    return out
