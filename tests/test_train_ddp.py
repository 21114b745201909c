"""`onebasin train` under DistributedDataParallel: 2 gloo processes train to the accuracy band of one process."""

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from onebasin.train import train_model

EPOCHS, LIMIT = 2, 3000


def train_once(data_dir, out):
    return train_model("mlp", "mnist", model_kwargs={"width": 64, "depth": 3}, overrides={"epochs": EPOCHS, "lr": 0.1, "batch_size": 64, "warmup": 0.1},
                       seed=0, out=out, data_dir=data_dir, limit=LIMIT, device="cpu", progress=False, download=False)[1]


def worker(rank, init_file, data_dir, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = train_once(data_dir, Path(out_dir) / "ddp.safetensors")
        torch.save({"test_acc": result.test_acc}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_training_on_two_processes_reaches_the_single_process_accuracy_band(shared_data, tmp_path):
    torch.set_num_threads(1)
    single = train_once(str(shared_data), tmp_path / "one.safetensors")
    with tempfile.TemporaryDirectory() as tmp:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        mp.start_processes(worker, args=(str(Path(tmp) / "init"), str(shared_data), str(tmp_path)), nprocs=2, start_method=method)
    ranks = [torch.load(tmp_path / f"rank{r}.pt")["test_acc"] for r in range(2)]
    assert ranks[0] == ranks[1], "replicas must hold the same weights"
    assert single.test_acc > 0.8 and abs(ranks[0] - single.test_acc) < 0.03, (single.test_acc, ranks)
    assert (tmp_path / "ddp.safetensors").exists()
