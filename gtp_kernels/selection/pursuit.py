"""Fast exact GTP pursuit: same selection as the plain reference, far fewer reads of A.

Algorithm and stopping rules are those of :mod:`gtp_kernels.selection.reference` (SPEC
algorithm 1 with true NNLS); what changes is how the correlations and the least-squares
update are computed. All m targets advance together, one shared pass per iteration.

Two strategies, picked per problem from N, D, k, m and memory (``strategy="auto"``):

* ``direct``: each iteration one fused pass over A computes c = A W R for every target and
  its masked argmax (K2, ``correlate_topk``; the N x m scores never reach memory on GPU).
  Cost per iteration: N*D.

* ``cached``: correlations from cached columns instead of A,

      c = A W (b - A_S^T w) = c0 - (A W A_S^T) w,   c0 = A W b,

  so with the columns C[:, s] = A W a_s of the selected atoms kept in memory an iteration
  costs N*|S| instead of N*D. The subtraction cancels as the residual shrinks, so the
  correlations are re-anchored (one pass, c_base = A W r) each time ||r|| falls by a factor
  ANCHOR_DROP, and later iterations subtract only the weight changes since the anchor. The column of a newly selected atom j must come from A: when
  it is not cached, one pass computes the columns of j *and* of the next most correlated
  candidates (a skinny GEMM: one read of A for several columns, ``candidate_scores``), so
  later picks usually find their column ready. The Gram entries and A_S W b come out of the
  cache for free. Memory: N x capacity columns.

``auto`` starts cached when its first iterations cost less than a pass and the columns fit,
and switches to direct (from the same exact residuals) once the product with the cached
columns costs a pass: cached pays where |S| << D, direct where the support nears D. On CPU
it also times itself: it switches once 16 cached iterations took longer than passes would.

On CPU the passes and the column fetches run on the compiled row-products kernel
(:mod:`gtp_kernels.ops.products`), and the selected rows are kept in float32 where that is
exact, with float64 Gram columns and residuals computed from them.

The least-squares step is K3 (``gtp_kernels.ops.lsq.lsq_update``): Cholesky append with
the dependence test, Lawson-Hanson active-set drop with downdate, batched over targets.
Each iteration reads the picked indices on the host (one sync), which the stop tests need.
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from ..ops import lsq
from ..ops.backends import masked_top
from ..ops.products import rows_dot_f64, rows_residual_f64, selected_rows_dtype
from ..validation import Problem
from .cached import CachedCorrelations, cache_budget_bytes, choose_strategy, switch_columns
from .rows import gather_rows
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

# how the correlations are computed (see the module docstring)
STRATEGIES = ("auto", "direct", "cached")
class _PhaseClock:
    """Seconds spent per phase, for benchmarks; synchronises CUDA at each phase boundary,
    so it is off (a no-op) unless a dict is passed as ``phase_seconds``."""

    def __init__(self, sink: Optional[Dict[str, float]], device: torch.device):
        self.sink, self.device = sink, device
        self._t = time.perf_counter() if sink is not None else 0.0

    def lap(self, phase: str) -> None:
        if self.sink is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.sink[phase] = self.sink.get(phase, 0.0) + now - self._t
        self._t = now


def follow_factor_order(rows_buf: torch.Tensor, old_support: List[int], new_support: List[int],
                        new_atom: int, new_row: torch.Tensor) -> None:
    """Keep rows_buf[p] = row of new_support[p] after an update: the new row is appended, and
    when the NNLS step dropped atoms the factor compacted its order, which the rows follow."""
    n_old = len(old_support)
    if new_support == old_support + [new_atom]:  # the common case: appended, nothing dropped
        rows_buf[n_old] = new_row
        return
    # Positions before the first change keep their rows; only the tail moves (the buffer is
    # k x D, so a whole-buffer gather per drop would cost as much as a pass at small N).
    first = 0
    while first < min(n_old, len(new_support)) and old_support[first] == new_support[first]:
        first += 1
    pos = {a: p for p, a in enumerate(old_support)}
    source = [pos.get(a, -1) for a in new_support[first:]]  # -1: the new atom's row
    tail = rows_buf[torch.tensor([max(p, 0) for p in source], dtype=torch.long, device=rows_buf.device)]
    for q, p in enumerate(source):
        if p < 0:
            tail[q] = new_row
    rows_buf[first : first + len(source)] = tail


class LocalRows:
    """Where the candidate rows live: all in this process. Indices are global row numbers.

    The pursuit reaches rows only through this object, so a sharded placement
    (:class:`gtp_kernels.selection.distributed.ShardedRows`) runs the same loop on each rank.
    """

    offset = 0

    def best(self, values: torch.Tensor, idx: torch.Tensor):
        """Per-target best (value, global index) from this process's (value, local index)."""
        return values, idx

    def top(self, key: torch.Tensor, count: int) -> List[int]:
        """Global indices of the `count` largest keys (only a prefetch hint)."""
        values, order = torch.topk(key, min(count, key.numel()))
        return [int(i) for v, i in zip(values.tolist(), order.tolist()) if v > -float("inf")]

    def fetch(self, A: torch.Tensor, atoms: List[int], dtype: torch.dtype) -> torch.Tensor:
        """Rows `atoms` (global indices) as a (len, D) tensor, on every process."""
        # index_select: advanced indexing (A[list]) copies far slower on CPU
        return gather_rows(A, torch.tensor(atoms, dtype=torch.long)).to(dtype)

    def local(self, atoms: List[int]) -> List[int]:
        """The local row numbers of those `atoms` held here."""
        return list(atoms)

    def agree(self, flag: bool) -> bool:
        """True if every process says True (one process: its own answer)."""
        return flag


def gtp_pursuit(problem: Problem, k: int, opts: SelectOptions, progress=None, *,
                strategy: str = "auto", prefetch: Optional[int] = None,
                phase_seconds: Optional[Dict[str, float]] = None,
                placement: Optional[LocalRows] = None) -> List[TargetSelection]:
    """Exact GTP pursuit for all targets at once (see module docstring).

    strategy: "auto", "direct" or "cached"; prefetch: columns fetched per pass beyond the
    needed ones (cached); phase_seconds: if a dict, filled with seconds per phase
    (correlation, columns, update, residual) at the cost of a sync per phase; placement:
    where the rows live (default: all here; ShardedRows for torch.distributed, where
    `problem.candidates` is this rank's shard and every index is global).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if phase_seconds is not None:  # a dict reused across calls must not carry the last run's switch
        phase_seconds.pop("switched_at_support", None)
    pursuit = ExactPursuit(problem, k, opts, progress, strategy, prefetch, phase_seconds,
                           placement if placement is not None else LocalRows())
    while True:
        live = pursuit.stop()
        if not live:
            break
        best_val, best_idx = pursuit.correlate(live)
        picks = pursuit.pick(live, best_val, best_idx)
        if picks is None:
            continue
        pursuit.columns(picks)
        status = pursuit.update(picks)
        pursuit.residual(picks, status)
    return pursuit.results()


class _Picks:
    """One iteration's accepted picks: the targets, their rows (float64, (p, D)), the rows
    weighted by W, and the rows' squared W-norms (the Gram diagonal)."""

    def __init__(self, targets: List[int], rows: torch.Tensor, rows_w: torch.Tensor, diag: torch.Tensor):
        self.targets, self.rows, self.rows_w, self.diag = targets, rows, rows_w, diag


class ExactPursuit:
    """The state of the exact pursuit of m targets, one method per phase of SPEC algorithm 1:
    stop (budget, iteration cap), correlate (c = A W r and its masked argmax per target),
    pick (stop tests on the best candidates), columns (cached strategy: the new atoms'
    columns), update (K3: Cholesky append and NNLS step) and residual (r = b - A_S^T w, the
    tolerance and rounding-floor stops).

    Correlations run direct (a pass over A per iteration) or from cached columns
    (selection.cached.CachedCorrelations); auto starts cached where that is cheaper and
    switches to direct for good once it is not.
    """

    def __init__(self, problem: Problem, k: int, opts: SelectOptions, progress, strategy: str,
                 prefetch: Optional[int], phase_seconds: Optional[Dict[str, float]], rows_at: LocalRows):
        self.k, self.opts, self.progress, self.rows_at = k, opts, progress, rows_at
        self.phase_seconds = phase_seconds
        self.dtype = dtype = opts.resolved_compute_dtype(problem.candidates.dtype)  # the N-sized products
        f64 = torch.float64  # the k-sized maths (Gram entries, factor, weights, residual)
        self.A = A = problem.candidates
        self.device = device = A.device
        N, D, self.m = problem.num_candidates, problem.dim, problem.num_targets
        m = self.m
        self.fw = fw = problem.feature_weights(f64)
        self.fw_c = None if fw is None else fw.to(dtype)
        self.B = B = problem.targets.to(f64)
        self.min_cos = opts.resolved_min_cosine(dtype)
        self.dep_tol = opts.resolved_dep_tol(dtype)
        self.weight_tol = opts.resolved_weight_tol(dtype)
        self.max_iters = opts.resolved_max_iters(k)

        self.state = lsq.lsq_init(m, k, f64, device)
        self.base_exclude = problem.exclude
        self.banned = [set() for _ in range(m)]
        self.exclude = self.base_exclude[:, None].repeat(1, m)
        self.R = B.clone()  # residuals, float64
        self.b_norms = weighted_norm(B.T, fw).tolist()
        self.hist: List[List[float]] = [[x] for x in self.b_norms]
        self.stopped: List[Optional[str]] = [None] * m
        self.iterations, self.rejected, self.dropped = [0] * m, [0] * m, [0] * m
        self.first_corr: List[Optional[float]] = [None] * m
        self.supports: List[List[int]] = [[] for _ in range(m)]
        # copies of each target's selected rows, in support order (k x D): float32 where that is
        # exact and the float64-accumulating kernels run (half the bytes), else float64
        self.rows_buf = torch.empty(m, k, D, dtype=selected_rows_dtype(A), device=device)
        self.b_cols = [B[:, t].contiguous() for t in range(m)]
        self.r_col = torch.empty(D, dtype=f64, device=device)
        self.weights: List[torch.Tensor] = [torch.zeros(0, dtype=f64, device=device) for _ in range(m)]
        # ||a||_W of each target's picked atoms, and of its support in factor order (the residual floor)
        self.norm_of: List[Dict[int, float]] = [{} for _ in range(m)]
        self.sup_norms = torch.zeros(m, k, dtype=f64, device=device)
        self.passes = 0
        # per-iteration K3 inputs, allocated once (entries past a target's support are ignored)
        self.gram_col = torch.zeros(m, k, dtype=f64, device=device)
        self.gram_diag = torch.zeros(m, dtype=f64, device=device)
        self.rhs_new = torch.zeros(m, dtype=f64, device=device)
        self.all_targets = list(range(m))
        self.new_atoms: List[int] = [-1] * m
        self.clock = _PhaseClock(phase_seconds, device)
        self.strategy = strategy
        self.cached: Optional[CachedCorrelations] = self._start_strategy(strategy, prefetch, N, D)

    def _start_strategy(self, strategy: str, prefetch: Optional[int], N: int, D: int) -> Optional[CachedCorrelations]:
        """The cached state when the pursuit starts cached (auto: when choose_strategy says so)."""
        self.prefetch = prefetch = (32 if self.device.type == "cuda" else 16) if prefetch is None else prefetch
        capacity = self.k * self.m + 2 * prefetch
        on_gpu = self.device.type == "cuda"
        c_bytes = torch.finfo(self.dtype).bits // 8
        # auto: cached while its iterations cost less than a pass, then direct (same selection)
        switch_at = None
        if strategy == "auto":
            switch_at = switch_columns(D, self.A.element_size(), c_bytes, on_gpu)
            # the cache never needs more than the columns held when it switches, plus one fetch
            capacity = min(capacity, switch_at + 2 * prefetch + self.m)
            strategy = choose_strategy(N, D, self.A.element_size(), c_bytes, capacity, self.m + prefetch,
                                       cache_budget_bytes(self.device), on_gpu)
            strategy = "cached" if self.rows_at.agree(strategy == "cached") else "direct"
        self.strategy = strategy
        if strategy != "cached":
            return None
        BW = self.B if self.fw is None else self.B * self.fw[:, None]
        self.passes += 1  # the first anchor
        return CachedCorrelations(self.A, BW, self.b_norms, N, self.dtype, self.opts.backend, capacity, self.k,
                                  self.rows_at, switch_at, on_gpu)

    def stop(self) -> List[int]:
        """The budget and iteration-cap stops; the targets still live."""
        for t in range(self.m):
            if self.stopped[t] is None and len(self.supports[t]) == self.k:
                self.stopped[t] = STOP_BUDGET
            elif self.stopped[t] is None and self.iterations[t] >= self.max_iters:
                self.stopped[t] = STOP_MAX_ITERS
        return [t for t in range(self.m) if self.stopped[t] is None]

    def correlate(self, live: List[int]) -> tuple:
        """Phase 1: c = A W r over the eligible rows, and each target's best (value, global index)."""
        cached = self.cached
        if cached is not None and cached.switch_at is not None and cached.should_switch():  # auto, still cached
            self.cached = cached = None  # continue direct, from the exact residuals
            if self.phase_seconds is not None:  # a support size, not seconds
                self.phase_seconds["switched_at_support"] = max(len(x) for x in self.supports)  # type: ignore[assignment]
        if cached is not None:
            best_val, best_idx, passes = cached.best(self.R, self.fw, live, self.hist, self.supports, self.weights,
                                                     self.exclude, self.opts.positive)
            self.passes += passes
        else:
            RW = (self.R if self.fw is None else self.R * self.fw[:, None]).to(self.dtype)
            best_val, best_idx = (x[:, 0] for x in masked_top(self.A, RW, self.exclude, 1, self.opts.positive,
                                                              self.dtype, self.opts.backend))
            self.passes += 1
        best_val, best_idx = self.rows_at.best(best_val, best_idx)
        self.clock.lap("correlation")
        return best_val.tolist(), best_idx.tolist()

    def pick(self, live: List[int], best_val: List[float], best_idx: List[int]) -> Optional[_Picks]:
        """Phase 2: each live target's best candidate, through the stop tests (exhausted, no
        correlation, the stop_ratio guard); None when no target goes on to an update."""
        new_atoms = self.new_atoms = [-1] * self.m
        for t in live:
            self.iterations[t] += 1
            if best_val[t] == -float("inf"):
                self.stopped[t] = STOP_EXHAUSTED
            else:
                new_atoms[t] = best_idx[t]
        picked = [t for t in live if new_atoms[t] >= 0]
        if not picked:
            return None
        rows = self.rows_at.fetch(self.A, [new_atoms[t] for t in picked], torch.float64)  # (p, D)
        rows_w = rows if self.fw is None else rows * self.fw
        diag = (rows_w * rows).sum(dim=1)
        diag_host = diag.tolist()
        for i, t in enumerate(picked):
            v = best_val[t]
            self.norm_of[t][new_atoms[t]] = math.sqrt(diag_host[i])
            if v <= self.min_cos * math.sqrt(diag_host[i]) * self.hist[t][-1]:
                self.stopped[t], new_atoms[t] = STOP_NO_CORRELATION, -1
            elif self.first_corr[t] is None:
                self.first_corr[t] = v
            elif self.opts.stop_ratio is not None and v < self.opts.stop_ratio * self.first_corr[t]:
                self.stopped[t], new_atoms[t] = STOP_GUARD, -1
        go = [i for i, t in enumerate(picked) if new_atoms[t] >= 0]
        if not go:
            return None
        if len(go) < len(picked):  # some target stopped on its pick: drop its row
            picked = [picked[i] for i in go]
            rows, rows_w, diag = rows[go], rows_w[go], diag[go]
        return _Picks(picked, rows, rows_w, diag)

    def columns(self, picks: _Picks) -> None:
        """Phase 3, cached strategy: the new atoms' columns A W a_j in the cache."""
        if self.cached is not None:
            self.passes += self.cached.fetch_columns(self.new_atoms, picks.targets, self.supports, self.prefetch,
                                                     self.fw_c)
            self.cached.record_cost()
        self.clock.lap("columns")

    def update(self, picks: _Picks) -> List[int]:
        """Phase 4: the least-squares update (K3) with float64 Gram entries from the selected
        rows; each target's K3 status."""
        picked = picks.targets
        for i, t in enumerate(picked):
            if self.supports[t]:
                rows_dot_f64(self.rows_buf[t, : len(self.supports[t])], picks.rows_w[i],
                             self.gram_col[t, : len(self.supports[t])])
        rhs_picked = (picks.rows_w * self.B.T[picked]).sum(dim=1)
        if picked == self.all_targets:  # the common case: every target picked, no scatter
            self.gram_diag.copy_(picks.diag)
            self.rhs_new.copy_(rhs_picked)
        else:
            self.gram_diag[picked] = picks.diag
            self.rhs_new[picked] = rhs_picked
        atoms = torch.tensor(self.new_atoms, device=self.device)  # -1: this target sits the update out
        # every tensor here was built by this loop for this state: skip the argument checks
        status = lsq.lsq_update(self.state, atoms, self.gram_col, self.gram_diag, self.rhs_new,
                                lam=float(self.opts.ridge), positive=self.opts.positive, dep_tol=self.dep_tol,
                                weight_tol=self.weight_tol, checked=False).tolist()
        self.clock.lap("update")
        return status

    def residual(self, picks: _Picks, status: List[int]) -> None:
        """Phase 5: supports, exclusions and residuals after the update; the tolerance and
        rounding-floor stops."""
        sizes = self.state.size.tolist()
        for i, t in enumerate(picks.targets):
            if not self._follow_update(t, status[t], sizes[t], picks.rows[i]):
                continue
            self.R[:, t] = rows_residual_f64(self.rows_buf[t, : sizes[t]], self.weights[t], self.b_cols[t],
                                             self.r_col)
            self.hist[t].append(float(weighted_norm(self.R[:, t], self.fw)))
            if self.progress is not None:
                self.progress(1)
            if self.hist[t][-1] < self.opts.tol * self.b_norms[t]:
                self.stopped[t] = STOP_TOLERANCE
            elif sizes[t] and self.hist[t][-1] <= residual_floor(self.dtype, self.b_norms[t], self.weights[t],
                                                                 self.sup_norms[t, : sizes[t]]):
                self.stopped[t] = STOP_RESIDUAL_FLOOR
        self.clock.lap("residual")

    def _follow_update(self, t: int, st: int, size: int, row: torch.Tensor) -> bool:
        """Target t's support, row copies, weights and exclusions after K3's status st; False
        when the new atom was refused as dependent (nothing changed)."""
        j = self.new_atoms[t]
        if st & lsq.STATUS_DEPENDENT:
            self.banned[t].add(j)
            self.rejected[t] += 1
            for local_j in self.rows_at.local([j]):
                self.exclude[local_j, t] = True
            return False
        if st & lsq.STATUS_NEW_DROPPED:
            self.banned[t].add(j)
            self.rejected[t] += 1
        supports = self.supports
        if st & lsq.STATUS_DROPPED:  # the factor compacted its order: follow it
            new_support = self.state.support[t, :size].tolist()
            follow_factor_order(self.rows_buf[t], supports[t], new_support, j, row)
            self.sup_norms[t, : len(new_support)] = torch.tensor([self.norm_of[t][a] for a in new_support],
                                                                 dtype=torch.float64)
            gone = set(supports[t]) - set(new_support)
        else:  # the common case, O(1) here: appended at the end, nothing dropped
            self.rows_buf[t, len(supports[t])] = row
            self.sup_norms[t, len(supports[t])] = self.norm_of[t][j]
            new_support, gone = supports[t] + [j], set()
        supports[t] = new_support
        self.weights[t] = self.state.weights[t, :size].clone()
        self.dropped[t] += len(gone)
        for local_j in self.rows_at.local([j]):  # selected, or banned if dropped as it entered
            self.exclude[local_j, t] = True
        back = self.rows_at.local([a for a in gone if a not in self.banned[t]])
        if back:  # atoms dropped by NNLS become eligible again
            back_t = torch.tensor(back, device=self.device)
            self.exclude[back_t, t] = self.base_exclude[back_t]
        return True

    def results(self) -> List[TargetSelection]:
        """Each target's selection; with phase_seconds, what ran (e.g. "cached", or "cached,
        direct from support size 243")."""
        if self.phase_seconds is not None:
            switched = self.phase_seconds.get("switched_at_support")
            self.phase_seconds["strategy"] = (self.strategy if switched is None  # type: ignore[assignment]
                                              else f"{self.strategy}, direct from support size {switched}")
        return [
            TargetSelection(
                indices=np.asarray(self.supports[t], dtype=np.int64),
                weights=self.weights[t].detach().cpu().to(torch.float64).numpy(),
                residual_norms=np.asarray(self.hist[t], dtype=np.float64),
                stopped_by=self.stopped[t],
                iterations=self.iterations[t],
                rejected=self.rejected[t],
                dropped=self.dropped[t],
                passes=float(self.passes),
            )
            for t in range(self.m)
        ]
