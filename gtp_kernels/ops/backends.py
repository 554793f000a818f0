"""Which kernel runs where: the backends, the chunk size of a pass, and the two N-sized
products every pursuit makes (A @ X, and the masked top-m of A @ R).

One place for these facts, so that the pursuits (selection.pursuit, selection.cosamp,
selection.distributed) and the checks (validation) read the same ones:

* ``BACKENDS``: the names a ``backend=`` option takes. "auto" picks the Triton kernels (K2)
  on CUDA tensors and the compiled row-products kernel (ops.products) on CPU tensors;
  "triton" forces K2 (on CPU through the Triton interpreter, for tests); "torch" plain torch.
* ``CHUNK_ELEMENTS``: values per chunk of every chunked pass over the candidates (64 MiB of
  float32): a pass that upcasts, checks or scores rows holds one chunk extra, whatever N.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch

Backend = Literal["auto", "triton", "torch"]
BACKENDS = get_args(Backend)  # ("auto", "triton", "torch")

# values per chunk of a pass over the candidates (64 MiB of float32)
CHUNK_ELEMENTS = 1 << 24


def check_backend_name(backend: str) -> str:
    """``backend`` when it is one of BACKENDS, else ValueError (the ops' internal check; user
    input is checked by validation.check_backend, an InputError)."""
    if backend not in BACKENDS:
        names = ", ".join(repr(b) for b in BACKENDS[:-1]) + f" or {BACKENDS[-1]!r}"
        raise ValueError(f"backend must be {names}, got {backend!r}")
    return backend


def use_kernels(A: torch.Tensor, dtype: torch.dtype, backend: str) -> bool:
    """Whether the K2 kernels run: they compute in float32; "auto" uses them on CUDA tensors only."""
    check_backend_name(backend)
    return dtype == torch.float32 and (backend == "triton" or (backend == "auto" and A.is_cuda))


def candidate_products(A, X: torch.Tensor, dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
    """A @ X as an (N, p) matrix in dtype; one read of A.

    On CUDA in float32 this is the K2 kernel family (fp32 accumulation over bf16/fp16/fp32
    rows); on CPU in float32 the compiled row-products kernel (ops.products; float32 rows: about
    torch's speed, 1.6x it at 2-8 columns, 0.8x at 24, BENCHMARKS.md 2026-12-03; fp16/bf16 rows
    converted as they are read, 5-18x an upcast and torch);
    elsewhere a chunked torch matmul,
    upcasting A a block of rows at a time. A row source (selection.rows.RowSource: anything
    that is not a tensor) runs a chunk at a time through the same paths, each chunk in its
    stored dtype.
    """
    if not isinstance(A, torch.Tensor):  # a row source
        out = torch.empty(A.num_rows, X.shape[1], dtype=dtype, device=A.device)
        for start, chunk in A.chunks(CHUNK_ELEMENTS):
            out[start : start + chunk.shape[0]] = candidate_products(chunk, X, dtype, backend)
        return out
    if use_kernels(A, dtype, backend):
        from .correlate import candidate_scores

        return candidate_scores(A, X.contiguous(), backend="triton")
    # the row-products op reads float32 rows, and fp16/bf16 rows without a float32 copy
    if backend != "torch" and (A.dtype == dtype or (dtype == torch.float32 and not A.is_cuda
                                                    and A.dtype in (torch.float16, torch.bfloat16))):
        from .products import row_products  # here: products imports validation, which reads BACKENDS

        return row_products(A, X.T)
    if A.dtype == dtype:
        return A @ X
    out = torch.empty(A.shape[0], X.shape[1], dtype=dtype, device=A.device)
    step = max(1, CHUNK_ELEMENTS // max(1, A.shape[1]))
    for start in range(0, A.shape[0], step):
        out[start : start + step] = A[start : start + step].to(dtype) @ X
    return out


def masked_top(A, RW, exclude, count, positive, dtype, backend):
    """One read of A: per column of A @ RW, the `count` best masked rows as (m, count) values
    and indices (|scores| ranked when not positive). K2 on the kernel path; in torch, count 1
    uses torch.max, whose ties go to the lowest index as the reference's argmax does. A row
    source goes through candidate_products, a chunk at a time."""
    if isinstance(A, torch.Tensor) and use_kernels(A, dtype, backend):
        from .correlate import correlate_topk

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
