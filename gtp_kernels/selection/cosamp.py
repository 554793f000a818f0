"""GTP by compressive sampling (SPEC algorithm 2, CoSaMP-style): a few passes over A.

Each pass (for all m targets at once):

  1. one read of A: the top-``batch_size`` correlations of the residual, c = A W r, among
     rows not in S (K2 ``correlate_topk`` with m_top > 1; default batch 2k);
  2. merge them with the current support: U = S + top;
  3. solve on U with the small Gram system only (G_U = A_U W A_U^T + lambda I, A_U W b):
     GTP pursuit restricted to U (greedy signed argmax, Cholesky append with the dependence
     test, Lawson-Hanson drop), which prunes U to at most k atoms. This is our pruning rule
     (design): where classical CoSaMP keeps the k largest least-squares weights, pursuing
     inside U keeps the joint-selection behaviour (no duplicates) and non-negativity;
  4. r = b - A_S^T w.

It stops when the support stops changing, the relative residual is below tol, a pass does
not improve the residual, or after ``max_iters`` passes (default 8). The support kept is the
best seen. Cost: passes x N*D plus, per pass, |U|^2 D for the Gram of U.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch

from ..ops import lsq
from ..validation import Problem
from .common import (
    STOP_EXHAUSTED,
    STOP_MAX_ITERS,
    STOP_STABLE,
    STOP_TOLERANCE,
    SelectOptions,
    TargetSelection,
)
from .pursuit import _use_kernels, candidate_products
from .reference import weighted_norm

DEFAULT_MAX_PASSES = 8


def _top_candidates(A, RW, exclude, batch, positive, dtype, backend):
    """(m, batch) values and indices of the best masked correlations; one read of A (K2)."""
    if _use_kernels(A, dtype, backend):
        from ..ops.correlate import correlate_topk

        values, idx = correlate_topk(A, RW.contiguous(), batch, exclude=exclude, absolute=not positive,
                                     backend="triton")
        return (values if positive else values.abs()), idx
    scores = candidate_products(A, RW, dtype, backend)
    key = (scores if positive else scores.abs()).masked_fill(exclude, -float("inf"))
    values, idx = torch.topk(key, min(batch, key.shape[0]), dim=0, sorted=True)
    return values.T, idx.T


def pursue_on_gram(gram: torch.Tensor, rhs: torch.Tensor, bb: float, k: int, opts: SelectOptions,
                   dtype: torch.dtype) -> tuple:
    """GTP pursuit over a small dictionary given only its Gram matrix.

    gram: G_U + lambda I (u x u); rhs: A_U W b (u,); bb: ||b||_W^2. Returns (positions in U
    in selection order, weights). Same rules as the full pursuit, with ||r||_W^2 computed as
    bb - 2 w.rhs_S + w^T (G_SS - lambda I) w = bb - w.rhs_S - lambda ||w||^2, since the
    weights solve G_SS w = rhs_S exactly on the (passive) support.
    """
    u = gram.shape[0]
    lam = float(opts.ridge)
    min_cos = opts.resolved_min_cosine(dtype)
    dep_tol = opts.resolved_dep_tol(dtype)
    state = lsq.lsq_init(1, k, dtype, gram.device)
    banned = torch.zeros(u, dtype=torch.bool, device=gram.device)
    support: List[int] = []
    w = torch.zeros(0, dtype=dtype, device=gram.device)
    r2 = bb
    for _ in range(opts.resolved_max_iters(k)):
        if len(support) == k:
            break
        # a_i W r = rhs_i - G[i, S] w for i outside S (the ridge sits on the diagonal only)
        corr = rhs - gram[:, support] @ w if support else rhs
        key = corr if opts.positive else corr.abs()
        key = key.masked_fill(banned, -float("inf"))
        if support:
            key[support] = -float("inf")
        j = int(torch.argmax(key))
        if key[j] == -float("inf"):
            break
        diag = float(gram[j, j]) - lam
        if float(key[j]) <= min_cos * max(diag, 0.0) ** 0.5 * max(r2, 0.0) ** 0.5:
            break
        col = torch.zeros(1, k, dtype=dtype, device=gram.device)
        if support:
            col[0, : len(support)] = gram[support, j]
        status = int(lsq.lsq_update(state, torch.tensor([j], device=gram.device), col,
                                    gram[j, j].reshape(1) - lam, rhs[j].reshape(1), lam=lam,
                                    positive=opts.positive, dep_tol=dep_tol)[0])
        if status & (lsq.STATUS_DEPENDENT | lsq.STATUS_NEW_DROPPED):
            banned[j] = True
            if status & lsq.STATUS_DEPENDENT:
                continue
        size = int(state.size[0])
        support = state.support[0, :size].tolist()
        w = state.weights[0, :size].clone()
        r2 = bb - float(w @ rhs[support]) - lam * float(w @ w) if support else bb
        if r2 < (opts.tol ** 2) * bb:
            break
    return support, w


def gtp_cosamp(problem: Problem, k: int, opts: SelectOptions, progress=None) -> List[TargetSelection]:
    """Compressive-sampling GTP for all targets (see module docstring)."""
    dtype = opts.resolved_compute_dtype(problem.candidates.dtype)
    small = torch.float64  # the restricted problems are tiny: solve them in float64
    A = problem.candidates
    device = A.device
    m = problem.num_targets
    fw = problem.feature_weights(dtype)
    B = problem.targets.to(dtype)
    batch = opts.batch_size or 2 * k
    max_passes = opts.max_iters or DEFAULT_MAX_PASSES
    lam = float(opts.ridge)

    supports: List[List[int]] = [[] for _ in range(m)]
    weights = [torch.zeros(0, dtype=torch.float64) for _ in range(m)]
    best = [None] * m  # (r_norm, support, weights)
    b_norms = weighted_norm(B.T, fw).tolist()
    hist = [[x] for x in b_norms]
    stopped: List[Optional[str]] = [None] * m
    R = B.clone()
    exclude = problem.exclude[:, None].repeat(1, m)
    passes = 0
    for _ in range(max_passes):
        live = [t for t in range(m) if stopped[t] is None]
        if not live:
            break
        RW = R if fw is None else R * fw[:, None]
        values, idx = _top_candidates(A, RW, exclude, batch, opts.positive, dtype, opts.backend)
        passes += 1
        for t in live:
            ok = values[t] > 0
            fresh = idx[t][ok].tolist()
            union = list(dict.fromkeys(supports[t] + fresh))
            if not union:
                stopped[t] = STOP_EXHAUSTED
                continue
            rows = A[union].to(small)
            fw64 = None if fw is None else fw.to(small)
            rows_w = rows if fw64 is None else rows * fw64
            gram = rows_w @ rows.T + lam * torch.eye(len(union), dtype=small, device=device)
            b64 = B[:, t].to(small)
            rhs = rows_w @ b64
            pos, w = pursue_on_gram(gram, rhs, b_norms[t] ** 2, k, opts, small)
            new_support = [union[p] for p in pos]
            if new_support:
                r = b64 - A[new_support].to(small).T @ w
            else:
                r = b64.clone()
            r_norm = float(weighted_norm(r, fw64))
            hist[t].append(r_norm)
            if progress is not None:
                progress(max(0, len(new_support) - len(supports[t])))
            improved = best[t] is None or r_norm < best[t][0] * (1 - 1e-12)
            if improved:
                best[t] = (r_norm, new_support, w.cpu())
            stable = set(new_support) == set(supports[t])
            supports[t], weights[t] = new_support, w.cpu()
            R[:, t] = r.to(dtype)
            exclude[:, t] = problem.exclude
            if new_support:
                exclude[torch.tensor(new_support, device=device), t] = True
            if r_norm < opts.tol * b_norms[t]:
                stopped[t] = STOP_TOLERANCE
            elif stable or not improved:
                stopped[t] = STOP_STABLE
    out = []
    for t in range(m):
        r_norm, sup, w = best[t] if best[t] is not None else (b_norms[t], [], torch.zeros(0))
        out.append(TargetSelection(
            indices=np.asarray(sup, dtype=np.int64),
            weights=w.to(torch.float64).numpy(),
            residual_norms=np.asarray(hist[t], dtype=np.float64),
            stopped_by=stopped[t] or STOP_MAX_ITERS,
            iterations=len(hist[t]) - 1,
            passes=float(passes),
        ))
    return out
