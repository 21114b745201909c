"""Checkpoints: safetensors weights plus a JSON sidecar, written atomically.

    save_checkpoint("runs/a.safetensors", model.state_dict(), {"model": "mlp", "model_kwargs": {...}})
    state, meta = load_checkpoint("runs/a.safetensors", expect={"model": "mlp"})
    model, meta = load_model("runs/a.safetensors")        # rebuilt from the recorded name/options

`X.safetensors` is self-contained: its header holds the metadata (JSON under the key "onebasin")
and a sha256 of the tensor data, so the file alone is checked on load. `X.json` is the same
metadata, for people and tools. Each file is written to a temporary file in the same directory,
fsynced, then renamed over the old one (`os.replace`), weights first: a crash at any point leaves
either the previous or the new weights file, never a torn one; a stale sidecar is reported and
ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import onebasin
from onebasin._io import atomic_write, atomic_write_text
from onebasin.errors import OnebasinError

_KEY = "onebasin"


class CheckpointError(OnebasinError):
    """A checkpoint is missing, corrupt, or not the one that was asked for."""


def checkpoint_paths(path) -> tuple[Path, Path]:
    """(weights, sidecar) for `path` given with or without the .safetensors suffix."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix == ".safetensors" else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of `tensors` in sorted-name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path, state_dict: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `state_dict` (tensors of any dtype, ints included) and JSON-able `meta` atomically.

    Tensors are copied to contiguous CPU tensors (safetensors refuses shared or strided storage).
    `meta` gains "onebasin_version" and "sha256". Returns the weights path.
    """
    weights, sidecar = checkpoint_paths(path)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    meta = {**meta, "onebasin_version": onebasin.__version__, "sha256": tensor_digest(tensors)}
    text = json.dumps(meta, indent=2, sort_keys=True)
    atomic_write(weights, _save_tensors(tensors, text))
    atomic_write_text(sidecar, text + "\n")
    return weights


def _save_tensors(tensors, text):
    def write(tmp):
        save_file(tensors, str(tmp), metadata={_KEY: text})
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600 files; make them like any other

    return write


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_meta(path) -> dict:
    """The metadata stored in a checkpoint's weights file (no tensor data is read)."""
    weights, _ = checkpoint_paths(path)
    if not weights.exists():
        raise CheckpointError(f"no checkpoint at {weights}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = f.metadata() or {}
        return json.loads(header[_KEY])
    except Exception as err:
        raise CheckpointError(f"{weights} is not a readable onebasin checkpoint ({err})") from err


def load_checkpoint(path, expect: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read (state_dict, meta) from `path`, verifying its integrity and `expect`.

    expect: entries the metadata must hold, e.g. {"model": "mlp", "model_kwargs": {"width": 128}};
        a mismatch raises CheckpointError naming each differing entry.
    Raises CheckpointError when the file is missing, truncated, corrupt or mismatched.
    """
    weights, sidecar = checkpoint_paths(path)
    meta = read_meta(weights)
    try:
        with safe_open(str(weights), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise CheckpointError(f"{weights} is corrupt: {err}") from err
    if tensor_digest(state) != meta.get("sha256"):
        raise CheckpointError(f"{weights} is corrupt: its tensor data does not match the sha256 it was saved with")
    _check_sidecar(sidecar, meta)
    _check_expect(weights, meta, expect or {})
    return state, meta


def _check_sidecar(sidecar: Path, meta: dict) -> None:
    try:
        side = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        side = None
    if side != meta:
        warnings.warn(f"{sidecar} is missing or stale (an interrupted save?); "
                      f"using the metadata stored in the weights file", stacklevel=3)


def _check_expect(weights: Path, meta: dict, expect: dict) -> None:
    expect = json.loads(json.dumps(expect))  # tuples -> lists, as stored
    diffs = [f"{k}: checkpoint has {meta.get(k)!r}, expected {v!r}" for k, v in expect.items()
             if meta.get(k) != v]
    if diffs:
        raise CheckpointError(f"{weights} does not match the requested model: " + "; ".join(diffs))


def load_model(path, expect: dict | None = None, device="cpu"):
    """Rebuild the model recorded in a checkpoint ("model", "model_kwargs") and load its weights.

    A merged model whose REPAIR corrections could not all be fused (metadata "repair_affines") comes
    back as the same `Repaired<Class>` wrapper that `onebasin merge` saved. Returns (model in eval mode, meta).
    """
    from onebasin.graph import example_from
    from onebasin.models import create_model
    from onebasin.repair import restore_affines

    state, meta = load_checkpoint(path, expect)
    if "model" not in meta:
        raise CheckpointError(f"{path} does not record which model it holds (no 'model' in its metadata)")
    model = create_model(meta["model"], **meta.get("model_kwargs", {}))
    try:
        if meta.get("repair_affines"):
            if "example_input" not in meta:
                raise CheckpointError(f"{path}: its REPAIR corrections need the model's input shape ('example_input' in its metadata)")
            model = restore_affines(model, meta["repair_affines"], state, example_from(meta["example_input"]))
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path}: weights do not fit {meta['model']}: {err}") from err
    return model.to(device).eval(), meta


def load_any(path, model: str | None = None, model_kwargs: dict | None = None, device="cpu"):
    """Load an onebasin checkpoint, or a plain state_dict file for a model given by name or "module:factory".

    An onebasin checkpoint rebuilds its own model (checked against `model` when given). Any other file
    (.safetensors, or a torch.save'd state_dict: .pt/.pth/.bin, read with weights_only=True) needs `model`
    and is loaded strictly. Returns (model in eval mode, meta). Raises CheckpointError on a missing or
    unreadable file or weights that do not fit the model; ValueError on an unknown model name.
    """
    from onebasin.models import build_model

    weights = Path(path)
    if not weights.exists():
        raise CheckpointError(f"no checkpoint at {weights}")
    try:
        meta = read_meta(weights)
    except CheckpointError:
        meta = None
    if meta is not None and "model" in meta:
        return load_model(weights, expect={"model": model} if model and ":" not in model else None, device=device)
    if model is None:
        raise CheckpointError(f"{weights} is not an onebasin checkpoint: say which model it holds (--model NAME or module:factory)")
    net = build_model(model, **(model_kwargs or {}))
    try:
        net.load_state_dict(_read_state_dict(weights))
    except RuntimeError as err:
        raise CheckpointError(f"{weights}: weights do not fit {model}: {str(err).splitlines()[0]}") from err
    return net.to(device).eval(), {"model": model, "model_kwargs": model_kwargs or {}, "source": str(weights)}


def _read_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        if weights.suffix == ".safetensors":
            return load_file(str(weights))
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{weights} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise CheckpointError(f"{weights} holds a {type(state).__name__}, not a state_dict")
    return state
