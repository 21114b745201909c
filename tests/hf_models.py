"""Tiny random-init Hugging Face models as users save them (save_pretrained, the classes' default configs
apart from the sizes), a character tokenizer and a calibration text: for the Hugging Face tests."""

import copy
from pathlib import Path

import torch

from onebasin.graph import as_call, without_cache
from onebasin.hf import quiet
from onebasin.permute import permute_model, random_perms
from onebasin.spec import trace

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
LETTERS = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,()"))
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LETTERS, *("##" + c for c in LETTERS)]  # every word encodes


def config(kind: str, vocab_size: int = len(VOCAB)):
    import transformers as T

    if kind == "bert":
        return T.BertConfig(vocab_size=vocab_size, max_position_embeddings=64, **SMALL)
    if kind == "gpt2":
        return T.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    if kind == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        return T.LlamaConfig(vocab_size=vocab_size, num_key_value_heads=2, max_position_embeddings=64, **SMALL)
    if kind == "mistral":  # bias-free like Llama, but no config flag to add biases
        return T.MistralConfig(vocab_size=vocab_size, num_key_value_heads=2, max_position_embeddings=64, **SMALL)
    if kind == "vit":
        return T.ViTConfig(image_size=28, patch_size=7, num_channels=1, num_labels=10, **SMALL)
    if kind == "resnet":  # no attention: every group a free permutation (merge_many's domain)
        return T.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                              num_labels=10)
    raise ValueError(kind)


CLASSES = {"bert": "BertModel", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
           "vit": "ViTForImageClassification", "resnet": "ResNetForImageClassification"}


def build(kind: str, seed: int = 0, **cfg):
    import transformers as T

    torch.manual_seed(seed)
    with quiet():
        return getattr(T, CLASSES[kind])(config(kind, **cfg)).eval()


def example(kind: str, n: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind in ("vit", "resnet"):
        return {"pixel_values": torch.randn(n, 1, 28, 28, generator=g)}
    ids = torch.randint(5, len(VOCAB), (n, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def save(model, folder: Path, tokenizer: bool = True) -> Path:
    """model.save_pretrained(folder), with the character tokenizer beside it for text models."""
    import transformers as T

    with quiet():
        model.save_pretrained(folder)
    if tokenizer and hasattr(model.config, "vocab_size") and model.config.model_type != "resnet":
        vocab = folder.parent / "vocab.txt"
        vocab.write_text("\n".join(VOCAB) + "\n")
        T.BertTokenizer(str(vocab)).save_pretrained(folder)
        vocab.unlink()
    return folder


def permuted_copy(model, kind: str, seed: int = 1):
    """A copy of `model` with every traced group randomly permuted (the same function, other weights)."""
    with without_cache([model]):
        spec = trace(model, example(kind))
        out = permute_model(model, spec, random_perms(spec, seed=seed))
    out.config = copy.deepcopy(model.config)
    return out


def outputs(model, kind: str) -> torch.Tensor:
    """The model's main output on a fixed example: hidden states, logits."""
    args, kwargs = as_call(example(kind))
    with torch.no_grad():
        out = model(*args, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def corpus(path: Path) -> Path:
    import pydoc_data.topics

    path.write_text(" ".join(list(pydoc_data.topics.topics.values())[:3]).lower()[:20000])
    return path


def tree(root: Path) -> dict:
    """{relative path: (size, mtime_ns)} of every file and folder under root: compare before and after."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}
