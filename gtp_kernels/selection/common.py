"""What every selection method shares: its options, its per-target result, default tolerances."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

# Why pursuit stopped, per target.
STOP_BUDGET = "budget"            # |S| reached k
STOP_TOLERANCE = "tolerance"      # ||r||_W / ||b||_W < tol
STOP_NO_CORRELATION = "no_correlation"  # best cosine(a_j, r) <= min_cosine: nothing left to add
STOP_GUARD = "guard"              # best correlation fell below stop_ratio * the first one
STOP_EXHAUSTED = "exhausted"      # no eligible candidate left
STOP_MAX_ITERS = "max_iters"      # iteration cap hit (each argmax, rejected or not, is one iteration)
STOP_NONE = "n/a"                 # non-iterative methods (top-k, random)


def default_min_cosine(dtype: torch.dtype) -> float:
    """Cosine below which the best candidate is taken as rounding noise and pursuit stops.

    After a least-squares update the residual is orthogonal to the selected rows only up to
    rounding (about sqrt(D) * eps relative), so duplicates of selected rows score that much.
    """
    return 1e-10 if dtype == torch.float64 else 1e-4


def default_dep_tol(dtype: torch.dtype) -> float:
    """Relative pivot^2 / (G_jj + lambda) at or below which a new atom counts as dependent.

    pivot^2 / G_jj is sin^2 of the angle between a_j and span(A_S) (lambda = 0).
    """
    return 1e-10 if dtype == torch.float64 else 1e-5


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

