"""The one call: ``select(candidates, target, k, method=...)``, and its result type.

Methods plug in through :data:`METHODS` (name -> :class:`MethodSpec`); faster backends add
entries there and never change ``select``'s signature.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .selection.baselines import TOPK_REDUCE, random_selection, topk_less
from .selection.cosamp import gtp_cosamp
from .selection.fill import FILL_SCORES, fill_budget
from .selection.joint import TARGET_MODES, fill_joint, run_joint
from .selection.pursuit import gtp_pursuit
from .selection.common import SelectOptions, TargetSelection, warn_early_stops
from .selection.reference import gtp_reference, nnls_on_support, weighted_norm
from .selection.rows import row_chunks
from .validation import (SEED_LIMIT, ArrayLike, CandidatesLike, InputError, Problem, check_backend, check_bool,
                         check_choice, check_int, resolve_device, validate_problem)

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


@dataclass(frozen=True)
class Selection:
    """The result of :func:`select`.

    The budget k holds per target column for every method. For one target (m = 1)
    ``indices``, ``weights`` and ``residual_norms`` are that target's. For m > 1 targets
    ``indices`` is the union of the targets' selections (up to m * k rows): first the rows some
    target chose itself, in order of first selection, then the rows only filling added;
    ``weights`` the sum of the weights each target gave a row (for ``topk`` and ``random``,
    whose weights are scores or ones, the largest), ``residual_norms`` an (iterations + 1, m)
    array (rows past a target's stop repeat its last value), ``row_targets`` the target columns
    each row serves; ``per_target`` keeps each target's own result.

    With ``targets="joint"`` k is the budget in all: every column's result lists the same rows
    (the shared selection), each with that column's own weights (0 where its fit does not use
    the row), and ``weights`` is the mean over columns of w_j / ||b_j||_W (selection/joint.py).

    ``weights`` are the non-negative least-squares coefficients w of b ~ A_S^T w for the GTP
    methods; for ``topk`` they are the LESS scores of the chosen rows (cosines, possibly
    negative), for ``random`` ones (see ``METHODS[name].fit_weights``). Rows added by
    ``fill`` have weight 0 and are flagged by ``filled``.
    """

    method: str
    k: int
    per_target: tuple
    params: Dict[str, Any]
    timings: Dict[str, float]
    targets: str = "columns"  # "joint": k rows in all, shared by every column (selection/joint.py)

    @property
    def num_targets(self) -> int:
        return len(self.per_target)

    def _union(self) -> Dict[int, List[int]]:
        """{row: [target columns it serves]} in union order: pursued rows first, then filled."""
        rows: Dict[int, List[int]] = {}
        for part in ("pursued", "filled"):
            for column, ts in enumerate(self.per_target):
                chosen = ts.indices[: ts.num_pursued] if part == "pursued" else ts.indices[ts.num_pursued:]
                for i in chosen.tolist():
                    rows.setdefault(i, []).append(column)
        return rows

    @property
    def indices(self) -> np.ndarray:
        if len(self.per_target) == 1:
            return self.per_target[0].indices
        union = self._union()
        return np.fromiter(union.keys(), dtype=np.int64, count=len(union))

    @property
    def weights(self) -> np.ndarray:
        if len(self.per_target) == 1 and self.targets != "joint":
            return self.per_target[0].weights
        spec = METHODS.get(self.method)
        add = spec is None or spec.fit_weights  # scores and ones are not summed: the best one
        total: Dict[int, float] = {}
        joint = add and self.targets == "joint"  # the mean over columns of w_j / ||b_j||_W
        for ts in self.per_target:
            scale = len(self.per_target) * float(ts.residual_norms[0]) if joint else 1.0
            for i, w in zip(ts.indices.tolist(), ts.weights.tolist()):
                total[i] = (total.get(i, 0.0) + w / scale) if add else max(total.get(i, -float("inf")), w)
        return np.asarray([total[i] for i in self.indices.tolist()], dtype=np.float64)

    @property
    def row_targets(self) -> List[tuple]:
        """For each row of ``indices``, the target columns (0-based, increasing) whose selection
        holds it, pursued or filled."""
        return [tuple(sorted(cols)) for cols in self._union().values()]

    @property
    def filled(self) -> np.ndarray:
        """For each row of ``indices``: True when only filling added it (no target's method
        chose it; weight 0)."""
        pursued = set()
        for ts in self.per_target:
            pursued.update(ts.indices[: ts.num_pursued].tolist())
        return np.asarray([i not in pursued for i in self.indices.tolist()], dtype=bool)

    @property
    def num_filled(self) -> int:
        """Rows of ``indices`` that only filling added."""
        return int(self.filled.sum())

    @property
    def num_pursued(self) -> int:
        """Rows of ``indices`` that some target's method chose itself."""
        return int(len(self.indices) - self.num_filled)

    @property
    def residual_norms(self) -> np.ndarray:
        if len(self.per_target) == 1:
            return self.per_target[0].residual_norms
        length = max(len(ts.residual_norms) for ts in self.per_target)
        if length == 0:
            return np.zeros((0, len(self.per_target)))
        cols = [np.pad(ts.residual_norms, (0, length - len(ts.residual_norms)), mode="edge")
                for ts in self.per_target]
        return np.stack(cols, axis=1)

    @property
    def relative_residual(self) -> Optional[float]:
        """max over targets of ||r||_W / ||b||_W at the end (None for non-pursuit methods)."""
        vals = [ts.residual_norms[-1] / ts.residual_norms[0] for ts in self.per_target if len(ts.residual_norms)]
        return max(vals) if vals else None

    def records(self, ids: Optional[Sequence[Any]] = None) -> List[Dict[str, Any]]:
        """One dict per selected example: rank, index, weight, targets (the target columns it
        serves), filled (added only by filling the budget), and id when ids are given."""
        out = []
        rows = zip(self.indices.tolist(), self.weights.tolist(), self.row_targets, self.filled.tolist())
        for rank, (i, w, columns, filled) in enumerate(rows):
            rec: Dict[str, Any] = {"rank": rank, "index": int(i), "weight": float(w), "targets": list(columns),
                                   "filled": bool(filled)}
            if ids is not None:
                rec["id"] = ids[i]
            out.append(rec)
        return out

    def summary(self) -> Dict[str, Any]:
        """JSON-ready description: method, parameters, timings, per-target outcome."""
        return {
            "method": self.method,
            "k": self.k,  # per target column
            "num_targets": self.num_targets,
            "selected": int(len(self.indices)),  # the union over targets: up to num_targets * k
            "pursued": self.num_pursued,  # rows of the union some target's method chose
            "filled": self.num_filled,  # rows of the union only filling added (weight 0)
            "relative_residual": self.relative_residual,
            "params": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in self.params.items()},
            "timings_s": self.timings,
            "targets": [
                {
                    "selected": int(len(ts.indices)),
                    "pursued": ts.num_pursued,
                    "filled": ts.filled,
                    "stopped_by": ts.stopped_by,
                    "iterations": ts.iterations,
                    "rejected": ts.rejected,
                    "dropped": ts.dropped,
                    "passes_over_candidates": ts.passes,
                    "residual_norm_first": float(ts.residual_norms[0]) if len(ts.residual_norms) else None,
                    "residual_norm_last": float(ts.residual_norms[-1]) if len(ts.residual_norms) else None,
                }
                for ts in self.per_target
            ],
        }

    def __repr__(self) -> str:
        rel = self.relative_residual
        rel_s = "n/a" if rel is None else f"{rel:.4g}"
        k_s = (f"k={self.k}" if self.num_targets == 1 else f"k={self.k} per target") if self.targets != "joint" \
            else f"k={self.k} in all, joint"
        filled = f" ({self.num_filled} filled)" if self.num_filled else ""
        return (f"Selection(method={self.method!r}, {k_s}, selected={len(self.indices)}{filled}, "
                f"targets={self.num_targets}, relative_residual={rel_s}, "
                f"time={self.timings.get('total_s', float('nan')):.3g}s)")


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
            examples: joint non-negative pursuit on unit-norm columns for "gtp", one ranking by
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
    common = check_pursuit_options(compute_dtype=compute_dtype, ridge=ridge, tol=tol, min_cosine=min_cosine,
                                   align_threshold=align_threshold, stop_ratio=stop_ratio, backend=backend,
                                   max_iters=max_iters)
    ridge, tol, min_cosine, align_threshold, stop_ratio, max_iters = (
        common[name] for name in ("ridge", "tol", "min_cosine", "align_threshold", "stop_ratio", "max_iters"))
    if not isinstance(topk_reduce, str) or topk_reduce not in TOPK_REDUCE:
        raise InputError(f"topk_reduce must be 'mean' or 'max' (one ranking for every column) or 'column' "
                         f"(each column its own), got {topk_reduce!r}")
    if fill is not None and (not isinstance(fill, str) or fill not in FILL_SCORES):
        raise InputError(f"fill must be None, {' or '.join(repr(f) for f in FILL_SCORES)}, got {fill!r}")
    positive = check_bool(positive, "positive")
    progress = check_bool(progress, "progress")
    targets = check_choice(targets, "targets", TARGET_MODES)
    if batch_size is not None and not _is_integer(batch_size):
        raise InputError(f"batch_size must be an integer, got {batch_size!r}")
    seed = check_int(seed, "seed", low=0, high=SEED_LIMIT - 1)
    if batch_size is not None and batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    dev = None if device is None else resolve_device(device, "device")

    problem = validate_problem(candidates, target, k, checkpoint_weights=checkpoint_weights,
                               num_checkpoints=num_checkpoints, exclude=exclude, compute_dtype=compute_dtype)
    k = int(k)  # numpy integers too
    check_backend(backend, problem.candidates.device if dev is None else dev)
    if dev is not None:
        problem = Problem(problem.candidates.to(dev), problem.targets.to(dev), problem.num_checkpoints,
                          problem.checkpoint_dim, problem.checkpoint_weights, problem.exclude.to(dev))
    # targets and checkpoint weights scaled by powers of two (exact, picks unchanged): float32
    # products of huge or tiny targets and weights stay in range
    user_weights = problem.checkpoint_weights  # reported as given
    problem, scaling = scale_problem(problem)
    guard_excluded = 0
    if align_threshold is not None:
        problem, guard_excluded = _exclude_misaligned(problem, float(align_threshold))
        if int((~problem.exclude).sum()) == 0:
            raise InputError(f"align_threshold={align_threshold} excludes every candidate")
    opts = SelectOptions(positive=bool(positive), ridge=scaling.ridge(ridge), tol=tol, min_cosine=min_cosine,
                         stop_ratio=stop_ratio, max_iters=max_iters,
                         batch_size=None if batch_size is None else int(batch_size),
                         topk_reduce=topk_reduce, seed=int(seed), compute_dtype=compute_dtype,
                         progress=progress, backend=backend)
    t1 = time.perf_counter()
    spec = METHODS[name]
    bar, tick = _progress_bar(progress, k * problem.num_targets, name)
    try:
        per_target = (run_joint(name, problem, k, opts, tick) if targets == "joint"
                      else spec.run(problem, k, opts, tick))
        if bar is not None:  # methods that pick at once (top-k, random) tick nothing on the way
            bar.update(max(0, bar.total - bar.n))
    finally:
        if bar is not None:
            bar.close()
    t_fill = time.perf_counter()
    if fill is not None:  # on the scaled problem, whose weights per_target holds
        per_target = (fill_joint if targets == "joint" else fill_budget)(
            problem, per_target, k, fill, positive=bool(positive),
            dtype=opts.resolved_compute_dtype(problem.candidates.dtype))
    per_target = scaling.undo(per_target, spec.fit_weights)
    warn_early_stops(per_target, k, tol)  # EarlyStopWarning: rounding floor or dependence
    if problem.candidates.is_cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    params = {
        "positive": positive, "ridge": ridge, "tol": tol, "min_cosine": min_cosine,
        "align_threshold": align_threshold, "guard_excluded": guard_excluded, "stop_ratio": stop_ratio,
        "max_iters": max_iters, "batch_size": batch_size, "topk_reduce": topk_reduce, "fill": fill,
        "targets": targets,
        "seed": seed, "compute_dtype": str(opts.resolved_compute_dtype(problem.candidates.dtype)),
        "num_candidates": problem.num_candidates, "dim": problem.dim, "num_targets": problem.num_targets,
        "num_checkpoints": problem.num_checkpoints,
        "checkpoint_weights": None if user_weights is None else user_weights.tolist(),
        "device": str(problem.candidates.device),
    }
    timings = {"validate_s": t1 - t0, "select_s": t2 - t1, "fill_s": t2 - t_fill if fill is not None else 0.0,
               "total_s": t2 - t0}
    return Selection(name, int(k), tuple(per_target), params, timings, targets)


def check_pursuit_options(*, compute_dtype, ridge, tol, min_cosine, align_threshold, stop_ratio, backend,
                          max_iters) -> Dict[str, Any]:
    """The checks of the options every GTP entry point shares (select, the sharded selects):
    InputError with the option's name; returns them cleaned (floats, ints)."""
    if compute_dtype not in (None, torch.float32, torch.float64):
        raise InputError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    out: Dict[str, Any] = {"ridge": _real("ridge", ridge, low=0.0), "tol": _real("tol", tol, low=0.0)}
    for name, value in (("min_cosine", min_cosine), ("align_threshold", align_threshold)):
        out[name] = None if value is None else _real(name, value, low=-1.0, high=1.0)
    out["stop_ratio"] = None if stop_ratio is None else _real("stop_ratio", stop_ratio, low=0.0)
    if out["stop_ratio"] is not None and not out["stop_ratio"] < 1:
        raise InputError(f"stop_ratio must lie in [0, 1), got {out['stop_ratio']}")
    if backend not in ("auto", "triton", "torch"):
        raise InputError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if max_iters is not None and not _is_integer(max_iters):
        raise InputError(f"max_iters must be an integer, got {max_iters!r}")
    if max_iters is not None and max_iters < 1:
        raise InputError(f"max_iters must be >= 1, got {max_iters}")
    out["max_iters"] = None if max_iters is None else int(max_iters)
    return out


def _is_integer(value: Any) -> bool:
    """An int or numpy integer, not a bool."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def _real(label: str, value: Any, low: float = -float("inf"), high: float = float("inf")) -> float:
    """A finite real number in [low, high], as float; InputError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{label} must be a number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise InputError(f"{label} must be finite and lie in [{low:g}, {high:g}], got {value}")
    return value


@dataclass(frozen=True)
class ProblemScaling:
    """The powers of two select() divides the problem by before any method runs, so that
    float32 products stay in range whatever the magnitudes: each target column by 2^e (its
    largest entry then lies in [0.5, 1)) and the checkpoint weights by c = 4^j (the largest in
    [0.25, 1)). Both are exact, and every method's picks are invariant to them: the objective
    sum_t w_t ||b^t - A^t x||^2 + lam ||x||^2 is scaled by 2^-2e / c when lam becomes lam / c,
    and the stopping rules compare ratios. Results are scaled back: fit weights by 2^e,
    residual norms ||r||_W by 2^e sqrt(c)."""

    target_scales: tuple  # 2^e per target column
    weight_scale: float = 1.0  # c

    def ridge(self, lam: float) -> float:
        """lam for the scaled problem."""
        return lam / self.weight_scale

    def undo(self, per_target, fit_weights: bool) -> list:
        """The scaled problem's results as the original problem's (exact)."""
        out = []
        norm_scale = math.sqrt(self.weight_scale)  # exact: c is a power of four
        for ts, scale in zip(per_target, self.target_scales):
            if scale != 1.0 or norm_scale != 1.0:
                ts = dataclasses.replace(ts, weights=ts.weights * scale if fit_weights else ts.weights,
                                         residual_norms=ts.residual_norms * (scale * norm_scale))
            out.append(ts)
        return out


def scale_problem(problem: Problem) -> tuple:
    """(the scaled problem, its ProblemScaling): see ProblemScaling."""
    peaks = problem.targets.abs().amax(dim=0).to(torch.float64).tolist()
    # clamped so that 2^-e stays a float64 (a subnormal peak, ~1e-310, still lands near 2^-30)
    exps = [min(1000, max(-1000, math.frexp(p)[1])) for p in peaks]
    targets = problem.targets
    if any(exps):
        factors = torch.tensor([math.ldexp(1.0, -e) for e in exps], dtype=torch.float64,
                               device=problem.targets.device)
        targets = problem.targets.to(torch.float64) * factors  # float64: the scaling is exact
    weights, weight_scale = problem.checkpoint_weights, 1.0
    if weights is not None:
        e = math.frexp(float(weights.max()))[1]
        e = min(1000, max(-1000, e + (e % 2)))  # even: c = 2^e = 4^(e/2), largest weight in [0.25, 1)
        if e:
            weight_scale = math.ldexp(1.0, e)
            weights = weights * math.ldexp(1.0, -e)
    scaled = Problem(problem.candidates, targets, problem.num_checkpoints, problem.checkpoint_dim, weights,
                     problem.exclude)
    return scaled, ProblemScaling(tuple(math.ldexp(1.0, e) for e in exps), weight_scale)


def _exclude_misaligned(problem: Problem, threshold: float) -> tuple:
    """SPEC guard: keep only candidates with cos(a_i, b) > threshold for some target column."""
    dtype = torch.float64 if problem.candidates.dtype == torch.float64 else torch.float32
    fw = problem.feature_weights(dtype)
    B = problem.targets.to(dtype)
    Bw = B if fw is None else B * fw[:, None]
    b_norms = weighted_norm(B.T, fw)
    best = torch.full((problem.num_candidates,), -float("inf"), dtype=dtype, device=B.device)
    for start, a in row_chunks(problem.candidates, 1 << 24):  # a tensor or a row source
        a = a.to(dtype)
        cos = (a @ Bw) / (weighted_norm(a, fw)[:, None].clamp_min(torch.finfo(dtype).tiny) * b_norms)
        best[start : start + a.shape[0]] = cos.amax(dim=1)
    misaligned = (best <= threshold) & ~problem.exclude
    excl = problem.exclude | misaligned
    return (Problem(problem.candidates, problem.targets, problem.num_checkpoints, problem.checkpoint_dim,
                    problem.checkpoint_weights, excl), int(misaligned.sum()))


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
    ridge = _real("ridge", ridge, low=0.0)
    # the fit is computed in float64: no float32 range to respect, and any rows may be given
    problem = validate_problem(candidates, target, 1, checkpoint_weights=checkpoint_weights,
                               num_checkpoints=num_checkpoints, compute_dtype=torch.float64,
                               require_selectable=False)
    fw = problem.feature_weights(torch.float64)
    raw = np.asarray(indices)
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
