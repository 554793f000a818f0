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


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run GTP, top-k and random on a built-in synthetic pool",
                       description="Build a synthetic gradient-trajectory pool (no downloads, no GPU) "
                                   "and compare GTP, top-k and random at the same budget.")
    p.add_argument("--k", type=int, default=64, help="budget (default 64)")
    p.add_argument("--num-candidates", type=int, default=8000, help="pool size (default 8000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default=None, help="the GTP method to show (default: the fastest exact one)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also plot residual vs examples selected")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(k=args.k, num_candidates=args.num_candidates, seed=args.seed, method=args.method, plot=args.plot)
    return 0


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
    p.add_argument("--k", type=int, required=True, help="budget: at most k examples")
    p.add_argument("--method", default=None, help="selection method (see below)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data", default=None, metavar="JSONL",
                   help="the pool's JSON lines (with a store): also write OUT/selected.jsonl, the chosen examples")
    p.add_argument("--id-field", default="id", help="id field of --data records (default: id)")
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


def _cmd_select(args) -> int:
    import torch

    from .api import select
    from .io import load_array, write_selection

    from .collect.store import is_store, open_store

    ids = None
    checkpoint_weights = args.checkpoint_weights
    if is_store(args.candidates):
        store = open_store(args.candidates)
        candidates = store.candidates(as_tensor=True)
        ids = store.ids
        if checkpoint_weights is None:
            checkpoint_weights = store.selection_checkpoint_weights
        num_checkpoints = store.t
    else:
        candidates = load_array(args.candidates, "candidates")
        num_checkpoints = args.num_checkpoints
    if args.data is not None and ids is None:
        raise InputError("--data needs --candidates to be a trajectory store (it maps rows to example ids)")
    target = open_store(args.target).mean() if is_store(args.target) else load_array(args.target, "target")
    sel = select(candidates, target, args.k, method=args.method, checkpoint_weights=checkpoint_weights,
                 num_checkpoints=num_checkpoints, positive=not args.no_positive, ridge=args.ridge,
                 tol=args.tol, align_threshold=args.align_threshold, stop_ratio=args.stop_ratio,
                 batch_size=args.batch_size, topk_reduce=args.topk_reduce, seed=args.seed,
                 device=args.device, compute_dtype=torch.float64 if args.float64 else None,
                 progress=args.progress)
    paths = write_selection(args.out, sel, ids=ids)
    print(f"{sel}\nwrote {paths['selection']} and {paths['summary']}")
    if args.data is not None:
        from pathlib import Path

        from .collect.data import ExampleFormat, write_selected_examples

        out = Path(args.out) / "selected.jsonl"
        n = write_selected_examples(args.data, [ids[i] for i in sel.indices], out,
                                    fmt=ExampleFormat(id_field=args.id_field), weights=sel.weights)
        print(f"wrote {n} selected examples to {out}")
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

    store = collect_from_args(args)
    print(f"store {store.path}: N={len(store)} examples, T={store.t} checkpoints, d={store.d}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gtp", description="Training-data selection by Gradient Trajectory Pursuit")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_select(sub)
    _add_collect(sub)
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
