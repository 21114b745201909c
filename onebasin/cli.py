"""The `onebasin` command line: parse, validate, call the library (never the other way round)."""

from __future__ import annotations

import argparse
import inspect
import json
import math
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

--model vit and --model gpt have their own defaults (dataset, width, epochs, calibration examples and the
recipe's lr and warm-up: their registry entries, onebasin.experiment.demo_preset); options given on the command line replace
them. The GPT's loss is cross-entropy per character in nats; the demo also prints it in bits per character.

Trained endpoints are cached ($ONEBASIN_CACHE, else ~/.cache/onebasin): a second run only compares.
The report folder gets report.json, barrier.csv, barrier.png, variance.png and index.html.
"""

MERGE_EXAMPLES = """examples:
  # two Hugging Face folders (save_pretrained) of one architecture, calibrated on a text file
  onebasin merge runs/bert_a runs/bert_b --calib-text corpus.txt --out runs/bert_merged
  # two checkpoints of `onebasin train` (model and dataset read from their sidecars)
  onebasin merge runs/a.safetensors runs/b.safetensors --method activation --repair exact --out merged.safetensors
  # five models into one: aligned into a shared universe, averaged, N-way REPAIR
  onebasin merge runs/s0.safetensors runs/s1.safetensors runs/s2.safetensors runs/s3.safetensors runs/s4.safetensors \\
      --combine universe --repair exact --out merged5.safetensors
  # your own model: an importable factory and plain state_dict files, calibrated on MNIST
  onebasin merge a.pt b.pt --model mypkg.nets:make_net --model-opts hidden=256 --data mnist --out merged.safetensors
"""

BARRIER_EXAMPLES = """examples:
  onebasin barrier runs/a.safetensors runs/b.safetensors --out reports/ab
  onebasin barrier a.pt b.pt --model mypkg.nets:make_net --data fashionmnist --repair closed --out reports/ab
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

METHODS = ["activation", "weight", "annealing", "functional", "orthogonal", "learned"]
REPAIRS = ["exact", "closed", "reset_bn", "none"]


def _sub(sub, name, help_, epilog):
    return sub.add_parser(name, help=help_, description=help_, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_common(p, out_help, out_required=True):
    p.add_argument("--method", default="activation", choices=METHODS, help="alignment method (default activation)")
    p.add_argument("--data-dir", help="dataset folder (default: $ONEBASIN_DATA, else ~/.cache/onebasin/data)")
    p.add_argument("--calib-examples", type=int, default=5000, help="examples for alignment and REPAIR statistics (default 5000)")
    p.add_argument("--out", required=out_required, help=out_help)
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_device(p)


def _add_device(p):
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available, else cpu; "
                   "under torchrun each process takes cuda:LOCAL_RANK)")


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
    d.set_defaults(calib_examples=None)  # 5000; the transformer demos' own (2000 images, 256 sequences)


def _add_pair(p, repairs):
    p.add_argument("a", help="model A: an onebasin checkpoint, or a state_dict file (.safetensors/.pt) with --model")
    p.add_argument("b", help="model B, same architecture as A")
    p.add_argument("--model", help="registered model name or module:factory (needed for plain state_dict files)")
    p.add_argument("--model-opts", nargs="*", default=[], metavar="KEY=VALUE", help="options of --model, e.g. width=128")
    p.add_argument("--data", help="dataset for calibration and evaluation (default: the checkpoints' dataset)")
    p.add_argument("--repair", default="exact", choices=repairs, help="correction after interpolating (default exact)")
    p.add_argument("--allow-different-data", action="store_true",
                   help="proceed (with a warning) when A and B were trained on different datasets")


def _add_merge(sub):
    m = _sub(sub, "merge", "merge two or more checkpoints into one: align, interpolate, REPAIR", MERGE_EXAMPLES)
    _add_pair(m, REPAIRS)
    m.add_argument("more", nargs="*", metavar="C", help="further models: three or more are merged by onebasin.merge_many")
    m.add_argument("--alpha", type=float, help="two models: interpolation weight, 0 = A, 1 = B (default 0.5)")
    m.add_argument("--sites", help="REPAIR sites: layer (Linear/Conv outputs, always folded into the weights) and/or "
                   "block (residual additions, kept as modules): default layer,block; layer for Hugging Face folders")
    m.add_argument("--calib-text", help="Hugging Face folders: a text file to calibrate on (tokenised with A's tokenizer)")
    m.add_argument("--seq-len", type=int, default=64, help="Hugging Face folders: tokens per calibration window (default 64)")
    m.add_argument("--allow-onebasin-checkpoint", action="store_true",
                   help="Hugging Face folders: if some corrections cannot be folded, save an onebasin checkpoint instead "
                   "(OUT/onebasin.safetensors, reloaded by onebasin.load_model)")
    m.add_argument("--combine", default="universe",
                   help="three or more models: universe (default, cycle-consistent), mergemany or anchor (all to A)")
    m.add_argument("--weights", nargs="+", metavar="W", help="weight of each model (default equal; two models: "
                   "--weights 1 2 is --alpha 2/3)")
    _add_common(m, "merged checkpoint X.safetensors (a sidecar X.json records method and measured numbers); "
                   "for save_pretrained folders, a folder (replaced with --force only if onebasin wrote it)")


def _add_barrier(sub):
    b = _sub(sub, "barrier", "barrier curves of two checkpoints: plain, aligned, aligned+REPAIR", BARRIER_EXAMPLES)
    _add_pair(b, REPAIRS[:3])
    b.add_argument("--alphas", type=int, default=11,
                   help="how many evenly spaced alphas in [0, 1], a count: 11 gives 0, 0.1, ..., 1 (default 11)")
    _add_common(b, "report folder (report.json, barrier.csv, barrier.png, variance.png, index.html)")


def _add_sweep(sub):
    s = _sub(sub, "sweep", "run a grid of experiments from a TOML file, resumably", SWEEP_EXAMPLES)
    s.add_argument("config", help="sweep CONFIG.toml")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_device(s)


def _parse_opts(items, fail) -> dict:
    """KEY=VALUE strings -> dict, values parsed as JSON where they parse (numbers, true/false), else text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--model-opts expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _check_out_file(path, force, fail):
    """Refuse a checkpoint OUT whose weights or sidecar (X.json) is a directory, or exists without --force."""
    from onebasin._io import unwritable
    from onebasin.checkpoint import checkpoint_paths

    if problem := unwritable(path):
        fail(problem)
    for p in checkpoint_paths(path):
        if p.is_dir():
            fail(f"{p} is a directory; --out needs a checkpoint file name such as {p.with_suffix('') / 'model.safetensors'}")
        if p.exists() and not force:
            fail(f"{p} exists; pass --force to overwrite it")


def _check_out_folder(path, force, fail):
    """Refuse a report folder OUT that is a file, or holds files without --force, or holds files but no
    report.json (a folder onebasin did not write: its files are never overwritten)."""
    from onebasin._io import check_output_folder
    from onebasin.errors import OutputError

    try:
        check_output_folder(path, force, "report.json")
    except OutputError as err:
        fail(str(err))


def _load_models(args, paths, fail):
    """(models, meta of the first, dataset name, calibration batches, {"test", "train": batches}) for merge and barrier.

    Onebasin checkpoints, or plain state_dicts with --model (and --model-opts); checked to share architecture,
    dtype and (unless --allow-different-data, then with one warning each) training dataset, and to run on the data.
    """
    import warnings

    from onebasin.checkpoint import is_onebasin_file, load_any
    from onebasin.checks import check_example_input, check_same_architecture, check_same_dtype, first_input

    opts = _parse_opts(args.model_opts, fail)
    if opts and (recorded := [str(p) for p in paths if is_onebasin_file(p)]):
        fail(f"--model-opts is for plain state_dict files; {recorded[0]} is an onebasin checkpoint that records its "
             "own model and options: drop --model-opts")
    models, metas = [], []
    with warnings.catch_warnings(record=True) as caught:  # a stale sidecar or an old checksum: one line each
        warnings.simplefilter("always")
        for p in paths:
            model, meta = load_any(p, args.model, opts or (metas[0].get("model_kwargs") if metas else None), device=args.device)
            if models:
                check_same_architecture(models[0].state_dict(), model.state_dict(), (str(paths[0]), str(p)))
                check_same_dtype(models[0].state_dict(), model.state_dict(), (str(paths[0]), str(p)))
            models.append(model), metas.append(meta)
    for w in caught:
        _warn(args, w.message)
    _check_datasets(args, paths, metas, fail)
    name, calib, loaders = _pair_data(args, metas[0], fail)
    check_example_input(models[0], first_input(calib))
    return models, metas[0], name, calib, loaders


def _check_datasets(args, paths, metas, fail) -> None:
    """Every checkpoint's recorded dataset against the first recorded one: refused, or one warning per other
    dataset with --allow-different-data."""
    from onebasin.checks import check_same_dataset
    from onebasin.errors import DatasetMismatchError

    recorded = [(p, m) for p, m in zip(paths, metas) if m.get("dataset") is not None]
    for p, meta in recorded[1:]:
        try:
            check_same_dataset(recorded[0][1], meta, (str(recorded[0][0]), str(p)))
        except DatasetMismatchError as err:
            if not args.allow_different_data:
                fail(f"{err}; pass --allow-different-data to proceed anyway")
            _warn(args, f"{err}; proceeding (--allow-different-data) on {args.data or recorded[0][1]['dataset']}")


def _warn(args, message) -> None:
    print(f"onebasin {args.command}: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _pair_data(args, meta, fail):
    """(dataset name, calibration batches, {"test": batches, "train": batches}) of --data or the checkpoints'."""
    from onebasin.data import dataset_info
    from onebasin.experiment import evaluation_batches
    from onebasin.models import model_info

    name = args.data or meta.get("dataset")
    if name is None:
        fail("say which data to calibrate and evaluate on: --data DATASET")
    name = dataset_info(name).name
    registered = ":" not in meta["model"]
    size = meta.get("image_size") or (model_info(meta["model"]).image_size if registered else None)
    loaders, calib = evaluation_batches(name, size, data_dir=args.data_dir, calib_examples=args.calib_examples)
    return name, calib, loaders


def _errors():
    from onebasin.errors import OnebasinError

    return (OnebasinError, ValueError, OSError)


def cmd_demo(args, fail) -> int:
    import time

    from onebasin.experiment import Experiment, bits_per_character, demo_preset, is_text, run_experiment, summary_table
    from onebasin.models import model_info

    out = args.out or f"onebasin-demo/{time.strftime('%Y%m%d-%H%M%S')}"
    _check_out_folder(out, args.force, fail)
    try:
        model_info(args.model)
        preset = demo_preset(args.model)
        settings = _transformer_demo(args, preset) if preset is not None else _mlp_demo(args)
        exp = Experiment(model=args.model, method=args.method, repair=args.repair, train_limit=args.train_limit,
                         test_examples=args.test_examples, out=out, data_dir=args.data_dir, cache_dir=args.cache_dir,
                         device=str(args.device), **settings)
        comparison, paths = run_experiment(exp, progress=not args.no_progress)
    except _errors() as err:
        fail(str(err))
    print(summary_table(comparison))
    if is_text(exp.dataset):
        print(bits_per_character(comparison))
    print(f"report: {paths['html'].resolve()}")
    return 0


def _sites(args, default: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in (args.sites or default).split(",") if x.strip())


def cmd_merge_pretrained(args, fail) -> int:
    """merge for Hugging Face save_pretrained folders (`onebasin.hf.merge_pretrained`): saved the same way."""
    from onebasin.distributed import is_main
    from onebasin.hf import merge_pretrained

    paths = [args.a, args.b, *args.more]
    _check_calib_examples(args, fail)
    weights = _weights(args, len(paths), fail)
    try:
        out, result = merge_pretrained(
            paths, out=args.out, calib_text=args.calib_text, data=args.data,
            data_dir=args.data_dir, seq_len=args.seq_len, max_examples=args.calib_examples, method=args.method,
            repair=args.repair, alpha=args.alpha, combine=args.combine, weights=weights,
            sites=_sites(args, "layer"), device=args.device, force=args.force,
            allow_onebasin_checkpoint=args.allow_onebasin_checkpoint, progress=not args.no_progress)
    except _errors() as err:
        fail(str(err))
    if is_main():
        seconds = result.seconds["total"] if isinstance(result.seconds, dict) else result.seconds
        print(json.dumps({"out": str(out), "fused": result.fused, "format": "save_pretrained" if result.fused else "onebasin",
                          "seconds": round(seconds, 1)}))
    return 0


def _mlp_demo(args) -> dict:
    """The MLP demo's settings (also for conv nets): MNIST, width 128, depth 10, 8 epochs at lr 0.1, 25 % warm-up."""
    from onebasin.models import model_info

    width, depth = _given(args.width, 128), _given(args.depth, 10)
    return {"dataset": _given(args.dataset, "mnist"), "epochs": _given(args.epochs, 8),
            "model_kwargs": {"width": width, **({"depth": depth} if model_info(args.model).flat_input else {})},
            "recipe_overrides": {"lr": _given(args.lr, 0.1), "warmup": _given(args.warmup, 0.25)},
            "calib_examples": _given(args.calib_examples, 5000)}


def _transformer_demo(args, preset: dict) -> dict:
    """The model's demo preset (`experiment.demo_preset`) with the options given on the command line replacing its own."""
    model_kwargs = {**preset["model_kwargs"], **{k: v for k, v in (("width", args.width), ("depth", args.depth))
                                                 if v is not None}}
    return {**preset, "dataset": _given(args.dataset, preset["dataset"]), "epochs": _given(args.epochs, preset["epochs"]),
            "model_kwargs": model_kwargs, "calib_examples": _given(args.calib_examples, preset["calib_examples"]),
            "recipe_overrides": {k: v for k, v in (("lr", args.lr), ("warmup", args.warmup)) if v is not None}}


def _given(value, default):
    return default if value is None else value


def cmd_merge(args, fail) -> int:
    """`onebasin merge A B [C ...]`: Hugging Face folders, two checkpoints (`merge`) or more (`cmd_merge_many`)."""
    from onebasin.hf import is_pretrained_dir

    if is_pretrained_dir(args.a):
        return cmd_merge_pretrained(args, fail)
    paths = [args.a, args.b, *args.more]
    alpha_given, args.alpha = args.alpha is not None, 0.5 if args.alpha is None else args.alpha
    args.weights = weights = _weights(args, len(paths), fail)
    _check_out_file(args.out, args.force, fail)
    _check_not_an_input(args.out, paths, fail)
    _check_calib_examples(args, fail)
    if args.more:
        return cmd_merge_many(args, paths, weights, alpha_given, fail)
    if alpha_given and weights is not None:
        fail("give --alpha or --weights for two models, not both")
    alpha = weights[1] if weights is not None else args.alpha
    if not 0 <= alpha <= 1:
        fail(f"--alpha must be in [0, 1], got {args.alpha}")
    from onebasin.checkpoint import save_merged
    from onebasin.interpolate import evaluate
    from onebasin.pipeline import merge

    try:
        models, meta, dataset, calib, loaders = _load_models(args, paths, fail)
        merged, result = merge(*models, method=args.method, repair=args.repair, alpha=alpha, data=calib,
                               max_examples=args.calib_examples, sites=_sites(args, "layer,block"))
        measured = {name: dict(zip(("test_loss", "test_acc"), evaluate(m, loaders["test"])))
                    for name, m in zip(("model_a", "model_b", "merged"), (*models, merged))}
        out = save_merged(args.out, merged, result, sources=paths, meta={**meta, "dataset": dataset}, measured=measured)
    except _errors() as err:
        fail(str(err))
    _print_main({"out": str(out), **{k: round(v["test_acc"], 4) for k, v in measured.items()}, "fused": result.fused})
    return 0


def cmd_merge_many(args, paths, weights, alpha_given, fail) -> int:
    """`onebasin merge A B C ...`: onebasin.merge_many of three or more checkpoints."""
    from onebasin.checkpoint import save_merged
    from onebasin.diagnostics import merge_diagnostics
    from onebasin.pipeline import merge_many

    if args.method not in ("activation", "weight"):
        fail(f"--method {args.method}: three or more models are aligned by activation or weight")
    if args.repair == "closed":
        fail("three or more models take --repair exact, reset_bn or none")
    if alpha_given:
        fail("three or more models take --weights (one per model) instead of --alpha")
    try:
        models, meta, dataset, calib, loaders = _load_models(args, paths, fail)
        merged, result = merge_many(models, method=args.combine, repair=args.repair, weights=weights, data=calib,
                                    alignment=args.method, max_examples=args.calib_examples, sites=_sites(args, "layer,block"))
        measured = merge_diagnostics(models, merged, loaders["test"], result.weights)
        out = save_merged(args.out, merged, result, sources=paths, meta={**meta, "dataset": dataset}, measured=measured,
                          key="merge_many")
    except _errors() as err:
        fail(str(err))
    _print_main({"out": str(out), **{k: round(measured[k]["acc"], 4) for k in ("merged", "endpoint_mean", "ensemble")},
                 "fused": result.fused})
    return 0


def _weights(args, n_models: int, fail) -> list[float] | None:
    """--weights as N floats summing to 1 (None when not given); refused showing what was typed."""
    from onebasin.checks import check_weights

    if args.weights is None:
        return None
    try:
        return check_weights([float(w) for w in args.weights], n_models)
    except ValueError:
        fail(f"--weights {' '.join(args.weights)}: give {n_models} finite non-negative numbers with a positive sum, "
             "one per model")


def _check_not_an_input(out, paths, fail) -> None:
    """Refuse an --out whose weights or sidecar is one of the inputs (or an input's sidecar): never overwrite an input."""
    from pathlib import Path

    from onebasin.checkpoint import checkpoint_paths

    inputs = {q.resolve(): p for p in paths for q in (Path(p), *checkpoint_paths(p))}
    for q in checkpoint_paths(out):
        if q.resolve() in inputs:
            fail(f"--out {out} would overwrite the input {inputs[q.resolve()]} (or its sidecar): choose another path")


def _print_main(record: dict) -> None:
    """Print the command's JSON summary line, on rank 0 only under torchrun."""
    from onebasin.distributed import is_main

    if is_main():
        print(json.dumps(record))


def cmd_barrier(args, fail) -> int:
    from onebasin.distributed import is_main
    from onebasin.pipeline import compare
    from onebasin.experiment import summary_table
    from onebasin.report import write_comparison_report

    _check_out_folder(args.out, args.force, fail)
    if args.alphas < 2:
        fail(f"--alphas is a count and must be >= 2 (0 and 1), got {args.alphas}")
    _check_calib_examples(args, fail)
    try:
        (a, b), meta, _, calib, loaders = _load_models(args, [args.a, args.b], fail)
        alphas = [i / (args.alphas - 1) for i in range(args.alphas)]
        comparison = compare(a, b, loaders, calib, method=args.method, repair=args.repair,
                             alphas=alphas, max_examples=args.calib_examples, progress=not args.no_progress)
        if not is_main():
            return 0
        paths = write_comparison_report(comparison, args.out, f"{args.a} vs {args.b}",
                                        extra={"a": args.a, "b": args.b, "meta_a": meta})
    except _errors() as err:
        fail(str(err))
    print(summary_table(comparison))
    print(f"report: {paths['html'].resolve()}")
    return 0


def _check_calib_examples(args, fail) -> None:
    if args.calib_examples < 1:
        fail(f"--calib-examples must be >= 1, got {args.calib_examples}")


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

    if getattr(args, "device", None) is not None:
        try:
            args.device = default_device(args.device)
        except RuntimeError as err:
            fail(f"--device {args.device!r}: {err}")
        if args.device.type == "cuda" and not torch.cuda.is_available():
            fail(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    try:
        init_from_env(args.device if getattr(args, "device", None) is not None else default_device())
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
