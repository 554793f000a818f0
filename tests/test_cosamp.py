"""Compressive-sampling GTP (selection/cosamp.py): planted supports recovered in a few passes,
residuals close to exact pursuit's with about 10x fewer passes, the adaptive sample size; in
joint mode exact joint pursuit's picks, weights and stop (against gtp and the float64
reference of tests/test_joint.py) from a few passes."""
import numpy as np
import pytest
import torch

import gtp_kernels as gk
from gtp_kernels.selection.common import SelectOptions
from gtp_kernels.selection.cosamp import MIN_SAMPLE, PICKS_PER_PASS, gtp_cosamp, initial_sample_size
from gtp_kernels.validation import validate_problem
from problems import planted_problem
from test_pursuit import noisy_problem


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,dim,k", [(500, 200, 10), (2000, 128, 12)])
def test_cosamp_recovers_planted_supports_in_few_passes(seed, n, dim, k):
    A, B, supports, _ = planted_problem(n, dim, k, seed, m=2)
    cos = gk.select(A, B, k, method="gtp-cosamp")
    exact = gk.select(A, B, k, method="gtp-reference")
    for ts, ex, S in zip(cos.per_target, exact.per_target, supports):
        assert sorted(ts.indices.tolist()) == sorted(S.tolist())
        assert ts.residual_norms.min() <= ex.residual_norms[-1] + 1e-9 * ex.residual_norms[0]
        assert ts.passes <= k // 2  # exact pursuit makes k passes


def test_cosamp_close_to_exact_on_noisy_problem_with_10x_fewer_passes():
    A, B = noisy_problem(4000, 256, seed=6, dtype=torch.float32)
    k = 80
    exact = gk.select(A, B, k, method="gtp")
    cos = gk.select(A, B, k, method="gtp-cosamp")
    r_exact = gk.fit_residual(A, B, exact.indices)
    r_cos = gk.fit_residual(A, B, cos.indices)
    assert r_cos <= 1.05 * r_exact
    assert cos.per_target[0].passes * 10 <= exact.per_target[0].iterations


def unit_pool(n, dim, seed):
    """Unit-norm Gaussian rows, target = 50 rows + 0.05 noise (benchmarks/pursuit_table.pool)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, dim, generator=g)
    A /= A.norm(dim=1, keepdim=True)
    b = A[torch.randperm(n, generator=g)[:50]].T @ torch.rand(50, generator=g) + 0.05 * torch.randn(dim, generator=g)
    return A, b


@pytest.mark.parametrize("seed", [0, 1])
def test_cosamp_near_complete_close_to_exact_with_10x_fewer_passes(seed):
    """k/D = 0.78: the final residual hangs on every pick (the tau + residual-drop rule landed
    17% and 31% above exact pursuit on these two)."""
    A, b = unit_pool(3000, 512, seed)
    k = 400
    exact = gk.select(A, b, k, method="gtp")
    cos = gk.select(A, b, k, method="gtp-cosamp")
    assert gk.fit_residual(A, b, cos.indices) <= 1.05 * gk.fit_residual(A, b, exact.indices)
    assert cos.per_target[0].passes * 10 <= k


def test_cosamp_sample_size_rule():
    """Double after a short pass while picks per pass lag; halve after a long pass unless the
    picks still to come fit in what that pass made (then one more pass of the same sample
    likely ends the run, where half a sample may need two)."""
    from gtp_kernels.selection.cosamp import PICKS_PER_PASS, next_sample_size

    n, size = 10_000, 834
    assert next_sample_size(size, True, 5, 5, 1, n, 45) == 2 * size
    assert next_sample_size(4000, True, 5, 5, 1, n, 45) == n // 2  # at most N / 2
    assert next_sample_size(size, True, 5, 5 + PICKS_PER_PASS, 1, n, 45) == size  # picks keep up
    many = 2 * PICKS_PER_PASS + 9
    assert next_sample_size(size, False, many, many, 1, n, many + 1) == size // 2
    assert next_sample_size(size, False, many, many, 1, n, many) == size
    assert next_sample_size(size, True, many, many, 1, n, 3) == size
    assert next_sample_size(100, False, many, many, 1, n, 500) == 64  # MIN_SAMPLE floor
    assert next_sample_size(size, False, 2 * PICKS_PER_PASS, 40, 2, n, 500) == size


def test_initial_sample_size_is_n_over_picks_per_pass_with_a_floor():
    assert initial_sample_size(12_000) == 12_000 // PICKS_PER_PASS
    assert initial_sample_size(12_001) == 12_000 // PICKS_PER_PASS + 1  # rounded up
    assert initial_sample_size(600) == MIN_SAMPLE  # the floor for small pools (600 / 12 = 50)
    assert initial_sample_size(10) == 10  # never more than the pool


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_rows_with_a_shrinking_sample(dtype):
    """fp16/bf16 rows are gathered a slice at a time into a buffer kept from the largest sample
    so far; a later, smaller sample whose last slice is partial raised a shape mismatch
    (N = 3000, D = 96, k = 60: the sample halves after a long first pass)."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(3000, 96, generator=g).to(dtype)
    B = torch.randn(96, 3, generator=g)
    sel = gk.select(A, B, 60, method="gtp-cosamp")
    ref = gk.select(A.float(), B, 60, method="gtp-cosamp")  # the same rows, upcast beforehand
    for got, want in zip(sel.per_target, ref.per_target):
        assert len(got.indices) == 60
        assert got.indices.tolist() == want.indices.tolist()
        assert abs(got.residual_norms[-1] - want.residual_norms[-1]) <= 1e-5 * want.residual_norms[0]


def test_gtp_cosamp_max_iters_caps_the_steps_and_keeps_the_first_picks():
    A, B = noisy_problem(2000, 128, seed=4, dtype=torch.float64, m=2)
    k = 30
    problem = validate_problem(A, B, k)
    fixed = gtp_cosamp(problem, k, SelectOptions(batch_size=50))  # a fixed sample of 50 rows a pass
    capped = gtp_cosamp(problem, k, SelectOptions(batch_size=50, max_iters=2))
    for f, c in zip(fixed, capped):
        assert len(f.indices) == k
        # max_iters caps the argmax steps (and the passes): the first two picks, then a stop
        assert c.stopped_by == "max_iters" and c.iterations == 2 and c.passes <= 2
        assert c.indices.tolist() == f.indices[:2].tolist()


# -- joint mode (targets="joint"): exact joint pursuit's picks from a few passes -------------

def _joint_pair(A, B, k, **kw):
    exact = gk.select(A, B, k, targets="joint", method="gtp", **kw)
    cos = gk.select(A, B, k, targets="joint", method="gtp-cosamp", **kw)
    return exact, cos


def _assert_joint_equal(exact, cos):
    """The same picks, stop and per-column weights and residuals as exact joint pursuit (the
    sample only guesses; every pick is checked against the whole pool's scores)."""
    assert cos.indices.tolist() == exact.indices.tolist()
    for c, e in zip(cos.per_target, exact.per_target):
        assert c.stopped_by == e.stopped_by and c.iterations == e.iterations
        assert (c.rejected, c.dropped) == (e.rejected, e.dropped)
        np.testing.assert_allclose(c.weights, e.weights, rtol=1e-12, atol=1e-14 * e.residual_norms[0])
        np.testing.assert_allclose(c.residual_norms, e.residual_norms, rtol=1e-12)


def correlated_pool(n, dim, m, seed, shift=0.5):
    """Rows and targets with a common offset (strongly correlated rows: the NNLS active sets
    move), target columns of very different norms."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, dim)) + shift
    B = (rng.standard_normal((dim, m)) + 0.3) * rng.uniform(0.1, 30.0, m)
    return A, B


@pytest.mark.parametrize("n, dim, m, k, seed", [(37, 13, 3, 5, 0), (700, 31, 4, 25, 1), (3001, 97, 7, 60, 2),
                                                  (2003, 64, 1, 40, 3)])
def test_joint_equals_the_float64_reference_on_awkward_shapes(n, dim, m, k, seed):
    from test_joint import reference_joint, unit_weights

    A, B = correlated_pool(n, dim, m, seed)
    exact, cos = _joint_pair(A, B, k)
    _assert_joint_equal(exact, cos)
    support, W, hist = reference_joint(A, B, k)
    assert cos.indices.tolist() == support
    np.testing.assert_allclose(unit_weights(cos), W, rtol=1e-7, atol=1e-9)  # NNLS from scratch, scipy
    if n > 2 * MIN_SAMPLE:
        assert cos.per_target[0].passes < exact.per_target[0].passes / 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_joint_equals_exact_joint_pursuit_in_every_row_dtype(dtype):
    A, B = correlated_pool(2500, 80, 5, seed=4)
    A_low = torch.as_tensor(A).to(dtype)
    exact, cos = _joint_pair(A_low, torch.as_tensor(B, dtype=torch.float32), 45)
    _assert_joint_equal(exact, cos)
    assert cos.params["compute_dtype"] == "torch.float32" and len(cos.indices) == 45


@pytest.mark.parametrize("options", [{}, {"stop_ratio": 0.3}, {"positive": False}, {"max_iters": 17},
                                     {"batch_size": 100}])
def test_joint_with_duplicates_and_positive_multiples(options):
    """Copies (exact ties: the lowest index, as exact pursuit) and 3x multiples (equal scores up
    to rounding) of 200 rows; the guard, plain OMP, the iteration cap and a fixed sample."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((800, 50))
    A = np.concatenate([base, base[:200] * 3.0, base[:200]])
    B = base[:30].T @ rng.uniform(0.5, 1.5, (30, 4)) + 0.1 * rng.standard_normal((50, 4))
    exact, cos = _joint_pair(A, B, 45, **options)
    _assert_joint_equal(exact, cos)


def test_joint_on_memory_mapped_rows_in_blocks_with_exclusions_and_checkpoint_weights(tmp_path):
    rng = np.random.default_rng(6)
    A = (rng.standard_normal((3000, 60)) + 0.3).astype(np.float32)
    B = rng.standard_normal((60, 6))
    np.save(tmp_path / "a.npy", A)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    exclude = np.zeros(3000, dtype=bool)
    exclude[rng.choice(3000, 500, replace=False)] = True
    kw = dict(exclude=exclude, checkpoint_weights=[0.5, 2.0, 1.0], num_checkpoints=3)
    exact = gk.select(A, B, 40, targets="joint", **kw)
    for rows in (mapped, [mapped[:1000], mapped[1000:2500], mapped[2500:]]):
        _assert_joint_equal(exact, gk.select(rows, B, 40, targets="joint", method="gtp-cosamp", **kw))
    assert not set(exact.indices.tolist()) & set(np.flatnonzero(exclude).tolist())


def test_joint_passes_few_on_a_large_pool():
    """Unit-norm rows, 24 columns made of 300 rows: exact pursuit reads A once per pick (and once
    for the row norms); compressive sampling 7 times for 80 picks (speculated picks verified 12,
    then 24, ...)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8000, 256, generator=g)
    A /= A.norm(dim=1, keepdim=True)
    B = A[torch.randperm(8000, generator=g)[:300]].T @ torch.rand(300, 24, generator=g)
    B += 0.05 * torch.randn(256, 24, generator=g)
    exact, cos = _joint_pair(A, B, 80)
    _assert_joint_equal(exact, cos)
    assert exact.per_target[0].passes == 81
    assert cos.per_target[0].passes <= 10


@pytest.mark.parametrize("path", ["window", "chunks", "window passes"])
def test_joint_verification_paths_agree(monkeypatch, path):
    """The verifying pass's other paths: products scored chunk by chunk (too large to keep), and
    steps whose rounding window holds too many rows, scored by a pass of their own."""
    from gtp_kernels.selection import cosamp

    if path == "chunks":
        monkeypatch.setattr(cosamp, "VERIFY_BYTES", 0)
    if path == "window passes":
        monkeypatch.setattr(cosamp, "WINDOW_ROWS", 0)
    A, B = correlated_pool(2500, 70, 6, seed=8)
    A32 = torch.as_tensor(A, dtype=torch.float32)
    exact, cos = _joint_pair(A32, torch.as_tensor(B), 50)
    _assert_joint_equal(exact, cos)
    if path == "window passes":  # every step checked by a pass: about exact pursuit's count
        assert cos.per_target[0].passes >= len(cos.indices)
    else:
        assert cos.per_target[0].passes < 12


def test_joint_window_is_small(monkeypatch):
    """The rounding window of the verifying pass (float32 products) holds a few rows:
    the approximate scores from P = A W [R_0 | A_T^T] single out exact pursuit's pick."""
    from gtp_kernels.selection import cosamp

    g = torch.Generator().manual_seed(2)
    A = torch.randn(6000, 128, generator=g)
    B = A[:200].T @ torch.rand(200, 8, generator=g)
    problem = validate_problem(A, B, 40)
    rows = []
    original = cosamp._Verifier.best

    def best(self, s):
        out = original(self, s)
        rows.append(self.window_rows[-1])
        return out
    monkeypatch.setattr(cosamp._Verifier, "best", best)
    cosamp.gtp_cosamp_joint(problem, 40, SelectOptions())
    assert len(rows) >= 40 and max(rows) <= 8


def test_joint_progress_ticks_as_exact_joint_pursuit():
    """One tick per pick S keeps when it is made (speculated picks when verified), as gtp_joint:
    here 31, one row dropped later."""
    from gtp_kernels.selection.cosamp import gtp_cosamp_joint
    from gtp_kernels.selection.joint import gtp_joint

    A, B = correlated_pool(1500, 40, 3, seed=7)
    problem = validate_problem(torch.as_tensor(A), torch.as_tensor(B), 30)
    ticks, exact_ticks = [], []
    result = gtp_cosamp_joint(problem, 30, SelectOptions(), ticks.append)
    gtp_joint(problem, 30, SelectOptions(), exact_ticks.append)
    assert sum(ticks) == sum(exact_ticks) == len(result[0].indices) + result[0].dropped
    assert len(ticks) < len(exact_ticks)  # verified picks tick together


def test_speculation_rule():
    from gtp_kernels.selection.cosamp import MAX_SPECULATE, MIN_SPECULATE, next_speculation

    assert next_speculation(12, 12, 12) == 24  # all kept: twice as many
    assert next_speculation(48, 48, 48) == MAX_SPECULATE
    assert next_speculation(48, 12, 48) == 24  # a wrong pick after 12: twice the picks kept
    assert next_speculation(24, 0, 24) == MIN_SPECULATE
    assert next_speculation(24, 7, 7) == 24  # ended by a stop or an exhausted sample


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_joint_on_the_kernel_path(dtype):
    """K2 (the Triton interpreter on CPU, as on CUDA): the verifying pass's products with
    m + |T| columns, and the wider rounding bound of its tf32x3 products."""
    A, B = correlated_pool(300, 24, 3, seed=9)
    A_low = torch.as_tensor(A, dtype=torch.float32).to(dtype)
    exact, cos = _joint_pair(A_low, torch.as_tensor(B, dtype=torch.float32), 12, backend="triton", batch_size=64)
    _assert_joint_equal(exact, cos)
    assert cos.per_target[0].passes < exact.per_target[0].passes / 2
