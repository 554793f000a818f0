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

import heapq
import math
import os
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from ..ops import lsq
from ..ops.products import row_products, rows_dot_f64, rows_residual_f64, selected_rows_dtype
from ..validation import Problem
from .reference import weighted_norm
from .rows import RowSource, gather_rows
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
)

_CHUNK_ELEMENTS = 1 << 24
# cached strategy: re-anchor the correlations once ||r|| < ANCHOR_DROP * ||r_anchor||
ANCHOR_DROP = {torch.float32: 0.1, torch.float64: 1e-6}


def _use_kernels(A: torch.Tensor, dtype: torch.dtype, backend: str) -> bool:
    """The K2 kernels compute in float32; "auto" uses them on CUDA tensors only."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    return dtype == torch.float32 and (backend == "triton" or (backend == "auto" and A.is_cuda))


def candidate_products(A: torch.Tensor, X: torch.Tensor, dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
    """A @ X as an (N, p) matrix in dtype; one read of A.

    On CUDA in float32 this is the K2 kernel family (fp32 accumulation over bf16/fp16/fp32
    rows); on CPU in float32 the compiled row-products kernel (ops.products, about 1.6x
    torch's GEMV here and 2-3x its skinny GEMM; fp16/bf16 rows converted as they are read);
    elsewhere a chunked torch matmul,
    upcasting A a block of rows at a time. A row source (selection.rows) runs a chunk at a
    time through the same paths, each chunk in its stored dtype.
    """
    if isinstance(A, RowSource):
        out = torch.empty(A.num_rows, X.shape[1], dtype=dtype, device=A.device)
        for start, chunk in A.chunks(_CHUNK_ELEMENTS):
            out[start : start + chunk.shape[0]] = candidate_products(chunk, X, dtype, backend)
        return out
    if _use_kernels(A, dtype, backend):
        from ..ops.correlate import candidate_scores

        return candidate_scores(A, X.contiguous(), backend="triton")
    # the row-products op reads float32 rows, and fp16/bf16 rows without a float32 copy
    if backend != "torch" and (A.dtype == dtype or (dtype == torch.float32 and not A.is_cuda
                                                    and A.dtype in (torch.float16, torch.bfloat16))):
        return row_products(A, X.T)
    if A.dtype == dtype:
        return A @ X
    out = torch.empty(A.shape[0], X.shape[1], dtype=dtype, device=A.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, A.shape[1]))
    for start in range(0, A.shape[0], step):
        out[start : start + step] = A[start : start + step].to(dtype) @ X
    return out


def masked_top(A, RW, exclude, count, positive, dtype, backend):
    """One read of A: per column of A @ RW, the `count` best masked rows as (m, count) values
    and indices (|scores| ranked when not positive). K2 on the kernel path; in torch, count 1
    uses torch.max, whose ties go to the lowest index as the reference's argmax does. A row
    source goes through candidate_products, a chunk at a time."""
    if isinstance(A, torch.Tensor) and _use_kernels(A, dtype, backend):
        from ..ops.correlate import correlate_topk

        values, idx = correlate_topk(A, RW.contiguous(), count, exclude=exclude, absolute=not positive,
                                     backend="triton")
        return (values if positive else values.abs()), idx
    scores = candidate_products(A, RW, dtype, backend)
    key = (scores if positive else scores.abs()).masked_fill(exclude, -float("inf"))
    if count == 1:
        values, idx = torch.max(key, dim=0)
        return values[:, None], idx[:, None]
    values, idx = torch.topk(key, min(count, key.shape[0]), dim=0, sorted=True)
    return values.T, idx.T


class _ColumnCache:
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


def _cache_budget_bytes(device: torch.device) -> int:
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
_cpu_seconds = time.thread_time
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
    rows_at = placement if placement is not None else LocalRows()
    if phase_seconds is not None:  # a dict reused across calls must not carry the last run's switch
        phase_seconds.pop("switched_at_support", None)
    if strategy not in ("auto", "direct", "cached"):
        raise ValueError(f"strategy must be 'auto', 'direct' or 'cached', got {strategy!r}")
    dtype = opts.resolved_compute_dtype(problem.candidates.dtype)  # the N-sized products
    f64 = torch.float64  # the k-sized maths (Gram entries, factor, weights, residual)
    A = problem.candidates
    device = A.device
    N, D, m = problem.num_candidates, problem.dim, problem.num_targets
    fw = problem.feature_weights(f64)
    fw_c = None if fw is None else fw.to(dtype)
    B = problem.targets.to(f64)
    BW = B if fw is None else B * fw[:, None]
    lam = float(opts.ridge)
    min_cos = opts.resolved_min_cosine(dtype)
    dep_tol = opts.resolved_dep_tol(dtype)
    weight_tol = opts.resolved_weight_tol(dtype)
    max_iters = opts.resolved_max_iters(k)

    if prefetch is None:
        prefetch = 32 if device.type == "cuda" else 16
    capacity = k * m + 2 * prefetch
    on_gpu = device.type == "cuda"
    c_bytes = torch.finfo(dtype).bits // 8
    # auto: cached while its iterations cost less than a pass, then direct (same selection)
    switch_at = None
    if strategy == "auto":
        switch_at = switch_columns(D, A.element_size(), c_bytes, on_gpu)
        # the cache never needs more than the columns held when it switches, plus one fetch
        capacity = min(capacity, switch_at + 2 * prefetch + m)
        strategy = choose_strategy(N, D, A.element_size(), c_bytes, capacity, m + prefetch,
                                   _cache_budget_bytes(device), on_gpu)
        strategy = "cached" if rows_at.agree(strategy == "cached") else "direct"

    state = lsq.lsq_init(m, k, f64, device)
    base_exclude = problem.exclude
    banned = [set() for _ in range(m)]
    exclude = base_exclude[:, None].repeat(1, m)
    R = B.clone()  # residuals, float64
    b_norms = weighted_norm(B.T, fw).tolist()
    hist: List[List[float]] = [[x] for x in b_norms]
    stopped: List[Optional[str]] = [None] * m
    iterations, rejected, dropped = [0] * m, [0] * m, [0] * m
    first_corr: List[Optional[float]] = [None] * m
    supports: List[List[int]] = [[] for _ in range(m)]
    # copies of each target's selected rows, in support order (k x D): float32 where that is
    # exact and the float64-accumulating kernels run (half the bytes), else float64
    rows_buf = torch.empty(m, k, D, dtype=selected_rows_dtype(A), device=device)
    b_cols = [B[:, t].contiguous() for t in range(m)]
    r_col = torch.empty(D, dtype=f64, device=device)
    weights: List[torch.Tensor] = [torch.zeros(0, dtype=f64, device=device) for _ in range(m)]
    # ||a||_W of each target's picked atoms, and of its support in factor order (the residual floor)
    norm_of: List[Dict[int, float]] = [{} for _ in range(m)]
    sup_norms = torch.zeros(m, k, dtype=f64, device=device)
    passes = 0
    # per-iteration K3 inputs, allocated once (entries past a target's support are ignored)
    gram_col = torch.zeros(m, k, dtype=f64, device=device)
    gram_diag = torch.zeros(m, dtype=f64, device=device)
    rhs_new = torch.zeros(m, dtype=f64, device=device)
    all_targets = list(range(m))

    clock = _PhaseClock(phase_seconds, device)
    cache = None
    # auto on CPU also switches on measured cost: CPU seconds of the last cached iterations
    # (product + column fetches, not what both strategies do) against one pass over A
    cached_costs: List[float] = []
    cached_iterations = 0
    pass_seconds = 0.0
    probe = switch_next = False
    if strategy == "cached":
        # Anchor: c_base = A W r_base for a residual r_base = b - A^T w_base (first b itself);
        # then c = c_base - (A W A^T)(w - w_base) over the atoms whose weight moved.
        t0 = _cpu_seconds()
        base_c = candidate_products(A, BW.to(dtype), dtype, opts.backend)  # (N, m): one pass
        pass_seconds = _cpu_seconds() - t0
        base_w: List[Dict[int, float]] = [{} for _ in range(m)]
        base_norm = list(b_norms)
        anchor_drop = ANCHOR_DROP[dtype]
        passes += 1
        cache = _ColumnCache(N, capacity + k // 8 + 16, dtype, device)

    while True:
        for t in range(m):
            if stopped[t] is None and len(supports[t]) == k:
                stopped[t] = STOP_BUDGET
            elif stopped[t] is None and iterations[t] >= max_iters:
                stopped[t] = STOP_MAX_ITERS
        live = [t for t in range(m) if stopped[t] is None]
        if not live:
            break

        # 1. correlations and the best candidate per target
        if cache is not None and switch_at is not None:  # auto, still cached
            # the cached product now costs a pass (model), or MEASURE_ITERATIONS cached
            # iterations measured dearer than passes (CPU; checked on the same iterations on
            # every rank): continue direct, from the exact residuals
            switch = cache.hi >= switch_at or switch_next
            probe = False
            if not on_gpu and len(cached_costs) == MEASURE_ITERATIONS:
                window = sum(cached_costs)
                cached_costs.clear()
                # dearer than the pass measured at the start: time a pass now, under the same
                # conditions (the start's may have found A in cache), before switching for good
                probe = rows_at.agree(window > SWITCH_MARGIN * MEASURE_ITERATIONS * pass_seconds)
            if switch:
                cache = base_c = None
                if phase_seconds is not None:  # a support size, not seconds
                    phase_seconds["switched_at_support"] = max(len(x) for x in supports)  # type: ignore[assignment]
        if cache is not None:
            t_cached = _cpu_seconds()
            # c_base - C (w - w_base) loses about eps * ||r_base|| / ||r|| to cancellation:
            # re-anchor (one pass) once the residual fell by anchor_drop since the anchor.
            stale = [t for t in live if hist[t][-1] < anchor_drop * base_norm[t]]
            if probe:  # the probe's pass re-anchors every target: this iteration uses it
                stale = live
            if stale:
                RW = (R[:, stale] if fw is None else R[:, stale] * fw[:, None]).to(dtype)
                t_pass = _cpu_seconds()
                base_c[:, stale] = candidate_products(A, RW, dtype, opts.backend)
                if probe:
                    pass_seconds = _cpu_seconds() - t_pass
                    switch_next = rows_at.agree(window > SWITCH_MARGIN * MEASURE_ITERATIONS * pass_seconds)
                for t in stale:
                    base_w[t] = dict(zip(supports[t], weights[t].tolist()))
                    base_norm[t] = hist[t][-1]
                passes += 1
            moved = {}
            for t in live:
                delta = {a: -w for a, w in base_w[t].items()}
                for a, w in zip(supports[t], weights[t].tolist()):
                    delta[a] = delta.get(a, 0.0) + w
                moved[t] = {a: v for a, v in delta.items() if v != 0.0}
            if any(moved.values()):
                Wmat = torch.zeros(cache.hi, m, dtype=dtype, device=device)
                for t, delta in moved.items():
                    if delta:
                        slots = torch.tensor([cache.slot_of[a] for a in delta], device=device)
                        Wmat[slots, t] = torch.tensor(list(delta.values()), dtype=dtype, device=device)
                scores = torch.addmm(base_c, cache.C_T[: cache.hi].T, Wmat, alpha=-1.0)
            else:  # nothing moved since the anchor (the cache may hold only unwritten slots)
                scores = base_c.clone()
            key = scores if opts.positive else scores.abs_()
            key.masked_fill_(exclude, -float("inf"))
            best_val, best_idx = torch.max(key, dim=0)  # ties: the first (lowest) index
        else:
            RW = (R if fw is None else R * fw[:, None]).to(dtype)
            best_val, best_idx = (x[:, 0] for x in masked_top(A, RW, exclude, 1, opts.positive, dtype, opts.backend))
            passes += 1
        best_val, best_idx = rows_at.best(best_val, best_idx)
        best_val = best_val.tolist()
        best_idx = best_idx.tolist()
        clock.lap("correlation")

        # 2. stop tests on the picks
        new_atoms = [-1] * m
        for t in live:
            iterations[t] += 1
            if best_val[t] == -float("inf"):
                stopped[t] = STOP_EXHAUSTED
            else:
                new_atoms[t] = best_idx[t]
        picked = [t for t in live if new_atoms[t] >= 0]
        if not picked:
            continue
        rows = rows_at.fetch(A, [new_atoms[t] for t in picked], f64)  # (p, D)
        rows_w = rows if fw is None else rows * fw
        diag = (rows_w * rows).sum(dim=1)
        diag_host = diag.tolist()
        for i, t in enumerate(picked):
            v = best_val[t]
            norm_of[t][new_atoms[t]] = math.sqrt(diag_host[i])
            if v <= min_cos * math.sqrt(diag_host[i]) * hist[t][-1]:
                stopped[t], new_atoms[t] = STOP_NO_CORRELATION, -1
            elif first_corr[t] is None:
                first_corr[t] = v
            elif opts.stop_ratio is not None and v < opts.stop_ratio * first_corr[t]:
                stopped[t], new_atoms[t] = STOP_GUARD, -1
        go = [i for i, t in enumerate(picked) if new_atoms[t] >= 0]
        if not go:
            continue
        if len(go) < len(picked):  # some target stopped on its pick: drop its row
            picked = [picked[i] for i in go]
            rows, rows_w, diag = rows[go], rows_w[go], diag[go]

        # 3. cached strategy: make sure the new atoms' columns A W a_j are in the cache,
        #    fetching the most likely next picks in the same read of A
        if cache is not None:
            wanted = [new_atoms[t] for t in picked]
            missing = cache.missing(wanted)
            if missing:
                extra: List[int] = []
                for t in picked:
                    top = rows_at.top(key[:, t], prefetch + 1)
                    extra.extend(a for a in top if a not in cache.slot_of)
                fetch = list(dict.fromkeys(missing + extra))[: len(missing) + prefetch]
                X = rows_at.fetch(A, fetch, dtype)
                if fw_c is not None:
                    X = X * fw_c
                pinned = {a for s in supports for a in s} | {a for bw in base_w for a in bw} | set(wanted)
                cache.insert(fetch, candidate_products(A, X.T, dtype, opts.backend), pinned)
                passes += 1
                if any(a not in cache.slot_of for a in wanted):  # pragma: no cover - capacity covers k*m
                    raise RuntimeError("column cache too small for the supports")
        if cache is not None:
            cost = _cpu_seconds() - t_cached
            if cached_iterations and not probe:  # the first (its fetch and the cache's first
                cached_costs.append(cost)  # touch are sunk) and a probe's pass are not measured
            cached_iterations += 1
        clock.lap("columns")

        # 4. least-squares update (K3), float64 Gram entries from the selected rows
        for i, t in enumerate(picked):
            if supports[t]:
                rows_dot_f64(rows_buf[t, : len(supports[t])], rows_w[i], gram_col[t, : len(supports[t])])
        rhs_picked = (rows_w * B.T[picked]).sum(dim=1)
        if picked == all_targets:  # the common case: every target picked, no scatter
            gram_diag.copy_(diag)
            rhs_new.copy_(rhs_picked)
        else:
            gram_diag[picked] = diag
            rhs_new[picked] = rhs_picked
        atoms = torch.tensor(new_atoms, device=device)  # -1: this target sits the update out
        # every tensor here was built by this loop for this state: skip the argument checks
        status = lsq.lsq_update(state, atoms, gram_col, gram_diag, rhs_new, lam=lam,
                                positive=opts.positive, dep_tol=dep_tol, weight_tol=weight_tol,
                                checked=False).tolist()
        sizes = state.size.tolist()
        clock.lap("update")

        # 5. bookkeeping and residuals
        for i, t in enumerate(picked):
            st, j = status[t], new_atoms[t]
            if st & lsq.STATUS_DEPENDENT:
                banned[t].add(j)
                rejected[t] += 1
                for local_j in rows_at.local([j]):
                    exclude[local_j, t] = True
                continue
            if st & lsq.STATUS_NEW_DROPPED:
                banned[t].add(j)
                rejected[t] += 1
            if st & lsq.STATUS_DROPPED:  # the factor compacted its order: follow it
                new_support = state.support[t, : sizes[t]].tolist()
                follow_factor_order(rows_buf[t], supports[t], new_support, j, rows[i])
                sup_norms[t, : len(new_support)] = torch.tensor([norm_of[t][a] for a in new_support], dtype=f64)
                gone = set(supports[t]) - set(new_support)
            else:  # the common case, O(1) here: appended at the end, nothing dropped
                rows_buf[t, len(supports[t])] = rows[i]
                sup_norms[t, len(supports[t])] = norm_of[t][j]
                new_support, gone = supports[t] + [j], set()
            supports[t] = new_support
            weights[t] = state.weights[t, : sizes[t]].clone()
            dropped[t] += len(gone)
            for local_j in rows_at.local([j]):  # selected, or banned if dropped as it entered
                exclude[local_j, t] = True
            back = rows_at.local([a for a in gone if a not in banned[t]])
            if back:  # atoms dropped by NNLS become eligible again
                back_t = torch.tensor(back, device=device)
                exclude[back_t, t] = base_exclude[back_t]
            R[:, t] = rows_residual_f64(rows_buf[t, : sizes[t]], weights[t], b_cols[t], r_col)
            hist[t].append(float(weighted_norm(R[:, t], fw)))
            if progress is not None:
                progress(1)
            if hist[t][-1] < opts.tol * b_norms[t]:
                stopped[t] = STOP_TOLERANCE
            elif sizes[t] and hist[t][-1] <= residual_floor(dtype, b_norms[t], weights[t], sup_norms[t, : sizes[t]]):
                stopped[t] = STOP_RESIDUAL_FLOOR
        clock.lap("residual")

    if phase_seconds is not None:  # what ran: e.g. "cached", or "cached, direct from support size 243"
        switched = phase_seconds.get("switched_at_support")
        phase_seconds["strategy"] = (strategy if switched is None  # type: ignore[assignment]
                                     else f"{strategy}, direct from support size {switched}")
    return [
        TargetSelection(
            indices=np.asarray(supports[t], dtype=np.int64),
            weights=weights[t].detach().cpu().to(torch.float64).numpy(),
            residual_norms=np.asarray(hist[t], dtype=np.float64),
            stopped_by=stopped[t],
            iterations=iterations[t],
            rejected=rejected[t],
            dropped=dropped[t],
            passes=float(passes),
        )
        for t in range(m)
    ]

