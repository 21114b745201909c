"""`onebasin merge` and `onebasin barrier`: checkpoints (two, or three and more) and Hugging Face folders."""

from __future__ import annotations

import json

from onebasin._cli_common import (REPAIRS, _add_align_options, _add_common, _align_options, _check_calib_examples,
                                  _check_out_file, _check_out_folder, _errors, _parse_opts, _sub, _warn)


MERGE_EXAMPLES = """examples:
  # two Hugging Face folders (save_pretrained) of one architecture, calibrated on a text file
  onebasin merge runs/bert_a runs/bert_b --calib-text corpus.txt --out runs/bert_merged
  # two checkpoints of `onebasin train` (model and dataset read from their sidecars)
  onebasin merge runs/a.safetensors runs/b.safetensors --method activation --repair exact --out merged.safetensors
  # learned matching (straight-through, from weight matching): 200 steps of 100 calibration examples
  onebasin merge runs/a.safetensors runs/b.safetensors --method learned --learned-steps 200 --out merged.safetensors
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


def _add_pair(p, repairs):
    p.add_argument("a", help="model A: an onebasin checkpoint, or a state_dict file (.safetensors/.pt) with --model")
    p.add_argument("b", help="model B, same architecture as A")
    p.add_argument("--model", help="registered model name or module:factory (needed for plain state_dict files)")
    p.add_argument("--model-opts", nargs="*", default=[], metavar="KEY=VALUE", help="options of --model, e.g. width=128")
    p.add_argument("--data", help="dataset for calibration and evaluation (default: the checkpoints' dataset)")
    auto = "; auto: exact REPAIR, kept only if it does not raise the loss on the 1,000 training images after the " \
           "calibration set" if "auto" in repairs else ""
    p.add_argument("--repair", default="exact", choices=repairs, help=f"correction after interpolating (default exact{auto})")
    p.add_argument("--allow-different-data", action="store_true",
                   help="proceed (with a warning) when A and B were trained on different datasets")
    _add_align_options(p)


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
    m.add_argument("--combine",
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


def _sites(args, default: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in (args.sites or default).split(",") if x.strip())


def cmd_merge_pretrained(args, fail) -> int:
    """merge for Hugging Face save_pretrained folders (`onebasin.hf.merge_pretrained`): saved the same way."""
    from onebasin.distributed import is_main
    from onebasin.hf import merge_pretrained

    paths = [args.a, args.b, *args.more]
    _check_calib_examples(args, fail)
    if _align_options(args, fail):
        fail("--untie, --heads and --learned-* apply to two onebasin checkpoints or state_dicts, not to Hugging Face folders")
    weights = _weights(args, len(paths), fail)
    try:
        out, result = merge_pretrained(
            paths, out=args.out, calib_text=args.calib_text, data=args.data,
            data_dir=args.data_dir, seq_len=args.seq_len, max_examples=args.calib_examples, method=args.method,
            repair=args.repair, alpha=args.alpha, combine=args.combine or "universe", weights=weights,
            sites=_sites(args, "layer"), device=args.device, force=args.force,
            allow_onebasin_checkpoint=args.allow_onebasin_checkpoint, progress=not args.no_progress)
    except _errors() as err:
        fail(str(err))
    if is_main():
        seconds = result.seconds["total"] if isinstance(result.seconds, dict) else result.seconds
        print(json.dumps({"out": str(out), "fused": result.fused, "format": "save_pretrained" if result.fused else "onebasin",
                          "seconds": round(seconds, 1)}))
    return 0


def cmd_merge(args, fail) -> int:
    """`onebasin merge A B [C ...]`: Hugging Face folders, two checkpoints (`merge`) or more (`cmd_merge_many`)."""
    from onebasin.hf import is_pretrained_dir

    if is_pretrained_dir(args.a):
        return cmd_merge_pretrained(args, fail)
    paths = [args.a, args.b, *args.more]
    alpha_given, args.alpha = args.alpha is not None, 0.5 if args.alpha is None else args.alpha
    args.weights = weights = _weights(args, len(paths), fail)
    options = _align_options(args, fail)
    _check_checkpoint_options(args, fail)
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
    from onebasin.pipeline import held_out_batches, merge

    try:
        models, meta, dataset, calib, loaders = _load_models(args, paths, fail)
        held = held_out_batches(loaders["train"], args.calib_examples)  # training images after the calibration set
        merged, result = merge(*models, method=args.method, repair=args.repair, alpha=alpha, data=calib,
                               max_examples=args.calib_examples, sites=_sites(args, "layer,block"), held_out=held or None,
                               **options)
        measured = {name: dict(zip(("test_loss", "test_acc"), evaluate(m, loaders["test"])))
                    for name, m in zip(("model_a", "model_b", "merged"), (*models, merged))}
        out = save_merged(args.out, merged, result, sources=paths, meta={**meta, "dataset": dataset}, measured=measured)
    except _errors() as err:
        fail(str(err))
    check = result.repair_check
    if check.get("repair_raised_loss"):
        _warn(args, f"REPAIR raised the loss on {check['examples']} held-out training examples "
                    f"({check['loss_without_repair']:.4f} -> {check['loss_with_repair']:.4f}); "
                    + ("the uncorrected interpolation is kept (--repair auto)" if check["kept"] == "none" else
                       "--repair auto keeps whichever is lower"))
    raised = {"repair_raised_loss": check["repair_raised_loss"]} if check else {}
    _print_main({"out": str(out), **{k: round(v["test_acc"], 4) for k, v in measured.items()}, "fused": result.fused, **raised})
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
        merged, result = merge_many(models, method=args.combine or "universe", repair=args.repair, weights=weights, data=calib,
                                    alignment=args.method, max_examples=args.calib_examples, sites=_sites(args, "layer,block"))
        measured = merge_diagnostics(models, merged, loaders["test"], result.weights)
        out = save_merged(args.out, merged, result, sources=paths, meta={**meta, "dataset": dataset}, measured=measured,
                          key="merge_many")
    except _errors() as err:
        fail(str(err))
    _print_main({"out": str(out), **{k: round(measured[k]["acc"], 4) for k in ("merged", "endpoint_mean", "ensemble")},
                 "fused": result.fused})
    return 0


def _check_checkpoint_options(args, fail) -> None:
    """Refuse the options that checkpoints would ignore: the Hugging Face ones, and --combine with two models."""
    for given, option in ((args.calib_text is not None, "--calib-text"), (args.allow_onebasin_checkpoint, "--allow-onebasin-checkpoint")):
        if given:
            fail(f"{option} is for Hugging Face folders; {args.a} is a checkpoint (use --data DATASET to calibrate on)")
    if args.combine is not None and not args.more:
        fail(f"--combine {args.combine} is for three or more models; two are aligned pairwise (--method)")


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
    from onebasin.comparison import compare
    from onebasin.experiment import summary_table
    from onebasin.report import write_comparison_report

    _check_out_folder(args.out, args.force, fail)
    options = _align_options(args, fail)
    if args.alphas < 2:
        fail(f"--alphas is a count and must be >= 2 (0 and 1), got {args.alphas}")
    _check_calib_examples(args, fail)
    try:
        (a, b), meta, _, calib, loaders = _load_models(args, [args.a, args.b], fail)
        alphas = [i / (args.alphas - 1) for i in range(args.alphas)]
        comparison = compare(a, b, loaders, calib, method=args.method, repair=args.repair, alphas=alphas,
                             max_examples=args.calib_examples, progress=not args.no_progress, align_options=options)
        if not is_main():
            return 0
        paths = write_comparison_report(comparison, args.out, f"{args.a} vs {args.b}",
                                        extra={"a": args.a, "b": args.b, "meta_a": meta})
    except _errors() as err:
        fail(str(err))
    print(summary_table(comparison))
    print(f"report: {paths['html'].resolve()}")
    return 0
