"""Exact REPAIR (Jordan et al. 2022, Sec. 4.2): every site's correction measured with the earlier ones in
place, in one forward sweep over the calibration set, or, when the sweep's kept activations would exceed
`max_memory` (estimated from the graph's shapes), in one streaming pass per dependency level."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx as fx

from ..errors import OnebasinError
from ..graph import Captured, _ancestors, batch_size, shape_of, walk
from ..spec import Site
from ..distributed import distributed
from ..distributed import reduce_device as _collective_device
from ..stats import Moments
from .affine import affine, affine_to_goal
from .measure import Corrected
from .sites import calibration


def levels(graph: Captured, names: set[str]) -> dict[str, int]:
    """Dependency level of each site node: 0 if no other site is upstream, else 1 + the deepest upstream site's."""
    depth: dict[fx.Node, int] = {}
    level: dict[str, int] = {}
    for n in graph.graph.nodes:
        d = max((depth[i] for i in n.all_input_nodes), default=0)
        if n.name in names:
            level[n.name] = d
            d += 1
        depth[n] = d
    return level


def _estimate_bytes(graph: Captured, sites: list[Site], examples: int) -> int:
    """Peak bytes of the tensors a one-sweep REPAIR keeps: the largest set of live activations, scaled
    from the graph's example shapes to `examples` rows."""
    nodes = list(graph.graph.nodes)
    need = _ancestors(nodes, {s.node for s in sites})
    last = {a.name: i for i, n in enumerate(nodes) for a in n.all_input_nodes}
    rows = batch_size(graph.example)
    live, peak = {}, 0
    for i, n in enumerate(nodes):
        if n.name not in need or n.name in graph.keys:
            continue
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            shape = shape_of(n)
            numel = 1
            for s in shape:
                numel *= s
            scale = examples / rows if shape and shape[0] == rows else 1
            live[n.name] = int(numel * scale * val.element_size())
        peak = max(peak, sum(live.values()))
        for a in n.all_input_nodes:
            if last.get(a.name) == i:
                live.pop(a.name, None)
    return peak


@dataclass
class _Exact:
    """Exact REPAIR of one interpolated state: corrections at sites, what was measured, how."""

    corrections: dict
    means: list
    stds: list
    levels: list
    passes: int
    peak_bytes: int
    note: str = ""


def exact_corrections(graph: Captured, state: dict, sites: list[Site], goal_mean, goal_std, data, max_examples, max_memory: int | None) -> _Exact:
    """Exact REPAIR (Sec. 4.2): one sweep over the calibration set, or one streaming pass per level."""
    chunks = calibration(graph, data, max_examples)  # this process's shard (it may hold none under torch.distributed)
    if not chunks and distributed()[1] == 1:
        raise OnebasinError("no data: the calibration data yielded no batch")
    examples = sum(batch_size(x) for x in chunks)
    eps = torch.finfo(next(v for v in state.values() if v.is_floating_point()).dtype).eps
    lv = levels(graph, {s.node for s in sites})
    index = {s.node: i for i, s in enumerate(sites)}
    means, stds, corrections = [None] * len(sites), [None] * len(sites), {}

    def correct(i: int, m: Moments) -> None:
        means[i], stds[i] = m.mean_x, m.var_x.sqrt()
        scale, shift = affine_to_goal(means[i], stds[i], goal_mean[i], goal_std[i], eps)
        corrections[sites[i].node] = (scale, shift, sites[i].dim)

    if distributed()[1] > 1:  # every process must take the same path (their all-reduces pair up)
        most = torch.tensor([float(examples)], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        examples = int(most.item())
    estimate = _estimate_bytes(graph, sites, examples)
    if max_memory is None or estimate <= max_memory:
        def visitor(i):
            def visit(values):
                m = Moments()
                for v in values:
                    m.update_units(v, sites[i])
                correct(i, m.all_reduce_())
                return [affine(v, *corrections[sites[i].node], in_place=True) for v in values]  # walk's own copies

            return visit

        peak = walk(graph, state, chunks, index, {s.node: visitor(i) for i, s in enumerate(sites)})
        return _Exact(corrections, means, stds, [lv[s.node] for s in sites], 1, peak)
    note = (f"one-sweep REPAIR would keep ~{estimate / 2**30:.2f} GiB of activations (max_memory "
            f"{max_memory / 2**30:.2f} GiB): corrected with one streaming pass per dependency level instead")
    peak, passes = 0, max(lv.values(), default=-1) + 1
    for k in range(passes):
        todo = [s for s in sites if lv[s.node] == k]
        known = Corrected(graph, state, dict(corrections))
        for s, m in zip(todo, known.moments(todo, chunks)):
            correct(index[s.node], m)
    return _Exact(corrections, means, stds, [lv[s.node] for s in sites], passes, peak, note)
