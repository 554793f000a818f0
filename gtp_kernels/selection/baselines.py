"""Baselines: top-k by the LESS score, and random selection.

LESS score (Xia et al. 2024) of candidate i against target column c:

    score_i(c) = sum_t w_t cos(a_i^t, b_c^t),   w_t = lr_t / sum_t lr_t

over the checkpoint blocks t (a zero block scores 0). The budget k holds per target column, as
for every method: with m columns (tasks, or target examples) ``topk_reduce="column"`` (the
default) takes each column's k best by its own score, as LESS selects per target task;
"mean" or "max" rank once by the columns' scores averaged (as LESS does over one task's
validation examples) or maxed (as LESS does over a task's subtasks), and that one ranking's k
best serve every column. Ties go to the lowest index.

Random selection draws k rows per column without replacement across columns: one seeded
permutation of the eligible rows, column c taking its next k (cyclically once they run out), so
the union holds min(m * k, eligible) rows, as many as any method's union can, and m = 1 takes
the first k rows of the permutation.
"""
from __future__ import annotations

from typing import List

import numpy as np
import torch

from ..ops.backends import CHUNK_ELEMENTS
from ..validation import Problem
from .rows import row_chunks
from .common import STOP_NONE, SelectOptions, TargetSelection

_FULL_SCORES_ELEMENTS = 1 << 25  # per-column top-k keeps all (N, m) scores up to this many


TOPK_REDUCE = ("column", "mean", "max")


def _less_score_chunks(problem: Problem, dtype: torch.dtype):
    """(start, (n, m) LESS scores of rows start..start+n against each target column) per chunk."""
    T, d = problem.num_checkpoints, problem.checkpoint_dim
    m = problem.num_targets
    if problem.checkpoint_weights is None:
        w = torch.full((T,), 1.0 / T, dtype=dtype)
    else:
        w = (problem.checkpoint_weights / problem.checkpoint_weights.sum()).to(dtype)
    w = w.to(problem.candidates.device)
    B = problem.targets.to(dtype).T.reshape(m, T, d)
    B_unit = B / torch.linalg.vector_norm(B, dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    # chunks of about CHUNK_ELEMENTS values of the (n, m, T, d) work (a row source: in its blocks)
    for start, a in row_chunks(problem.candidates, CHUNK_ELEMENTS // max(1, m)):
        a = a.to(dtype).reshape(-1, T, d)
        a_unit = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        cos = torch.einsum("ntd,mtd->nmt", a_unit, B_unit)  # (n, m, T)
        yield start, cos @ w  # (n, m)


def less_scores(problem: Problem, reduce: str = "mean", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N,) LESS scores averaged ("mean") or maxed ("max") over the target columns, excluded rows
    at -inf."""
    if reduce not in ("mean", "max"):
        raise ValueError(f"less_scores reduces by 'mean' or 'max', got {reduce!r}")
    scores = torch.empty(problem.num_candidates, dtype=dtype, device=problem.candidates.device)
    for start, per_target in _less_score_chunks(problem, dtype):
        scores[start : start + len(per_target)] = (per_target.mean(dim=1) if reduce == "mean"
                                                   else per_target.amax(dim=1))
    scores[problem.exclude] = -float("inf")
    return scores


def top_k_per_column(problem: Problem, k: int, dtype: torch.dtype = torch.float32) -> tuple:
    """(indices (k', m), scores (k', m)), each column's k best rows by its own LESS score, best
    first, ties to the lowest index, k' = min(k, N); excluded rows score -inf.

    One pass. The (N, m) scores are kept and sorted once per column while they hold at most
    _FULL_SCORES_ELEMENTS values; beyond, a running top-k per column keeps memory at
    O((k + chunk) * m)."""
    N, m = problem.num_candidates, problem.num_targets
    if N * m <= _FULL_SCORES_ELEMENTS:
        scores = torch.empty(N, m, dtype=dtype, device=problem.candidates.device)
        for start, per_target in _less_score_chunks(problem, dtype):
            scores[start : start + len(per_target)] = per_target
        scores[problem.exclude] = -float("inf")
        order = torch.sort(scores, dim=0, descending=True, stable=True).indices[:k]
        return order, scores.gather(0, order)
    best_scores = best_rows = None
    for start, per_target in _less_score_chunks(problem, dtype):
        n = len(per_target)
        excluded = problem.exclude[start : start + n].to(per_target.device)
        per_target = per_target.masked_fill(excluded[:, None], -float("inf"))
        rows = torch.arange(start, start + n, device=per_target.device)[:, None].expand_as(per_target)
        if best_scores is not None:  # earlier rows first: a stable sort keeps ties at the lowest index
            per_target = torch.cat([best_scores, per_target])
            rows = torch.cat([best_rows, rows])
        order = torch.sort(per_target, dim=0, descending=True, stable=True).indices[:k]
        best_scores, best_rows = per_target.gather(0, order), rows.gather(0, order)
    return best_rows, best_scores


def _top_k_lowest_index_first(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(scores, descending=True, stable=True).indices  # stable: ties keep index order
    order = order[: k]
    return order[scores[order] > -float("inf")]


def _topk_result(chosen: torch.Tensor, scores: torch.Tensor) -> TargetSelection:
    keep = scores > -float("inf")  # excluded rows are never chosen
    return TargetSelection(indices=chosen[keep].cpu().numpy().astype(np.int64),
                           weights=scores[keep].cpu().to(torch.float64).numpy(),
                           residual_norms=np.zeros(0), stopped_by=STOP_NONE, passes=1.0)


def topk_less(problem: Problem, k: int, opts: SelectOptions, progress=None) -> List[TargetSelection]:
    """Top-k by the LESS score, k per target column: each column's own ranking ("column"), or
    one ranking by the columns' mean or max score shared by every column."""
    dtype = opts.resolved_compute_dtype(problem.candidates.dtype)
    if opts.topk_reduce == "column":
        rows, scores = top_k_per_column(problem, k, dtype)
        return [_topk_result(rows[:, c], scores[:, c]) for c in range(problem.num_targets)]
    scores = less_scores(problem, opts.topk_reduce, dtype)
    chosen = _top_k_lowest_index_first(scores, k)
    shared = _topk_result(chosen, scores[chosen])
    return [shared] * problem.num_targets


def random_selection(problem: Problem, k: int, opts: SelectOptions, progress=None) -> List[TargetSelection]:
    """k distinct eligible rows per target column drawn uniformly with a seeded generator
    (reproducible): column c takes positions c*k .. c*k + k - 1 of one permutation of the
    eligible rows, cyclically, so columns share rows only once the pool is used up."""
    eligible = (~problem.exclude).nonzero().flatten().cpu()
    gen = torch.Generator().manual_seed(int(opts.seed))
    permuted = eligible[torch.randperm(eligible.numel(), generator=gen)]
    count = min(k, permuted.numel())
    out = []
    for c in range(problem.num_targets):
        positions = (torch.arange(count) + c * k) % max(1, permuted.numel())
        chosen = permuted[positions]
        out.append(TargetSelection(indices=chosen.numpy().astype(np.int64), weights=np.ones(chosen.numel()),
                                   residual_norms=np.zeros(0), stopped_by=STOP_NONE))
    return out
