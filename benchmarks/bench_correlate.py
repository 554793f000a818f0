"""K2 on CPU: correlate_topk's torch path vs the naive "A @ R, then argmax / topk".

The op's CPU path is the plain reference (slabs of rows upcast to fp32, argmax or a stable
sort for the lowest-index tie-break); the naive baseline has no exclusion and no
deterministic ties. Both read A once, so the ratio shows what the contract costs.

    python -m pytest benchmarks/bench_correlate.py --benchmark-only
    python benchmarks/bench_correlate.py          # side-by-side table with ratios
"""
from __future__ import annotations


import pytest
import torch

from gtp_kernels.ops.correlate import correlate_topk
from timing import median_seconds

# (N, D, dtype, m, m_top): small enough to run in seconds on 2 cores
CASES = [
    (20000, 512, torch.float32, 1, 1),
    (20000, 512, torch.float32, 8, 1),
    (20000, 512, torch.float32, 8, 64),
    (20000, 512, torch.bfloat16, 1, 1),
]


def _problem(n, d, dtype, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, d, generator=g).to(dtype)
    R = torch.randn(d, m, generator=g)
    exclude = torch.rand(n, generator=g) < 0.01
    return A, R, exclude


def _naive(A, R, m_top):
    scores = A @ R.to(A.dtype)
    if m_top == 1:
        return scores.float().argmax(dim=0)
    return torch.topk(scores.float(), m_top, dim=0).indices


def _ids(case):
    n, d, dtype, m, top = case
    return f"N{n}-D{d}-{str(dtype).split('.')[-1]}-m{m}-top{top}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_correlate_topk_torch_path(benchmark, case):
    n, d, dtype, m, m_top = case
    A, R, exclude = _problem(n, d, dtype, m)
    benchmark.group = _ids(case)
    values, indices = benchmark(lambda: correlate_topk(A, R, m_top, exclude=exclude, backend="torch"))
    assert (indices >= 0).all()


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_naive_matmul_then_topk(benchmark, case):
    n, d, dtype, m, m_top = case
    A, R, _ = _problem(n, d, dtype, m)
    benchmark.group = _ids(case)
    benchmark(lambda: _naive(A, R, m_top))


def _median_ms(fn, repeat=7):
    return median_seconds(fn, repeat) * 1e3


if __name__ == "__main__":
    from timing import script_help

    script_help(__doc__)
    print(f"{'case':38s} {'op ms':>9s} {'naive ms':>9s} {'op/naive':>9s}")
    for case in CASES:
        n, d, dtype, m, m_top = case
        A, R, exclude = _problem(n, d, dtype, m)
        op = _median_ms(lambda: correlate_topk(A, R, m_top, exclude=exclude, backend="torch"))
        naive = _median_ms(lambda: _naive(A, R, m_top))
        print(f"{_ids(case):38s} {op:9.2f} {naive:9.2f} {op / naive:9.2f}")
