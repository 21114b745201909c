"""The `onebasin` command line: parse, validate, call the library (never the other way round)."""

from __future__ import annotations

import argparse
import inspect
import json
import sys

TRAIN_EXAMPLES = """examples:
  # the paper's 10-layer MLP recipe on MNIST (width 128), a few seconds per epoch on a laptop CPU
  onebasin train --model mlp --width 128 --depth 10 --dataset mnist --data-dir ../shared/data \\
      --out runs/mlp_w128_s0.safetensors
  # a CPU-budget ResNet20 on FashionMNIST: the ResNet20 recipe cut to 3 epochs
  onebasin train --model resnet20 --dataset fashionmnist --epochs 3 --out runs/rn20_fmnist.safetensors
  # VGG11 (pads 28x28 data to 32x32), LayerNorm ResNet20 x4 on CIFAR-10
  onebasin train --model vgg11 --width 0.5 --dataset mnist --epochs 5 --out runs/vgg11.safetensors
  onebasin train --model resnet20 --width 4 --norm layernorm --dataset cifar10 --out runs/rn20x4_ln.safetensors

An interrupted run resumes from its last epoch checkpoint (OUT with .resume.safetensors) when the
same command is run again; --force discards it and overwrites OUT.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onebasin", description="Merge independently trained networks "
                                "(permutation alignment, interpolation, REPAIR).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model of the zoo with a paper recipe",
                       epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--model", required=True, help="registered model name (see `onebasin.models.list_models()`)")
    t.add_argument("--width", type=float, help="hidden units (mlp) or channel multiplier (vgg*, resnet*)")
    t.add_argument("--depth", type=int, help="number of Linear layers (mlp)")
    t.add_argument("--norm", choices=["batchnorm", "layernorm", "none"], help="normalisation (vgg*, resnet20/18_cifar)")
    t.add_argument("--dataset", required=True, help="mnist, fashionmnist, svhn, cifar10 or cifar100")
    t.add_argument("--recipe", help="mlp, vgg or resnet20 (default: the paper's recipe for the model)")
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
    d = sub.add_parser("demo", help="a CPU-sized end-to-end demo (placeholder for now)")
    d.add_argument("--out", default="runs/demo", help="folder for the demo's outputs")
    return p


def _model_kwargs(args) -> dict:
    kw = {"depth": args.depth, "norm": args.norm}
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
    for key in _model_kwargs(args):
        if key not in accepted:
            fail(f"model {args.model!r} has no option --{key} (its options: {', '.join(accepted)})")


def cmd_train(args, fail) -> int:
    import torch

    from onebasin.errors import OnebasinError
    from onebasin.train import train_model

    _validate_train(args, fail)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                 "weight_decay": args.weight_decay}
    try:
        _, result = train_model(args.model, args.dataset, model_kwargs=_model_kwargs(args), recipe=args.recipe,
                                overrides=overrides, seed=args.seed, out=args.out, data_dir=args.data_dir,
                                limit=args.limit, device=args.device, force=args.force,
                                progress=not args.no_progress, download=not args.no_download)
    except (FileExistsError, OnebasinError) as err:
        fail(str(err))
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the last finished epoch", file=sys.stderr)
        return 130
    print(json.dumps({"out": args.out, "epochs_done": result.epochs_done, "train_acc": result.train_acc,
                      "test_acc": result.test_acc, "test_loss": result.test_loss,
                      "wall_time_s": round(result.wall_time_s, 1)}))
    return 0


def cmd_demo(args, fail) -> int:
    print("onebasin demo (not implemented yet) will: train two 10-layer MLPs (width 128) on MNIST with different "
          "seeds, align B to A by activation matching, interpolate with and without REPAIR, and write the "
          f"barrier curves and a report to {args.out}.")
    return 0


def main(argv=None) -> int:
    """Console entry point `onebasin`; returns the exit status (2 on a usage or input error)."""
    parser = _parser()
    args = parser.parse_args(argv)

    def fail(message):
        parser.exit(2, f"onebasin {args.command}: error: {message}\n")

    return {"train": cmd_train, "demo": cmd_demo}[args.command](args, fail)


if __name__ == "__main__":
    sys.exit(main())
