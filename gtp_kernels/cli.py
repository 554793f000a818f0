"""The ``gtp`` command: demo, select (and the subcommands later modules add).

Every failure on bad input prints one line ``gtp: error: ...`` and exits with status 2,
having written nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional, Union

from .collect.models import TASKS
from .collect.store import StoreError
from .validation import SEED_LIMIT, InputError, check_int

if TYPE_CHECKING:
    from .collect.store import TrajectoryStore


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


def _screen_factor(text: str) -> Union[float, str]:
    """--screen: a factor >= 1, or 'none'."""
    if text.strip().lower() == "none":
        return "none"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or 'none', got {text!r}")
    if not (math.isfinite(value) and value >= 1):
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or 'none', got {text!r}")
    return value


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
                "each shard's byte count, whole .npy header and a checksum of a fixed sample of its data "
                "(fast: ~256 KiB a shard; catches truncated, rewritten, swapped or replaced shards and header "
                "changes); 'sha256' also checksums every byte (reads all the data once: slow on large stores, "
                "catches any corruption, e.g. one flipped byte outside the sample)")


def _add_select(sub) -> None:
    p = sub.add_parser("select", help="select k examples matching a target gradient",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Read candidate and target arrays (.npy, .pt, .safetensors; FILE:KEY picks "
                                   "one tensor) or stores, select k rows per target column, and write the folder "
                                   "OUT (selection.jsonl: rank, index, weight, targets, filled; summary.json: "
                                   "parameters, inputs, why pursuit stopped) whole, in one rename.",
                       epilog=_methods_help())
    p.add_argument("--candidates", required=True,
                   help="(N, D) or (N, T, d) array file, or a trajectory store folder (gtp collect)")
    p.add_argument("--target", required=True,
                   help="(D,) or (D, m) array file, or a store folder (see --target-mode)")
    p.add_argument("--target-mode", choices=TARGET_MODES, default=None,
                   help="'joint' (the default for a target store, with methods that have it: gtp, gtp-cosamp, topk, random; "
                        "else 'mean'): one column per target example, each scaled to "
                        "unit norm, and ONE selection of --k rows in all that serves them jointly (the quality study's "
                        "best GTP mode, benchmarks/quality/QUALITY.md); also takes a (D, m) target file. 'mean': a "
                        "target store as one column, the mean of its examples. 'examples': one column per example, "
                        "each its own --k rows (the union holds up to m*k). A target file is otherwise used as it "
                        "is, one selection per column")
    p.add_argument("--k", type=int, required=True,
                   help="budget: at most k examples per target column (with --target-mode joint: in all); the union "
                        "of m columns holds up to m*k")
    p.add_argument("--method", default=None, help="selection method (see below)")
    p.add_argument("--out", required=True,
                   help="output folder, written whole; must be new or empty unless --force")
    p.add_argument("--force", action="store_true",
                   help="replace an --out folder that holds an earlier gtp select output (and nothing else)")
    p.add_argument("--fill", choices=FILL_CHOICES, default=None,
                   help="when pursuit stops before k rows, fill each column's budget with the best remaining "
                        "candidates (weight 0, marked filled, no near-copies) by cosine with the 'target' (default: "
                        "best in the quality study) or with the final 'residual'; 'none' keeps pursuit's rows "
                        "(the only choice, and the default, under torchrun)")
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
    p.add_argument("--screen", type=_screen_factor, default=None, metavar="FACTOR|none",
                   help="candidate screen: pursue only among the rows ranked best by cosine with some target "
                        "column, the union of every column's best rows until it holds FACTOR times the budget "
                        f"(select(screen=...)); default {DEFAULT_JOINT_SCREEN:g} with --target-mode joint (the quality "
                        "study's choice: fewer mislabelled picks), none otherwise")
    p.add_argument("--stop-ratio", type=float, default=None,
                   help="guard: stop when the best correlation falls below this fraction of the first")
    p.add_argument("--batch-size", type=int, default=None, help="compressive sampling: candidates per pass")
    p.add_argument("--topk-reduce", choices=("column", "mean", "max"), default="column",
                   help="topk with several target columns: each column's own k best (column, default), or one "
                        "ranking by the columns' mean or max LESS score serving every column")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="e.g. cuda (default: where the data is, the CPU for files)")
    p.add_argument("--float64", action="store_true", help="compute in float64")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=_cmd_select)


SELECTION_FILES = ("selection.jsonl", "summary.json")
EXAMPLES_FILE = "selected.jsonl"
FILL_CHOICES = ("target", "residual", "none")
# gtp select's candidate screen for a joint target (--screen): the factor the quality study's rule
# picks on its synthetic noise model (benchmarks/quality/noise_model.py, QUALITY.md, Reading: "the candidate screen")
DEFAULT_JOINT_SCREEN = 1.5
TARGET_MODES = ("joint", "mean", "examples")


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


# why pursuit stopped, in words (selection/common.py's STOP_* codes; others print as they are)
_STOP_WORDS = {
    "budget": "k reached",
    "tolerance": "residual below --tol",
    "no_correlation": "no candidate left positively correlated with the residual",
    "guard": "best correlation below --stop-ratio of the first",
    "exhausted": "no eligible candidate left",
    "max_iters": "iteration cap reached",
    "residual_floor": "residual at the rounding floor: --tol unreachable in this precision",
}
_FILL_WORDS = {"target": "cosine with the target", "residual": "cosine with the final residual"}


def _selection_line(sel) -> str:
    """The one line gtp select prints: what was selected, how many rows the method chose and how
    many filling added, and why pursuit stopped (per reason, with how many targets when m > 1)."""
    rel = sel.relative_residual
    rel_s = "n/a" if rel is None else f"{rel:.4g}"
    time_s = f"{sel.timings.get('total_s', float('nan')):.3g}s"
    pursuit = any(ts.stopped_by != "n/a" for ts in sel.per_target)
    chosen = f"{sel.num_pursued} pursued" if pursuit else f"{sel.num_pursued} by {sel.method}"
    fill = sel.params.get("fill")
    filled = f"{sel.num_filled} filled"
    if sel.num_filled:
        filled += f" by {_FILL_WORDS.get(fill, fill)}"
    elif not fill:
        filled += " (--fill none)"
    screen = sel.params.get("screen")
    if screen is not None:
        n = sel.params["num_candidates"]
        filled += f", among {n - sel.params['screened_out']} of {n} candidates (--screen {screen:g})"
    m = sel.num_targets
    joint = getattr(sel, "targets", "columns") == "joint"
    if joint:  # one selection for every column: the columns share the rows and the stop
        head = f"method={sel.method}, k={sel.k} in all, joint over {m} target{'s' if m > 1 else ''}, " \
               f"selected={len(sel.indices)}: {chosen}, {filled}, "
        tail = f"relative_residual={rel_s} (worst target), time={time_s}"
        m = 1
    elif m == 1:
        head = f"method={sel.method}, k={sel.k}, selected={len(sel.indices)}: {chosen}, {filled}, "
        tail = f"relative_residual={rel_s}, time={time_s}"
    else:
        head = f"method={sel.method}, k={sel.k} per target, {m} targets, selected={len(sel.indices)} (union): " \
               f"{chosen}, {filled}, "
        tail = f"relative_residual={rel_s} (worst target), time={time_s}"
    parts = [head + tail]
    if pursuit:
        reasons: dict = {}
        for ts in (sel.per_target[:1] if joint else sel.per_target):
            reasons[ts.stopped_by] = reasons.get(ts.stopped_by, 0) + 1
        said = [f"{code} ({_STOP_WORDS[code]})" if code in _STOP_WORDS else code for code in reasons]
        if m > 1:
            said = [f"{words} for {count} target{'s' if count > 1 else ''}"
                    for words, count in zip(said, reasons.values())]
        parts.append("pursuit stopped: " + ", ".join(said))
    short = sum(max(0, sel.k - len(ts.indices)) for ts in (sel.per_target[:1] if joint else sel.per_target))
    if short:
        why = "no eligible candidate left that is not a near-copy" if fill else "pass --fill to fill the budget"
        parts.append(f"{short} row{'s' if short > 1 else ''} short of k" + (" in all" if m > 1 else "") + f" ({why})")
    return "; ".join(parts)


def _file_sha256(path) -> str:
    """sha256 of a file, or of a folder (a saved dataset): its files' relative paths and bytes,
    in sorted order."""
    import hashlib
    from pathlib import Path

    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    digest = hashlib.sha256()
    for file in files:
        if root.is_dir():
            digest.update(file.relative_to(root).as_posix().encode("utf-8") + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _describe_array(spec: str, array) -> dict:
    import os

    return {"path": os.path.abspath(str(spec)), "kind": "file", "shape": list(array.shape),
            "dtype": str(array.dtype).replace("torch.", "")}


def _describe_store(store) -> dict:
    return {"path": str(store.path.resolve()), "kind": "store", "shape": [store.n, store.t, store.d],
            "dtype": str(store.dtype), "manifest_sha256": _file_sha256(store.path / "manifest.json")}


def _cmd_select(args) -> int:
    from pathlib import Path

    import torch

    from .api import select
    from .collect.store_selection import select_from_stores
    from .collect.targets import store_target

    # Everything that can be checked before the work is checked here; nothing is written
    # until the selection is done, and then the output folder is put in place whole.
    out = Path(args.out)
    _check_select_arguments(args, out)
    launch = _distributed_launch()
    if launch is not None:
        return _cmd_select_distributed(args, out, *launch)
    args.fill = args.fill or "target"
    args.target_mode = _target_mode(args)
    if args.screen is None:
        args.screen = DEFAULT_JOINT_SCREEN if args.target_mode == "joint" else "none"
    candidate_store, target_store = _open_select_stores(args)
    inputs = {}
    by_id = _read_select_data(args, candidate_store, inputs)
    options = dict(method=args.method, positive=not args.no_positive, ridge=args.ridge, tol=args.tol,
                   align_threshold=args.align_threshold, screen=None if args.screen == "none" else args.screen,
                   stop_ratio=args.stop_ratio, batch_size=args.batch_size,
                   topk_reduce=args.topk_reduce, fill=None if args.fill == "none" else args.fill, seed=args.seed,
                   device=args.device, compute_dtype=torch.float64 if args.float64 else None, progress=args.progress,
                   targets="joint" if args.target_mode == "joint" else "columns")
    # inputs in this order: --data, --candidates, --target (as summary.json lists them)
    if candidate_store is not None:
        inputs["candidates"] = _describe_store(candidate_store)
    else:
        candidates = _load_described(args.candidates, "candidates", inputs)
    if target_store is not None:
        target = target_store if candidate_store is not None else store_target(
            target_store, "examples" if args.target_mode == "joint" else args.target_mode)
        inputs["target"] = {**_describe_store(target_store), "mode": args.target_mode}
    else:
        target = _load_described(args.target, "target", inputs)
        if args.target_mode == "joint":
            inputs["target"]["mode"] = "joint"
    if candidate_store is not None:
        sel = select_from_stores(candidate_store, target, args.k, target_mode=args.target_mode,
                                 checkpoint_weights=args.checkpoint_weights, **options)
    else:
        sel = select(candidates, target, args.k, checkpoint_weights=args.checkpoint_weights,
                     num_checkpoints=args.num_checkpoints, **options)
    _write_selection(args, out, sel, candidate_store.ids if candidate_store is not None else None, by_id, inputs)
    return 0


def _distributed_launch() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) under a multi-process torchrun launch, else None."""
    from .collect.distributed import distributed_environment

    try:
        return distributed_environment()
    except ValueError as exc:
        raise InputError(str(exc)) from None


# what gtp select runs under torchrun: exact GTP with the rows split across the ranks
DISTRIBUTED_METHODS = ("gtp",)


def _check_distributed_select(args, world: int) -> None:
    """Refuse what the sharded selection does not do, before the process group starts (every
    rank sees the same arguments, so every rank refuses alike)."""
    from .collect.store import is_store

    launch = f"under torchrun (WORLD_SIZE={world})"
    if (args.method or "gtp") not in DISTRIBUTED_METHODS:
        raise InputError(f"--method {args.method}: {launch} gtp select runs exact GTP with the candidate rows split "
                         f"across the ranks; supported: {', '.join(DISTRIBUTED_METHODS)} (run other methods in one "
                         "process)")
    if not is_store(args.candidates):
        raise InputError(f"--candidates {args.candidates}: {launch} the candidates must be a trajectory store "
                         "(gtp collect), which each rank reads its share of")
    if args.target_mode == "joint":
        raise InputError(f"--target-mode joint: {launch} each target column is pursued on its own; "
                         "use --target-mode mean (the default there) or examples")
    if args.fill not in (None, "none"):
        raise InputError(f"--fill {args.fill}: {launch} pursuit's rows are kept as they are (--fill none)")
    if args.screen not in (None, "none"):
        raise InputError(f"--screen {args.screen:g}: {launch} every rank pursues among all its rows (--screen none); "
                         "the screen ranks the whole pool, which the sharded selection does not gather")
    for flag, given in (("--batch-size", args.batch_size is not None), ("--num-checkpoints", args.num_checkpoints
                        is not None), ("--progress", args.progress), ("--topk-reduce", args.topk_reduce != "column")):
        if given:
            raise InputError(f"{flag}: not used by the sharded gtp that gtp select runs {launch}")


def _cmd_select_distributed(args, out, rank: int, world: int, local_rank: int) -> int:
    """gtp select under torchrun: every rank reads its contiguous share of the candidate store's
    rows (whole shards where it can), they run exact sharded GTP together (the selection a single
    process makes), and rank 0 alone writes the output folder and prints."""
    import torch
    import torch.distributed as dist

    from .collect.store_selection import select_sharded_from_stores
    from .validation import resolve_device

    _check_distributed_select(args, world)
    args.target_mode = args.target_mode or "mean"
    device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), "--device")
    if device.type == "cuda":  # this rank's own GPU
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    candidate_store, target_store = _open_select_stores(args)
    inputs: dict = {}
    by_id = _read_select_data(args, candidate_store, inputs)  # on every rank: a bad file fails them all alike
    inputs["candidates"] = _describe_store(candidate_store)
    if target_store is not None:
        target = target_store
        inputs["target"] = {**_describe_store(target_store), "mode": args.target_mode}
    else:
        target = _load_described(args.target, "target", inputs)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        sel = select_sharded_from_stores(
            candidate_store, target, args.k, target_mode=args.target_mode, checkpoint_weights=args.checkpoint_weights,
            device=device, positive=not args.no_positive, ridge=args.ridge, tol=args.tol,
            align_threshold=args.align_threshold, stop_ratio=args.stop_ratio,
            compute_dtype=torch.float64 if args.float64 else None)
        if rank == 0:
            _write_selection(args, out, sel, candidate_store.ids, by_id, inputs)
        dist.barrier()  # the other ranks exit once the output is in place
    finally:
        if started:
            dist.destroy_process_group()
    return 0


def _check_select_arguments(args, out) -> None:
    """Every check of gtp select's options that needs no input read."""
    from pathlib import Path

    from .collect.store import is_store
    from .files import check_replaceable_folder

    _check_method(args.method)
    _check_device(args.device)
    if args.k < 1:
        raise InputError(f"--k must be >= 1, got {args.k}")
    check_int(args.seed, "--seed", low=0, high=SEED_LIMIT - 1)
    check_replaceable_folder(out, "--out", args.force)
    if args.data is not None:
        if not is_store(args.candidates):
            raise InputError("--data needs --candidates to be a trajectory store (it maps rows to example ids)")
        if Path(args.data).resolve() == (out / EXAMPLES_FILE).resolve():
            raise InputError(f"--data {args.data} is the output {out / EXAMPLES_FILE}; it would be overwritten")
    if args.target_mode in ("mean", "examples") and not is_store(args.target):
        raise InputError(f"--target-mode {args.target_mode} needs --target to be a store; a target file is used as "
                         "it is, (D,) or (D, m) with one column per target (or jointly: --target-mode joint)")


def _target_mode(args) -> str | None:
    """--target-mode, or its default: for a target store 'joint' where the method has a joint
    mode (the reference pursues each column on its own: 'mean');
    None for a target file (used as it is)."""
    from .api import DEFAULT_METHOD
    from .collect.store import is_store
    from .selection.joint import JOINT_METHODS

    if args.target_mode is not None:
        return args.target_mode
    if not is_store(args.target):
        return None
    return "joint" if (args.method or DEFAULT_METHOD) in JOINT_METHODS else "mean"


def _open_select_stores(args) -> tuple:
    """(candidate store or None, target store or None), opened and verified; a candidate store
    that already carries its weights refuses --checkpoint-weights."""
    from .collect.store import is_store, open_store

    target_store = open_store(args.target, verify=args.verify) if is_store(args.target) else None
    if not is_store(args.candidates):
        return None, target_store
    store = open_store(args.candidates, verify=args.verify)
    if target_store is not None:
        from .collect.store import check_compatible

        check_compatible(store, target_store)  # e.g. another projection seed: rows in other spaces
    if args.checkpoint_weights is not None and store.weights_applied:
        raise InputError(f"--checkpoint-weights: the rows of {args.candidates} already carry their checkpoint "
                         "weights (weights_applied); passing weights again would apply them twice")
    return store, target_store


def _read_select_data(args, store, inputs: dict):
    """--data's records by id (None without --data), recorded in ``inputs``."""
    if args.data is None:
        return None
    from pathlib import Path

    by_id = _read_data(args.data, args.id_field, store.ids)
    inputs["data"] = {"path": str(Path(args.data).resolve()), "sha256": _file_sha256(args.data)}
    return by_id


def _load_described(path: str, what: str, inputs: dict):
    from .files import load_array

    array = load_array(path, what)
    inputs[what] = _describe_array(path, array)
    return array


def _write_selection(args, out, sel, ids, by_id, inputs: dict) -> None:
    """The output folder, whole (selection.jsonl, summary.json, and selected.jsonl with --data),
    then the lines saying what was selected and written."""
    import shlex

    from . import __version__
    from .collect.data import selected_examples_text
    from .files import render_selection, write_output_folder

    run = {"inputs": inputs, "gtp_kernels_version": __version__,
           "command_line": shlex.join(getattr(args, "summary_argv", None) or ["gtp", "select"])}
    texts = render_selection(sel, ids=ids, extra_summary=run)
    files = {name: texts[name].encode("utf-8") for name in SELECTION_FILES}
    if by_id is not None:
        chosen = [ids[i] for i in sel.indices.tolist()]
        files[EXAMPLES_FILE] = selected_examples_text(by_id, chosen, sel.weights.tolist()).encode("utf-8")
    stale = out / EXAMPLES_FILE
    replaced_examples = by_id is None and stale.is_file()
    try:
        write_output_folder(out, files, force=args.force)
    except OSError as exc:
        raise InputError(f"cannot write to --out {out}: {exc}") from None
    print(_selection_line(sel))
    print(f"wrote {out / SELECTION_FILES[0]} and {out / SELECTION_FILES[1]}")
    if by_id is not None:
        print(f"wrote {len(sel.indices)} selected examples to {out / EXAMPLES_FILE}")
    if replaced_examples:
        print(f"removed {stale}: an earlier run's examples, which do not match this selection "
              f"(pass --data to write them)")


def _add_collect(sub) -> None:
    p = sub.add_parser("collect", help="projected gradient trajectories of a transformers model's examples",
                       description="Warm up the model (LoRA by default) on a share of the data, or use given "
                                   "checkpoints; compute every example's per-checkpoint gradient in batches, "
                                   "project it (K1) and write a resumable trajectory store.")
    add_collect_arguments(p)
    p.set_defaults(func=_cmd_collect)


def _cmd_collect(args) -> int:
    collect_from_args(args)  # prints the store's summary line itself (unless --quiet)
    return 0


def add_collect_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``gtp collect`` options, added to ``parser`` (parsed by :func:`collect_from_args`)."""
    from .collect.pipeline import BACKENDS, GRADIENT_TYPES, KINDS
    from .collect.store import STORE_DTYPES

    parser.add_argument("--model", required=True,
                        help="Hugging Face model folder, or a model id already in the local HF cache (loaded offline, never downloaded)")
    parser.add_argument("--data", required=True,
                        help="JSON-lines file of examples, a dataset saved with save_to_disk, or a parquet file")
    parser.add_argument("--out", required=True, help="store folder (created, or resumed if it exists)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model; loaded offline)")
    parser.add_argument("--task", choices=TASKS, default="causal_lm")
    parser.add_argument("--checkpoints", default=None, help="existing warm-up folder (default: warm up into OUT/warmup)")
    parser.add_argument("--learning-rates", default=None, metavar="LR1,LR2,...", help="override the checkpoints' learning rates")
    parser.add_argument("--gradient-type", choices=GRADIENT_TYPES, default="adam", help="adam: candidates (LESS); sgd: targets")
    parser.add_argument("--d", type=int, default=8192, help="projected dimensions per checkpoint (default 8192)")
    parser.add_argument("--seed", type=int, default=0, help="projection seed (checkpoint t uses seed+t unless --shared-seed)")
    parser.add_argument("--shared-seed", action="store_true", help="one projection for every checkpoint (as LESS)")
    parser.add_argument("--kind", choices=KINDS, default="rademacher")
    parser.add_argument("--no-normalise", action="store_true", help="keep projected norms (default: unit-normalise each checkpoint block)")
    parser.add_argument("--no-checkpoint-weights", action="store_true", help="record, but do not apply, sqrt(w_t) to the blocks")
    parser.add_argument("--dtype", choices=STORE_DTYPES, default="float32", help="store dtype")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per batched backward")
    parser.add_argument("--vmap-chunk-size", type=int, default=None, help="bound memory: examples per vmap chunk")
    parser.add_argument("--shard-size", type=int, default=1024, help="rows per store shard (the resume unit)")
    parser.add_argument("--shards", default=None, metavar="I,J,...", help="compute only these shards (split across jobs)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model-dtype", default=None, help="float32 | bfloat16 | float16 (default: as saved)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="projection kernel")
    parser.add_argument("--projection-cache-mb", type=float, default=1024.0,
                        help="CPU path: materialise Pi once if it fits in this many MiB (default 1024; 0 = never)")
    parser.add_argument("--warmup-fraction", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=int, default=4, help="T: checkpoints saved, one per epoch")
    parser.add_argument("--warmup-lr", type=float, default=2e-5)
    parser.add_argument("--warmup-batch-size", type=int, default=8)
    parser.add_argument("--warmup-seed", type=int, default=0)
    parser.add_argument("--full-finetune", action="store_true", help="warm up every parameter instead of LoRA")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--lora-targets", default=None, metavar="q_proj,v_proj", help="modules to adapt (default: peft's)")
    parser.add_argument("--id-field", default="id")
    parser.add_argument("--messages-field", default="messages")
    parser.add_argument("--prompt-field", default="instruction")
    parser.add_argument("--response-field", default="response")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--label-field", default="label")
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--no-resume", action="store_true", help="refuse to continue an existing store")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _csv(text: str | None, kind: Callable[[str], Any], option: str = "", example: str = "") -> list[Any] | None:
    """Parse a comma-separated option value; a bad item is an InputError naming the option."""
    if text is None:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        values = [kind(x) for x in items]
    except ValueError:
        what = "numbers" if kind is float else "integers" if kind is int else "values"
        raise InputError(f"{option or 'value'}: expected comma-separated {what}{f' like {example}' if example else ''}, "
                         f"got {text!r}") from None
    if not values:
        raise InputError(f"{option or 'value'}: empty list {text!r}{f'; expected e.g. {example}' if example else ''}")
    return values


def collect_from_args(args: argparse.Namespace) -> "TrajectoryStore":
    """Run :func:`collect_trajectory` from parsed ``add_collect_arguments`` options.

    Option values are parsed here and checked (with the data, checkpoints and model source) by
    :func:`collect_trajectory` before anything loads; mistakes raise :class:`InputError`.
    """
    from .collect.data import ExampleFormat
    from .collect.distributed import collect_distributed, is_main_process
    from .collect.warmup import LoraSettings, WarmupDidNotLearnWarning, WarmupSettings

    shards = _csv(args.shards, int, "--shards", "0,2,5")
    learning_rates = _csv(args.learning_rates, float, "--learning-rates", "2e-5,1e-5")
    targets = _csv(args.lora_targets, str, "--lora-targets", "q_proj,v_proj") if args.lora_targets else None
    lora = None if args.full_finetune else LoraSettings(
        r=args.lora_r, alpha=args.lora_alpha, target_modules=tuple(targets) if targets else None)
    warmup = WarmupSettings(fraction=args.warmup_fraction, epochs=args.warmup_epochs, learning_rate=args.warmup_lr,
                            batch_size=args.warmup_batch_size, seed=args.warmup_seed, lora=lora)
    fmt = ExampleFormat(id_field=args.id_field, messages_field=args.messages_field, prompt_field=args.prompt_field,
                        response_field=args.response_field, text_field=args.text_field, label_field=args.label_field,
                        use_chat_template=not args.no_chat_template)
    started = time.perf_counter()
    # under torchrun (WORLD_SIZE > 1) every rank fills its share of one store; else collect_trajectory
    with _warmup_warnings_as_lines(WarmupDidNotLearnWarning):  # one line, on rank 0 only
        store = collect_distributed(
            args.model, args.data, args.out, tokenizer=args.tokenizer, task=args.task, checkpoints=args.checkpoints,
            learning_rates=learning_rates, warmup=warmup, gradient_type=args.gradient_type, d=args.d,
            seed=args.seed, seed_mode="shared" if args.shared_seed else "per_checkpoint", kind=args.kind,
            normalise=not args.no_normalise, apply_checkpoint_weights=not args.no_checkpoint_weights, dtype=args.dtype,
            batch_size=args.batch_size, shard_size=args.shard_size, max_length=args.max_length, fmt=fmt, device=args.device,
            model_dtype=args.model_dtype, vmap_chunk_size=args.vmap_chunk_size, backend=args.backend,
            projection_cache_mb=args.projection_cache_mb,
            resume=not args.no_resume, progress=not args.quiet, shards=shards,
        )
    if not args.quiet and is_main_process():
        state = "complete" if store.manifest["complete"] else "incomplete (other shards pending)"
        print(f"store {store.path}: N={store.n} T={store.t} d={store.d} {store.dtype} {state} "
              f"in {time.perf_counter() - started:.1f} s")
    return store


@contextlib.contextmanager
def _warmup_warnings_as_lines(category: type[Warning]) -> Iterator[None]:
    """Show warnings of ``category`` as one ``gtp: warning: ...`` line on stderr (the others as
    Python shows them). The collection warns on rank 0 only, so a torchrun launch shows it once."""
    shown = warnings.showwarning

    def show(message, kind, filename, lineno, file=None, line=None):
        if issubclass(kind, category):
            print(f"gtp: warning: {message}", file=sys.stderr, flush=True)
        else:
            shown(message, kind, filename, lineno, file, line)

    with warnings.catch_warnings():  # restores showwarning; the filters (-W, PYTHONWARNINGS) still apply
        warnings.showwarning = show
        yield


def _add_less_select(sub) -> None:
    # gtp less-select lives in integrations/less.py (LESS's folders in, LESS's files out)
    from .integrations.less import add_less_select_parser

    add_less_select_parser(sub)


def _add_to_dataset(sub) -> None:
    # gtp to-dataset lives in integrations/hf_datasets.py (the selection as a Hugging Face dataset)
    from .integrations.hf_datasets import add_to_dataset_parser

    add_to_dataset_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="gtp", description="Training-data selection by Gradient Trajectory Pursuit")
    parser.add_argument("--version", action="version", version=f"gtp (gtp_kernels) {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_select(sub)
    _add_collect(sub)
    _add_less_select(sub)
    _add_to_dataset(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.summary_argv = ["gtp", *argv]  # recorded in summary.json
    try:
        return args.func(args)
    except (InputError, StoreError) as exc:
        print(f"gtp: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment: a full disk, a read-only file system, a file gone
        print(f"gtp: error: {_os_error_line(exc)}", file=sys.stderr)
        return 2


def _os_error_line(exc: OSError) -> str:
    """One line for an OSError: what failed and on which path ("No space left on device:
    /out/shard-00003.npy"), without the errno prefix and traceback."""
    if exc.strerror:
        paths = [p for p in (exc.filename, exc.filename2) if p is not None]
        return exc.strerror + (": " + " -> ".join(str(p) for p in paths) if paths else "")
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
