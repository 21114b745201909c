"""Linear interpolation of weights, theta_alpha = (1 - alpha) * theta_A + alpha * theta_B, and its barrier.

`lerp` works on state_dicts, `interpolate_model` on modules; `evaluate` gives a model's loss and accuracy,
and `BarrierCurve.barrier` the barrier of eq. (1) for loss or error along a path (measured by
`onebasin.barrier.barrier_curve`, which sits above REPAIR because it can apply it at every alpha).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._copy import module_with
from .checks import check_same_architecture
from .distributed import distributed, presharded, reduce_device

StateDict = dict[str, torch.Tensor]


def lerp(sd_a: StateDict, sd_b: StateDict, alpha: float) -> StateDict:
    """The state_dict (1 - alpha) * sd_a + alpha * sd_b (Entezari et al. 2021, eq. 1).

    Floating tensors are interpolated in their own dtype. Integer buffers (BatchNorm's
    `num_batches_tracked`) are interpolated and rounded, so equal counters stay equal and the result
    is the count nearest the interpolated one. Raises ArchitectureMismatchError if keys or shapes differ.
    """
    check_same_architecture(sd_a, sd_b)
    out = {}
    for k, a in sd_a.items():
        b = sd_b[k].to(a.device)
        if a.is_floating_point() or a.is_complex():
            out[k] = torch.lerp(a, b.to(a.dtype), alpha)  # exact at alpha = 0 and 1
        else:
            out[k] = torch.round((1 - alpha) * a.double() + alpha * b.double()).to(a.dtype)
    return out


def interpolate_model(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """A copy of `model_a` holding lerp(A, B, alpha) (theta_alpha, Jordan et al. 2022 Sec. 2.1); inputs untouched."""
    return module_with(model_a, lerp(model_a.state_dict(), model_b.state_dict(), alpha))


# --- barriers ------------------------------------------------------------------------------------------


@dataclass
class BarrierCurve:
    """Loss and accuracy of the interpolated net at each alpha, per data split ("train", "test", ...)."""

    alphas: list[float]
    loss: dict[str, list[float]]  # split -> mean loss per alpha
    acc: dict[str, list[float]]  # split -> accuracy (fraction) per alpha
    correction: str | None = None

    def error(self, split: str) -> list[float]:
        return [1 - a for a in self.acc[split]]

    def barrier(self, split: str = "test", metric: str = "loss") -> float:
        """B = max_alpha [L(alpha) - ((1 - alpha) L(0) + alpha L(1))] (Entezari et al. 2021; Jordan et al. eq. 1).

        metric: "loss" or "error" (1 - accuracy). Needs alpha = 0 and alpha = 1 among `alphas`.
        """
        values = {"loss": lambda: self.loss[split], "error": lambda: self.error(split)}
        if metric not in values:
            raise ValueError(f"unknown barrier metric {metric!r}; valid metrics: {list(values)}")
        ys = values[metric]()
        if 0.0 not in self.alphas or 1.0 not in self.alphas:
            raise ValueError("the barrier needs the endpoints: alphas must include 0 and 1")
        y0, y1 = ys[self.alphas.index(0.0)], ys[self.alphas.index(1.0)]
        return max(y - ((1 - a) * y0 + a * y1) for a, y in zip(self.alphas, ys))

    def to_dict(self) -> dict:
        """JSON-ready: alphas, per-split loss/acc lists, correction, and the loss/error barrier of each split."""
        barriers = {s: {m: self.barrier(s, m) for m in ("loss", "error")} for s in self.loss}
        return {"alphas": self.alphas, "loss": self.loss, "acc": self.acc, "correction": self.correction,
                "barrier": barriers}  # fmt: skip


def evaluate(model: nn.Module, loader: Iterable, loss_fn: Callable = F.cross_entropy) -> tuple[float, float]:
    """(mean loss, accuracy) of `model` in eval mode over (x, y) batches; loss_fn(logits, y) returns a batch mean.

    Sequence outputs, logits (B, T, V) with targets (B, T) (a language model), are flattened to (B*T, V) and
    (B*T,): the mean is per position (cross-entropy in nats per character; bits = nats / ln 2), accuracy the
    fraction of positions predicted right. Under torch.distributed every process evaluates its share of
    the batches and the sums are all-reduced (the result is the one-process value).
    """
    p = next(model.parameters())
    rank, world = (0, 1) if presharded(loader) else distributed()
    total_loss, correct, n = 0.0, 0, 0
    was = model.training
    model.eval()
    with torch.no_grad():
        for i, (x, y, *_) in enumerate(loader):
            if i % world != rank:  # under torch.distributed each process evaluates its share of the batches
                continue
            x = x.to(p.device, p.dtype) if x.is_floating_point() else x.to(p.device)
            out, y = model(x), y.to(p.device)
            if out.dim() > 2:  # (B, T, V) logits of (B, T) targets
                out, y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
            total_loss += float(loss_fn(out, y)) * len(y)
            correct += int((out.argmax(-1) == y).sum())
            n += len(y)
    model.train(was)
    if world > 1:
        sums = torch.tensor([total_loss, correct, n], dtype=torch.float64, device=reduce_device(p.device))
        torch.distributed.all_reduce(sums)
        total_loss, correct, n = sums[0].item(), int(sums[1].item()), int(sums[2].item())
    return total_loss / n, correct / n
