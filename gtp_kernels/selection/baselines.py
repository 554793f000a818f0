"""Baselines: top-k by the LESS score, and random selection.

LESS score (Xia et al. 2024) of candidate i against target column c:

    score_i(c) = sum_t w_t cos(a_i^t, b_c^t),   w_t = lr_t / sum_t lr_t

over the checkpoint blocks t (a zero block scores 0). With m target columns (target examples
or tasks) the scores are averaged ("mean", as LESS does over a task's examples) or maxed
("max", as LESS does over tasks). The k best are taken, ties to the lowest index.
"""
from __future__ import annotations

from typing import List

import numpy as np
import torch

from ..validation import Problem
from .rows import row_chunks
from .common import STOP_NONE, SelectOptions, TargetSelection

_CHUNK_ELEMENTS = 1 << 24  # rows per chunk chosen so a chunk holds about 16M values


def less_scores(problem: Problem, reduce: str = "mean", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N,) LESS scores, excluded rows at -inf."""
    if reduce not in ("mean", "max"):
        raise ValueError(f"topk_reduce must be 'mean' or 'max', got {reduce!r}")
    T, d = problem.num_checkpoints, problem.checkpoint_dim
    N, m = problem.num_candidates, problem.num_targets
    if problem.checkpoint_weights is None:
        w = torch.full((T,), 1.0 / T, dtype=dtype)
    else:
        w = (problem.checkpoint_weights / problem.checkpoint_weights.sum()).to(dtype)
    w = w.to(problem.candidates.device)
    B = problem.targets.to(dtype).T.reshape(m, T, d)
    B_unit = B / torch.linalg.vector_norm(B, dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    scores = torch.empty(N, dtype=dtype, device=problem.candidates.device)
    # chunks of about _CHUNK_ELEMENTS values of the (n, m, T, d) work (a row source: in its blocks)
    for start, a in row_chunks(problem.candidates, _CHUNK_ELEMENTS // max(1, m)):
        a = a.to(dtype).reshape(-1, T, d)
        a_unit = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        cos = torch.einsum("ntd,mtd->nmt", a_unit, B_unit)  # (n, m, T)
        per_target = cos @ w  # (n, m)
        scores[start : start + a.shape[0]] = per_target.mean(dim=1) if reduce == "mean" else per_target.amax(dim=1)
    scores[problem.exclude] = -float("inf")
    return scores


def _top_k_lowest_index_first(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(scores, descending=True, stable=True).indices  # stable: ties keep index order
    order = order[: k]
    return order[scores[order] > -float("inf")]


def topk_less(problem: Problem, k: int, opts: SelectOptions, progress=None) -> List[TargetSelection]:
    """Top-k by the LESS score; one selection for all target columns together."""
    dtype = opts.resolved_compute_dtype(problem.candidates.dtype)
    scores = less_scores(problem, opts.topk_reduce, dtype)
    chosen = _top_k_lowest_index_first(scores, k)
    return [
        TargetSelection(
            indices=chosen.cpu().numpy().astype(np.int64),
            weights=scores[chosen].cpu().to(torch.float64).numpy(),
            residual_norms=np.zeros(0),
            stopped_by=STOP_NONE,
            passes=1.0,
        )
    ]


def random_selection(problem: Problem, k: int, opts: SelectOptions, progress=None) -> List[TargetSelection]:
    """k distinct eligible rows drawn uniformly with a seeded generator (reproducible)."""
    eligible = (~problem.exclude).nonzero().flatten().cpu()
    gen = torch.Generator().manual_seed(int(opts.seed))
    chosen = eligible[torch.randperm(eligible.numel(), generator=gen)[:k]]
    return [
        TargetSelection(
            indices=chosen.numpy().astype(np.int64),
            weights=np.ones(chosen.numel()),
            residual_norms=np.zeros(0),
            stopped_by=STOP_NONE,
        )
    ]
