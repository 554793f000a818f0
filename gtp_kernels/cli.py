"""The ``gtp`` command: demo, select (and the subcommands later modules add).

Every failure on bad input prints one line ``gtp: error: ...`` and exits with status 2,
having written nothing.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .collect.store import StoreError
from .validation import InputError


def _methods_help() -> str:
    from .api import DEFAULT_METHOD, METHODS

    lines = [f"  {name:<14} {spec.summary}{' (default)' if name == DEFAULT_METHOD else ''}"
             for name, spec in METHODS.items()]
    return "methods:\n" + "\n".join(lines)


def _float_list(text: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def _method_names() -> str:
    from .api import METHODS

    return ", ".join(METHODS)


def _check_method(method: Optional[str]) -> None:
    from .api import METHODS

    if method is not None and method not in METHODS:
        raise InputError(f"--method: unknown method {method!r}; choose one of: {_method_names()}")


def _check_device(spec: Optional[str]) -> None:
    """Refuse a --device torch cannot use here, before any work."""
    if spec is not None:
        from .validation import resolve_device

        resolve_device(spec, "--device")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run GTP, top-k and random on a built-in synthetic pool",
                       description="Build a synthetic gradient-trajectory pool (no downloads, no GPU) "
                                   "and compare GTP, top-k and random at the same budget.")
    p.add_argument("--k", type=int, default=64, help="budget (default 64)")
    p.add_argument("--num-candidates", type=int, default=8000,
                   help="pool size (default 8000; at least 481: the pool holds 480 near-copies)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pool and of random (>= 0, default 0)")
    p.add_argument("--method", default=None,
                   help=f"the GTP method shown first (default: the fastest exact one); one of: {_method_names()}")
    p.add_argument("--plot", default=None, metavar="FILE",
                   help="also plot residual vs examples selected; the format follows the suffix (.png, .pdf, .svg, ...)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from .demo import check_demo_arguments, run_demo

    # checked here too so that the messages name the flags (run_demo checks the same again)
    check_demo_arguments(args.k, args.num_candidates, args.seed, args.method,
                         label=lambda name: "--" + name.replace("_", "-"))
    run_demo(k=args.k, num_candidates=args.num_candidates, seed=args.seed, method=args.method, plot=args.plot)
    return 0


_VERIFY_HELP = ("how far to check a store against its manifest before using it: 'size' (default) compares "
                "each shard's byte count and .npy header (fast, catches truncated or rewritten shards); "
                "'sha256' also checksums every shard (reads all the data once: slow on large stores, catches "
                "any corruption)")


def _add_select(sub) -> None:
    p = sub.add_parser("select", help="select k examples matching a target gradient",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Read candidate and target arrays (.npy, .pt, .safetensors; FILE:KEY picks "
                                   "one tensor), select, and write OUT/selection.jsonl (rank, index, weight) "
                                   "and OUT/summary.json atomically.",
                       epilog=_methods_help())
    p.add_argument("--candidates", required=True,
                   help="(N, D) or (N, T, d) array file, or a trajectory store folder (gtp collect)")
    p.add_argument("--target", required=True,
                   help="(D,) or (D, m) array file, or a store folder (its mean row is the target)")
    p.add_argument("--k", type=int, required=True,
                   help="budget: at most k examples per target column; the union of m columns holds up to m*k")
    p.add_argument("--method", default=None, help="selection method (see below)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data", default=None, metavar="JSONL",
                   help="the pool's JSON lines (with a store): also write OUT/selected.jsonl, the chosen examples "
                        "(without --data, a selected.jsonl left there by an earlier run is removed)")
    p.add_argument("--id-field", default="id", help="id field of --data records (default: id)")
    p.add_argument("--verify", choices=("size", "sha256"), default="size", help=_VERIFY_HELP)
    p.add_argument("--checkpoint-weights", type=_float_list, default=None, metavar="W1,W2,...",
                   help="per-checkpoint weights (e.g. learning rates)")
    p.add_argument("--num-checkpoints", type=int, default=None, help="T when candidates are flat (N, T*d)")
    p.add_argument("--no-positive", action="store_true", help="allow negative weights (plain OMP)")
    p.add_argument("--ridge", type=float, default=0.0, help="ridge lambda (default 0)")
    p.add_argument("--tol", type=float, default=1e-6, help="stop at this relative residual")
    p.add_argument("--align-threshold", type=float, default=None,
                   help="guard: only candidates with cosine to the target above this")
    p.add_argument("--stop-ratio", type=float, default=None,
                   help="guard: stop when the best correlation falls below this fraction of the first")
    p.add_argument("--batch-size", type=int, default=None, help="compressive sampling: candidates per pass")
    p.add_argument("--topk-reduce", choices=("mean", "max"), default="mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="e.g. cuda (default: where the data is, the CPU for files)")
    p.add_argument("--float64", action="store_true", help="compute in float64")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=_cmd_select)


SELECTION_FILES = ("selection.jsonl", "summary.json")
EXAMPLES_FILE = "selected.jsonl"


def _read_data(path: str, id_field: str, store_ids) -> dict:
    """Read --data and check it holds every example of the store; {id: record}."""
    from pathlib import Path

    from .collect.data import ExampleFormat, read_jsonl

    p = Path(path)
    if not p.exists():
        raise InputError(f"--data file not found: {path}")
    if not p.is_file() and not p.is_dir():  # a file, or a dataset saved with save_to_disk
        raise InputError(f"--data {path} is not a file")
    try:
        examples = read_jsonl(p, ExampleFormat(id_field=id_field))
    except InputError:
        raise  # already names the file (and line)
    except (OSError, UnicodeError, ValueError, TypeError) as exc:
        raise InputError(f"cannot read --data {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    by_id = {e.id: e.record for e in examples}
    missing = [str(i) for i in store_ids if str(i) not in by_id]
    if missing:
        raise InputError(f"--data {path} lacks {len(missing)} of the store's {len(store_ids)} example ids "
                         f"(first: {missing[0]!r}; ids from field {id_field!r}); was the store collected from it?")
    return by_id


def _selection_line(sel) -> str:
    rel = sel.relative_residual
    rel_s = "n/a" if rel is None else f"{rel:.4g}"
    time_s = f"{sel.timings.get('total_s', float('nan')):.3g}s"
    if sel.num_targets == 1:
        return (f"method={sel.method}, k={sel.k}, selected={len(sel.indices)}, "
                f"relative_residual={rel_s}, time={time_s}")
    return (f"method={sel.method}, k={sel.k} per target, {sel.num_targets} targets, "
            f"selected={len(sel.indices)} (union), relative_residual={rel_s} (worst target), time={time_s}")


def _cmd_select(args) -> int:
    from pathlib import Path

    import torch

    from .api import DEFAULT_METHOD, METHODS, select
    from .collect.data import selected_examples_text
    from .collect.store import check_compatible, is_store, open_store
    from .io import atomic_write_files, check_output_folder, load_array, render_selection

    # Everything that can be checked before the work is checked here; nothing is written
    # until the selection is done, and then every output is put in place together.
    _check_method(args.method)
    _check_device(args.device)
    if args.k < 1:
        raise InputError(f"--k must be >= 1, got {args.k}")
    out = Path(args.out)
    names = SELECTION_FILES + ((EXAMPLES_FILE,) if args.data is not None else ())
    check_output_folder(out, "--out", names)
    candidates_is_store = is_store(args.candidates)
    if args.data is not None:
        if not candidates_is_store:
            raise InputError("--data needs --candidates to be a trajectory store (it maps rows to example ids)")
        if Path(args.data).resolve() == (out / EXAMPLES_FILE).resolve():
            raise InputError(f"--data {args.data} is the output {out / EXAMPLES_FILE}; it would be overwritten")

    ids = None
    by_id = None
    checkpoint_weights = args.checkpoint_weights
    method_spec = METHODS[args.method or DEFAULT_METHOD]
    target_store = open_store(args.target, verify=args.verify) if is_store(args.target) else None
    if candidates_is_store:
        store = open_store(args.candidates, verify=args.verify)
        if target_store is not None:
            check_compatible(store, target_store)  # e.g. another projection seed: rows in other spaces
        if checkpoint_weights is not None and store.weights_applied:
            raise InputError(f"--checkpoint-weights: the rows of {args.candidates} already carry their checkpoint "
                             "weights (weights_applied); passing weights again would apply them twice")
        ids = store.ids
        if args.data is not None:
            by_id = _read_data(args.data, args.id_field, ids)
        candidates = store.candidates(as_tensor=True)
        if checkpoint_weights is None:
            checkpoint_weights = store.weights_for(method_spec.block_scale_invariant)
        num_checkpoints = store.t
    else:
        candidates = load_array(args.candidates, "candidates")
        num_checkpoints = args.num_checkpoints
    target = target_store.mean() if target_store is not None else load_array(args.target, "target")
    sel = select(candidates, target, args.k, method=args.method, checkpoint_weights=checkpoint_weights,
                 num_checkpoints=num_checkpoints, positive=not args.no_positive, ridge=args.ridge,
                 tol=args.tol, align_threshold=args.align_threshold, stop_ratio=args.stop_ratio,
                 batch_size=args.batch_size, topk_reduce=args.topk_reduce, seed=args.seed,
                 device=args.device, compute_dtype=torch.float64 if args.float64 else None,
                 progress=args.progress)

    texts = render_selection(sel, ids=ids)
    files = {out / name: texts[name].encode("utf-8") for name in SELECTION_FILES}
    if by_id is not None:
        chosen = [ids[i] for i in sel.indices.tolist()]
        files[out / EXAMPLES_FILE] = selected_examples_text(by_id, chosen, sel.weights.tolist()).encode("utf-8")
    stale = out / EXAMPLES_FILE
    remove = [stale] if by_id is None and (stale.is_file() or stale.is_symlink()) else []
    try:
        atomic_write_files(files, remove=remove)
    except OSError as exc:
        raise InputError(f"cannot write to --out {out}: {exc}") from None
    print(_selection_line(sel))
    print(f"wrote {out / SELECTION_FILES[0]} and {out / SELECTION_FILES[1]}")
    if by_id is not None:
        print(f"wrote {len(sel.indices)} selected examples to {out / EXAMPLES_FILE}")
    for path in remove:
        print(f"removed {path}: an earlier run's examples, which do not match this selection "
              f"(pass --data to write them)")
    return 0


def _add_collect(sub) -> None:
    from .collect.pipeline import add_collect_arguments

    p = sub.add_parser("collect", help="projected gradient trajectories of a transformers model's examples",
                       description="Warm up the model (LoRA by default) on a share of the data, or use given "
                                   "checkpoints; compute every example's per-checkpoint gradient in batches, "
                                   "project it (K1) and write a resumable trajectory store.")
    add_collect_arguments(p)
    p.set_defaults(func=_cmd_collect)


def _cmd_collect(args) -> int:
    from .collect.pipeline import collect_from_args

    collect_from_args(args)  # prints the store's summary line itself (unless --quiet)
    return 0


def _add_less_select(sub) -> None:
    # gtp less-select lives in integrations/less.py (LESS's folders in, LESS's files out)
    from .integrations.less import add_less_select_parser

    add_less_select_parser(sub)


def _add_to_dataset(sub) -> None:
    # gtp to-dataset lives in integrations/hf_datasets.py (the selection as a Hugging Face dataset)
    from .integrations.hf_datasets import add_to_dataset_parser

    add_to_dataset_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gtp", description="Training-data selection by Gradient Trajectory Pursuit")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_select(sub)
    _add_collect(sub)
    _add_less_select(sub)
    _add_to_dataset(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (InputError, StoreError, FileNotFoundError) as exc:
        print(f"gtp: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
