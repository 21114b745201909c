"""The `onebasin` command line: parse, validate, call the library (never the other way round).

This module holds the parser, `train`, `demo`, `sweep` and `main`; `merge` and `barrier` live in `_cli_merge`,
what all commands share in `_cli_common`."""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys

from onebasin._cli_common import (REPAIRS, _add_align_options, _add_common, _add_device, _align_options, _check_out_file,
                                  _check_out_folder, _errors, _parse_opts, _sub)
from onebasin._cli_merge import _add_barrier, _add_merge, cmd_barrier, cmd_merge

TRAIN_EXAMPLES = """examples:
  # the paper's 10-layer MLP recipe on MNIST (width 128), a few seconds per epoch on a laptop CPU
  onebasin train --model mlp --width 128 --depth 10 --dataset mnist --data-dir ../shared/data \\
      --out runs/mlp_w128_s0.safetensors
  # a CPU-budget ResNet20 on FashionMNIST: the ResNet20 recipe cut to 3 epochs
  onebasin train --model resnet20 --dataset fashionmnist --epochs 3 --out runs/rn20_fmnist.safetensors
  # VGG11 (pads 28x28 data to 32x32), LayerNorm ResNet20 x4 on CIFAR-10
  onebasin train --model vgg11 --width 0.5 --dataset mnist --epochs 5 --out runs/vgg11.safetensors
  onebasin train --model resnet20 --width 4 --norm layernorm --dataset cifar10 --out runs/rn20x4_ln.safetensors
  # the transformers (AdamW recipes vit and gpt, ~15 min each on one uncontended CPU core): docs/training.md
  onebasin train --model vit --width 128 --dataset fashionmnist --threads 1 --out runs/vit_s0.safetensors
  onebasin train --model gpt --width 192 --dataset pydoc --threads 1 --out runs/gpt_s0.safetensors

An interrupted run resumes from its last epoch checkpoint (OUT with .resume.safetensors) when the
same command is run again; --force discards it and overwrites OUT.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2), like every other input error of the CLI."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onebasin", description="Merge independently trained networks "
                "(permutation alignment, interpolation, REPAIR).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model of the zoo with a paper recipe",
                       epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--model", required=True, help="registered model name (see `onebasin.models.list_models()`)")
    t.add_argument("--width", type=float, help="hidden units (mlp), channel multiplier (vgg*, resnet*) or residual "
                   "width (vit, gpt)")
    t.add_argument("--depth", type=int, help="number of Linear layers (mlp) or transformer blocks (vit, gpt)")
    t.add_argument("--norm", choices=["batchnorm", "layernorm", "none"], help="normalisation (vgg*, resnet20/18_cifar)")
    t.add_argument("--model-opts", nargs="*", default=[], metavar="KEY=VALUE",
                   help="any other option of the model, e.g. tie=false (gpt: an untied LM head with a bias)")
    t.add_argument("--dataset", required=True, help="mnist, fashionmnist, svhn, cifar10, cifar100 or pydoc (text, for gpt)")
    t.add_argument("--recipe", help="mlp, vgg, resnet20, vit or gpt (default: the model's own recipe)")
    t.add_argument("--epochs", type=int, help="override the recipe's epochs")
    t.add_argument("--lr", type=float, help="override the recipe's peak learning rate")
    t.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    t.add_argument("--weight-decay", type=float, help="override the recipe's weight decay")
    t.add_argument("--seed", type=int, default=0, help="seed of init, data order and augmentation (default 0)")
    t.add_argument("--data-dir", help="dataset folder (default: $ONEBASIN_DATA, else ~/.cache/onebasin/data)")
    t.add_argument("--no-download", action="store_true", help="never download missing datasets")
    t.add_argument("--limit", type=int, help="train on the first N training examples only")
    t.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    t.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores)")
    t.add_argument("--out", required=True, help="checkpoint path X.safetensors (a sidecar X.json is written too)")
    t.add_argument("--force", action="store_true", help="overwrite OUT and discard an unfinished run's epoch checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_demo(sub)
    _add_merge(sub)
    _add_barrier(sub)
    _add_sweep(sub)
    return p


def _model_kwargs(args, fail) -> dict:
    kw = {**_parse_opts(args.model_opts, fail), **{k: v for k, v in (("depth", args.depth), ("norm", args.norm)) if v is not None}}
    if args.width is not None:
        kw["width"] = int(args.width) if float(args.width).is_integer() else args.width
    return {k: v for k, v in kw.items() if v is not None}


def _validate_train(args, fail) -> None:
    from onebasin.data import dataset_info
    from onebasin.models import model_info
    from onebasin.train import RECIPES

    for check in (lambda: model_info(args.model), lambda: dataset_info(args.dataset)):
        try:
            check()
        except ValueError as err:
            fail(str(err))
    if args.recipe is not None and args.recipe not in RECIPES:
        fail(f"unknown recipe {args.recipe!r}; valid: {', '.join(RECIPES)}")
    for name in ("epochs", "batch_size", "limit", "threads", "depth"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("width", "lr"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            fail(f"--{name} must be > 0")
    accepted = inspect.signature(model_info(args.model).fn).parameters
    for key in _model_kwargs(args, fail):
        if key not in accepted:
            fail(f"model {args.model!r} has no option --{key} (its options: {', '.join(accepted)})")


def cmd_train(args, fail) -> int:
    import torch

    from onebasin.errors import OnebasinError
    from onebasin.train import train_model

    _validate_train(args, fail)
    _check_out_file(args.out, args.force, fail)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                 "weight_decay": args.weight_decay}
    try:
        _, result = train_model(args.model, args.dataset, model_kwargs=_model_kwargs(args, fail), recipe=args.recipe,
                                overrides=overrides, seed=args.seed, out=args.out, data_dir=args.data_dir,
                                limit=args.limit, device=args.device, force=args.force,
                                progress=not args.no_progress, download=not args.no_download)
    except (FileExistsError, OnebasinError) as err:
        fail(str(err))
    from onebasin.experiment import is_text

    bits = {"test_bits_per_char": result.test_loss / math.log(2)} if is_text(args.dataset) else {}
    print(json.dumps({"out": args.out, "epochs_done": result.epochs_done, "train_acc": result.train_acc,
                      "test_acc": result.test_acc, "test_loss": result.test_loss, **bits,
                      "wall_time_s": round(result.wall_time_s, 1)}))
    return 0


DEMO_EXAMPLES = """examples:
  onebasin demo --data-dir ../shared/data                 # 10-layer MLPs (width 128) on MNIST, ~3 min on 2 CPU cores
  onebasin demo --dataset fashionmnist --width 512 --epochs 20 --out reports/fmnist512
  onebasin demo --model resnet20 --width 1 --dataset fashionmnist --epochs 2
  onebasin demo --model vit --data-dir ../shared/data     # two ViTs on FashionMNIST (recipe vit, 3 epochs each)
  onebasin demo --model gpt                               # two character-level GPTs on pydoc (recipe gpt)
  onebasin demo --model gpt --method learned --untie --learned-steps 200   # the tied GPT, learned matching

--model vit and --model gpt have their own defaults (dataset, width, epochs, calibration examples and the
recipe's lr and warm-up: their registry entries, onebasin.experiment.demo_preset); options given on the command line replace
them. The GPT's loss is cross-entropy per character in nats; the demo also prints it in bits per character.

Trained endpoints are cached ($ONEBASIN_CACHE, else ~/.cache/onebasin): a second run only compares.
The report folder gets report.json, barrier.csv, barrier.png, variance.png and index.html.
"""


SWEEP_EXAMPLES = """example CONFIG.toml:
  out = "runs/sweep"
  [base]
  model = "mlp"
  dataset = "mnist"
  epochs = 5
  model_kwargs = { depth = 4 }
  [grid]
  width = [32, 64, 128]
  seeds = [[0, 1]]
  method = ["activation", "weight"]

Cells already in OUT/results.csv are skipped; OUT/summary.png plots barrier vs the first numeric axis.
"""


def _add_demo(sub):
    d = _sub(sub, "demo", "train two MLPs on MNIST, align, REPAIR, and write a report (the main job)", DEMO_EXAMPLES)
    d.add_argument("--dataset", help="mnist (default), fashionmnist, svhn, cifar10, cifar100, pydoc "
                   "(vit: fashionmnist, gpt: pydoc)")
    d.add_argument("--model", default="mlp", help="registered model name (default mlp; vit and gpt: see below)")
    d.add_argument("--width", type=int, help="MLP hidden units, conv channel multiplier or transformer width "
                   "(default 128; gpt: 192)")
    d.add_argument("--depth", type=int, help="Linear layers of the MLP (default 10; ignored by conv nets) or "
                   "transformer blocks (vit 6, gpt 4)")
    d.add_argument("--epochs", type=int, help="training epochs of each endpoint (default 8; vit, gpt: their recipe's)")
    d.add_argument("--lr", type=float, help="peak learning rate (default 0.1: the MLP recipe's 0.2 diverged to NaN "
                   "in 8-epoch runs; vit, gpt: their recipe's)")
    d.add_argument("--warmup", type=float, help="fraction of steps warming up the learning rate (default 0.25; the "
                   "MLP recipe's is 0.05; vit, gpt: their recipe's)")
    d.add_argument("--repair", default="exact", choices=REPAIRS[:3], help="correction of the third curve (default exact)")
    d.add_argument("--train-limit", type=int, help="train on the first N examples only (quick looks)")
    d.add_argument("--test-examples", type=int, help="evaluate on the first N test examples (default: all)")
    d.add_argument("--cache-dir", help="trained endpoints (default: $ONEBASIN_CACHE, else ~/.cache/onebasin)")
    _add_common(d, "report folder (default: onebasin-demo/<date-time>, never overwritten)", out_required=False)
    _add_align_options(d)
    d.set_defaults(calib_examples=None)  # 5000; the transformer demos' own (2000 images, 256 sequences)


def _add_sweep(sub):
    s = _sub(sub, "sweep", "run a grid of experiments from a TOML file, resumably", SWEEP_EXAMPLES)
    s.add_argument("config", help="sweep CONFIG.toml")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_device(s)


def cmd_demo(args, fail) -> int:
    import time

    from onebasin.experiment import Experiment, bits_per_character, demo_preset, is_text, run_experiment, summary_table
    from onebasin.models import model_info

    out = args.out or f"onebasin-demo/{time.strftime('%Y%m%d-%H%M%S')}"
    _check_out_folder(out, args.force, fail)
    options = _align_options(args, fail)
    try:
        model_info(args.model)
        settings = _transformer_demo(args) if demo_preset(args.model) is not None else _mlp_demo(args)
        exp = Experiment(model=args.model, method=args.method, repair=args.repair, train_limit=args.train_limit,
                         test_examples=args.test_examples, out=out, data_dir=args.data_dir, cache_dir=args.cache_dir,
                         device=str(args.device), align_options=options, **settings)
        comparison, paths = run_experiment(exp, progress=not args.no_progress)
    except _errors() as err:
        fail(str(err))
    print(summary_table(comparison))
    if is_text(exp.dataset):
        print(bits_per_character(comparison))
    print(f"report: {paths['html'].resolve()}")
    return 0


def _mlp_demo(args) -> dict:
    """The MLP demo's settings (also for conv nets): MNIST, width 128, depth 10, 8 epochs at lr 0.1, 25 % warm-up."""
    from onebasin.models import model_info

    width, depth = _given(args.width, 128), _given(args.depth, 10)
    return {"dataset": _given(args.dataset, "mnist"), "epochs": _given(args.epochs, 8),
            "model_kwargs": {"width": width, **({"depth": depth} if model_info(args.model).flat_input else {})},
            "recipe_overrides": {"lr": _given(args.lr, 0.1), "warmup": _given(args.warmup, 0.25)},
            "calib_examples": _given(args.calib_examples, 5000)}


def _transformer_demo(args) -> dict:
    """The model's demo preset (`experiment.demo_preset`) with the options given on the command line replacing its own."""
    from onebasin.experiment import demo_preset

    preset = demo_preset(args.model)
    model_kwargs = {**preset["model_kwargs"], **{k: v for k, v in (("width", args.width), ("depth", args.depth))
                                                 if v is not None}}
    return {**preset, "dataset": _given(args.dataset, preset["dataset"]), "epochs": _given(args.epochs, preset["epochs"]),
            "model_kwargs": model_kwargs, "calib_examples": _given(args.calib_examples, preset["calib_examples"]),
            "recipe_overrides": {k: v for k, v in (("lr", args.lr), ("warmup", args.warmup)) if v is not None}}


def _given(value, default):
    return default if value is None else value


def cmd_sweep(args, fail) -> int:
    from onebasin.sweep import run_sweep

    try:
        results = run_sweep(args.config, progress=not args.no_progress, device=str(args.device))
    except _errors() as err:
        fail(str(err))
    print(f"results: {results.resolve()}")
    return 0


def main(argv=None) -> int:
    """Console entry point `onebasin`; returns the exit status (2 on a usage or input error)."""
    parser = _parser()
    args = parser.parse_args(argv)

    def fail(message):
        one_line = " ".join(str(message).split())
        parser.exit(2, f"onebasin {args.command}: error: {one_line}\n")

    commands = {"train": cmd_train, "demo": cmd_demo, "merge": cmd_merge, "barrier": cmd_barrier, "sweep": cmd_sweep}
    import torch

    from onebasin.distributed import default_device, init_from_env, shutdown
    from onebasin.stats import statistics_precision

    if getattr(args, "device", None) is not None:
        try:
            args.device = default_device(args.device)
        except RuntimeError as err:
            fail(f"--device {args.device!r}: {err}")
        if args.device.type == "cuda" and not torch.cuda.is_available():
            fail(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    try:
        init_from_env(args.device if getattr(args, "device", None) is not None else default_device())
        with statistics_precision(getattr(args, "precision", None)):  # every statistic below takes it
            return commands[args.command](args, fail)
    except KeyboardInterrupt:
        print(f"onebasin {args.command}: interrupted{RESUME_HINTS.get(args.command, '')}", file=sys.stderr)
        return 130
    finally:
        shutdown()


RESUME_HINTS = {
    "train": ": run the same command again to resume from the last finished epoch",
    "demo": ": run it again to resume training the endpoints from their last finished epoch",
    "sweep": ": run the same command again to resume (finished cells are kept in results.csv)",
}


if __name__ == "__main__":
    sys.exit(main())
