"""Training recipes of the REPAIR paper (Jordan et al. 2022, App. B.1, Table 1), CPU-sized AdamW recipes for
the transformers (`vit`, `gpt`), and a training loop.

    recipe = get_recipe("mlp", epochs=10)               # a preset with overrides
    result = train(model, train_data, test_data, recipe, seed=0, checkpoint_path="runs/a.safetensors")
    model, result = train_model("mlp", "mnist", model_kwargs={"width": 128}, out="runs/a.safetensors",
                                data_dir="../shared/data")   # what `onebasin train` runs

SGD with momentum 0.9 (or AdamW, recipe field `optimizer`), learning rate set every step from the recipe's
schedule, optional gradient-norm clipping. Shuffling and augmentation of epoch e come from a generator
seeded by (seed, e), the model init from torch.manual_seed(seed), and an epoch checkpoint holds the weights
and the optimizer's state (momentum buffers; AdamW's moments and step), so on CPU an interrupted run
resumed from its last epoch checkpoint ends with bit-identical weights.

Sequence outputs: a model returning (B, T, V) logits for (B, T) targets (the GPT) is scored per position:
loss is the mean cross-entropy per character in nats (bits per character = nats / ln 2), accuracy the
fraction of positions whose next character is predicted right.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from onebasin.distributed import default_device
from onebasin.distributed import distributed
from onebasin._progress import progress_bar
from onebasin.checkpoint import CheckpointError, checkpoint_paths, load_checkpoint, save_checkpoint
from onebasin.data import ImageData, TextData, batches, dataset_info, load_dataset, make_augment, num_batches
from onebasin.errors import OnebasinError
from onebasin.models import create_model, data_kwargs, model_info


class TrainingDivergedError(OnebasinError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class Recipe:
    """A training recipe: optimizer, batch, a learning-rate schedule, weight decay, clipping and augmentations."""

    name: str
    batch_size: int  # examples per step (images, or sequences of seq_len characters)
    epochs: int  # passes over the training set
    lr: float  # peak learning rate per step at this batch size (not scaled further)
    schedule: str  # "linear": up from 0 to lr over `warmup`, then linearly to 0; "cosine": lr -> 0; "constant": lr
    warmup: float  # fraction of all steps spent warming up linearly from 0 to lr
    weight_decay: float  # SGD: L2 coefficient on every parameter; AdamW: decoupled decay of weight matrices only
    augment: tuple[str, ...]  # from ("translate", "flip", "cutout"); flip/cutout skipped on MNIST, SVHN
    momentum: float = 0.9  # SGD momentum (heavy ball); AdamW: beta1
    optimizer: str = "sgd"  # "sgd" or "adamw"
    beta2: float = 0.999  # AdamW's second-moment decay (unused by SGD)
    grad_clip: float = 0.0  # clip the global gradient L2 norm to this before each step; 0 = off


RECIPES = {
    # Table 1, MLP column. Peak at 5% of training (epoch 5 of 100), as in the REPAIR notebooks.
    # Measured (docs/training.md): 10-layer MLP width 128 on MNIST -> 98.93 % test accuracy; epochs of
    # 1.4-1.8 s on 2 CPU cores (~3 min for the 100 epochs when the cores are not shared).
    "mlp": Recipe("mlp", batch_size=2000, epochs=100, lr=0.2, schedule="linear", warmup=0.05,
                  weight_decay=0.0, augment=("translate",)),
    # Table 1, VGG column.
    "vgg": Recipe("vgg", batch_size=500, epochs=100, lr=0.08, schedule="cosine", warmup=0.0,
                  weight_decay=5e-4, augment=("flip", "translate")),
    # Table 1, ResNet20 column; also used for resnet18_cifar and torchvision ResNets on small images.
    # Warmup over the first 5% of steps, as the REPAIR ResNet20 notebook ramps up over 5 of 100 epochs:
    # measured without it, ResNet20 x1 on FashionMNIST sat at chance (running acc 0.15 after 107 steps).
    "resnet20": Recipe("resnet20", batch_size=500, epochs=200, lr=0.4, schedule="cosine", warmup=0.05,
                       weight_decay=1e-4, augment=("flip", "translate", "cutout")),
    # CPU-sized transformer recipes (not from the paper): AdamW, linear warm-up then cosine to 0, decoupled
    # weight decay on weight matrices (not on biases, norm gains), gradient norm clipped to 1 (nanoGPT).
    # Measured (docs/training.md), seeds 0 / 1, one thread: vit (width 128) on FashionMNIST 86.35 / 86.75 %
    # test accuracy (MNIST not trained yet); gpt (width 192) on pydoc 1.403 / 1.407 nats (2.02 / 2.03 bits) per
    # character, 60.7 / 60.8 % of next characters right (untied head: 1.411 / 1.425 nats, 8 min each, two at
    # once on a quiet 2-core machine). The ViT: about 14 min on one free core (0.58 s per step).
    "vit": Recipe("vit", batch_size=128, epochs=3, lr=1e-3, schedule="cosine", warmup=0.05,
                  weight_decay=0.05, augment=(), optimizer="adamw", beta2=0.99, grad_clip=1.0),
    "gpt": Recipe("gpt", batch_size=16, epochs=6, lr=2e-3, schedule="cosine", warmup=0.05,
                  weight_decay=0.1, augment=(), optimizer="adamw", beta2=0.99, grad_clip=1.0),
}


def get_recipe(name: str, **overrides) -> Recipe:
    """Preset `name` with fields replaced by the non-None `overrides` (e.g. epochs=3)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid names: {', '.join(RECIPES)}")
    return dataclasses.replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


def default_recipe(model_name: str) -> str:
    """The recipe a registered model trains with (its registry entry's `recipe`: mlp, vgg, resnet20, vit, gpt)."""
    return model_info(model_name).recipe


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD (weight decay on every parameter, as the paper) or AdamW (decay on parameters of >= 2 dims only:
    weight matrices, embeddings, positions; not biases or norm gains, as nanoGPT)."""
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                               weight_decay=recipe.weight_decay)
    if recipe.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {recipe.optimizer!r}; valid: sgd, adamw")
    params = list(model.parameters())  # tied weights appear once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": recipe.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(recipe.momentum, recipe.beta2))


def flat_outputs(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, [T,] V) and targets (B, [T]) as (N, V) and (N,): one row per scored position."""
    return out.reshape(-1, out.shape[-1]), y.reshape(-1)


def lr_at(step: int, total_steps: int, recipe: Recipe) -> float:
    """Learning rate of step `step` (0-based) of `total_steps`, evaluated at the step's midpoint."""
    t, w = (step + 0.5) / total_steps, recipe.warmup
    if t < w:
        return recipe.lr * t / w
    u = (t - w) / (1 - w)
    if recipe.schedule == "constant":  # Git Re-Basin's Adam at a fixed lr
        return recipe.lr
    if recipe.schedule == "linear":
        return recipe.lr * (1 - u)
    if recipe.schedule == "cosine":
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * u))
    raise ValueError(f"unknown schedule {recipe.schedule!r}; valid: linear, cosine, constant")


def seed_everything(seed: int) -> None:
    """Seed torch's global RNGs (model init); data order/augmentation use their own generators."""
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    """What `train` measured; also stored in the checkpoint's metadata."""

    epochs_done: int
    train_acc: float  # accuracy on the training set without augmentation, after the last epoch
    test_acc: float
    test_loss: float
    wall_time_s: float  # summed over all sessions of a resumed run
    history: list[dict]  # per epoch: epoch, lr, train_loss, train_acc (augmented, running), test_acc, ...


@torch.no_grad()
def _accuracy_and_loss(model: nn.Module, data: ImageData | TextData, batch_size: int = 1000, device=None) -> tuple[float, float]:
    """(accuracy, mean cross-entropy loss per scored position) of `model` on `data`, in eval mode, with the
    GPU autocast of training.

    Private: the public `onebasin.interpolate.evaluate` returns (loss, accuracy) over any batches.
    """
    device = device or next(model.parameters()).device
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for x, y in batches(data, batch_size, device=device):
        with _autocast(device):
            out = model(_to_memory_format(x, device)).float()
        out, y = flat_outputs(out, y)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    return correct / n, loss / n


def _autocast(device):
    on_gpu = torch.device(device).type == "cuda"
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu)


def _to_memory_format(x, device):
    if torch.device(device).type == "cuda" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def resume_path(checkpoint_path) -> Path:
    """Where the epoch checkpoint of a run writing `checkpoint_path` lives (X.resume.safetensors)."""
    weights, _ = checkpoint_paths(checkpoint_path)
    return weights.with_name(weights.name.replace(".safetensors", ".resume.safetensors"))


def train(model: nn.Module, train_data: ImageData | TextData, test_data: ImageData | TextData, recipe: Recipe, seed: int = 0, *,
          device=None, checkpoint_path=None, meta: dict | None = None, resume: bool = True,
          progress: bool = True, on_epoch_end=None) -> TrainResult:
    """Train `model` in place with `recipe` (SGD or AdamW, per-step schedule, clipping, augmentation).

    checkpoint_path: final weights + sidecar go here; after each epoch the weights and momentum
        buffers go to `resume_path(checkpoint_path)`, removed once the final checkpoint is written.
    resume: continue from that epoch checkpoint if it exists (its "run" metadata must match).
    meta: extra JSON-able metadata for the checkpoints (model name/options, dataset, ...).
    on_epoch_end(epoch, record): called after each epoch's checkpoint is written.
    Returns a TrainResult; the checkpoint sidecar records the same numbers plus `meta`.
    """
    device = torch.device(device) if device is not None else default_device()
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    rank, world = distributed()
    if world > 1:  # under torchrun: one replica per process, gradients averaged by DDP
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    run = _jsonable({**(meta or {}), "recipe": dataclasses.asdict(recipe), "seed": seed})
    opt = make_optimizer(model, recipe)
    start, history, elapsed = 0, [], 0.0
    rpath = resume_path(checkpoint_path) if checkpoint_path else None
    if rpath is not None and resume and rpath.exists():
        start, history, elapsed = _load_resume(rpath, model, opt, run)
    augment = make_augment(recipe.augment, train_data.info)
    steps_per_epoch = num_batches(len(train_data), recipe.batch_size)
    if rpath is not None and rank > 0:
        rpath = None  # only rank 0 writes checkpoints
    bar = progress_bar(total=steps_per_epoch * recipe.epochs, initial=start * steps_per_epoch, unit="step",
               disable=not progress, desc=f"train {run.get('model', type(model).__name__)}")
    try:
        for epoch in range(start, recipe.epochs):
            t0 = time.perf_counter()
            record = _train_epoch(ddp if world > 1 else model, opt, train_data, recipe, augment, seed, epoch, device, bar)
            record["test_acc"], record["test_loss"] = _accuracy_and_loss(model, test_data, device=device)
            record["epoch_time_s"] = time.perf_counter() - t0
            elapsed += record["epoch_time_s"]
            history.append(record)
            bar.set_postfix(epoch=epoch + 1, loss=f"{record['train_loss']:.4f}",
                            acc=f"{record['train_acc']:.4f}", test_acc=f"{record['test_acc']:.4f}")
            if rpath is not None:
                _save_resume(rpath, model, opt, run, history, elapsed)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
    finally:
        bar.close()
    return _finish(model, train_data, test_data, recipe, run, history, elapsed, device,
                   checkpoint_path if rank == 0 else None, rpath)


def _train_epoch(model, opt, data, recipe, augment, seed, epoch, device, bar) -> dict:
    """One pass of the optimizer over `data`; returns the epoch's record (running loss/accuracy, last lr)."""
    model.train()
    steps = num_batches(len(data), recipe.batch_size)
    n, correct, loss_sum, lr = 0, 0, 0.0, 0.0
    for i, (x, y) in enumerate(_epoch_batches(data, recipe, augment, seed, epoch, device)):
        lr = lr_at(epoch * steps + i, steps * recipe.epochs, recipe)
        for group in opt.param_groups:
            group["lr"] = lr
        with _autocast(device):
            out, y = flat_outputs(model(_to_memory_format(x, device)), y)
            loss = F.cross_entropy(out.float(), y)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"training diverged: the loss is {loss.item()} at epoch {epoch + 1}, step {i + 1} (lr {lr:.4g}); "
                f"lower the learning rate (--lr) or warm up longer (recipe field warmup)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        n += len(y)
        loss_sum += loss.item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / n:.4f}", acc=f"{correct / n:.4f}", refresh=False)
    return {"epoch": epoch + 1, "lr_end": lr, "train_loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1)}


def _epoch_batches(data, recipe, augment, seed, epoch, device):
    """This process's batches of one epoch. Under torch.distributed a DistributedSampler (seeded, shuffled by
    epoch) gives each of the w processes 1/w of the examples in batches of batch_size / w, so that the
    averaged gradient is that of a batch of batch_size and an epoch has the same number of steps."""
    rank, world = distributed()
    if world == 1:
        return batches(data, recipe.batch_size, shuffle=True, augment=augment, seed=seed, epoch=epoch, device=device)
    sampler = torch.utils.data.distributed.DistributedSampler(range(len(data)), num_replicas=world, rank=rank,
                                                              shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    local = max(1, recipe.batch_size // world)
    return batches(data, local, augment=augment, seed=seed + 1000 * rank, epoch=epoch, device=device,
                   indices=torch.tensor(list(sampler)))


def _finish(model, train_data, test_data, recipe, run, history, elapsed, device, checkpoint_path, rpath):
    t0 = time.perf_counter()
    train_acc, _ = _accuracy_and_loss(model, train_data, device=device)
    test_acc, test_loss = _accuracy_and_loss(model, test_data, device=device)
    elapsed += time.perf_counter() - t0
    result = TrainResult(recipe.epochs, train_acc, test_acc, test_loss, elapsed, history)
    if checkpoint_path is not None:
        meta = {**run, **dataclasses.asdict(result)}
        meta["device"] = str(device)
        meta["torch_version"] = torch.__version__
        save_checkpoint(checkpoint_path, _cpu_state(model), meta)
        for p in checkpoint_paths(rpath):
            p.unlink(missing_ok=True)
    return result


def _cpu_state(model):
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _save_resume(rpath, model, opt, run, history, elapsed):
    state = {f"model.{k}": v for k, v in _cpu_state(model).items()}
    names = {p: n for n, p in model.named_parameters()}
    for p, s in opt.state.items():
        if s.get("momentum_buffer") is not None:
            state[f"momentum.{names[p]}"] = s["momentum_buffer"].detach().cpu()
        for key in ("exp_avg", "exp_avg_sq", "step"):  # AdamW
            if key in s:
                state[f"adam.{key}.{names[p]}"] = torch.as_tensor(s[key]).detach().cpu()
    meta = {"run": run, "epochs_done": len(history), "history": history, "wall_time_s": elapsed}
    save_checkpoint(rpath, state, meta)


def _load_resume(rpath, model, opt, run):
    state, meta = load_checkpoint(rpath)
    if meta.get("run") != run:
        raise CheckpointError(f"{rpath} is an epoch checkpoint of a different run (recorded {meta.get('run')}, "
                              f"now {run}); delete it or pass --force (resume=False) to start afresh")
    device = next(model.parameters()).device
    model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    params = dict(model.named_parameters())
    for k, v in state.items():
        if k.startswith("momentum."):
            opt.state[params[k[len("momentum."):]]]["momentum_buffer"] = v.to(device)
        if k.startswith("adam."):
            _, key, name = k.split(".", 2)
            opt.state[params[name]][key] = v if key == "step" else v.to(device)  # AdamW keeps `step` on the CPU
    return meta["epochs_done"], meta["history"], meta["wall_time_s"]


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def train_model(model: str, dataset: str, *, model_kwargs: dict | None = None, recipe: str | None = None,
                overrides: dict | None = None, seed: int = 0, out=None, data_dir=None, limit: int | None = None,
                device=None, force: bool = False, progress: bool = True, download: bool = True):
    """Load `dataset`, build `model` seeded by `seed`, train it with a recipe; what `onebasin train` runs.

    model_kwargs: model options (width, depth, norm); in/out sizes (or vocabulary and sequence length)
        are filled in from the dataset.
    recipe: preset name (default: the paper's for the model); overrides: Recipe fields to replace.
    out: checkpoint path; an existing one raises FileExistsError unless force. Without force an
        epoch checkpoint of the same run is resumed; with force the run starts afresh.
    limit: train on the first `limit` training examples only. Returns (model, TrainResult).
    """
    if out is not None and checkpoint_paths(out)[0].exists() and not force:
        raise FileExistsError(f"{checkpoint_paths(out)[0]} exists; pass --force (force=True) to overwrite it")
    info = dataset_info(dataset)
    image_size = model_info(model).image_size or info.image_size  # None for text
    kwargs = {**(model_kwargs or {}), **data_kwargs(model, info)}
    rec = get_recipe(recipe or default_recipe(model), **(overrides or {}))
    train_data = load_dataset(info.name, True, data_dir, image_size=image_size, limit=limit, download=download)
    test_data = load_dataset(info.name, False, data_dir, image_size=image_size, download=download)
    seed_everything(seed)
    net = create_model(model, **kwargs)
    meta = {"model": model, "model_kwargs": kwargs, "dataset": info.name, "image_size": image_size,
            "train_examples": len(train_data)}
    result = train(net, train_data, test_data, rec, seed, device=device, checkpoint_path=out, meta=meta,
                   resume=not force, progress=progress)
    return net, result
