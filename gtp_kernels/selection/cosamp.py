"""GTP by compressive sampling (SPEC algorithm 2): the same pursuit, a few passes over A.

Exact pursuit reads all of A for every atom it adds. Compressive sampling reads A once per
*pass* and then pursues inside a sample (design, our reading of CoSaMP for a non-negative,
joint selection):

  1. one read of A, for all m targets at once: the top 2M correlations of each residual,
     c = A W r_pass, among rows not selected (K2 ``correlate_topk`` with m_top > 1). The top
     M rows are the *sample*; ranks M..2M the *tail*, whose pass correlations are kept; the
     n_beyond other eligible rows correlated at most tau (the 2M-th value; 0 where the list
     ran out of positive ones) with r_pass;
  2. pursuit inside the sample with exact correlations of the sampled rows (M x D a step),
     the float64 Cholesky/NNLS update (K3) and exact pursuit's stopping rules. A pass's first
     pick is the global argmax; a later pick that would stop the pursuit (no correlation,
     guard) ends the pass instead, so stops are decided on global values, as exact pursuit's;
  3. before each later pick, a test: may a row outside the sample now beat the sample's best
     v? Split r = alpha r_pass + r_perp (alpha = <r, r_pass>_W / ||r_pass||_W^2): a row's
     correlation is now alpha c_pass + e, e = a^T W r_perp. The sampled rows' e are known;
     the other rows' e are modelled N(0, sigma^2), sigma the RMS e of the unpicked sample
     (for Gaussian rows e is independent of c_pass, so selecting on c_pass does not bias it;
     measuring it on the data covers non-isotropic rows). The expected number of rows outside
     the sample above v is then

        sum_tail Q((v - alpha c_i) / sigma) + n_beyond Q((v - alpha tau) / sigma)

     (both tails when positive=False), and the pass ends once it exceeds WRONG_PICKS / k:
     about WRONG_PICKS picks per run that exact pursuit would not make.

The sample (the user's batch_size fixes it) starts at M = N / PICKS_PER_PASS rows, at least
MIN_SAMPLE (a floor for tiny N, not tuned) and at most MAX_SAMPLE_BYTES of rows (1 GiB: the
working set stays bounded as N grows; on CPU fp16/bf16 rows are sampled as stored): a 12-pick
pass then spends as many row products in the sample as the pass spent on A. It doubles (up to
N/2, within the byte cap)
after a pass the test cut short while the target averages fewer than PICKS_PER_PASS picks a
pass, and halves after a pass of more than 2 * PICKS_PER_PASS picks (in-sample work that a
smaller sample would have done too) unless no more atoms are left to pick than that pass made:
the same sample then likely ends the run in one pass, where half of it often needed another
pass over A for the last few picks (N = 10k, D = 1024, k = 50: 33, 14 and 3 picks in 3 passes
before; one pass fewer in 7 of 37 runs of cosamp_quality's shapes, never more, same residuals).
Picks per pass grow with the sample's share of N and with D - |S| (the residual's room), not
with k, so passes are about k / PICKS_PER_PASS where D >= ~1000, and more where D is small
and k near D.

Why a test this strict: where k approaches D the final residual hangs on every pick. At
k/D = 0.8 (N = 10k, D = 1024) one pick that exact pursuit would not make (its best beat the
sample's by 0.6%, step 581 of 800) left the final residual 15% above exact pursuit's; the
previous rule (tau alone, plus resampling once the residual fell to 0.6 of its norm at the
pass) landed 0.97-1.48x exact pursuit's at k = 800 and 1.00-1.07x at k = 200. Checked with
an oracle computing every global argmax (N = 10k, D = 1024, k = 200 and 800): WRONG_PICKS = 1
made no wrong pick once past the target's 50 planted rows (16 runs; for those rows see the
limit below). On seeds 0-3, WRONG_PICKS = 10 made 7 such wrong picks in 8 runs (0.99-1.00x
exact pursuit's residual) and saved few passes, 11-12 instead of 14-15 at k = 200 and 63-64
instead of 61-67 at k = 800 (the adaptive sample takes up the slack); 100 made 28 (0.93-1.23x
at k = 800).

Measured (benchmarks/cosamp_quality.py: unit-norm Gaussian rows, target 50 rows + 0.05
noise, N = 10k/20k/40k, D = 1024, seeds 0-2): residual equal to exact pursuit's (1.000x) on
all 27; passes 2-3, 12-15 and 60-68 at k = 50, 200, 800 (exact: k); in-sample work 3-4, 10
and 80-135 passes' worth. Fixed samples instead of the adaptive one, k = 800: N/25 read A
90-104 times, N/16 69-80, N/12 64-72, N/8 54-57; at N = 3000, D = 512, k = 400 a fixed N/12
read A 60-62 times (k/10 = 40), the adaptive sample 30-32 (130-173 passes' worth in-sample).
A tail of 4M instead of 2M saved 0-4 passes at k = 800, for a larger top-k per pass.

Known limit of the model: it holds where r_perp is diffuse. Where the target is sparse and
r loses most of its energy within a pass (alpha < 0.4), r_perp holds the unfound atoms and
their e are outliers: 104 wrong picks in 40 runs of five problem kinds (planted supports,
noisy sparse targets, the pool above), all at alpha <= 0.37, final residuals 0.98-1.01x
exact pursuit's (the atoms are picked later). Resampling once alpha < 0.25 (0.5) cut them to
10 (1) but took 8-9 (10-11) passes instead of 7 on noisy planted problems with N = 4000,
D = 256, k = 80 (the tests ask <= 8), so it is not done. Such an underestimated best also
ended one guarded pursuit (stop_ratio 0.3) at 10 atoms instead of exact pursuit's 12; hence
step 2 stops only on a pass's first pick.

The sampling passes stop when every target reached k atoms or a stopping rule, or after
``max_iters`` passes (default: k, the exact pursuit's count). Cost: passes x N*D plus the
in-sample steps, sum of M * D over the picks (cache-resident when M * D is small: about 3x
cheaper per row than a pass on our CPU).

Joint mode (``targets="joint"``, :func:`gtp_cosamp_joint`): exact joint pursuit's picks
(selection/joint.py: one support for m unit-norm columns, row i scored by s_i(R) =
||max(c_i(R), 0)||_2 / ||a_i||_W, c_i(R) = a_i^T W R), within ties, from a few passes over A.
It checks instead of bounding. A bound exists: s_i is 1-Lipschitz in R (||max(x, 0) -
max(y, 0)||_2 <= ||x - y||_2 and |<a_i, d>_W| <= ||a_i||_W ||d||_W), so

    s_i(R) <= s_i(R_pass) + ||W^(1/2) (R - R_pass)||_2   (spectral norm),

but one pick moves R by about its own score, more than the gaps between the pool's best
scores, so after a pass's first pick it clears no row; and the statistical model above (the
unsampled rows' drift as Gaussian) is wrong exactly where joint selection is used, on duplicated
and strongly correlated rows. A round instead:

  1. takes the global best row at the current residuals R_0 (known from the last pass) on the
     pursuit itself (:class:`JointPursuit`, exact pursuit's own state and NNLS bookkeeping);
  2. speculates: up to p more picks on a copy of the pursuit, each the best row of the sample
     (the M best rows at the last pass; M as above: N / PICKS_PER_PASS, at least MIN_SAMPLE,
     within MAX_SAMPLE_BYTES, doubled up to N/2 after a round whose first wrong pick lay outside
     it), scored exactly on the copy's residuals;
  3. verifies, in one pass over A, which row exact pursuit would pick at each speculated
     step (:class:`_Verifier`): the residuals of every step are R_s = R_0 - A_T^T X_s (T the
     rows in S during the round, X_s the change of their weights), so the pass computes
     P = A W [R_0 | A_T^T] (m + |T| columns, not m per step) and each step's scores follow as
     P_R - P_T X_s (N |T| m flops, for the steps checked only). These differ from exact
     pursuit's scores by rounding, within a bound delta_s from the products' error analysis;
     the rows within 2 delta_s of the best (a handful; 1-4 in float32 at N = 20k) are scored
     exactly as exact pursuit scores them, from their gathered rows, and the best of them is the
     pick (ties: the lowest index). The picks up to the first that was not exact pursuit's are
     kept (the copy becomes the pursuit when all were, on the same scores; else the kept picks
     are applied again to the pursuit with the exact scores, so every stop is decided on
     global scores); the best after them is the next round's step 1, and that step's scores
     give the next sample.

p starts at SPECULATE, doubles after a round that kept every pick, else becomes twice the picks
kept (MIN_SPECULATE..MAX_SPECULATE). Passes: one for the row norms, one for the first scores,
then one per round, about k / (picks kept per round + 1): N = 20k, D = 512, m = 24, k = 100
(unit rows, columns of 300 rows + noise) 7 passes instead of 101, and about a fifth of exact
pursuit's row products (m + |T| columns a round instead of m a pick).
"""
from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import torch

from ..ops import lsq
from ..ops.backends import CHUNK_ELEMENTS, candidate_products, masked_top
from ..ops.products import row_products, rows_dot_f64, rows_residual_f64, selected_rows_dtype
from ..validation import Problem
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
from .joint import JointPursuit
from .pursuit import follow_factor_order
from .rows import gather_rows, row_chunks

# first sample N / PICKS_PER_PASS rows (in-sample work of a 12-pick pass = one pass over A);
# the sample grows while the passes average fewer picks than this
PICKS_PER_PASS = 12
# ... at least this many rows, for the sample's estimate of sigma (small N)
MIN_SAMPLE = 64
# expected picks per run that exact pursuit would not make (step 3)
WRONG_PICKS = 1.0

# ... and at most this many bytes of sampled rows (unless the user's batch_size says otherwise),
# so that the working set of a pass does not grow with N: N / PICKS_PER_PASS rows of a
# LESS-sized pool (N = 270k, D = 32768) would be 1.5 GB in fp16, 3 GB in float32, and a
# doubled sample twice that. A smaller sample costs passes, never exactness.
MAX_SAMPLE_BYTES = 1 << 30

_SQRT2 = math.sqrt(2.0)
# values per slice when a sample of fp16/bf16 rows is gathered and upcast (see _gather)
_GATHER_ELEMENTS = 1 << 22


def sample_keeps_stored_dtype(A, dtype: torch.dtype) -> bool:
    """Whether the sampled rows stay in A's 16-bit dtype: on CPU the row-products op reads
    fp16/bf16 rows with float32 products (the same values as upcast rows, summed alike), so an
    upcast copy would only double the sample's memory and the bytes each step reads."""
    return dtype == torch.float32 and A.dtype in (torch.float16, torch.bfloat16) and A.device.type == "cpu"


def initial_sample_size(n: int) -> int:
    """Rows pursued in the first pass: N / PICKS_PER_PASS, at least MIN_SAMPLE."""
    return min(n, max(MIN_SAMPLE, math.ceil(n / PICKS_PER_PASS)))


def next_sample_size(size: int, short: bool, steps: int, total_steps: int, passes: int, n: int,
                     remaining: int) -> int:
    """A target's next sample size: `steps` picks in its last pass, which ended for want of
    sample if `short`; `total_steps` in all `passes` so far; `remaining` atoms still to pick
    (see the module docstring)."""
    if short and total_steps < PICKS_PER_PASS * passes:
        return max(size, min(size * 2, n // 2))
    # halving saves in-sample work, but when this sample just made at least the picks still
    # to come it likely finishes the run in one pass, where half of it may need one more
    if steps > 2 * PICKS_PER_PASS and remaining > steps:
        return max(size // 2, min(n, MIN_SAMPLE))
    return size


class _PassBounds:
    """What one pass says about a target's rows outside its sample: the tail's correlations
    with r_pass (ranks M..2M) and a bound tau for the n_beyond other eligible rows."""

    def __init__(self, tail: torch.Tensor, tau: float, n_beyond: int, positive: bool):
        self.c = torch.cat([tail, tail.new_tensor([tau])])  # descending
        self.c0 = float(self.c[0])
        self.half_counts = torch.full_like(self.c, 0.5)  # Q(x) = erfc(x / sqrt 2) / 2
        self.half_counts[-1] = 0.5 * n_beyond
        self.rows = len(tail) + n_beyond
        self.positive = positive

    def exceed(self, v: float, alpha: float, sigma: float, limit: float) -> bool:
        """Is the expected number of these rows whose correlation alpha c + e, e ~ N(0, sigma^2),
        now exceeds v (|.| when not positive; c then holds |c|) above limit?"""
        if self.rows == 0:
            return False
        if sigma == 0.0:
            return v <= alpha * self.c0
        scale = 1.0 / (sigma * _SQRT2)
        sides = 1 if self.positive else 2
        # cheap bound first (every row at the largest c); it settles most steps early in a pass
        if sides * 0.5 * self.rows * math.erfc((v - alpha * self.c0) * scale) <= limit:
            return False
        out = float(self.half_counts.dot(torch.special.erfc(self.c * (-alpha * scale) + v * scale)))
        if not self.positive:
            out += float(self.half_counts.dot(torch.special.erfc(self.c * (alpha * scale) + v * scale)))
        return out > limit


class _SampledPursuit:
    """One target's pursuit state: support, float64 rows and factor, residual."""

    def __init__(self, b: torch.Tensor, fw: Optional[torch.Tensor], k: int, opts: SelectOptions,
                 dtype: torch.dtype, exclude: torch.Tensor, rows_dtype: torch.dtype = torch.float64):
        self.b, self.fw, self.k, self.opts, self.dtype = b.contiguous(), fw, k, opts, dtype
        self.fw_c = None if fw is None else fw.to(dtype)
        self.state = lsq.lsq_init(1, k, torch.float64, b.device)
        self.support: List[int] = []
        self.rows_buf = torch.empty(k, b.shape[0], dtype=rows_dtype, device=b.device)
        self.r = b.clone()
        self.r_c = self._weighted_c(self.r.to(dtype))  # W r in the compute dtype: what ranks rows
        self.b_norm = float(weighted_norm(b, fw))
        self.hist = [self.b_norm]
        self.exclude = exclude  # (N,) this target's column of the shared mask
        self.banned: set = set()
        self.min_cos = opts.resolved_min_cosine(dtype)
        self.dep_tol = opts.resolved_dep_tol(dtype)
        self.weight_tol = opts.resolved_weight_tol(dtype)
        # ||a||_W of picked atoms, and of the support in factor order (the residual floor)
        self.norm_of: dict = {}
        self.sup_norms = torch.zeros(k, dtype=torch.float64, device=b.device)
        self.max_iters = opts.resolved_max_iters(k)
        self.first_corr: Optional[float] = None
        self.stopped: Optional[str] = None
        self.iterations = 0
        self.rejected = 0
        self.dropped = 0
        self.sample_short = False
        # reused every pass / step: the gathered sample (a fresh multi-MB buffer per pass costs
        # its page faults) and the K3 inputs
        self._sample_buf: Optional[torch.Tensor] = None
        self.gram_col = torch.zeros(1, k, dtype=torch.float64, device=b.device)
        self.atom = torch.zeros(1, dtype=torch.int64, device=b.device)
        self.diag = torch.zeros(1, dtype=torch.float64, device=b.device)
        self.rhs = torch.zeros(1, dtype=torch.float64, device=b.device)
        self._diag0, self._rhs0 = self.diag[0], self.rhs[0]  # out= views, made once
        self._corr_buf: Optional[torch.Tensor] = None

    @property
    def weights(self) -> torch.Tensor:
        return self.state.weights[0, : len(self.support)]

    def _weighted(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.fw is None else x * self.fw.to(x.dtype)

    def _weighted_c(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.fw_c is None else x * self.fw_c

    def _gather(self, A: torch.Tensor, sample_idx: torch.Tensor) -> torch.Tensor:
        """The sampled rows in the compute dtype, (|sample|, D). index_select, not A[idx]:
        advanced indexing copies ~15x slower on CPU (1.2 ms vs 0.08 ms, 833 rows of 1024)."""
        idx = sample_idx.to(A.device)
        rows = len(idx)
        keep = sample_keeps_stored_dtype(A, self.dtype)
        buf_dtype = A.dtype if keep else self.dtype
        if self._sample_buf is None or self._sample_buf.shape[0] < rows or self._sample_buf.dtype != buf_dtype:
            self._sample_buf = torch.empty(rows, A.shape[1], dtype=buf_dtype, device=A.device)
        if A.dtype == buf_dtype:
            return gather_rows(A, idx, out=self._sample_buf[:rows])
        # fp16/bf16 rows: gathered and upcast a slice at a time into the compute-dtype buffer, so
        # the sample is never held twice (a whole gather then .to() peaked at 1.5x its fp32 size)
        step = max(1, _GATHER_ELEMENTS // max(1, A.shape[1]))
        for lo in range(0, rows, step):  # the buffer may be longer than this sample: stop at its rows
            self._sample_buf[lo : min(lo + step, rows)].copy_(gather_rows(A, idx[lo : lo + step]))
        return self._sample_buf[:rows]

    def _sample_correlations(self, rows: torch.Tensor) -> torch.Tensor:
        """c = S W r for the sampled rows (|sample| x D); the in-sample cost of a step."""
        n = rows.shape[0]
        if self._corr_buf is None or self._corr_buf.shape[0] < n or self._corr_buf.dtype != self.dtype:
            self._corr_buf = torch.empty(n, 1, dtype=self.dtype, device=rows.device)
        return row_products(rows, self.r_c, out=self._corr_buf[:n])[:, 0]

    def _may_be_beaten(self, v: float, corr: torch.Tensor, c_pass: torch.Tensor, picked: torch.Tensor,
                       n_alive: int, r_pass_w: torch.Tensor, rr_pass: float, bounds: _PassBounds) -> bool:
        """Step 3: may a row outside the sample now correlate better than v?"""
        alpha = float(torch.dot(self.r, r_pass_w)) / rr_pass
        if not alpha > 0:  # r no longer leans on r_pass: the pass's ranking bounds nothing
            return True
        e = torch.add(corr, c_pass, alpha=-alpha).masked_fill_(picked, 0.0)  # the sample's e
        sigma = math.sqrt(float(torch.dot(e, e)) / max(n_alive, 1))
        self.sample_short = n_alive < 2 or bounds.exceed(v, alpha, sigma, WRONG_PICKS / self.k)
        return self.sample_short

    def pursue_sample(self, A: torch.Tensor, sample_idx: torch.Tensor, bounds: _PassBounds, progress) -> int:
        """Add atoms from the sample until a row outside it may be the better pick; returns
        the number of argmax steps taken."""
        opts = self.opts
        start = self.iterations
        self.sample_short = False  # set when the pass ends because rows outside may be better
        # Sample correlations in the compute dtype (they only rank the sample; r is exact);
        # the picked row goes to the float64 least-squares side.
        rows = self._gather(A, sample_idx)
        sample = sample_idx.tolist()
        picked = torch.zeros(len(sample), dtype=torch.bool, device=rows.device)
        n_alive = len(sample)
        r_pass_w = self._weighted(self.r.clone())  # self.r is updated in place below
        rr_pass = float(torch.dot(r_pass_w, self.r))
        c_pass: Optional[torch.Tensor] = None
        while self.stopped is None:
            if len(self.support) == self.k:
                self.stopped = STOP_BUDGET
                return self.iterations - start
            if self.iterations >= self.max_iters:
                self.stopped = STOP_MAX_ITERS
                return self.iterations - start
            corr = self._sample_correlations(rows)
            first = c_pass is None
            if corr.numel() == 0:  # an empty sample: nothing eligible was ranked
                if first:
                    self.stopped = STOP_EXHAUSTED
                return self.iterations - start
            if first:  # r = r_pass: these are the sample's (signed) pass correlations
                c_pass = corr.clone()  # corr lives in a buffer the next step overwrites
            key = corr.masked_fill(picked, -float("inf")) if opts.positive else corr.abs().masked_fill_(picked, -float("inf"))
            i = int(torch.argmax(key))
            v = key[i].item()
            if v == -float("inf"):  # every sampled row picked
                if first:
                    self.stopped = STOP_EXHAUSTED
                return self.iterations - start
            if not first and self._may_be_beaten(v, corr, c_pass, picked, n_alive, r_pass_w, rr_pass, bounds):
                return self.iterations - start  # sample again
            j = sample[i]
            row = (A[j] if isinstance(A, torch.Tensor) else gather_rows(A, [j])[0]).to(torch.float64)
            row_w = self._weighted(row)
            torch.dot(row_w, row, out=self._diag0)
            diag = self.diag.item()
            self.norm_of[j] = math.sqrt(diag)
            no_corr = v <= self.min_cos * math.sqrt(diag) * self.hist[-1]
            guard = (self.first_corr is not None and opts.stop_ratio is not None
                     and v < opts.stop_ratio * self.first_corr)
            if (no_corr or guard) and not first:
                return self.iterations - start  # stop on the exact best of a pass, as exact pursuit
            self.iterations += 1
            if no_corr:
                self.stopped = STOP_NO_CORRELATION
                return self.iterations - start
            if guard:
                self.stopped = STOP_GUARD
                return self.iterations - start
            if self.first_corr is None:
                self.first_corr = v
            picked[i] = True
            n_alive -= 1
            self._add_atom(j, row, row_w, progress)
        return self.iterations - start

    def _add_atom(self, j: int, row: torch.Tensor, row_w: torch.Tensor, progress) -> None:
        """Atom j (its float64 row, and the row weighted by W) into the support: the K3 update
        (refused as dependent: excluded for good), the row copies following the factor, the
        residual, and the tolerance and rounding-floor stops."""
        opts = self.opts
        n_old = len(self.support)
        if n_old:
            rows_dot_f64(self.rows_buf[:n_old], row_w, self.gram_col[0, :n_old])
        self.atom.fill_(j)
        torch.dot(row_w, self.b, out=self._rhs0)
        status = lsq.lsq_update(self.state, self.atom, self.gram_col, self.diag, self.rhs,
                                lam=float(opts.ridge), positive=opts.positive, dep_tol=self.dep_tol,
                                weight_tol=self.weight_tol, checked=False).item()
        if status & lsq.STATUS_DEPENDENT:
            self.banned.add(j)
            self.exclude[j] = True
            self.rejected += 1
            return
        if status & lsq.STATUS_NEW_DROPPED:
            self.banned.add(j)
            self.rejected += 1
        if status & lsq.STATUS_DROPPED:  # the factor compacted its order: follow it
            size = int(self.state.size[0])
            new_support = self.state.support[0, :size].tolist()
            follow_factor_order(self.rows_buf, self.support, new_support, j, row)
            self.sup_norms[:size] = torch.tensor([self.norm_of[a] for a in new_support], dtype=torch.float64)
            gone = set(self.support) - set(new_support)
        else:  # appended at the end, nothing dropped
            size = n_old + 1
            self.rows_buf[n_old] = row
            self.sup_norms[n_old] = self.norm_of[j]
            new_support, gone = self.support + [j], set()
        self.dropped += len(gone)
        self.exclude[j] = True
        for a in gone:  # dropped atoms become eligible again (at the next pass)
            if a not in self.banned:
                self.exclude[a] = False
        self.support = new_support
        rows_residual_f64(self.rows_buf[:size], self.state.weights[0, :size], self.b, self.r)
        if self.fw_c is None:
            self.r_c.copy_(self.r)  # in place: no allocation per step
        else:
            self.r_c = self.r.to(self.dtype) * self.fw_c
        self.hist.append(float(weighted_norm(self.r, self.fw)))
        if progress is not None:
            progress(1)
        if self.hist[-1] < opts.tol * self.b_norm:
            self.stopped = STOP_TOLERANCE
        elif size and self.hist[-1] <= residual_floor(self.dtype, self.b_norm, self.state.weights[0, :size],
                                                      self.sup_norms[:size]):
            self.stopped = STOP_RESIDUAL_FLOOR


def gtp_cosamp(problem: Problem, k: int, opts: SelectOptions, progress=None) -> List[TargetSelection]:
    """Compressive-sampling GTP for all targets (see module docstring)."""
    dtype = opts.resolved_compute_dtype(problem.candidates.dtype)
    A = problem.candidates
    m = problem.num_targets
    fw = problem.feature_weights(torch.float64)
    B = problem.targets.to(torch.float64)
    n = problem.num_candidates
    # rows pursued per pass, per target: the user's batch_size, else adapted pass by pass,
    # within MAX_SAMPLE_BYTES of sampled rows
    row_bytes = problem.dim * (A.element_size() if sample_keeps_stored_dtype(A, dtype) else torch.finfo(dtype).bits // 8)
    max_sample = max(MIN_SAMPLE, MAX_SAMPLE_BYTES // max(1, row_bytes))
    sizes = [min(opts.batch_size, n) if opts.batch_size else min(initial_sample_size(n), max_sample)] * m
    max_passes = opts.max_iters or k
    exclude = problem.exclude[:, None].repeat(1, m)
    base = problem.exclude
    rows_dtype = selected_rows_dtype(A)  # the selected rows' copies (see ops.products)
    pursuits = [_SampledPursuit(B[:, t], fw, k, opts, dtype, exclude[:, t], rows_dtype) for t in range(m)]
    passes = 0
    while passes < max_passes:
        live = [t for t in range(m) if pursuits[t].stopped is None]
        if not live:
            break
        R = torch.stack([p.r for p in pursuits], dim=1)
        RW = (R if fw is None else R * fw[:, None]).to(dtype)
        # dropped-then-banned rows stay excluded; the user's exclusions always do
        for t in live:
            exclude[:, t] |= base
        ranked = min(n, 2 * max(sizes[t] for t in live))  # samples + tails
        values, idx = masked_top(A, RW, exclude, ranked, opts.positive, dtype, opts.backend)
        passes += 1
        values, idx = values.cpu(), idx.cpu()
        excluded = exclude.sum(dim=0).tolist()
        for t in live:
            ok = (values[t] > -float("inf")) & (values[t] > 0 if opts.positive else values[t] > -1)
            vals, ids = values[t][ok].to(torch.float64), idx[t][ok]
            eligible = n - int(excluded[t])
            # rows not ranked: below the last ranked value, or (list cut short) at most 0
            tau = float(vals[-1]) if len(ids) == ranked else 0.0
            size = sizes[t]
            bounds = _PassBounds(vals[size:], max(tau, 0.0), eligible - len(ids), opts.positive)
            steps = pursuits[t].pursue_sample(A, ids[:size], bounds, progress)
            if not opts.batch_size:
                p = pursuits[t]
                sizes[t] = min(max_sample, next_sample_size(size, p.sample_short, steps, p.iterations, passes, n,
                                                            p.k - len(p.support)))
    out = []
    for p in pursuits:
        out.append(TargetSelection(
            indices=np.asarray(p.support, dtype=np.int64),
            weights=p.weights.detach().cpu().clone().numpy(),
            residual_norms=np.asarray(p.hist, dtype=np.float64),
            stopped_by=p.stopped or STOP_MAX_ITERS,
            iterations=p.iterations,
            rejected=p.rejected,
            dropped=p.dropped,
            passes=float(passes),
        ))
    return out


# -- joint mode (targets="joint"): speculate in the sample, verify with one pass --------------

# speculative picks in the first round, and at least and at most in any (each one is m more
# columns in the verifying pass)
SPECULATE = PICKS_PER_PASS
MIN_SPECULATE = 4
MAX_SPECULATE = 64
# rows whose approximate score lies within the rounding window of the best are scored exactly
# from their gathered rows, up to this many; more: the step gets a pass of its own
WINDOW_ROWS = 256
# the verifying pass keeps its (N, m + |T|) products whole up to this many bytes
VERIFY_BYTES = MAX_SAMPLE_BYTES


def joint_scores(pursuit: JointPursuit, residuals: List[torch.Tensor]) -> torch.Tensor:
    """One read of A: every row's joint score ||max(a^T W R, 0)||_2 / ||a||_W for each residual
    matrix R in `residuals`, (N, len) in the compute dtype, computed as exact joint pursuit's
    best_row computes its one column (the same products, norms and row norms)."""
    A, dtype, m = pursuit.A, pursuit.dtype, pursuit.m
    L = len(residuals)
    RW = torch.cat([pursuit.weighted(R) for R in residuals], dim=1).to(dtype)  # (D, L m)
    out = torch.empty(pursuit.problem.num_candidates, L, dtype=dtype, device=pursuit.device)
    # chunks whose products (rows x L m) stay within CHUNK_ELEMENTS as well as their rows
    dim = pursuit.problem.dim
    elements = max(dim, CHUNK_ELEMENTS // max(1, -(-(L * m) // dim)))
    for start, a in row_chunks(A, elements):
        c = candidate_products(a, RW, dtype, pursuit.opts.backend)
        n_c = c.shape[0]
        out[start : start + n_c] = pursuit.scores(c.view(n_c, L, m), pursuit.row_norms[start : start + n_c, None])
    return out


def _sample_best(clone: JointPursuit, rows: torch.Tensor, sample: torch.Tensor) -> tuple:
    """The best eligible row of the sample on the copy's residuals (ties: the lowest index; the
    sample is sorted) and its score; (-1, -inf) when no sampled row is eligible."""
    if rows.shape[0] == 0:
        return -1, -math.inf
    RW = clone.weighted(clone.R).to(clone.dtype)
    score = clone.scores(candidate_products(rows, RW, clone.dtype, clone.opts.backend), clone.row_norms[sample])
    score.masked_fill_(clone.exclude[sample], -math.inf)
    value, i = torch.max(score, dim=0)
    if float(value) == -math.inf:
        return -1, -math.inf
    return int(sample[i]), float(value)


def _top_sample(scores: torch.Tensor, exclude: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` eligible rows of best score, sorted by index."""
    masked = scores.masked_fill(exclude, -math.inf)
    values, idx = torch.topk(masked, min(size, masked.numel()), sorted=False)
    return torch.sort(idx[values > -math.inf]).values


def gtp_cosamp_joint(problem: Problem, k: int, opts: SelectOptions, progress=None) -> List[TargetSelection]:
    """Compressive-sampling GTP for ``targets="joint"``: the picks of exact joint pursuit
    (selection/joint.py), within ties, from a few passes over A (see the module docstring's
    joint section and :func:`_joint_round`)."""
    main = JointPursuit(problem, k, opts)
    n = problem.num_candidates
    A, dtype = main.A, main.dtype
    row_bytes = problem.dim * (A.element_size() if sample_keeps_stored_dtype(A, dtype) else torch.finfo(dtype).bits // 8)
    max_sample = max(MIN_SAMPLE, MAX_SAMPLE_BYTES // max(1, row_bytes))
    size = min(opts.batch_size, n) if opts.batch_size else min(initial_sample_size(n), max_sample)
    passes = main.passes  # the row norms' pass
    scores = joint_scores(main, [main.R])[:, 0]
    passes += 1
    value, j = torch.max(scores.masked_fill(main.exclude, -math.inf), dim=0)
    known = (int(j), float(value))
    sample = _top_sample(scores, main.exclude, size)
    speculate = SPECULATE
    while main.stopped is None:
        if main.stop_before_pass():
            break
        main.take(*known, progress)  # the global best: exact pursuit's pick
        if main.stopped is not None:
            break
        main, known, scores, mask, kept, made, extra = _joint_round(main, sample, speculate, progress)
        passes += 1 + extra
        if not opts.batch_size and kept < made and not bool((sample == known[0]).any()):
            size = min(max_sample, max(size, min(2 * size, n // 2)))  # the pick it missed lay outside
        speculate = next_speculation(speculate, kept, made)
        sample = _top_sample(scores, mask, size)
    main.passes = passes
    return main.results()


def next_speculation(speculate: int, kept: int, made: int) -> int:
    """Speculative picks for the next round: twice as many after a round that kept all it made
    (and made all it could), else twice the picks kept, within MIN_SPECULATE..MAX_SPECULATE."""
    if kept == made == speculate:
        return min(MAX_SPECULATE, 2 * speculate)
    if kept == made:  # the round ended on a stop or an exhausted sample, not a wrong pick
        return speculate
    return min(MAX_SPECULATE, max(MIN_SPECULATE, 2 * kept))


class _Step:
    """What the verifying pass needs of one speculated step: the residuals, the exclusion mask,
    and S with its (|S|, m) weights (R = U - A_S^T W)."""

    def __init__(self, pursuit: JointPursuit):
        self.R = pursuit.R.clone()
        self.exclude = pursuit.exclude.clone()
        self.rows = list(pursuit.support)
        if self.rows:
            slots = pursuit.slot_of[torch.tensor(self.rows, dtype=torch.long, device=pursuit.device)]
            self.weights = pursuit.weight_matrix()[slots]
        else:
            self.weights = torch.zeros(0, pursuit.m, dtype=torch.float64, device=pursuit.device)


class _Verifier:
    """One pass over A that finds exact pursuit's best row at each speculated step's residuals.

    Every step's residuals are R_s = R_0 - A_T^T X_s, T the rows in S at any step of the round
    and X_s = W_s - W_0 on T (exact arithmetic), so one pass computing P = A W [R_0 | A_T^T]
    (m + |T| columns instead of m per step) gives every step's correlations C_s = P_R - P_T X_s,
    hence approximate scores. They differ from exact pursuit's (one pass of A W R_s in the
    compute dtype) by rounding only: with unit roundoff u, gamma_n = n u / (1 - n u), rho the
    largest ||a||_2 / ||a||_W, and norms Euclidean (W the feature weights),

        |approx_i - exact_i| <= delta_s = 2 rho (gamma_D + gamma_|T| + 2u) (||W R_0||_F
                                 + ||W R_s||_F + 2 sum_t ||W a_t||_2 ||X_s[t]||_2) + 4 gamma_(m+2) max

    (each product's error is at most gamma_D ||a_i||_2 ||W r||_2, whatever the summation order;
    the last term covers the norms and divisions; a float64 term, 2 rho gamma64_(|T|+1)
    (2 ||W U||_F + sum_t ||W a_t||_2 (||W_0[t]||_2 + ||W_s[t]||_2)), covers the residuals
    being float64 roundings of U - A_S^T W, which matters in float64 only). A row whose approximate score is below the
    best approximate one minus 2 delta_s cannot be exact pursuit's pick; the others (a handful)
    are scored as exact pursuit scores them, from their gathered rows, and the best of them is
    the pick (ties: the lowest index). Should the window hold too many rows, the step is scored
    by a pass of its own (counted).
    """

    def __init__(self, pursuit: JointPursuit, steps: List[_Step]):
        f64, dtype, m = torch.float64, pursuit.dtype, pursuit.m
        self.last: Optional[torch.Tensor] = None  # the approximate scores of the last step checked
        self.pursuit, self.steps = pursuit, steps
        self.extra_passes = 0
        self.window_rows: List[int] = []  # rows scored exactly, per step checked
        T = sorted(set().union(*(st.rows for st in steps)))
        pos = {t: i for i, t in enumerate(T)}
        device = pursuit.device
        Ws = []
        for st in steps:
            Wt = torch.zeros(len(T), m, dtype=f64, device=device)
            if st.rows:
                Wt[torch.tensor([pos[r] for r in st.rows], dtype=torch.long, device=device)] = st.weights
            Ws.append(Wt)
        X = [Wt - Ws[0] for Wt in Ws]
        fwA = pursuit.weighted(gather_rows(pursuit.A, T).to(device=device, dtype=f64).T) if T else \
            torch.zeros(pursuit.problem.dim, 0, dtype=f64, device=device)  # (D, |T|)
        # the rounding bound of each step (see the class docstring)
        A = pursuit.A
        kernels = pursuit.opts.backend == "triton" or (pursuit.opts.backend == "auto" and A.device.type == "cuda")
        u = 2.0 ** -18 if (dtype == torch.float32 and kernels) else torch.finfo(dtype).eps / 2
        gamma = lambda n: n * u / (1 - n * u)  # noqa: E731
        fw = pursuit.fw
        rho = 1.0 if fw is None else (1.0 / math.sqrt(float(fw.min())) if float(fw.min()) > 0 else math.inf)
        col_norms = torch.linalg.vector_norm(fwA, dim=0)  # ||W a_t||_2
        r0 = float(torch.linalg.vector_norm(pursuit.weighted(steps[0].R)))
        # the residuals themselves are float64 roundings of U - A_S^T W (refresh_residuals)
        u64 = torch.finfo(f64).eps / 2
        g64 = (len(T) + 1) * u64 / (1 - (len(T) + 1) * u64)
        fit0 = float(col_norms @ torch.linalg.vector_norm(Ws[0], dim=1)) if len(T) else 0.0
        un = float(torch.linalg.vector_norm(pursuit.weighted(pursuit.U)))
        self.slack = []
        for st, Xs, Wt in zip(steps, X, Ws):
            moved = float(col_norms @ torch.linalg.vector_norm(Xs, dim=1)) if len(T) else 0.0
            fit = float(col_norms @ torch.linalg.vector_norm(Wt, dim=1)) if len(T) else 0.0
            rs = float(torch.linalg.vector_norm(pursuit.weighted(st.R)))
            self.slack.append(2 * rho * ((gamma(pursuit.problem.dim) + gamma(len(T)) + 2 * u) * (r0 + rs + 2 * moved)
                                         + g64 * (2 * un + fit0 + fit)))
        self.rel_slack = 4 * gamma(m + 2)
        # the pass: P kept whole where it fits (each step's scores then cost N |T| m, made only
        # for the steps checked), else every step's scores chunk by chunk
        self.X = [Xs.to(dtype) for Xs in X]
        RW = torch.cat([pursuit.weighted(steps[0].R), fwA], dim=1).to(dtype)
        n = pursuit.problem.num_candidates
        self.P: Optional[torch.Tensor] = None
        self.approx: Optional[torch.Tensor] = None
        if n * RW.shape[1] * RW.element_size() <= VERIFY_BYTES:
            self.P = candidate_products(A, RW, dtype, pursuit.opts.backend)
            return
        L, dim = len(steps), pursuit.problem.dim
        Xcat = torch.cat(self.X, dim=1)  # (|T|, L m)
        self.approx = torch.empty(n, L, dtype=dtype, device=device)
        elements = max(dim, CHUNK_ELEMENTS // max(1, -(-max(L * m, m + len(T)) // dim)))
        for start, a in row_chunks(A, elements):
            self.approx[start : start + a.shape[0]] = self._scores(
                candidate_products(a, RW, dtype, pursuit.opts.backend), Xcat, start)

    def _scores(self, P: torch.Tensor, X: torch.Tensor, start: int) -> torch.Tensor:
        """(rows, L) approximate scores of P's rows at the steps whose X_s are X's blocks."""
        m = self.pursuit.m
        n_c, L = P.shape[0], X.shape[1] // m
        C = P[:, None, :m] - (P[:, m:] @ X).view(n_c, L, m)
        return self.pursuit.scores(C, self.pursuit.row_norms[start : start + n_c, None])

    def approximate(self, s: int) -> torch.Tensor:
        """(N,) approximate scores at step s."""
        if self.approx is not None:
            return self.approx[:, s]
        return self._scores(self.P, self.X[s], 0)[:, 0]

    def best(self, s: int) -> tuple:
        """Exact pursuit's best row at step s and its score ((-1, -inf): none eligible)."""
        pursuit, st = self.pursuit, self.steps[s]
        self.last = self.approximate(s)
        masked = self.last.masked_fill(st.exclude, -math.inf)
        top = float(masked.max())
        if top == -math.inf:
            return -1, -math.inf
        window = 2 * (self.slack[s] + self.rel_slack * abs(top))
        cand = torch.nonzero(masked >= top - window).flatten()  # sorted
        self.window_rows.append(len(cand))
        if len(cand) > WINDOW_ROWS:  # a loose bound: a pass is cheaper
            self.extra_passes += 1
            exact = joint_scores(pursuit, [st.R])[:, 0].masked_fill(st.exclude, -math.inf)
            value, j = torch.max(exact, dim=0)
            return int(j), float(value)
        rows = gather_rows(pursuit.A, cand)
        c = candidate_products(rows, pursuit.weighted(st.R).to(pursuit.dtype), pursuit.dtype, pursuit.opts.backend)
        score = pursuit.scores(c, pursuit.row_norms[cand])
        value, i = torch.max(score, dim=0)
        return int(cand[i]), float(value)


def _joint_round(main: JointPursuit, sample: torch.Tensor, speculate: int, progress) -> tuple:
    """Up to `speculate` picks in the sample on a copy of the pursuit, then one pass that finds
    exact pursuit's best row at each step (:class:`_Verifier`). Returns (the pursuit after the
    picks that were exact pursuit's, the global best (row, score) at its residuals, approximate
    scores there and that exclusion mask (for the next sample), picks kept, picks made, extra
    passes)."""
    clone = main.copy()
    rows = gather_rows(main.A, sample)
    steps, picks, values, held = [_Step(clone)], [], [], []
    while len(picks) < speculate:
        if clone.stop_before_pass():
            break
        j, v = _sample_best(clone, rows, sample)
        if j < 0 or clone.score_stop(v) is not None:
            break  # a stop is decided on the global best, by the next round
        held.append(clone.take(j, v))
        picks.append(j)
        values.append(v)
        steps.append(_Step(clone))
        if clone.stopped is not None:
            break
    check = _Verifier(main, steps)
    best = []
    for s in range(len(steps)):
        best.append(check.best(s))
        if s == len(picks) or best[s][0] != picks[s]:
            break
    kept = len(best) - 1
    if kept == len(picks) and [v for _, v in best[:kept]] == values:
        # every pick verified, on the same scores: the copy took exact pursuit's path
        if progress is not None and sum(held):
            progress(sum(held))
        if clone.stopped in (STOP_BUDGET, STOP_MAX_ITERS):
            clone.stopped = None  # the next round's stop_before_pass decides it again
        main = clone
    else:  # the kept picks again, on the pursuit itself, with exact pursuit's scores
        for s in range(kept):
            main.take(picks[s], best[s][1], progress)
            if main.stopped is not None:
                break
    return main, best[kept], check.last, steps[kept].exclude, kept, len(picks), check.extra_passes
