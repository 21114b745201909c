"""Checkpoints: round trip, sidecar, atomic writes under simulated crashes, clear errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
import onebasin
import onebasin.checkpoint as ckpt
from onebasin.checkpoint import (CheckpointError, checkpoint_paths, load_checkpoint, load_model, read_meta,
                                 save_checkpoint)
from onebasin.errors import OnebasinError
from onebasin.models import create_model
from safetensors.torch import save_file

META = {"model": "resnet20", "model_kwargs": {"width": 1, "norm": "batchnorm", "in_channels": 1, "num_classes": 10},
        "dataset": "fashionmnist", "seed": 0}


def small_state(seed=0):
    torch.manual_seed(seed)
    model = create_model("resnet20", in_channels=1)
    model(torch.randn(4, 1, 28, 28))  # train-mode forward: running stats and num_batches_tracked move
    return model.state_dict()


def test_round_trip_keeps_every_tensor_and_dtype(tmp_path):
    state = small_state()
    path = save_checkpoint(tmp_path / "a.safetensors", state, META)
    loaded, meta = load_checkpoint(path)
    assert loaded.keys() == state.keys()
    for k in state:
        assert loaded[k].dtype == state[k].dtype and torch.equal(loaded[k], state[k]), k
    assert loaded["norm1.num_batches_tracked"].dtype == torch.int64
    assert loaded["norm1.num_batches_tracked"].item() == 1
    assert meta["model"] == "resnet20" and meta["onebasin_version"] == onebasin.__version__


def test_shared_and_strided_tensors_are_saved(tmp_path):
    w = torch.randn(4, 6)
    state = {"a": w, "tied": w, "t": w.t(), "int": torch.arange(3), "half": torch.ones(2, dtype=torch.bfloat16)}
    save_checkpoint(tmp_path / "s", state, {})
    loaded, _ = load_checkpoint(tmp_path / "s")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_sidecar_is_readable_json_beside_the_weights(tmp_path):
    weights = save_checkpoint(tmp_path / "run.safetensors", small_state(), META)
    _, sidecar = checkpoint_paths(weights)
    assert sidecar == tmp_path / "run.json"
    side = json.loads(sidecar.read_text())
    assert side["model_kwargs"]["norm"] == "batchnorm" and side == read_meta(weights)
    assert weights.stat().st_mode & 0o044  # readable by others, like any file (safetensors writes 0600)


def test_expect_mismatch_names_the_difference(tmp_path):
    save_checkpoint(tmp_path / "a", small_state(), META)
    load_checkpoint(tmp_path / "a", expect={"model": "resnet20", "model_kwargs": META["model_kwargs"]})
    with pytest.raises(CheckpointError, match="model: checkpoint has 'resnet20', expected 'mlp'"):
        load_checkpoint(tmp_path / "a", expect={"model": "mlp"})
    with pytest.raises(CheckpointError, match="model_kwargs"):
        load_checkpoint(tmp_path / "a", expect={"model_kwargs": {**META["model_kwargs"], "width": 2}})


def test_missing_truncated_and_corrupt_files_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "none.safetensors")
    path = save_checkpoint(tmp_path / "a", small_state(), META)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt|not a readable"):
        load_checkpoint(path)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # a bit flip in the tensor data
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


def test_crash_while_writing_weights_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    old = small_state(0)
    save_checkpoint(tmp_path / "a", old, {**META, "epochs_done": 1})

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "a", small_state(1), {**META, "epochs_done": 2})
    loaded, meta = load_checkpoint(tmp_path / "a")
    assert meta["epochs_done"] == 1 and all(torch.equal(loaded[k], old[k]) for k in old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.safetensors"]  # no temp files left


def test_crash_between_weights_and_sidecar_keeps_a_consistent_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "a", small_state(0), {**META, "epochs_done": 1})
    new = small_state(1)

    def crash(path, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "atomic_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "a", new, {**META, "epochs_done": 2})
    with pytest.warns(UserWarning, match="stale"):
        loaded, meta = load_checkpoint(tmp_path / "a")
    assert meta["epochs_done"] == 2 and all(torch.equal(loaded[k], new[k]) for k in new)


def test_load_model_rebuilds_the_recorded_model(tmp_path):
    torch.manual_seed(0)
    model = create_model("mlp", width=16, depth=3).eval()
    save_checkpoint(tmp_path / "m", model.state_dict(), {"model": "mlp", "model_kwargs": {"width": 16, "depth": 3}})
    loaded, meta = load_model(tmp_path / "m", expect={"model": "mlp"})
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(loaded(x), model(x)) and not loaded.training
    save_checkpoint(tmp_path / "bad", model.state_dict(), {"model": "mlp", "model_kwargs": {"width": 8, "depth": 3}})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(tmp_path / "bad")


def test_merged_model_with_unfused_repair_reloads_as_saved(tmp_path):
    from onebasin.pipeline import merge

    kw = {"width": 1, "in_channels": 1}
    a, b = (create_model("resnet20", **kw).eval() for _ in range(2))
    data = [torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    merged, result = merge(a, b, method="none", repair="exact", data=data)
    assert not result.fused and len(result.affines) == 9  # one correction after each residual addition
    meta = {"model": "resnet20", "model_kwargs": kw, "repair_affines": result.affines, "example_input": result.example_input}
    save_checkpoint(tmp_path / "m", merged.state_dict(), meta)
    loaded, _ = load_model(tmp_path / "m")
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), merged.eval()(x))
    state = {k: v for k, v in merged.state_dict().items() if not k.startswith("repair_")}
    save_checkpoint(tmp_path / "bad", state, meta)  # the metadata promises corrections the weights lack
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(tmp_path / "bad")


def test_checkpoint_errors_are_caught_as_onebasin_errors_and_exit_2(tmp_path, capsys):
    try:
        load_checkpoint(tmp_path / "none.safetensors")
    except OnebasinError as err:  # the one except clause an application needs
        assert "no checkpoint at" in str(err)
    else:
        pytest.fail("no error for a missing checkpoint")
    from onebasin.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["merge", str(tmp_path / "none.safetensors"), str(tmp_path / "b.safetensors"), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "no checkpoint at" in err


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)  # exited and reaped: no process has this pid (until it is reused)


def test_next_save_removes_temp_files_of_killed_saves(tmp_path):
    """Issue 12: every SIGKILL during a save left a hidden full-size .X.<pid>.tmp file that was never removed."""
    save_checkpoint(tmp_path / "a", small_state(), META)
    dead = [tmp_path / f".a.safetensors.{_dead_pid()}.tmp", tmp_path / f".b.json.{_dead_pid()}.tmp"]
    alive = tmp_path / f".c.safetensors.{os.getppid()}.tmp"  # a running process's save in progress
    for p in (*dead, alive):
        p.write_bytes(b"x" * 1000)
    save_checkpoint(tmp_path / "b", small_state(), META)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.json", "a.safetensors", "b.json",
                                                                 "b.safetensors", alive.name])


def test_edited_metadata_is_detected(tmp_path):
    """Issue 12 #4: the sha256 covered the tensors only, so an edited "dataset" in the header went unnoticed."""
    path = save_checkpoint(tmp_path / "a", small_state(), META)
    tensors, meta = load_checkpoint(path)
    edited = {**meta, "dataset": "mnist"}  # was fashionmnist; sha256 left as saved
    save_file(tensors, str(path), metadata={"onebasin": json.dumps(edited)})
    with pytest.raises(CheckpointError, match="corrupt or was edited"):
        load_checkpoint(path)


def test_checkpoints_with_a_tensor_only_checksum_still_load_with_a_note(tmp_path):
    state = small_state()
    meta = {**META, "onebasin_version": "0.1.0", "sha256": ckpt.tensor_digest(state)}  # as onebasin 0.1.0 saved it
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "old.safetensors"),
              metadata={"onebasin": json.dumps(meta)})
    (tmp_path / "old.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="covers the tensors only"):
        loaded, read = load_checkpoint(tmp_path / "old.safetensors")
    assert read == meta and all(torch.equal(loaded[k], state[k]) for k in state)


def test_merged_model_of_a_users_own_class_reloads(tmp_path):
    """Issue 12: load_model called create_model, so a merged `module:factory` model could not be reloaded."""
    from custom_nets import make_net
    from onebasin.pipeline import merge
    from onebasin.repair import RepairAffine

    torch.manual_seed(0)
    a, b = make_net().eval(), make_net().eval()
    data = [torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    merged, result = merge(a, b, method="none", repair="exact", data=data)
    assert not result.fused  # the corrections after the two residual additions stay as modules
    meta = {"model": "custom_nets:make_net", "model_kwargs": {}, "repair_affines": result.affines,
            "example_input": result.example_input}
    save_checkpoint(tmp_path / "m", merged.state_dict(), meta)
    x = torch.randn(3, 1, 12, 12)
    for loaded, _ in (load_model(tmp_path / "m", expect={"model": "custom_nets:make_net"}),
                      onebasin.load_any(tmp_path / "m.safetensors", "custom_nets:make_net")):  # what merge/barrier --model call
        assert sum(isinstance(m, RepairAffine) for m in loaded.modules()) == 2
        with torch.no_grad():
            assert torch.equal(loaded(x), merged.eval()(x))
