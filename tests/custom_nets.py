"""A user's own model, as `--model tests.custom_nets:make_net` would name it: a tiny residual network whose
REPAIR corrections after each residual addition cannot be fused into a layer (merge keeps them as
RepairAffine modules), so reloading it exercises the whole `repair_affines` path."""

import torch
import torch.nn as nn


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class TinyResNet(nn.Module):
    """Stem conv (stride 2), `blocks` residual blocks of `width` channels, global average pool, Linear."""

    def __init__(self, width=4, blocks=2, in_channels=1, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*(Block(width) for _ in range(blocks)))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):  # x: (N, in_channels, H, W)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def make_net(width=4, blocks=2, in_channels=1, num_classes=10):
    """The factory a user passes as --model tests.custom_nets:make_net (options via --model-opts)."""
    return TinyResNet(width, blocks, in_channels, num_classes)
