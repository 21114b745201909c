"""Orthogonal alignment of the residual stream of pre-norm transformers (Theus et al. 2025, "Generalized
Linear Mode Connectivity for Transformers", Sec. 3; ../shared/notes/symmetries.md, Sec. 3).

Permutations are not the only symmetry of a residual stream: any orthogonal Q that maps the ones vector
to itself leaves a pre-norm transformer's function unchanged once the network is written in a canonical
form. Both A and B are first rewritten, without changing their functions:

1. every LayerNorm's gain and bias fold into the layers that read it (W' = W diag(gamma), b' = b + W beta;
   gamma = 1, beta = 0);
2. every tensor of the stream is centred along the stream axis (C = I - 11^T/n): writers then add only
   centred vectors, and readers see LayerNorm outputs, which are centred already.

LayerNorm is then plain normalisation of centred vectors, which commutes with Q, and re-basing the stream
is one rule for every tensor that indexes it: apply Q along that axis (writers W -> Q W, readers
W -> W Q^T, embedding rows e -> Q e). Q comes from orthogonal Procrustes on the stream activations of A
and B (one pass, exact float64 sums of x_A x_B^T over every stream site), restricted to the complement
of the ones vector. The other groups (MLP hidden units, attention heads) are permuted first by
activation or weight matching. The merged model is a plain model of the original class (LayerNorms with
unit gain and zero bias).

Tied, bias-free heads (nanoGPT: LM head = token embedding, no head bias). The final LayerNorm feeds only the
head. Its gain cannot fold into the shared matrix without changing the embedding, and a non-uniform gain does
not commute with an orthogonal map, so: a uniform gain c stays in the norm (c 1 commutes with every map);
any other gain needs `untie=True` (the head gets its own copy, recorded) and is refused without it. A shift
that a reader without bias cannot take stays in the norm as a stream vector, rotated with the stream
(LN(Qx) + Q s = Q (LN(x) + s)); that norm's readers are then not centred.

Data-free (`stream="weights"`, Theus et al.'s weight matching): Q by Procrustes on the canonical weights instead
of the activations, alternated with weight matching of the MLP units and head matching by each head's QK and OV
products (||QK_i - QK_j||^2 + ||OV_i - OV_j||^2, invariant to the maps inside a head).

Inside heads (`heads="orthogonal"`): a head's query/key dims, and its value/output dims, admit any
orthogonal map M (q -> M q and k -> M k keep q.k; v -> M v with W_O -> W_O M^T keeps W_O v), of which the
permutations inside a head are a special case. After the permutations, each head of B gets the M nearest A's head
by Procrustes on the weights (`head_maps`; with `stream="weights"` alternated with the stream's Procrustes). B's
function is unchanged; the merged model is still of the original class.
"""

from __future__ import annotations

import operator
import time
from dataclasses import replace

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from .._copy import copy_module, module_with, untie_parameters
from ..graph import as_call, model_inputs, module_path
from ..ops import LAYERS, NORMS, VIEWS, args_of
from ..permute import apply_perms, identity_perms
from ..spec import Group, PermutationSpec
from ..distributed import batches
from ..stats import Moments, eval_mode
from ..taps import visit_pairs
from ..errors import InvalidOptionError
from ._registry import AlignmentError, AlignResult, assign, device_of, get_method, register_method, require_module

def stream_groups(spec: PermutationSpec) -> list[Group]:
    """The residual streams: free groups read at a residual addition (a "block" site)."""
    return [g for g in spec.groups.values() if not g.structured and any(s.kind == "block" for s in g.sites)]


def _norm_readers(spec: PermutationSpec, group: Group) -> list[tuple[str, str | None, list[tuple[str, str | None, int]]]]:
    """[(norm weight key, norm bias key, [(reader weight key, reader bias key, reader's input axis)])] for each
    LayerNorm on the stream (a centring norm over the last axes, `ops.NORMS`) and the layers (`ops.LAYERS`
    on the last axis) that read it through views (`ops.VIEWS`). A tied reader weight is named by the key its
    own module holds (`lm_head.weight`, not the embedding's `tok_embed.weight`)."""
    graph = spec.graph
    keys = {(m.key, m.axis) for m in group.members}
    out = []
    for node in graph.graph.nodes:
        norm = NORMS.get(node.target) if node.op == "call_function" else None
        if norm is None or norm.over != "last" or not norm.centred:
            continue
        w, b = (_key(graph, args_of(node), name) for name in (norm.weight, norm.bias))
        if (w, 0) not in keys:
            continue
        readers, todo = [], [(user, node) for user in node.users]
        while todo:
            user, src = todo.pop()
            layer = LAYERS.get(user.target)
            if user.target in VIEWS or (user.target is operator.getitem and user.args[1] == 0):
                todo += [(u, user) for u in user.users]
            elif layer is not None and layer.feature_dim == -1 and args_of(user)[layer.input] is src:
                a = args_of(user)
                readers.append((_own_key(graph, user, _key(graph, a, layer.weight)), _key(graph, a, layer.bias), layer.in_axis))
            else:
                raise AlignmentError(f"orthogonal alignment: LayerNorm {w!r} feeds {user.target} ({user.name}); only "
                                     "linear layers may read a LayerNorm of the residual stream")  # fmt: skip
        out.append((w, b, readers))
    return out


def _key(graph, args: dict, name: str | None) -> str | None:
    """The state_dict key of argument `name` of an op (None: no such argument, or not a weight)."""
    arg = args.get(name) if name else None
    return graph.keys.get(arg.name) if arg is not None else None


def _own_key(graph, node, key: str) -> str:
    """Of the keys holding `key`'s tensor (several when tied), the one the module that made `node` holds."""
    own = [k for k in graph.aliases.get(key, (key,)) if k.rpartition(".")[0] == (module_path(node) or "")]
    return own[0] if len(own) == 1 else key


def tied_readers(spec: PermutationSpec, streams: list[Group]) -> list[str]:
    """Keys of the weights that read a stream LayerNorm and are tied to another key (a tied LM head)."""
    return [rw for g in streams for _, _, readers in _norm_readers(spec, g) for rw, _, _ in readers
            if len(spec.graph.aliases.get(rw, (rw,))) > 1]  # fmt: skip


def _along(t: torch.Tensor, axis: int, q: torch.Tensor) -> torch.Tensor:
    """t with matrix q applied along `axis`: every vector v along that axis becomes q v."""
    return torch.movedim(torch.tensordot(q.to(t), t, dims=([1], [axis])), 0, axis)


def _fold(sd: dict, w: str, b: str | None, readers: list, aliases: dict, untie: bool) -> bool:
    """Fold LayerNorm (w, b) into its readers in `sd` (in place); True when the norm's output stays centred.

    gain gamma: into every reader, W' = W diag(gamma), gamma = 1; a reader tied to another tensor (a tied LM
      head) cannot take it without changing that tensor, so there gamma stays in the norm, which needs gamma
      uniform (c 1 commutes with every orthogonal map; refused otherwise) unless `untie`.
    shift beta: into the readers' biases, b' = b + W beta, beta = 0; when a reader has no bias (nanoGPT's LM
      head) it stays in the norm as beta / gamma (beta with the gain kept), a stream vector that the
      orthogonal map rotates like any other: LN(Qx) + Q s = Q (LN(x) + s).
    """
    gamma, beta = sd[w].double(), sd[b].double() if b else None
    tied = [rw for rw, _, _ in readers if len(aliases.get(rw, (rw,))) > 1]
    keep_gain = bool(tied) and not untie
    if keep_gain and _uniform(gamma, sd[w].dtype):
        sd[w] = torch.full_like(sd[w], gamma.mean().item())  # exactly uniform again (a map leaves rounding errors)
    elif keep_gain:
        rw = tied[0]
        others = [k for k in aliases[rw] if k != rw]
        raise AlignmentError(
            f"orthogonal alignment: LayerNorm {w!r} feeds {rw!r}, which is tied to {', '.join(map(repr, others))}: its gain "
            "(not uniform) cannot fold into the shared matrix without changing the embedding, and it does not commute "
            "with an orthogonal map of the stream; pass untie=True (--untie; A and B come back with their own copy of "
            f"{rw!r}, listed in record['untied']) or align by permutations only (method 'activation' or 'weight'), which keep the tie")  # fmt: skip
    fold_shift = beta is None or not bool(beta.any()) or all(rb is not None for _, rb, _ in readers)
    if not fold_shift and not keep_gain and bool(((gamma == 0) & (beta != 0)).any()):
        raise AlignmentError(f"orthogonal alignment: LayerNorm {w!r} has gain 0 where its shift is not, and a reader "
                             f"({', '.join(repr(rw) for rw, rb, _ in readers if rb is None)}) has no bias to take the shift")  # fmt: skip
    for rw, rb, axis in readers:
        weight = sd[rw].double()
        if rb is not None and beta is not None and fold_shift:
            sd[rb] = (sd[rb].double() + torch.tensordot(weight, beta, dims=([axis], [0]))).to(sd[rb])
        if not keep_gain:
            sd[rw] = (weight * gamma.reshape([-1 if d == axis else 1 for d in range(weight.ndim)])).to(sd[rw])
    if b and fold_shift:
        sd[b] = torch.zeros_like(sd[b])
    elif b and not keep_gain:
        sd[b] = torch.where(gamma == 0, 0.0, beta / torch.where(gamma == 0, 1.0, gamma)).to(sd[b])
    if not keep_gain:
        sd[w] = torch.ones_like(sd[w])
    return fold_shift


def _uniform(gamma: torch.Tensor, dtype: torch.dtype) -> bool:
    """All entries equal, up to the rounding an orthogonal map of the stream leaves (16 sqrt(n) eps relative)."""
    return bool((gamma - gamma.mean()).abs().max() <= 16 * len(gamma) ** 0.5 * torch.finfo(dtype).eps * gamma.abs().max())


def canonical(spec: PermutationSpec, model: nn.Module, streams: list[Group], untie: bool = False) -> nn.Module:
    """A copy of `model` with every stream LayerNorm folded into its readers and the stream centred (Sec. 3).

    Exceptions (`_fold`): a LayerNorm read by a tied weight keeps its (uniform) gain; one read by a layer
    without bias keeps its shift, and its readers are not centred (their input is not). `untie`: every tied
    reader (`tied_readers`) gets its own copy of the shared tensor first, so that the gain can fold into it.
    """
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    aliases = spec.graph.aliases
    for group in streams:
        norms = _norm_readers(spec, group)
        if not norms:
            raise AlignmentError(f"orthogonal alignment needs a pre-norm transformer: stream {group.name!r} has no LayerNorm")
        skip = set()
        for w, b, readers in norms:
            skip |= {w, b}
            if not _fold(sd, w, b, readers, aliases, untie):  # readers of an uncentred output stay as they are
                skip |= {k for rw, _, _ in readers for k in ((rw,) if untie else aliases.get(rw, (rw,)))}
        n = group.size
        centre = torch.eye(n, dtype=torch.float64) - 1.0 / n
        for m in group.members:
            if m.key not in skip:
                _require_plain(m)
                sd[m.key] = _along(sd[m.key].double(), m.axis, centre).to(sd[m.key])
    out = copy_module(model)
    if untie:
        untie_parameters(out, tied_readers(spec, streams))
    out.load_state_dict(sd)
    return out


def _check_canonical(model: nn.Module, canon: nn.Module, data) -> None:
    """AlignmentError unless the canonical form computes what the model computes (it does exactly when
    every reader of the stream reads it through a LayerNorm: a pre-norm transformer)."""
    args, kwargs = as_call(next(iter(model_inputs(model, batches(data, 16)))))  # a dict: keyword inputs
    with torch.no_grad(), eval_mode(model, canon):
        y, yc = model(*args, **kwargs), canon(*args, **kwargs)
    y, yc = (t if isinstance(t, torch.Tensor) else torch.cat([v.flatten() for v in pytree.tree_leaves(t) if isinstance(v, torch.Tensor)]) for t in (y, yc))
    tol = torch.finfo(y.dtype).eps ** 0.5 * max(1.0, y.abs().max().item())
    if not (y - yc).abs().max().item() <= tol:
        raise AlignmentError("orthogonal alignment needs a pre-norm transformer: some layer reads the residual stream "
                             "without a LayerNorm in between, so centring the stream changes the function")


def _require_plain(m) -> None:
    if m.block != 1 or m.layout is not None or m.diag:
        raise AlignmentError(f"orthogonal alignment: {m} is not a plain axis of the stream")


def map_streams(spec: PermutationSpec, sd: dict, maps: dict[str, torch.Tensor]) -> dict:
    """A new state_dict with every stream group's axes mapped by its orthogonal matrix (v -> O v, in float64);
    a stream axis must be plain (one position per unit)."""
    for name in maps:
        for m in spec.groups[name].members:
            _require_plain(m)
    return map_groups(spec, sd, maps)


def map_groups(spec: PermutationSpec, sd: dict, maps: dict[str, torch.Tensor]) -> dict:
    """A new state_dict with every group of `maps` mapped along its axes by its matrix (`map_group`, in turn)."""
    for name, q in maps.items():
        sd = map_group(spec, sd, name, q)
    return dict(sd)


def head_families(spec: PermutationSpec, names: list[str]) -> dict[str, list[str]]:
    """{head group: its child groups} for the attention families matched by `match_heads`: a parent group
    without members, not fixed, whose children (block = head size, free inside) each hold two parts (Q and K,
    or V and O; `_parts`). Other structured families (GQA, rotary) are left to weight matching."""
    out = {}
    for name in names:
        g, kids = spec.groups[name], spec.children(name)
        if g.members or g.parent is not None or g.fixed_blocks or not kids:
            continue
        if all(k.name in names and k.inner and not k.fixed_blocks and not spec.children(k.name)
               and len(_parts(k)) == 2 for k in kids):  # fmt: skip
            out[name] = [k.name for k in kids]
    return out


def _parts(group: Group) -> list[list]:
    """The group's members by the layer that owns them (module of the key, slice of a fused tensor): the query
    and key projections of a query/key group, the value and output projections of a value/output group."""
    parts: dict = {}
    for m in group.members:
        parts.setdefault((m.key.rpartition(".")[0], m.layout.start if m.layout is not None else None), []).append(m)
    return list(parts.values())


def head_products(spec: PermutationSpec, group: Group, sd: dict, perms: dict) -> torch.Tensor:
    """(heads, r1 * r2) float64: per head h, U1_h^T U2_h flattened, U_i (head size, r_i) the head's rows of part i
    (bias columns included; every other axis permuted by `perms`): W_Q^T W_K of a query/key group, (W_O W_V)^T of a
    value/output group. Invariant to any orthogonal map inside the head, permutations included."""
    from .weight import member_rows, other_axes_permuted

    rows = [torch.cat([member_rows(other_axes_permuted(spec, m.key, m.axis, perms, sd[m.key]).double(), m, group.size)
                       for m in part], 1) for part in _parts(group)]  # fmt: skip
    u1, u2 = (r.reshape(group.blocks, group.block, -1) for r in rows)
    return (u1.transpose(1, 2) @ u2).flatten(1)


def match_heads(spec: PermutationSpec, parent: str, children: list[str], sd_a: dict, sd_b: dict, perms: dict) -> dict:
    """Theus et al. 2025's head matching: sigma minimising sum_groups ||QK_i - QK_j||^2 + ||OV_i - OV_j||^2
    (`head_products`, A's head i against B's head j, B's other axes permuted by `perms`), then inside each matched
    pair of heads the permutation of every child group by linear assignment on its weight-matching score.
    Returns {parent: sigma, child: the structured permutation (unit j*d + u <- sigma(j)*d + tau_j(u))}."""
    from .weight import weight_scores

    cost = 0.0
    for name in children:
        pa, pb = (head_products(spec, spec.groups[name], sd, perms) for sd in (sd_a, sd_b))
        cost = cost + torch.cdist(pa, pb) ** 2
    sigma = assign(cost, maximize=False)
    out = {parent: sigma}
    for name in children:
        g, d = spec.groups[name], spec.groups[name].block
        score = weight_scores(spec, name, perms, sd_a, sd_b)
        out[name] = torch.cat([sigma[j] * d + assign(score[j * d : (j + 1) * d, sigma[j] * d : (sigma[j] + 1) * d])
                               for j in range(g.blocks)])  # fmt: skip
    return out


def weight_stream_maps(spec: PermutationSpec, sd_a: dict, sd_b: dict, streams: list[Group], max_iter: int = 20, *,
                       perms=None, maps: dict | None = None, head_products: bool = True, inside_heads: dict | None = None):
    """Data-free alignment of canonical forms (Theus et al. 2025, Sec. 3, weight matching): alternate weight
    matching of the other groups (B's streams mapped; attention heads by their QK and OV products,
    `match_heads`, unless `head_products` is False: then with the other groups) with, per stream, Procrustes on
    the weights: Q from cross = sum over the stream's tensors of rows_A @ rows_B^T (units of the stream as rows,
    every other axis of B permuted; `weight.weight_scores`), until neither the permutations nor the maps change.
    perms, maps: the start (default: none, the identity; learned matching's latent weights pass their current ones).
    inside_heads: a dict to fill with the maps inside heads (`head_maps`, applied after the permutations), found
    in every round after the heads are matched and applied to B before the streams' Procrustes; None: no such maps.
    Returns (perms of every group, the streams' the identity; {stream: Q (n, n) float64}; record)."""
    from .weight import match_weights, weight_scores

    names = [g for g in spec.groups if g not in {s.name for s in streams}]
    heads = head_families(spec, names) if head_products else {}
    free = [g for g in names if g not in heads and spec.groups[g].parent not in heads]
    maps = dict(maps) if maps is not None else {s.name: torch.eye(s.size, dtype=torch.float64) for s in streams}
    sweeps = []
    for it in range(max_iter):
        mapped = map_streams(spec, sd_b, maps)
        new, rec = match_weights(spec, sd_a, mapped, groups=free, init=perms)
        for parent, children in heads.items():
            new.update(match_heads(spec, parent, children, sd_a, mapped, new))
        inside = head_maps(spec, sd_a, apply_perms(spec, new, mapped), heads)[0] if inside_heads is not None else {}
        new_maps = {}
        for s in streams:
            others = apply_perms(spec, new, map_streams(spec, sd_b, {k: q for k, q in maps.items() if k != s.name}))
            others = map_groups(spec, others, inside)
            new_maps[s.name] = procrustes(weight_scores(spec, s.name, {}, sd_a, others))
        change = max((float((new_maps[k] - maps[k]).abs().max()) for k in maps), default=0.0)
        same = perms is not None and all(torch.equal(new[g], perms[g]) for g in names)
        perms, maps = new, new_maps
        if inside_heads is not None:
            inside_heads.clear(), inside_heads.update(inside)
        sweeps.append({"weight_sweeps": rec["iterations"], "map_change": change})
        if (same and change < 1e-12) or not streams:  # without a stream, weight matching has converged already
            break
    return perms, maps, {"rounds": sweeps, "converged": same and change < 1e-12, "head_families": list(heads)}


def map_group(spec: PermutationSpec, sd: dict, name: str, q: torch.Tensor) -> dict:
    """A new state_dict with every axis of group `name` mapped by the matrix q (n, n) (`map_members`)."""
    return map_members(sd, spec.groups[name], q)


def map_members(sd: dict, g: Group, q: torch.Tensor) -> dict:
    """A new state_dict with every axis of group g mapped by the matrix q (n, n) (v -> q v, in float64), any member
    layout (a unit's slice of a fused projection); a grouped conv's in-group axis is refused."""
    out = dict(sd)
    for m in g.members:
        if m.diag:
            raise AlignmentError(f"orthogonal alignment: {m} is a grouped conv's in-group axis, which a dense map cannot keep")
        t = out[m.key].double()
        if m.layout is None and m.block == 1:
            out[m.key] = _along(t, m.axis, q).to(sd[m.key])
            continue
        rows, pos = t.movedim(m.axis, 0).clone(), m.positions(g.size).reshape(-1).to(t.device)
        rows[pos] = (q.to(t) @ rows[pos].reshape(g.size, -1)).reshape(rows[pos].shape)
        out[m.key] = rows.movedim(0, m.axis).to(sd[m.key])
    return out


def inverse_part(group: Group) -> list:
    """The members of an attention head group that an invertible map M inside its heads reaches as M^-T (`map_linear`):
    the output projection's input columns of a value/output group (its reader), the key rows of a query/key group
    (its second part: q -> M q with k -> M^-T k keeps every q.k). Either part would do (M^-T on one side, M on the
    other, is M' and M'^-T with M' = M^-T); the loop's REPAIR reads the same choice."""
    parts = _parts(group)
    readers = [p for p in parts if any(m.axis == 1 and m.key.endswith("weight") for m in p)]
    return readers[0] if readers else parts[-1]


def map_linear(spec: PermutationSpec, sd: dict, name: str, m: torch.Tensor) -> dict:
    """A new state_dict with head group `name` mapped by an invertible block-diagonal m (n, n) (one block per head):
    the members of `inverse_part` by m^-T, the others by m (v -> m v along their axes; `map_members`), so that every
    head's q.k (or W_O v) and the network's function are unchanged. Differentiable in m. An orthogonal m maps as
    `map_group` does (m^-T = m)."""
    g = spec.groups[name]
    inverse = inverse_part(g)
    rest = replace(g, members=tuple(x for x in g.members if x not in inverse))
    other = replace(g, members=tuple(x for x in g.members if x in inverse))
    return map_members(map_members(sd, rest, m), other, torch.linalg.inv(m.double()).T)


def head_maps(spec: PermutationSpec, sd_a: dict, sd_b: dict, families: dict[str, list[str]]) -> tuple[dict, dict]:
    """({child group: (n, n) block-diagonal orthogonal map}, {child group: [<A, B> before, after]}): inside every
    attention head, the orthogonal map of the head's query/key dims (and of its value/output dims) that brings B's
    rows closest to A's in Frobenius norm.

    B (`sd_b`) is already in A's unit order (permuted, streams mapped). Per head h of a child group (d dims, the
    rows of its two parts side by side, `weight.member_rows`), M_h = U_h V_h^T from the SVD U_h S_h V_h^T of
    rows_A,h rows_B,h^T (orthogonal Procrustes; <A, B> goes from its trace to the sum of its singular values).
    Query and key rows take the same M_h, value rows M_h and the output projection's columns M_h^T, so QK^T and
    W_O W_V of every head, and B's function, are unchanged: the maps inside a head that Theus et al. 2025 (Sec. 3)
    list among a transformer's symmetries, here found on the weights, without data.
    families: {head group: its child groups} (`head_families`).
    """
    from .weight import weight_scores

    maps, objective = {}, {}
    for children in families.values():
        for name in children:
            g = spec.groups[name]
            score = weight_scores(spec, name, {}, sd_a, sd_b)  # (n, n) <unit i of A, unit j of B>
            blocks = [score[h * g.block:(h + 1) * g.block, h * g.block:(h + 1) * g.block] for h in range(g.blocks)]
            svds = [torch.linalg.svd(s) for s in blocks]
            maps[name] = torch.block_diag(*[u @ vh for u, _, vh in svds])
            objective[name] = [float(score.trace()), float(sum(sv.sum() for _, sv, _ in svds))]
    return maps, objective


def with_head_maps(spec: PermutationSpec, a: nn.Module, b: nn.Module, perms: dict) -> tuple[nn.Module, dict]:
    """(B with `head_maps` applied, record {"head_maps": [child groups], "head_objective": {group: [<A, B> before,
    after]}}) for the attention families among the groups of `perms`; B is in A's order already."""
    sd_b = b.state_dict()
    maps, objective = head_maps(spec, a.state_dict(), sd_b, head_families(spec, [g for g in spec.groups if g in perms]))
    return module_with(b, map_groups(spec, sd_b, maps)), {"head_maps": list(maps), "head_objective": objective}


def rebase(model: nn.Module, group: Group, q: torch.Tensor) -> nn.Module:
    """A copy of a canonical `model` with its stream re-based by orthogonal q (n, n), q @ 1 = 1."""
    for m in group.members:
        _require_plain(m)
    return module_with(model, map_members(model.state_dict(), group, q))


def procrustes(cross: torch.Tensor) -> torch.Tensor:
    """The orthogonal Q with Q 1 = 1 maximising tr(Q^T cross), cross = sum x_A x_B^T (n, n), float64.

    Solved on the complement of the ones vector: with an orthonormal basis P of it (n, n-1),
    Q = P U V^T P^T + 11^T/n where U S V^T is the SVD of P^T cross P.
    """
    n = cross.shape[0]
    basis, _ = torch.linalg.qr(torch.eye(n, dtype=torch.float64) - 1.0 / n)
    basis = basis[:, : n - 1]
    u, _, vh = torch.linalg.svd(basis.T @ cross.double() @ basis)
    return basis @ (u @ vh) @ basis.T + torch.full((n, n), 1.0 / n, dtype=torch.float64)


def stream_cross(spec: PermutationSpec, group: Group, model_a: nn.Module, model_b: nn.Module, data, max_examples, device) -> tuple[torch.Tensor, int]:
    """(sum over samples and stream sites of x_A x_B^T (n, n) float64, samples) in one pass (summed over the
    processes of a torch.distributed group, like every other statistic)."""
    sites = list(group.sites)
    moments = Moments(paired=True)  # one accumulator: every stream site has the group's n units
    with torch.no_grad(), eval_mode(model_a, model_b):
        for x in model_inputs(model_a, batches(data, max_examples, device_of(model_a, device))):
            visit_pairs(model_a, model_b, sites, spec.graph, x, lambda k, a, b: moments.update_pair(a, b, sites[k]))
    moments.all_reduce_()
    if moments.n == 0:
        return torch.zeros(group.size, group.size, dtype=torch.float64), 0
    return (moments.second_moment_xy * moments.n).cpu(), moments.n


@register_method(name="orthogonal", reference="Theus, Cabodi, Pal, Ghosh, Singh 2025, Generalized Linear Mode Connectivity for Transformers, arXiv:2506.22712, Sec. 3")
def orthogonal_alignment(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data=None,
    *,
    permutations: str = "activation",
    stream: str = "activations",
    untie: bool = False,
    heads: str = "permutation",
    max_examples: int | None = 10_000,
    device=None,
) -> AlignResult:
    """Align B to A with permutations of the hidden groups and an orthogonal map of each residual stream.

    Args:
        spec: a traced spec of a pre-norm transformer (LayerNorm before every reader of the stream).
        model_a, model_b: the networks; data: x or (x, y) batches (max_examples inputs are read).
        permutations: "activation" or "weight": how the groups other than the stream are matched.
        stream: "activations" (Procrustes on the stream activations, after `permutations`) or "weights" (no
            data: `weight_stream_maps`, weight matching alternated with Procrustes on the canonical weights;
            `permutations` is not used; `data` only checks the canonical form, the traced example otherwise).
        untie: give a weight that reads a stream LayerNorm and is tied to another tensor (a tied LM head) its
            own copy in both returned models, so that the final norm's gain can fold into it. Without it a tied
            head is kept tied when that norm's gain is uniform and refused otherwise (`canonical`); a head
            without bias always works: the norm keeps the shift.
        heads: "permutation" (default): the heads keep their permutations; "orthogonal": after the permutations and
            the stream maps, an orthogonal map inside every attention head, of its query/key dims and of its
            value/output dims (`head_maps`: Procrustes on the weights, no data; QK^T and W_O W_V unchanged).
            Measured (docs/results.md section 8.3, loss barrier after REPAIR): better on both zoo GPT pairs
            (0.709 -> 0.615 untied, 0.620 -> 0.536 tied; stream="weights" 0.966 -> 0.852, 0.580 -> 0.488), not on
            the zoo ViT (0.457 -> 0.468; stream="weights" 1.117 -> 1.558), hence not the default.
    Returns:
        AlignResult with perms (the stream's left as the identity) and `models` = (A, B) rewritten: A in the
        canonical form, B permuted, canonical and re-based into A's stream basis. Both compute what the
        originals compute; interpolating them gives a plain model of the original class. record: method,
        untied (the keys given their own copy: [] unless `untie` found a tied reader), heads, head_maps (the
        child groups mapped inside their heads), head_objective {group: [<A, B> before the maps, after]},
        stream_objective {group: [mean <x_A, x_B> per
        sample over the stream's coordinates before the map, after it]}, inner_record (the permutation
        method's record), seconds.
    """
    if stream not in ("activations", "weights"):
        raise InvalidOptionError(f"orthogonal alignment: stream={stream!r}; valid: 'activations', 'weights'")
    if heads not in ("orthogonal", "permutation"):
        raise InvalidOptionError(f"orthogonal alignment: heads={heads!r}; valid: 'orthogonal', 'permutation'")
    if data is None and stream == "activations":
        raise ValueError("orthogonal alignment needs data: an iterable of x or (x, y) batches (or stream='weights')")
    if spec.graph is None:
        raise AlignmentError("orthogonal alignment needs a traced spec (onebasin.trace)")
    t0 = time.perf_counter()
    model_a, model_b = require_module(model_a, "orthogonal"), require_module(model_b, "orthogonal")
    streams = stream_groups(spec)
    if not streams:
        raise AlignmentError("orthogonal alignment found no residual stream (a group read at a residual addition)")
    if stream == "weights":
        return _weights_alignment(spec, model_a, model_b, data, streams, untie, heads, t0)
    inner = get_method(permutations)(spec, model_a, model_b, data, max_examples=max_examples, device=device)
    perms = {**inner.perms, **{g.name: identity_perms(spec)[g.name] for g in streams}}
    b = module_with(model_b, apply_perms(spec, perms, model_b.state_dict()))
    a, b = canonical(spec, model_a, streams, untie), canonical(spec, b, streams, untie)
    _check_canonical(model_a, a, data)
    objective = {}
    for group in streams:
        cross, samples = stream_cross(spec, group, a, b, data, max_examples, device)
        q = procrustes(cross)
        objective[group.name] = [float(cross.trace() / samples), float((q * cross).sum() / samples)]
        b = rebase(b, group, q)
    b, inside = with_head_maps(spec, a, b, perms) if heads == "orthogonal" else (b, {"head_maps": []})
    record = {"method": "orthogonal", "stream": "activations", "permutations": permutations, "inner_record": inner.record,
              "heads": heads, **inside,
              "untied": tied_readers(spec, streams) if untie else [],
              "stream_groups": [g.name for g in streams], "stream_objective": objective,
              "examples": inner.record.get("examples"), "seconds": time.perf_counter() - t0}  # fmt: skip
    return AlignResult(perms, record, models=(a, b))


def _weights_alignment(spec, model_a, model_b, data, streams, untie, heads, t0) -> AlignResult:
    """orthogonal_alignment(stream="weights"): canonical forms, then `weight_stream_maps`; no data read."""
    a, b = canonical(spec, model_a, streams, untie), canonical(spec, model_b, streams, untie)
    _check_canonical(model_a, a, data if data is not None else [spec.graph.example])
    sd_a, sd_b = a.state_dict(), b.state_dict()
    inside = {} if heads == "orthogonal" else None
    perms, maps, record = weight_stream_maps(spec, sd_a, sd_b, streams, inside_heads=inside)
    b = module_with(b, map_groups(spec, apply_perms(spec, perms, map_streams(spec, sd_b, maps)), inside or {}))
    record = {"method": "orthogonal", "stream": "weights", **record, "heads": heads, "head_maps": list(inside or {}), "untied": tied_readers(spec, streams) if untie else [],
              "stream_groups": [g.name for g in streams], "examples": 0, "seconds": time.perf_counter() - t0}  # fmt: skip
    return AlignResult(perms, record, models=(a, b), maps=maps)
