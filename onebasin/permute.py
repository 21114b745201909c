"""Apply, invert and compose permutations of a network's hidden units (pure functions over state_dicts).

Convention (as git-re-basin, Ainsworth et al. 2022): `perms[g]` is a LongTensor p of the group's size;
permuting moves old unit p[i] to new index i, i.e. every member axis is indexed with p
(`new = old.index_select(axis, p)`). Aligning B to A therefore returns, for each group, the index of the
unit of B that matches unit i of A. A structured group's permutation is an index vector too, of the form
p[j*k + i] = sigma(j)*k + tau_j(i) (`block_perm`, `split_block_perm`), so invert and compose need no case.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._copy import module_with
from .errors import InvalidOptionError
from .spec import Group, Member, PermutationSpec

Perms = dict[str, torch.Tensor]
StateDict = dict[str, torch.Tensor]


def identity_perms(spec: PermutationSpec) -> Perms:
    """The identity permutation of every group."""
    return {name: torch.arange(g.size) for name, g in spec.groups.items()}


def block_perm(sigma: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The unit permutation (b*k,) that moves block sigma[j] to j and, inside it, unit tau[j, i] to i.

    sigma: (b,) LongTensor; tau: (b, k) LongTensor, each row a permutation of range(k).
    """
    return (sigma[:, None] * tau.shape[1] + tau).reshape(-1)


def split_block_perm(p: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma (b,), tau (b, k)) of a block-structured permutation p (b*k,); ValueError if p moves units across blocks."""
    q = p.view(-1, block)
    sigma = q[:, 0] // block
    if not torch.equal(q // block, sigma[:, None].expand_as(q)):
        raise ValueError(f"permutation moves units across blocks of {block}")
    return sigma, q % block


def random_perms(spec: PermutationSpec, seed: int = 0) -> Perms:
    """A uniformly random permutation of every group, respecting block structure; deterministic in `seed`."""
    gen = torch.Generator().manual_seed(seed)
    perms: Perms = {}

    def draw(g: Group) -> None:
        if g.name in perms:
            return
        if not g.structured:
            perms[g.name] = torch.randperm(g.size, generator=gen)
            return
        if g.parent is not None:
            draw(spec.groups[g.parent])
        sigma = perms[g.parent] if g.parent else torch.arange(g.blocks) if g.fixed_blocks else torch.randperm(g.blocks, generator=gen)
        rows = [torch.randperm(g.block, generator=gen) if g.inner else torch.arange(g.block) for _ in range(g.blocks)]
        perms[g.name] = block_perm(sigma, torch.stack(rows))

    for g in spec.groups.values():
        draw(g)
    return perms


def check_perms(spec: PermutationSpec, perms: Perms, name: str = "perms") -> None:
    """InvalidOptionError naming `name` and the group unless every entry of `perms` is a permutation of its
    group: a known group, an integer tensor of the group's size holding each unit once, with its block structure."""
    for group, p in perms.items():
        if group not in spec.groups:
            raise InvalidOptionError(f"{name}: unknown group {group!r}; the spec's groups: {', '.join(spec.groups)}")
        g = spec.groups[group]
        where = f"{name}[{group!r}]"
        if not isinstance(p, torch.Tensor) or p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
            what = f"a {p.dtype} tensor" if isinstance(p, torch.Tensor) else f"a {type(p).__name__}"
            raise InvalidOptionError(f"{where} must be a tensor of integers (unit indices), got {what}")
        if p.shape != (g.size,):
            raise InvalidOptionError(f"{where}: expected a permutation of the group's {g.size} units, got shape {tuple(p.shape)}")
        if not torch.equal(torch.sort(p.cpu()).values, torch.arange(g.size)):
            counts = torch.bincount(p.cpu().clamp(0, g.size), minlength=g.size + 1)
            raise InvalidOptionError(f"{where} is not a permutation of {g.size} units (unit {int(counts.argmax())} "
                                     f"appears {int(counts.max())} times, {int((counts[:g.size] == 0).sum())} units never)")
        if not g.structured:
            continue
        try:
            sigma, tau = split_block_perm(p, g.block)
        except ValueError as err:
            raise InvalidOptionError(f"{where}: {err}") from None
        if g.parent is not None and g.parent in perms and not torch.equal(sigma, perms[g.parent].to(sigma)):
            raise InvalidOptionError(f"{where}: its blocks must move as group {g.parent!r}")
        if g.fixed_blocks and not torch.equal(sigma, torch.arange(g.blocks)):
            raise InvalidOptionError(f"{where}: its blocks must stay in place")
        if not g.inner and not torch.equal(tau, torch.arange(g.block).expand_as(tau)):
            raise InvalidOptionError(f"{where}: units may not move inside their blocks")


def check_perm_list(spec: PermutationSpec, perms, n_models: int) -> None:
    """InvalidOptionError unless `perms` holds one complete perms dict per model (`check_perms` on each)."""
    if not isinstance(perms, (list, tuple)) or len(perms) != n_models:
        count = f"{len(perms)} given" if isinstance(perms, (list, tuple)) else f"a {type(perms).__name__} given"
        raise InvalidOptionError(f"perms: {count} for {n_models} models; pass one {{group: permutation}} dict per model")
    for i, p in enumerate(perms):
        if not isinstance(p, dict):
            raise InvalidOptionError(f"perms[{i}] is a {type(p).__name__}, not a {{group: permutation}} dict")
        check_perms(spec, p, f"perms[{i}]")
        if missing := [g for g in spec.groups if g not in p]:
            raise InvalidOptionError(f"perms[{i}] has no permutation for group {missing[0]!r}"
                                     f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")


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


def permute_member(t: torch.Tensor, m: Member, p: torch.Tensor) -> torch.Tensor:
    """t with member m's axis re-indexed by its group's permutation p (any layout; see spec.Member)."""
    p = p.to(t.device)
    if m.diag:
        return _permute_in_group(t, m.axis, p)
    if m.layout is None:
        return permute_tensor(t, m.axis, p, m.block)
    pos = m.layout.positions().to(t.device)
    index = torch.arange(t.shape[m.axis], device=t.device)
    index[pos.reshape(-1)] = pos[p].reshape(-1)
    return t.index_select(m.axis, index)


def _permute_in_group(t: torch.Tensor, axis: int, p: torch.Tensor) -> torch.Tensor:
    """Grouped conv weight (g*ko, ki, ...), rows already in their new order: inside row block j, the
    input index i becomes tau_j(i) (p = the input group's permutation, g blocks of ki units)."""
    ki = t.shape[axis]
    tau = (p.view(-1, ki) % ki)  # (g, ki)
    g = tau.shape[0]
    grouped = t.reshape(g, t.shape[0] // g, *t.shape[1:])  # (g, ko, ki, ...)
    shape = [g, 1, ki] + [1] * (t.ndim - 2)
    index = tau.view(shape).expand(grouped.shape)
    return torch.gather(grouped, axis + 1, index).reshape(t.shape)


def apply_perms(spec: PermutationSpec, perms: Perms, state_dict: StateDict) -> StateDict:
    """A new state_dict with every group's axes permuted; tensors outside the spec are passed through.

    Args:
        spec: the network's PermutationSpec.
        perms: group name -> LongTensor (size,). Groups missing from `perms` stay unpermuted.
        state_dict: key -> tensor; not modified.
    """
    out = dict(state_dict)
    for key, members in spec.members_of.items():
        if key not in state_dict:
            continue
        t = state_dict[key]
        for group, m in sorted(members, key=lambda gm: gm[1].diag):  # in-group axes after the rows they follow
            if group in perms:
                t = permute_member(t, m, perms[group])
        out[key] = t
    return out


def permute_model(model: nn.Module, spec: PermutationSpec, perms: Perms) -> nn.Module:
    """A copy of `model` with its units permuted (the same function); `model` itself is not modified.

    Raises InvalidOptionError naming the group when an entry of `perms` is not a permutation (`check_perms`),
    UnsupportedOpError for a forward hook that reads the model's tensors through a closure (`copy_module`).
    """
    check_perms(spec, perms)
    return module_with(model, apply_perms(spec, perms, model.state_dict()))
