"""Small reference networks for the core tests: every kind of permutation structure, tiny enough for CI."""

from pathlib import Path

import torch
import torch.nn as nn


def randomize_norm_stats(model):
    """Give every norm layer non-trivial affine parameters and running stats, so permuting them matters."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
    return model


def mlp(width=16, depth=4, in_features=12, num_classes=5):
    layers, d = [], in_features
    for _ in range(depth - 1):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(nn.Flatten(), *layers, nn.Linear(d, num_classes))


class VGGish(nn.Module):
    """conv-(bn)-relu-pool stacks, flatten of a 2x2 map into a two-layer classifier (channel -> block of 4)."""

    def __init__(self, bn=True, widths=(4, 8, 8), num_classes=5):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w) if bn else nn.Identity(), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(c * 4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, num_classes))

    def forward(self, x):  # x: (N, 3, 16, 16)
        return self.classifier(torch.flatten(self.features(x), 1))


def norm_layer(kind, c):
    return {"bn": lambda: nn.BatchNorm2d(c), "ln": lambda: nn.GroupNorm(1, c), "none": nn.Identity}[kind]()


class Block(nn.Module):
    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=norm == "none")
        self.n1 = norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=norm == "none")
        self.n2 = norm_layer(norm, cout)
        self.scale = nn.Parameter(torch.ones(1)) if norm == "none" else None  # Fixup-style scalar
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(norm, cout))

    def forward(self, x):
        out = torch.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        if self.scale is not None:
            out = out * self.scale
        return torch.relu(out + self.shortcut(x))


class ResNet20ish(nn.Module):
    """CIFAR ResNet20 layout (3 stages x 3 blocks, 1x1-conv shortcuts on stage change), width w."""

    def __init__(self, norm="bn", w=4, num_classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=norm == "none")
        self.n1 = norm_layer(norm, w)
        blocks, c = [], w
        for i, cout in enumerate((w, 2 * w, 4 * w)):
            for j in range(3):
                blocks.append(Block(c, cout, 2 if (j == 0 and i > 0) else 1, norm))
                c = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = torch.relu(self.n1(self.conv1(x)))
        x = self.blocks(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ConvLN(nn.Module):
    """Conv -> LayerNorm([C, H, W]) -> ReLU stacks (a LayerNorm over more than the unit axis), then a linear
    head; widths differ from the map sizes so a correction along the wrong axis cannot broadcast."""

    def __init__(self, widths=(5, 6), size=8, num_classes=3):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.LayerNorm([w, size, size]), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):  # x: (N, 3, size, size)
        return self.head(self.features(x).mean((2, 3)))


def reference_models():
    """name -> (model factory, example input shape)."""
    import torchvision

    return {
        "mlp": (lambda: mlp(), (3, 12)),
        "vgg_bn": (lambda: VGGish(bn=True), (3, 3, 16, 16)),
        "vgg_plain": (lambda: VGGish(bn=False), (3, 3, 16, 16)),
        "resnet20_bn": (lambda: ResNet20ish("bn"), (3, 3, 16, 16)),
        "resnet20_ln": (lambda: ResNet20ish("ln"), (3, 3, 16, 16)),
        "resnet20_fixup": (lambda: ResNet20ish("none"), (3, 3, 16, 16)),
        "conv_ln_chw": (lambda: ConvLN(), (3, 3, 8, 8)),
        "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=7), (2, 3, 32, 32)),
        "tv_resnet50": (lambda: torchvision.models.resnet50(num_classes=7), (2, 3, 32, 32)),
        "tv_vgg11_bn": (lambda: torchvision.models.vgg11_bn(num_classes=7), (2, 3, 32, 32)),
    }


class TinyTransformer(nn.Module):
    """A pre-norm ViT-style transformer: patch Linear, class token, position embedding, `depth` blocks of
    LayerNorm -> fused-qkv attention (H heads) and LayerNorm -> GELU MLP, final LayerNorm, linear head."""

    def __init__(self, dim=8, heads=2, depth=2, tokens=4, features=6, hidden=12, num_classes=3):
        super().__init__()
        self.h = heads
        self.embed = nn.Linear(features, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.5)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"ln1": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim),
                           "ln2": nn.LayerNorm(dim), "fc1": nn.Linear(dim, hidden), "fc2": nn.Linear(hidden, dim)})
            for _ in range(depth)
        )  # fmt: skip
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.2)

    def forward(self, x):  # (B, tokens, features)
        x = self.embed(x)
        B, N, C = x.shape
        x = torch.cat([self.cls.expand(B, -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](x)).reshape(B, N + 1, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
            a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N + 1, C)
            x = x + blk["proj"](a)
            x = x + blk["fc2"](nn.functional.gelu(blk["fc1"](blk["ln2"](x))))
        return self.head(self.norm(x)[:, 0])


MNIST_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


def mnist_tensors(n: int, train: bool = True):
    """The first n MNIST images of ../shared/data as (n, 784) normalised floats and their labels; skips the
    test when torchvision or the data is missing."""
    import pytest

    torchvision = pytest.importorskip("torchvision")
    if not (MNIST_ROOT / "MNIST").exists():
        pytest.skip(f"MNIST not found under {MNIST_ROOT}")
    ds = torchvision.datasets.MNIST(root=str(MNIST_ROOT), train=train, download=False)
    x = (ds.data[:n].float() / 255 - 0.1307) / 0.3081
    return x.reshape(n, -1), ds.targets[:n]


def train_mnist_mlp(seed: int, x, y, width: int, depth: int, epochs: int, batch: int = 100) -> nn.Module:
    """A `mlp(width, depth)` trained by plain SGD (lr 0.05, momentum 0.9) on (x, y) from `seed`, in eval mode."""
    torch.manual_seed(seed)
    model = mlp(width=width, depth=depth, in_features=784, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()
