"""The plain ReLU MLP of the REPAIR paper (Jordan et al. 2022, Sec. 5.3: "10-layer MLPs").

`depth` counts nn.Linear layers: depth-1 hidden layers of `width` units, then the output layer.
Kaiming-normal init (fan_in, relu): with PyTorch's default init a 12-layer ReLU MLP stayed at chance
for 20 epochs in our measurements; with Kaiming-normal it trained to ~97%.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._registry import register_model


class MLP(nn.Module):
    """(N, *) inputs, flattened to (N, in_features) -> (N, num_classes) logits."""

    def __init__(self, width=512, depth=10, in_features=784, num_classes=10):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1 (number of Linear layers), got {depth}")
        dims = [in_features] + [width] * (depth - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.relu = nn.ReLU()
        self.head = nn.Linear(dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = torch.flatten(x, 1)
        for layer in self.layers:
            x = self.relu(layer(x))
        return self.head(x)


@register_model(flat_input=True, default_dataset="mnist", recipe="mlp")
def mlp(width=512, depth=10, in_features=784, num_classes=10):
    """`depth` Linear layers (depth-1 hidden of `width` units + output), ReLU, Kaiming-normal init."""
    return MLP(width, depth, in_features, num_classes)
