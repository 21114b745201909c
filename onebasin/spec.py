"""Permutation structure of a network: which (tensor, axis) pairs must share one permutation.

A hidden unit of a network can be moved to another index without changing the function, as long as
every tensor axis that indexes that unit moves with it: the producing layer's output rows and bias,
the norm layer's parameters and running statistics, the next layer's input columns, and every
tensor added into the same residual stream. A `PermutationSpec` lists those axes, grouped: one group
per independent permutation. It is pure data keyed by state_dict names (after git-re-basin's
`PermutationSpec`, Ainsworth et al. 2022): `trace` derives it from any `nn.Module` (torch.export, see
`onebasin.tracer`), `from_groups` accepts a hand-written one, and every algorithm consumes it without
looking at module types again.

Structured groups (see ../shared/notes/symmetries.md, Sec. 1). A group with `block` = k > 1 holds
size // k blocks of k consecutive units; its permutations move whole blocks (sigma) and, when
`inner`, permute the units inside each block independently (tau_j): unit j*k + i of the new order is
unit sigma(j)*k + tau_j(i) of the old one. `parent` names the group (of size // k units) whose
permutation is sigma, so that several groups share one block permutation (attention heads: the
query/key group and the value/output group share the head permutation); `fixed_blocks` keeps
sigma the identity. A permutation of a group is always a plain index vector of its size (the
`onebasin.permute` convention), so composing and inverting need no special case.
"""

from ._spec import Group, Layout, Member, PermutationSpec, Site, from_groups
from .tracer import trace

__all__ = ["Group", "Layout", "Member", "PermutationSpec", "Site", "from_groups", "trace"]
