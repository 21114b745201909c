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


def visit_pairs(model_a: nn.Module, model_b: nn.Module, sites: list[Site], graph: Captured | None, inputs, visit) -> None:
    """Run A and B on `inputs` and call visit(k, a, b) with both networks' tensors at each site k.

    Sites read from `graph` run both networks side by side through it (`Captured.run_paired`): each site's pair is
    visited as soon as it exists and then freed, so a pass holds about what two eager forwards hold (with every
    site held to the end of the batch, the zoo ViT's activation matching peaked at 418 MiB, paired at 175-208 MiB:
    docs/results.md 3.1). Sites read by hooks: two `SiteTaps` passes, then the visits."""
    if graph is not None and sites and all(s.node for s in sites):
        graph.run_paired(model_a.state_dict(), model_b.state_dict(), inputs, [s.node for s in sites], visit)
        return
    (_, acts_a), (_, acts_b) = SiteTaps(model_a, sites, graph, False)(inputs), SiteTaps(model_b, sites, graph, False)(inputs)
    for k, (a, b) in enumerate(zip(acts_a, acts_b)):
        visit(k, a, b)
