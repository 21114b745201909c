"""Input validation shared by every entry point: same architecture, finite weights."""

from __future__ import annotations

import torch

from .errors import ArchitectureMismatchError, InvalidWeightsError

StateDict = dict[str, torch.Tensor]


def check_same_architecture(sd_a: StateDict, sd_b: StateDict, names: tuple[str, str] = ("A", "B")) -> None:
    """Raise ArchitectureMismatchError listing every key or shape that differs between two state_dicts."""
    problems = [f"key {k!r} only in {names[0]}" for k in sd_a if k not in sd_b]
    problems += [f"key {k!r} only in {names[1]}" for k in sd_b if k not in sd_a]
    problems += [
        f"{k!r}: shape {tuple(sd_a[k].shape)} in {names[0]} vs {tuple(sd_b[k].shape)} in {names[1]}"
        for k in sd_a
        if k in sd_b and sd_a[k].shape != sd_b[k].shape
    ]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ArchitectureMismatchError(
            f"models {names[0]} and {names[1]} have different architectures ({len(problems)} differences):\n  {shown}{more}"
        )


def check_finite(sd: StateDict, name: str = "model") -> None:
    """Raise InvalidWeightsError naming the tensors of a state_dict that hold NaN or inf."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InvalidWeightsError(f"{name} has non-finite (NaN/inf) values in: {', '.join(bad[:10])}")
