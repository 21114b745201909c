"""Shared fixtures: the real data folder (skipped when absent) and tiny synthetic image sets."""

from pathlib import Path

import pytest
import torch

from onebasin.data import ImageData, dataset_info


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests use tiny tensors: one intra-op thread is faster than two on a shared 2-core CPU (20x on convs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (MNIST, FashionMNIST in torchvision layout); skips the test when it is absent."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (path / "MNIST" / "raw").is_dir():
        pytest.skip(f"real data not found at {path}")
    return path


def make_image_data(n=64, dataset="mnist", seed=0, image_size=None) -> ImageData:
    """n random uint8 images shaped like `dataset`'s, with labels cycling over its classes."""
    info = dataset_info(dataset)
    size = image_size or info.image_size
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, info.channels, size, size), generator=g, dtype=torch.uint8)
    return ImageData(images, torch.arange(n) % info.num_classes, info)


@pytest.fixture
def tiny_data():
    """Factory fixture: tiny_data(n=64, dataset="mnist", seed=0, image_size=None) -> ImageData."""
    return make_image_data
