"""What every selection method shares: its options, its per-target result, default tolerances."""
from __future__ import annotations

from dataclasses import dataclass
import math
import warnings
from typing import Optional, Sequence

import numpy as np
import torch

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
    passes: full reads of the candidate matrix spent on this target (shared passes counted once per target).
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
