"""Report outputs people read or load: JSON (all numbers), CSV, a terminal table and a static HTML page.

Every writer is atomic (see `_io.atomic_write`); plots come from `onebasin.plots`.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from pathlib import Path

from ._io import atomic_write_text


def _jsonable(obj):
    """Tensors, numpy values, paths and dataclass-like results as plain JSON values (NaN -> null)."""
    if hasattr(obj, "tolist"):
        obj = obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path, obj) -> Path:
    """Write `obj` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def read_csv(path) -> list[dict]:
    """The rows of a CSV file as dicts of strings; none when the file does not exist yet."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path, rows: list[dict]) -> Path:
    """Write a list of flat dicts as CSV (columns in first-seen order), atomically."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_jsonable(rows))
    return atomic_write_text(path, buf.getvalue())


def _cell(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain-text table with aligned columns (floats to 4 decimals) for the terminal."""
    cells = [header] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _html_table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}
figure{margin:1.5em 0}figcaption{color:#555;font-size:.9em}pre{background:#f7f7f7;padding:.7em;overflow:auto}"""


def write_html(path, title: str, *, tables=(), images=(), notes: str = "") -> Path:
    """A self-contained static page: `tables` = [(caption, header, rows)], `images` = [(caption, file name)].

    Image paths are written relative to the page, so the report directory can be moved whole.
    """
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for caption, header, rows in tables:
        parts.append(f"<h2>{html.escape(caption)}</h2>{_html_table(header, rows)}")
    for caption, src in images:
        parts.append(f'<figure><img src="{html.escape(str(src))}" alt="{html.escape(caption)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if notes:
        parts.append(f"<pre>{html.escape(notes)}</pre>")
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    return atomic_write_text(path, page)


SUMMARY_HEADER = ["model", "test acc", "test loss", "loss barrier", "error barrier"]


def curve_rows(curves: dict) -> list[dict]:
    """One CSV row per (curve, alpha): label, alpha, then <split>_acc and <split>_loss for every split."""
    rows = []
    for label, c in curves.items():
        for i, a in enumerate(c.alphas):
            row = {"curve": label, "alpha": a}
            for split in c.loss:
                row[f"{split}_acc"], row[f"{split}_loss"] = c.acc[split][i], c.loss[split][i]
            rows.append(row)
    return rows


def write_comparison_report(comparison, out_dir, title: str, extra: dict | None = None) -> dict[str, Path]:
    """Write report.json, barrier.csv, barrier.png, variance.png and index.html for a `comparison.Comparison`.

    Returns {name: path}. `extra` (e.g. endpoint training details) is stored in report.json under "run".
    """
    from .diagnostics import site_label
    from .plots import plot_barrier_curves, plot_variance_ratios

    out = Path(out_dir)
    first_sites = next(iter(comparison.variance.values()))
    paths = {
        "json": write_json(out / "report.json", {"title": title, "run": extra or {}, "summary": {
            "header": SUMMARY_HEADER, "rows": comparison.summary_rows()}, **comparison.to_dict()}),
        "csv": write_csv(out / "barrier.csv", curve_rows(comparison.curves)),
        "barrier_png": plot_barrier_curves(comparison.curves, out / "barrier.png", title=title),
        "variance_png": plot_variance_ratios({k: [r for _, r in v] for k, v in comparison.variance.items()},
                                             out / "variance.png", [site_label(s) for s, _ in first_sites]),
    }
    variance_rows = [[site_label(s), s.kind, *(comparison.variance[k][i][1] for k in comparison.variance)]
                     for i, (s, _) in enumerate(first_sites)]
    paths["html"] = write_html(
        out / "index.html", title,
        tables=[("Endpoints and midpoints (test set)", SUMMARY_HEADER, comparison.summary_rows()),
                ("Variance ratio std_alpha / mean(std_A, std_B) at alpha = 0.5", ["site", "kind", *comparison.variance],
                 variance_rows)],
        images=[("Test accuracy and loss along the interpolation path", "barrier.png"),
                ("Per-layer variance ratio at the midpoint", "variance.png")],
        notes="\n\n".join(filter(None, [comparison.repair_note(),
                                          json.dumps(_jsonable({"settings": comparison.settings, "run": extra or {}}), indent=2)])),
    )
    return paths
