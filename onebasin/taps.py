"""Taps: one forward of a model that also returns its activations at a spec's sites.

Taps read the captured graph (`onebasin.graph`), which is functional: no later op can overwrite a
tapped tensor, so what a site reports is the value the next op reads.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .graph import Captured, as_call
from .spec import Site


class SiteTaps(nn.Module):
    """Wraps a model so one forward returns (output, [tensor at each site]).

    Sites with a node name are read from `graph` (the captured graph of the architecture, e.g.
    `spec.graph`), run with `model`'s current weights; sites given by module name only (hand-written
    specs) are read with forward hooks. Either way the model runs exactly once per call; with
    `outputs=False` (graph sites only) it runs only as far as the sites need and returns no output.
    """

    def __init__(self, model: nn.Module, sites: list[Site], graph: Captured | None = None, outputs: bool = True):
        super().__init__()
        self.model, self.sites, self.graph, self.outputs = model, list(sites), graph, outputs
        self.nodes = [s.node for s in self.sites if s.node]
        if self.nodes and graph is None:
            raise ValueError("sites with graph nodes need the captured graph: pass graph=spec.graph")
        self._hooked: dict[str, torch.Tensor] = {}

    def forward(self, inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hooks = [self.model.get_submodule(s.module).register_forward_hook(self._hook(s.module)) for s in self.sites if not s.node]
        try:
            if self.graph is not None and not hooks:
                values = self.graph.run(self.model.state_dict(), inputs, self.nodes, self.outputs)  # outputs=False:
                n_out = len(values) - len(self.nodes)  # only what the sites need is computed
                out, tapped = values[0] if n_out else None, values[n_out:]
            else:
                args, kwargs = as_call(inputs)
                out, tapped = self.model(*args, **kwargs), ()
        finally:
            for h in hooks:
                h.remove()
        it = iter(tapped)
        return out, [next(it) if s.node else self._hooked.pop(s.module) for s in self.sites]

    def _hook(self, name: str):
        def hook(module, args, output):
            self._hooked[name] = output.clone()  # a later in-place op must not change what was read

        return hook
