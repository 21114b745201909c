"""Hugging Face checkpoints as users keep them: two save_pretrained folders of small random-init BERTs merge
into a folder that AutoModel.from_pretrained loads as it is, computing what merge returned."""

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cli_helpers import run_cli  # noqa: E402


def save_bert(folder: Path, seed: int, vocab: Path) -> None:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(vocab.read_text().split()), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder)
    transformers.BertTokenizer(str(vocab)).save_pretrained(folder)


@pytest.fixture
def two_berts(tmp_path):
    import pydoc_data.topics

    vocab = tmp_path / "vocab.txt"
    letters = sorted({c for c in "abcdefghijklmnopqrstuvwxyz0123456789.,()"})
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters]) + "\n")
    for name, seed in (("a", 0), ("b", 1)):
        save_bert(tmp_path / name, seed, vocab)
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(list(pydoc_data.topics.topics.values())[:3]).lower()[:20000])
    return tmp_path


def test_merge_two_save_pretrained_folders_into_one_from_pretrained_loads(two_berts, capsys):
    root = two_berts
    code, out, err = run_cli(["merge", root / "a", root / "b", "--calib-text", root / "corpus.txt", "--calib-examples", 64,
                              "--seq-len", 16, "--device", "cpu", "--no-progress", "--out", root / "m"], capsys)
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["fused"] and report["format"] == "save_pretrained"
    merged = transformers.AutoModel.from_pretrained(root / "m").eval()
    a = transformers.AutoModel.from_pretrained(root / "a").eval()
    assert type(merged) is type(a)
    ids = torch.randint(5, 40, (3, 16))
    with torch.no_grad():
        ya, ym = a(input_ids=ids).last_hidden_state, merged(input_ids=ids).last_hidden_state
    assert ym.shape == ya.shape and torch.isfinite(ym).all() and (ym - ya).abs().max() > 1e-3
    tok = transformers.AutoTokenizer.from_pretrained(root / "m")
    assert tok("abc")["input_ids"]


def test_merge_of_folders_needs_calibration_data(two_berts, capsys):
    root = two_berts
    code, _, err = run_cli(["merge", root / "a", root / "b", "--out", root / "m"], capsys)
    assert code == 2 and "--calib-text" in err and len(err.strip().splitlines()) == 1
    assert not (root / "m").exists()
