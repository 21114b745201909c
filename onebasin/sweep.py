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

Every cell is validated before anything is trained (names, seeds, counts, model options). A cell is
skipped when results.csv already holds its row for the same settings: the `settings` column is a hash
of the cell's whole resolved Experiment (base + cell, all but out/data_dir/cache_dir). After an edit of
[base] the old rows stay in results.csv (their `settings` differ) but are neither reused nor plotted:
the cells run again, into report folders cells/<cell>-<settings>. An interrupted cell resumes its
training from the endpoints' epoch checkpoints.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

from ._io import unwritable
from .errors import InvalidOptionError
from .experiment import Experiment, run_experiment, settings_key, validate_experiment
from .plots import plot_series
from .report import read_csv, write_csv

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_FIELDS = {f.name for f in dataclasses.fields(Experiment)}


class SweepConfigError(InvalidOptionError):
    """A sweep CONFIG.toml is missing, not TOML, or holds an unknown key or a bad value."""


def load_config(path) -> tuple[Experiment, dict[str, list], Path]:
    """(base Experiment, grid {axis: values}, output folder) from a sweep TOML file; SweepConfigError on bad keys."""
    cfg = _read_toml(Path(path))
    unknown = set(cfg) - {"out", "base", "grid"}
    if unknown:
        raise SweepConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; expected out, [base], [grid]")
    base, grid, out = cfg.get("base", {}), cfg.get("grid", {}), cfg.get("out", "runs/sweep")
    if not isinstance(base, dict) or not isinstance(grid, dict) or not isinstance(out, str):
        raise SweepConfigError(f"{path}: expected out = \"folder\", a [base] table and a [grid] table")
    if bad := set(base) - _FIELDS:
        raise SweepConfigError(f"{path}: unknown [base] keys {sorted(bad)}; valid: {sorted(_FIELDS)}")
    if "seeds" in base and isinstance(base["seeds"], list):
        base["seeds"] = tuple(base["seeds"])
    if bad := set(grid) & {"out", "model_kwargs"}:
        raise SweepConfigError(f"{path}: [grid] cannot vary {sorted(bad)} (put model options in the grid directly)")
    if not all(isinstance(v, list) and v for v in grid.values()):
        raise SweepConfigError(f"{path}: every [grid] entry must be a non-empty list")
    return Experiment(**base), grid, Path(out)


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SweepConfigError(f"no sweep config at {path}") from None
    except IsADirectoryError:
        raise SweepConfigError(f"{path} is a directory, not a sweep CONFIG.toml") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SweepConfigError(f"{path} is not valid TOML: {err}") from None


def cell_key(cell: dict) -> str:
    """A stable text key of one grid cell, e.g. 'method=weight,seeds=[0, 1],width=64'."""
    return ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(cell.items()))


def cell_experiment(base: Experiment, cell: dict, out: Path) -> Experiment:
    """The Experiment of one cell: grid values replace Experiment fields or go into model_kwargs."""
    fields = {k: (tuple(v) if k == "seeds" and isinstance(v, list) else v) for k, v in cell.items() if k in _FIELDS}
    kwargs = {**base.model_kwargs, **{k: v for k, v in cell.items() if k not in _FIELDS}}
    exp = dataclasses.replace(base, **fields, model_kwargs=kwargs)
    name = cell_key(cell).replace("=", "-").replace(",", "_").replace(" ", "").replace('"', "")
    return dataclasses.replace(exp, out=str(out / "cells" / f"{name}-{settings_key(exp)}"))


def result_row(key: str, cell: dict, comparison, settings: str = "") -> dict:
    """One CSV row: the cell, its settings hash, endpoint accuracies, and per curve the midpoint accuracy and
    barriers (test)."""
    rows = comparison.summary_rows()
    row = {"cell": key, "settings": settings, **{k: json.dumps(v) if isinstance(v, list) else v for k, v in cell.items()},
           "acc_a": rows[0][1], "acc_b": rows[1][1]}
    for name, acc, loss, loss_barrier, error_barrier in rows[2:]:
        label = name.removeprefix("midpoint ")
        row |= {f"{label}_mid_acc": acc, f"{label}_loss_barrier": loss_barrier, f"{label}_error_barrier": error_barrier}
    return row


def run_sweep(path, progress: bool = True, device: str | None = None) -> Path:
    """Run every cell of the sweep in CONFIG `path` whose row (cell and settings) is not yet in results.csv.

    `device` (e.g. "cuda") overrides the config's; it is not part of a cell's settings.

    Every cell is validated first (SweepConfigError naming the cell), so a bad value stops the sweep before
    any training. Returns the CSV path.
    """
    base, grid, out = load_config(path)
    if device is not None:
        base = dataclasses.replace(base, device=device)
    cells = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    plan = []  # (key, cell, experiment, settings)
    for cell in cells:
        exp = cell_experiment(base, cell, out)
        try:
            validate_experiment(exp)
        except InvalidOptionError as err:
            raise SweepConfigError(f"{path}: cell {cell_key(cell) or '[base]'}: {err}") from err
        plan.append((cell_key(cell), cell, exp, settings_key(exp)))
    results = out / "results.csv"
    if problem := unwritable(results):
        raise SweepConfigError(f"{path}: {problem}")
    rows = read_csv(results)
    done = {(r["cell"], r.get("settings")) for r in rows}
    for key, cell, exp, settings in plan:
        if (key, settings) in done:
            continue
        comparison, _ = run_experiment(exp, progress)
        rows.append(result_row(key, cell, comparison, settings))
        write_csv(results, rows)
    current = [r for r in rows if (r["cell"], r.get("settings")) in {(k, s) for k, _, _, s in plan}]
    if current and any(_numeric(v) for v in grid.values()):
        plot_summary(current, grid, out / "summary.png")
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
