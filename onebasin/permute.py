"""Apply, invert and compose permutations of a network's hidden units (pure functions over state_dicts).

Convention (as git-re-basin, Ainsworth et al. 2022): `perms[g]` is a LongTensor p of the group's size;
permuting moves old unit p[i] to new index i, i.e. every member axis is indexed with p
(`new = old.index_select(axis, p)`). Aligning B to A therefore returns, for each group, the index of the
unit of B that matches unit i of A.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .spec import PermutationSpec

Perms = dict[str, torch.Tensor]
StateDict = dict[str, torch.Tensor]


def identity_perms(spec: PermutationSpec) -> Perms:
    """The identity permutation of every group."""
    return {name: torch.arange(g.size) for name, g in spec.groups.items()}


def random_perms(spec: PermutationSpec, seed: int = 0) -> Perms:
    """A uniformly random permutation of every group, deterministic in `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(g.size, generator=gen) for name, g in spec.groups.items()}


def invert_perms(perms: Perms) -> Perms:
    """The inverse permutation of every group: apply(invert(p)) undoes apply(p)."""
    return {name: torch.argsort(p) for name, p in perms.items()}


def compose_perms(first: Perms, then: Perms) -> Perms:
    """The permutation that equals applying `first`, then `then` (groups missing from one are identity)."""
    out = dict(first)
    for name, q in then.items():
        out[name] = first[name][q] if name in first else q
    return out


def _block_index(p: torch.Tensor, block: int) -> torch.Tensor:
    """Expand a unit permutation (n,) to an index over n*block positions, moving each block whole."""
    if block == 1:
        return p
    return (p[:, None] * block + torch.arange(block)).reshape(-1)


def permute_tensor(t: torch.Tensor, axis: int, p: torch.Tensor, block: int = 1) -> torch.Tensor:
    """t with axis `axis` re-indexed by permutation p (size t.shape[axis] // block)."""
    return t.index_select(axis, _block_index(p, block).to(t.device))


def apply_perms(spec: PermutationSpec, perms: Perms, state_dict: StateDict) -> StateDict:
    """A new state_dict with every group's axes permuted; tensors outside the spec are passed through.

    Args:
        spec: the network's PermutationSpec.
        perms: group name -> LongTensor (size,). Groups missing from `perms` stay unpermuted.
        state_dict: key -> tensor; not modified.
    """
    out = dict(state_dict)
    for key, axes in spec.axes_of.items():
        t = state_dict[key]
        for axis, group, block in axes:
            if group in perms:
                t = permute_tensor(t, axis, perms[group], block)
        out[key] = t
    return out


def permute_model(model: nn.Module, spec: PermutationSpec, perms: Perms) -> nn.Module:
    """A copy of `model` with its units permuted (the same function); `model` itself is not modified."""
    new = copy.deepcopy(model)
    new.load_state_dict(apply_perms(spec, perms, model.state_dict()))
    return new
