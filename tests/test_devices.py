"""Devices and processes: --device, torchrun, and (where a GPU exists) CUDA."""

import os
import subprocess
import sys

import pytest
import torch

from cli_helpers import checkpoint
from onebasin.checkpoint import load_checkpoint
from onebasin.models import create_model
from onebasin.pipeline import merge


def _cli(args, tmp_path, launcher=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, *launcher, "-m", "onebasin.cli", *map(str, args)], cwd=os.getcwd(), env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_merge_writes_what_one_process_writes(tmp_path, shared_data):
    """`torchrun --nproc_per_node 2 onebasin merge ...`: shards the calibration data, all-reduces the statistics,
    only rank 0 writes; the merged weights equal a single process's (float32 storage of float64 statistics)."""
    a, b = checkpoint(tmp_path / "a.safetensors", seed=0), checkpoint(tmp_path / "b.safetensors", seed=1)
    common = ["merge", a, b, "--data-dir", shared_data, "--calib-examples", 600, "--device", "cpu", "--no-progress"]
    one = _cli([*common, "--out", tmp_path / "one.safetensors"], tmp_path)
    assert one.returncode == 0, one.stderr
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    two = _cli([*common, "--out", tmp_path / "two.safetensors"], tmp_path, launcher)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count('"out"') == 1, "only rank 0 prints"
    sd1, _ = load_checkpoint(tmp_path / "one.safetensors")
    sd2, _ = load_checkpoint(tmp_path / "two.safetensors")
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.allclose(sd1[k], sd2[k], rtol=1e-5, atol=1e-6), k


def test_device_option_rejects_cuda_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from cli_helpers import run_cli

    a, b = checkpoint(tmp_path / "a.safetensors", seed=0), checkpoint(tmp_path / "b.safetensors", seed=1)
    code, _, err = run_cli(["merge", a, b, "--device", "cuda", "--out", tmp_path / "m.safetensors"], capsys)
    assert code == 2 and "CUDA is not available" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_merge_on_cuda_equals_merge_on_cpu():
    torch.manual_seed(0)
    a, b = (create_model("mlp", width=32, depth=4, in_features=20, num_classes=5).double() for _ in range(2))
    data = [(torch.randn(64, 20, dtype=torch.float64), torch.randint(5, (64,))) for _ in range(3)]
    cpu, _ = merge(a, b, method="activation", repair="exact", data=data)
    gpu, _ = merge(a, b, method="activation", repair="exact", data=data, device="cuda")
    assert all(v.is_cuda for v in gpu.state_dict().values())
    for k, v in cpu.state_dict().items():
        assert torch.allclose(v, gpu.state_dict()[k].cpu(), atol=1e-9), k
