"""LESS round trip: select from LESS's gradient folders and write what LESS's training step reads.

LESS (princeton-nlp/LESS) stores, per checkpoint ``ckpt`` and data file ``name``, the projected
gradients in ``<grads>/<name>-ckpt<ckpt>-adam/dim<d>/`` (training data, Adam-preconditioned) and
``<grads>/<name>-ckpt<ckpt>-sgd/dim<d>/`` (a target task's validation examples), as L2-normalised
rows (``all_orig.pt``, or ``grads-*.pt`` shards). Its ``matching.py`` scores training example i
for a target task with n_sub sub-tasks (validation rows grouped in n_sub equal consecutive blocks):

    score_i = max_s  sum_t w_t * mean_{j in block s} <g_{i,t}, v_{j,t}>,     w = lr / sum(lr)

(w: the checkpoints' weights, LESS uses each epoch's average learning rate) and saves the N scores
to ``<out>/<task>/<name>_influence_score.pt``; ``write_selected_data.py`` concatenates the training
files' scores, sorts them and writes ``<out>/<task>/sorted.csv`` ("file name, index, score") and
the chosen training lines, best first, to ``<out>/<task>/top_p<percentage>.jsonl`` or
``top_num<max_samples>.jsonl``: the file LESS's fine-tuning step is given.

:func:`less_select` does the same with any selection method. ``topk`` computes LESS's score
exactly as above (float32, checkpoint by checkpoint in LESS's order) and takes the best, ties to
the first row. The GTP methods pursue the n_sub targets vbar_s = (mean_{j in s} v_{j,t})_t (one
column each, the same quantity LESS's score correlates with) with the checkpoint weights, and the
selected file lists the union of the chosen rows, largest summed weight first. The score files are
written for ``topk`` only (other methods have no per-row score). One deliberate difference: with
several training files LESS's ``write_selected_data.py`` takes the source file of a row from a
position index that is already file-specific (it picks wrong files); rows here keep their file.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..collect.less_store import LessGradients, dim_folder, read_dim_folder
from ..validation import InputError, check_int, check_real

#: sub-task counts of LESS's target tasks (matching.py); other tasks default to 1 (no grouping)
LESS_SUBTASKS = {"mmlu": 57, "bbh": 27, "tydiqa": 9}


@dataclass
class LessSelection:
    """Where less_select wrote, per target task: the selected-data file and (topk) the score files."""

    selected_files: dict
    score_files: dict
    chosen: dict  # task -> [(train file name, row index, score or weight)], best first


def find_checkpoints(grads_root: Path, name: str, optimizer: str) -> list[int]:
    """The checkpoint numbers of the ``<name>-ckpt<n>-<optimizer>`` folders under grads_root, ascending."""
    pattern = re.compile(rf"^{re.escape(name)}-ckpt(\d+)-{optimizer}$")
    if not grads_root.is_dir():
        raise InputError(f"LESS gradient folder {grads_root} does not exist")
    found = sorted(int(m.group(1)) for p in grads_root.iterdir() if p.is_dir() and (m := pattern.match(p.name)))
    if not found:
        raise InputError(f"{grads_root}: no {name}-ckpt<N>-{optimizer} folders")
    return found


def read_checkpoint_rows(grads_root: Path, name: str, ckpt: int, optimizer: str, d: int | None) -> torch.Tensor:
    """LESS's normalised rows (n, d) of one data file at one checkpoint (all_orig.pt, or the shards normalised)."""
    folder = grads_root / f"{name}-ckpt{ckpt}-{optimizer}"
    if not folder.is_dir():
        raise InputError(f"LESS gradient folder {folder} does not exist")
    rows, _ = read_dim_folder(dim_folder(folder, d), normalized=True)
    if not bool(torch.isfinite(rows).all()):
        raise InputError(f"LESS gradient folder {folder}: values are not finite (NaN/Inf)")
    return rows


def checkpoint_learning_rates(training_dir: str | os.PathLike, ckpts: Sequence[int]) -> list[float]:
    """LESS's checkpoint weights read from a Hugging Face Trainer output folder: for each checkpoint
    step c_i (ascending), the mean logged learning rate over the steps (c_{i-1}, c_i] (LESS uses each
    epoch's average learning rate; with one checkpoint per epoch this is that average).

    Reads ``trainer_state.json`` of the folder itself or of its ``checkpoint-<last>`` folder."""
    root = Path(training_dir)
    candidates = [root / "trainer_state.json", root / f"checkpoint-{max(ckpts)}" / "trainer_state.json"]
    state_file = next((p for p in candidates if p.is_file()), None)
    if state_file is None:
        raise InputError(f"--checkpoints {root}: no trainer_state.json (looked at {', '.join(map(str, candidates))})")
    try:
        history = json.loads(state_file.read_text(encoding="utf-8")).get("log_history", [])
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {state_file}: {exc}") from None
    logged = sorted((int(e["step"]), float(e["learning_rate"])) for e in history
                    if isinstance(e, dict) and "learning_rate" in e and "step" in e)
    weights, previous = [], 0
    for ckpt in sorted(ckpts):
        rates = [lr for step, lr in logged if previous < step <= ckpt]
        if not rates:
            raise InputError(f"{state_file}: no learning rate logged for steps ({previous}, {ckpt}]")
        weights.append(sum(rates) / len(rates))
        previous = ckpt
    order = {c: w for c, w in zip(sorted(ckpts), weights)}
    return [order[c] for c in ckpts]


def _normalised_weights(weights: Sequence[float], n_ckpts: int) -> list[float]:
    if len(weights) != n_ckpts:
        raise InputError(f"checkpoint weights: {len(weights)} for {n_ckpts} checkpoints")
    total = float(sum(weights))
    if not math.isfinite(total) or total <= 0 or any(not w >= 0 for w in weights):
        raise InputError(f"checkpoint weights must be non-negative with a positive sum, got {list(weights)}")
    # matching.py renormalises only when the sum is not 1; dividing by 1.0 changes nothing either way
    return [float(w) / total for w in weights] if total != 1 else [float(w) for w in weights]


def less_scores_exact(train: list[torch.Tensor], target: list[torch.Tensor], weights: Sequence[float],
                      n_sub: int) -> torch.Tensor:
    """LESS's matching score (N,) in float32, checkpoint by checkpoint as matching.py accumulates it."""
    score = None
    for w, a, v in zip(weights, train, target):
        term = w * (a.float() @ v.float().T)
        score = term if score is None else score + term
    return score.reshape(score.shape[0], n_sub, -1).mean(-1).max(-1)[0]


def _count_lines(path: Path) -> list[str]:
    with open(path, "r", encoding="utf-8", errors="ignore") as handle:
        return handle.readlines()


def less_select(grads_root: str | os.PathLike, train_file_names: Sequence[str], train_files: Sequence[str],
                target_task_names: Sequence[str], output_path: str | os.PathLike, *, method: str = "topk",
                max_samples: int | None = None, percentage: float | None = None,
                ckpts: Sequence[int] | None = None, checkpoint_weights: Sequence[float] | None = None,
                training_dir: str | os.PathLike | None = None, d: int | None = None,
                n_subtasks: int | None = None, device: str | None = None, **select_options) -> LessSelection:
    """Select from LESS's gradient folders and write LESS's outputs (see the module docstring).

    Exactly one of max_samples / percentage (LESS's --max_samples / --percentage); the checkpoint
    weights come from ``checkpoint_weights`` or are read from ``training_dir`` (trainer_state.json).
    Everything is read and checked before anything is written; each output file is written
    atomically.
    """
    from ..api import METHODS
    from ..atomic import atomic_write_files
    from ..collect.store_selection import select_from_stores

    if method not in METHODS:
        raise InputError(f"--method: unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if len(train_file_names) != len(train_files) or not train_files:
        raise InputError(f"{len(train_file_names)} train file names for {len(train_files)} train files")
    if (max_samples is None) == (percentage is None):
        raise InputError("give exactly one of --max-samples and --percentage")
    if max_samples is not None:
        max_samples = check_int(max_samples, "--max-samples", low=1)
    if percentage is not None and not 0 < check_real(percentage, "--percentage") <= 1:
        raise InputError(f"--percentage must lie in (0, 1], got {percentage}")
    root = Path(grads_root)
    if ckpts is None:
        ckpts = find_checkpoints(root, train_file_names[0], "adam")
    ckpts = [int(c) for c in ckpts]
    if checkpoint_weights is None:
        if training_dir is None:
            raise InputError("give the checkpoint weights or the training folder to read learning rates from")
        checkpoint_weights = checkpoint_learning_rates(training_dir, ckpts)
    weights = _normalised_weights(checkpoint_weights, len(ckpts))

    train = [[read_checkpoint_rows(root, name, c, "adam", d) for c in ckpts] for name in train_file_names]
    sizes = [blocks[0].shape[0] for blocks in train]
    for name, blocks in zip(train_file_names, train):
        if len({tuple(b.shape) for b in blocks}) != 1:
            raise InputError(f"{name}: checkpoints disagree on (n, d): {[tuple(b.shape) for b in blocks]}")
    lines = []
    for path, name, n in zip(train_files, train_file_names, sizes):
        file_lines = _count_lines(Path(path)) if Path(path).is_file() else None
        if file_lines is None:
            raise InputError(f"train file {path} not found")
        if len(file_lines) < n:
            raise InputError(f"train file {path} has {len(file_lines)} lines but {name}'s gradients have {n} rows")
        lines.append(file_lines[:n])
    total = sum(sizes)
    budget = max_samples if max_samples is not None else int(percentage * total)
    if not 1 <= budget <= total:
        raise InputError(f"the budget is {budget} examples, the pool holds {total}")
    amount_name = f"p{percentage}" if percentage is not None else f"num{max_samples}"
    row_file = [i for i, n in enumerate(sizes) for _ in range(n)]
    row_index = [j for n in sizes for j in range(n)]

    out = Path(output_path)
    result = LessSelection({}, {}, {})
    for task in target_task_names:
        target = [read_checkpoint_rows(root, task, c, "sgd", d) for c in ckpts]
        n_sub = n_subtasks if n_subtasks is not None else LESS_SUBTASKS.get(task, 1)
        if target[0].shape[0] % n_sub:
            raise InputError(f"{task}: {target[0].shape[0]} validation rows do not split into {n_sub} sub-tasks")
        if target[0].shape[1] != train[0][0].shape[1]:
            raise InputError(f"{task}: d={target[0].shape[1]} but the training gradients have d={train[0][0].shape[1]}")
        files = {}
        if method == "topk":
            per_file = [less_scores_exact(blocks, target, weights, n_sub) for blocks in train]
            for name, scores in zip(train_file_names, per_file):
                path = out / task / f"{name}_influence_score.pt"
                files[path] = _tensor_bytes(scores)
                result.score_files.setdefault(task, []).append(path)
            scores = torch.cat(per_file)
            order = torch.sort(scores, descending=True, stable=True).indices  # ties: first row first
            ranked = [(row_file[i], row_index[i], float(scores[i])) for i in order.tolist()]
            files[out / task / "sorted.csv"] = ("file name, index, score\n" + "".join(
                f"{train_file_names[f]}, {j}, {round(s, 6)}\n" for f, j, s in ranked)).encode("utf-8")
            chosen = ranked[:budget]
        else:
            # (N, T, d) candidates; one target column per sub-task: the mean validation row, per checkpoint
            candidates = torch.stack([torch.cat([blocks[t] for blocks in train]) for t in range(len(ckpts))], 1)
            columns = torch.stack([v.reshape(n_sub, -1, v.shape[1]).mean(1) for v in target], 1)  # (n_sub, T, d)
            reader = LessGradients(candidates, [f"ckpt{c}" for c in ckpts], [], True, path=root, weights=weights)
            sel = select_from_stores(reader, columns.reshape(n_sub, -1).T.contiguous(), budget, method=method,
                                     device=device, **select_options)
            pairs = sorted(zip(sel.indices.tolist(), sel.weights.tolist()), key=lambda p: (-p[1], p[0]))
            chosen = [(row_file[i], row_index[i], w) for i, w in pairs][:budget]
        selected = out / task / f"top_{amount_name}.jsonl"
        files[selected] = "".join(lines[f][j] for f, j, _ in chosen).encode("utf-8")
        atomic_write_files(files)
        result.selected_files[task] = selected
        result.chosen[task] = [(train_file_names[f], j, s) for f, j, s in chosen]
    return result


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(tensor.cpu(), buffer)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# gtp less-select (kept here, not in cli.py's select path: cli.py only registers the subcommand)


def add_less_select_parser(sub) -> None:
    p = sub.add_parser(
        "less-select", help="select from LESS's gradient folders and write LESS's selected-data files",
        description="Read LESS's gradient folders (<grads>/<name>-ckpt<N>-adam|sgd/dim<d>/), select with any "
                    "method, and write LESS's outputs under OUT/<task>/: <name>_influence_score.pt and sorted.csv "
                    "(topk, as matching.py and write_selected_data.py) and top_p<P>.jsonl / top_num<K>.jsonl, "
                    "the training lines LESS's fine-tuning step reads.")
    p.add_argument("--grads", required=True, help="LESS's gradient folder (holding <name>-ckpt<N>-<adam|sgd>)")
    p.add_argument("--train-file-names", nargs="+", required=True, help="names of the training gradient folders")
    p.add_argument("--train-files", nargs="+", required=True, help="the training JSON lines files, in that order")
    p.add_argument("--target-task-names", nargs="+", required=True, help="target tasks (validation gradients)")
    p.add_argument("--out", required=True, help="output folder (LESS's --output_path)")
    p.add_argument("--method", default="topk", help="selection method (default: topk, LESS's own)")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--max-samples", type=int, default=None)
    amount.add_argument("--percentage", type=float, default=None)
    p.add_argument("--ckpts", type=int, nargs="+", default=None, help="checkpoint numbers (default: all found)")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint-weights", type=float, nargs="+", default=None,
                         help="per-checkpoint weights (LESS: each epoch's average learning rate)")
    weights.add_argument("--checkpoints", default=None, metavar="TRAINING_DIR",
                         help="the warm-up training's output folder: learning rates read from trainer_state.json")
    p.add_argument("--d", type=int, default=None, help="projection dimension (when several dim<d> folders exist)")
    p.add_argument("--n-subtasks", type=int, default=None,
                   help="validation sub-task count (default: LESS's table, mmlu 57, bbh 27, tydiqa 9, else 1)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=run_less_select)


def run_less_select(args) -> int:
    result = less_select(args.grads, args.train_file_names, args.train_files, args.target_task_names, args.out,
                         method=args.method, max_samples=args.max_samples, percentage=args.percentage,
                         ckpts=args.ckpts, checkpoint_weights=args.checkpoint_weights, training_dir=args.checkpoints,
                         d=args.d, n_subtasks=args.n_subtasks, device=args.device)
    for task, path in result.selected_files.items():
        print(f"{task}: wrote {len(result.chosen[task])} selected examples to {path}")
    return 0
