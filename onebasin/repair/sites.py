"""Where REPAIR corrects: the spec's sites of the chosen kinds, and the calibration inputs it reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch.nn as nn

from ..errors import OnebasinError
from ..graph import Captured, capture, inputs_like, model_inputs
from ..spec import PermutationSpec, Site, trace
from ..distributed import batches

KINDS = ("layer", "block")  # the default site kinds
ALL_KINDS = ("layer", "block", "norm")


def select_sites(spec: PermutationSpec, kinds: Iterable[str] = KINDS) -> list[Site]:
    """The spec's sites of the given kinds, each once, in forward (graph) order."""
    kinds = tuple(kinds)
    if bad := [k for k in kinds if k not in ALL_KINDS]:
        raise ValueError(f"unknown site kind(s) {bad}; valid kinds: {list(ALL_KINDS)}")
    if spec.graph is None:
        raise OnebasinError("REPAIR needs a traced spec (onebasin.trace): a hand-written spec has no graph")
    order = {n.name: i for i, n in enumerate(spec.graph.graph.nodes)}
    found: dict[str, Site] = {}
    for group in spec.groups.values():
        for s in group.sites:
            if s.kind in kinds and s.node is not None:  # a part of a fused projection: correct the whole tensor
                found.setdefault(s.node, dataclasses.replace(s, start=0, size=None))
    return sorted(found.values(), key=lambda s: order[s.node])


def first_input(data: Iterable):
    for x in batches(data, 2):
        return x
    raise OnebasinError("no data: the calibration data yielded no batch")


def spec_and_sites(model: nn.Module, data: Iterable, spec: PermutationSpec | None, sites) -> tuple[Captured, list[Site]]:
    """The captured graph and the site list: explicit Sites, or the spec's sites of the given kinds."""
    explicit = bool(sites) and all(isinstance(s, Site) for s in sites)
    if spec is not None and spec.graph is None:
        raise OnebasinError("REPAIR needs a traced spec (onebasin.trace): a hand-written spec has no graph to read sites from")
    if spec is None:
        example = next(model_inputs(model, [first_input(data)]))
        spec = trace(model, example) if not explicit else None
        graph = spec.graph if spec is not None else capture(model, example)
    else:
        graph = spec.graph
    return graph, (list(sites) if explicit else select_sites(spec, sites))


def calibration(graph: Captured, data: Iterable, max_examples: int | None) -> list:
    """Calibration inputs (on the model's device, in its floating dtype), as a list of batches."""
    return list(inputs_like(graph, batches(data, max_examples)))
