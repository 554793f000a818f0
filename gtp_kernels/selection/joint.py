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
draws k rows in all. Compressive sampling has no joint variant (its prune step keeps the k
largest weights of one column; a shared prune needs its own rule and tests): refused.
"""
from __future__ import annotations

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
JOINT_METHODS = ("gtp", "topk", "random")
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

    See the module docstring for the problem, the score and the stopping rules.
    """
    f64 = torch.float64
    dtype = opts.resolved_compute_dtype(problem.candidates.dtype)
    A = problem.candidates
    device = A.device
    N, D, m = problem.num_candidates, problem.dim, problem.num_targets
    fw = problem.feature_weights(f64)
    U, b_norms = unit_columns(problem)
    lam = float(opts.ridge)
    min_cos = opts.resolved_min_cosine(dtype)
    dep_tol = opts.resolved_dep_tol(dtype)
    weight_tol = opts.resolved_weight_tol(dtype)
    max_iters = opts.resolved_max_iters(k)

    # ||a_i||_W of every row, one pass (zero rows are excluded by validation; clamped anyway)
    row_norms = torch.empty(N, dtype=dtype, device=device)
    fw_c = None if fw is None else fw.to(dtype)
    for start, a in row_chunks(A, CHUNK_ELEMENTS):
        row_norms[start : start + a.shape[0]] = weighted_norm(a.to(dtype), fw_c)
    row_norms.clamp_min_(torch.finfo(dtype).tiny)
    passes = 1

    state = lsq.lsq_init(m, k, f64, device)
    exclude = problem.exclude.clone()
    banned: set = set()
    support: List[int] = []  # S in pick order
    slot_of = torch.full((N,), -1, dtype=torch.long, device=device)  # row -> slot of S's buffers
    free_slots = list(range(k))
    rows_buf = torch.zeros(k, D, dtype=f64, device=device)  # selected rows by slot
    gram = torch.zeros(k, k, dtype=f64, device=device)  # <a_s, a_s'>_W by slot
    rhs = torch.zeros(k, m, dtype=f64, device=device)  # <a_s, u_j>_W by slot
    R = U.clone()
    hist = [[1.0] for _ in range(m)]  # relative residual norms per column
    stopped: Optional[str] = None
    iterations = rejected = dropped = 0
    first_score: Optional[float] = None
    gram_col = torch.zeros(m, k, dtype=f64, device=device)
    columns = torch.arange(m, device=device)

    def factor_slots() -> torch.Tensor:
        """(m, k) slot of each factor position (0 beyond a column's size: ignored by K3)."""
        return slot_of[state.support.clamp_min(0)].clamp_min(0)

    def append(atoms: torch.Tensor) -> List[int]:
        """Append atoms[j] (a row of S, -1: none) to column j's factor and re-solve (K3)."""
        slots = slot_of[atoms.clamp_min(0)].clamp_min(0)  # (m,)
        gram_col.copy_(gram[slots[:, None], factor_slots()])
        diag = gram[slots, slots].contiguous()
        rhs_new = rhs[slots, columns].contiguous()
        return lsq.lsq_update(state, atoms.contiguous(), gram_col, diag, rhs_new, lam=lam,
                              positive=opts.positive, dep_tol=dep_tol, weight_tol=weight_tol,
                              checked=False).tolist()

    def weight_matrix() -> torch.Tensor:
        """(k, m) weights by slot: W[slot(s), j] = w_j(s)."""
        W = torch.zeros(k, m, dtype=f64, device=device)
        sizes = state.size
        held = torch.arange(k, device=device)[None, :] < sizes[:, None]  # (m, k)
        col_idx = columns[:, None].expand(m, k)
        W[factor_slots()[held], col_idx[held]] = state.weights[held]
        return W

    def refresh_residuals() -> None:
        R.copy_(U - rows_buf.T @ weight_matrix())

    while True:
        if len(support) == k:
            stopped = STOP_BUDGET
            break
        if iterations >= max_iters:
            stopped = STOP_MAX_ITERS
            break
        # 1. scores: ||max(A W R, 0)||_2 per row over the row norm, one chunked pass
        RW = (R if fw is None else R * fw[:, None]).to(dtype)
        best_val, best_idx = -math.inf, -1
        for start, a in row_chunks(A, CHUNK_ELEMENTS):
            c = candidate_products(a, RW, dtype, opts.backend)
            if opts.positive:
                c = c.clamp_min_(0)
            score = torch.linalg.vector_norm(c, dim=1) / row_norms[start : start + c.shape[0]]
            score.masked_fill_(exclude[start : start + c.shape[0]], -math.inf)
            value, idx = torch.max(score, dim=0)  # ties: the lowest index
            if float(value) > best_val:  # strictly: an earlier chunk keeps a tie
                best_val, best_idx = float(value), start + int(idx)
        passes += 1
        iterations += 1
        frob = math.sqrt(sum(h[-1] ** 2 for h in hist))
        if best_val == -math.inf:
            stopped = STOP_EXHAUSTED
            break
        if best_val <= min_cos * frob:
            stopped = STOP_NO_CORRELATION
            break
        if first_score is None:
            first_score = best_val
        elif opts.stop_ratio is not None and best_val < opts.stop_ratio * first_score:
            stopped = STOP_GUARD
            break

        # 2. the pick into S's buffers, then into every column's factor
        j = best_idx
        row = gather_rows(A, [j]).to(f64)[0]
        row_w = row if fw is None else row * fw
        slot = free_slots.pop(0)
        slot_of[j] = slot
        rows_buf[slot] = row
        gram[slot] = rows_buf @ row_w
        gram[:, slot] = gram[slot]
        rhs[slot] = row_w @ U
        exclude[j] = True
        support.append(j)
        append(torch.full((m,), j, dtype=torch.long, device=device))
        # 3. KKT on S: a row of S that a column dropped re-enters while it is positively
        #    correlated with that column's residual (one row per column per round)
        for _ in range(_MAX_REENTRY_ROUNDS):
            refresh_residuals()
            slots_s = slot_of[torch.tensor(support, dtype=torch.long, device=device)]
            corr = rows_buf[slots_s] @ (R if fw is None else R * fw[:, None])  # (|S|, m)
            if not opts.positive:
                corr = corr.abs()
            held = torch.zeros(len(support), m, dtype=torch.bool, device=device)
            pos_in_s = {a: p for p, a in enumerate(support)}
            for t, size in enumerate(state.size.tolist()):
                for a in state.support[t, :size].tolist():
                    held[pos_in_s[a], t] = True
            norms_s = row_norms[torch.tensor(support, device=device)].to(f64)
            # the same noise threshold as the stop test, per column
            col_norms = weighted_norm(R.T, fw)
            cos = corr / norms_s[:, None] / col_norms.clamp_min(torch.finfo(f64).tiny)[None, :]
            cos = cos.masked_fill(held, -math.inf)
            best_cos, best_pos = cos.max(dim=0)
            want = best_cos > min_cos
            if not bool(want.any()):
                break
            atoms = torch.where(want, torch.tensor(support, device=device)[best_pos], torch.full_like(best_pos, -1))
            statuses = append(atoms)
            if all(s & (lsq.STATUS_DEPENDENT | lsq.STATUS_NEW_DROPPED) for s, w in zip(statuses, want.tolist())
                   if w):
                break  # nothing re-entered: rounding, not a real KKT violation
        else:  # pragma: no cover - the loop ends within a few rounds
            refresh_residuals()

        # 4. S = rows some column holds: a row none holds leaves S (a pick none took is refused)
        held_rows = set()
        for t, size in enumerate(state.size.tolist()):
            held_rows.update(state.support[t, :size].tolist())
        for a in [a for a in support if a not in held_rows]:
            support.remove(a)
            free_slots.append(int(slot_of[a]))
            free_slots.sort()
            rows_buf[slot_of[a]] = 0.0
            gram[slot_of[a]] = 0.0
            gram[:, slot_of[a]] = 0.0
            rhs[slot_of[a]] = 0.0
            slot_of[a] = -1
            if a == j:
                banned.add(a)
                rejected += 1
            else:
                dropped += 1
                exclude[a] = bool(problem.exclude[a])  # eligible again
        norms_now = weighted_norm(R.T, fw).tolist()
        for t in range(m):
            hist[t].append(norms_now[t])
        if j in held_rows and progress is not None:
            progress(1)
        rms = math.sqrt(sum(h[-1] ** 2 for h in hist) / m)
        if rms < opts.tol:
            stopped = STOP_TOLERANCE
            break
        if support and all(
            hist[t][-1] <= residual_floor(dtype, 1.0, state.weights[t, : int(state.size[t])],
                                          row_norms.to(f64)[state.support[t, : int(state.size[t])]])
            for t in range(m)
        ):
            stopped = STOP_RESIDUAL_FLOOR
            break

    W = weight_matrix()
    slots_s = slot_of[torch.tensor(support, dtype=torch.long, device=device)] if support else None
    out = []
    for t in range(m):
        scale = float(b_norms[t])  # back to the column's own target: b_j = ||b_j||_W u_j
        w_t = (W[slots_s, t] * scale).cpu().numpy() if support else np.zeros(0)
        out.append(TargetSelection(indices=np.asarray(support, dtype=np.int64), weights=w_t.astype(np.float64),
                                   residual_norms=np.asarray(hist[t], dtype=np.float64) * scale,
                                   stopped_by=stopped, iterations=iterations, rejected=rejected, dropped=dropped,
                                   passes=float(passes)))
    return out


def run_joint(method: str, problem: Problem, k: int, opts: SelectOptions,
              progress: Optional[Callable[[int], None]] = None) -> List[TargetSelection]:
    """``select(..., targets="joint")``: k rows in all for every column (see the module docstring).

    gtp: :func:`gtp_joint`. topk: one ranking by the columns' mean LESS score (or max, with
    ``topk_reduce="max"``; "column" reads as "mean" here). random: k rows drawn once. Every
    column's TargetSelection lists the same rows.
    """
    if method == "gtp":
        return gtp_joint(problem, k, opts, progress)
    if method == "topk":
        reduce = "mean" if opts.topk_reduce == "column" else opts.topk_reduce
        return topk_less(problem, k, dataclasses.replace(opts, topk_reduce=reduce), progress)
    if method == "random":
        first = random_selection(_first_column(problem), k, opts, progress)[0]
        return [first] * problem.num_targets
    raise InputError(f"targets='joint' supports the methods {', '.join(JOINT_METHODS)}; got {method!r} "
                     "(compressive sampling and the reference pursue each column on its own)")


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
