"""The one call: ``select(candidates, target, k, method=...)``, and its result type.

Methods plug in through :data:`METHODS` (name -> :class:`MethodSpec`); faster backends add
entries there and never change ``select``'s signature.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .selection.baselines import random_selection, topk_less
from .selection.common import SelectOptions, Selection, TargetSelection, selection_timings, weighted_norm
from .selection.cosamp import gtp_cosamp
from .selection.fill import fill_budget
from .selection.joint import TARGET_MODES, fill_joint, run_joint
from .selection.prepare import prepare
from .selection.pursuit import gtp_pursuit
from .selection.reference import gtp_reference, nnls_on_support
from .selection.rows import gather_rows
from .validation import ArrayLike, CandidatesLike, InputError, Problem, check_choice, check_number, validate_problem

MethodFn = Callable[[Problem, int, SelectOptions, Optional[Callable[[int], None]]], List[TargetSelection]]


@dataclass(frozen=True)
class MethodSpec:
    """A selection method: how to run it and what it promises."""

    name: str
    run: MethodFn
    summary: str
    exact: bool  # selects exactly what gtp-reference selects (same indices, same order)
    # weights are the fit's coefficients (they scale with the target); False: scores or ones
    fit_weights: bool = True
    # compares checkpoint blocks by cosine, so scales built into the blocks cancel: a store whose
    # rows carry sqrt(w_t) must still pass w_t (TrajectoryStore.weights_for)
    block_scale_invariant: bool = False


_REGISTRY: Dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> None:
    """Add a selection method under its name (used by the package's own backends)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


METHODS: Mapping[str, MethodSpec] = MappingProxyType(_REGISTRY)
"""Every selection method by name: ``{name: MethodSpec}`` (read-only)."""

register_method(MethodSpec(
    "gtp", gtp_pursuit,
    "exact GTP pursuit on the fused kernels (cached correlations, batched targets): fastest exact",
    exact=True))
register_method(MethodSpec(
    "gtp-cosamp", gtp_cosamp,
    "GTP by compressive sampling: pursuit inside each pass's top-ranked sample while no unsampled row is likely to be better; about k/12 passes",
    exact=False))
register_method(MethodSpec(
    "gtp-reference", gtp_reference,
    "GTP pursuit in plain PyTorch (a fresh torch.linalg solve per step): the reference", exact=True))
register_method(MethodSpec(
    "topk", topk_less, "top-k by the LESS score (checkpoint-weighted cosine with the target)", exact=False,
    fit_weights=False, block_scale_invariant=True))
register_method(MethodSpec("random", random_selection, "uniformly random eligible rows (seeded)", exact=False,
                           fit_weights=False))

DEFAULT_METHOD = "gtp"


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="atom", leave=False)
    return bar, bar.update


def _run_method(spec: MethodSpec, problem: Problem, k: int, opts: SelectOptions,
                joint: bool = False) -> List[TargetSelection]:
    """spec.run (or the joint selection of selection/joint.py) on the prepared problem, under a
    progress bar when opts.progress."""
    # joint: k rows in all, one tick each; otherwise k per target column
    bar, tick = _progress_bar(opts.progress, k if joint else k * problem.num_targets, spec.name)
    try:
        per_target = run_joint(spec.name, problem, k, opts, tick) if joint else spec.run(problem, k, opts, tick)
        if bar is not None:  # methods that pick at once (top-k, random) tick nothing on the way
            bar.update(max(0, bar.total - bar.n))
    finally:
        if bar is not None:
            bar.close()
    return per_target


def _screened_rows(problem: Problem) -> tuple:
    """The problem on its selectable rows alone, gathered in row order, and (M,) the pool row of
    each. After a screen these are about screen * k rows: every method and the fill run on
    them, not on N (a selectable row's values, and the order of rows, are unchanged, so the
    picks are those on the whole pool with the others excluded)."""
    rows = torch.nonzero(~problem.exclude).flatten()
    A = gather_rows(problem.candidates, rows)  # exclude lives on the candidates' device
    excl = torch.zeros(rows.numel(), dtype=torch.bool, device=problem.exclude.device)
    return (Problem(A, problem.targets, problem.num_checkpoints, problem.checkpoint_dim, problem.checkpoint_weights,
                    excl), rows.cpu().numpy())


def select(
    candidates: CandidatesLike,
    target: ArrayLike,
    k: int,
    *,
    method: Optional[str] = None,
    checkpoint_weights: Optional[Union[ArrayLike, Sequence[float]]] = None,
    num_checkpoints: Optional[int] = None,
    exclude: Optional[ArrayLike] = None,
    positive: bool = True,
    ridge: float = 0.0,
    tol: float = 1e-6,
    min_cosine: Optional[float] = None,
    align_threshold: Optional[float] = None,
    screen: Optional[float] = None,
    stop_ratio: Optional[float] = None,
    max_iters: Optional[int] = None,
    batch_size: Optional[int] = None,
    topk_reduce: str = "column",
    fill: Optional[str] = None,
    targets: str = "columns",
    seed: int = 0,
    compute_dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    backend: str = "auto",
    progress: bool = False,
) -> Selection:
    """Select at most k candidates whose non-negative combination matches the target.

    Solves (SPEC) min_w ||b - A^T w||_W^2 + ridge ||w||^2 s.t. w >= 0, ||w||_0 <= k for each
    target column b, with ||x||_W^2 = sum_t lr_t ||x^t||^2 over checkpoint blocks.

    Args:
        candidates: A, (N, D) rows, or an (N, T, d) trajectory; torch or numpy, any float dtype.
            Or rows in blocks, read a chunk at a time and never concatenated: a trajectory
            store (its memory-mapped shards), a list of arrays, or a selection.rows.RowSource.
        target: b, (D,), or (D, m) for m targets pursued together.
        k: budget per target column for every method, 1 <= k <= N (m targets: up to m * k rows
            in the union; ``Selection.row_targets`` says which columns each row serves).
        method: a name in METHODS (default: the fastest exact GTP method).
        checkpoint_weights: (T,) lr_t per checkpoint (None: unweighted).
        num_checkpoints: T when candidates are flat (N, T*d).
        exclude: rows that may never be selected: a bool mask of length N (array, tensor or
            list of bools) or integer row indices.
        positive: non-negative weights (off: plain orthogonal matching pursuit).
        ridge: lambda.
        tol: stop when the relative residual falls below tol (or reaches the rounding floor,
            stopped_by "residual_floor", with an EarlyStopWarning: see README "The algorithm").
        min_cosine: stop when the best candidate's cosine with the residual is at most this.
        align_threshold: guard: exclude candidates whose cosine with every target column is at
            or below this (e.g. 0.0 keeps only positively aligned candidates).
        screen: candidate screen (a number >= 1; None: off): before the method runs, keep as
            candidates only the rows ranked best by cosine with some target column, the union
            of every column's r best rows for the smallest r that keeps ceil(screen * K) rows
            (K = k with ``targets="joint"``, k * m otherwise; see selection/prepare.py
            exclude_unscreened). Against residual-chasing: without it pursuit's later picks fit
            what typical rows leave of the residual, often with atypical (mislabelled) rows.
            ``params["screened_out"]`` counts the rows it excluded. The method and the fill then
            run on the screened rows alone (gathered; the same picks as on the whole pool with
            the others excluded), so a screened selection costs one pass over N plus a method
            on about screen * K rows.
        stop_ratio: guard: stop once the best correlation is below stop_ratio times the first.
        max_iters: iteration cap (default 2k + 10).
        batch_size: compressive sampling's candidates per pass (default: adaptive, from N/12).
        topk_reduce: top-k with m target columns: "column" (default), each column's k best by
            its own LESS score, as LESS selects per task; "mean" or "max", one ranking by the
            columns' mean (LESS over a task's validation examples) or max score, whose k best
            serve every column.
        fill: when a target's method stops before k rows, top its selection up to k with the
            best remaining candidates by this score (rows marked ``filled``, weight 0, never a
            near-copy of a row already chosen; see selection/fill.py): "target" (cosine with
            the target column) or "residual" (cosine with the final residual: what pursuit
            would take next). None (default): the method's rows only.
        targets: "columns" (default): each target column its own k rows, as above. "joint": one
            selection of k rows in all shared by every column, for a (D, m) target of m target
            examples: joint non-negative pursuit on unit-norm columns for "gtp" (and its picks
            from a few passes for "gtp-cosamp"), one ranking by
            the columns' mean (or ``topk_reduce="max"``) LESS score for "topk", k random rows
            for "random" (see selection/joint.py); ``weights`` is then the mean over columns
            of each column's weights for its unit-norm target.
        seed: for random selection (an integer >= 0).
        compute_dtype: torch.float32 or torch.float64 (default: float64 for float64 input).
            In float32 the candidates' row norms must lie within 2^-50..2^50 (float64:
            2^-400..2^400); targets may have
            any magnitude (each column is scaled by a power of two inside, exactly).
        device: move the candidates there first (e.g. "cuda").
        backend: kernels for the N-sized products: "auto" (the Triton kernels on CUDA, the
            compiled row-products kernel on CPU), "triton" or "torch".
        progress: show a progress bar.

    Raises:
        InputError (a ValueError; InputTypeError also a TypeError) before any work, for bad
        shapes, dtypes, NaN/Inf, a budget outside 1..N, no selectable row, bad options.
    """
    t0 = time.perf_counter()
    name = DEFAULT_METHOD if method is None else method
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    targets = check_choice(targets, "targets", TARGET_MODES)
    prepared = prepare(candidates, target, k, checkpoint_weights=checkpoint_weights,
                       num_checkpoints=num_checkpoints, exclude=exclude, device=device,
                       compute_dtype=compute_dtype, ridge=ridge, tol=tol, min_cosine=min_cosine,
                       align_threshold=align_threshold, screen=screen, stop_ratio=stop_ratio, backend=backend,
                       max_iters=max_iters, topk_reduce=topk_reduce, fill=fill, positive=positive,
                       progress=progress, batch_size=batch_size, seed=seed, joint=targets == "joint")
    k = int(k)  # numpy integers too
    problem, opts = prepared.problem, prepared.options
    t1 = time.perf_counter()
    spec = METHODS[name]
    kept = None
    if prepared.screened_out:  # the method and the fill run on the screened rows alone
        problem, kept = _screened_rows(problem)
    per_target = _run_method(spec, problem, k, opts, joint=targets == "joint")
    t_fill = time.perf_counter()
    fill = prepared.checked["fill"]
    if fill is not None:  # on the scaled problem, whose weights per_target holds
        per_target = (fill_joint if targets == "joint" else fill_budget)(
            problem, per_target, k, fill, positive=opts.positive, dtype=prepared.compute_dtype)
    if kept is not None:  # pool rows again; passes in reads of the pool: the screen's one, then the method's
        share = len(kept) / prepared.problem.num_candidates
        per_target = [dataclasses.replace(ts, indices=kept[ts.indices], passes=1.0 + ts.passes * share)
                      for ts in per_target]
    per_target = prepared.finish(per_target, k, spec.fit_weights)  # EarlyStopWarning: rounding floor or dependence
    t2 = time.perf_counter()
    prepared.checked["targets"] = targets
    params = prepared.params(SELECT_PARAMS)
    timings = selection_timings(t0, t1, t2, fill_s=t2 - t_fill if fill is not None else 0.0)
    return Selection(name, k, tuple(per_target), params, timings, fit_weights=spec.fit_weights, targets=targets)


# the options a Selection from select() reports in its params, in this order
SELECT_PARAMS = ("positive", "ridge", "tol", "min_cosine", "align_threshold", "screen", "stop_ratio", "max_iters",
                 "batch_size", "topk_reduce", "fill", "targets", "seed")


def fit_residual(
    candidates: CandidatesLike,
    target: ArrayLike,
    indices: Sequence[int],
    *,
    checkpoint_weights: Optional[Sequence[float]] = None,
    num_checkpoints: Optional[int] = None,
    ridge: float = 0.0,
) -> float:
    """Relative residual ||b - A_S^T w||_W / ||b||_W of the best non-negative fit on the rows S.

    Puts any selection (top-k, random, GTP) on the same footing; max over target columns.
    """
    ridge = check_number(ridge, "ridge", low=0.0)
    # the fit is computed in float64: no float32 range to respect, and any rows may be given
    problem = validate_problem(candidates, target, 1, checkpoint_weights=checkpoint_weights,
                               num_checkpoints=num_checkpoints, compute_dtype=torch.float64,
                               require_selectable=False)
    fw = problem.feature_weights(torch.float64)
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    raw = np.asarray(indices)
    # bools are not row indices: numpy reads [True, 1] as [1, 1] and a mask as rows 0 and 1
    listed = indices if isinstance(indices, (list, tuple)) else ()
    if raw.size and (raw.dtype == bool or any(isinstance(e, (bool, np.bool_)) for e in listed)):
        raise InputError("indices must be integer row indices, got bools (for a mask, pass np.flatnonzero(mask))")
    if raw.size and raw.dtype.kind not in "iu":
        raise InputError(f"indices must be integers, got dtype {raw.dtype}")
    idx = torch.as_tensor(raw.astype(np.int64).reshape(-1))
    n = problem.num_candidates
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise InputError(f"indices must lie in [0, {n}), got values from {int(idx.min())} to {int(idx.max())}")
    worst = 0.0
    for t in range(problem.num_targets):
        b = problem.targets[:, t].to(torch.float64)
        if idx.numel() == 0:
            return 1.0
        _, r = nnls_on_support(problem.candidates, b, idx, feature_weights=fw, ridge=ridge)
        worst = max(worst, float(weighted_norm(r, fw) / weighted_norm(b, fw)))
    return worst
