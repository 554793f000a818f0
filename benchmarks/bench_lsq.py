"""CPU benchmark of one K3 update (pytest-benchmark): compiled C++ op vs the torch fallback vs a
fresh torch.linalg solve of the same support (what the plain-torch reference pursuit does).

    python -m pytest benchmarks/bench_lsq.py --benchmark-only -q

Each round appends one atom to a state already holding k atoms (the state is restored from a
snapshot before every round), m pursuits at once, NNLS on.
"""
from __future__ import annotations

import pytest
import torch

from gtp_kernels.ops import lsq

EXT = lsq._C is not None


def _prepared(m: int, k: int, dtype=torch.float64):
    """State with k atoms per pursuit (b = A_S^T w*, w* > 0, so no drops) and the next atom's inputs."""
    g = torch.Generator().manual_seed(k + m)
    D = 2 * k + 64
    A = torch.randn(k + 1, D, generator=g, dtype=torch.float64) / D**0.5
    w_true = 0.5 + torch.rand(k + 1, generator=g, dtype=torch.float64)
    b = (A.T @ w_true)[None].expand(m, D)
    state = lsq.lsq_init(m, k + 1, dtype)
    G = A @ A.T
    Lk = torch.linalg.cholesky(G[:k, :k])
    state.L[:, :k, :k] = Lk.to(dtype)
    state.size[:] = k
    state.support[:, :k] = torch.arange(k)
    state.rhs[:, :k] = (A[:k] @ b[0]).to(dtype)
    state.weights[:, :k] = torch.cholesky_solve((A[:k] @ b[0])[:, None], Lk)[:, 0].to(dtype)
    gram_col = torch.zeros(m, k + 1, dtype=dtype)
    gram_col[:, :k] = G[k, :k].to(dtype)
    inputs = (
        torch.full((m,), k, dtype=torch.int64),
        gram_col,
        torch.full((m,), float(G[k, k]), dtype=dtype),
        torch.full((m,), float(A[k] @ b[0]), dtype=dtype),
    )
    return state, inputs, A, b


def _run_update(backend: str, m: int, k: int, benchmark):
    state, inputs, _, _ = _prepared(m, k)
    snapshot = state.clone()

    def setup():
        for name in ("L", "size", "support", "rhs", "weights"):
            getattr(state, name).copy_(getattr(snapshot, name))
        return (state, *inputs), {"backend": backend}

    status = benchmark.pedantic(lsq.lsq_update, setup=setup, rounds=20, warmup_rounds=2)
    assert (status == lsq.STATUS_APPENDED).all()


CASES = [(1, 100), (8, 100), (1, 1000), (8, 1000)]


@pytest.mark.skipif(not EXT, reason=lsq.extension_status())
@pytest.mark.parametrize("m,k", CASES)
def test_update_cpp(benchmark, m, k):
    benchmark.group = f"lsq update m={m} k={k}"
    _run_update("ext", m, k, benchmark)


@pytest.mark.parametrize("m,k", CASES)
def test_update_torch_fallback(benchmark, m, k):
    benchmark.group = f"lsq update m={m} k={k}"
    _run_update("torch", m, k, benchmark)


@pytest.mark.parametrize("m,k", CASES)
def test_fresh_linalg_solve(benchmark, m, k):
    """The reference pursuit's way: a fresh solve with the support's Gram matrix every iteration
    (the Gram matrix itself precomputed, so only the solve is timed)."""
    benchmark.group = f"lsq update m={m} k={k}"
    _, _, A, b = _prepared(m, k)
    S = A[: k + 1]
    G = S @ S.T
    rhs = (S @ b.T).contiguous()  # (k+1, m): all m targets share the support here

    def fresh():
        return torch.linalg.solve(G, rhs)

    w = benchmark.pedantic(fresh, rounds=20, warmup_rounds=2)
    assert w.shape == (k + 1, m)
