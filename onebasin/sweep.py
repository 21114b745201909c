"""`onebasin sweep CONFIG.toml`: a grid of experiments (e.g. widths x seeds x methods), one resumable job
per cell, results appended to one CSV, and a summary plot of barrier vs the first grid axis per method.

    out = "runs/sweep"                 # results.csv, summary.png, a report folder per cell
    [base]                             # fields of onebasin.experiment.Experiment
    model = "mlp"
    dataset = "mnist"
    epochs = 5
    model_kwargs = { depth = 4 }
    [grid]                             # the product of these lists is run
    width = [32, 64, 128]              # a model option (goes into model_kwargs) or an Experiment field
    seeds = [[0, 1]]
    method = ["activation", "weight"]

A cell whose row is already in results.csv is skipped; an interrupted cell resumes its training from
the endpoints' epoch checkpoints.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

from .experiment import Experiment, run_experiment
from .plots import plot_series
from .report import read_csv, write_csv

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_FIELDS = {f.name for f in dataclasses.fields(Experiment)}


def load_config(path) -> tuple[Experiment, dict[str, list], Path]:
    """(base Experiment, grid {axis: values}, output folder) from a sweep TOML file; ValueError on bad keys."""
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    unknown = set(cfg) - {"out", "base", "grid"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; expected out, [base], [grid]")
    base = cfg.get("base", {})
    if bad := set(base) - _FIELDS:
        raise ValueError(f"{path}: unknown [base] keys {sorted(bad)}; valid: {sorted(_FIELDS)}")
    if "seeds" in base:
        base["seeds"] = tuple(base["seeds"])
    grid = cfg.get("grid", {})
    if not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError(f"{path}: every [grid] entry must be a non-empty list")
    return Experiment(**base), grid, Path(cfg.get("out", "runs/sweep"))


def cell_key(cell: dict) -> str:
    """A stable text key of one grid cell, e.g. 'method=weight,seeds=[0, 1],width=64'."""
    return ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(cell.items()))


def cell_experiment(base: Experiment, cell: dict, out: Path) -> Experiment:
    """The Experiment of one cell: grid values replace Experiment fields or go into model_kwargs."""
    fields = {k: (tuple(v) if k == "seeds" else v) for k, v in cell.items() if k in _FIELDS}
    kwargs = {**base.model_kwargs, **{k: v for k, v in cell.items() if k not in _FIELDS}}
    folder = out / "cells" / cell_key(cell).replace("=", "-").replace(",", "_").replace(" ", "").replace('"', "")
    return dataclasses.replace(base, **fields, model_kwargs=kwargs, out=str(folder))


def result_row(key: str, cell: dict, comparison) -> dict:
    """One CSV row: the cell, endpoint accuracies, and per curve the midpoint accuracy and barriers (test)."""
    rows = comparison.summary_rows()
    row = {"cell": key, **{k: json.dumps(v) if isinstance(v, list) else v for k, v in cell.items()},
           "acc_a": rows[0][1], "acc_b": rows[1][1]}
    for name, acc, loss, loss_barrier, error_barrier in rows[2:]:
        label = name.removeprefix("midpoint ")
        row |= {f"{label}_mid_acc": acc, f"{label}_loss_barrier": loss_barrier, f"{label}_error_barrier": error_barrier}
    return row


def run_sweep(path, progress: bool = True) -> Path:
    """Run every cell of the sweep in CONFIG `path` not yet in results.csv; returns the CSV path."""
    base, grid, out = load_config(path)
    results = out / "results.csv"
    rows = read_csv(results)
    done = {r["cell"] for r in rows}
    for values in itertools.product(*grid.values()):
        cell = dict(zip(grid, values))
        key = cell_key(cell)
        if key in done:
            continue
        comparison, _ = run_experiment(cell_experiment(base, cell, out), progress)
        rows.append(result_row(key, cell, comparison))
        write_csv(results, rows)
    if rows and any(_numeric(v) for v in grid.values()):
        plot_summary(rows, grid, out / "summary.png")
    return results


def _numeric(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_summary(rows: list[dict], grid: dict, path: Path) -> Path:
    """Test loss barrier vs the first numeric grid axis, one line per (other axes' values, curve), seeds averaged."""
    x_axis = next(k for k, v in grid.items() if _numeric(v))
    series: dict[str, dict[float, list[float]]] = {}
    curves = [k.removesuffix("_loss_barrier") for k in rows[0] if k.endswith("_loss_barrier")]
    for r in rows:
        others = ",".join(f"{k}={r[k]}" for k in grid if k not in (x_axis, "seeds"))
        for c in curves:
            label = f"{c} {others}".strip()
            series.setdefault(label, {}).setdefault(float(r[x_axis]), []).append(float(r[f"{c}_loss_barrier"]))
    lines = {label: (sorted(pts), [sum(pts[x]) / len(pts[x]) for x in sorted(pts)]) for label, pts in series.items()}
    return plot_series(lines, path, x_axis, "test loss barrier", title="Barrier vs " + x_axis, logx=x_axis == "width")
