"""Learned matching: permutations, and the residual stream's orthogonal map, trained by a straight-through
estimator on the loss of the interpolated network (Ainsworth, Hayase, Srinivasa 2023, "Git Re-Basin",
Sec. 3.3; Theus et al. 2025, "Generalized Linear Mode Connectivity for Transformers", Sec. 4).

Every group g keeps a real latent matrix L_g (n, n), started at the permutation matrix of another
method's result (`init`). Each step:

1. project: P_g = argmax_P <L_g, P> over the group's permutations, i.e. the permutation nearest L_g in
   Frobenius norm (linear assignment; attention heads and other block-structured families by the joint
   block-then-inside assignment of `align._structured`); a residual stream of a pre-norm transformer
   instead gets O = the orthogonal matrix with O 1 = 1 nearest L (SVD, `orthogonal.procrustes`), applied
   to both networks' canonical forms (`orthogonal.canonical`: LayerNorms folded, the stream centred);
2. forward with the hard maps: theta = (1 - lam) theta_A + lam T(theta_B), lam ~ U(0.4, 0.6), and the
   training loss of the network holding theta on one batch (`torch.func.functional_call`);
3. backward straight through the projection: T is linear in each P_g, read as a dense matrix applied
   along every axis the group indexes, so dloss/dP_g[i, j] = lam * sum over the group's tensors of
   <G[unit i], T_g(B)[unit j]>, with G = dloss/dtheta and T_g(B) = B with every other axis mapped: the
   weight-matching score with A replaced by G (`weight.weight_scores`). Adam steps the latents with it: the
   permutation latents at `lr`, the stream maps' at `stream_lr`. Where a stream map is learned the permutations'
   default rate is Theus et al.'s 3e-4, at which they stay at the start and the map does the learning (their finding,
   and ours on the zoo GPT: permutations thrashing at 0.05 while the map moves left a barrier of 0.74 after
   REPAIR, held ones 0.42).

With `repair_in_loop` (the default; `merge` turns it off when it will not REPAIR) the loss is that of the
REPAIRed interpolated network: every layer site is renormalised, from the batch's statistics, to the interpolation
of the endpoints' unit statistics (Jordan et al. 2022, eq. 4), so the permutations are learnt for the network that
REPAIR will return (a deep MLP's variance collapse is REPAIR's to fix, not the permutations'). The sites of a
mapped group (a stream, or heads with `heads="orthogonal"` or `"linear"`) take B's goal from B's covariance C: unit i
of R x_B, R = P M (P M^-T at the key sites of a linear head map), has mean (R mean_B)_i and variance (R C R^T)_ii.

With `latent="weights"` the latent is instead Git Re-Basin's own (their `*_ste*.py`): a copy W of the permuted
weights, in A's basis, started at T(B) of the start (Git Re-Basin starts it at A, whose first projection is weight
matching; T(B) keeps `init` meaningful); step 1 is weight matching of W against B (`weight.match_weights`,
from the current permutations), alternated with Procrustes of each stream map on the weights as in
`orthogonal.weight_stream_maps`; step 3 steps W by dloss/dT(B) itself, normalised (`NormalisedSGD`). Matrix latents
keep gradients taken while the other groups (a residual stream above all) were wrong; W is matched afresh at every
step. Measured from the identity on permuted copies (tests/test_learned.py): the tests' MLP of width 8 exact on 6 of
6 (model, permutation) pairs within 20 steps (matrix latents: 2 of 6 in 300 steps), a 1-block GPT of width 16 (stream
map off) on 6 of 6 model seeds within 124 steps (matrix latents: none); with its stream map learnt, the heads exact on
4 of 4 seeds and the map within 0.39-0.50 of the permutation (matrix latents: every group off, 1.23-1.26).

The result is an exact permutation of every group (and an orthogonal map of every stream) applied to B, which
therefore computes what B computes: of the final projection, the one with the lowest batch loss (Git Re-Basin
keeps that one) and the start, the one whose midpoint (lam = 1/2) has the lowest loss on the first examples.
"""

from __future__ import annotations

import math
import numbers
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .._copy import module_with
from .._progress import progress_bar
from ..errors import EmptyDataError, InvalidOptionError
from ..graph import as_call, model_inputs, take_rows
from ..permute import Perms, StateDict, apply_perms, identity_perms
from ..spec import Group, PermutationSpec
from ._registry import AlignmentError, AlignResult, device_of, first_examples, get_method, initial_perms, register_method, require_module
from .loop_repair import mapped_goal, renormalise, repair_sites, unit_moments
from .orthogonal import (_check_canonical, canonical, head_families, head_maps, inverse_part, map_groups, map_linear, map_streams,
                         procrustes, stream_cross, stream_groups, tied_readers, weight_stream_maps)
from .ste import block_orthogonal, nearest_orthogonal, permutation_matrix, project, ste_gradients

INITS = ("weight", "activation", "orthogonal", "identity")
HEADS = ("permutation", "orthogonal", "linear")
LR, LR_WITH_STREAM, STREAM_LR = 0.05, 3e-4, 0.01  # Adam's defaults (docs/results.md section 8.2): permutation latents
# without a stream map / with one (then the map does the learning, as in Theus et al.), and the stream maps' latents
LATENTS = ("perms", "weights")


# --- the start --------------------------------------------------------------------------------------------


def _start(spec, model_a, model_b, data, init, *, max_examples, device) -> tuple[Perms, dict]:
    """(perms, record) of the starting method: identity, or weight / activation matching."""
    if not isinstance(init, str):
        return initial_perms(spec, init), {"method": "given"}
    if init == "identity":
        return identity_perms(spec), {"method": "identity"}
    inner = get_method(init)(spec, model_a, model_b, data, max_examples=max_examples, device=device)
    return {g: p.cpu() for g, p in inner.perms.items()}, inner.record


def _streams(spec, model_a, model_b, data, orthogonal, untie=False) -> tuple[list[Group], nn.Module, nn.Module, str]:
    """(stream groups that get an orthogonal map, A and B in canonical form (or as given), why not, if not)."""
    streams = stream_groups(spec) if orthogonal is not False else []
    if not streams:
        if orthogonal:
            raise AlignmentError("learned matching: orthogonal=True, but the model has no residual stream")
        return [], model_a, model_b, "no residual stream" if orthogonal is None else "orthogonal=False"
    try:
        a, b = canonical(spec, model_a, streams, untie), canonical(spec, model_b, streams, untie)
        _check_canonical(model_a, a, data)
    except AlignmentError as err:
        if orthogonal:
            raise
        return [], model_a, model_b, str(err)
    return streams, a, b, ""


def _stream_start(spec, streams, a, b, perms, data, init, max_examples, device) -> dict[str, torch.Tensor]:
    """{stream: O (n, n)}: Procrustes on the stream activations of A and B (init "orthogonal"), else the
    start's own permutation of the stream as a matrix (a permutation maps 1 to 1)."""
    if init != "orthogonal":
        return {g.name: permutation_matrix(perms[g.name]) for g in streams}
    hidden = {k: p for k, p in perms.items() if k not in {g.name for g in streams}}
    b = module_with(b, apply_perms(spec, hidden, b.state_dict()))
    maps = {}
    for g in streams:  # as orthogonal_alignment does it
        maps[g.name] = procrustes(stream_cross(spec, g, a, module_with(b, map_streams(spec, b.state_dict(), maps)),
                                               data, max_examples, device)[0])
    return maps


# --- the training loop ------------------------------------------------------------------------------------


def cross_entropy(out, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (N, C) or sequence logits (N, T, V) against labels (N,) or (N, T);
    `out` may be a tuple (its first element) or carry `.logits` (Hugging Face)."""
    out = getattr(out, "logits", out)
    out = out[0] if isinstance(out, (tuple, list)) else out
    if out.dim() > 2:
        out, y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
    return F.cross_entropy(out, y)


def _batches(x, y, size: int, gen: torch.Generator):
    """An endless stream of (x, y) batches of `size` rows, reshuffled every pass over the examples."""
    n = len(y)
    while True:
        for idx in torch.randperm(n, generator=gen).split(size):
            yield take_rows(x, idx), y[idx]


def _examples(model: nn.Module, data, max_examples) -> tuple:
    """(inputs, labels) of the first `max_examples` examples, inputs in the model's device and dtype."""
    x, y = first_examples(data, max_examples if max_examples is not None else 1 << 62)
    if y is None:
        raise EmptyDataError("learned matching minimises the training loss: it needs labelled (x, y) batches")
    x = next(iter(model_inputs(model, [x])))
    return x, y.to(device_of(model))


def _call(scratch: nn.Module, theta: StateDict, x):
    """The output of `scratch` holding the tensors `theta` (tied keys each their own) on input x."""
    args, kwargs = as_call(x)
    return functional_call(scratch, theta, args, kwargs, tie_weights=False)


def _loss_at(scratch: nn.Module, a: StateDict, tb: StateDict, lam: float, keys: set, x, y, loss_fn) -> tuple[float, StateDict]:
    """(loss, dloss/dT(B) for `keys`) of the network holding (1 - lam) A + lam T(B) on (x, y)."""
    theta = {}
    for k, t in a.items():
        mix = torch.lerp(t, tb[k].to(t), lam) if t.is_floating_point() else t
        theta[k] = mix.detach().requires_grad_(k in keys and mix.is_floating_point())
    loss = loss_fn(_call(scratch, theta, x), y)
    if not torch.isfinite(loss):
        raise AlignmentError(f"learned matching: the interpolated network's loss is {loss.item()} (lr too large?)")
    leaves = [k for k in keys if theta[k].requires_grad]
    grads = torch.autograd.grad(loss, [theta[k] for k in leaves], allow_unused=True)
    return loss.item(), {k: (g if g is not None else torch.zeros_like(theta[k])) * lam for k, g in zip(leaves, grads)}


def _same(one: tuple[Perms, dict], other: tuple[Perms, dict]) -> bool:
    """Whether two (perms, maps) candidates are the same maps."""
    return all(torch.equal(p, other[0][g]) for g, p in one[0].items()) and all(torch.equal(q, other[1][g]) for g, q in one[1].items())


def _head_start(spec, a: StateDict, tb: StateDict, start: Perms) -> tuple[dict, tuple]:
    """({head group: block-diagonal orthogonal map in B's order}, the head families' groups): Procrustes inside every
    head of the start (`orthogonal.head_maps`, found in A's order on T(B), taken back to B's order: P^T M P)."""
    families = head_families(spec, list(spec.groups))
    found, _ = head_maps(spec, a, tb, families)
    maps = {g: permutation_matrix(start[g]).T @ q @ permutation_matrix(start[g]) for g, q in found.items()}
    return maps, tuple(g for parent, kids in families.items() for g in (parent, *kids))


def _block_mask(group: Group) -> torch.Tensor:
    """(n, n) float64 ones on the diagonal blocks of a structured group (one block per head), zeros elsewhere."""
    return torch.block_diag(*[torch.ones(group.block, group.block, dtype=torch.float64)] * group.blocks)


def _rms(tensors: list[torch.Tensor]) -> float:
    """Root mean square of all entries of `tensors` (float64; 0 for none)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors) / max(1, sum(t.numel() for t in tensors)))


class NormalisedSGD(torch.optim.Optimizer):
    """SGD on the gradient divided by its root mean square over each parameter group, times the group's `scale`:
    every step moves the group's entries by lr * scale in RMS, however small the loss; a zero gradient moves nothing."""

    def __init__(self, groups: list[dict], lr: float):
        super().__init__(groups, {"lr": lr, "scale": 1.0})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            rms = _rms([p.grad for p in group["params"] if p.grad is not None])
            if rms > 0:
                for p in group["params"]:
                    if p.grad is not None:
                        p.sub_(p.grad, alpha=group["lr"] * group["scale"] / rms)


class _Run:
    """The latents of one learned matching and the pair they act on: A and B (canonical forms when streams are mapped)."""

    def __init__(self, spec, canon_a, canon_b, start: Perms, maps: dict, loss_fn, train_mode: bool, latent: str = "perms",
                 fixed: tuple = (), linear: tuple = ()):
        self.spec, self.loss_fn, self.start, self.start_maps = spec, loss_fn, start, maps
        self.fixed = {g: start[g] for g in fixed}  # head families whose maps inside heads are learnt: their permutations stay
        self.linear = {g: _block_mask(spec.groups[g]) for g in linear}  # head groups whose maps are any invertible M
        self.inverse = {g: {m.key.rpartition(".")[0] for m in inverse_part(spec.groups[g])} for g in linear}  # modules they reach as M^-T
        self.names = [g for g in spec.groups if g not in maps and g not in self.fixed]
        self.perms = {g: start[g] for g in self.names}
        self.maps = dict(maps)
        self.latents = {g: permutation_matrix(start[g]) for g in self.names} | {g: q.clone() for g, q in maps.items()} if latent == "perms" else {}
        self.a = {k: v.detach() for k, v in canon_a.state_dict().items()}
        self.b = {k: v.detach() for k, v in canon_b.state_dict().items()}
        params = {k for k, _ in canon_a.named_parameters(remove_duplicate=False)}  # buffers (BatchNorm statistics)
        self.keys = set(spec.members_of) & params  # are permuted with their units, but the loss is not differentiated by them
        self.theta = {}  # latent "weights": Git Re-Basin's latent, a copy of the permuted weights in A's basis, started at T(B)
        if latent == "weights":
            self.theta = {k: t.clone() for k, t in self.transformed(self.perms, maps).items() if k in self.keys and t.is_floating_point()}
        self.scratch = module_with(canon_a, canon_a.state_dict()).train(train_mode)
        self.lam, self.sites = 0.5, []
        self.project()

    def optimizer(self, lr: float, stream_lr: float) -> torch.optim.Optimizer:
        """Adam on latent matrices (permutation latents at `lr`, stream maps at `stream_lr`); with latent weights,
        normalised SGD (`NormalisedSGD`) with steps scaled by the weights' RMS (one step for all: the groups keep
        their relative gradients)."""
        if not self.theta:
            perms = [q for g, q in self.latents.items() if g not in self.start_maps]
            maps = [q for g, q in self.latents.items() if g in self.start_maps]
            groups = [{"params": perms, "lr": lr}, {"params": maps, "lr": stream_lr}]
            return torch.optim.Adam([g for g in groups if g["params"]] or [{"params": perms}], lr=lr)
        return NormalisedSGD([{"params": list(self.theta.values()), "scale": _rms(list(self.theta.values()))}], lr)

    def repair(self, canon_a: nn.Module, canon_b: nn.Module, x, batch_size: int = 100) -> None:
        """Renormalise every layer site of the interpolated network to (1 - lam) A's + lam B's unit statistics
        (B's in the current permutation; the endpoints' from the inputs x), as REPAIR will after alignment."""
        self.sites = repair_sites(self.spec)
        ends = [unit_moments(m, self.sites, x, batch_size, full) for m, full in ((canon_a, ()), (canon_b, tuple(self.maps)))]
        for group, site in self.sites:
            (mean_a, std_a), (mean_b, std_b) = ends[0][site], ends[1][site]

            def hook(module, args, out, group=group, site=site, mean_a=mean_a, std_a=std_a, mean_b=mean_b, std_b=std_b):
                lam = self.lam
                if group in self.maps:  # a mapped group's units mix: B's goal from its covariance (std_b holds it)
                    mean, std = mapped_goal(mean_b, std_b, self.unit_map(group, site))
                else:
                    p = self.perms[group].to(mean_b.device)
                    mean, std = mean_b[p], std_b[p]
                return renormalise(out, site.dim, (1 - lam) * mean_a + lam * mean, (1 - lam) * std_a + lam * std)

            self.scratch.get_submodule(site.module).register_forward_hook(hook)

    def unit_map(self, group: str, site) -> torch.Tensor:
        """R (n, n) with the units of T(B) at a site of mapped group `group` = R times B's units there: P M (P the
        group's fixed permutation, the identity for a stream), P M^-T at the sites a linear head map reaches inverted."""
        m = self.maps[group]
        if group in self.linear and site.module in self.inverse[group]:
            m = torch.linalg.inv(m.double()).T
        return m if group not in self.fixed else permutation_matrix(self.fixed[group]) @ m

    def project(self) -> None:
        """The hard maps: each stream latent's nearest orthogonal map (with O 1 = 1), each head group's nearest
        block-diagonal orthogonal map (one block per head of B; a linear head map is its latent itself), and each
        latent's nearest permutation; with
        latent weights, the permutations and stream maps that weight matching (from the current permutations) and
        Procrustes on the weights, alternated, find between them and B."""
        if self.theta:
            self.perms, self.maps = self.match(self.perms, self.maps)
        else:
            self.maps = {g: self.latents[g].detach().clone() if g in self.linear else
                         block_orthogonal(self.latents[g], self.spec.groups[g].block) if g in self.fixed else
                         nearest_orthogonal(self.latents[g]) for g in self.start_maps}  # fmt: skip
            self.perms = project(self.spec, self.latents, self.names)

    def match(self, perms: Perms, maps: dict) -> tuple[Perms, dict]:
        """(perms, maps) between the latent weights and B: weight matching from `perms`, alternated with Procrustes of
        each stream on the weights (`orthogonal.weight_stream_maps`) until neither changes."""
        streams = [self.spec.groups[g] for g in maps]
        new, new_maps, _ = weight_stream_maps(self.spec, self.theta, self.b, streams, perms=perms, maps=maps, head_products=False)
        return {g: new[g] for g in self.names}, new_maps

    def current(self) -> tuple[Perms, dict]:
        return self.perms, self.maps

    def mapped(self, maps: dict, linear: dict | None = None, rest: StateDict | None = None) -> StateDict:
        """B with its streams and head groups mapped: orthogonal maps along every axis of their group, linear head
        maps (`linear`, default those of `maps`) by `orthogonal.map_linear`; `rest`: B with the orthogonal maps
        already applied (or the part of it the linear maps reach)."""
        linear = {g: maps[g] for g in self.linear} if linear is None else linear
        sd = rest if rest is not None else map_groups(self.spec, self.b, {g: q for g, q in maps.items() if g not in self.linear})
        for g, m in linear.items():
            sd = map_linear(self.spec, sd, g, m)
        return sd

    def transformed(self, perms: Perms, maps: dict) -> StateDict:
        """B with its streams (and head groups) mapped, then its groups permuted."""
        return apply_perms(self.spec, {**self.fixed, **perms}, self.mapped(maps))

    def linear_gradients(self, perms: Perms, grads: StateDict, rest: StateDict) -> dict[str, torch.Tensor]:
        """dloss/dM (n, n) of every linear head map, by autograd through T(B) = perms(mapped B) from dloss/dT(B)
        (`grads`), kept block-diagonal (one block per head); `rest`: B with the orthogonal maps applied. Only the
        tensors the head maps reach are mapped and permuted again."""
        if not self.linear:
            return {}
        leaves = {g: self.maps[g].detach().double().requires_grad_() for g in self.linear}
        reached = {m.key for g in self.linear for m in self.spec.groups[g].members}
        with torch.enable_grad():
            tb = apply_perms(self.spec, perms, self.mapped(self.maps, leaves, {k: rest[k] for k in reached}))
            keys = [k for k in grads if k in tb and tb[k].requires_grad]
            found = torch.autograd.grad([tb[k] for k in keys], list(leaves.values()), [grads[k].to(tb[k]) for k in keys], allow_unused=True)
        return {g: (d if d is not None else torch.zeros_like(leaves[g])) * self.linear[g] for g, d in zip(leaves, found)}

    def step(self, opt, lam: float, x, y) -> float:
        """One straight-through step at interpolation weight lam on batch (x, y); returns the batch loss."""
        orthogonal = {g: q for g, q in self.maps.items() if g not in self.linear}
        rest = map_groups(self.spec, self.b, orthogonal)  # B with its orthogonal maps: the linear head maps act on it
        mapped_b, self.lam = self.mapped(self.maps, rest=rest), lam
        perms = {**self.fixed, **self.perms}
        loss, grads = _loss_at(self.scratch, self.a, apply_perms(self.spec, perms, mapped_b), lam, self.keys, x, y, self.loss_fn)
        opt.zero_grad()
        if self.latents:
            for g, grad in (ste_gradients(self.spec, perms, grads, mapped_b, orthogonal, self.names) | self.linear_gradients(perms, grads, rest)).items():
                if g in self.latents:
                    self.latents[g].grad = grad.to(self.latents[g])
        for k, t in self.theta.items():
            t.grad = grads[k].to(t)
        opt.step()
        self.project()
        return loss

    def midpoint_loss(self, candidate: tuple[Perms, dict], x, y, batch_size: int, max_examples: int = 2000) -> float:
        """Mean loss of the midpoint (lam = 0.5) under `candidate` = (perms, maps) on the first examples."""
        tb, n = self.transformed(*candidate), min(len(y), max_examples)
        now, (self.perms, self.maps), self.lam = (self.perms, self.maps), candidate, 0.5  # the REPAIR hooks read them
        theta = {k: torch.lerp(t, tb[k].to(t), 0.5) if t.is_floating_point() else t for k, t in self.a.items()}
        total = 0.0
        with torch.no_grad():
            for idx in torch.arange(n).split(batch_size):
                total += float(self.loss_fn(_call(self.scratch, theta, take_rows(x, idx)), y[idx])) * len(idx)
        self.perms, self.maps = now
        return total / n

    def moved(self) -> int:
        """Units whose partner differs from the start's."""
        return sum(int((p != self.start[g]).sum()) for g, p in self.perms.items())

    def stream_change(self) -> float:
        """sum over streams of ||O - O_start||_F / sqrt(n)."""
        return sum(float((q - self.start_maps[g]).norm() / math.sqrt(len(q))) for g, q in self.maps.items())


def check_options(*, init="weight", latent="perms", epochs=10, steps=None, lr=None, stream_lr=STREAM_LR, batch_size=100,
                  lam=(0.4, 0.6)) -> None:
    """Raise InvalidOptionError naming the first bad option of `learned_matching`: init one of INITS (or given
    perms), latent one of LATENTS, epochs, lr (unless None) and stream_lr finite and > 0, steps (unless None) and batch_size integers >= 1, lam two numbers
    lo <= hi within [0, 1]."""
    if isinstance(init, str) and init not in INITS:
        raise InvalidOptionError(f"learned matching: unknown init {init!r}; valid: {', '.join(INITS)}")
    if latent not in LATENTS:
        raise InvalidOptionError(f"learned matching: unknown latent {latent!r}; valid: {', '.join(LATENTS)}")
    for name, value in (("epochs", epochs), ("lr", LR if lr is None else lr), ("stream_lr", stream_lr)):
        if not _is_real(value) or not math.isfinite(value) or value <= 0:
            raise InvalidOptionError(f"learned matching: {name} must be a finite number > 0, got {value!r}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if (value is not None or name != "steps") and not (_is_int(value) and value >= 1):
            raise InvalidOptionError(f"learned matching: {name} must be an integer >= 1, got {value!r}")
    ok = isinstance(lam, (tuple, list)) and len(lam) == 2 and all(_is_real(v) and 0 <= v <= 1 for v in lam)
    if not ok or lam[0] > lam[1]:
        raise InvalidOptionError(f"learned matching: lam must be a range (lo, hi) with 0 <= lo <= hi <= 1, got {lam!r}")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@register_method(name="learned", reference="Ainsworth, Hayase, Srinivasa 2023, Git Re-Basin, arXiv:2209.04836, Sec. 3.3; "
                 "Theus, Cabodi, Pal, Ghosh, Singh 2025, arXiv:2506.22712, Sec. 4")  # fmt: skip
def learned_matching(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data=None,
    *,
    init: str = "weight",
    latent: str = "perms",
    orthogonal: bool | None = None,
    untie: bool = False,
    epochs: float = 10,
    steps: int | None = None,
    lr: float | None = None,
    stream_lr: float = STREAM_LR,
    batch_size: int = 100,
    lam: tuple[float, float] = (0.4, 0.6),
    heads: str = "permutation",
    loss_fn=cross_entropy,
    repair_in_loop: bool = True,
    train_mode: bool = False,
    max_examples: int | None = 10_000,
    device=None,
    seed: int = 0,
    progress: bool = True,
) -> AlignResult:
    """Align B to A by learning the permutations (and stream maps) that minimise the interpolated network's loss.

    Args:
        spec: a traced PermutationSpec (structured groups: heads, GQA, rotary constraints, conv groups).
        model_a, model_b: the networks; data: (x, y) batches of training data (labels needed); the first
            `max_examples` examples are the training set of the latents.
        init: the start: "weight" (weight matching, no data; where a stream map is learned, Theus et al.'s data-free
            start: weight matching alternated with each stream's Procrustes map on the canonical weights,
            `orthogonal.weight_stream_maps`), "activation", "orthogonal" (activation matching plus the Procrustes
            map of the stream activations) or "identity".
        latent: "perms": one latent matrix per group, stepped by Adam (Theus et al.); "weights": a latent copy of
            the weights projected by weight matching (Git Re-Basin), stepped by normalised SGD (module docstring).
        orthogonal: learn an orthogonal map of each residual stream (both networks rewritten in the
            canonical form of `orthogonal.canonical`); None: when the model is a pre-norm transformer.
        untie: with a stream map, give a tied LM head its own copy (`orthogonal.orthogonal_alignment`); without
            it a tied head whose final norm has a non-uniform gain gets no stream map (None) or is refused (True).
        epochs: passes over the examples (ignored when `steps` is given); steps: optimiser steps.
        lr: Adam's learning rate on the permutation latents (they start as 0/1 permutation matrices); None: 0.05, or
            3e-4 when a stream map is learned (Theus et al.'s rate: the permutations then stay near their start and the
            map learns; on the zoo GPT, permutations moving at 0.05 left a loss barrier of 0.74 after REPAIR, held
            ones 0.42: docs/results.md section 8.2). With latent "weights", the RMS of each step as a fraction of the
            weights' RMS (None: 0.05).
        stream_lr: Adam's learning rate on the stream maps' latents (they start as the orthogonal start map, entries
            about 1/sqrt(n)); ignored with latent "weights" (the maps come from Procrustes on the latent weights).
        batch_size: examples per step; lam: the interpolation weight is drawn uniformly from this range.
        heads: "permutation" (default): attention heads are permuted (their latents like any group's);
            "orthogonal": each head's query/key dims and value/output dims get a learnt orthogonal map instead, started
            at the Procrustes maps of the orthogonal method (`orthogonal.head_maps`) and stepped at `stream_lr`, the
            heads' pairing staying the start's. Measured (docs/results.md section 8.4, barrier after REPAIR): ViT
            0.150 -> 0.105, tied GPT 0.371 -> 0.340 (from the weight start), untied GPT 0.296 -> 0.309.
            "linear": each head's maps are any invertible M (block-diagonal, one block per head), started at those
            Procrustes maps and stepped at `stream_lr` with the gradient through the mapping (no projection): queries
            and values take M, keys and the output projection's columns M^-T (`orthogonal.map_linear`), so every q.k
            and W_O v is kept (Q/K and V/O inside a head are symmetric under GL(d), not only O(d)).
        loss_fn: loss(model output, labels) -> scalar; default cross-entropy (sequence logits flattened).
        repair_in_loop: learn for the REPAIRed midpoint: every layer site of the interpolated network (a module's
            output holding a permuted or mapped group) is renormalised in the loop from the batch's statistics to
            the interpolated endpoint statistics (`renormalise`; the endpoints' measured once on the first 2,000
            examples; a mapped group's B goal from B's covariance, `loop_repair.mapped_goal`). Measured
            (docs/results.md section 8.4): the stream's layer sites in the loop took the untied GPT's loss barrier
            after REPAIR from 0.416 to 0.296 and the ViT's from 0.188 to 0.150. False: learn for the plain interpolation.
        train_mode: run the interpolated network in training mode (BatchNorm on batch statistics, dropout
            on); default eval mode (the interpolated running statistics, no dropout).
        seed: seeds the batch order and the draws of lam.
    Returns:
        AlignResult with perms (a stream with a map keeps the identity) and, when streams are mapped,
        `models` = (A, B) in canonical form, B permuted and mapped into A's basis (the orthogonal method's
        convention), and `maps` = {stream: O (n, n) float64} (and the head groups' maps, with heads other than "permutation"). record: init, init_record, latent, orthogonal, orthogonal_note,
        untied (keys of a tied head given their own copy), steps, lr, batch_size,
        examples, loss (per step: the interpolated loss of the batch), lam (per step), moved (per step:
        units whose permutation differs from the start), stream_change (per step: ||O - O_start||_F /
        sqrt(n), summed over the maps: streams, and with heads="orthogonal" the head groups), heads, midpoint_loss ({"final", "best", "start"}: the loss at lam = 1/2 on
        the first 2,000 examples of the final projection, of the one with the lowest batch loss and of
        the start), chosen (the candidate returned: the lowest of these), seconds.
    Raises:
        InvalidOptionError naming a bad init, latent, epochs, steps, lr, batch_size or lam (`check_options`), before any work.
    """
    if data is None:
        raise EmptyDataError("learned matching needs data: an iterable of (x, y) training batches")
    check_options(init=init, latent=latent, epochs=epochs, steps=steps, lr=lr, stream_lr=stream_lr, batch_size=batch_size, lam=lam)
    if heads not in HEADS or (heads != "permutation" and latent != "perms"):
        raise InvalidOptionError(f"learned matching: heads={heads!r}; valid: {', '.join(map(repr, HEADS))} ('orthogonal' and 'linear' with latent 'perms')")
    t0 = time.perf_counter()
    model_a, model_b = require_module(model_a, "learned"), require_module(model_b, "learned")
    streams, canon_a, canon_b, note = _streams(spec, model_a, model_b, data, orthogonal, untie)
    if init == "orthogonal" and not streams:
        raise InvalidOptionError(f"learned matching: init='orthogonal' needs an orthogonal stream map ({note})")
    if streams and init == "weight":  # Theus et al.'s start: data-free weight matching with the streams' Procrustes maps
        start, maps, init_record = weight_stream_maps(spec, canon_a.state_dict(), canon_b.state_dict(), streams,
                                                      inside_heads={} if heads != "permutation" else None)
        init_record = {"method": "orthogonal", "stream": "weights", **init_record}
    else:
        start, init_record = _start(spec, model_a, model_b, data, "activation" if init == "orthogonal" else init,
                                    max_examples=max_examples, device=device)
        maps = _stream_start(spec, streams, canon_a, canon_b, start, data, init, max_examples, device)
    lr = lr if lr is not None else LR_WITH_STREAM if maps and latent == "perms" else LR
    fixed, inside = (), {}
    if heads != "permutation":
        tb = apply_perms(spec, start, map_groups(spec, canon_b.state_dict(), maps))
        inside, fixed = _head_start(spec, canon_a.state_dict(), tb, start)
        maps = {**maps, **inside}
    x, y = _examples(canon_a, data, max_examples)
    total = steps if steps is not None else max(1, math.ceil(epochs * len(y) / batch_size))
    run = _Run(spec, canon_a, canon_b, start, maps, loss_fn, train_mode, latent, fixed, tuple(inside) if heads == "linear" else ())
    if repair_in_loop:
        run.repair(canon_a, canon_b, take_rows(x, slice(0, 2000)), batch_size)
    gen = torch.Generator().manual_seed(seed)
    batches = _batches(x, y, batch_size, gen)
    opt = run.optimizer(lr, stream_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
    history = {"loss": [], "lam": [], "moved": [], "stream_change": []}
    best = first = (math.inf, run.current())
    with progress_bar(total=total, desc="learned", unit="step", disable=not progress) as bar:
        for _ in range(total):
            weight = lam[0] + (lam[1] - lam[0]) * torch.rand((), generator=gen, dtype=torch.float64).item()
            used = run.current()
            loss = run.step(opt, weight, *next(batches))
            sched.step()
            best = min(best, (loss, used), key=lambda c: c[0])
            for k, v in zip(history, (loss, weight, run.moved(), run.stream_change())):
                history[k].append(v)
            bar.set_postfix(loss=f"{loss:.4f}", moved=history["moved"][-1])
            bar.update()
    candidates = {"final": run.current(), "best": best[1], "start": first[1]}
    checks = {}
    for name, cand in candidates.items():  # each distinct candidate measured once
        same = next((other for other in checks if _same(cand, candidates[other])), None)
        checks[name] = checks[same] if same is not None else run.midpoint_loss(cand, x, y, batch_size)
    chosen = min(checks, key=checks.get)  # never worse than the start on these examples
    perms, maps = candidates[chosen]
    record = {"method": "learned", "init": init if isinstance(init, str) else "given", "init_record": init_record, "latent": latent,
              "orthogonal": bool(streams) and any(g not in run.fixed for g in maps), "orthogonal_note": note, "untied": tied_readers(spec, streams) if untie else [], "repair_in_loop": repair_in_loop, "heads": heads,
              "repair_sites": len(run.sites), "steps": total, "lr": lr, "stream_lr": stream_lr if maps else None, "batch_size": batch_size,
              "examples": len(y), **history, "midpoint_loss": checks, "chosen": chosen,
              "seconds": time.perf_counter() - t0}  # fmt: skip
    final = {**run.fixed, **perms, **{g: torch.arange(spec.groups[g].size) for g in maps if g not in run.fixed}}
    if not maps:
        return AlignResult(final, record)
    return AlignResult(final, record, models=(canon_a, module_with(canon_b, run.transformed(perms, maps))), maps=maps)
