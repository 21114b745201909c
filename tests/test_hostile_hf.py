"""Hostile but realistic Hugging Face merges (issue 23): what a new user tries with save_pretrained folders of
small random-init models (default configs apart from the sizes). Each case must end the CLI with exit 2 and
exactly one line naming the cause, raise an OnebasinError naming it from `onebasin.hf.merge_pretrained`, and
touch no file: the project folder's files, sizes and mtimes are the same before and after."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

import hf_models as H  # noqa: E402
from cli_helpers import run_cli  # noqa: E402

from onebasin.errors import (  # noqa: E402
    ArchitectureMismatchError,
    InputMismatchError,
    InvalidOptionError,
    OnebasinError,
    OutputError,
)
from onebasin.hf import merge_pretrained  # noqa: E402


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    """A user's project folder of save_pretrained folders, texts and an earlier onebasin output."""
    root = tmp_path_factory.mktemp("hf_project")
    H.save(H.build("bert", 0), root / "a")
    H.save(H.build("bert", 1), root / "b")
    H.save(H.build("bert", 2), root / "c")
    H.save(H.build("bert", 3, vocab_size=40), root / "small_vocab")  # its tokenizer gives ids up to 84
    H.save(H.build("bert", 4), root / "no_tokenizer", tokenizer=False)
    H.save(H.build("gpt2", 0), root / "gpt2")
    for s in (0, 1):
        H.save(H.build("mistral", s), root / f"mistral{s}")
    H.save(H.build("vit", 0), root / "vit")
    wide = H.build("bert", 5)
    wide.config.intermediate_size = 48
    H.save(transformers.BertModel(wide.config), root / "wide")
    shutil.copytree(root / "a", root / "no_config")
    (root / "no_config" / "config.json").unlink()
    shutil.copytree(root / "a", root / "bad_config")
    (root / "bad_config" / "config.json").write_text("{not json")
    shutil.copytree(root / "a", root / "partial")
    _drop_weight(root / "partial" / "model.safetensors")
    H.corpus(root / "corpus.txt")
    (root / "short.txt").write_text("a few words")
    (root / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    (root / "empty").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("my notes")
    (root / "earlier").mkdir()  # an earlier merge's output (holds onebasin.json)
    (root / "earlier" / "onebasin.json").write_text(json.dumps({"merged_from": ["a", "b"]}))
    (root / "afile").write_text("not a folder")
    return root


def _drop_weight(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    sd.pop(next(k for k in sd if k.endswith("query.weight")))
    save_file(sd, str(path), metadata={"format": "pt"})


T = "corpus.txt"
# id: (folders, options for merge_pretrained (paths relative to the project), error class, what the message names)
CASES = {
    "out_is_an_input": (["a", "b"], {"out": "a", "calib_text": T, "force": True}, OutputError, r"holds the input"),
    "out_holds_the_inputs": (["a", "b"], {"out": ".", "calib_text": T, "force": True}, OutputError, r"holds the input"),
    "out_is_a_users_folder": (["a", "b"], {"out": "notes", "calib_text": T, "force": True}, OutputError,
                              r"not written by onebasin"),
    "out_is_earlier_output_without_force": (["a", "b"], {"out": "earlier", "calib_text": T}, OutputError, r"--force"),
    "out_is_a_file": (["a", "b"], {"out": "afile", "calib_text": T, "force": True}, OutputError, r"is a file"),
    "b_is_not_a_pretrained_folder": (["a", "empty"], {"out": "m", "calib_text": T}, InputMismatchError, r"no config\.json"),
    "b_is_a_text_file": (["a", "corpus.txt"], {"out": "m", "calib_text": T}, InputMismatchError, r"no config\.json"),
    "b_has_no_config": (["a", "no_config"], {"out": "m", "calib_text": T}, InputMismatchError, r"no config\.json"),
    "corrupt_config": (["a", "bad_config"], {"out": "m", "calib_text": T}, OnebasinError, r"bad_config.*config"),
    "weights_missing_from_safetensors": (["a", "partial"], {"out": "m", "calib_text": T}, InputMismatchError,
                                         r"partial.*query\.weight"),
    "other_width": (["a", "wide"], {"out": "m", "calib_text": T}, ArchitectureMismatchError, r"intermediate|shape"),
    "other_architecture": (["a", "gpt2"], {"out": "m", "calib_text": T}, ArchitectureMismatchError,
                           r"BertModel.*GPT2LMHeadModel"),
    "third_folder_of_other_architecture": (["a", "b", "gpt2"], {"out": "m", "calib_text": T},
                                           ArchitectureMismatchError, r"gpt2"),
    "no_tokenizer_files": (["no_tokenizer", "a"], {"out": "m", "calib_text": T}, InputMismatchError,
                           r"\[UNK\].*tokenizer"),
    "tokenizer_past_the_vocabulary": (["small_vocab", "small_vocab"], {"out": "m", "calib_text": T},
                                      InputMismatchError, r"token id \d+.*40 entries"),
    "no_calibration": (["a", "b"], {"out": "m"}, InvalidOptionError, r"--calib-text"),
    "text_and_dataset": (["a", "b"], {"out": "m", "calib_text": T, "data": "mnist"}, InvalidOptionError, r"--calib-text"),
    "calib_text_missing": (["a", "b"], {"out": "m", "calib_text": "nope.txt"}, OnebasinError, r"nope\.txt"),
    "calib_text_too_short": (["a", "b"], {"out": "m", "calib_text": "short.txt"}, InputMismatchError,
                             r"fewer than 64 tokens"),
    "calib_text_not_utf8": (["a", "b"], {"out": "m", "calib_text": "latin1.txt"}, OnebasinError, r"latin1\.txt"),
    "weights_count": (["a", "b", "c"], {"out": "m", "calib_text": T, "weights": [1, 2]}, InvalidOptionError,
                      r"3 finite non-negative numbers"),
    "weights_infinite": (["a", "b"], {"out": "m", "calib_text": T, "weights": [1, float("inf")]}, InvalidOptionError,
                         r"1,? inf.*finite|finite.*1,? inf"),
    "weights_negative": (["a", "b"], {"out": "m", "calib_text": T, "weights": [1, -1]}, InvalidOptionError, r"1,? -1.*non-negative|non-negative.*1,? -1"),
    "weights_and_alpha": (["a", "b"], {"out": "m", "calib_text": T, "weights": [1, 3], "alpha": 0.3}, InvalidOptionError,
                          r"alpha or weights"),
    "three_folders_annealing": (["a", "b", "c"], {"out": "m", "calib_text": T, "method": "annealing"},
                                InvalidOptionError, r"activation.*weight"),
    "three_folders_closed_repair": (["a", "b", "c"], {"out": "m", "calib_text": T, "repair": "closed"},
                                    InvalidOptionError, r"exact"),
    "bias_free_corrections_cannot_fold": (["mistral0", "mistral1"], {"out": "m", "calib_text": T}, InvalidOptionError,
                                      r"without a bias.*--repair none.*--allow-onebasin-checkpoint"),
    "block_sites_cannot_fold": (["gpt2", "gpt2"], {"out": "m", "calib_text": T, "sites": ["layer", "block"]},
                                InvalidOptionError, r"residual additions.*--sites layer"),
    "vision_model_given_text": (["vit", "vit"], {"out": "m", "calib_text": T}, OnebasinError, r"vit"),
}


def _argv(folders, options, root: Path) -> list:
    names = {"calib_text": "--calib-text", "data": "--data", "weights": "--weights", "alpha": "--alpha",
             "method": "--method", "repair": "--repair", "out": "--out"}
    argv = ["merge", *(root / f for f in folders)]
    for key, value in options.items():
        if key == "force":
            argv.append("--force")
        elif key == "sites":
            argv += ["--sites", ",".join(value)]
        elif key == "weights":
            argv += [names[key], *value]
        else:
            argv += [names[key], root / value if key in ("calib_text", "out") else value]
    return argv + ["--calib-examples", 16, "--device", "cpu"]


def _api_options(options, root: Path) -> dict:
    return {k: root / v if k in ("calib_text", "out") else v for k, v in options.items()} | {"max_examples": 16}


@pytest.fixture
def proj(project, tmp_path) -> Path:
    """A fresh copy of the project for each case (a wrong deletion cannot spoil the next)."""
    return Path(shutil.copytree(project, tmp_path / "proj"))


@pytest.mark.parametrize("case", CASES)
def test_cli_refuses_in_one_line_naming_the_cause_and_touches_nothing(case, proj, capsys):
    folders, options, _, pattern = CASES[case]
    before = H.tree(proj)
    code, out, err = run_cli(_argv(folders, options, proj), capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onebasin merge: error: ") and re.search(pattern, lines[0]), err
    assert H.tree(proj) == before


@pytest.mark.parametrize("case", CASES)
def test_api_raises_a_onebasin_error_naming_the_cause_and_touches_nothing(case, proj):
    folders, options, error, pattern = CASES[case]
    before = H.tree(proj)
    with pytest.raises(error, match=pattern):
        merge_pretrained([proj / f for f in folders], **_api_options(options, proj))
    assert H.tree(proj) == before


def test_api_refuses_one_folder_given_as_a_string(proj):
    with pytest.raises(InvalidOptionError, match="list of folders"):
        merge_pretrained(str(proj / "a"), out=proj / "m", calib_text=proj / T)


def test_a_merge_writes_only_its_output_and_removes_a_killed_merges_temporary_folder(proj, capsys):
    stale, live = proj / ".m.999999999.tmp", proj / f".m2.{os.getppid()}.tmp"
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    before = H.tree(proj)
    code, _, err = run_cli(["merge", proj / "a", proj / "b", "--calib-text", proj / T, "--calib-examples", 16,
                            "--seq-len", 16, "--no-progress", "--out", proj / "m"], capsys)
    assert code == 0, err
    assert not stale.exists() and (live / "model.safetensors").read_bytes() == b"partial"
    after = {k: v for k, v in H.tree(proj).items() if k != "m" and not k.startswith("m/")}
    assert after == {k: v for k, v in before.items() if not k.startswith(stale.name)}  # nothing else touched
    assert (proj / "m" / "onebasin.json").is_file()
