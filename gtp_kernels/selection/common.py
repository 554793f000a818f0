"""What every selection method shares: its options, its per-target result, default tolerances,
the result type (:class:`Selection`), the exact power-of-two problem scaling, and the params and
timings a Selection reports."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import math
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from ..validation import Problem

# Why pursuit stopped, per target.
STOP_BUDGET = "budget"            # |S| reached k
STOP_TOLERANCE = "tolerance"      # ||r||_W / ||b||_W < tol
STOP_NO_CORRELATION = "no_correlation"  # best cosine(a_j, r) <= min_cosine: nothing left to add
STOP_GUARD = "guard"              # best correlation fell below stop_ratio * the first one
STOP_EXHAUSTED = "exhausted"      # no eligible candidate left
STOP_MAX_ITERS = "max_iters"      # iteration cap hit (each argmax, rejected or not, is one iteration)
STOP_RESIDUAL_FLOOR = "residual_floor"  # ||r||_W at the rounding floor (residual_floor): tol unreachable
STOP_NONE = "n/a"                 # non-iterative methods (top-k, random)


def default_min_cosine(dtype: torch.dtype) -> float:
    """Cosine below which the best candidate is taken as rounding noise and pursuit stops.

    After a least-squares update the residual is orthogonal to the selected rows only up to
    rounding (about sqrt(D) * eps relative), so duplicates of selected rows score that much.
    """
    return 1e-10 if dtype == torch.float64 else 1e-4


def default_dep_tol(dtype: torch.dtype) -> float:
    """Relative pivot^2 / (G_jj + lambda) at or below which a new atom counts as dependent.

    pivot^2 / G_jj is sin^2 of the angle between a_j and span(A_S) (lambda = 0). Whatever
    dep_tol, an atom is also dependent when pivot^2 <= eps * (sum_i |c_i| ||a_i||)^2, c its
    coefficients on the support: the rounding error of pivot^2 (see ops.lsq).
    """
    return 1e-10 if dtype == torch.float64 else 1e-5


def default_weight_tol(dtype: torch.dtype) -> float:
    """Share of the fit, w_i ||a_i||_W / ||A_S^T w||_W, at or below which the NNLS step drops an
    atom as if its weight were 0 (positive=True). In a cluster of near-duplicates the split of
    weight between the copies is decided by rounding (the Gram matrix's conditioning is squared):
    on 150 clustered pools gtp and gtp-reference kept different copies at shares of 1e-15..1e-7
    (at a threshold of 1e-9 two still differed, at 1.2e-8..7.6e-8); 1e-6 (the default tol) left
    none of 600 differing. Such rows matter nothing to the fit and are not selected."""
    return 1e-6 if dtype == torch.float64 else 1e-5


# residual floor: RESIDUAL_FLOOR_ULPS units of rounding of the residual's terms (residual_floor)
RESIDUAL_FLOOR_ULPS = 4.0


def residual_floor(dtype: torch.dtype, b_norm: float, weights: torch.Tensor, atom_norms: torch.Tensor) -> float:
    """||r||_W at or below which the residual is rounding noise: pursuit stops there (STOP_RESIDUAL_FLOOR).

    r = b - sum_i w_i a_i is computed with an error of about eps * sqrt(||b||^2 + sum_i (w_i ||a_i||)^2)
    (eps of the compute dtype); RESIDUAL_FLOOR_ULPS times that is the floor. Below it the best
    correlations are those of rounding noise, and pursuit would go on "fitting" it with rows in no
    relation to the target (tol = 0 picked 65 rows of rank 64 for a target in the span of 5).
    """
    eps = torch.finfo(dtype).eps
    spread = float(torch.dot(weights * atom_norms, weights * atom_norms)) if weights.numel() else 0.0
    return RESIDUAL_FLOOR_ULPS * eps * math.sqrt(b_norm * b_norm + spread)


def weighted_norm(x: torch.Tensor, feature_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """||x||_W along the last axis."""
    if feature_weights is None:
        return torch.linalg.vector_norm(x, dim=-1)
    return torch.sqrt((x * x * feature_weights).sum(dim=-1))


@dataclass(frozen=True)
class SelectOptions:
    """Options shared by the methods; each method reads those that apply to it.

    positive: non-negative weights (true NNLS); off gives plain OMP.
    ridge: lambda in min ||b - A^T w||_W^2 + lambda ||w||^2.
    tol: stop when ||r||_W / ||b||_W < tol.
    min_cosine: stop when the best candidate's cosine with the residual is at or below this
        (None: by compute dtype, see default_min_cosine).
    stop_ratio: guard (SPEC): stop when the best correlation falls below stop_ratio times the
        first iteration's best correlation.
    dep_tol: dependence threshold on the relative Cholesky pivot (None: by compute dtype).
    weight_tol: NNLS drops atoms whose share of the fit is at or below this (None: by compute
        dtype, see default_weight_tol; 0: keep every positive weight).
    max_iters: cap on iterations (argmax steps); None means 2k + 10. For compressive sampling
        it also caps the sampling passes (None: k).
    batch_size: compressive sampling, candidates pursued per pass (None: adaptive, starting at
        N/12 and doubling or halving with the picks a pass yields; see selection/cosamp.py).
    topk_reduce: top-k over m target columns: "column" (each column's own k best), or one ranking
        by the columns' "mean" (LESS averages over a task's examples) or "max" score.
    seed: random selection's seed.
    compute_dtype: float32 or float64 (None: float64 for float64 input, else float32).
    progress: show a progress bar on long runs.
    """

    positive: bool = True
    ridge: float = 0.0
    tol: float = 1e-6
    min_cosine: Optional[float] = None
    stop_ratio: Optional[float] = None
    dep_tol: Optional[float] = None
    weight_tol: Optional[float] = None
    max_iters: Optional[int] = None
    batch_size: Optional[int] = None
    topk_reduce: str = "column"
    seed: int = 0
    compute_dtype: Optional[torch.dtype] = None
    progress: bool = False
    backend: str = "auto"

    def resolved_compute_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return torch.float64 if input_dtype == torch.float64 else torch.float32

    def resolved_min_cosine(self, dtype: torch.dtype) -> float:
        return default_min_cosine(dtype) if self.min_cosine is None else self.min_cosine

    def resolved_dep_tol(self, dtype: torch.dtype) -> float:
        return default_dep_tol(dtype) if self.dep_tol is None else self.dep_tol

    def resolved_weight_tol(self, dtype: torch.dtype) -> float:
        return default_weight_tol(dtype) if self.weight_tol is None else self.weight_tol

    def resolved_max_iters(self, k: int) -> int:
        return 2 * k + 10 if self.max_iters is None else self.max_iters


@dataclass(frozen=True)
class TargetSelection:
    """One target's selection.

    indices: selected rows in selection order (int64).
    weights: their non-negative weights (for top-k: scores; random: zeros are never used, ones).
    residual_norms: ||r||_W after each accepted iteration, entry 0 being ||b||_W.
    stopped_by: one of the STOP_* reasons.
    iterations: argmax steps taken (rejected atoms included).
    rejected: atoms refused as numerically dependent or dropped as they entered.
    dropped: atoms removed by the NNLS active-set step after having been selected.
    passes: full reads of the candidate matrix spent on this target (shared passes counted once per target;
        after select's screen, its one read plus the method's reads of the kept rows, in reads of the pool).
    filled: how many of the rows, the last ones, were added by filling the budget (select's
        ``fill``; weight 0, not part of the fit) rather than chosen by the method.
    """

    indices: np.ndarray
    weights: np.ndarray
    residual_norms: np.ndarray
    stopped_by: str
    iterations: int = 0
    rejected: int = 0
    dropped: int = 0
    passes: float = 0.0
    filled: int = 0

    @property
    def num_pursued(self) -> int:
        """Rows chosen by the method itself (all but the filled ones)."""
        return len(self.indices) - self.filled



class EarlyStopWarning(RuntimeWarning):
    """A pursuit stopped short of its budget k for a numerical reason, not because the target was
    matched to tol: its residual reached the rounding floor (tol unreachable in the compute
    dtype), or every remaining candidate was numerically dependent on the selection. As
    scikit-learn's orthogonal_mp warns; ``stopped_by`` says the same per target."""


def warn_early_stops(per_target: Sequence[TargetSelection], k: int, tol: float, stacklevel: int = 3) -> None:
    """One EarlyStopWarning for the targets that stopped early for a numerical reason."""
    notes = []
    for t, ts in enumerate(per_target):
        if len(ts.indices) >= k:
            continue
        where = f"target {t}: " if len(per_target) > 1 else ""
        if ts.stopped_by == STOP_RESIDUAL_FLOOR:
            rel = ts.residual_norms[-1] / ts.residual_norms[0] if len(ts.residual_norms) else float("nan")
            notes.append(f"{where}the residual reached the rounding floor (relative residual {rel:.3g}) with "
                         f"{len(ts.indices)} of {k} rows; tol={tol:g} is unreachable in this precision")
        elif ts.stopped_by in (STOP_EXHAUSTED, STOP_MAX_ITERS) and ts.rejected:
            notes.append(f"{where}stopped by {ts.stopped_by} with {len(ts.indices)} of {k} rows after refusing "
                         f"{ts.rejected} candidates (linearly dependent on the selection, or weightless "
                         f"in the non-negative fit)")
    if notes:
        warnings.warn("pursuit ended early: " + "; ".join(notes), EarlyStopWarning, stacklevel=stacklevel)


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


def selection_params(options: Mapping[str, Any], keys: Sequence[str], *, guard_excluded: int,
                     screened_out: int = 0, compute_dtype: torch.dtype, problem: Problem,
                     checkpoint_weights: Optional[torch.Tensor], num_candidates: Optional[int] = None,
                     **extra: Any) -> Dict[str, Any]:
    """A Selection's ``params``: the checked options named by ``keys`` (as the user gave them:
    ridge unscaled), the guard's count after align_threshold, the screen's after screen, the
    compute dtype, the problem's sizes (num_candidates: the pool's, default the problem's), the
    checkpoint weights as given, the device, then ``extra``."""
    params: Dict[str, Any] = {}
    for key in keys:
        params[key] = options[key]
        if key == "align_threshold":
            params["guard_excluded"] = guard_excluded
        if key == "screen":
            params["screened_out"] = screened_out
    params.update({
        "compute_dtype": str(compute_dtype),
        "num_candidates": problem.num_candidates if num_candidates is None else num_candidates,
        "dim": problem.dim, "num_targets": problem.num_targets, "num_checkpoints": problem.num_checkpoints,
        "checkpoint_weights": None if checkpoint_weights is None else checkpoint_weights.tolist(),
        "device": str(problem.candidates.device),
    })
    params.update(extra)
    return params


def selection_timings(start: float, selected: float, done: float, fill_s: Optional[float] = None) -> Dict[str, float]:
    """A Selection's ``timings`` from perf_counter readings: checks until ``selected``, then the
    method until ``done``; ``fill_s``, when given, the part of that spent filling the budget."""
    timings = {"validate_s": selected - start, "select_s": done - selected}
    if fill_s is not None:
        timings["fill_s"] = fill_s
    timings["total_s"] = done - start
    return timings


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
    negative), for ``random`` ones (``fit_weights``, from ``METHODS[name].fit_weights``). Rows added by
    ``fill`` have weight 0 and are flagged by ``filled``.
    """

    method: str
    k: int
    per_target: tuple
    params: Dict[str, Any]
    timings: Dict[str, float]
    # the weights are fit coefficients, summed over targets (select: METHODS[method].fit_weights);
    # False: scores or ones, of which the largest is kept
    fit_weights: bool = True
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
        add = self.fit_weights  # scores and ones are not summed: the best one
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
