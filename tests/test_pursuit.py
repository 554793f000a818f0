"""The fast exact driver selects exactly what the plain reference selects (compressive
sampling: tests/test_cosamp.py)."""
import warnings

import numpy as np
import pytest
import torch

import gtp_kernels as gk
from gtp_kernels.selection.common import SelectOptions
from gtp_kernels.selection.pursuit import gtp_pursuit
from gtp_kernels.validation import validate_problem
from problems import clustered_problem, nnls_drop_problem, planted_problem

STRATEGIES = ["direct", "cached"]


def noisy_problem(n, dim, seed, dtype, m=1, dup=0):
    """Gaussian pool, targets mixing ~20 rows plus noise (pursuit runs to the budget)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, dim, generator=g, dtype=torch.float64)
    if dup:
        A[-dup:] = A[:dup] * (1.0 + torch.rand(dup, 1, generator=g, dtype=torch.float64))
    cols = [A[torch.randperm(n, generator=g)[:20]].T @ torch.rand(20, generator=g, dtype=torch.float64)
            + 0.3 * torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(m)]
    return A.to(dtype), torch.stack(cols, 1).to(dtype)


def run_fast(A, B, k, strategy, prefetch=None, **kw):
    problem = validate_problem(A, B, k, num_checkpoints=kw.pop("num_checkpoints", None),
                               checkpoint_weights=kw.pop("checkpoint_weights", None))
    return gtp_pursuit(problem, k, SelectOptions(**kw), strategy=strategy, prefetch=prefetch)


def assert_same(fast, ref, rtol):
    assert len(fast) == len(ref.per_target)
    for f, r in zip(fast, ref.per_target):
        assert f.indices.tolist() == r.indices.tolist()
        np.testing.assert_allclose(f.weights, r.weights, rtol=rtol, atol=rtol * np.abs(r.weights).max())
        np.testing.assert_allclose(f.residual_norms, r.residual_norms, rtol=max(rtol, 1e-9) * 10,
                                   atol=rtol * r.residual_norms[0])
        assert f.stopped_by == r.stopped_by


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("m", [1, 3])
def test_fast_equals_reference(strategy, dtype, rtol, m):
    A, B = noisy_problem(700, 96, seed=m, dtype=dtype, m=m)
    ref = gk.select(A, B, 30, method="gtp-reference")
    fast = run_fast(A, B, 30, strategy, prefetch=4)
    assert_same(fast, ref, rtol)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fast_equals_reference_with_duplicates_weights_ridge(strategy):
    A, B = noisy_problem(400, 64, seed=5, dtype=torch.float64, dup=40)
    lrs = [2.0, 1.0, 0.5, 0.25]
    kw = dict(num_checkpoints=4, checkpoint_weights=lrs, ridge=0.05)
    ref = gk.select(A, B, 25, method="gtp-reference", **kw)
    assert_same(run_fast(A, B, 25, strategy, **kw), ref, 1e-9)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fast_nnls_drop_case(strategy):
    A, b = nnls_drop_problem()
    ref = gk.select(A, b, 3, method="gtp-reference")
    fast = run_fast(A, b, 3, strategy)
    assert fast[0].dropped == 1 == ref.per_target[0].dropped
    assert_same(fast, ref, 1e-10)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fast_without_positivity_equals_reference(strategy):
    A, B = noisy_problem(300, 80, seed=2, dtype=torch.float64)
    ref = gk.select(A, B, 20, method="gtp-reference", positive=False)
    assert_same(run_fast(A, B, 20, strategy, positive=False), ref, 1e-9)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fast_bf16_candidates_match_reference_on_same_rounding(strategy):
    A, B = noisy_problem(500, 128, seed=3, dtype=torch.float32)
    A = A.to(torch.bfloat16)
    ref = gk.select(A, B, 15, method="gtp-reference")  # both compute in fp32 on the bf16 values
    assert_same(run_fast(A, B, 15, strategy), ref, 1e-4)


def test_cached_strategy_reads_candidates_fewer_than_k_times():
    A, B = noisy_problem(3000, 256, seed=4, dtype=torch.float32)
    fast = run_fast(A, B, 60, "cached", prefetch=16)
    ref = gk.select(A, B, 60, method="gtp-reference")
    assert fast[0].indices.tolist() == ref.indices.tolist()
    assert fast[0].passes < 0.5 * ref.per_target[0].passes


def test_default_method_is_fast_and_exact():
    assert gk.METHODS["gtp"].exact
    A, B, supports, _ = planted_problem(400, 100, 10, seed=3)
    sel = gk.select(A, B[:, 0], 10)
    assert sel.method == "gtp"
    assert sorted(sel.indices.tolist()) == sorted(supports[0].tolist())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fast_on_triton_kernels_equals_reference(strategy):
    """The driver on the K2 kernels (interpreter on CPU, compiled on GPU), bf16 candidates."""
    A, B = noisy_problem(300, 48, seed=7, dtype=torch.float32, m=2)
    A = A.to(torch.bfloat16)
    if torch.cuda.is_available():
        A, B = A.cuda(), B.cuda()
    ref = gk.select(A, B, 6, method="gtp-reference")
    fast = run_fast(A, B, 6, strategy, prefetch=2, backend="triton")
    assert_same(fast, ref, 1e-4)
    cos = gk.select(A, B, 6, method="gtp-cosamp", backend="triton")
    assert all(len(ts.indices) == 6 for ts in cos.per_target)


def test_clustered_near_duplicate_pools_fast_equals_reference():
    """Issue 14: on 150 small pools of near-duplicate clusters gtp and gtp-reference differed in 5
    (32 in the issue's own fuzz), always in near-copies whose NNLS weight was a negligible share
    of the fit (1e-15..1e-7): rounding decided which copy kept it. Such rows are now dropped by
    both (weight_tol), and the selections are identical."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny products: worker threads only cost wake-ups here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gk.EarlyStopWarning)  # some pools run out of directions
            for seed in range(150):
                A, b, k = clustered_problem(seed)
                fast = gk.select(A, b, k, method="gtp").per_target[0]
                ref = gk.select(A, b, k, method="gtp-reference").per_target[0]
                assert fast.indices.tolist() == ref.indices.tolist(), seed
                assert fast.stopped_by == ref.stopped_by, seed
                share = ref.weights * np.linalg.norm(A[ref.indices], axis=1) / np.linalg.norm(b)
                assert (share > 1e-6).all(), seed
                np.testing.assert_allclose(fast.residual_norms[-1], ref.residual_norms[-1], rtol=1e-6,
                                           atol=1e-9 * ref.residual_norms[0])
    finally:
        torch.set_num_threads(threads)
