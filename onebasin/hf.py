"""Hugging Face checkpoints as users keep them: folders written by `save_pretrained` (config.json +
model.safetensors), merged into a folder that `from_pretrained` loads as it is.

    onebasin merge runs/bert_a runs/bert_b --calib-text corpus.txt --out runs/bert_merged

The model class is the config's `architectures[0]` (else AutoModel); calibration inputs come from a text
file tokenised with the tokenizer saved in model A's folder (fixed-length windows), or from a torchvision
dataset for vision models. Nothing is downloaded: everything is read from the two folders.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from .errors import InputMismatchError, OnebasinError


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
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    try:
        model = (cls or transformers.AutoModel).from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise OnebasinError(f"{path}: cannot load the Hugging Face model ({str(err).splitlines()[0]})") from err
    return model.to(device).eval()


def text_batches(text_file, tokenizer_dir, *, seq_len: int = 64, batch: int = 16, max_examples: int | None = None) -> list[dict]:
    """Calibration inputs from a text file: token windows of `seq_len` in batches of dicts
    {"input_ids": (B, T), "attention_mask": (B, T)}, tokenised with the tokenizer saved in `tokenizer_dir`."""
    transformers = _transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise OnebasinError(f"{tokenizer_dir} holds no tokenizer to read the calibration text: save one beside the "
                            f"model (tokenizer.save_pretrained) ({str(err).splitlines()[0]})") from err  # fmt: skip
    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise OnebasinError(f"cannot read the calibration text {text_file}: {err}") from err
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    if max_examples is not None:
        windows = windows[:max_examples]
    if len(windows) == 0:
        raise InputMismatchError(f"{text_file} holds fewer than {seq_len} tokens: no calibration window")
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch)]


def save_pretrained_atomic(model: nn.Module, out, source_dir=None) -> Path:
    """model.save_pretrained into `out` (a new folder, complete or absent), with the tokenizer files of
    `source_dir` copied beside it."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        for f in Path(source_dir or tmp).glob("*"):
            if f.is_file() and ("token" in f.name or f.name in ("vocab.txt", "vocab.json", "merges.txt", "special_tokens_map.json")):
                shutil.copy2(f, tmp / f.name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
