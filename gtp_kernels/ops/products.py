"""Row products Y = A X^T on CPU: the passes over the candidates where no GPU is used.

For candidates A (N x D) in float32, float16 or bfloat16 and a few float32 rows X (p x D) the
op returns the float32 (N, p) matrix of inner products <a_i, x_c>, float32 accumulation
(partial sums in vector lanes, so the rounding is at most that of a sequential fp32 sum).
16-bit rows are converted to float32 in registers as they are read (exact), so a pass over an
fp16/bf16 pool, e.g. a memory-mapped trajectory store, reads its stored bytes once and makes
no float32 copy of it. This is what the pursuits compute on
CPU once per pass: c = A W r for m residuals (p = m) and, for the cached exact strategy, the
columns A W a_j of likely-next atoms (p up to ~32).

Backends: ``"ext"``, the compiled kernel in ``csrc/cpu_rows_dot.cpp`` (register-tiled, one
copy per instruction set: AVX-512, AVX2 + F16C, baseline, picked at run time); ``"torch"``,
the plain reference ``A @ X.T`` (MKL on x86; 16-bit A upcast a block of rows at a time, the
same products in float32). ``"auto"`` takes the kernel for CPU tensors it covers when the
extension is built, else torch. Why a kernel of our own: 16-bit rows, which torch can only
multiply after a float32 copy (5-18x slower here), and float32 rows where torch's skinny GEMM
is slow: on 2026-11-29 torch's GEMV read A at about half the bandwidth of a plain read and its
skinny GEMM cost 2-4 GEMVs; on 2026-12-03 (AVX-512, torch 2.13) float32 was even except at 2-8
columns (kernel 1.6x) and 24 (torch 1.2x). BENCHMARKS.md, "CPU row products".
"""
from __future__ import annotations

from typing import Literal, Optional

import torch

from ..validation import check_choice
from ._ext import extension as _C, extension_status

ProductsBackend = Literal["auto", "ext", "torch"]


def rows_dot_isa() -> Optional[str]:
    """Instruction set of the compiled kernel here ("avx512", "avx2", "baseline"), or None."""
    return None if _C is None else _C.rows_dot_isa()


def _check(A: torch.Tensor, X: torch.Tensor, out: Optional[torch.Tensor]) -> None:
    if A.dim() != 2 or X.dim() != 2:
        raise ValueError(f"row_products takes A (N, D) and X (p, D), got {tuple(A.shape)} and {tuple(X.shape)}")
    if A.shape[1] != X.shape[1]:
        raise ValueError(f"A has D = {A.shape[1]} columns but X has {X.shape[1]}")
    if A.device != X.device:
        raise ValueError(f"A is on {A.device} but X is on {X.device}")
    if out is not None and (out.shape != (A.shape[0], X.shape[0]) or out.device != A.device):
        raise ValueError(f"out must be ({A.shape[0]}, {X.shape[0]}) on {A.device}, got {tuple(out.shape)} on {out.device}")


# stored dtypes of A the compiled kernel reads (X is float32)
EXT_ROW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
# rows of a 16-bit A upcast at a time by the torch path (values: 16M = 64 MiB of float32)
_UPCAST_ELEMENTS = 1 << 24


def _ext_ok(A: torch.Tensor, X: torch.Tensor, out: Optional[torch.Tensor]) -> bool:
    return (
        _C is not None
        and A.device.type == "cpu"
        and A.dtype in EXT_ROW_DTYPES
        and X.dtype == torch.float32
        and (out is None or (out.dtype == torch.float32 and out.is_contiguous()))
    )


def row_products(A: torch.Tensor, X: torch.Tensor, *, out: Optional[torch.Tensor] = None,
                 backend: ProductsBackend = "auto", isa: str = "") -> torch.Tensor:
    """Y = A @ X.T as an (N, p) matrix, one read of A.

    A: (N, D); X: (p, D), same device (a 1-D X is one row). out: optional (N, p) result.
    On CPU, A float32, float16 or bfloat16 with X float32 runs the compiled kernel under
    backend "auto" or "ext" (rows need unit stride along D: a non-conforming A or X is made
    contiguous first), returning float32: Y[i, c] = sum_d float(A[i, d]) * X[c, d] accumulated
    in float32. The torch path computes the same products: a 16-bit A with a float32 X is
    upcast a block of rows at a time (never the whole A); other dtype pairs compute
    ``A @ X.T`` in the dtype torch promotes to. isa: force the kernel's variant ("avx512",
    "avx2", "baseline"; tests), "" for the widest this CPU has.
    """
    check_choice(backend, "backend", ("auto", "ext", "torch"))
    if X.dim() == 1:
        X = X[None, :]
    _check(A, X, out)
    use_ext = backend != "torch" and _ext_ok(A, X, out)
    if backend == "ext" and not use_ext:
        raise RuntimeError(
            f"backend='ext' needs CPU tensors, A float32/float16/bfloat16 and X float32, and the extension "
            f"({extension_status()}); got A {A.dtype} on {A.device}, X {X.dtype}"
        )
    if use_ext:
        if A.shape[1] > 1 and A.stride(1) != 1:
            A = A.contiguous()
        if X.shape[1] > 1 and X.stride(1) != 1:
            X = X.contiguous()
        return _C.rows_dot(A, X, out, isa)
    dtype = torch.promote_types(A.dtype, X.dtype)  # mm itself refuses mixed dtypes
    if A.dtype in _HALF_DTYPES and dtype == torch.float32:
        # the kernel's semantics in torch: float32 products of the stored values, a block of
        # rows upcast at a time so that the extra memory is one block, whatever N
        if out is None:
            out = torch.empty(A.shape[0], X.shape[0], dtype=dtype, device=A.device)
        step = max(1, _UPCAST_ELEMENTS // max(1, A.shape[1]))
        for start in range(0, A.shape[0], step):
            torch.mm(A[start : start + step].to(dtype), X.T, out=out[start : start + step])
        return out
    A, X = A.to(dtype), X.to(dtype)
    if out is None:
        return A @ X.T
    return torch.mm(A, X.T, out=out)


# ------------------------------------------------------------------------------------------
# The pursuits' k-sized side: float32 copies of selected rows, float64 arithmetic.
#
# Rows taken from a float32 (or bf16/fp16) pool are exact in float32, and the product of two
# float32 numbers is exact in float64, so the Gram column and the residual computed from float32
# copies with float64 accumulation equal the float64 ones up to the summation order, from half
# the bytes (the support's rows are read twice per iteration: at k ~ D that is most of the
# non-pass work of exact pursuit on CPU).


def _f64_kernels_run(device: torch.device) -> bool:
    return device.type == "cpu" and _C is not None


def selected_rows_dtype(candidates: torch.Tensor) -> torch.dtype:
    """Storage dtype for copies of selected rows: float32 where it is exact (a float32, bf16 or
    fp16 pool) and the compiled float64-accumulating kernels run (CPU), else float64."""
    exact_in_f32 = candidates.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return torch.float32 if exact_in_f32 and _f64_kernels_run(candidates.device) else torch.float64


def rows_dot_f64(rows: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = rows @ x in float64 (in place): rows (n, D) float32 or float64, x (D,) float64.

    Float32 rows run the compiled kernel on CPU (float64 accumulation of exact products);
    float64 rows, or float32 ones without the kernel, go through torch in float64.
    """
    if rows.dtype == torch.float32 and _f64_kernels_run(rows.device):
        _C.rows_dot_f64(rows, x, out)
        return out
    return torch.mv(rows.to(torch.float64), x, out=out)


def rows_residual_f64(rows: torch.Tensor, w: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = b - rows^T w in float64 (in place): rows (n, D) float32 or float64, w (n,), b (D,)
    float64; n = 0 gives b. The same dispatch as rows_dot_f64."""
    if rows.dtype == torch.float32 and _f64_kernels_run(rows.device):
        _C.rows_combine_f64(rows, w, b, out)
        return out
    if rows.shape[0] == 0:
        return out.copy_(b)
    return torch.addmv(b, rows.to(torch.float64).T, w, alpha=-1.0, out=out)
