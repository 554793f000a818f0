"""K2: batched correlation of candidate rows with residuals, reduced to a per-column top-m.

For candidates A (N x D) and residuals R (D x m) the op returns, for each column j, the m_top
best rows i under

    score_ij = s_i * <a_i, r_j>          (s_i = row_scale[i], 1 when absent)
    key_ij   = score_ij  or  |score_ij|  (absolute=True)

over the rows not excluded for column j, best first, ties to the lowest row index, padded
with (value -inf, index -1) when fewer than m_top rows are eligible. A row whose score is
not finite (NaN or +-inf: a zero row scaled by 1/0, non-finite inputs, float32 overflow) is
treated as excluded, whether or not absolute. Values are the signed scores in float32,
computed with float32 accumulation.

Triton path (CUDA, or the interpreter): the N x m score matrix never reaches memory.

* Stage 1, one persistent kernel: each program walks row blocks blk = pid, pid + P, ...;
  per block it accumulates the (BLOCK_N x m) scores over D in BLOCK_D chunks with tl.dot,
  turns each score into a 64-bit *composite key* and folds the block into a running
  per-column top-m_top kept in registers; it writes its P x m_top x m partial keys.
* Stage 2: torch.max / torch.topk over the P * m_top partial keys per column, then decode.

The composite key makes ties deterministic without a second reduction. For a float32 key
k (with -0 folded to +0), its bits b as int32 map monotonically to t = b if b >= 0 else
b ^ 0x7fffffff; then

    composite = t << 32 | (2^31 - 1 - row) << 1 | sign(score) (the sign only with absolute)

Composites are unique per column and order first by key, then by *lower* row, so a plain
max / topk over them is exactly "best key, ties to the lowest index", in both stages, with
no host synchronisation. Ineligible entries are the sentinel -2^63 (rows need N < 2^31).

Exactness of the products. The dot runs on the tensor cores in A's own dtype, so R is
split into parts that the operand type holds exactly, interleaved as extra columns and
summed once per block:

* bf16 A: R = r1 + r2 + r3, each bf16 (8 + 8 + 8 significant bits = fp32 exactly); every
  product a * r_p is exact in fp32, so the result equals an fp32 FMA dot up to the order of
  the fp32 additions.
* fp16 A: the same with fp16 parts after scaling column j by a power of two 2^e_j that puts
  max |r_j| in [2^14, 2^15) (fp16's range is narrow); the scores are multiplied by 2^-e_j
  afterwards (exact). Parts cover R to about 2^-33 of max |r_j|.
* fp32 A: one part, tl.dot with input_precision="tf32x3" on GPU (three tf32 products,
  about fp32 accuracy: relative error near 1e-6 of sum |a||r| instead of exact products).

Cost of the splits: 4 dot columns per residual column (3 parts + 1 zero slot so that the
per-column sum is a reshape), i.e. a (BLOCK_N x BLOCK_D) @ (BLOCK_D x 16) bf16 MMA for
m <= 4 and 32 columns for m <= 8: far under the tensor-core rate while the kernel reads A
at memory speed (N*D*2 bytes against N*D*32*2 flops at ~1000 TFLOP/s).

Performance model (H200, N = 1M, D = 8192, bf16): one read of A is 16.4 GB, about 3.8 ms at
the ~4.3 TB/s a device copy reaches: the floor. The dot does N*D*W*2 flops (W = 16 dot
columns for m <= 4, 32 for m <= 8): 0.27 / 0.54 TFLOP, i.e. < 0.6 ms of bf16 tensor-core
time (~1000 TFLOP/s) hidden under the loads, so m = 1..8 should cost the same per pass. Per call there are
also ~20 tiny torch launches (R split, stage 2, decode): tens of microseconds.

In the interpreter (TRITON_INTERPRET=1) tl.dot on bf16 operands is wrong, so both operands
are upcast to fp32 there; as the parts are exact, the arithmetic is the same.

Limits: the fused path keeps m_top <= FUSED_MAX_TOP (256) per column in registers (an
insertion loop that only runs when a block beats the current m_top-th best). Larger m_top
goes through candidate_scores on chunks of rows plus torch.topk over composites: one read
of A still, scores written chunk by chunk (never all N x m at once).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..validation import check_choice, check_int
from ._dispatch import resolve_backend
from ._library import register

try:  # triton is optional for the torch path
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton missing
    triton = None
    tl = None

__all__ = [
    "correlate_topk",
    "correlate_topk_reference",
    "candidate_scores",
    "candidate_scores_reference",
    "KernelConfig",
    "FUSED_MAX_TOP",
]

FUSED_MAX_TOP = 256
MAX_ROWS = (1 << 31) - (1 << 12)  # composite keys hold the row in 31 bits
_SENTINEL = -(1 << 63)
_NEG_INF_MAPPED = -2139095041  # monotone int32 image of float32 -inf (0xff800000 ^ 0x7fffffff)
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ----------------------------------------------------------------------------------------
# input checks (shared by every path)
# ----------------------------------------------------------------------------------------
def _check_candidates(candidates: torch.Tensor) -> None:
    if not isinstance(candidates, torch.Tensor):
        raise TypeError(f"candidates must be a torch.Tensor, got {type(candidates).__name__}")
    if candidates.dim() != 2:
        raise ValueError(f"candidates must be 2-D (N, D), got shape {tuple(candidates.shape)}")
    if candidates.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"candidates must be bfloat16, float16 or float32, got {candidates.dtype}")
    if candidates.shape[1] > 1 and candidates.stride(1) != 1:
        raise ValueError("candidates must have unit stride along D (row-major rows); call .contiguous()")


def _check_columns(name: str, columns: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    if not isinstance(columns, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(columns).__name__}")
    if not columns.is_floating_point():
        raise TypeError(f"{name} must be floating point (float32), got {columns.dtype}")
    if columns.dim() == 1:
        columns = columns[:, None]
    if columns.dim() != 2:
        raise ValueError(f"{name} must be (D,) or (D, m), got shape {tuple(columns.shape)}")
    if columns.shape[0] != candidates.shape[1]:
        raise ValueError(
            f"{name} has {columns.shape[0]} rows but candidates have D = {candidates.shape[1]} columns"
        )
    if columns.shape[1] < 1:
        raise ValueError(f"{name} must have at least one column, got shape {tuple(columns.shape)}")
    if columns.device != candidates.device:
        raise ValueError(f"{name} is on {columns.device} but candidates are on {candidates.device}")
    return columns.to(torch.float32).contiguous()


def _check_row_scale(row_scale: Optional[torch.Tensor], candidates: torch.Tensor) -> Optional[torch.Tensor]:
    if row_scale is None:
        return None
    if not isinstance(row_scale, torch.Tensor):
        raise TypeError(f"row_scale must be a torch.Tensor or None, got {type(row_scale).__name__}")
    if not row_scale.is_floating_point():
        raise TypeError(f"row_scale must be floating point (float32), got {row_scale.dtype}")
    if row_scale.shape != (candidates.shape[0],):
        raise ValueError(f"row_scale must have shape ({candidates.shape[0]},), got {tuple(row_scale.shape)}")
    if row_scale.device != candidates.device:
        raise ValueError(f"row_scale is on {row_scale.device} but candidates are on {candidates.device}")
    return row_scale.to(torch.float32).contiguous()


def _check_inputs(candidates, residuals, m_top, exclude, row_scale):
    """Validate; return (A, R (D, m) fp32 contiguous, m_top as an int, exclude or None, row_scale fp32
    or None)."""
    _check_candidates(candidates)
    R = _check_columns("residuals", residuals, candidates)
    m_top = check_int(m_top, "m_top", low=1)
    n, m = candidates.shape[0], R.shape[1]
    if exclude is not None:
        if not isinstance(exclude, torch.Tensor):
            raise TypeError(f"exclude must be a bool torch.Tensor or None, got {type(exclude).__name__}")
        if exclude.dtype != torch.bool:
            raise TypeError(f"exclude must have dtype torch.bool, got {exclude.dtype}")
        if exclude.shape not in ((n,), (n, m)):
            raise ValueError(f"exclude must have shape ({n},) or ({n}, {m}), got {tuple(exclude.shape)}")
        if exclude.device != candidates.device:
            raise ValueError(f"exclude is on {exclude.device} but candidates are on {candidates.device}")
    return candidates, R, m_top, exclude, _check_row_scale(row_scale, candidates)


# ----------------------------------------------------------------------------------------
# plain-torch reference
# ----------------------------------------------------------------------------------------
def _reference_chunk_rows(candidates: torch.Tensor, compute_dtype: torch.dtype) -> int:
    if candidates.dtype == compute_dtype:
        return max(1, candidates.shape[0])
    # Upcast a slab of rows at a time: at most 2^22 elements (16 MB in fp32).
    return max(1, (1 << 22) // max(1, candidates.shape[1]))


def correlate_topk_reference(
    candidates: torch.Tensor,
    residuals: torch.Tensor,
    m_top: int = 1,
    *,
    exclude: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
    absolute: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch correlate_topk (same contract), on any device.

    Scores are computed in compute_dtype (float32: fp32 accumulation, as the kernel;
    float64 for tests), a slab of rows at a time, and the per-column best kept by
    torch.argmax (first maximal index) or a stable descending sort, so ties go to the
    lowest row. Returns values (m, m_top) float32 and indices (m, m_top) int64.
    """
    A, R, m_top, exclude, row_scale = _check_inputs(candidates, residuals, m_top, exclude, row_scale)
    check_choice(compute_dtype, "compute_dtype", (torch.float32, torch.float64))
    n, m = A.shape[0], R.shape[1]
    device = A.device
    Rc = R.to(compute_dtype)
    neg_inf = float("-inf")
    best_key = torch.empty(0, m, dtype=compute_dtype, device=device)
    best_val = torch.empty(0, m, dtype=compute_dtype, device=device)
    best_idx = torch.empty(0, m, dtype=torch.int64, device=device)
    step = _reference_chunk_rows(A, compute_dtype)
    for start in range(0, n, step):
        stop = min(n, start + step)
        score = A[start:stop].to(compute_dtype) @ Rc
        if row_scale is not None:
            score = score * row_scale[start:stop, None].to(compute_dtype)
        key = score.abs() if absolute else score
        eligible = torch.isfinite(key)  # NaN, +-inf: out
        if exclude is not None:
            ex = exclude[start:stop]
            eligible = eligible & ~(ex[:, None] if ex.dim() == 1 else ex)
        key = torch.where(eligible, key, torch.full_like(key, neg_inf))
        if m_top == 1:
            pos = torch.argmax(key, dim=0, keepdim=True)  # first maximal value: lowest row
            chunk_key, chunk_val = torch.gather(key, 0, pos), torch.gather(score, 0, pos)
            if best_key.shape[0] == 0:
                best_key, best_val, best_idx = chunk_key, chunk_val, pos + start
            else:  # kept rows have lower indices: a tie keeps them
                take = chunk_key > best_key
                best_key = torch.where(take, chunk_key, best_key)
                best_val = torch.where(take, chunk_val, best_val)
                best_idx = torch.where(take, pos + start, best_idx)
            continue
        rows = torch.arange(start, stop, device=device)[:, None].expand(-1, m)
        # Kept rows come first and have lower indices, so position order is index order.
        keys = torch.cat([best_key, key])
        pos = torch.sort(keys, dim=0, descending=True, stable=True).indices[:m_top]
        best_key = torch.gather(keys, 0, pos)
        best_val = torch.gather(torch.cat([best_val, score]), 0, pos)
        best_idx = torch.gather(torch.cat([best_idx, rows]), 0, pos)
    values = torch.full((m_top, m), neg_inf, dtype=torch.float32, device=device)
    indices = torch.full((m_top, m), -1, dtype=torch.int64, device=device)
    kept = best_key.shape[0]
    found = best_key > neg_inf
    values[:kept] = torch.where(found, best_val, torch.full_like(best_val, neg_inf)).to(torch.float32)
    indices[:kept] = torch.where(found, best_idx, torch.full_like(best_idx, -1))
    return values.T.contiguous(), indices.T.contiguous()


def candidate_scores_reference(
    candidates: torch.Tensor,
    columns: torch.Tensor,
    *,
    row_scale: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Plain-torch candidate_scores: (A @ X) * row_scale[:, None] in compute_dtype, (N, p)."""
    _check_candidates(candidates)
    X = _check_columns("columns", columns, candidates)
    row_scale = _check_row_scale(row_scale, candidates)
    n = candidates.shape[0]
    out = torch.empty(n, X.shape[1], dtype=compute_dtype, device=candidates.device)
    Xc = X.to(compute_dtype)
    step = _reference_chunk_rows(candidates, compute_dtype)
    for start in range(0, n, step):
        stop = min(n, start + step)
        out[start:stop] = candidates[start:stop].to(compute_dtype) @ Xc
    if row_scale is not None:
        out *= row_scale[:, None].to(compute_dtype)
    return out


# ----------------------------------------------------------------------------------------
# composite keys (torch side: stage 2 decode, chunked fallback)
# ----------------------------------------------------------------------------------------
def _composite_keys_torch(score: torch.Tensor, rows: torch.Tensor, eligible: torch.Tensor,
                          absolute: bool) -> torch.Tensor:
    """int64 composite keys of float32 scores (n, m) for rows (n,), as the kernel builds them."""
    key = score.abs() if absolute else score
    key = torch.where(key == 0, torch.zeros_like(key), key)  # fold -0 into +0
    eligible = eligible & torch.isfinite(key)  # NaN, +-inf: out
    bits = key.contiguous().view(torch.int32)
    mapped = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    low = ((2147483647 - rows.to(torch.int64)) * 2)[:, None]
    if absolute:
        low = low + (score < 0).to(torch.int64)
    comp = (mapped << 32) | low
    return torch.where(eligible, comp, torch.full_like(comp, _SENTINEL))


def _decode_composite(comp: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(values float32, indices int64) of composite keys; sentinels become (-inf, -1)."""
    high = comp >> 32
    pad = high <= _NEG_INF_MAPPED
    mapped = high.to(torch.int32)
    bits = torch.where(mapped >= 0, mapped, mapped ^ 0x7FFFFFFF)
    key = bits.view(torch.float32)
    low = comp & 0xFFFFFFFF
    rows = 2147483647 - (low >> 1)
    value = torch.where((low & 1) == 1, -key, key)
    value = torch.where(pad, torch.full_like(value, float("-inf")), value)
    rows = torch.where(pad, torch.full_like(rows, -1), rows)
    return value, rows


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    """Launch shape. num_programs: persistent programs of the top-m kernel (None: 2 per SM)."""

    block_n: int = 128
    block_d: int = 128
    num_warps: int = 8
    num_stages: int = 3
    num_programs: Optional[int] = None


_INTERPRETER_CONFIG = KernelConfig(block_n=64, block_d=64, num_warps=4, num_stages=1, num_programs=4)


def _default_config(candidates: torch.Tensor) -> KernelConfig:
    """Launch shape (a reasoned guess until the GPU sweep in benchmarks/gpu_correlate.py
    picks one): 16 KB A tiles, 4 stages (< 100 KB shared memory for up to 64 dot columns), so
    two programs fit per SM and ~96 KB of A is in flight per SM; 2 programs per SM."""
    if not candidates.is_cuda:
        return _INTERPRETER_CONFIG
    return _gpu_config(candidates.dtype)


def _gpu_config(dtype: torch.dtype) -> KernelConfig:
    if dtype == torch.float32:
        return KernelConfig(block_n=128, block_d=32, num_warps=8, num_stages=4)
    return KernelConfig(block_n=128, block_d=64, num_warps=8, num_stages=4)


if triton is not None:
    _KEY_SENTINEL = tl.constexpr(_SENTINEL)
    _KEY_UNUSED = tl.constexpr((1 << 63) - 1)

    @triton.jit
    def _block_scores(a_ptr, r_ptr, rows, row_ok, D, stride_an, stride_rd, r_col0,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, W: tl.constexpr,
                      CB: tl.constexpr, PARTS: tl.constexpr, UPCAST: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
        """(BLOCK_N, CB) fp32 sums over D of A[rows] * R-parts, parts summed per column."""
        offs_d = tl.arange(0, BLOCK_D)
        offs_w = r_col0 + tl.arange(0, W)
        a_rows = a_ptr + rows[:, None] * stride_an  # rows are int64: 64-bit offsets
        acc = tl.zeros((BLOCK_N, W), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_ok = d < D
            a = tl.load(a_rows + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            r = tl.load(r_ptr + d[:, None].to(tl.int64) * stride_rd + offs_w[None, :],
                        mask=d_ok[:, None], other=0.0)
            if UPCAST:  # interpreter: tl.dot on bf16 operands is wrong there; parts are exact in fp32
                a = a.to(tl.float32)
                r = r.to(tl.float32)
            acc = tl.dot(a, r, acc, input_precision=DOT_PRECISION)
        if PARTS > 1:
            acc = tl.sum(tl.reshape(acc, (BLOCK_N, CB, PARTS)), axis=2)
        return acc

    @triton.jit
    def _scaled(acc, rows, row_ok, cols, col_ok, col_unscale_ptr, row_scale_ptr,
                HAS_COL_SCALE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr):
        score = acc
        if HAS_COL_SCALE:  # fp16 parts were scaled by 2^e per column: undo exactly
            score = score * tl.load(col_unscale_ptr + cols, mask=col_ok, other=1.0)[None, :]
        if HAS_ROW_SCALE:
            score = score * tl.load(row_scale_ptr + rows, mask=row_ok, other=1.0)[:, None]
        return score

    @triton.jit
    def _correlate_topk_partial_kernel(
        a_ptr, r_ptr, col_unscale_ptr, row_scale_ptr, excl_ptr, part_ptr,
        N, D, M, stride_an, stride_rd, stride_en, stride_em, num_blocks,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, W: tl.constexpr, CB: tl.constexpr,
        PARTS: tl.constexpr, K_PAD: tl.constexpr, M_TOP: tl.constexpr,
        HAS_COL_SCALE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_EXCL: tl.constexpr,
        ABSOLUTE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """Stage 1: program pid folds row blocks pid, pid+P, ... into its per-column top-M_TOP
        of composite keys and writes them to part[pid, 0:M_TOP, cols]."""
        pid = tl.program_id(0)
        tile = tl.program_id(1)
        nprog = tl.num_programs(0)
        cols = tile * CB + tl.arange(0, CB)
        col_ok = cols < M
        if M_TOP == 1:
            best = tl.full((CB,), _KEY_SENTINEL, tl.int64)
        else:
            slot = tl.arange(0, K_PAD)
            # Distinct sentinels (so "the slot holding the minimum" is one slot); slots past
            # M_TOP hold +max and are never replaced nor stored.
            best = tl.full((K_PAD, CB), _KEY_SENTINEL, tl.int64) + slot[:, None].to(tl.int64)
            best = tl.where(slot[:, None] < M_TOP, best, _KEY_UNUSED)
        for blk in range(pid, num_blocks, nprog):
            # blk * BLOCK_N < N + BLOCK_N fits int32 (MAX_ROWS); the offsets below are int64.
            rows = tl.arange(0, BLOCK_N).to(tl.int64) + blk * BLOCK_N
            row_ok = rows < N
            acc = _block_scores(a_ptr, r_ptr, rows, row_ok, D, stride_an, stride_rd, tile * W,
                                BLOCK_N, BLOCK_D, W, CB, PARTS, UPCAST, DOT_PRECISION)
            score = _scaled(acc, rows, row_ok, cols, col_ok, col_unscale_ptr, row_scale_ptr,
                            HAS_COL_SCALE, HAS_ROW_SCALE)
            if ABSOLUTE:
                key = tl.abs(score)
            else:
                key = score
            key = tl.where(key == 0.0, 0.0, key)  # fold -0 into +0
            finite = (key > float("-inf")) & (key < float("inf"))  # NaN, +-inf: out
            ok = row_ok[:, None] & col_ok[None, :] & finite
            if HAS_EXCL:
                ex = tl.load(excl_ptr + rows[:, None] * stride_en + cols[None, :] * stride_em,
                             mask=row_ok[:, None] & col_ok[None, :], other=1)
                ok = ok & (ex == 0)
            bits = key.to(tl.int32, bitcast=True)
            mapped = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
            low = (2147483647 - rows) * 2
            if ABSOLUTE:
                low2 = low[:, None] + (score < 0.0).to(tl.int64)
            else:
                low2 = low[:, None] + tl.zeros((BLOCK_N, CB), tl.int64)
            comp = (mapped.to(tl.int64) << 32) | low2
            comp = tl.where(ok, comp, _KEY_SENTINEL)
            if M_TOP == 1:
                best = tl.maximum(best, tl.max(comp, axis=0))
            else:
                top = tl.max(comp, axis=0)
                worst = tl.min(best, axis=0)
                # Insert the block's entries that beat the current M_TOP-th best, largest first,
                # each replacing the smallest kept one; after warm-up most blocks skip this.
                while tl.max((top > worst).to(tl.int32), axis=0) > 0:
                    ins = top > worst
                    best = tl.where((best == worst[None, :]) & ins[None, :], top[None, :], best)
                    comp = tl.where((comp == top[None, :]) & ins[None, :], _KEY_SENTINEL, comp)
                    top = tl.max(comp, axis=0)
                    worst = tl.min(best, axis=0)
        if M_TOP == 1:
            tl.store(part_ptr + pid.to(tl.int64) * M + cols, best, mask=col_ok)
        else:
            offs = pid.to(tl.int64) * M_TOP * M + slot[:, None] * M + cols[None, :]
            tl.store(part_ptr + offs, best, mask=(slot[:, None] < M_TOP) & col_ok[None, :])

    @triton.jit
    def _candidate_scores_kernel(
        a_ptr, r_ptr, col_unscale_ptr, row_scale_ptr, out_ptr,
        N, D, M, stride_an, stride_rd, stride_on,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, W: tl.constexpr, CB: tl.constexpr,
        PARTS: tl.constexpr, HAS_COL_SCALE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """out[rows, cols] = row_scale * (A R)[rows, cols] for one row block and column tile."""
        blk = tl.program_id(0)
        tile = tl.program_id(1)
        rows = blk.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tile * CB + tl.arange(0, CB)
        col_ok = cols < M
        acc = _block_scores(a_ptr, r_ptr, rows, row_ok, D, stride_an, stride_rd, tile * W,
                            BLOCK_N, BLOCK_D, W, CB, PARTS, UPCAST, DOT_PRECISION)
        score = _scaled(acc, rows, row_ok, cols, col_ok, col_unscale_ptr, row_scale_ptr,
                        HAS_COL_SCALE, HAS_ROW_SCALE)
        tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :], score,
                 mask=row_ok[:, None] & col_ok[None, :])


def _new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Uninitialised buffer every element of which the kernel writes (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@dataclass(frozen=True)
class _Operand:
    """R laid out for the kernel: (D, tiles * W) in the dot dtype, parts interleaved."""

    packed: torch.Tensor
    col_unscale: Optional[torch.Tensor]
    W: int
    CB: int
    parts: int
    tiles: int


def _pack_residuals(R: torch.Tensor, a_dtype: torch.dtype, cb: int) -> _Operand:
    """Split R (D, m) fp32 into parts exact in a_dtype, interleaved 4 slots per column."""
    d, m = R.shape
    tiles = -(-m // cb)
    if a_dtype == torch.float32:
        packed = torch.zeros(d, tiles * cb, dtype=torch.float32, device=R.device)
        packed[:, :m] = R
        return _Operand(packed, None, cb, cb, 1, tiles)
    col_unscale = None
    Rs = R
    if a_dtype == torch.float16:
        # Scale column j by 2^e_j so that max |r_j| lies in [2^14, 2^15): fp16 parts then hold
        # R to ~2^-33 of max |r_j| without overflow. frexp: max = f 2^x, f in [0.5, 1).
        peak = R.abs().amax(dim=0)
        _, x = torch.frexp(peak)
        e = torch.where(peak > 0, 15 - x, torch.zeros_like(x)).clamp(-120, 120)
        Rs = torch.ldexp(R, e[None, :].to(torch.float32))
        col_unscale = torch.ldexp(torch.ones(m, device=R.device), (-e).to(torch.float32))
    parts = []
    rest = Rs
    for _ in range(3):
        p = rest.to(a_dtype)
        parts.append(p)
        rest = rest - p.to(torch.float32)  # exact in fp32
    parts.append(torch.zeros_like(parts[0]))  # 4th slot: the per-column sum is a reshape
    stacked = torch.stack(parts, dim=2)  # (D, m, 4)
    packed = torch.zeros(d, tiles * cb, 4, dtype=a_dtype, device=R.device)
    packed[:, :m] = stacked
    if col_unscale is not None:
        cu = torch.ones(tiles * cb, dtype=torch.float32, device=R.device)
        cu[:m] = col_unscale
        col_unscale = cu
    return _Operand(packed.reshape(d, tiles * cb * 4), col_unscale, cb * 4, cb, 4, tiles)


def _column_tile(a_dtype: torch.dtype, m: int, k_pad: int = 1) -> int:
    """Output columns per program: >= 16 dot columns, <= 64, and a running top-m of at most
    4096 entries (k_pad * CB) per program."""
    parts = 1 if a_dtype == torch.float32 else 4
    cb = max(16 // parts, min(_next_pow2(m), 64 // parts))
    while cb * k_pad > 4096 and cb * parts > 16:
        cb //= 2
    return cb


def _dot_precision(candidates: torch.Tensor) -> str:
    if not candidates.is_cuda:
        return "ieee"
    return "tf32x3" if candidates.dtype == torch.float32 else "ieee"  # ignored for 16-bit operands


def _launch_scores(A, R, row_scale, out, config: KernelConfig) -> None:
    n, d = A.shape
    m = R.shape[1]
    cb = _column_tile(A.dtype, m)
    op = _pack_residuals(R, A.dtype, cb)
    dummy = out
    grid = (triton.cdiv(n, config.block_n), op.tiles)
    _candidate_scores_kernel[grid](
        A, op.packed, op.col_unscale if op.col_unscale is not None else dummy,
        row_scale if row_scale is not None else dummy, out,
        n, d, m, A.stride(0), op.packed.stride(0), out.stride(0),
        BLOCK_N=config.block_n, BLOCK_D=config.block_d, W=op.W, CB=op.CB, PARTS=op.parts,
        HAS_COL_SCALE=op.col_unscale is not None, HAS_ROW_SCALE=row_scale is not None,
        UPCAST=not A.is_cuda, DOT_PRECISION=_dot_precision(A),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def candidate_scores_triton(candidates, columns, *, row_scale=None,
                            config: Optional[KernelConfig] = None) -> torch.Tensor:
    """Triton candidate_scores (CUDA, or CPU under TRITON_INTERPRET=1)."""
    _check_candidates(candidates)
    X = _check_columns("columns", columns, candidates)
    row_scale = _check_row_scale(row_scale, candidates)
    out = _new_output((candidates.shape[0], X.shape[1]), torch.float32, candidates.device)
    if candidates.shape[0] > 0:
        _launch_scores(candidates, X, row_scale, out, config or _default_config(candidates))
    return out


def _num_programs(A: torch.Tensor, num_blocks: int, config: KernelConfig) -> int:
    if config.num_programs is not None:
        p = config.num_programs
    elif A.is_cuda:
        p = 2 * torch.cuda.get_device_properties(A.device).multi_processor_count
    else:
        p = 4
    return max(1, min(p, num_blocks))


def _exclude_strides(exclude: Optional[torch.Tensor]):
    if exclude is None:
        return None, 0, 0
    ex = exclude.contiguous().view(torch.uint8)
    if ex.dim() == 1:
        return ex, ex.stride(0), 0  # one mask shared by every column
    return ex, ex.stride(0), ex.stride(1)


def _finish(comp: torch.Tensor, m_top: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stage 2 over candidate composites (rows, m): best m_top per column, decoded, (m, m_top)."""
    if m_top == 1:
        best = comp.max(dim=0, keepdim=True).values
    else:
        rows = comp.shape[0]
        if rows < m_top:  # pad with sentinels (decoded as -inf / -1)
            comp = torch.cat([comp, torch.full((m_top - rows, comp.shape[1]), _SENTINEL,
                                               dtype=comp.dtype, device=comp.device)])
        best = torch.topk(comp, m_top, dim=0, largest=True, sorted=True).values  # unique keys
    values, indices = _decode_composite(best)
    return values.T.contiguous(), indices.T.contiguous()


def correlate_topk_triton(candidates, residuals, m_top: int = 1, *, exclude=None, row_scale=None,
                          absolute: bool = False, config: Optional[KernelConfig] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton correlate_topk (CUDA, or CPU under TRITON_INTERPRET=1); config for tuning/tests."""
    A, R, m_top, exclude, row_scale = _check_inputs(candidates, residuals, m_top, exclude, row_scale)
    n, d = A.shape
    m = R.shape[1]
    if n > MAX_ROWS:
        raise ValueError(f"candidates has {n} rows; the Triton path supports at most {MAX_ROWS}")
    config = config or _default_config(A)
    if n == 0:
        return (torch.full((m, m_top), float("-inf"), device=A.device),
                torch.full((m, m_top), -1, dtype=torch.int64, device=A.device))
    if m_top > FUSED_MAX_TOP:
        return _correlate_topk_chunked(A, R, m_top, exclude, row_scale, absolute, config)
    k_pad = _next_pow2(m_top)
    cb = _column_tile(A.dtype, m, k_pad)
    op = _pack_residuals(R, A.dtype, cb)
    num_blocks = triton.cdiv(n, config.block_n)
    programs = _num_programs(A, num_blocks, config)
    part = _new_output((programs, m_top, m), torch.int64, A.device)
    ex, stride_en, stride_em = _exclude_strides(exclude)
    dummy = part
    _correlate_topk_partial_kernel[(programs, op.tiles)](
        A, op.packed, op.col_unscale if op.col_unscale is not None else dummy,
        row_scale if row_scale is not None else dummy, ex if ex is not None else dummy, part,
        n, d, m, A.stride(0), op.packed.stride(0), stride_en, stride_em, num_blocks,
        BLOCK_N=config.block_n, BLOCK_D=config.block_d, W=op.W, CB=op.CB, PARTS=op.parts,
        K_PAD=k_pad, M_TOP=m_top,
        HAS_COL_SCALE=op.col_unscale is not None, HAS_ROW_SCALE=row_scale is not None,
        HAS_EXCL=ex is not None, ABSOLUTE=bool(absolute), UPCAST=not A.is_cuda,
        DOT_PRECISION=_dot_precision(A), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return _finish(part.reshape(programs * m_top, m), m_top)


def _correlate_topk_chunked(A, R, m_top, exclude, row_scale, absolute, config,
                            chunk_elements: int = 1 << 26):
    """Large m_top: scores of a slab of rows (candidate_scores kernel), composite keys, topk
    merged with the running best. One read of A; at most chunk_elements scores at a time."""
    n, m = A.shape[0], R.shape[1]
    step = max(m_top, chunk_elements // m)
    step = -(-step // config.block_n) * config.block_n
    buf = _new_output((min(n, step), m), torch.float32, A.device)
    best = torch.empty(0, m, dtype=torch.int64, device=A.device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        scores = buf[: stop - start]
        _launch_scores(A[start:stop], R, None if row_scale is None else row_scale[start:stop],
                       scores, config)
        rows = torch.arange(start, stop, device=A.device)
        eligible = torch.ones_like(scores, dtype=torch.bool)
        if exclude is not None:
            ex = exclude[start:stop]
            eligible = ~(ex[:, None] if ex.dim() == 1 else ex).expand(-1, m)
        comp = torch.cat([best, _composite_keys_torch(scores, rows, eligible, absolute)])
        best = torch.topk(comp, min(m_top, comp.shape[0]), dim=0, sorted=True).values
    return _finish(best, m_top)


# ----------------------------------------------------------------------------------------
# dispatching ops
# ----------------------------------------------------------------------------------------
def correlate_topk(
    candidates: torch.Tensor,
    residuals: torch.Tensor,
    m_top: int = 1,
    *,
    exclude: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
    absolute: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-column top-m_top rows of scale_i * <a_i, r_j>; see the module docstring.

    candidates (N, D) bf16/fp16/fp32 with unit stride along D; residuals (D, m) or (D,)
    floating (used as fp32); exclude bool (N,) or (N, m), True = row excluded; row_scale
    (N,) floating (used as fp32); absolute ranks by |score| and returns the signed score.
    Returns values (m, m_top) float32 and indices (m, m_top) int64, best first, ties to the
    lowest index, padded with (-inf, -1). backend: "auto" (Triton on CUDA, torch on CPU),
    "triton" or "torch". No host synchronisation on the Triton path.

    Runs the registered op ``torch.ops.gtp_kernels.correlate_topk`` (traceable by
    torch.compile / torch.export); the inputs are checked here first, so errors are raised
    before the op and carry the same messages as the kernels' own checks.
    """
    m_top = _check_inputs(candidates, residuals, m_top, exclude, row_scale)[2]
    resolve_backend(backend, candidates)  # a bad backend name fails here, before the op
    return _correlate_topk_op(candidates, residuals, m_top, exclude, row_scale, bool(absolute), backend)


def _correlate_topk_kernel(candidates, residuals, m_top, exclude, row_scale, absolute, backend):
    """The op's body: one entry dispatching by device (Triton on CUDA, the torch reference on CPU)."""
    if resolve_backend(backend, candidates) == "triton":
        return correlate_topk_triton(candidates, residuals, m_top, exclude=exclude, row_scale=row_scale,
                                     absolute=absolute)
    return correlate_topk_reference(candidates, residuals, m_top, exclude=exclude, row_scale=row_scale,
                                    absolute=absolute)


def _correlate_topk_fake(candidates, residuals, m_top, exclude, row_scale, absolute, backend):
    m = residuals.shape[1] if residuals.dim() == 2 else 1
    values = candidates.new_empty((m, m_top), dtype=torch.float32)
    indices = candidates.new_empty((m, m_top), dtype=torch.int64)
    return values, indices


# torch.ops.gtp_kernels.correlate_topk (see ops/_library.py): no argument is mutated.
_correlate_topk_op = register(
    "correlate_topk(Tensor candidates, Tensor residuals, int m_top, Tensor? exclude, Tensor? row_scale, "
    "bool absolute, str backend) -> (Tensor values, Tensor indices)",
    _correlate_topk_kernel, _correlate_topk_fake)


def candidate_scores(
    candidates: torch.Tensor,
    columns: torch.Tensor,
    *,
    row_scale: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """(A @ X) * row_scale[:, None] as an (N, p) float32 matrix, fp32 accumulation, one read
    of A (a skinny GEMM; the K2 kernel family). columns: (D, p) or (D,) floating, used as
    fp32; a 1-D column gives (N, 1)."""
    chosen = resolve_backend(backend, candidates)
    if chosen == "triton":
        return candidate_scores_triton(candidates, columns, row_scale=row_scale)
    return candidate_scores_reference(candidates, columns, row_scale=row_scale)
