"""Joint selection for several target examples: one budget k shared by every target column.

Per-column selection (``targets="columns"``) gives each column its own k rows. With one
column per target *example* (e.g. the 24 validation articles of a task) that makes each
column's first pick its top-1 row, so at small budgets the union is top-k's rows, and which
columns are served depends on the column order. Joint selection (``targets="joint"``) solves
one problem for all columns instead (simultaneous OMP, Tropp et al. 2006, with non-negative
weights):

    minimise_W  sum_j ||u_j - A_S^T w_j||_W^2   s.t.  W >= 0,  |S| <= k,   u_j = b_j / ||b_j||_W

* **Unit columns.** Each target column is scaled to unit W-norm, so that no column with a
  large gradient (a high-loss example) dominates the objective.
* **One shared support** S of at most k rows; each column has its own non-negative weights w_j
  on S (a row may carry weight in some columns only).
* **Score.** With residuals r_j = u_j - A_S^T w_j and c_ij = <a_i, r_j>_W, adding row i alone
  with the best non-negative step t_j = max(c_ij, 0) / ||a_i||_W^2 in column j lowers column j's
  squared residual by max(c_ij, 0)^2 / ||a_i||_W^2, so the one-step decrease of the objective is

      score_i^2 = sum_j max(c_ij, 0)^2 / ||a_i||_W^2,   score_i = ||max(c_i, 0)||_2 / ||a_i||_W,

  the l2 norm of the positive correlations over the row norm; for m = 1 it is max(c_i, 0) /
  ||a_i||_W, OMP's greedy criterion (the single-column ``gtp`` ranks by c_i itself, as SPEC
  writes it; the two agree when rows have equal norms, as a store's unit-normalised checkpoint
  blocks do). Every iteration takes the row of largest score. (The sum
  of positive parts, an l1 aggregate, is the decrease for one step size shared by all columns,
  which per-column weights do not have; it would also favour rows that are mildly aligned with
  many columns over rows that fit a few columns well, whatever the fit gains.)
  ``positive=False`` (plain simultaneous OMP) scores ||c_i||_2 / ||a_i||_W.
* **Weights.** After each pick every column's weights are the non-negative least-squares
  optimum on S: the pick is appended to all m Cholesky factors in one batched K3 call
  (``ops.lsq.lsq_update``), whose active-set step may drop it, or an earlier row, from a column;
  a row of S that a column dropped re-enters that column's factor as soon as it is positively
  correlated with the column's residual again (so each w_j is the NNLS optimum on all of S,
  checked by the KKT conditions). A row no column holds any more leaves S and may be picked
  again; a pick no column takes is refused for good.
* **Stops**: |S| = k ("budget"); the root mean square of the columns' relative residuals,
  ||R||_F / sqrt(m), below tol ("tolerance"); the best score at or below min_cosine * ||R||_F
  ("no_correlation": no row is positively correlated with any residual); the best score below
  stop_ratio times the first ("guard"); every column's residual at its rounding floor
  ("residual_floor"); no eligible row ("exhausted"); max_iters picks ("max_iters").

Each column's residual norm never increases: its NNLS problem only gains rows, and the
active-set steps only lower the objective. Cost per iteration: one pass over A for the
(N, m) correlations (chunked: the N x m matrix is never held whole), O(D k m) for the
residuals and O(k^2 m) in K3.

Results: one TargetSelection per column, every one listing S in pick order (``indices``); its
``weights`` are the column's fit of its own (unscaled) target b_j on S, 0 for rows it does not
use, and its ``residual_norms`` ||b_j - A_S^T w_j||_W. ``Selection.weights`` in joint mode is the
mean over columns of the unit-column weights w_j / ||b_j||_W: by linearity the non-negative fit of
the mean unit target (1/m) sum_j u_j, with residual norm at most the RMS relative residual.

Top-k and random in joint mode (:func:`run_joint`): top-k ranks once by the columns' mean LESS
score (``topk_reduce="mean"``, LESS over a task's examples) or max score (``"max"``); random
draws k rows in all. Compressive sampling (``gtp-cosamp``, selection/cosamp.py) makes exact
joint pursuit's picks from a few passes: it pursues a copy of :class:`JointPursuit` inside a
sample and checks every speculated pick against the whole pool's scores, one pass per round.
The reference (``gtp-reference``) has no joint mode: refused.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable, List, Optional

import numpy as np
import torch

from ..ops import lsq
from ..ops.backends import CHUNK_ELEMENTS, candidate_products
from ..validation import InputError, Problem
from .baselines import random_selection, topk_less
from .common import (
    STOP_BUDGET,
    STOP_EXHAUSTED,
    STOP_GUARD,
    STOP_MAX_ITERS,
    STOP_NO_CORRELATION,
    STOP_RESIDUAL_FLOOR,
    STOP_TOLERANCE,
    SelectOptions,
    TargetSelection,
    residual_floor,
    weighted_norm,
)
from .fill import fill_budget
from .rows import gather_rows, row_chunks

TARGET_MODES = ("columns", "joint")
JOINT_METHODS = ("gtp", "gtp-cosamp", "topk", "random")
# re-entry of rows a column dropped: at most this many rounds per pick (each round appends, per
# column, its most correlated dropped row of S); a safeguard, KKT holds after a round or two
_MAX_REENTRY_ROUNDS = 64


def unit_columns(problem: Problem) -> tuple:
    """(U, norms): the target columns scaled to unit W-norm (float64), and their W-norms (m,)."""
    fw = problem.feature_weights(torch.float64)
    B = problem.targets.to(torch.float64)
    norms = weighted_norm(B.T, fw)
    return B / norms, norms


def gtp_joint(problem: Problem, k: int, opts: SelectOptions,
              progress: Optional[Callable[[int], None]] = None) -> List[TargetSelection]:
    """Joint (simultaneous) non-negative pursuit: one support of at most k rows for all columns.

    See the module docstring for the problem, the score and the stopping rules; each phase is
    one method of :class:`JointPursuit`.
    """
    pursuit = JointPursuit(problem, k, opts)
    while pursuit.stopped is None:
        if pursuit.stop_before_pass():
            break
        pursuit.take(*pursuit.best_row(), progress)
    return pursuit.results()


class JointPursuit:
    """The state of :func:`gtp_joint`: S (the shared support, rows by slot in buffers), one K3
    factor per column, the unit-norm columns' residuals R and their norms' history."""

    def __init__(self, problem: Problem, k: int, opts: SelectOptions):
        f64 = torch.float64
        self.problem, self.k, self.opts = problem, k, opts
        self.dtype = opts.resolved_compute_dtype(problem.candidates.dtype)
        self.A = problem.candidates
        self.device = device = self.A.device
        N, D, m = problem.num_candidates, problem.dim, problem.num_targets
        self.m = m
        self.fw = problem.feature_weights(f64)
        self.U, self.b_norms = unit_columns(problem)
        self.min_cos = opts.resolved_min_cosine(self.dtype)
        self.dep_tol = opts.resolved_dep_tol(self.dtype)
        self.weight_tol = opts.resolved_weight_tol(self.dtype)
        self.max_iters = opts.resolved_max_iters(k)
        self.row_norms = self._row_norms()
        self.passes = 1
        self.state = lsq.lsq_init(m, k, f64, device)
        self.exclude = problem.exclude.clone()
        self.support: List[int] = []  # S in pick order
        self.slot_of = torch.full((N,), -1, dtype=torch.long, device=device)  # row -> slot of S's buffers
        self.free_slots = list(range(k))
        self.slot_hi = 0  # slots [slot_hi, k) have never held a row: zero in every buffer
        self.rows_buf = torch.zeros(k, D, dtype=f64, device=device)  # selected rows by slot
        self.gram = torch.zeros(k, k, dtype=f64, device=device)  # <a_s, a_s'>_W by slot
        self.rhs = torch.zeros(k, m, dtype=f64, device=device)  # <a_s, u_j>_W by slot
        self.R = self.U.clone()
        self.hist = [[1.0] for _ in range(m)]  # relative residual norms per column
        self.stopped: Optional[str] = None
        self.iterations = self.rejected = self.dropped = 0
        self.first_score: Optional[float] = None
        self.best_val = -math.inf
        self.gram_col = torch.zeros(m, k, dtype=f64, device=device)
        self.columns = torch.arange(m, device=device)

    def copy(self) -> "JointPursuit":
        """An independent copy of the pursuit's state (the rows, targets and row norms shared):
        compressive sampling pursues a copy inside its sample (selection/cosamp.py)."""
        new = copy.copy(self)
        new.state = self.state.clone()
        for name in ("exclude", "slot_of", "rows_buf", "gram", "rhs", "R", "gram_col"):
            setattr(new, name, getattr(self, name).clone())
        new.support, new.free_slots = list(self.support), list(self.free_slots)
        new.hist = [list(h) for h in self.hist]
        return new

    def _row_norms(self) -> torch.Tensor:
        """||a_i||_W of every row, one pass (zero rows are excluded by validation; clamped anyway)."""
        dtype = self.dtype
        row_norms = torch.empty(self.problem.num_candidates, dtype=dtype, device=self.device)
        fw_c = None if self.fw is None else self.fw.to(dtype)
        for start, a in row_chunks(self.A, CHUNK_ELEMENTS):
            row_norms[start : start + a.shape[0]] = weighted_norm(a.to(dtype), fw_c)
        return row_norms.clamp_min_(torch.finfo(dtype).tiny)

    # -- the factors --

    def factor_slots(self) -> torch.Tensor:
        """(m, k) slot of each factor position (0 beyond a column's size: ignored by K3)."""
        return self.slot_of[self.state.support.clamp_min(0)].clamp_min(0)

    def append(self, atoms: torch.Tensor) -> List[int]:
        """Append atoms[j] (a row of S, -1: none) to column j's factor and re-solve (K3)."""
        slots = self.slot_of[atoms.clamp_min(0)].clamp_min(0)  # (m,)
        self.gram_col.copy_(self.gram[slots[:, None], self.factor_slots()])
        diag = self.gram[slots, slots].contiguous()
        rhs_new = self.rhs[slots, self.columns].contiguous()
        return lsq.lsq_update(self.state, atoms.contiguous(), self.gram_col, diag, rhs_new, lam=float(self.opts.ridge),
                              positive=self.opts.positive, dep_tol=self.dep_tol, weight_tol=self.weight_tol,
                              checked=False).tolist()

    def _in_factor(self) -> torch.Tensor:
        """(m, k) whether factor position p of column j holds a row (p < the column's size)."""
        return torch.arange(self.k, device=self.device)[None, :] < self.state.size[:, None]

    def _by_slot(self, values: torch.Tensor) -> torch.Tensor:
        """(k, m) X[slot, j] = values[j, p] for the factor position p of column j that holds
        the row in that slot; positions beyond a column's size (slot 0 there) must carry 0.
        One scatter-add instead of boolean-mask indexing (each held (slot, j) occurs once)."""
        out = torch.zeros(self.k, self.m, dtype=values.dtype, device=self.device)
        out.index_put_((self.factor_slots(), self.columns[:, None].expand(self.m, self.k)), values, accumulate=True)
        return out

    def weight_matrix(self) -> torch.Tensor:
        """(k, m) weights by slot: W[slot(s), j] = w_j(s)."""
        in_factor = self._in_factor()
        return self._by_slot(torch.where(in_factor, self.state.weights, torch.zeros_like(self.state.weights)))

    def refresh_residuals(self) -> None:
        hi = self.slot_hi  # the slots above never held a row: their rows and weights are zero
        self.R.copy_(self.U - self.rows_buf[:hi].T @ self.weight_matrix()[:hi])

    def weighted(self, X: torch.Tensor) -> torch.Tensor:
        """W X: the (D, ...) X scaled by the feature weights (X itself without them)."""
        return X if self.fw is None else X * self.fw[:, None]

    # -- the phases of one iteration --

    def stop_before_pass(self) -> bool:
        """Budget or iteration cap reached: stop before another pass."""
        if len(self.support) == self.k:
            self.stopped = STOP_BUDGET
        elif self.iterations >= self.max_iters:
            self.stopped = STOP_MAX_ITERS
        return self.stopped is not None

    def scores(self, products: torch.Tensor, row_norms: torch.Tensor) -> torch.Tensor:
        """Joint scores from row products: ||max(c, 0)||_2 (||c||_2 with ``positive=False``) over
        the last dimension (the m columns), divided by ``row_norms`` (broadcast to the result).
        ``products`` is clamped in place."""
        if self.opts.positive:
            products = products.clamp_min_(0)
        return torch.linalg.vector_norm(products, dim=-1) / row_norms

    def best_row(self) -> tuple:
        """1. Scores ||max(A W R, 0)||_2 per row over the row norm, one chunked pass; the best
        eligible row (ties: the lowest index) and its score (-inf: none eligible)."""
        RW = self.weighted(self.R).to(self.dtype)
        best_val, best_idx = -math.inf, -1
        for start, a in row_chunks(self.A, CHUNK_ELEMENTS):
            c = candidate_products(a, RW, self.dtype, self.opts.backend)
            score = self.scores(c, self.row_norms[start : start + c.shape[0]])
            score.masked_fill_(self.exclude[start : start + c.shape[0]], -math.inf)
            value, idx = torch.max(score, dim=0)  # ties: the lowest index
            if float(value) > best_val:  # strictly: an earlier chunk keeps a tie
                best_val, best_idx = float(value), start + int(idx)
        self.passes += 1
        return best_idx, best_val

    def take(self, j: int, value: float, progress: Optional[Callable[[int], None]] = None) -> bool:
        """One iteration on the best row j (score `value`, from :meth:`best_row` or any pass
        that computes the same scores): the score stops, then phases 2-5; whether S holds j."""
        self.iterations += 1
        self.best_val = value
        if self.stop_on_score():
            return False
        self.add(j)
        self.reenter()
        held = j in self.prune(j)
        if held and progress is not None:
            progress(1)
        self.record_residuals()
        return held

    def score_stop(self, value: float) -> Optional[str]:
        """The stop a best score `value` would trigger now (None: pursue)."""
        frob = math.sqrt(sum(h[-1] ** 2 for h in self.hist))
        if value == -math.inf:
            return STOP_EXHAUSTED
        if value <= self.min_cos * frob:
            return STOP_NO_CORRELATION
        if (self.first_score is not None and self.opts.stop_ratio is not None
                and value < self.opts.stop_ratio * self.first_score):
            return STOP_GUARD
        return None

    def stop_on_score(self) -> bool:
        """No eligible row, no correlation above the noise, or the stop-ratio guard."""
        self.stopped = self.score_stop(self.best_val)
        if self.stopped is None and self.first_score is None:
            self.first_score = self.best_val
        return self.stopped is not None

    def add(self, j: int) -> None:
        """2. The pick into S's buffers, then into every column's factor."""
        f64 = torch.float64
        row = gather_rows(self.A, [j]).to(f64)[0]
        row_w = row if self.fw is None else row * self.fw
        slot = self.free_slots.pop(0)
        self.slot_hi = hi = max(self.slot_hi, slot + 1)
        self.slot_of[j] = slot
        self.rows_buf[slot] = row
        products = self.rows_buf[:hi] @ row_w  # beyond hi: zero rows, zero products
        self.gram[slot, :hi] = products
        self.gram[:hi, slot] = products
        self.rhs[slot] = row_w @ self.U
        self.exclude[j] = True
        self.support.append(j)
        self.append(torch.full((self.m,), j, dtype=torch.long, device=self.device))

    def _held_by_column(self, support_t: torch.Tensor) -> torch.Tensor:
        """(|S|, m) whether column t's factor holds row S[p] (by slot: every factor row is in S);
        ``support_t``: S as a tensor."""
        return self._by_slot(self._in_factor().to(torch.int32))[self.slot_of[support_t]] > 0

    def reenter(self) -> None:
        """3. KKT on S: a row of S that a column dropped re-enters while it is positively
        correlated with that column's residual (one row per column per round)."""
        device, f64 = self.device, torch.float64
        for _ in range(_MAX_REENTRY_ROUNDS):
            self.refresh_residuals()
            support_t = torch.tensor(self.support, dtype=torch.long, device=device)
            by_slot = self.rows_buf[: self.slot_hi] @ self.weighted(self.R)  # (slots in use, m)
            corr = by_slot[self.slot_of[support_t]]  # (|S|, m)
            if not self.opts.positive:
                corr = corr.abs()
            norms_s = self.row_norms[support_t].to(f64)
            # the same noise threshold as the stop test, per column
            col_norms = weighted_norm(self.R.T, self.fw)
            cos = corr / norms_s[:, None] / col_norms.clamp_min(torch.finfo(f64).tiny)[None, :]
            cos = cos.masked_fill(self._held_by_column(support_t), -math.inf)
            best_cos, best_pos = cos.max(dim=0)
            want = best_cos > self.min_cos
            if not bool(want.any()):
                break
            atoms = torch.where(want, support_t[best_pos], torch.full_like(best_pos, -1))
            statuses = self.append(atoms)
            if all(s & (lsq.STATUS_DEPENDENT | lsq.STATUS_NEW_DROPPED) for s, w in zip(statuses, want.tolist())
                   if w):
                break  # nothing re-entered: rounding, not a real KKT violation
        else:  # pragma: no cover - the loop ends within a few rounds
            self.refresh_residuals()

    def prune(self, j: int) -> set:
        """4. S = rows some column holds: a row none holds leaves S (a pick none took is
        refused); returns the rows held."""
        held_rows = set()
        for t, size in enumerate(self.state.size.tolist()):
            held_rows.update(self.state.support[t, :size].tolist())
        for a in [a for a in self.support if a not in held_rows]:
            slot = int(self.slot_of[a])
            self.support.remove(a)
            self.free_slots.append(slot)
            self.free_slots.sort()
            self.rows_buf[slot] = 0.0
            self.gram[slot] = 0.0
            self.gram[:, slot] = 0.0
            self.rhs[slot] = 0.0
            self.slot_of[a] = -1
            if a == j:
                self.rejected += 1
            else:
                self.dropped += 1
                self.exclude[a] = bool(self.problem.exclude[a])  # eligible again
        return held_rows

    def record_residuals(self) -> None:
        """5. The columns' residual norms; stop at the tolerance or the rounding floor."""
        f64 = torch.float64
        norms_now = weighted_norm(self.R.T, self.fw).tolist()
        for t in range(self.m):
            self.hist[t].append(norms_now[t])
        rms = math.sqrt(sum(h[-1] ** 2 for h in self.hist) / self.m)
        state = self.state
        if rms < self.opts.tol:
            self.stopped = STOP_TOLERANCE
        elif self.support and all(
            self.hist[t][-1] <= residual_floor(self.dtype, 1.0, state.weights[t, : int(state.size[t])],
                                               self.row_norms.to(f64)[state.support[t, : int(state.size[t])]])
            for t in range(self.m)
        ):
            self.stopped = STOP_RESIDUAL_FLOOR

    def results(self) -> List[TargetSelection]:
        """One TargetSelection per column: the shared rows, that column's weights for its own
        target (b_j = ||b_j||_W u_j), its residual history."""
        W = self.weight_matrix()
        support = self.support
        slots_s = self.slot_of[torch.tensor(support, dtype=torch.long, device=self.device)] if support else None
        out = []
        for t in range(self.m):
            scale = float(self.b_norms[t])
            w_t = (W[slots_s, t] * scale).cpu().numpy() if support else np.zeros(0)
            out.append(TargetSelection(indices=np.asarray(support, dtype=np.int64), weights=w_t.astype(np.float64),
                                       residual_norms=np.asarray(self.hist[t], dtype=np.float64) * scale,
                                       stopped_by=self.stopped, iterations=self.iterations, rejected=self.rejected,
                                       dropped=self.dropped, passes=float(self.passes)))
        return out


def run_joint(method: str, problem: Problem, k: int, opts: SelectOptions,
              progress: Optional[Callable[[int], None]] = None) -> List[TargetSelection]:
    """``select(..., targets="joint")``: k rows in all for every column (see the module docstring).

    gtp: :func:`gtp_joint`. gtp-cosamp: :func:`selection.cosamp.gtp_cosamp_joint`, the same picks
    from a few passes. topk: one ranking by the columns' mean LESS score (or max, with
    ``topk_reduce="max"``; "column" reads as "mean" here). random: k rows drawn once. Every
    column's TargetSelection lists the same rows.
    """
    if method == "gtp":
        return gtp_joint(problem, k, opts, progress)
    if method == "gtp-cosamp":
        from .cosamp import gtp_cosamp_joint  # cosamp builds on JointPursuit: imported here

        return gtp_cosamp_joint(problem, k, opts, progress)
    if method == "topk":
        reduce = "mean" if opts.topk_reduce == "column" else opts.topk_reduce
        return topk_less(problem, k, dataclasses.replace(opts, topk_reduce=reduce), progress)
    if method == "random":
        first = random_selection(_first_column(problem), k, opts, progress)[0]
        return [first] * problem.num_targets
    raise InputError(f"targets='joint' supports the methods {', '.join(JOINT_METHODS)}; got {method!r} "
                     "(the reference pursues each column on its own)")


def _first_column(problem: Problem) -> Problem:
    return dataclasses.replace(problem, targets=problem.targets[:, :1])


def fill_joint(problem: Problem, per_target: List[TargetSelection], k: int, score: str, *,
               positive: bool = True, dtype: torch.dtype = torch.float32) -> List[TargetSelection]:
    """The shared selection topped up to k rows in all (``fill`` in joint mode).

    Scores as selection/fill.py, against the mean unit target u = (1/m) sum_j b_j / ||b_j||_W
    ("target") or its residual under the mean unit weights ("residual"); the filled rows (weight
    0) are appended to every column.
    """
    shared = per_target[0]
    if len(shared.indices) >= k:
        return list(per_target)
    U, b_norms = unit_columns(problem)
    mean_target = U.mean(dim=1, keepdim=True).to(problem.targets.dtype)
    if len(shared.indices):
        weights = np.mean([ts.weights / float(n) for ts, n in zip(per_target, b_norms.tolist())], axis=0)
    else:
        weights = np.zeros(0)
    one = dataclasses.replace(problem, targets=mean_target)
    mean_sel = dataclasses.replace(shared, weights=weights)
    filled = fill_budget(one, [mean_sel], k, score, positive=positive, dtype=dtype)[0]
    extra = filled.indices[len(shared.indices):]
    return [dataclasses.replace(ts, indices=np.concatenate([ts.indices, extra]).astype(np.int64),
                                weights=np.concatenate([ts.weights, np.zeros(len(extra))]),
                                filled=ts.filled + len(extra))
            for ts in per_target]
