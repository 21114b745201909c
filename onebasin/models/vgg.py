"""CIFAR-style VGG (Simonyan & Zisserman 2015) as used by the REPAIR paper (Jordan et al. 2022, Fig. 6).

A stack of 3x3 conv (+ BatchNorm) + ReLU layers with five 2x2 max-pools, then one nn.Linear on the
flattened 1x1 feature map: inputs must be 32x32 (pad MNIST/FashionMNIST with
`load_dataset(..., image_size=32)`). `width` multiplies the 64..512 channels (fractions allowed,
e.g. 0.25 for tests).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._registry import register_model

CFGS = {  # channels per conv layer, "M" = 2x2 max-pool
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}
NORMS = ("batchnorm", "none")


def _channels(c, width):
    return max(1, round(c * width))


class VGG(nn.Module):
    """(N, in_channels, 32, 32) -> (N, num_classes) logits."""

    def __init__(self, cfg, width=1, norm="batchnorm", in_channels=3, num_classes=10):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        layers, c_in = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            c_out = _channels(v, width)
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"))
            if norm == "batchnorm":
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU())
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)
        for m in self.features:
            if isinstance(m, nn.Conv2d):  # Kaiming-normal so that deep VGGs without BN still train
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def _vgg(name, width, norm, in_channels, num_classes):
    return VGG(CFGS[name], width, norm, in_channels, num_classes)


@register_model(image_size=32, recipe="vgg")
def vgg11(width=1, norm="batchnorm", in_channels=3, num_classes=10):
    """VGG11: 8 conv layers of 64..512 x width channels + 1 linear; norm "batchnorm" | "none"."""
    return _vgg("vgg11", width, norm, in_channels, num_classes)


@register_model(image_size=32, recipe="vgg")
def vgg13(width=1, norm="batchnorm", in_channels=3, num_classes=10):
    """VGG13: 10 conv layers + 1 linear."""
    return _vgg("vgg13", width, norm, in_channels, num_classes)


@register_model(image_size=32, recipe="vgg")
def vgg16(width=1, norm="batchnorm", in_channels=3, num_classes=10):
    """VGG16: 13 conv layers + 1 linear."""
    return _vgg("vgg16", width, norm, in_channels, num_classes)


@register_model(image_size=32, recipe="vgg")
def vgg19(width=1, norm="batchnorm", in_channels=3, num_classes=10):
    """VGG19: 16 conv layers + 1 linear."""
    return _vgg("vgg19", width, norm, in_channels, num_classes)
