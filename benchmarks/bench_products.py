"""CPU row products Y = A X^T (ops.products.row_products): the compiled kernel vs torch's
A @ X.T (MKL here) and the read floor (one plain read of A, ``A.sum()``), for the product
widths the pursuits use: p = 1 (one residual), 8 (eight targets), 17 (a column fetch); fp16 and
bf16 pools against the torch path (a block of rows upcast to float32, then A @ X.T).
Also the float64 k-sized side (Gram column, residual) from float32 rows vs torch float64.

    python -m pytest benchmarks/bench_products.py --benchmark-only
    python benchmarks/bench_products.py          # side-by-side table with ratios
    python benchmarks/bench_products.py --only-16-bit   # the fp16/bf16 table alone
"""
from __future__ import annotations


import pytest
import torch

from gtp_kernels.ops import products
from gtp_kernels.ops.products import row_products, rows_dot_f64, rows_residual_f64
from timing import median_seconds

EXT = products._C is not None
# (N, D, p)
CASES = [(10_000, 1024, 1), (10_000, 1024, 8), (10_000, 1024, 17), (100_000, 2048, 1), (20_000, 8192, 17),
         (100_000, 1024, 4), (100_000, 1024, 24)]  # 24: a joint selection's columns
QUICK = [(10_000, 1024, 1), (10_000, 1024, 17)]
# fp16 / bf16 pools, (N, D, p): 268 MB of A
HALF_CASES = [(16_384, 8192, 1), (16_384, 8192, 4), (16_384, 8192, 17)]
# (support size, D) of the k-sized side
SIDE = [(100, 1024), (400, 1024), (800, 1024)]


def _problem(n, d, p, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(p, d, generator=g)


def _ids(case):
    return "N{}-D{}-p{}".format(*case)


@pytest.mark.skipif(not EXT, reason=products.extension_status())
@pytest.mark.parametrize("case", QUICK, ids=_ids)
def test_rows_dot_kernel(benchmark, case):
    A, X = _problem(*case)
    benchmark.group = _ids(case)
    Y = benchmark(lambda: row_products(A, X, backend="ext"))
    assert Y.shape == (case[0], case[2])


@pytest.mark.parametrize("case", QUICK, ids=_ids)
def test_rows_dot_torch(benchmark, case):
    A, X = _problem(*case)
    benchmark.group = _ids(case)
    benchmark(lambda: A @ X.T)


@pytest.mark.parametrize("case", QUICK, ids=_ids)
def test_read_floor(benchmark, case):
    A, _ = _problem(*case)
    benchmark.group = _ids(case)
    benchmark(lambda: A.sum())


def _median_ms(fn, repeat=15):
    return median_seconds(fn, repeat) * 1e3


def main(only_16_bit: bool = False) -> None:
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, kernel: {products.rows_dot_isa()}")
    if only_16_bit:
        half_table()
        return
    # torch both ways: A @ X.T (X as the kernel takes it, (p, D)) and A @ Xc with Xc = X.T
    # contiguous, (D, p), which MKL multiplies faster for wide p; "torch best" is the faster
    print("| N | D | p | kernel ms | torch A @ X.T ms | torch A @ Xc ms | read of A ms | torch best / kernel | kernel / read |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, d, p in CASES:
        A, X = _problem(n, d, p)
        Xc = X.T.contiguous()
        ours = _median_ms(lambda: row_products(A, X, backend="ext"))
        mkl = _median_ms(lambda: A @ X.T)
        mkl_c = _median_ms(lambda: A @ Xc)
        read = _median_ms(lambda: A.sum())
        print(f"| {n} | {d} | {p} | {ours:.2f} | {mkl:.2f} | {mkl_c:.2f} | {read:.2f} | {min(mkl, mkl_c) / ours:.2f}x "
              f"| {ours / read:.2f} |")
    print()
    half_table()
    print()
    print("| support | D | Gram column: kernel us | torch f64 us | residual: kernel us | torch f64 us |")
    print("|---|---|---|---|---|---|")
    side_table()


def half_table() -> None:
    # 16-bit pools (a store's fp16 shards): the kernel converts rows in registers; the torch path
    # (what a pass did before) upcasts a block of rows to float32 and multiplies; the floor reads
    # the same bytes as integers (torch's fp16 sum is compute-bound here)
    print("| dtype | N | D | p | kernel ms | upcast + torch ms | read of A ms | torch / kernel | kernel / read |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float16, torch.bfloat16):
        for n, d, p in HALF_CASES:
            A, X = _problem(n, d, p)
            A = A.to(dtype)
            ours = _median_ms(lambda: row_products(A, X, backend="ext"), 7)
            upcast = _median_ms(lambda: row_products(A, X, backend="torch"), 3)
            words = A.view(torch.int64)
            read = _median_ms(lambda: words.sum(), 7)
            name = str(dtype).replace("torch.", "")
            print(f"| {name} | {n} | {d} | {p} | {ours:.1f} | {upcast:.1f} | {read:.1f} | {upcast / ours:.1f}x "
                  f"| {ours / read:.2f} |")


def side_table() -> None:
    for s, d in SIDE:
        g = torch.Generator().manual_seed(s)
        M32 = torch.randn(s, d, generator=g)
        M64 = M32.double()
        x = torch.randn(d, generator=g, dtype=torch.float64)
        w = torch.randn(s, generator=g, dtype=torch.float64)
        y, r = torch.empty(s, dtype=torch.float64), torch.empty(d, dtype=torch.float64)
        k_dot = _median_ms(lambda: rows_dot_f64(M32, x, y), 51) * 1e3
        t_dot = _median_ms(lambda: torch.mv(M64, x, out=y), 51) * 1e3
        k_res = _median_ms(lambda: rows_residual_f64(M32, w, x, r), 51) * 1e3
        t_res = _median_ms(lambda: torch.addmv(x, M64.T, w, alpha=-1.0, out=r), 51) * 1e3
        print(f"| {s} | {d} | {k_dot:.0f} | {t_dot:.0f} | {k_res:.0f} | {t_res:.0f} |")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only-16-bit", action="store_true", help="only the fp16/bf16 table")
    args = parser.parse_args()
    if not EXT:
        raise SystemExit(f"the compiled extension is needed: {products.extension_status()}")
    main(args.only_16_bit)
