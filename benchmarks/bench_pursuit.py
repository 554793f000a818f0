"""pytest-benchmark suite for the selectors on CPU (small shapes; the big table is
benchmarks/pursuit_table.py). Run: python -m pytest benchmarks/bench_pursuit.py"""
import pytest
import torch

import gtp_kernels as gk

N, D, K = 20_000, 512, 100
M_JOINT = 24  # target columns of the joint problem (e.g. a task's validation examples)


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


@pytest.fixture(scope="module")
def joint_problem(problem):
    """The same rows; 24 columns, each a non-negative mix of the same 300 rows plus noise."""
    A, _ = problem
    g = torch.Generator().manual_seed(1)
    B = A[torch.randperm(N, generator=g)[:300]].T @ torch.rand(300, M_JOINT, generator=g)
    return A, B + 0.05 * torch.randn(D, M_JOINT, generator=g)


@pytest.mark.parametrize("method,screen", [("gtp", None), ("gtp-cosamp", None), ("gtp", 1.5)])
def test_select_joint(benchmark, joint_problem, method, screen):
    """Joint selection: gtp-cosamp makes gtp's picks in ~7 passes instead of 101; with the
    candidate screen (gtp select's default for joint targets) one pass ranks the rows and the
    pursuit runs on the ~150 kept."""
    A, B = joint_problem
    benchmark.group = f"select joint N={N} D={D} m={M_JOINT} k={K}"
    sel = benchmark.pedantic(gk.select, args=(A, B, K), kwargs={"method": method, "targets": "joint", "screen": screen},
                             rounds=3, iterations=1)
    assert len(sel.indices) == K
