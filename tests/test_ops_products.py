"""CPU row products Y = A X^T (csrc/cpu_rows_dot.cpp): every instruction-set variant against a
float64 reference on awkward shapes, strided inputs, out=, thread-count independence, the torch
path for other dtypes, and bad inputs."""
from __future__ import annotations

import os

import pytest
import torch

from gtp_kernels.ops import products
from gtp_kernels.ops.products import row_products

EXT = products._C is not None
needs_ext = pytest.mark.skipif(not EXT, reason=products.extension_status())


def _variants():
    if not EXT:
        return []
    out = []
    for isa in ("avx512", "avx2", "baseline"):
        try:
            row_products(torch.ones(1, 1), torch.ones(1, 1), isa=isa)
            out.append(isa)
        except RuntimeError:
            pass  # this CPU lacks it
    return out


VARIANTS = _variants()


def test_extension_built_when_required():
    if os.environ.get("GTP_REQUIRE_EXT") == "1":
        assert EXT, products.extension_status()
        assert products.rows_dot_isa() in ("avx512", "avx2", "baseline")


def _fp32_bound(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """gamma_D * (|A| |X|^T): the worst-case error of any fp32 summation order (plus one
    rounding of each product), so a correct kernel cannot exceed it."""
    d = A.shape[1]
    u = 2.0 ** -24
    gamma = (d + 1) * u / (1 - (d + 1) * u)
    return gamma * (A.double().abs() @ X.double().abs().T)


def _check(Y: torch.Tensor, A: torch.Tensor, X: torch.Tensor) -> None:
    ref = A.double() @ X.double().T
    assert Y.shape == ref.shape and Y.dtype == torch.float32
    assert torch.isfinite(Y).all()
    err = (Y.double() - ref).abs()
    bound = _fp32_bound(A, X)
    assert (err <= bound).all(), f"max err {err.max():.3e}, bound there {bound.flatten()[err.argmax()]:.3e}"


# N below/at/above the 4-row tile, D around the vector widths and the 1024 chunk, p around the
# 4-column tile (and > 32, where a pursuit's fetch can land)
SHAPES = [(1, 1, 1), (3, 15, 2), (5, 16, 3), (7, 17, 4), (9, 33, 5), (17, 100, 7), (64, 1023, 8),
          (131, 1024, 9), (257, 1025, 16), (33, 2049, 17), (41, 3000, 33), (1003, 257, 1)]


@needs_ext
@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("n,d,p", SHAPES)
def test_variants_match_float64(isa, n, d, p):
    g = torch.Generator().manual_seed(n * 1000 + d + p)
    A = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) * 10  # rows of mixed scale
    X = torch.randn(p, d, generator=g)
    out = torch.full((n, p), float("nan"))  # poisoned: every entry must be written
    Y = row_products(A, X, out=out, backend="ext", isa=isa)
    assert Y.data_ptr() == out.data_ptr()
    _check(Y, A, X)


@needs_ext
def test_variants_agree_closely():
    """Different lane counts sum in different orders: they differ by fp32 rounding only."""
    g = torch.Generator().manual_seed(7)
    A, X = torch.randn(301, 1537, generator=g), torch.randn(6, 1537, generator=g)
    ys = [row_products(A, X, backend="ext", isa=isa) for isa in VARIANTS]
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0], rtol=0, atol=5e-4)


@needs_ext
def test_strided_rows_and_views():
    """A with a row stride larger than D (a column slice), X transposed (made contiguous)."""
    g = torch.Generator().manual_seed(3)
    big = torch.randn(203, 530, generator=g)
    A = big[:, 7:507]  # stride (530, 1)
    Xt = torch.randn(500, 6, generator=g)  # X = Xt.T has stride (1, 6)
    Y = row_products(A, Xt.T, backend="ext")
    _check(Y, A, Xt.T)
    Y_rows = row_products(big[1::2, :500], Xt.T, backend="ext")  # every other row
    _check(Y_rows, big[1::2, :500], Xt.T)


@needs_ext
def test_thread_split_does_not_change_bits():
    g = torch.Generator().manual_seed(11)
    A, X = torch.randn(4099, 700, generator=g), torch.randn(5, 700, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = row_products(A, X, backend="ext")
        torch.set_num_threads(max(2, threads))
        many = row_products(A, X, backend="ext")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@needs_ext
def test_empty_and_degenerate():
    assert row_products(torch.randn(0, 5), torch.randn(3, 5), backend="ext").shape == (0, 3)
    assert row_products(torch.randn(4, 5), torch.randn(0, 5), backend="ext").shape == (4, 0)
    out = torch.full((4, 3), float("nan"))
    assert torch.equal(row_products(torch.randn(4, 0), torch.randn(3, 0), out=out, backend="ext"), torch.zeros(4, 3))
    y = row_products(torch.randn(6, 9), torch.randn(9), backend="ext")  # 1-D X: one row
    assert y.shape == (6, 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes_take_torch(dtype):
    g = torch.Generator().manual_seed(5)
    A, X = torch.randn(19, 33, generator=g).to(dtype), torch.randn(3, 33, generator=g).to(dtype)
    Y = row_products(A, X)  # auto: the kernel takes float32 X only, torch computes A @ X.T
    assert Y.dtype == dtype
    torch.testing.assert_close(Y, A @ X.T)
    if EXT:
        with pytest.raises(RuntimeError, match="X float32"):
            row_products(A, X, backend="ext")


# ---- 16-bit rows (fp16 / bf16 A, float32 X): converted in registers, float32 accumulation ----

HALF_DTYPES = [torch.float16, torch.bfloat16]


def _half_rows(n: int, d: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Rows of mixed scale in the stored dtype; the float64 reference reads the same stored values."""
    return (torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) * 10).to(dtype)


@needs_ext
@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n,d,p", SHAPES)
def test_half_rows_variants_match_float64(isa, dtype, n, d, p):
    g = torch.Generator().manual_seed(n * 1000 + d + p + 1)
    A = _half_rows(n, d, dtype, g)
    X = torch.randn(p, d, generator=g)
    out = torch.full((n, p), float("nan"))
    Y = row_products(A, X, out=out, backend="ext", isa=isa)
    assert Y.data_ptr() == out.data_ptr()
    _check(Y, A, X)  # A.double() is exactly what the kernel converts: the fp32 bound holds as is


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_rows_torch_path_same_products(dtype, monkeypatch):
    """The fallback: float32 products of the stored values, a block of rows upcast at a time
    (blocks of 3 rows here, so the loop and the last short block run)."""
    monkeypatch.setattr(products, "_UPCAST_ELEMENTS", 3 * 45)
    g = torch.Generator().manual_seed(21)
    A, X = _half_rows(17, 45, dtype, g), torch.randn(4, 45, generator=g)
    Y = row_products(A, X, backend="torch")
    _check(Y, A, X)
    out = torch.full((17, 4), float("nan"))
    assert row_products(A, X, out=out, backend="torch").data_ptr() == out.data_ptr()
    _check(out, A, X)
    if EXT:  # the kernel and the fallback compute the same sums up to their order
        torch.testing.assert_close(row_products(A, X, backend="ext"), Y, rtol=0, atol=1e-4 * float(Y.abs().max()))


@needs_ext
@pytest.mark.parametrize("isa", VARIANTS)
def test_fp16_special_values(isa):
    """Subnormals, the largest normal, -0, inf and NaN convert exactly (in the vector body and
    in the scalar tail): a one-hot X reads each stored value back (a sum from +0: -0 reads 0)."""
    patterns = [0x0001, 0x03FF, 0x0400, 0x7BFF, 0x8001, 0x8000, 0x3C00, 0xC000, 0x7C00, 0xFC00, 0x7E00, 0x3555]
    values = torch.tensor(patterns, dtype=torch.int32).to(torch.int16).view(torch.float16)
    d = 37  # 32 or 16 lanes of vector body, then a scalar tail
    for position in (0, d - 1):
        A = torch.zeros(len(patterns), d, dtype=torch.float16)
        A[:, position] = values
        X = torch.zeros(1, d)
        X[0, position] = 1.0
        Y = row_products(A, X, backend="ext", isa=isa)[:, 0]
        expect = values.float()
        finite = torch.isfinite(expect)
        assert torch.equal(Y[finite], expect[finite])
        assert torch.equal(Y[~finite].isnan(), expect[~finite].isnan())
        assert torch.equal(Y[torch.isinf(expect)], expect[torch.isinf(expect)])


@needs_ext
@pytest.mark.parametrize("isa", VARIANTS)
def test_bf16_special_values(isa):
    values = torch.tensor([1e-40, -3e38, 3.3895e38, float("inf"), -float("inf"), -0.0, 1.0 / 3],
                          dtype=torch.bfloat16)
    for position in (0, 18):  # vector body, scalar tail
        A = torch.zeros(len(values), 19, dtype=torch.bfloat16)
        A[:, position] = values
        X = torch.zeros(1, 19)
        X[0, position] = 1.0
        Y = row_products(A, X, backend="ext", isa=isa)[:, 0]
        assert torch.equal(Y, values.float())


@needs_ext
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_rows_strided_and_memory_mapped(dtype, tmp_path):
    """A column slice of 16-bit rows (row stride > D), and an fp16 memory map read in place."""
    g = torch.Generator().manual_seed(4)
    big = _half_rows(97, 300, dtype, g)
    X = torch.randn(3, 250, generator=g)
    _check(row_products(big[:, 20:270], X, backend="ext"), big[:, 20:270], X)
    if dtype == torch.float16:
        import numpy as np

        from gtp_kernels.selection.rows import tensor_from_array

        path = tmp_path / "rows.npy"
        np.save(path, big.numpy())
        mapped = tensor_from_array(np.load(path, mmap_mode="r"))
        assert mapped.dtype == torch.float16
        Y = row_products(mapped[:, :250], X, backend="ext")
        _check(Y, big[:, :250], X)


def test_mixed_dtypes_compute_in_the_promoted_dtype():
    g = torch.Generator().manual_seed(6)
    A, X = torch.randn(9, 7, generator=g), torch.randn(3, 7, generator=g, dtype=torch.float64)
    Y = row_products(A, X)
    assert Y.dtype == torch.float64
    torch.testing.assert_close(Y, A.double() @ X.T, rtol=1e-12, atol=1e-12)
    assert row_products(A.half(), X.float()).dtype == torch.float32


def test_torch_backend_is_the_reference():
    g = torch.Generator().manual_seed(9)
    A, X = torch.randn(23, 47, generator=g), torch.randn(4, 47, generator=g)
    _check(row_products(A, X, backend="torch"), A, X)


def test_bad_inputs():
    with pytest.raises(ValueError, match="D = 5 columns but X has 6"):
        row_products(torch.randn(3, 5), torch.randn(2, 6))
    with pytest.raises(ValueError, match="takes A"):
        row_products(torch.randn(3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="out must be"):
        row_products(torch.randn(3, 5), torch.randn(2, 5), out=torch.empty(2, 3))
    with pytest.raises(ValueError, match="backend"):
        row_products(torch.randn(3, 5), torch.randn(2, 5), backend="mkl")
    if EXT:
        with pytest.raises(RuntimeError, match="not available"):
            row_products(torch.randn(3, 5), torch.randn(2, 5), isa="sse9")


# ---- float32 rows, float64 arithmetic (the pursuits' Gram columns and residuals) ----------

def _f64_bound(M32: torch.Tensor, v: torch.Tensor, n_terms: int) -> torch.Tensor:
    """Float64 summation of exact products: gamma_n (double) * sum |terms|."""
    u = 2.0 ** -53
    return (n_terms + 1) * u / (1 - (n_terms + 1) * u) * v


F64_SHAPES = [(0, 5), (1, 1), (3, 7), (4, 8), (5, 9), (9, 17), (31, 511), (64, 512), (77, 1025), (130, 2050)]


@needs_ext
@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("n,d", F64_SHAPES)
def test_rows_dot_f64_variants(isa, n, d):
    g = torch.Generator().manual_seed(n * 7 + d)
    big = torch.randn(n, d + 3, generator=g) * 3
    M = big[:, 1 : d + 1]  # row stride d + 3
    x = torch.randn(d, generator=g, dtype=torch.float64)
    out = torch.full((n,), float("nan"), dtype=torch.float64)
    products._C.rows_dot_f64(M, x, out, isa)
    ref = M.double() @ x
    assert torch.isfinite(out).all()
    assert ((out - ref).abs() <= _f64_bound(M, M.double().abs() @ x.abs(), d) + 1e-300).all()


@needs_ext
@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("n,d", F64_SHAPES)
def test_rows_residual_f64_variants(isa, n, d):
    g = torch.Generator().manual_seed(n * 5 + d)
    M = torch.randn(n, d, generator=g)
    w = torch.randn(n, generator=g, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    out = torch.full((d,), float("nan"), dtype=torch.float64)
    products._C.rows_combine_f64(M, w, b, out, isa)
    ref = b - M.double().T @ w
    scale = b.abs() + M.double().abs().T @ w.abs()
    assert torch.isfinite(out).all()
    assert ((out - ref).abs() <= _f64_bound(M, scale, n + 1) + 1e-300).all()


@pytest.mark.parametrize("rows_dtype", [torch.float32, torch.float64])
def test_pursuit_side_wrappers_match_float64(rows_dtype):
    """The wrappers the pursuits call: compiled kernel for float32 rows (when built), torch else."""
    g = torch.Generator().manual_seed(2)
    M = torch.randn(37, 300, generator=g).to(rows_dtype)
    x = torch.randn(300, generator=g, dtype=torch.float64)
    w = torch.randn(37, generator=g, dtype=torch.float64)
    b = torch.randn(300, generator=g, dtype=torch.float64)
    y = products.rows_dot_f64(M, x, torch.full((37,), float("nan"), dtype=torch.float64))
    torch.testing.assert_close(y, M.double() @ x, rtol=1e-13, atol=1e-12)
    r = products.rows_residual_f64(M, w, b, torch.full((300,), float("nan"), dtype=torch.float64))
    torch.testing.assert_close(r, b - M.double().T @ w, rtol=1e-13, atol=1e-12)
    empty = products.rows_residual_f64(M[:0], w[:0], b, torch.full((300,), float("nan"), dtype=torch.float64))
    assert torch.equal(empty, b)


def test_selected_rows_dtype():
    f32 = torch.zeros(2, 3)
    expect = torch.float32 if EXT else torch.float64
    assert products.selected_rows_dtype(f32) == expect
    assert products.selected_rows_dtype(f32.to(torch.bfloat16)) == expect  # bf16 is exact in fp32
    assert products.selected_rows_dtype(f32.double()) == torch.float64  # would round


@needs_ext
def test_f64_side_bad_inputs():
    M, x = torch.randn(4, 6), torch.randn(6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64 CPU vector of length 6"):
        products._C.rows_dot_f64(M, x.float(), torch.empty(4, dtype=torch.float64), "")
    with pytest.raises(RuntimeError, match="float32 CPU matrix"):
        products._C.rows_dot_f64(M.double(), x, torch.empty(4, dtype=torch.float64), "")
    with pytest.raises(RuntimeError, match="length 4"):
        products._C.rows_combine_f64(M, x, x, torch.empty(6, dtype=torch.float64), "")
