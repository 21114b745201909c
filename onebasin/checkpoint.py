"""Checkpoints: safetensors weights plus a JSON sidecar, written atomically.

    save_checkpoint("runs/a.safetensors", model.state_dict(), {"model": "mlp", "model_kwargs": {...}})
    state, meta = load_checkpoint("runs/a.safetensors", expect={"model": "mlp"})
    model, meta = load_model("runs/a.safetensors")        # rebuilt from the recorded name/options

`X.safetensors` is self-contained: its header holds the metadata (JSON under the key "onebasin")
and a sha256 over the tensor data and the rest of the metadata, so the file alone is checked on load:
a bit flip in a tensor or an edited field (e.g. "dataset") is reported. (Checkpoints of onebasin
<= 0.1.0 hashed the tensors only; they still load, with a warning that their metadata is unchecked.) `X.json` is the same
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from onebasin._copy import untie_parameters
from onebasin._io import atomic_write, atomic_write_text
from onebasin._version import __version__
from onebasin.distributed import is_main
from onebasin.errors import InvalidOptionError, OnebasinError

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


def checkpoint_digest(tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """sha256 over `tensor_digest(tensors)` and the canonical JSON of `meta` without its "sha256" entry."""
    body = json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{tensor_digest(tensors)}|{body}".encode()).hexdigest()


def save_checkpoint(path, state_dict: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `state_dict` (tensors of any dtype, ints included) and JSON-able `meta` atomically.

    Tensors are copied to contiguous CPU tensors (safetensors refuses shared or strided storage).
    `meta` gains "onebasin_version" and "sha256" (`checkpoint_digest`: tensors and metadata). Returns the
    weights path.
    """
    weights, sidecar = checkpoint_paths(path)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    meta = json.loads(json.dumps({**meta, "onebasin_version": __version__}))  # as it will be read back
    meta["sha256"] = checkpoint_digest(tensors, meta)
    text = json.dumps(meta, indent=2, sort_keys=True)
    atomic_write(weights, _save_tensors(tensors, text, weights))
    atomic_write_text(sidecar, text + "\n")
    return weights


MODEL_FIELDS = ("model", "model_kwargs", "image_size", "dataset")  # what a merged checkpoint keeps of its sources


def save_merged(path, model, result, *, sources, meta: dict | None = None, measured: dict | None = None,
                key: str = "merge") -> Path:
    """Save a merged model as an onebasin checkpoint (rank 0 only under torch.distributed) and return the weights
    path it is (or would be, on another rank) written to: `path` with the .safetensors suffix added if missing.

    Metadata: the MODEL_FIELDS of `meta` (how `load_model` rebuilds the model; dataset), "merged_from" (the
    `sources` as strings), `result.to_dict()` under `key` ("merge" for a MergeResult, "merge_many" for a
    ManyResult), "measured" when given, and, when some REPAIR corrections stay as modules (`result.affines`),
    "repair_affines" and "example_input" (what `load_model` needs to rebuild them), and "untied" (weights the
    alignment gave their own copy: `load_model` unties them in the rebuilt model).
    """
    out = {k: meta[k] for k in MODEL_FIELDS if meta and k in meta}
    out |= {"merged_from": [str(s) for s in sources], key: result.to_dict()}
    if measured is not None:
        out["measured"] = measured
    if result.affines:
        out |= {"repair_affines": result.affines, "example_input": result.example_input}
    if untied := getattr(result, "align_record", {}).get("untied"):
        out["untied"] = untied  # parameters the merge gave their own copy (orthogonal untie=True)
    if is_main():
        return save_checkpoint(path, model.state_dict(), out)
    return checkpoint_paths(path)[0]


def _save_tensors(tensors, text, weights):
    def write(tmp):
        try:
            save_file(tensors, str(tmp), metadata={_KEY: text})
        except SafetensorError as err:  # safetensors' own I/O errors are not OSErrors
            raise CheckpointError(f"cannot write {weights}: {err}") from err
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600 files; make them like any other

    return write


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _require_file(weights: Path) -> None:
    if not weights.exists():
        raise CheckpointError(f"no checkpoint at {weights}")
    if weights.is_dir():
        raise CheckpointError(f"{weights} is a directory, not a checkpoint file")
    if weights.stat().st_size == 0:
        raise CheckpointError(f"{weights} is empty (0 bytes): an interrupted copy or download?")


def is_onebasin_file(weights) -> bool:
    """Whether a file's safetensors header (as far as it is there) holds onebasin metadata; true for a truncated one."""
    try:
        with open(weights, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            head = f.read(min(n, 1 << 24))
    except OSError:
        return False
    return head.startswith(b"{") and f'"{_KEY}":"'.encode() in head


def read_meta(path) -> dict:
    """The metadata stored in a checkpoint's weights file (no tensor data is read)."""
    weights, _ = checkpoint_paths(path)
    _require_file(weights)
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as err:
        if is_onebasin_file(weights):
            raise CheckpointError(f"{weights} is a truncated or corrupt onebasin checkpoint ({err})") from err
        raise CheckpointError(f"{weights} is not a readable onebasin checkpoint ({err})") from err
    if _KEY not in header:
        raise CheckpointError(f"{weights} is a safetensors file without onebasin metadata, not an onebasin checkpoint")
    try:
        return json.loads(header[_KEY])
    except ValueError as err:
        raise CheckpointError(f"{weights} is corrupt: its onebasin metadata is not valid JSON ({err})") from err


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
    _check_digest(weights, state, meta)
    _check_sidecar(sidecar, meta)
    _check_expect(weights, meta, expect or {})
    return state, meta


def _check_digest(weights: Path, state: dict, meta: dict) -> None:
    if checkpoint_digest(state, meta) == meta.get("sha256"):
        return
    if tensor_digest(state) == meta.get("sha256"):  # onebasin <= 0.1.0: the tensors only
        warnings.warn(f"{weights} was saved by onebasin {meta.get('onebasin_version', '<= 0.1.0')}, whose sha256 "
                      f"covers the tensors only: its metadata (model, dataset...) is unchecked; save it again "
                      f"to cover it", stacklevel=3)
        return
    raise CheckpointError(f"{weights} is corrupt or was edited: its tensors or metadata do not match the sha256 "
                          f"it was saved with")


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


OWN_FACTORIES = ("onebasin.hf:from_config",)  # onebasin's factories: a checkpoint may name them without `expect`


def load_model(path, expect: dict | None = None, device="cpu"):
    """Rebuild the model recorded in a checkpoint ("model", "model_kwargs") and load its weights.

    "model" is a registered name or a user's "package.module:factory" (`models.build_model`). A factory
    is imported and called only when the caller names it, expect={"model": "package.module:factory"}
    (the CLI: --model package.module:factory), or when it is one of onebasin's own (`OWN_FACTORIES`: merged
    Hugging Face models): a checkpoint cannot make onebasin run code it names.
    A merged model whose REPAIR corrections could not all be fused (metadata "repair_affines") comes
    back as the same `Repaired<Class>` wrapper that `onebasin merge` saved; weights listed under "untied"
    (an LM head untied from its embedding by the merge) get their own copy before the weights are loaded. Returns (model in eval mode, meta).
    Raises CheckpointError when the file is bad or its metadata does not fit the model.
    """
    from onebasin.graph import example_from
    from onebasin.repair import restore_affines

    state, meta = load_checkpoint(path, expect)
    if "model" not in meta:
        raise CheckpointError(f"{path} does not record which model it holds (no 'model' in its metadata)")
    name, kwargs = meta["model"], meta.get("model_kwargs", {})
    if ":" in str(name) and name not in OWN_FACTORIES and (expect or {}).get("model") != name:
        raise CheckpointError(f"{path} holds a model built by the factory {name!r}: name it to allow importing and "
                              f"calling it (--model {name}, or load_model(path, expect={{'model': {name!r}}}))")
    model = untie_parameters(_build(name, kwargs, f"{path}: its metadata does not fit the model"), meta.get("untied", []))
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
    unreadable file or weights that do not fit the model; InvalidOptionError (a ValueError) when `model`
    is unknown or its factory refuses `model_kwargs`.
    """
    weights = Path(path)
    if weights.suffix == ".json" and weights.with_suffix(".safetensors").exists():
        raise CheckpointError(f"{weights} is a checkpoint's JSON sidecar: pass its weights file "
                              f"{weights.with_suffix('.safetensors')}")
    _require_file(weights)
    try:
        meta = read_meta(weights)
    except CheckpointError:
        if is_onebasin_file(weights):
            raise  # a truncated or corrupt onebasin checkpoint: say so, not "say which model"
        meta = None
    if meta is not None and "model" in meta:
        return load_model(weights, expect={"model": model} if model else None, device=device)
    if model is None:
        raise CheckpointError(f"{weights} is not an onebasin checkpoint: say which model it holds (--model NAME or module:factory)")
    net = _build(model, model_kwargs or {}, f"{weights}: cannot build the model", InvalidOptionError)
    try:
        net.load_state_dict(_read_state_dict(weights))
    except RuntimeError as err:
        raise CheckpointError(f"{weights}: weights do not fit {model}: {str(err).splitlines()[0]}") from err
    return net.to(device).eval(), {"model": model, "model_kwargs": model_kwargs or {}, "source": str(weights)}


def _build(name: str, kwargs: dict, why: str, error: type[OnebasinError] = CheckpointError):
    """models.build_model(name, **kwargs), with any failure of the factory (e.g. an unknown option) as `error`."""
    from onebasin.models import build_model

    if not isinstance(kwargs, dict):
        raise error(f"{why}: model options must be a dict, got {kwargs!r}")
    try:
        return build_model(name, **kwargs)
    except ValueError as err:  # unknown model name, factory not importable
        raise error(f"{why}: {err}") from err
    except Exception as err:  # the factory's own complaint, e.g. TypeError: unexpected keyword argument
        line = (str(err).strip().splitlines() or [""])[0]
        raise error(f"{why}: {name}({_opts(kwargs)}) raised {type(err).__name__}: {line}") from err


def _opts(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


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
