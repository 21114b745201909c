"""What every `onebasin` command shares: argument groups, option parsing, output checks, one-line warnings."""

from __future__ import annotations

import argparse
import json
import sys


METHODS = ["activation", "weight", "annealing", "functional", "orthogonal", "learned"]


REPAIRS = ["exact", "closed", "reset_bn", "none", "auto"]  # merge's; the first three: a barrier curve's correction


def _sub(sub, name, help_, epilog):
    return sub.add_parser(name, help=help_, description=help_, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_common(p, out_help, out_required=True):
    p.add_argument("--method", default="activation", choices=METHODS, help="alignment method (default activation)")
    p.add_argument("--data-dir", help="dataset folder (default: $ONEBASIN_DATA, else ~/.cache/onebasin/data)")
    p.add_argument("--calib-examples", type=int, default=5000, help="examples for alignment and REPAIR statistics (default 5000)")
    p.add_argument("--out", required=out_required, help=out_help)
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--precision", choices=["float64", "float32"], help="of the statistics: float64 (default: exact "
                   "sums) or float32 (shifted float32 products added into float64 sums: faster, ~1e-6 relative error)")
    _add_device(p)


def _add_device(p):
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available, else cpu; "
                   "under torchrun each process takes cuda:LOCAL_RANK)")


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
