"""Folder outputs of the CLI never overwrite or delete what onebasin did not write (issue 23, data loss).

A report folder (barrier, demo) is written into a new or empty folder, or with --force into an earlier
report folder (it holds report.json); a folder of the user's own files is refused even with --force, and
its files stay as they were (contents and mtimes)."""

import json
import os

from cli_helpers import checkpoint, run_cli, use_fake_data
from hf_models import tree

from onebasin._io import remove_stale_temp_files


def barrier(tmp_path, capsys, out, *extra):
    a, b = checkpoint(tmp_path / "a.safetensors", seed=0), checkpoint(tmp_path / "b.safetensors", seed=1)
    return run_cli(["barrier", a, b, "--alphas", 3, "--calib-examples", 32, "--device", "cpu", "--no-progress",
                    "--out", out, *extra], capsys)


def test_force_never_overwrites_a_users_folder(tmp_path, capsys, monkeypatch):
    """Was: --force wrote report.json, index.html, ... over the user's own files of those names."""
    use_fake_data(monkeypatch)
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<p>my page</p>")
    before = tree(site)
    code, _, err = barrier(tmp_path, capsys, site, "--force")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not written by onebasin" in err, err
    assert tree(site) == before and (site / "index.html").read_text() == "<p>my page</p>"


def test_force_replaces_an_earlier_report(tmp_path, capsys, monkeypatch):
    use_fake_data(monkeypatch)
    code, _, err = barrier(tmp_path, capsys, tmp_path / "r")
    assert code == 0, err
    (tmp_path / "r" / "notes.txt").write_text("kept")  # a user's note beside the report
    code, _, err = barrier(tmp_path, capsys, tmp_path / "r")
    assert code == 2 and "--force" in err
    code, _, err = barrier(tmp_path, capsys, tmp_path / "r", "--force")
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "report.json").read_text())["title"]
    assert (tmp_path / "r" / "notes.txt").read_text() == "kept"


def test_stale_temporary_folders_and_files_of_dead_processes_are_removed(tmp_path):
    dead, mine = 999_999_999, os.getpid()
    (tmp_path / f".m.{dead}.tmp").mkdir()
    (tmp_path / f".m.{dead}.tmp" / "model.safetensors").write_bytes(b"x")
    (tmp_path / f".x.safetensors.{dead}.tmp").write_bytes(b"x")
    (tmp_path / f".y.{mine}.tmp").mkdir()
    (tmp_path / "user.tmp").mkdir()
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == [f".m.{dead}.tmp", f".x.safetensors.{dead}.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".y.{mine}.tmp", "user.tmp"]
