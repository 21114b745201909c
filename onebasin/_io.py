"""Atomic file writes: every output onebasin produces appears whole or not at all."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call write(tmp) on a temporary file beside `path`, fsync it, then rename it over `path`.

    A crash at any point leaves either the previous file or the new one, never a half-written file. The
    temporary file is `.<name>.<pid>.tmp`; one left by a killed process (SIGKILL, power loss) is removed by
    the next write into that folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent)
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


_TEMP = re.compile(r"^\..+\.(\d+)\.tmp$")


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the `.<name>.<pid>.tmp` files and folders in `folder` whose process no longer runs; returns them.

    One is removed only when its pid is unknown to this machine (ESRCH); a live process of another user
    (EPERM) keeps its file. (Writers on several machines sharing one folder cannot be told apart by pid.)
    """
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        m = _TEMP.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(p)
    return removed


def temp_path(path: str | os.PathLike) -> Path:
    """`.<name>.<pid>.tmp` beside `path`: where a file or folder is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def check_output_folder(path: str | os.PathLike, force: bool, marker: str, inputs=()) -> None:
    """Raise OutputError unless onebasin may write the folder `path` and replace what it holds.

    Allowed: a new or empty folder, or with `force` a folder holding `marker` (a file only onebasin writes
    into its outputs, e.g. onebasin.json). Refused, with or without `force`: a file, a folder onebasin did
    not write (it would lose the user's files), an input (a path in `inputs`) or a folder holding one.
    """
    from .errors import OutputError

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p} is a file; the output needs a folder")
    if problem := unwritable(p / marker):
        raise OutputError(problem)
    here = p.resolve()
    for src in inputs:
        if here == Path(src).resolve() or here in Path(src).resolve().parents:
            raise OutputError(f"{p} holds the input {src}: choose a new output folder")
    if not p.exists() or not any(p.iterdir()):
        return
    if not (p / marker).is_file():
        raise OutputError(f"{p} exists and was not written by onebasin (it has no {marker}): choose a new or empty "
                          "output folder (onebasin replaces only its own outputs)")
    if not force:
        raise OutputError(f"{p} exists; pass --force to overwrite it")


def replace_folder(tmp: Path, out: Path) -> Path:
    """Move the finished folder `tmp` to `out`, replacing the folder there (checked by `check_output_folder`).

    The old folder is first renamed to a temporary name, then deleted: a crash in between leaves it as a
    stale temporary folder that the next write removes, never a half-written `out`.
    """
    out = Path(out)
    if out.exists():
        old = out.with_name(f".{out.name}.old.{os.getpid()}.tmp")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    _fsync_dir(out.parent)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # exists but is not ours, or cannot tell: keep its file
    return True


def unwritable(path: str | os.PathLike) -> str | None:
    """Why `path` (a file or folder to be created or replaced) cannot be written, or None if it can.

    Looks at its nearest existing folder: it must be a folder, and writable. Lets a command refuse before
    hours of work rather than when it saves.
    """
    p = Path(path).absolute()
    ancestor = next(a for a in p.parents if a.exists())
    if not ancestor.is_dir():
        return f"cannot write {path}: {ancestor} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot write {path}: {ancestor} is not writable"
    return None


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
