"""Filling the budget when pursuit stops early.

Pursuit stops before k rows for good reasons: the residual fell below ``tol``, no candidate is
positively correlated with it any more, a guard or the iteration cap. A user who needs k
examples to train on fills the rest of each target column's budget with the best remaining
candidates by a stated score. Filled rows get weight 0: they are not part of the fit (whose
weights and residual are unchanged) and are marked as filled (``TargetSelection.filled``).

Scores, per target column c, in the pursuit's inner product <x, y>_W = sum_t w_t <x^t, y^t>
(w_t the checkpoint weights; plain dot products without them), cos_W(x, y) = <x, y>_W /
(||x||_W ||y||_W):

* ``"target"``:   cos_W(a_i, b_c), similarity with the target column itself (the first pick of
  pursuit; top-k's ranking when T = 1, LESS's per-block cosine otherwise being its block-wise
  variant).
* ``"residual"``: cos_W(a_i, r_c) with r_c = b_c - A_S^T w_c the column's final residual: the
  rows pursuit would have taken next without its stopping rules (|cos| with ``positive=False``).

A candidate is never filled when it is excluded (``exclude``, all-zero rows, the
``align_threshold`` guard), already in the column's selection, or a near-copy of a row in it
(pursued or filled): cos_W above NEAR_COPY_COSINE. Ties go to the lowest index. When the
eligible rows run out first, the column keeps fewer than k rows.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import numpy as np
import torch

from ..validation import Problem
from .common import TargetSelection
from ..ops.backends import CHUNK_ELEMENTS
from .rows import gather_rows, row_chunks

FILL_SCORES = ("target", "residual")
# cos_W above which a candidate counts as a near-copy of a selected row (the demo counts
# near-duplicates at the same threshold)
NEAR_COPY_COSINE = 0.95


def fill_budget(problem: Problem, per_target: List[TargetSelection], k: int, score: str, *,
                positive: bool = True, dtype: torch.dtype = torch.float32) -> List[TargetSelection]:
    """Each column's selection topped up to k rows by ``score`` (see the module docstring).

    ``per_target`` must come from ``problem`` as given (weights in its scale). Columns that
    already hold k rows are returned unchanged.
    """
    if score not in FILL_SCORES:
        raise ValueError(f"fill must be one of {FILL_SCORES} or None, got {score!r}")
    columns = [c for c, ts in enumerate(per_target) if len(ts.indices) < k]
    if not columns:
        return list(per_target)
    fw = problem.feature_weights(torch.float64)
    directions = torch.stack([_direction(problem, c, per_target[c], score, fw) for c in columns], dim=1)
    scores = _cosines(problem, directions, dtype)  # (N, len(columns)), excluded rows at -inf
    if score == "residual" and not positive:
        scores = torch.where(torch.isfinite(scores), scores.abs(), scores)
    out = list(per_target)
    for j, c in enumerate(columns):
        ts = per_target[c]
        column_scores = scores[:, j].clone()
        taken = torch.as_tensor(ts.indices, dtype=torch.int64, device=column_scores.device)
        column_scores[taken] = -float("inf")
        picked = _pick_without_near_copies(problem, column_scores, ts.indices, k - len(ts.indices), fw)
        out[c] = dataclasses.replace(
            ts, indices=np.concatenate([ts.indices, picked]).astype(np.int64),
            weights=np.concatenate([ts.weights, np.zeros(len(picked))]), filled=ts.filled + len(picked))
    return out


def _direction(problem: Problem, column: int, ts: TargetSelection, score: str,
               fw: Optional[torch.Tensor]) -> torch.Tensor:
    """b_c, or the final residual r_c = b_c - A_S^T w_c (float64: it may be tiny)."""
    b = problem.targets[:, column].to(torch.float64)
    if score == "target" or len(ts.indices) == 0:
        return b
    rows = _rows(problem, ts.indices)
    return b - rows.T @ torch.as_tensor(ts.weights, dtype=torch.float64, device=rows.device)


def _rows(problem: Problem, indices) -> torch.Tensor:
    # gather_rows: a tensor or a row source (a store's memory-mapped shards) alike
    return gather_rows(problem.candidates, np.asarray(indices, dtype=np.int64)).to(torch.float64)


def _weighted_unit(x: torch.Tensor, fw: Optional[torch.Tensor]) -> torch.Tensor:
    """x scaled so that <u, v> = cos_W(x, y): x * sqrt(w) / ||x||_W per row (zero rows stay 0)."""
    if fw is not None:
        x = x * fw.to(device=x.device, dtype=x.dtype).sqrt()
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / norms.clamp_min(torch.finfo(x.dtype).tiny)


def _cosines(problem: Problem, directions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, m') cos_W of every candidate with each direction, one chunked pass; excluded at -inf."""
    fw = problem.feature_weights(torch.float64)
    device = problem.candidates.device
    # the directions in float64 first: a residual of 1e-8 relative keeps its digits when unit
    units = _weighted_unit(directions.T.to(device), fw).T.to(dtype)  # (D, m')
    sqrt_w = None if fw is None else fw.sqrt().to(device=device, dtype=dtype)
    N = problem.num_candidates
    out = torch.empty(N, directions.shape[1], dtype=dtype, device=device)
    for start, a in row_chunks(problem.candidates, CHUNK_ELEMENTS):
        a = a.to(dtype)
        if sqrt_w is not None:
            a = a * sqrt_w
        norms = torch.linalg.vector_norm(a, dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        out[start : start + a.shape[0]] = (a @ units) / norms
    out[problem.exclude.to(device)] = -float("inf")
    return out


def _pick_without_near_copies(problem: Problem, scores: torch.Tensor, selected: np.ndarray, need: int,
                              fw: Optional[torch.Tensor]) -> np.ndarray:
    """Up to ``need`` rows in descending score (ties to the lowest index), skipping near-copies of
    the selected rows and of each other. Candidates are examined in batches: a batch costs one
    product with the rows kept so far."""
    order = torch.sort(scores, descending=True, stable=True).indices
    available = int(torch.isfinite(scores).sum())
    order = order[:available].cpu()
    kept = _weighted_unit(_rows(problem, selected), fw) if len(selected) else None
    picked: List[int] = []
    position = 0
    while len(picked) < need and position < available:
        batch = order[position : position + max(16, 2 * (need - len(picked)))]
        position += len(batch)
        units = _weighted_unit(_rows(problem, batch.numpy()), fw)
        near_selected = ((units @ kept.T).amax(dim=1) > NEAR_COPY_COSINE if kept is not None
                         else torch.zeros(len(batch), dtype=torch.bool, device=units.device))
        among = units @ units.T
        accepted: List[int] = []
        for j in range(len(batch)):
            if bool(near_selected[j]) or (accepted and bool((among[j, accepted] > NEAR_COPY_COSINE).any())):
                continue
            accepted.append(j)
            if len(picked) + len(accepted) == need:
                break
        picked.extend(int(batch[j]) for j in accepted)
        if accepted:
            new = units[accepted]
            kept = new if kept is None else torch.cat([kept, new])
    return np.asarray(picked, dtype=np.int64)
