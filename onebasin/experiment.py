"""One experiment of the REPAIR paper (Jordan et al. 2022, Fig. 3): train two endpoints from different
seeds (cached), compare plain / aligned / aligned+REPAIR interpolation, write a report.

`onebasin demo` runs the default `Experiment`; `onebasin sweep` runs one per grid cell.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .align import get_method, list_methods
from .align.learned import check_options
from .distributed import default_device
from .checkpoint import checkpoint_paths, load_model
from .data import TextInfo, batches, dataset_info, load_dataset
from .errors import InvalidOptionError
from .models import create_model, data_kwargs, model_info
from .comparison import Comparison, compare
from .report import SUMMARY_HEADER, format_table, write_comparison_report
from .train import RECIPES, Recipe, default_recipe, train_model


@dataclass
class Experiment:
    """Every setting of one experiment. `onebasin demo` runs these defaults with recipe_overrides
    {"lr": 0.1, "warmup": 0.25}: measured here, the MLP recipe's lr 0.2 with its 5 % (or even 25 %) warmup
    diverged to NaN in 8-epoch runs, while lr 0.1 reached 96.7 % test accuracy for both seeds."""

    dataset: str = "mnist"
    model: str = "mlp"
    model_kwargs: dict = field(default_factory=lambda: {"width": 128, "depth": 10})  # options of the model
    epochs: int = 8  # the recipe shortened to this many epochs (MLP paper recipe: 100)
    recipe_overrides: dict = field(default_factory=dict)  # other recipe fields replaced, e.g. {"warmup": 0.25}
    seeds: tuple[int, int] = (0, 1)
    method: str = "activation"  # alignment method
    align_options: dict = field(default_factory=dict)  # options of the method, e.g. {"untie": True, "steps": 200}
    repair: str = "exact"  # correction of the third curve: exact | closed | reset_bn
    calib_examples: int = 5000  # alignment statistics and REPAIR calibration (paper: ~5,000)
    train_eval_examples: int = 10000  # training examples the curves are evaluated on
    test_examples: int | None = None  # None: the whole test set
    train_limit: int | None = None  # train the endpoints on the first N examples only (tests, quick looks)
    alphas: tuple[float, ...] = tuple(i / 10 for i in range(11))
    out: str = "onebasin-demo"  # report folder
    data_dir: str | None = None
    cache_dir: str | None = None  # trained endpoints; default $ONEBASIN_CACHE, else ~/.cache/onebasin
    device: str | None = None  # where to train and compare (None: cuda when available, else cpu)


CORRECTIONS = ("exact", "closed", "reset_bn")

def demo_preset(model: str) -> dict | None:
    """`onebasin demo --model <model>`'s own Experiment fields (None: the MLP demo's), from the model's registry
    entry (`demo`), with the epochs of its recipe: endpoints are trained with all of them, so `onebasin train
    --model vit --width 128 --dataset fashionmnist --out <cache>/endpoints/vit_width128_fashionmnist_e3_s0.safetensors`
    fills the demo's cache. The test split is all of the dataset's (FashionMNIST: 10,000 images; pydoc: 363 sequences)."""
    info = model_info(model)
    return None if info.demo is None else {**info.demo, "epochs": RECIPES[info.recipe].epochs}


def validate_experiment(exp: Experiment) -> None:
    """Raise InvalidOptionError naming the first bad setting of `exp`, before anything is trained or loaded.

    Checks the names (dataset, model, method, repair, recipe fields), align_options (keyword options the method
    takes; learned's values by `learned.check_options`), that `seeds` are two integers, counts
    are integers >= 1, alphas numbers in [0, 1]; then builds the model once, so an option it does not take
    (or a BatchNorm-free model with repair "reset_bn") fails here rather than after training.
    """
    info = dataset_info(exp.dataset)
    _check(exp.method in list_methods(), f"unknown method {exp.method!r}; valid: {', '.join(list_methods())}")
    _check(exp.repair in CORRECTIONS, f"unknown repair {exp.repair!r}; valid: {', '.join(CORRECTIONS)}")
    _check_align_options(exp.method, exp.align_options)
    seeds = exp.seeds
    _check(isinstance(seeds, (tuple, list)) and len(seeds) == 2 and all(map(_is_int, seeds)),
           f"seeds must be two integers, e.g. [0, 1], got {seeds!r}")
    for name in ("epochs", "calib_examples", "train_eval_examples", "test_examples", "train_limit"):
        value = getattr(exp, name)
        _check((value is None and name in ("test_examples", "train_limit")) or (_is_int(value) and value >= 1),
               f"{name} must be an integer >= 1, got {value!r}")
    _check(isinstance(exp.alphas, (tuple, list)) and len(exp.alphas) > 0 and all(map(_is_alpha, exp.alphas)),
           f"alphas must be a list of numbers in [0, 1], got {exp.alphas!r}")
    _check(isinstance(exp.recipe_overrides, dict), f"recipe_overrides must be a table, got {exp.recipe_overrides!r}")
    fields = {f.name for f in dataclasses.fields(Recipe)} - {"name", "epochs"}
    _check(set(exp.recipe_overrides) <= fields, f"unknown recipe_overrides {sorted(set(exp.recipe_overrides) - fields)}; "
           f"valid: {', '.join(sorted(fields))}")
    _check(isinstance(exp.model_kwargs, dict), f"model_kwargs must be a table, got {exp.model_kwargs!r}")
    with warnings.catch_warnings():  # e.g. "Initializing zero-element tensors is a no-op": reported below
        warnings.simplefilter("ignore")
        model = _build(exp, info)
    empty = [name for name, p in model.named_parameters() if p.numel() == 0]
    _check(not empty, f"model {exp.model!r} with options {exp.model_kwargs} has an empty layer ({empty[0] if empty else ''}): "
           f"widths must be >= 1")
    if exp.repair == "reset_bn":
        _check(any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()),
               f"repair 'reset_bn' needs BatchNorm layers; {exp.model} has none (use exact or closed)")


def _check_align_options(method: str, options) -> None:
    """Options the method takes by keyword (and, for learned, values `learned.check_options` accepts)."""
    _check(isinstance(options, dict), f"align_options must be a table, got {options!r}")
    params = inspect.signature(get_method(method).fn).parameters
    named = {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY}
    fixed = {"progress", "max_examples"}  # compare sets these
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        bad = sorted(set(options) - (named - fixed))
        _check(not bad, f"method {method!r} takes no align_options {bad}; valid: {', '.join(sorted(named - fixed))}")
    if method == "learned":
        check_options(**{k: v for k, v in options.items() if k in inspect.signature(check_options).parameters})


def _build(exp: Experiment, info) -> torch.nn.Module:
    try:
        default_recipe(exp.model)
        return create_model(exp.model, **exp.model_kwargs, **data_kwargs(exp.model, info))
    except Exception as err:  # unknown model, an option it does not take, a bad value
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InvalidOptionError(f"model {exp.model!r} with options {exp.model_kwargs}: {line}") from err


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidOptionError(message)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_alpha(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1


def settings_key(exp: Experiment) -> str:
    """12 hex digits of sha256 over every setting that changes a result (all fields but out, data_dir, cache_dir, device;
    align_options only when given, so the keys of earlier sweeps still match)."""
    settings = {k: v for k, v in asdict(exp).items() if k not in ("out", "data_dir", "cache_dir", "device")
                and not (k == "align_options" and not v)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def describe(exp: Experiment) -> str:
    """A readable one-line title, e.g. 'mlp (width 128, depth 10) on mnist: activation matching + exact REPAIR'."""
    opts = ", ".join(f"{k} {v}" for k, v in exp.model_kwargs.items())
    return f"{exp.model}{f' ({opts})' if opts else ''} on {exp.dataset}: {exp.method} matching + {exp.repair} REPAIR"


def cache_dir(explicit: str | None = None) -> Path:
    """Where trained endpoints are kept: `explicit`, else $ONEBASIN_CACHE, else ~/.cache/onebasin."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("ONEBASIN_CACHE"):
        return Path(os.environ["ONEBASIN_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onebasin"


def endpoint_path(exp: Experiment, seed: int) -> Path:
    """The cached checkpoint of the endpoint trained with `seed` (its name holds every training setting)."""
    opts = "_".join(f"{k}{v}" for k, v in sorted(exp.model_kwargs.items()))
    limit = f"_n{exp.train_limit}" if exp.train_limit else ""
    recipe = "".join(f"_{k}{v}" for k, v in sorted(exp.recipe_overrides.items()))
    name = f"{exp.model}_{opts}_{exp.dataset}_e{exp.epochs}{recipe}{limit}_s{seed}.safetensors"
    return cache_dir(exp.cache_dir) / "endpoints" / name


def endpoint(exp: Experiment, seed: int, progress: bool = True) -> tuple[torch.nn.Module, dict, bool]:
    """(model, checkpoint metadata, was cached): loaded from the cache, else trained (resumably) and cached."""
    path = endpoint_path(exp, seed)
    cached = checkpoint_paths(path)[0].exists()
    if not cached:
        train_model(exp.model, exp.dataset, model_kwargs=exp.model_kwargs, overrides={"epochs": exp.epochs, **exp.recipe_overrides},
                    seed=seed, out=path, data_dir=exp.data_dir, limit=exp.train_limit, progress=progress, device=exp.device)
    model, meta = load_model(path, expect={"model": exp.model, "seed": seed}, device=default_device(exp.device))
    return model, meta, cached


def evaluation_batches(dataset: str, image_size: int | None = None, *, data_dir=None, calib_examples: int = 5000,
                       train_examples: int = 10000, test_examples: int | None = None) -> tuple[dict[str, list], list]:
    """({"test": batches, "train": batches}, calibration batches): fixed, re-iterable, unaugmented.

    train: a seeded sample of max(calib_examples, train_examples) training images, whose first
    `calib_examples` are the calibration set (alignment statistics, REPAIR); test: the first
    `test_examples` test images (all when None). Batches of 1000 (calibration: 500).
    """
    train = load_dataset(dataset, True, data_dir, image_size=image_size, limit=max(calib_examples, train_examples), seed=0)
    test = load_dataset(dataset, False, data_dir, image_size=image_size, limit=test_examples)
    calib = list(batches(train.subset(torch.arange(min(calib_examples, len(train)))), 500))
    return {"test": list(batches(test, 1000)), "train": list(batches(train, 1000))}, calib


def evaluation_data(exp: Experiment) -> tuple[dict[str, list], list]:
    """`evaluation_batches` of an experiment's dataset, at the input size its model needs."""
    size = model_info(exp.model).image_size or dataset_info(exp.dataset).image_size
    return evaluation_batches(exp.dataset, size, data_dir=exp.data_dir, calib_examples=exp.calib_examples,
                              train_examples=exp.train_eval_examples, test_examples=exp.test_examples)


def run_experiment(exp: Experiment, progress: bool = True) -> tuple[Comparison, dict]:
    """Train or load both endpoints, compare the three interpolations, write the report to `exp.out`.

    Returns (Comparison, {output name: path}). Raises InvalidOptionError on a bad setting before training.
    """
    validate_experiment(exp)
    start = time.perf_counter()
    ends = [endpoint(exp, s, progress) for s in exp.seeds]
    trained = time.perf_counter()
    loaders, calib = evaluation_data(exp)
    comparison = compare(ends[0][0], ends[1][0], loaders, calib, method=exp.method, repair=exp.repair,
                         alphas=exp.alphas, max_examples=exp.calib_examples, progress=progress,
                         align_options=exp.align_options)
    run = {"experiment": asdict(exp),
           "endpoints": [{"seed": m["seed"], "cached": c, "test_acc": m.get("test_acc"), "epochs": m.get("epochs_done"),
                          "checkpoint": str(endpoint_path(exp, m["seed"]))} for _, m, c in ends],
           "seconds": {"endpoints": trained - start, "compare": time.perf_counter() - trained},
           **({"loss": "cross-entropy per character, nats (bits = nats / ln 2)"} if is_text(exp.dataset) else {})}  # fmt: skip
    return comparison, write_comparison_report(comparison, exp.out, describe(exp), extra=run)


def summary_table(comparison: Comparison) -> str:
    """The endpoint and midpoint table (test set) that `onebasin demo` prints."""
    note = comparison.repair_note()
    return format_table(SUMMARY_HEADER, comparison.summary_rows()) + (f"\n{note}" if note else "")


def is_text(dataset: str) -> bool:
    """Whether `dataset` is a text dataset (its loss is per character)."""
    return isinstance(dataset_info(dataset), TextInfo)


def bits_per_character(comparison: Comparison) -> str:
    """One line: the summary's test losses (nats per character) in bits per character (nats / ln 2)."""
    rows = comparison.summary_rows()
    return "test loss in bits per character: " + ", ".join(f"{r[0]} {r[2] / math.log(2):.4f}" for r in rows)
