"""ResNets of the REPAIR paper (Jordan et al. 2022): CIFAR ResNet20 / ResNet18 and torchvision's.

* `resnet20` (He et al. 2016, Sec. 4.2; the paper's Sec. 5.1 and Fig. 4): a 3x3 conv stem, three
  stages of three basic blocks with 16/32/64 x `width` channels (strides 1, 2, 2), global average
  pool, one linear layer.
* `resnet18_cifar` (kuangliu/pytorch-cifar): the same layout with stages of 2,2,2,2 blocks and
  64/128/256/512 x `width` channels; the paper's Sec. 5.2 ResNet18 on CIFAR-10.
* Shortcuts: identity (an empty nn.Sequential, so no graph node) when a block keeps its shape,
  otherwise a 1x1 conv (+ norm) with the block's stride.
* `norm`:
  - "batchnorm": nn.BatchNorm2d after every conv.
  - "layernorm": nn.GroupNorm(1, C), i.e. LayerNorm over (C, H, W) of each example with a
    per-channel affine (weight, bias of shape (C,)), as in git-re-basin's LayerNorm ResNets.
  - "none": Fixup (Zhang et al. 2019, "Fixup initialization"): no normalisation; scalar biases and
    a scalar scale (nn.Parameters of shape (1,)) around each branch, the last conv of every branch
    zero-initialised, the first scaled by L^(-1/(2m-2)) = L^(-1/2) (L blocks, m = 2 convs per
    branch), classifier zero-initialised. (Fixup's scalar bias before the classifier is omitted:
    the classifier's own bias makes it redundant as a function.)
* `resnet18`, `resnet50`: torchvision's ImageNet models (weights=None), ReLUs made out-of-place.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from ._registry import register_model

NORMS = ("batchnorm", "layernorm", "none")


class ScalarBias(nn.Module):
    """x + b with one learned scalar b (shape (1,)); Fixup's stand-in for a norm layer."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x + self.bias


def make_norm(norm: str, channels: int) -> nn.Module:
    """The normalisation layer for `norm` on `channels` channels (ScalarBias for "none")."""
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "layernorm":
        return nn.GroupNorm(1, channels)
    if norm == "none":
        return ScalarBias()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def conv3x3(c_in, c_out, stride=1):
    """3x3 convolution, padding 1, no bias (a norm follows, or Fixup's scalar biases)."""
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def conv1x1(c_in, c_out, stride=1):
    """1x1 convolution without bias: the projection shortcut."""
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x)); (N, c_in, H, W) -> (N, c_out, H/s, W/s)."""

    def __init__(self, c_in, c_out, stride=1, norm="batchnorm"):
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.norm1 = make_norm(norm, c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(c_out, c_out)
        self.norm2 = make_norm(norm, c_out)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv1x1(c_in, c_out, stride), make_norm(norm, c_out))

    def forward(self, x):
        out = self.relu1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class FixupBlock(nn.Module):
    """Fixup basic block (Zhang et al. 2019, Fig. 1 right): no norm, scalar biases and scale."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.bias1a = nn.Parameter(torch.zeros(1))
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bias1b = nn.Parameter(torch.zeros(1))
        self.relu1 = nn.ReLU()
        self.bias2a = nn.Parameter(torch.zeros(1))
        self.conv2 = conv3x3(c_out, c_out)
        self.scale = nn.Parameter(torch.ones(1))
        self.bias2b = nn.Parameter(torch.zeros(1))
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv1x1(c_in, c_out, stride))

    def forward(self, x):
        x = x + self.bias1a
        out = self.relu1(self.conv1(x) + self.bias1b)
        out = self.conv2(out + self.bias2a) * self.scale + self.bias2b
        out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    """(N, in_channels, H, W) -> (N, num_classes); `blocks` per stage, `channels` per stage x width."""

    def __init__(self, blocks, channels, width=1, norm="batchnorm", in_channels=3, num_classes=10):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        chans = [max(1, round(c * width)) for c in channels]
        self.conv1 = conv3x3(in_channels, chans[0])
        self.norm1 = make_norm(norm, chans[0])
        self.relu = nn.ReLU()
        c_in, stages = chans[0], []
        for i, (n, c) in enumerate(zip(blocks, chans)):
            strides = [1 if i == 0 else 2] + [1] * (n - 1)
            stages.append(nn.Sequential(*(_block(c_in if j == 0 else c, c, s, norm) for j, s in enumerate(strides))))
            c_in = c
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        _init(self, norm, sum(blocks))

    def forward(self, x):
        x = self.relu(self.norm1(self.conv1(x)))
        x = self.pool(self.layers(x))
        return self.fc(torch.flatten(x, 1))


def _block(c_in, c_out, stride, norm):
    return FixupBlock(c_in, c_out, stride) if norm == "none" else BasicBlock(c_in, c_out, stride, norm)


def _init(model, norm, num_blocks):
    """Kaiming-normal convs/linear; with norm="none" the Fixup rescaling and zero inits on top."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    if norm != "none":
        return
    for m in model.modules():
        if isinstance(m, FixupBlock):
            m.conv1.weight.data.mul_(num_blocks ** (-1 / (2 * 2 - 2)))
            nn.init.zeros_(m.conv2.weight)
    nn.init.zeros_(model.fc.weight)


@register_model
def resnet20(width=1, norm="batchnorm", in_channels=3, num_classes=10):
    """CIFAR ResNet20: 3 stages x 3 basic blocks, 16/32/64 x width channels; norm batchnorm|layernorm|none."""
    return CifarResNet((3, 3, 3), (16, 32, 64), width, norm, in_channels, num_classes)


@register_model
def resnet18_cifar(width=1, norm="batchnorm", in_channels=3, num_classes=10):
    """CIFAR ResNet18 (kuangliu): 4 stages x 2 basic blocks, 64/128/256/512 x width channels."""
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), width, norm, in_channels, num_classes)


def _torchvision(model, in_channels):
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, 7, 2, 3, bias=False)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return model


@register_model
def resnet18(in_channels=3, num_classes=1000):
    """torchvision's ImageNet ResNet18 (weights=None); takes any input size >= 32."""
    return _torchvision(torchvision.models.resnet18(weights=None, num_classes=num_classes), in_channels)


@register_model
def resnet50(width=1, in_channels=3, num_classes=1000):
    """torchvision's ImageNet ResNet50 (weights=None); `width` multiplies the bottleneck widths
    (width=2 is wide_resnet50_2, the paper's "double-width ResNet50"; the block outputs keep 256..2048)."""
    net = torchvision.models.resnet50(weights=None, num_classes=num_classes, width_per_group=round(64 * width))
    return _torchvision(net, in_channels)
