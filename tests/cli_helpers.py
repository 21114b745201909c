"""Helpers of the command-line tests: run `onebasin ...` in-process, tiny checkpoints, synthetic data."""

import torch

from onebasin.checkpoint import save_checkpoint
from onebasin.cli import main
from onebasin.data import dataset_info
from onebasin.models import create_model


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `onebasin ARGV`."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def checkpoint(path, width=16, seed=0, dataset="mnist"):
    """An onebasin checkpoint of an untrained 3-layer MLP for MNIST-shaped data."""
    torch.manual_seed(seed)
    kw = {"width": width, "depth": 3, "in_features": 784, "num_classes": 10}
    save_checkpoint(path, create_model("mlp", **kw).state_dict(), {"model": "mlp", "model_kwargs": kw, "dataset": dataset, "seed": seed})
    return path


def fake_evaluation_batches(name, image_size=None, *, data_dir=None, calib_examples=5000, **_):
    """Stands in for experiment.evaluation_batches: 64 random images shaped like `name`'s per split (no files)."""
    info = dataset_info(name)
    size = image_size or info.image_size
    g = torch.Generator().manual_seed(0)

    def split(n, batch):
        x, y = torch.randn(n, info.channels, size, size, generator=g), torch.randint(info.num_classes, (n,), generator=g)
        return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]

    return {"test": split(64, 32), "train": split(64, 32)}, split(min(64, calib_examples), 32)


def use_fake_data(monkeypatch):
    """Make `onebasin merge` / `barrier` read synthetic data instead of a dataset folder."""
    monkeypatch.setattr("onebasin.experiment.evaluation_batches", fake_evaluation_batches)


def files(root):
    """Every path under `root`, relative, sorted: compare before and after a command to see what it wrote."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))
