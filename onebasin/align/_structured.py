"""Linear assignment for structured groups (attention heads, conv groups; see onebasin.spec).

A family is a group with the groups whose blocks it moves (its children: the query/key and value/output
groups of one attention layer under their head group). Given a score matrix per group (unit i of A vs
unit j of B; zero where a group has none of its own), the family is solved as Verma & Elbayad 2024 match
heads: the value of pairing block j of A with block j' of B is the best assignment inside that pair of
blocks (summed over the children that share the blocks), the blocks are assigned on those values, then
the units inside each matched pair of blocks. Free groups reduce to one Hungarian assignment.
"""

from __future__ import annotations

import numpy as np
import torch

from ..permute import Perms, block_perm
from ..spec import Group, PermutationSpec
from ._registry import assignment


def _lap(score: np.ndarray) -> tuple[np.ndarray, float]:
    """(p, value): p[i] = column given to row i, maximising the summed score."""
    p = assignment(score)
    return p, float(score[np.arange(len(p)), p].sum())


def _block_values(score: np.ndarray, k: int, inner: bool) -> tuple[np.ndarray, dict]:
    """(b, b) values of pairing block j with block j' (best inside assignment, or the diagonal when the
    inside is fixed), and the inside assignments {(j, j'): tau}."""
    b = score.shape[0] // k
    values, taus = np.zeros((b, b)), {}
    for j in range(b):
        for jj in range(b):
            sub = score[j * k : (j + 1) * k, jj * k : (jj + 1) * k]
            if inner:
                taus[j, jj], values[j, jj] = _lap(sub)
            else:
                values[j, jj] = float(np.trace(sub))
    return values, taus


def family_root(spec: PermutationSpec, name: str) -> str:
    """The topmost group whose blocks `name`'s blocks follow (itself for a group without a parent)."""
    while spec.groups[name].parent is not None:
        name = spec.groups[name].parent
    return name


def solve_families(spec: PermutationSpec, scores: dict[str, torch.Tensor], names: list[str] | None = None,
                   given: Perms | None = None) -> Perms:
    """Permutations of `names` (default all groups) maximising the summed scores, respecting block structure.

    scores: group -> (size, size) score of pairing unit i of A with unit j of B (higher is better); a
    group missing from `scores` contributes nothing of its own. A group in `names` whose parent is not
    in `names` takes its blocks from the parent's permutation in `given` (identity if absent): the caller
    holds that parent fixed.
    Returns {group: LongTensor (size,)} in the onebasin.permute convention.
    """
    names = list(spec.groups) if names is None else names
    chosen = set(names)
    own = {n: (scores[n].detach().double().cpu().numpy() if n in scores else np.zeros((spec.groups[n].size,) * 2)) for n in names}
    total: dict[str, np.ndarray] = {}

    def gather(g: Group) -> np.ndarray:
        """The group's own score plus, per pair of its units, the block values of its children."""
        if g.name not in total:
            s = own[g.name].copy()
            for c in spec.children(g.name):
                if c.name in chosen:
                    s += _block_values(gather(c), c.block, c.inner)[0]
            total[g.name] = s
        return total[g.name]

    perms: Perms = {}

    def place(g: Group, sigma: np.ndarray | None) -> None:
        score = gather(g)
        if not g.structured:
            p = _lap(score)[0] if sigma is None else sigma
        else:
            values, taus = _block_values(score, g.block, g.inner)
            if sigma is None:
                sigma = np.arange(g.blocks) if g.fixed_blocks else _lap(values)[0]
            tau = np.stack([taus[j, sigma[j]] if g.inner else np.arange(g.block) for j in range(g.blocks)])
            p = block_perm(torch.as_tensor(sigma), torch.as_tensor(tau)).numpy()
        perms[g.name] = torch.as_tensor(p, dtype=torch.long)
        for c in spec.children(g.name):
            if c.name in chosen:
                place(c, p)

    for n in names:
        g = spec.groups[n]
        if (g.parent is None or g.parent not in chosen) and n not in perms:
            if g.parent is None:
                place(g, None)
            else:
                fixed = (given or {}).get(g.parent)
                place(g, np.arange(g.blocks) if fixed is None else fixed.cpu().numpy())
    return perms
