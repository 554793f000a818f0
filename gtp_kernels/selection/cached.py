"""The cached strategy of the exact pursuit (selection.pursuit), and when to use it.

Correlations from cached columns instead of A:

    c = A W (b - A_S^T w) = c_base - (A W A_S^T)(w - w_base),   c_base = A W r_base,

with the columns C[:, s] = A W a_s of the selected atoms kept in memory (:class:`ColumnCache`),
so an iteration costs N*|S| instead of N*D. The subtraction cancels as the residual shrinks, so
the correlations are re-anchored (one pass, c_base = A W r) each time ||r|| falls by a factor
ANCHOR_DROP. The column of a newly selected atom comes from A: when it is not cached, one pass
computes the columns of it *and* of the next most correlated candidates (a skinny GEMM).
:class:`CachedCorrelations` holds the anchor, the cache and the fetches.

The timing heuristics (the cost model in passes over A, and on CPU the measured switch to the
direct strategy) are grouped below: :func:`choose_strategy` decides the start, and
:class:`CachedCorrelations` watches its own cost.
"""
from __future__ import annotations

import heapq
import os
import time
from typing import Dict, List, Optional

import torch

from ..ops.backends import candidate_products

# cached strategy: re-anchor the correlations once ||r|| < ANCHOR_DROP * ||r_anchor||
ANCHOR_DROP = {torch.float32: 0.1, torch.float64: 1e-6}


class ColumnCache:
    """Columns A W a_atom for a set of atoms, stored as rows of C_T (capacity, N) so that
    inserting one is a contiguous write; slots are reused once an atom is no longer needed."""

    def __init__(self, n: int, capacity: int, dtype: torch.dtype, device: torch.device):
        self.C_T = torch.empty(capacity, n, dtype=dtype, device=device)
        self.capacity = capacity
        self.slot_of: Dict[int, int] = {}
        self._free = list(range(capacity))
        heapq.heapify(self._free)
        self._order: List[int] = []  # insertion order, for evicting unpinned columns
        self.hi = 0  # 1 + highest slot in use: products only touch C_T[:hi]

    def missing(self, atoms) -> List[int]:
        return [a for a in dict.fromkeys(atoms) if a not in self.slot_of]

    def insert(self, atoms: List[int], columns: torch.Tensor, pinned: set) -> None:
        """Store columns[:, i] for atoms[i]; evicts unpinned columns, oldest first, when full."""
        slots, fresh = [], []
        for i, a in enumerate(atoms):
            if a in self.slot_of:
                continue
            if not self._free:
                self._evict(pinned)
            if not self._free:
                break  # full of pinned columns: the rest of this prefetch is dropped
            s = heapq.heappop(self._free)
            self.slot_of[a] = s
            self._order.append(a)
            self.hi = max(self.hi, s + 1)
            slots.append(s)
            fresh.append(i)
        if slots:
            self.C_T[torch.tensor(slots, device=self.C_T.device)] = columns[:, fresh].T

    def _evict(self, pinned: set) -> None:
        for i, a in enumerate(self._order):
            if a not in pinned:
                heapq.heappush(self._free, self.slot_of.pop(a))
                del self._order[i]
                return


# ---- timing heuristics: the cost model and the measured switch ----------------------------

def cache_budget_bytes(device: torch.device) -> int:
    """Bytes the column cache may take: half the free GPU memory, 40% of the available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        avail = 4 << 30
    return int(avail * 0.4)


# Passes over A that column fetches cost per cached iteration: about 0.2 misses per iteration
# with the default prefetch, each a skinny GEMM costing about one pass on a GPU (memory-bound)
# and about three on a CPU (compute-bound there: 17 columns through ops.products cost 1.3-2.7
# of its passes, 2.5-3 of torch's GEMV). On CPU the switch points this gives at D = 1024
# (~410 columns) sit in a flat optimum: forced switches at 100..600 columns measured within
# 0.79-0.85x / 0.66-0.76x / 0.62-0.65x of the floor at N = 10k / 20k / 40k, k = 800.
FETCH_PASSES = {"cuda": 0.25, "cpu": 0.6}


# auto, CPU: switch to direct once the last MEASURE_ITERATIONS cached iterations (the first
# cached iteration aside) took SWITCH_MARGIN times longer on average than the pass that started
# the pursuit. The model above misses what timing sees:
# where a pass is cheap (A in L3, small D) a compute-bound column fetch costs up to ~8 passes,
# not ~3, and the per-iteration bookkeeping is not free (e.g. N = 20k, D = 256, k = 100: cached
# 1.03x the floor against direct 0.31x). The selection is the same either way.
MEASURE_ITERATIONS = 16
# ... measured in CPU seconds of the calling thread, which runs its share of every parallel
# product: another job on the machine inflates neither side (wall time made a busy spell look
# like "cached got dearer" and switched a k << D run to direct for good, 36 -> 81 passes at
# N = 100k), and, unlike the process's CPU time, the reading is exact: Linux adds the other
# threads' runtime at scheduler ticks, so a 1 ms pass read 1.3-5 ms and runs switched where
# cached was 15-35% faster (N = 10k, D = 1024, k = 50 and 200; N = 40k, k = 200).
cpu_seconds = time.thread_time
# ... by this factor: the switch is for good, and a window holding one compute-bound column
# fetch (p = 17 columns: several passes' worth where A sits in L3) whose columns serve later
# iterations looks dearer than the run it belongs to
SWITCH_MARGIN = 1.25


def cached_iteration_passes(columns: int, dim: int, a_bytes: int, c_bytes: int, on_gpu: bool) -> float:
    """Cost of one cached iteration in passes over A (N*D*a_bytes bytes): the product with
    `columns` cached columns (N*columns*c_bytes bytes) plus the expected column fetches."""
    return columns * c_bytes / (dim * a_bytes) + cached_iteration_passes_fixed(on_gpu)


def cached_iteration_passes_fixed(on_gpu: bool) -> float:
    """The part of a cached iteration's cost that does not grow with the columns: the fetches."""
    return FETCH_PASSES["cuda" if on_gpu else "cpu"]


def switch_columns(dim: int, a_bytes: int, c_bytes: int, on_gpu: bool) -> int:
    """Cached columns at which a cached iteration costs a full pass (cached_iteration_passes
    solved for 1): past it, direct is cheaper."""
    return max(1, int((1.0 - cached_iteration_passes_fixed(on_gpu)) * dim * a_bytes / c_bytes))


def choose_strategy(n: int, dim: int, a_bytes: int, c_bytes: int, capacity: int, start_columns: int,
                    budget_bytes: int, on_gpu: bool) -> str:
    """Pick 'cached' when its columns fit and its first iterations cost less than a pass.

    Costs in passes over A: direct 1 per iteration; cached grows with the support (see
    cached_iteration_passes), and the auto pursuit switches to direct once it reaches a pass
    (switch_columns), so only the start decides. capacity: columns the cache may hold;
    start_columns: those the first iterations touch (one fetch: needed + prefetched).
    """
    if n * capacity * c_bytes > budget_bytes:
        return "direct"
    cached = cached_iteration_passes(start_columns, dim, a_bytes, c_bytes, on_gpu)
    return "cached" if cached < 0.9 else "direct"


class CachedCorrelations:
    """The cached strategy's state for all m targets: the anchor (c_base, w_base, ||r_base||),
    the column cache, and (auto on CPU) the measured cost of its iterations.

    Anchor: c_base = A W r_base for a residual r_base = b - A^T w_base (first b itself); then
    c = c_base - (A W A^T)(w - w_base) over the atoms whose weight moved. Constructing it makes
    the first anchor pass over A.
    """

    def __init__(self, A, BW: torch.Tensor, b_norms: List[float], n: int, dtype: torch.dtype, backend: str,
                 capacity: int, k: int, rows_at, switch_at: Optional[int], on_gpu: bool):
        m = BW.shape[1]
        self.A, self.dtype, self.backend, self.rows_at = A, dtype, backend, rows_at
        self.switch_at, self.on_gpu = switch_at, on_gpu  # switch_at: auto's model switch (None: stay cached)
        t0 = cpu_seconds()
        self.base_c = candidate_products(A, BW.to(dtype), dtype, backend)  # (N, m): one pass
        self.pass_seconds = cpu_seconds() - t0
        self.base_w: List[Dict[int, float]] = [{} for _ in range(m)]
        self.base_norm = list(b_norms)
        self.anchor_drop = ANCHOR_DROP[dtype]
        self.cache = ColumnCache(n, capacity + k // 8 + 16, dtype, A.device)
        self.key: Optional[torch.Tensor] = None  # this iteration's ranking, for the prefetch
        # auto on CPU also switches on measured cost: CPU seconds of the last cached iterations
        # (product + column fetches, not what both strategies do) against one pass over A
        self.costs: List[float] = []
        self.iterations = 0
        self.probe = self.switch_next = False
        self.window = 0.0
        self._t_iteration = 0.0

    def should_switch(self) -> bool:
        """auto: continue direct from this iteration, from the exact residuals? Yes once the
        cached product costs a pass (model), or MEASURE_ITERATIONS cached iterations measured
        dearer than passes (CPU; checked on the same iterations on every rank)."""
        switch = self.cache.hi >= self.switch_at or self.switch_next
        self.probe = False
        if not self.on_gpu and len(self.costs) == MEASURE_ITERATIONS:
            self.window = sum(self.costs)
            self.costs.clear()
            # dearer than the pass measured at the start: time a pass now, under the same
            # conditions (the start's may have found A in cache), before switching for good
            self.probe = self.rows_at.agree(self.window > SWITCH_MARGIN * MEASURE_ITERATIONS * self.pass_seconds)
        return switch

    def best(self, R: torch.Tensor, fw: Optional[torch.Tensor], live: List[int], hist: List[List[float]],
             supports: List[List[int]], weights: List[torch.Tensor], exclude: torch.Tensor, positive: bool):
        """(best value, best local index) per target from the cached columns, and the passes over
        A spent (1 when some target re-anchored, else 0)."""
        self._t_iteration = cpu_seconds()
        # c_base - C (w - w_base) loses about eps * ||r_base|| / ||r|| to cancellation:
        # re-anchor (one pass) once the residual fell by anchor_drop since the anchor.
        stale = [t for t in live if hist[t][-1] < self.anchor_drop * self.base_norm[t]]
        if self.probe:  # the probe's pass re-anchors every target: this iteration uses it
            stale = live
        passes = 0
        if stale:
            RW = (R[:, stale] if fw is None else R[:, stale] * fw[:, None]).to(self.dtype)
            t_pass = cpu_seconds()
            self.base_c[:, stale] = candidate_products(self.A, RW, self.dtype, self.backend)
            if self.probe:
                self.pass_seconds = cpu_seconds() - t_pass
                self.switch_next = self.rows_at.agree(
                    self.window > SWITCH_MARGIN * MEASURE_ITERATIONS * self.pass_seconds)
            for t in stale:
                self.base_w[t] = dict(zip(supports[t], weights[t].tolist()))
                self.base_norm[t] = hist[t][-1]
            passes = 1
        scores = self._scores(live, supports, weights)
        key = scores if positive else scores.abs_()
        key.masked_fill_(exclude, -float("inf"))
        self.key = key
        best_val, best_idx = torch.max(key, dim=0)  # ties: the first (lowest) index
        return best_val, best_idx, passes

    def _scores(self, live: List[int], supports: List[List[int]], weights: List[torch.Tensor]) -> torch.Tensor:
        """c_base - C (w - w_base), over the atoms whose weight moved since the anchor."""
        moved = {}
        for t in live:
            delta = {a: -w for a, w in self.base_w[t].items()}
            for a, w in zip(supports[t], weights[t].tolist()):
                delta[a] = delta.get(a, 0.0) + w
            moved[t] = {a: v for a, v in delta.items() if v != 0.0}
        if not any(moved.values()):  # nothing moved since the anchor (the cache may hold only unwritten slots)
            return self.base_c.clone()
        device, cache = self.base_c.device, self.cache
        Wmat = torch.zeros(cache.hi, self.base_c.shape[1], dtype=self.dtype, device=device)
        for t, delta in moved.items():
            if delta:
                slots = torch.tensor([cache.slot_of[a] for a in delta], device=device)
                Wmat[slots, t] = torch.tensor(list(delta.values()), dtype=self.dtype, device=device)
        return torch.addmm(self.base_c, cache.C_T[: cache.hi].T, Wmat, alpha=-1.0)

    def fetch_columns(self, new_atoms: List[int], picked: List[int], supports: List[List[int]], prefetch: int,
                      fw_c: Optional[torch.Tensor]) -> int:
        """Make sure the new atoms' columns A W a_j are cached, fetching the most likely next
        picks in the same read of A; returns the passes spent (0 or 1)."""
        wanted = [new_atoms[t] for t in picked]
        missing = self.cache.missing(wanted)
        if not missing:
            return 0
        extra: List[int] = []
        for t in picked:
            top = self.rows_at.top(self.key[:, t], prefetch + 1)
            extra.extend(a for a in top if a not in self.cache.slot_of)
        fetch = list(dict.fromkeys(missing + extra))[: len(missing) + prefetch]
        X = self.rows_at.fetch(self.A, fetch, self.dtype)
        if fw_c is not None:
            X = X * fw_c
        pinned = {a for s in supports for a in s} | {a for bw in self.base_w for a in bw} | set(wanted)
        self.cache.insert(fetch, candidate_products(self.A, X.T, self.dtype, self.backend), pinned)
        if any(a not in self.cache.slot_of for a in wanted):  # pragma: no cover - capacity covers k*m
            raise RuntimeError("column cache too small for the supports")
        return 1

    def record_cost(self) -> None:
        """This iteration's CPU seconds (from best() to now) into the measured window; the
        first (its fetch and the cache's first touch are sunk) and a probe's are not measured."""
        cost = cpu_seconds() - self._t_iteration
        if self.iterations and not self.probe:
            self.costs.append(cost)
        self.iterations += 1
