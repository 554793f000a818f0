"""The one call: ``select(candidates, target, k, method=...)``, and its result type.

Methods plug in through :data:`METHODS` (name -> :class:`MethodSpec`); faster backends add
entries there and never change ``select``'s signature.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .selection.baselines import random_selection, topk_less
from .selection.cosamp import gtp_cosamp
from .selection.pursuit import gtp_pursuit
from .selection.common import SelectOptions, TargetSelection
from .selection.reference import gtp_reference, nnls_on_support, weighted_norm
from .validation import ArrayLike, InputError, Problem, validate_problem

MethodFn = Callable[[Problem, int, SelectOptions, Optional[Callable[[int], None]]], List[TargetSelection]]


@dataclass(frozen=True)
class MethodSpec:
    """A selection method: how to run it and what it promises."""

    name: str
    run: MethodFn
    summary: str
    exact: bool  # selects exactly what gtp-reference selects (same indices, same order)


@dataclass(frozen=True)
class Selection:
    """The result of :func:`select`.

    For one target (m = 1) ``indices``, ``weights`` and ``residual_norms`` are that target's.
    For m > 1 targets ``indices`` is the union of the targets' supports in order of first
    selection (the examples to train on), ``weights`` the sum of the weights each target gave
    them, and ``residual_norms`` an (iterations + 1, m) array (rows past a target's stop repeat
    its last value); ``per_target`` keeps each target's own result.
    """

    method: str
    k: int
    per_target: tuple
    params: Dict[str, Any]
    timings: Dict[str, float]

    @property
    def num_targets(self) -> int:
        return len(self.per_target)

    @property
    def indices(self) -> np.ndarray:
        if len(self.per_target) == 1:
            return self.per_target[0].indices
        seen: Dict[int, None] = {}
        for ts in self.per_target:
            for i in ts.indices.tolist():
                seen.setdefault(i, None)
        return np.fromiter(seen.keys(), dtype=np.int64, count=len(seen))

    @property
    def weights(self) -> np.ndarray:
        if len(self.per_target) == 1:
            return self.per_target[0].weights
        total: Dict[int, float] = {}
        for ts in self.per_target:
            for i, w in zip(ts.indices.tolist(), ts.weights.tolist()):
                total[i] = total.get(i, 0.0) + w
        return np.asarray([total[i] for i in self.indices.tolist()], dtype=np.float64)

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
        """One dict per selected example: rank, index, weight (and id when ids are given)."""
        out = []
        for rank, (i, w) in enumerate(zip(self.indices.tolist(), self.weights.tolist())):
            rec: Dict[str, Any] = {"rank": rank, "index": int(i), "weight": float(w)}
            if ids is not None:
                rec["id"] = ids[i]
            out.append(rec)
        return out

    def summary(self) -> Dict[str, Any]:
        """JSON-ready description: method, parameters, timings, per-target outcome."""
        return {
            "method": self.method,
            "k": self.k,
            "selected": int(len(self.indices)),
            "relative_residual": self.relative_residual,
            "params": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in self.params.items()},
            "timings_s": self.timings,
            "targets": [
                {
                    "selected": int(len(ts.indices)),
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
        return (f"Selection(method={self.method!r}, k={self.k}, selected={len(self.indices)}, "
                f"targets={self.num_targets}, relative_residual={rel_s}, "
                f"time={self.timings.get('total_s', float('nan')):.3g}s)")


_REGISTRY: Dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> None:
    """Add a selection method under its name (used by the package's own backends)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


METHODS: Mapping[str, MethodSpec] = MappingProxyType(_REGISTRY)
"""Every selection method by name: ``{name: MethodSpec}`` (read-only)."""

register_method(MethodSpec(
    "gtp", gtp_pursuit,
    "exact GTP pursuit on the fused kernels (cached correlations, batched targets): fastest exact",
    exact=True))
register_method(MethodSpec(
    "gtp-cosamp", gtp_cosamp,
    "GTP by compressive sampling: pursuit inside each pass's top-ranked sample while no unsampled row is likely to be better; about k/12 passes",
    exact=False))
register_method(MethodSpec(
    "gtp-reference", gtp_reference,
    "GTP pursuit in plain PyTorch (a fresh torch.linalg solve per step): the reference", exact=True))
register_method(MethodSpec(
    "topk", topk_less, "top-k by the LESS score (checkpoint-weighted cosine with the target)", exact=False))
register_method(MethodSpec("random", random_selection, "uniformly random eligible rows (seeded)", exact=False))

DEFAULT_METHOD = "gtp"


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="atom", leave=False)
    return bar, bar.update


def select(
    candidates: ArrayLike,
    target: ArrayLike,
    k: int,
    *,
    method: Optional[str] = None,
    checkpoint_weights: Optional[Union[ArrayLike, Sequence[float]]] = None,
    num_checkpoints: Optional[int] = None,
    exclude: Optional[ArrayLike] = None,
    positive: bool = True,
    ridge: float = 0.0,
    tol: float = 1e-6,
    min_cosine: Optional[float] = None,
    align_threshold: Optional[float] = None,
    stop_ratio: Optional[float] = None,
    max_iters: Optional[int] = None,
    batch_size: Optional[int] = None,
    topk_reduce: str = "mean",
    seed: int = 0,
    compute_dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    backend: str = "auto",
    progress: bool = False,
) -> Selection:
    """Select at most k candidates whose non-negative combination matches the target.

    Solves (SPEC) min_w ||b - A^T w||_W^2 + ridge ||w||^2 s.t. w >= 0, ||w||_0 <= k for each
    target column b, with ||x||_W^2 = sum_t lr_t ||x^t||^2 over checkpoint blocks.

    Args:
        candidates: A, (N, D) rows, or an (N, T, d) trajectory; torch or numpy, any float dtype.
        target: b, (D,), or (D, m) for m targets pursued together.
        k: budget, 1 <= k <= N.
        method: a name in METHODS (default: the fastest exact GTP method).
        checkpoint_weights: (T,) lr_t per checkpoint (None: unweighted).
        num_checkpoints: T when candidates are flat (N, T*d).
        exclude: rows that may never be selected (bool mask or indices).
        positive: non-negative weights (off: plain orthogonal matching pursuit).
        ridge: lambda.
        tol: stop when the relative residual falls below tol.
        min_cosine: stop when the best candidate's cosine with the residual is at most this.
        align_threshold: guard: exclude candidates whose cosine with every target column is at
            or below this (e.g. 0.0 keeps only positively aligned candidates).
        stop_ratio: guard: stop once the best correlation is below stop_ratio times the first.
        max_iters: iteration cap (default 2k + 10).
        batch_size: compressive sampling's candidates per pass (default: adaptive, from N/12).
        topk_reduce: "mean" or "max" over target columns, for top-k.
        seed: for random selection.
        compute_dtype: torch.float32 or torch.float64 (default: float64 for float64 input).
        device: move the candidates there first (e.g. "cuda").
        backend: kernels for the N-sized products: "auto" (Triton on CUDA, torch on CPU),
            "triton" or "torch".
        progress: show a progress bar.
    """
    t0 = time.perf_counter()
    name = DEFAULT_METHOD if method is None else method
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    if compute_dtype not in (None, torch.float32, torch.float64):
        raise InputError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    for label, value in (("ridge", ridge), ("tol", tol)):
        if not np.isfinite(value) or value < 0:
            raise InputError(f"{label} must be finite and >= 0, got {value}")
    if stop_ratio is not None and not 0 <= stop_ratio < 1:
        raise InputError(f"stop_ratio must lie in [0, 1), got {stop_ratio}")
    if backend not in ("auto", "triton", "torch"):
        raise InputError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if max_iters is not None and max_iters < 1:
        raise InputError(f"max_iters must be >= 1, got {max_iters}")

    problem = validate_problem(candidates, target, k, checkpoint_weights=checkpoint_weights,
                               num_checkpoints=num_checkpoints, exclude=exclude)
    if device is not None:
        dev = torch.device(device)
        problem = Problem(problem.candidates.to(dev), problem.targets.to(dev), problem.num_checkpoints,
                          problem.checkpoint_dim, problem.checkpoint_weights, problem.exclude.to(dev))
    guard_excluded = 0
    if align_threshold is not None:
        problem, guard_excluded = _exclude_misaligned(problem, float(align_threshold))
        if int((~problem.exclude).sum()) == 0:
            raise InputError(f"align_threshold={align_threshold} excludes every candidate")
    opts = SelectOptions(positive=positive, ridge=float(ridge), tol=float(tol), min_cosine=min_cosine,
                         stop_ratio=stop_ratio, max_iters=max_iters, batch_size=batch_size,
                         topk_reduce=topk_reduce, seed=seed, compute_dtype=compute_dtype, progress=progress,
                         backend=backend)
    t1 = time.perf_counter()
    spec = METHODS[name]
    bar, tick = _progress_bar(progress, k * problem.num_targets, name)
    try:
        per_target = spec.run(problem, k, opts, tick)
    finally:
        if bar is not None:
            bar.close()
    if problem.candidates.is_cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    params = {
        "positive": positive, "ridge": ridge, "tol": tol, "min_cosine": min_cosine,
        "align_threshold": align_threshold, "guard_excluded": guard_excluded, "stop_ratio": stop_ratio,
        "max_iters": max_iters, "batch_size": batch_size, "topk_reduce": topk_reduce, "seed": seed,
        "compute_dtype": str(opts.resolved_compute_dtype(problem.candidates.dtype)),
        "num_candidates": problem.num_candidates, "dim": problem.dim, "num_targets": problem.num_targets,
        "num_checkpoints": problem.num_checkpoints,
        "checkpoint_weights": None if problem.checkpoint_weights is None
        else problem.checkpoint_weights.tolist(),
        "device": str(problem.candidates.device),
    }
    timings = {"validate_s": t1 - t0, "select_s": t2 - t1, "total_s": t2 - t0}
    return Selection(name, int(k), tuple(per_target), params, timings)


def _exclude_misaligned(problem: Problem, threshold: float) -> tuple:
    """SPEC guard: keep only candidates with cos(a_i, b) > threshold for some target column."""
    dtype = torch.float64 if problem.candidates.dtype == torch.float64 else torch.float32
    fw = problem.feature_weights(dtype)
    B = problem.targets.to(dtype)
    Bw = B if fw is None else B * fw[:, None]
    b_norms = weighted_norm(B.T, fw)
    best = torch.full((problem.num_candidates,), -float("inf"), dtype=dtype, device=B.device)
    step = max(1, (1 << 24) // max(1, problem.dim))
    for start in range(0, problem.num_candidates, step):
        a = problem.candidates[start : start + step].to(dtype)
        cos = (a @ Bw) / (weighted_norm(a, fw)[:, None].clamp_min(torch.finfo(dtype).tiny) * b_norms)
        best[start : start + step] = cos.amax(dim=1)
    misaligned = (best <= threshold) & ~problem.exclude
    excl = problem.exclude | misaligned
    return (Problem(problem.candidates, problem.targets, problem.num_checkpoints, problem.checkpoint_dim,
                    problem.checkpoint_weights, excl), int(misaligned.sum()))


def fit_residual(
    candidates: ArrayLike,
    target: ArrayLike,
    indices: Sequence[int],
    *,
    checkpoint_weights: Optional[Sequence[float]] = None,
    num_checkpoints: Optional[int] = None,
    ridge: float = 0.0,
) -> float:
    """Relative residual ||b - A_S^T w||_W / ||b||_W of the best non-negative fit on the rows S.

    Puts any selection (top-k, random, GTP) on the same footing; max over target columns.
    """
    problem = validate_problem(candidates, target, 1, checkpoint_weights=checkpoint_weights,
                               num_checkpoints=num_checkpoints)
    fw = problem.feature_weights(torch.float64)
    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    worst = 0.0
    for t in range(problem.num_targets):
        b = problem.targets[:, t].to(torch.float64)
        if idx.numel() == 0:
            return 1.0
        _, r = nnls_on_support(problem.candidates, b, idx, feature_weights=fw, ridge=ridge)
        worst = max(worst, float(weighted_norm(r, fw) / weighted_norm(b, fw)))
    return worst
