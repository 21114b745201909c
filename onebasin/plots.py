"""PNG figures of barrier curves and variance collapse (as Jordan et al. 2022, Figs. 2-3).

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend change,
safe in threads and headless) and written atomically: to a temporary file in the target directory,
then renamed over the target, so a reader never sees a half-written PNG.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ._io import atomic_write

_METRICS = {"acc": "accuracy", "loss": "loss", "error": "error"}
_SPLIT_STYLES = ("-", "--", ":", "-.")


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Write `fig` to `path` as PNG atomically (see `_io.atomic_write`); returns the path."""
    return atomic_write(path, lambda tmp: FigureCanvasAgg(fig).print_png(str(tmp)))


def _series(curve, split: str, metric: str) -> list[float]:
    return {"acc": curve.acc, "loss": curve.loss}[metric][split] if metric != "error" else curve.error(split)


def plot_barrier_curves(
    curves: dict,
    path: str | os.PathLike,
    splits: tuple[str, ...] | None = None,
    metrics: tuple[str, ...] = ("acc", "loss"),
    title: str | None = None,
) -> Path:
    """One panel per metric ("acc", "loss", "error"), alpha on x; one colour per curve, one line style per split.

    Args:
        curves: label -> onebasin.interpolate.BarrierCurve (e.g. "plain", "aligned", "aligned+REPAIR").
        path: the PNG to write. splits: which splits (default: every split of the first curve).
    Returns:
        the written path. Legend entries give the loss/error barrier of each curve and split.
    """
    if bad := [m for m in metrics if m not in _METRICS]:
        raise ValueError(f"unknown metric(s) {bad}; valid metrics: {list(_METRICS)}")
    splits = splits or tuple(next(iter(curves.values())).loss)
    fig = Figure(figsize=(5 * len(metrics), 4), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for i, (label, curve) in enumerate(curves.items()):
            for split, style in zip(splits, _SPLIT_STYLES):
                kind = "loss" if metric == "loss" else "error"
                name = f"{label} ({split}, B_{kind}={curve.barrier(split, kind):.3g})"
                ax.plot(curve.alphas, _series(curve, split, metric), style, color=f"C{i}", marker=".", label=name)
        ax.set_xlabel("alpha (0 = A, 1 = B)")
        ax.set_ylabel(_METRICS[metric])
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2)  # below: never over a curve
    if title:
        fig.suptitle(title)
    return save_png(fig, path)


def plot_variance_ratios(
    table: dict[str, list[float]],
    path: str | os.PathLike,
    layer_names: list[str] | None = None,
    title: str | None = "Variance collapse: std_alpha / mean(std_A, std_B)",
) -> Path:
    """Layer index on x, mean per-unit std ratio on y, one line per method (e.g. plain / aligned / aligned+REPAIR).

    Args:
        table: method -> ratio per layer (onebasin.diagnostics.ratio_series output).
        layer_names: optional tick labels, one per layer.
    """
    fig = Figure(figsize=(max(6, 0.35 * max(map(len, table.values()), default=0)), 4), layout="constrained")
    ax = fig.subplots()
    for i, (label, ratios) in enumerate(table.items()):
        ax.plot(range(len(ratios)), ratios, marker="o", color=f"C{i}", label=label)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    if layer_names:
        ax.set_xticks(range(len(layer_names)), layer_names, rotation=60, ha="right", fontsize="x-small")
    ax.set_xlabel("layer")
    ax.set_ylabel("std ratio")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        fig.suptitle(title)
    return save_png(fig, path)


def plot_series(
    series: dict[str, tuple[list[float], list[float]]],
    path: str | os.PathLike,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    logx: bool = False,
) -> Path:
    """One line per label from {label: (xs, ys)}, e.g. barrier vs width per method (a sweep's summary)."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for i, (label, (xs, ys)) in enumerate(series.items()):
        ax.plot(xs, ys, marker="o", color=f"C{i}", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return save_png(fig, path)
