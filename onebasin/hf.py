"""Hugging Face checkpoints as users keep them: folders written by `save_pretrained` (config.json +
model.safetensors), merged into a folder that `from_pretrained` loads as it is.

    onebasin merge runs/bert_a runs/bert_b --calib-text corpus.txt --out runs/bert_merged
    onebasin.hf.merge_pretrained(["runs/bert_a", "runs/bert_b", "runs/bert_c"], out="runs/bert_merged",
                                 calib_text="corpus.txt")

The model class is the config's `architectures[0]` (else AutoModel); calibration inputs come from a text
file tokenised with the tokenizer saved in the first folder (fixed-length windows), or from a torchvision
dataset for vision models. Two folders are merged by `pipeline.merge`, three or more by `merge_many`.
Models are traced and merged with `use_cache` off (a key/value cache is no tensor output), and saved with
the config they were saved with (bias flags of Llama-style models turned on: `with_biases`). Nothing is downloaded: everything is read from the folders.

The output folder holds `onebasin.json` (what was merged, how): onebasin replaces (`force`) only folders
that hold it, never one it did not write, an input folder or a folder holding an input.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from ._io import check_output_folder, remove_stale_temp_files, replace_folder, temp_path
from ._version import __version__
from .checkpoint import save_merged
from .checks import check_same_architecture, check_weights
from .distributed import is_main
from .graph import without_cache
from .errors import ArchitectureMismatchError, InputMismatchError, InvalidOptionError, OnebasinError
from .pipeline import merge, merge_many

MARKER = "onebasin.json"  # in every folder onebasin writes: the record of the merge, and its licence to replace it
TOKENIZER_FILES = ("vocab.txt", "vocab.json", "merges.txt", "special_tokens_map.json")


def is_pretrained_dir(path) -> bool:
    """Whether `path` is a folder written by a Hugging Face `save_pretrained` (it holds config.json)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise OnebasinError("merging Hugging Face folders needs the `transformers` package (pip install transformers)") from err
    return transformers


def load_pretrained(path, device="cpu") -> nn.Module:
    """The model saved in a `save_pretrained` folder, of its config's class, in eval mode on `device`."""
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise OnebasinError(f"{path}: cannot read the Hugging Face config ({_first_line(err)})") from err
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    try:
        with quiet():  # its bars and load report: missing weights are an error here
            model, info = (cls or transformers.AutoModel).from_pretrained(path, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise OnebasinError(f"{path}: cannot load the Hugging Face model ({_first_line(err)})") from err
    for what in ("missing_keys", "mismatched_keys"):
        if keys := sorted(map(str, info.get(what) or ())):
            raise InputMismatchError(f"{path}: its weights file lacks or mis-sizes {len(keys)} weights of its "
                                     f"{type(model).__name__} ({what}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    return model.to(device).eval()


def from_config(config: dict) -> nn.Module:
    """A random-init model of the class and config recorded by `merge_pretrained`'s onebasin checkpoint
    (its "model" is "onebasin.hf:from_config"): `onebasin.load_model` rebuilds the merged model with it."""
    transformers = _transformers()
    config = dict(config, use_cache=False)
    cfg = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    names = getattr(cfg, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    return cls(cfg).eval() if cls is not None else transformers.AutoModel.from_config(cfg).eval()


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def text_batches(text_file, tokenizer_dir, *, seq_len: int = 64, batch: int = 16, max_examples: int | None = None,
                 vocab_size: int | None = None) -> list[dict]:
    """Calibration inputs from a text file: token windows of `seq_len` in batches of dicts
    {"input_ids": (B, T), "attention_mask": (B, T)}, tokenised with the tokenizer saved in `tokenizer_dir`.

    InputMismatchError when the tokenizer cannot encode the text (most tokens unknown: e.g. a folder without
    tokenizer files, for which transformers builds an empty vocabulary) or gives ids >= `vocab_size`.
    """
    tok = _tokenizer(tokenizer_dir)
    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise OnebasinError(f"cannot read the calibration text {text_file}: {err}") from err
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    _check_encoded(ids, tok, tokenizer_dir, text_file, vocab_size)
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    if max_examples is not None:
        windows = windows[:max_examples]
    if len(windows) == 0:
        raise InputMismatchError(f"{text_file} holds fewer than {seq_len} tokens: no calibration window")
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch)]


def _tokenizer(folder):
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise OnebasinError(f"{folder} holds no tokenizer to read the calibration text: save one beside the "
                            f"model (tokenizer.save_pretrained) ({_first_line(err)})") from err  # fmt: skip


def _check_encoded(ids: torch.Tensor, tok, folder, text_file, vocab_size: int | None) -> None:
    """InputMismatchError when most tokens are unknown, or an id does not fit the model's embedding."""
    unk = getattr(tok, "unk_token_id", None)
    if len(ids) and unk is not None and (ids == unk).float().mean() > 0.5:
        raise InputMismatchError(
            f"the tokenizer in {folder} encodes {(ids == unk).float().mean():.0%} of {text_file} as the unknown "
            f"token {tok.unk_token!r} (vocabulary of {len(tok)}): its tokenizer files are missing or do not fit the "
            "text; save the model's tokenizer beside it (tokenizer.save_pretrained)")
    if len(ids) and vocab_size is not None and int(ids.max()) >= vocab_size:
        raise InputMismatchError(f"the tokenizer in {folder} gives token id {int(ids.max())} but the model's vocabulary "
                                 f"has {vocab_size} entries: the tokenizer is not the model's")


def calibration(model: nn.Module, folder, *, calib_text=None, data=None, data_dir=None, seq_len: int = 64,
                max_examples: int = 5000) -> list:
    """Calibration batches for a Hugging Face model: token windows of `calib_text` (tokenised with the
    tokenizer in `folder`), or {"pixel_values": (B, C, H, W)} images of the dataset `data` (vision models)."""
    from .experiment import evaluation_batches

    _check_calibration(calib_text, data)
    if calib_text is not None:
        vocab = getattr(model.config, "vocab_size", None)
        return text_batches(calib_text, folder, seq_len=seq_len, max_examples=max_examples, vocab_size=vocab)
    _, images = evaluation_batches(data, getattr(model.config, "image_size", None), data_dir=data_dir,
                                   calib_examples=max_examples)
    return [{"pixel_values": x} for x, _ in images]


def _check_calibration(calib_text, data) -> None:
    if (calib_text is None) == (data is None):
        raise InvalidOptionError("say what to calibrate on: calib_text=FILE (--calib-text, text models) or "
                                 "data=DATASET (--data, image models)")


BIAS_FLAGS = ("attention_bias", "mlp_bias")  # config flags of Llama-style models whose Linear layers have no bias


def with_biases(model: nn.Module) -> nn.Module:
    """`model`, or where its config turns biases off (Llama's attention_bias / mlp_bias), a copy of the same class
    with those flags on and zero biases: the same function, and a place for REPAIR's shift, which folds into
    the bias of the layer before (Jordan et al. 2022, Sec. 4), so `from_pretrained` loads the merged model."""
    flags = [f for f in BIAS_FLAGS if getattr(model.config, f, None) is False]
    if not flags:
        return model
    config = copy.deepcopy(model.config)
    for f in flags:
        setattr(config, f, True)
    param = next(model.parameters())
    with quiet():
        out = type(model)(config).to(device=param.device, dtype=param.dtype).eval()
    missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
    if unexpected or not all(k.endswith(".bias") for k in missing):
        raise InputMismatchError(f"{type(model).__name__} with {', '.join(flags)} on has other weights: {missing + unexpected}")
    with torch.no_grad():
        for k in missing:
            out.get_parameter(k).zero_()
    return out


@contextlib.contextmanager
def quiet(enabled: bool = True):
    """transformers' progress bars and info/warning lines off inside the block (`--no-progress`)."""
    if not enabled:
        yield
        return
    logging = _transformers().utils.logging
    bars, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def merge_pretrained(
    dirs,
    *,
    out,
    calib_text=None,
    data: str | None = None,
    data_dir=None,
    seq_len: int = 64,
    max_examples: int = 5000,
    method: str = "activation",
    repair: str = "exact",
    alpha: float | None = None,
    combine: str = "universe",
    weights=None,
    sites=("layer",),
    device="cpu",
    force: bool = False,
    allow_onebasin_checkpoint: bool = False,
    progress: bool = True,
):
    """Merge N >= 2 Hugging Face `save_pretrained` folders of one architecture into the folder `out`.

    Args:
        dirs: the folders (config.json + weights; the first one's tokenizer reads `calib_text`).
        out: a new or empty folder, or (with `force`) an earlier output of onebasin (it holds onebasin.json).
        calib_text / data: a text file (text models) or a dataset name (vision models, {"pixel_values"}) to
            align and REPAIR on: `max_examples` windows of `seq_len` tokens, or images.
        method, repair, alpha, sites: as `pipeline.merge` for two folders (alpha None: 0.5; sites "layer" keeps
            the result a plain model of the first folder's class); three or more folders go through
            `merge_many` with `combine` ("universe", "mergemany", "anchor"), `weights` (one per folder) and
            `method` as its alignment ("activation" or "weight"). Two folders: `weights` [w_a, w_b] means
            alpha = w_b / (w_a + w_b).
        allow_onebasin_checkpoint: when some REPAIR corrections cannot be folded into the weights (residual
            additions, layers without bias and no config flag to add one), save out/onebasin.safetensors,
            which `onebasin.load_model` reloads, instead of raising. (Llama-style configs get their bias
            flags on and zero biases first, `with_biases`: the corrections then fold.)
        progress: False silences transformers' progress bars and log lines.
    Returns:
        (out as a Path, the MergeResult or ManyResult). `out` holds save_pretrained files and the tokenizer
        files of the first folder, or (not `result.fused`) the onebasin checkpoint; plus onebasin.json.
    Raises (all OnebasinError): InvalidOptionError (bad options, unfoldable corrections), OutputError (`out`
        is an input, holds one, was not written by onebasin, or exists without `force`), InputMismatchError
        (calibration text the tokenizer cannot encode), ArchitectureMismatchError, and `merge`'s errors.
    """
    if isinstance(dirs, (str, os.PathLike)):
        raise InvalidOptionError(f"merge_pretrained takes a list of folders, got one: {dirs}")
    dirs, out = [Path(d) for d in dirs], Path(out)
    _check_folders(dirs)
    check_output_folder(out, force, MARKER, inputs=dirs)
    alpha, weights = _check_weights(dirs, method, repair, alpha, weights)
    _check_calibration(calib_text, data)
    with quiet(not progress):
        models = _load_all(dirs, device)
        if repair in ("exact", "closed"):  # corrections at bias-free Linear outputs then fold
            models = [with_biases(m) for m in models]
        calib = calibration(models[0], dirs[0], calib_text=calib_text, data=data, data_dir=data_dir,
                            seq_len=seq_len, max_examples=max_examples)
        use_cache = getattr(models[0].config, "use_cache", None)  # as saved: the merged model's config keeps it
        with without_cache(models):
            merged, result = _merge(models, calib, method, repair, alpha, combine, weights, tuple(sites), max_examples)
        if result.fused and use_cache is not None:
            merged.config.use_cache = use_cache
        if not result.fused and not allow_onebasin_checkpoint:
            raise InvalidOptionError(_unfoldable(result, sites))
        if is_main():
            _save(merged, result, out, dirs, models[0].config)
    return out, result


def _load_all(dirs: list[Path], device) -> list[nn.Module]:
    """The folders' models, checked to be of one class and architecture."""
    models = [load_pretrained(d, device) for d in dirs]
    for d, m in zip(dirs[1:], models[1:]):
        if type(m) is not type(models[0]):
            raise ArchitectureMismatchError(f"{dirs[0]} holds a {type(models[0]).__name__}, {d} a {type(m).__name__}")
        check_same_architecture(models[0].state_dict(), m.state_dict(), (str(dirs[0]), str(d)))
    return models


def _check_folders(dirs: list[Path]) -> None:
    if len(dirs) < 2:
        raise InvalidOptionError(f"merge_pretrained needs two or more folders, got {len(dirs)}")
    for d in dirs:
        if not is_pretrained_dir(d):
            raise InputMismatchError(f"{d} is not a Hugging Face save_pretrained folder (no config.json) like {dirs[0]}")


def _check_weights(dirs, method, repair, alpha, weights) -> tuple[float, list[float] | None]:
    """(alpha of two folders, weights scaled to sum 1); InvalidOptionError for options N folders refuse."""
    if weights is not None:
        weights = check_weights(weights, len(dirs))
        if alpha is not None:
            raise InvalidOptionError("give alpha or weights, not both")
    if len(dirs) > 2:
        if method not in ("activation", "weight"):
            raise InvalidOptionError(f"method {method!r}: three or more models are aligned by 'activation' or 'weight'")
        if repair == "closed" or alpha is not None:
            raise InvalidOptionError("three or more models take repair 'exact', 'reset_bn' or 'none', and weights "
                                     "instead of alpha")
        return 0.5, weights
    return (weights[1] if weights is not None else 0.5 if alpha is None else alpha), weights


def _merge(models, calib, method, repair, alpha, combine, weights, sites, max_examples):
    if len(models) == 2:
        return merge(*models, method=method, repair=repair, alpha=alpha, data=calib, max_examples=max_examples,
                     sites=sites)
    return merge_many(models, method=combine, repair=repair, weights=weights, data=calib, alignment=method,
                      max_examples=max_examples, sites=sites)


def _unfoldable(result, sites) -> str:
    n = len(result.affines)
    if "block" in sites:
        why, fix = "after residual additions", "use sites 'layer' (--sites layer), or "
    else:
        why, fix = "layers or norms without a bias and no config flag to add one (e.g. Mistral's), which have no " \
                   "place for the shift", ""
    return (f"{n} REPAIR corrections cannot be folded into the weights ({why}), so from_pretrained could not load "
            f"the result: {fix}use repair 'none' (--repair none), or allow_onebasin_checkpoint "
            "(--allow-onebasin-checkpoint) to save an onebasin checkpoint that onebasin.load_model reloads")


def _record(result, dirs) -> dict:
    record = {k: v for k, v in result.to_dict().items() if k not in ("perms", "affines", "example_input")}
    return {"merged_from": [str(d) for d in dirs], "fused": result.fused, "merge": record}


def _save(merged: nn.Module, result, out: Path, dirs: list[Path], config) -> Path:
    """Write the merged model into a temporary folder beside `out`, then move it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out.parent)
    tmp = temp_path(out)
    try:
        if result.fused:
            with quiet():
                merged.save_pretrained(tmp)
            _copy_tokenizer(dirs[0], tmp)
            (tmp / MARKER).write_text(json.dumps({**_record(result, dirs), "onebasin_version": __version__}, indent=2))
        else:
            meta = {"model": "onebasin.hf:from_config", "model_kwargs": {"config": config.to_dict()}}
            save_merged(tmp / "onebasin.safetensors", merged, result, sources=dirs, meta=meta,  # sidecar: onebasin.json
                        key="merge" if len(dirs) == 2 else "merge_many")
        return replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_tokenizer(source: Path, folder: Path) -> None:
    for f in source.glob("*"):
        if f.is_file() and ("token" in f.name or f.name in TOKENIZER_FILES):
            shutil.copy2(f, folder / f.name)
