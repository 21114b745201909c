"""Datasets: metadata, data-dir rules, the offline error, biased split, batch loader and augmentation."""

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from onebasin.data import (DATASETS, Augment, DataNotFoundError, ImageData, batches, biased_split,
                           dataset_info, load_dataset, make_augment, num_batches, pad_images,
                           resolve_data_dir)
from onebasin.errors import OnebasinError


def test_dataset_info_of_every_dataset():
    expect = {"mnist": (1, 28, 10), "fashionmnist": (1, 28, 10), "svhn": (3, 32, 10),
              "cifar10": (3, 32, 10), "cifar100": (3, 32, 100)}
    assert set(DATASETS) == set(expect)
    for name, (c, size, k) in expect.items():
        info = dataset_info(name)
        assert (info.channels, info.image_size, info.num_classes) == (c, size, k)
        assert len(info.mean) == len(info.std) == c
    assert dataset_info("CIFAR-10") is dataset_info("cifar10")
    with pytest.raises(ValueError, match="valid names"):
        dataset_info("imagenet")


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("ONEBASIN_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("ONEBASIN_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_dir() == tmp_path / "cache" / "onebasin" / "data"


@pytest.mark.parametrize("name,folder,file", [("cifar10", "cifar-10-batches-py", "data_batch_1"),
                                               ("mnist", "MNIST/raw", "train-images-idx3-ubyte"),
                                               ("svhn", "", "train_32x32.mat")])
def test_missing_data_offline_names_files_and_folder(tmp_path, name, folder, file):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset(name, data_dir=tmp_path, download=False)
    message = str(err.value)
    assert file in message and str(tmp_path / folder) in message and "--data-dir" in message


def test_failed_download_is_reported_as_missing_data(tmp_path, monkeypatch):
    def offline(self, *a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(DataNotFoundError, match="download failed: .*no network"):
        load_dataset("cifar10", data_dir=tmp_path, download=True)


def test_code_that_handles_a_missing_file_handles_missing_data(tmp_path):
    """DataNotFoundError is caught where a missing file is (`except FileNotFoundError`) and where any onebasin error is."""
    for handled in (FileNotFoundError, OnebasinError):
        try:
            load_dataset("mnist", data_dir=tmp_path, download=False)
        except handled as err:
            assert "train-images-idx3-ubyte" in str(err)
        else:
            pytest.fail("no error for a missing dataset")


def test_train_without_data_exits_2_with_one_line(tmp_path, capsys):
    from onebasin.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--model", "mlp", "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-download",
              "--out", str(tmp_path / "a.safetensors"), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "download disabled" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exists", [True, False])
def test_failed_download_leaves_no_folders_behind(tmp_path, monkeypatch, exists):
    """Issue 12: an empty --data-dir was left holding MNIST/raw after a failed download."""

    def half_download(url, root, filename=None, *args, **kwargs):
        Path(root, filename or "part").write_bytes(b"half a file")
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", half_download)
    data_dir = tmp_path / "data" / "deeper"
    if exists:
        data_dir.mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="download failed"):
        load_dataset("mnist", data_dir=data_dir, download=True)
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*")] == ([Path("data"), Path("data/deeper")] if exists else [])


def test_biased_split_sizes_and_disjointness():
    labels = torch.arange(100).repeat(500)  # CIFAR-100 train: 500 images of each of 100 classes
    a, b = biased_split(labels, classes_a=range(50), fraction=0.8, seed=0)
    assert len(a) == len(b) == 25_000
    assert len(set(a.tolist()) & set(b.tolist())) == 0
    assert torch.equal(torch.cat([a, b]).sort().values, torch.arange(50_000))
    counts_a = torch.bincount(labels[a], minlength=100)
    assert (counts_a[:50] == 400).all() and (counts_a[50:] == 100).all()


def test_biased_split_is_seeded_and_fraction_configurable():
    labels = torch.arange(10).repeat(20)
    a0, _ = biased_split(labels, [0, 1], fraction=0.6, seed=3)
    a1, _ = biased_split(labels, [0, 1], fraction=0.6, seed=3)
    a2, _ = biased_split(labels, [0, 1], fraction=0.6, seed=4)
    assert torch.equal(a0, a1) and not torch.equal(a0, a2)
    counts = torch.bincount(labels[a0], minlength=10)
    assert counts.tolist() == [12, 12] + [8] * 8


def test_batches_cover_every_example_once_and_are_seeded(tiny_data):
    data = tiny_data(50)
    data.labels = torch.arange(50)  # labels as example ids
    ids = torch.cat([y for _, y in batches(data, 16, shuffle=True, seed=1, epoch=0)])
    assert sorted(ids.tolist()) == list(range(50)) and ids.tolist() != list(range(50))
    again = torch.cat([y for _, y in batches(data, 16, shuffle=True, seed=1, epoch=0)])
    other_epoch = torch.cat([y for _, y in batches(data, 16, shuffle=True, seed=1, epoch=1)])
    assert torch.equal(ids, again) and not torch.equal(ids, other_epoch)
    assert num_batches(50, 16) == 4 == len(list(batches(data, 16)))
    assert num_batches(50, 16, drop_last=True) == 3 == len(list(batches(data, 16, drop_last=True)))


def test_batches_normalise_with_dataset_statistics(tiny_data):
    data = tiny_data(4, "cifar10")
    x, _ = next(batches(data, 4))
    info = data.info
    expected = (data.images.float() / 255 - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and torch.allclose(x, expected)


def _blob_images(n=32, size=28, seed=0):
    """Images that are zero except a random 6x6 patch well inside the 2-pixel border."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    x[:, :, 8:14, 10:16] = torch.randint(1, 256, (n, 1, 6, 6), generator=g, dtype=torch.uint8)
    return x


def test_translate_shifts_each_image_by_at_most_the_padding():
    data = ImageData(_blob_images(), torch.zeros(32, dtype=torch.long), dataset_info("mnist"))
    raw = []
    for x, _ in batches(data, 32, augment=Augment(translate=2), seed=0):
        raw.append(x * 0.3081 + 0.1307)
    shifted = torch.cat(raw)
    originals = data.images.float() / 255
    moved = 0
    for img, orig in zip(shifted, originals):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.allclose(img, torch.roll(orig, (dy, dx), (1, 2)), atol=1e-5)]
        assert len(matches) == 1
        moved += matches[0] != (0, 0)
    assert moved > 16  # 24 of 25 shifts move the image


def test_flip_and_cutout():
    data = ImageData(_blob_images(), torch.zeros(32, dtype=torch.long), dataset_info("fashionmnist"))
    plain = torch.cat([x for x, _ in batches(data, 32)])
    flipped = torch.cat([x for x, _ in batches(data, 32, augment=Augment(flip=True), seed=0)])
    is_flip = [torch.equal(f, p.flip(2)) for f, p in zip(flipped, plain)]
    assert all(torch.equal(f, p) or fl for f, p, fl in zip(flipped, plain, is_flip))
    assert 4 < sum(is_flip) < 28
    cut = torch.cat([x for x, _ in batches(data, 32, augment=Augment(cutout=14), seed=0)])
    changed = (cut != plain)
    assert (cut[changed] == 0).all()  # cutout fills with 0, the mean after normalisation
    zeroed = (cut == 0) & (plain != 0)
    assert 0 < zeroed.sum(dim=(1, 2, 3)).max() <= 14 * 14


def test_make_augment_follows_the_paper_per_dataset():
    names = ("flip", "translate", "cutout")
    assert make_augment(names, dataset_info("mnist")) == Augment(translate=2)
    assert make_augment(names, dataset_info("svhn")) == Augment(translate=4)
    assert make_augment(names, dataset_info("cifar10")) == Augment(translate=4, flip=True, cutout=16)
    assert make_augment(("translate",), dataset_info("fashionmnist")) == Augment(translate=2)
    with pytest.raises(ValueError, match="unknown augmentations"):
        make_augment(("mixup",), dataset_info("cifar10"))


def test_pad_images_to_32():
    x = torch.ones(2, 1, 28, 28, dtype=torch.uint8)
    y = pad_images(x, 32)
    assert y.shape == (2, 1, 32, 32) and y.sum() == x.sum() and y[0, 0, 0, 0] == 0
    with pytest.raises(ValueError):
        pad_images(x, 27)


@pytest.mark.slow
def test_load_real_mnist(shared_data):
    test = load_dataset("mnist", train=False, data_dir=shared_data)
    assert test.images.shape == (10_000, 1, 28, 28) and test.images.dtype == torch.uint8
    assert torch.bincount(test.labels).tolist()[:2] == [980, 1135]
    x = torch.cat([x for x, _ in batches(test, 5000)])
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05


@pytest.mark.slow
def test_load_limit_and_padding(shared_data):
    first = load_dataset("fashionmnist", train=False, data_dir=shared_data, limit=100)
    sampled = load_dataset("fashionmnist", train=False, data_dir=shared_data, limit=100, seed=1)
    again = load_dataset("fashionmnist", train=False, data_dir=shared_data, limit=100, seed=1)
    padded = load_dataset("fashionmnist", train=False, data_dir=shared_data, limit=100, image_size=32)
    assert len(first) == len(sampled) == 100
    assert not torch.equal(first.labels, sampled.labels) and torch.equal(sampled.images, again.images)
    assert padded.images.shape == (100, 1, 32, 32)
    assert torch.equal(padded.images[:, :, 2:30, 2:30], first.images)


# --- text: pydoc ---------------------------------------------------------------------------------------------

def _id_by_hand(c: str) -> int:
    """The documented vocabulary: newline 1, printable ASCII 32..126 -> 2..96, anything else 0."""
    return 1 if c == "\n" else ord(c) - 30 if 32 <= ord(c) <= 126 else 0


def test_pydoc_info_and_fixed_vocabulary():
    from onebasin.data import TextInfo, decode, encode

    info = dataset_info("pydoc")
    assert isinstance(info, TextInfo) and info.vocab_size == info.num_classes == 97 and info.seq_len == 128
    assert info.image_size is None and "pydoc_data" in info.source
    text = 'def f(x):\n    return x ** 2  # “squared” ~ café\t'
    assert encode(text).tolist() == [_id_by_hand(c) for c in text]
    assert decode(encode("Hello, World!\n~")) == "Hello, World!\n~"
    with pytest.raises(ValueError, match="valid names: .*pydoc"):
        dataset_info("shakespeare")


def test_pydoc_split_is_the_tail_of_every_topic():
    from pydoc_data.topics import topics

    from onebasin.data import decode

    train, val = load_dataset("pydoc", train=True), load_dataset("pydoc", train=False)
    keys = sorted(topics)
    cuts = [round(len(topics[k]) * 0.9) for k in keys]
    train_text = "\n".join(topics[k][:c] for k, c in zip(keys, cuts))
    val_text = "\n".join(topics[k][c:] for k, c in zip(keys, cuts))
    assert decode(train.ids) == "".join(c if _id_by_hand(c) else "\x00" for c in train_text)
    assert decode(val.ids) == "".join(c if _id_by_hand(c) else "\x00" for c in val_text)
    assert 0.085 < len(val.ids) / (len(train.ids) + len(val.ids)) < 0.115


def test_text_batches_are_next_character_windows():
    data = load_dataset("pydoc", train=False)
    T, L = 128, len(data.ids)
    starts = data.starts.tolist()
    assert starts == list(range(0, T * len(starts), T))  # non-overlapping, stride T
    assert starts[-1] + T + 1 <= L < starts[-1] + 2 * T + 1  # the last window that fits
    xs, ys = zip(*batches(data, 100))
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == y.shape == (len(data), T) and x.dtype == torch.long
    for i in (0, 5, len(data) - 1):
        s = starts[i]
        assert torch.equal(x[i], data.ids[s:s + T]) and torch.equal(y[i], data.ids[s + 1:s + T + 1])
    shuffled = torch.cat([x for x, _ in batches(data, 100, shuffle=True, seed=3)])
    assert not torch.equal(shuffled, x) and sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, x.tolist()))


def test_pydoc_limit_and_augment():
    full = load_dataset("pydoc", train=True)
    few = load_dataset("pydoc", train=True, limit=10, seed=0)
    assert len(few) == 10 and set(few.starts.tolist()) <= set(full.starts.tolist())
    assert len(few.subset(torch.arange(3))) == 3
    with pytest.raises(OnebasinError, match="no image augmentation"):
        next(batches(few, 4, augment=Augment(translate=2)))
    assert len(list(batches(few, 4, augment=make_augment((), few.info)))) == 3  # a recipe without augmentations
