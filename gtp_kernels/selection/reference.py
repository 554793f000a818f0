"""GTP in plain PyTorch: the reference every kernel and fast driver is measured against.

Kept plain on purpose: one full correlation pass per iteration, and a fresh
``torch.linalg.solve`` of the selected rows' Gram system per least-squares step. It is
device-agnostic and computes in float32 or float64.

Problem (SPEC): for each target column b,

    minimise_w  ||b - A^T w||_W^2 + lambda ||w||^2   s.t.  w >= 0,  ||w||_0 <= k,

with ||x||_W^2 = sum_t lr_t ||x^t||^2 over checkpoint blocks (plain norm when unweighted).

Pursuit (SPEC algorithm 1), one atom per iteration:
    r = b, S = {}
    repeat: c = A W r over rows not in S and not excluded;
            j = argmax c (argmax |c| when positivity is off), ties to the lowest index;
            stop if cos(a_j, r)_W <= min_cosine, or c_j < stop_ratio * c_first (guard);
            reject j for good if it is numerically dependent on S: with c = G_SS^{-1} G_Sj
                pivot^2 = G_jj + lambda - G_jS c <= dep_tol * (G_jj + lambda), or
                pivot^2 <= eps * (sum_i |c_i| sqrt(G_ii + lambda))^2 (its rounding error);
            S = S + {j}; w = NNLS on S (Lawson-Hanson inner loop, warm-started, see below);
            r = b - A_S^T w_S
    until |S| = k, ||r||_W < tol ||b||_W, ||r||_W at the rounding floor
    (common.residual_floor: about eps ||b||_W), or max_iters iterations.

NNLS step (the active set of Lawson-Hanson, whose outer loop *is* the signed argmax above):
start from the previous weights with the new atom at 0; z = unconstrained solution on S;
while some z_i <= 0: alpha = min_{z_i <= 0} w_i / (w_i - z_i), w += alpha (z - w), drop every
atom with w_i <= 0 (the arg-min one at least), re-solve. Once all z_i > 0, atoms whose share
of the fit is negligible, z_i sqrt(G_ii + lambda) <= weight_tol * sqrt(rhs . z) (= ||A_S^T z||),
are dropped likewise and the loop re-solves. An atom dropped as it enters is excluded for good
(it cannot make progress, and re-picking it would loop).
"""
from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import torch

from ..validation import Problem
from .rows import RowSource, gather_rows, row_chunks, rows_matmul
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


def nnls_active_set_step(
    gram: torch.Tensor, rhs: torch.Tensor, w_start: torch.Tensor, weight_tol: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lawson-Hanson inner loop on a fixed candidate set, warm-started at w_start >= 0.

    Returns (w, keep): keep[i] is False for atoms dropped from the set; w holds the weights
    of the kept atoms (positive). gram is G_PP + lambda I, rhs is A_P W b. weight_tol > 0 also
    drops atoms whose share of the fit, z_i sqrt(gram_ii) / ||A_P^T z||, is at most weight_tol.
    """
    keep = torch.ones(rhs.shape[0], dtype=torch.bool, device=rhs.device)
    w = w_start.clone()
    norms = torch.sqrt(torch.diagonal(gram))
    while bool(keep.any()):
        idx = keep.nonzero().flatten()
        z = torch.linalg.solve(gram[idx][:, idx], rhs[idx])
        if bool((z > 0).all()):
            w = torch.zeros_like(w)
            w[idx] = z
            # ||A_P^T z||^2 = z . rhs at the least-squares solution
            fit = math.sqrt(max(float(torch.dot(z, rhs[idx])), 0.0))
            negligible = z * norms[idx] <= weight_tol * fit
            if weight_tol > 0 and bool(negligible.any()):
                w[idx[negligible]] = 0
                keep[idx[negligible]] = False
                continue
            return w, keep
        wi = w[idx]
        neg = z <= 0
        # Step from w towards z until the first weight reaches zero; an atom entering at
        # weight 0 with z_i <= 0 gives alpha = 0 and is dropped at once.
        ratio = torch.full_like(z, float("inf"))
        ratio[neg] = torch.where(wi[neg] > 0, wi[neg] / (wi[neg] - z[neg]), torch.zeros_like(z[neg]))
        first = int(torch.argmin(ratio))
        alpha = ratio[first]
        wi = wi + alpha * (z - wi)
        wi[first] = 0
        w = torch.zeros_like(w)
        w[idx] = wi
        keep[idx[wi <= 0]] = False
    return torch.zeros_like(w), keep


def nnls_on_support(
    candidates: torch.Tensor,
    target: torch.Tensor,
    support: torch.Tensor,
    *,
    feature_weights: Optional[torch.Tensor] = None,
    ridge: float = 0.0,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full NNLS (Lawson-Hanson) of target on the rows `support`: (weights, residual).

    Used to score a fixed selection (top-k, random) by the residual its best non-negative
    combination reaches, so methods are compared on the same footing.
    """
    support = torch.as_tensor(support, dtype=torch.long, device=candidates.device)
    rows = gather_rows(candidates, support).to(dtype)
    b = target.to(dtype)
    fw = None if feature_weights is None else feature_weights.to(dtype)
    rows_w = rows if fw is None else rows * fw
    gram = rows_w @ rows.T + ridge * torch.eye(rows.shape[0], dtype=dtype, device=rows.device)
    rhs = rows_w @ b
    n = rows.shape[0]
    passive = torch.zeros(n, dtype=torch.bool, device=rows.device)
    w = torch.zeros(n, dtype=dtype, device=rows.device)
    for _ in range(3 * n + 10):
        grad = rhs - gram @ w
        grad[passive] = -float("inf")
        j = int(torch.argmax(grad))
        if not bool(grad[j] > 1e-12 * (rhs.abs().max() + 1e-300)):
            break
        passive[j] = True
        idx = passive.nonzero().flatten()
        w_new, keep = nnls_active_set_step(gram[idx][:, idx], rhs[idx], w[idx])
        w = torch.zeros_like(w)
        w[idx] = w_new
        passive[idx[~keep]] = False
    residual = b - rows.T @ w
    return w, residual


def is_dependent(gram: torch.Tensor, dep_tol: float, eps: float) -> bool:
    """Is the last atom of gram (G + lambda I over support + [j]) numerically dependent on the
    others? pivot^2 = G_jj - G_jS c, c = G_SS^{-1} G_Sj, at or below dep_tol * G_jj, or at or
    below eps * s^2, s = sum_i |c_i| sqrt(G_ii): the rounding error of pivot^2."""
    g_jj = gram[-1, -1]
    rounding = 0.0
    if gram.shape[0] > 1:
        g_sj = gram[:-1, -1]
        coef = torch.linalg.solve(gram[:-1, :-1], g_sj)  # a_j's coefficients on the support
        pivot2 = g_jj - g_sj @ coef
        s = float((coef.abs() * torch.sqrt(torch.diagonal(gram)[:-1])).sum())
        rounding = eps * s * s
    else:
        pivot2 = g_jj
    return not (bool(pivot2 > dep_tol * g_jj) and float(pivot2) > rounding)


def _pursue_one_target(
    A: torch.Tensor,
    b: torch.Tensor,
    k: int,
    banned: torch.Tensor,
    fw: Optional[torch.Tensor],
    row_norms: torch.Tensor,
    opts: SelectOptions,
    dtype: torch.dtype,
    progress=None,
) -> TargetSelection:
    lam = float(opts.ridge)
    min_cos = opts.resolved_min_cosine(dtype)
    dep_tol = opts.resolved_dep_tol(dtype)
    weight_tol = opts.resolved_weight_tol(dtype)
    eps = torch.finfo(dtype).eps
    max_iters = opts.resolved_max_iters(k)
    banned = banned.clone()
    support: List[int] = []
    w = torch.zeros(0, dtype=dtype, device=A.device)
    r = b.clone()
    b_norm = float(weighted_norm(b, fw))
    norms = [b_norm]
    first_corr = None
    stopped, iterations, rejected, dropped = STOP_MAX_ITERS, 0, 0, 0
    for _ in range(max_iters):
        if len(support) == k:
            stopped = STOP_BUDGET
            break
        iterations += 1
        corr = rows_matmul(A, r if fw is None else r * fw, dtype)
        score = corr.clone() if opts.positive else corr.abs()
        score[banned] = -float("inf")
        if support:
            score[torch.tensor(support, device=A.device)] = -float("inf")
        j = int(torch.argmax(score))
        if score[j] == -float("inf"):
            stopped = STOP_EXHAUSTED
            break
        r_norm = float(weighted_norm(r, fw))
        if float(score[j]) <= min_cos * float(row_norms[j]) * r_norm:
            stopped = STOP_NO_CORRELATION
            break
        if first_corr is None:
            first_corr = float(score[j])
        elif opts.stop_ratio is not None and float(score[j]) < opts.stop_ratio * first_corr:
            stopped = STOP_GUARD
            break

        cand = support + [j]
        rows = gather_rows(A, cand).to(dtype)
        rows_w = rows if fw is None else rows * fw
        gram = rows_w @ rows.T + lam * torch.eye(len(cand), dtype=dtype, device=A.device)
        if is_dependent(gram, dep_tol, eps):
            banned[j] = True
            rejected += 1
            continue
        rhs = rows_w @ b
        if opts.positive:
            w_new, keep = nnls_active_set_step(gram, rhs, torch.cat([w, w.new_zeros(1)]), weight_tol)
            if not bool(keep[-1]):
                banned[j] = True
                rejected += 1
            dropped += int((~keep[:-1]).sum())
            support = [a for a, kp in zip(cand, keep.tolist()) if kp]
            w = w_new[keep]
        else:
            support = cand
            w = torch.linalg.solve(gram, rhs)
        r = b - gather_rows(A, support).to(dtype).T @ w if support else b.clone()
        norms.append(float(weighted_norm(r, fw)))
        if progress is not None:
            progress(1)
        if norms[-1] < opts.tol * b_norm:
            stopped = STOP_TOLERANCE
            break
        if support and norms[-1] <= residual_floor(dtype, b_norm, w, row_norms[support]):
            stopped = STOP_RESIDUAL_FLOOR
            break
    else:
        if len(support) == k:
            stopped = STOP_BUDGET
    return TargetSelection(
        indices=np.asarray(support, dtype=np.int64),
        weights=w.detach().cpu().to(torch.float64).numpy(),
        residual_norms=np.asarray(norms, dtype=np.float64),
        stopped_by=stopped,
        iterations=iterations,
        rejected=rejected,
        dropped=dropped,
        passes=float(iterations),
    )


def gtp_reference(problem: Problem, k: int, opts: SelectOptions, progress=None) -> List[TargetSelection]:
    """GTP pursuit (SPEC algorithm 1) in plain PyTorch, one target column at a time."""
    dtype = opts.resolved_compute_dtype(problem.candidates.dtype)
    # a tensor upcast whole (plain); a row source stays in its blocks, read a chunk at a time
    A = problem.candidates if isinstance(problem.candidates, RowSource) else problem.candidates.to(dtype)
    fw = problem.feature_weights(dtype)
    row_norms = torch.cat([weighted_norm(a.to(dtype), fw) for _, a in row_chunks(A)]) if isinstance(A, RowSource) \
        else weighted_norm(A, fw)
    return [
        _pursue_one_target(
            A, problem.targets[:, t].to(dtype), k, problem.exclude, fw, row_norms, opts, dtype, progress
        )
        for t in range(problem.num_targets)
    ]
