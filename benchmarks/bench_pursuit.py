"""pytest-benchmark suite for the selectors on CPU (small shapes; the big table is
benchmarks/pursuit_table.py). Run: python -m pytest benchmarks/bench_pursuit.py"""
import pytest
import torch

import gtp_kernels as gk

N, D, K = 20_000, 512, 100


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(N, D, generator=g)
    A /= A.norm(dim=1, keepdim=True)
    b = A[torch.randperm(N, generator=g)[:50]].T @ torch.rand(50, generator=g) + 0.05 * torch.randn(D, generator=g)
    return A, b


@pytest.mark.parametrize("method", ["gtp", "gtp-cosamp", "gtp-reference", "topk"])
def test_select(benchmark, problem, method):
    A, b = problem
    benchmark.group = f"select N={N} D={D} k={K}"
    sel = benchmark.pedantic(gk.select, args=(A, b, K), kwargs={"method": method}, rounds=3, iterations=1)
    assert len(sel.indices) == K


def test_k_pass_floor(benchmark, problem):
    A, _ = problem
    r = torch.randn(D)
    benchmark.group = f"select N={N} D={D} k={K}"

    def k_passes():
        for _ in range(K):
            A @ r

    benchmark.pedantic(k_passes, rounds=3, iterations=1)
