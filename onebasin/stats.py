"""Exact streaming float64 statistics of hidden units, read at a spec's sites in one forward pass.

Every statistic is kept as a sum over samples (count, sum x, sum x^2 or x x^T, sum x y^T), never as an
average of per-batch estimates: sums are exact in any batch order and combine across processes with
one all-reduce (`Moments.all_reduce_`). Conv activations are pooled over spatial positions: a (N, C, H, W)
tensor contributes N*H*W samples of C units (as in Jordan et al. 2022, Appendix B.2).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from .spec import Site, symbolic_trace


def unit_matrix(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(samples, units) float64 view of an activation whose units lie on axis `dim` (e.g. (N,C,H,W) -> (NHW, C))."""
    return t.detach().movedim(dim, -1).reshape(-1, t.shape[dim]).double()


class Moments:
    """Streaming sums of x (samples, p) and, optionally, of a paired y (samples, q): exact in float64.

    Keeps count, sum x, sum x^2 (or the full x x^T when `full=True`), and with `paired=True` also
    sum y, sum y^2 and the cross sum x y^T. Derived statistics are population (1/n) moments.
    """

    def __init__(self, full: bool = False, paired: bool = False):
        self.full, self.paired = full, paired
        self.n = 0
        self.sums: dict[str, torch.Tensor] = {}

    def _add(self, name: str, value: torch.Tensor) -> None:
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def update(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Add samples x (m, p) [and y (m, q)], both float64."""
        self.n += x.shape[0]
        self._add("x", x.sum(0))
        self._add("xx", x.T @ x if self.full else (x * x).sum(0))
        if self.paired:
            self._add("y", y.sum(0))
            self._add("yy", (y * y).sum(0))
            self._add("xy", x.T @ y)

    def all_reduce_(self) -> "Moments":
        """Sum the statistics over all processes of an initialised torch.distributed group (in place)."""
        if dist.is_available() and dist.is_initialized():
            n = torch.tensor([float(self.n)], dtype=torch.float64)
            dist.all_reduce(n)
            self.n = int(n.item())
            for name in sorted(self.sums):
                dist.all_reduce(self.sums[name])
        return self

    @property
    def mean_x(self) -> torch.Tensor:
        return self.sums["x"] / self.n

    @property
    def mean_y(self) -> torch.Tensor:
        return self.sums["y"] / self.n

    @property
    def var_x(self) -> torch.Tensor:
        xx = self.sums["xx"].diagonal() if self.full else self.sums["xx"]
        return (xx / self.n - self.mean_x**2).clamp_min(0)

    @property
    def var_y(self) -> torch.Tensor:
        return (self.sums["yy"] / self.n - self.mean_y**2).clamp_min(0)

    @property
    def cov_x(self) -> torch.Tensor:
        """(p, p) covariance of x (needs full=True)."""
        return self.sums["xx"] / self.n - torch.outer(self.mean_x, self.mean_x)

    @property
    def second_moment_x(self) -> torch.Tensor:
        """(p, p) uncentred E[x x^T] (needs full=True)."""
        return self.sums["xx"] / self.n

    @property
    def cov_xy(self) -> torch.Tensor:
        """(p, q) cross-covariance of x and y (needs paired=True)."""
        return self.sums["xy"] / self.n - torch.outer(self.mean_x, self.mean_y)

    def corr_xy(self, eps: float = 1e-12) -> torch.Tensor:
        """(p, q) Pearson correlation between every unit of x and every unit of y."""
        return self.cov_xy / torch.outer(self.var_x.sqrt() + eps, self.var_y.sqrt() + eps)


class SiteTaps(nn.Module):
    """Wraps a model so one forward returns (output, [tensor at each site]).

    Sites with an fx node name are read from a torch.fx trace of the model (which shares the model's
    parameters, so later in-place weight changes are seen); sites given by module name only (hand-written
    specs) are read with forward hooks. Either way the model runs exactly once per call.
    """

    def __init__(self, model: nn.Module, sites: list[Site]):
        super().__init__()
        self.model, self.sites = model, list(sites)
        self.gm = self._tapped_graph() if any(s.node for s in self.sites) else None
        self._hooked: dict[str, torch.Tensor] = {}

    def _tapped_graph(self) -> torch.fx.GraphModule:
        gm = symbolic_trace(self.model)
        nodes = {n.name: n for n in gm.graph.nodes}
        out = next(n for n in gm.graph.nodes if n.op == "output")
        taps = tuple(clone_before_inplace(gm, nodes[s.node]) for s in self.sites if s.node)
        out.args = ((out.args[0], taps),)
        gm.recompile()
        return gm

    def forward(self, *inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hooks = [
            self.model.get_submodule(s.module).register_forward_hook(self._hook(s.module))
            for s in self.sites
            if not s.node
        ]
        try:
            if self.gm is not None:
                out, tapped = self.gm(*inputs)
            else:
                out, tapped = self.model(*inputs), ()
        finally:
            for h in hooks:
                h.remove()
        it = iter(tapped)
        return out, [next(it) if s.node else self._hooked.pop(s.module) for s in self.sites]

    def _hook(self, name: str):
        def hook(module, args, output):
            self._hooked[name] = output

        return hook


_INPLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def is_inplace(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether fx node `node` may overwrite its first argument (ReLU(inplace=True), x.relu_(), torch.relu_, x += y)."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    inplace_fn = node.op == "call_function" and (node.target in _INPLACE_FUNCS or bool(node.kwargs.get("inplace")))
    return node.op in ("call_method", "call_function") and (name.endswith("_") and not name.endswith("__") or inplace_fn)


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode for the duration, then restore every submodule's own mode."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def clone_before_inplace(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node:
    """`node`, or a clone of it taken right away (in `node`'s graph) when a later op would modify it in place.

    `gm` resolves call_module targets (it holds the modules of `node`'s graph, which may be a copy of gm.graph).
    """
    if not any(is_inplace(gm, u) and u.args and u.args[0] is node for u in node.users):
        return node
    with node.graph.inserting_after(node):
        return node.graph.call_method("clone", (node,))


def batches(data: Iterable, max_examples: int | None = None, device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
    """Input tensors from a loader of x or (x, y, ...) batches, cut at `max_examples`, moved to `device`.

    When torch.distributed is initialised, rank r of w keeps batches r, r+w, r+2w, ... so that sums
    gathered on every rank and all-reduced equal those of one process over all the data.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    seen = 0
    for i, batch in enumerate(data):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if max_examples is not None:
            if seen >= max_examples:
                return
            x = x[: max_examples - seen]
        seen += x.shape[0]
        if i % world == rank:
            yield x.to(device) if device is not None else x
