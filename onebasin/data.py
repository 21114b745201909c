"""Datasets of the REPAIR paper (Jordan et al. 2022): MNIST, FashionMNIST, SVHN, CIFAR-10, CIFAR-100; and
one text dataset, "pydoc" (the Python documentation shipped with CPython, character level; see `TextInfo`).

Each dataset is read once through torchvision into uint8 tensors (`ImageData`), then served by
`batches()`, which normalises with the dataset's standard mean/std and augments whole batches on
tensors (random translate, horizontal flip, cutout) -- far faster on a few CPU cores than
per-example PIL transforms. Randomness comes from a generator seeded by (seed, epoch), so an epoch
is the same whether or not training was interrupted before it.

    info = dataset_info("mnist")                      # channels, image size, classes, mean/std
    train = load_dataset("mnist", train=True, data_dir="../shared/data", limit=1000)
    for x, y in batches(train, 500, shuffle=True, augment=make_augment(("translate",), info)):
        ...                                           # x: (500, 1, 28, 28) float32, y: (500,) int64

Data directory: the explicit `data_dir`, then `$ONEBASIN_DATA`, then `~/.cache/onebasin/data`
(`$XDG_CACHE_HOME` honoured). Files missing and no download possible -> `DataNotFoundError`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from onebasin.errors import InvalidOptionError, OnebasinError

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DataNotFoundError(OnebasinError, FileNotFoundError):
    """A dataset's files are not in the data directory and could not be downloaded."""


@dataclass(frozen=True)
class DatasetInfo:
    """Shape, classes, normalisation and files of one dataset."""

    name: str
    channels: int  # C of the (C, H, W) images
    image_size: int  # native H = W in pixels
    num_classes: int
    mean: tuple[float, ...]  # per-channel mean on the [0, 1] pixel scale
    std: tuple[float, ...]  # per-channel std on the [0, 1] pixel scale
    flip: bool  # whether flip/cutout suit the data (paper App. B.1: not on MNIST, SVHN)
    folder: str  # subfolder of the data dir holding `files` ("" = the data dir itself)
    files: tuple[str, ...]  # the files torchvision reads, relative to `folder`

    @property
    def translate(self) -> int:
        """Random-translate padding in pixels: 2 for 28x28 data, 4 for 32x32."""
        return 2 if self.image_size <= 28 else 4


DATASETS = {
    "mnist": DatasetInfo("mnist", 1, 28, 10, (0.1307,), (0.3081,), False, "MNIST/raw", _MNIST_FILES),
    "fashionmnist": DatasetInfo("fashionmnist", 1, 28, 10, (0.2860,), (0.3530,), True,
                                "FashionMNIST/raw", _MNIST_FILES),
    "svhn": DatasetInfo("svhn", 3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False,
                        "", ("train_32x32.mat", "test_32x32.mat")),
    "cifar10": DatasetInfo("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                           True, "cifar-10-batches-py",
                           tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")),
    "cifar100": DatasetInfo("cifar100", 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            True, "cifar-100-python", ("train", "test", "meta")),
}


def dataset_info(name: str) -> "DatasetInfo | TextInfo":
    """Metadata of dataset `name` (one of DATASETS or TEXT_DATASETS); InvalidOptionError (a ValueError)
    listing valid names otherwise."""
    key = str(name).lower().replace("-", "").replace("_", "")
    if key in TEXT_DATASETS:
        return TEXT_DATASETS[key]
    if key not in DATASETS:
        raise InvalidOptionError(f"unknown dataset {name!r}; valid names: {', '.join([*DATASETS, *TEXT_DATASETS])}")
    return DATASETS[key]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """`data_dir`, else $ONEBASIN_DATA, else $XDG_CACHE_HOME/onebasin/data (~/.cache/...)."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("ONEBASIN_DATA"):
        return Path(os.environ["ONEBASIN_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "onebasin" / "data"


@dataclass
class ImageData:
    """A labelled image set held in memory; treat the tensors as read-only."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    info: DatasetInfo

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> "ImageData":
        """The examples at `idx` (indices or a boolean mask), in that order."""
        idx = torch.as_tensor(idx)
        return ImageData(self.images[idx], self.labels[idx], self.info)


def load_dataset(name: str, train: bool = True, data_dir=None, *, image_size: int | None = None,
                 limit: int | None = None, seed: int | None = None, download: bool = True) -> ImageData:
    """Read a dataset split into memory as uint8 tensors (a text dataset: `load_text`, a TextData).

    image_size: zero-pad the images (centred) to this size, e.g. 32 for VGG on MNIST.
    limit: keep n examples: the first n when `seed` is None, else n drawn without replacement with
        `seed` (kept in dataset order). Deterministic either way.
    download: let torchvision fetch missing files; failing that, DataNotFoundError names them.
    """
    info = dataset_info(name)
    if isinstance(info, TextInfo):
        return load_text(info, train, limit=limit, seed=seed)
    images, labels = _read_torchvision(info, resolve_data_dir(data_dir), train, download)
    data = ImageData(images, labels, info)
    if image_size is not None and image_size != info.image_size:
        data = ImageData(pad_images(images, image_size), labels, info)
    if limit is not None and limit < len(data):
        data = data.subset(take(len(data), limit, seed))
    return data


def take(n: int, k: int, seed: int | None = None) -> torch.Tensor:
    """k indices out of range(n): the first k when seed is None, else a sorted seeded sample."""
    if seed is None:
        return torch.arange(k)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def pad_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad (N, C, H, W) images symmetrically to (N, C, size, size)."""
    extra = size - images.shape[-1]
    if extra < 0 or extra % 2 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"cannot pad {tuple(images.shape[-2:])} images to {size}x{size}")
    return F.pad(images, (extra // 2,) * 4)


def _missing_message(info: DatasetInfo, root: Path, why: str) -> str:
    where = root / info.folder if info.folder else root
    return (f"{info.name} not found in {root} ({why}): expected the files "
            f"{', '.join(info.files)} in {where}. Pass --data-dir (data_dir=...) or set $ONEBASIN_DATA "
            f"to a folder holding them, or run once online so torchvision can download them.")


def _read_torchvision(info: DatasetInfo, root: Path, train: bool, download: bool):
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashionmnist": tvd.FashionMNIST, "svhn": tvd.SVHN,
           "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[info.name]
    kw = {"split": "train" if train else "test"} if info.name == "svhn" else {"train": train}
    try:
        ds = cls(str(root), download=False, **kw)
    except (RuntimeError, OSError) as err:
        if not download:
            raise DataNotFoundError(_missing_message(info, root, "download disabled")) from err
        new_dirs = _missing_dirs(root / info.folder if info.folder else root)
        try:
            ds = cls(str(root), download=True, **kw)
        except BaseException as err2:  # offline, read-only dir, server down, Ctrl-C: nothing is left behind
            _remove_new(new_dirs, root)
            if not isinstance(err2, Exception):
                raise
            raise DataNotFoundError(_missing_message(info, root, f"download failed: {err2}")) from err2
    return _to_tensors(info, ds)


def _missing_dirs(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    folder = folder.absolute()
    return [p for p in (folder, *folder.parents) if not p.exists()]


def _remove_new(folders: list[Path], root: Path) -> None:
    """Undo what a failed download created: folders inside `root` that did not exist before go with their
    contents (all of it is the download's); `root` and its parents only if they are new and still empty."""
    root = root.absolute()
    inside = [p for p in folders if root in p.parents]
    if inside:
        shutil.rmtree(inside[-1], ignore_errors=True)
    for p in folders:
        if p not in inside:
            try:
                p.rmdir()
            except OSError:  # not empty: something else lives there now
                return


def _to_tensors(info: DatasetInfo, ds):
    if info.name in ("mnist", "fashionmnist"):
        return ds.data.unsqueeze(1).contiguous(), ds.targets.long()
    if info.name == "svhn":  # data is (N, 3, 32, 32) already
        return torch.from_numpy(ds.data).contiguous(), torch.from_numpy(ds.labels).long()
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.long)


def biased_split(labels, classes_a, fraction: float = 0.8, seed: int = 0):
    """Split examples into two disjoint halves biased by class (paper Sec. 5.4, CIFAR-100).

    labels: (N,) class of each example; classes_a: the classes favoured by split A.
    Split A gets a seeded random `fraction` of each class in `classes_a` and 1 - fraction of every
    other class; split B gets the rest. With CIFAR-100, classes_a = range(50) and fraction = 0.8,
    each split holds 25,000 images. Returns (idx_a, idx_b): sorted int64 index tensors.
    """
    labels = torch.as_tensor(labels)
    favoured = set(int(c) for c in classes_a)
    g = torch.Generator().manual_seed(seed)
    part_a, part_b = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(len(idx) * (fraction if c in favoured else 1 - fraction))
        part_a.append(idx[:k])
        part_b.append(idx[k:])
    return torch.cat(part_a).sort().values, torch.cat(part_b).sort().values


@dataclass(frozen=True)
class Augment:
    """Batch augmentations of a recipe on one dataset (translate padding, flip, cutout size)."""

    translate: int = 0  # max shift in pixels (zero padding + random crop); 0 = off
    flip: bool = False  # random horizontal flip with p = 0.5
    cutout: int = 0  # side in pixels of a square zeroed (set to the mean) at a random centre; 0 = off


def make_augment(names, info: DatasetInfo) -> Augment:
    """The Augment for recipe names ("translate", "flip", "cutout") on `info`'s dataset.

    Flip and cutout are dropped where they do not suit the data (MNIST, SVHN; paper App. B.1).
    Cutout covers half the image side (16 px on 32x32, as in the REPAIR code).
    """
    unknown = set(names) - {"translate", "flip", "cutout"}
    if unknown:
        raise ValueError(f"unknown augmentations {sorted(unknown)}; valid: translate, flip, cutout")
    return Augment(translate=info.translate if "translate" in names else 0,
                   flip="flip" in names and info.flip,
                   cutout=info.image_size // 2 if "cutout" in names and info.flip else 0)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator for shuffling and augmenting epoch `epoch` of a run seeded `seed`."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def batches(data: "ImageData | TextData", batch_size: int, *, shuffle: bool = False, augment: Augment | None = None,
            seed: int = 0, epoch: int = 0, drop_last: bool = False, device=None, indices: torch.Tensor | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y): x (B, C, H, W) float32 normalised, y (B,) int64; on `device` if given.

    TextData: x (B, T) int64 character ids, y (B, T) the next characters (see `text_batches`).
    indices: the examples to read, in this order (e.g. one process's share from a DistributedSampler);
    default all of them, shuffled by (seed, epoch) when `shuffle`.
    """
    if isinstance(data, TextData):
        return text_batches(data, batch_size, shuffle=shuffle, augment=augment, seed=seed, epoch=epoch,
                            drop_last=drop_last, device=device, indices=indices)
    return _image_batches(data, batch_size, shuffle, augment, seed, epoch, drop_last, device, indices)


def _order(n: int, shuffle: bool, g: torch.Generator, indices: torch.Tensor | None) -> torch.Tensor:
    if indices is not None:
        return torch.as_tensor(indices, dtype=torch.long)
    return torch.randperm(n, generator=g) if shuffle else torch.arange(n)


def _image_batches(data, batch_size, shuffle, augment, seed, epoch, drop_last, device, indices=None):
    g = epoch_generator(seed, epoch)
    order = _order(len(data), shuffle, g, indices)
    n = len(order)
    stop = n - n % batch_size if drop_last else n
    mean = torch.tensor(data.info.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.info.std).view(1, -1, 1, 1)
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        x, y = data.images[idx], data.labels[idx]
        if augment is not None:
            x = _flip(_translate(x, augment.translate, g), augment.flip, g)
        x = (x.float() / 255 - mean) / std
        if augment is not None:
            x = _cutout(x, augment.cutout, g)
        yield (x, y) if device is None else (x.to(device, non_blocking=True), y.to(device, non_blocking=True))


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches `batches` yields for n examples."""
    return n // batch_size if drop_last else -(-n // batch_size)


def _translate(x, pad, g):
    """Shift each image by a random (dy, dx) in [-pad, pad]^2, filling with zeros."""
    if pad == 0:
        return x
    b, _, h, w = x.shape
    xp = F.pad(x, (pad,) * 4).permute(0, 2, 3, 1)  # (B, H+2p, W+2p, C)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    return xp[torch.arange(b)[:, None, None], rows, cols].permute(0, 3, 1, 2).contiguous()


def _flip(x, on, g):
    if not on:
        return x
    mask = torch.rand(len(x), generator=g) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def _cutout(x, size, g):
    """Zero (= the dataset mean after normalisation) a size x size square at a random centre."""
    if size == 0:
        return x
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=g)[:, None] - size // 2
    cx = torch.randint(0, w, (b,), generator=g)[:, None] - size // 2
    ys, xs = torch.arange(h)[None], torch.arange(w)[None]
    rows = (ys >= cy) & (ys < cy + size)  # (B, H)
    cols = (xs >= cx) & (xs < cx + size)  # (B, W)
    return x.masked_fill((rows[:, :, None] & cols[:, None, :])[:, None], 0.0)


# --- text: the Python documentation shipped with CPython, character level ----------------------------------

# Fixed vocabulary: id 0 stands for every character outside it (typographic quotes, dashes...), id 1 is
# the newline, ids 2..96 are the printable ASCII characters " " (32) to "~" (126). It does not depend on
# the text, so every Python version's pydoc maps to the same ids.
UNKNOWN = "\x00"
ASCII_VOCAB = UNKNOWN + "\n" + "".join(chr(c) for c in range(32, 127))


@dataclass(frozen=True)
class TextInfo:
    """A character-level text dataset: vocabulary, sequence length and the fixed train/validation split."""

    name: str
    vocab: str  # character of each id; ids of characters outside it are 0 (vocab[0])
    seq_len: int  # characters per example: x = text[s:s+T], y = text[s+1:s+T+1]
    val_fraction: float  # the last fraction of every document is validation ("test"), the rest training
    source: str  # where the text comes from

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def num_classes(self) -> int:
        """Classes of each output position: the vocabulary."""
        return len(self.vocab)

    @property
    def image_size(self) -> None:
        """Text has no image size; lets code that asks a dataset for one get None."""
        return None


TEXT_DATASETS = {
    "pydoc": TextInfo("pydoc", ASCII_VOCAB, 128, 0.1,
                      "pydoc_data.topics.topics of the running CPython (the help() texts of the language reference; "
                      "about 465,000 characters in 79 topics on Python 3.11)"),
}


@dataclass
class TextData:
    """Fixed-length windows of one split of a text dataset; example i starts at `starts[i]`."""

    ids: torch.Tensor  # (L,) int64 character ids of the whole split
    starts: torch.Tensor  # (N,) int64 start of each example: x = ids[s:s+T], y = ids[s+1:s+T+1]
    info: TextInfo

    def __len__(self) -> int:
        return len(self.starts)

    def subset(self, idx) -> "TextData":
        """The examples at `idx` (indices or a boolean mask), in that order."""
        return TextData(self.ids, self.starts[torch.as_tensor(idx)], self.info)


def encode(text: str, vocab: str = ASCII_VOCAB) -> torch.Tensor:
    """(len(text),) int64 ids of `text`'s characters in `vocab`; characters outside it -> 0."""
    table = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([table.get(c, 0) for c in text], dtype=torch.long)


def decode(ids, vocab: str = ASCII_VOCAB) -> str:
    """The text of a sequence of ids (id 0 -> "\\x00")."""
    return "".join(vocab[int(i)] for i in ids)


def pydoc_documents() -> list[str]:
    """The topics of `pydoc_data.topics` (shipped with CPython, offline everywhere), in sorted-key order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def split_text(documents: list[str], val_fraction: float, train: bool) -> str:
    """One split of `documents`: the first 1 - val_fraction of each document's characters (training) or the
    rest (validation), joined with newlines. Every topic is in both splits, validation always later text."""
    parts = []
    for doc in documents:
        cut = round(len(doc) * (1 - val_fraction))
        parts.append(doc[:cut] if train else doc[cut:])
    return "\n".join(parts)


def load_text(info: TextInfo, train: bool = True, *, limit: int | None = None, seed: int | None = None) -> TextData:
    """One split of a text dataset as TextData: non-overlapping windows of seq_len + 1 characters (stride seq_len).

    limit/seed: keep n windows, as `load_dataset` does for images.
    """
    documents = {"pydoc": pydoc_documents}[info.name]()
    ids = encode(split_text(documents, info.val_fraction, train), info.vocab)
    starts = torch.arange(0, len(ids) - info.seq_len, info.seq_len)  # the last window needs seq_len + 1 ids
    data = TextData(ids, starts, info)
    if limit is not None and limit < len(data):
        data = data.subset(take(len(data), limit, seed))
    return data


def text_batches(data: TextData, batch_size: int, *, shuffle: bool = False, augment: Augment | None = None,
                 seed: int = 0, epoch: int = 0, drop_last: bool = False, device=None, indices: torch.Tensor | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y): x (B, T) int64 character ids, y (B, T) the ids one position later (next-character targets)."""
    if augment is not None and augment != Augment():
        raise InvalidOptionError(f"text data takes no image augmentation, got {augment}")
    g = epoch_generator(seed, epoch)
    order = _order(len(data), shuffle, g, indices)
    n = len(order)
    stop = n - n % batch_size if drop_last else n
    offsets = torch.arange(data.info.seq_len + 1)
    for i in range(0, stop, batch_size):
        window = data.ids[data.starts[order[i:i + batch_size], None] + offsets]  # (B, T + 1)
        x, y = window[:, :-1], window[:, 1:]
        yield (x, y) if device is None else (x.to(device, non_blocking=True), y.to(device, non_blocking=True))
