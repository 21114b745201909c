"""What every `onebasin` command shares: argument groups, option parsing, output checks, one-line warnings."""

from __future__ import annotations

import argparse
import json
import sys


METHODS = ["activation", "weight", "annealing", "functional", "orthogonal", "learned"]


REPAIRS = ["exact", "closed", "reset_bn", "none", "auto"]  # merge's; the first three: a barrier curve's correction


LEARNED_INITS = ["weight", "activation", "orthogonal", "identity"]  # onebasin.align.learned.INITS


def _sub(sub, name, help_, epilog):
    return sub.add_parser(name, help=help_, description=help_, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_common(p, out_help, out_required=True):
    p.add_argument("--method", default="activation", choices=METHODS, help="alignment method (default activation)")
    p.add_argument("--data-dir", help="dataset folder (default: $ONEBASIN_DATA, else ~/.cache/onebasin/data)")
    p.add_argument("--calib-examples", type=int, default=5000, help="examples for alignment and REPAIR statistics (default 5000)")
    p.add_argument("--out", required=out_required, help=out_help)
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--precision", choices=["float64", "float32"], help="of the statistics: float32 (default: shifted "
                   "float32 products added into float64 sums, ~1e-6 relative error) or float64 (exact sums, slower)")
    _add_device(p)


def _add_device(p):
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available, else cpu; "
                   "under torchrun each process takes cuda:LOCAL_RANK)")


def _add_align_options(p):
    """--untie and the learned method's options (merge, barrier, demo); `_align_options` reads them."""
    g = p.add_argument_group("alignment options")
    g.add_argument("--untie", action="store_true", help="--method orthogonal or learned on a model whose LM head is "
                   "tied to its embedding: give the head its own copy (recorded), so the final LayerNorm's gain can fold")
    g.add_argument("--heads", choices=("permutation", "orthogonal", "linear"), help="--method orthogonal or learned: "
                   "inside each attention head, permute the query/key and value/output dims (default) or map them by an "
                   "orthogonal matrix (Procrustes on the weights; learnt by learned); linear (learned only): any invertible "
                   "map, learnt from the Procrustes start")
    g.add_argument("--learned-init", choices=LEARNED_INITS, help="--method learned: the start (default weight; "
                   "orthogonal: activation matching plus the stream's Procrustes map)")
    g.add_argument("--learned-epochs", type=float, metavar="E", help="--method learned: passes over the calibration "
                   "examples (default 10)")
    g.add_argument("--learned-steps", type=int, metavar="N", help="--method learned: optimiser steps (instead of "
                   "--learned-epochs)")
    g.add_argument("--learned-lr", type=float, metavar="LR", help="--method learned: Adam's learning rate on the "
                   "latent permutation matrices (default 0.05; 3e-4 when the residual stream's map is learned)")
    g.add_argument("--learned-stream-lr", type=float, metavar="LR", help="--method learned: Adam's learning rate on the "
                   "residual stream's orthogonal map (default 0.01)")
    g.add_argument("--learned-batch-size", type=int, metavar="N", help="--method learned: examples per step (default 100)")


LEARNED = ("init", "epochs", "steps", "lr", "stream_lr", "batch_size")  # options of learned_matching behind --learned-*


def _align_options(args, fail) -> dict:
    """The alignment method's options from --untie and --learned-* ({"untie": True, "steps": 3, ...}), refused in
    one line naming the flag for a method that does not take them or a bad value."""
    learned = {k: getattr(args, f"learned_{k}") for k in LEARNED if getattr(args, f"learned_{k}") is not None}
    flag = {k: f"--learned-{k.replace('_', '-')}" for k in LEARNED}
    for name, value in (("--untie", args.untie), ("--heads", args.heads)):
        if value and args.method not in ("orthogonal", "learned"):
            fail(f"{name} applies to --method orthogonal or learned, not {args.method}")
    if args.heads == "linear" and args.method != "learned":
        fail(f"--heads linear applies to --method learned, not {args.method}")
    if learned and args.method != "learned":
        fail(f"{flag[next(iter(learned))]} applies to --method learned, not {args.method}")
    if "epochs" in learned and "steps" in learned:
        fail("give --learned-epochs or --learned-steps, not both")
    from .align.learned import check_options
    from .errors import InvalidOptionError

    for k, v in learned.items():  # one option at a time, so the message names its flag
        try:
            check_options(**{k: v})
        except InvalidOptionError as err:
            fail(f"{flag[k]}: {err}")
    return ({"untie": True} if args.untie else {}) | ({"heads": args.heads} if args.heads else {}) | learned


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


def _warn(args, message) -> None:
    print(f"onebasin {args.command}: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _errors():
    from onebasin.errors import OnebasinError

    return (OnebasinError, ValueError, OSError)


def _check_calib_examples(args, fail) -> None:
    if args.calib_examples < 1:
        fail(f"--calib-examples must be >= 1, got {args.calib_examples}")
