"""Report writers: valid JSON/CSV/HTML, and a crash mid-write leaves the previous file intact."""

import csv
import json
import math

import pytest
import torch

from onebasin._io import atomic_write
from onebasin.report import format_table, read_csv, write_csv, write_html, write_json


def test_json_converts_tensors_and_nan(tmp_path):
    path = write_json(tmp_path / "r.json", {"acc": torch.tensor([0.5, 0.25]), "bad": math.nan, "n": 3})
    assert json.loads(path.read_text()) == {"acc": [0.5, 0.25], "bad": None, "n": 3}


def test_csv_has_union_of_columns(tmp_path):
    path = write_csv(tmp_path / "r.csv", [{"alpha": 0.0, "acc": 0.9}, {"alpha": 0.5, "loss": 1.0}])
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["alpha", "acc", "loss"] and rows[1]["loss"] == "1.0" and rows[1]["acc"] == ""
    assert read_csv(path) == rows and read_csv(tmp_path / "missing.csv") == []


def test_html_escapes_and_links_images(tmp_path):
    path = write_html(tmp_path / "index.html", "a <b>", tables=[("t", ["x", "y"], [["<i>", 0.5]])], images=[("c", "p.png")])
    page = path.read_text()
    assert "&lt;i&gt;" in page and 'src="p.png"' in page and "0.5000" in page and "<b>" not in page


def test_crash_mid_write_keeps_previous_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def crash(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_format_table_aligns_columns():
    lines = format_table(["name", "acc"], [["A", 0.98765], ["midpoint", 0.5]]).splitlines()
    assert lines[2] == "A         0.9877" and len({len(line) for line in lines}) == 1
