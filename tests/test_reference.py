"""The plain-PyTorch GTP reference against SPEC's properties (the baselines: tests/test_baselines.py)."""
import warnings

import numpy as np
import pytest
import torch

import gtp_kernels as gk
from problems import nnls_drop_problem, planted_problem


@pytest.mark.parametrize("n,dim,k", [(300, 120, 8), (1000, 64, 5), (97, 513, 20)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_support_recovered_exactly(n, dim, k, seed):
    A, B, supports, weights = planted_problem(n, dim, k, seed)
    sel = gk.select(A, B[:, 0], k, method="gtp-reference")
    assert sorted(sel.indices.tolist()) == sorted(supports[0].tolist())
    order = np.argsort(sel.indices)
    expect = weights[0][torch.argsort(supports[0])].numpy()
    np.testing.assert_allclose(sel.weights[order], expect, rtol=1e-8)
    assert sel.relative_residual < 1e-10


def test_duplicates_and_positive_multiples_never_selected_topk_selects_them():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(60, 40, generator=g, dtype=torch.float64)
    b = base[:10].T @ (0.5 + torch.rand(10, generator=g, dtype=torch.float64))
    # rows 60..62 duplicate / scale the target's strongest contributors
    scores = base @ b / base.norm(dim=1)
    top = torch.argsort(scores, descending=True)[:3]
    A = torch.cat([base, base[top[0]][None], 3.0 * base[top[0]][None], 0.5 * base[top[1]][None]])
    copies = {60: int(top[0]), 61: int(top[0]), 62: int(top[1])}
    sel = gk.select(A, b, 10, method="gtp-reference")
    chosen = set(sel.indices.tolist())
    assert int(top[0]) in chosen or 60 in chosen or 61 in chosen  # the direction itself is used
    for copy, original in copies.items():
        assert not ({copy, original} <= chosen), f"both {original} and its multiple {copy} selected"
    topk = set(gk.select(A, b, 10, method="topk").indices.tolist())
    assert {60, 61, int(top[0])} <= topk  # exact direction ties at the top: top-k takes them all


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_non_increasing_and_weights_non_negative(dtype):
    g = torch.Generator().manual_seed(5)
    A = torch.randn(400, 90, generator=g).to(dtype)
    b = torch.randn(90, generator=g).to(dtype) + A[:30].T.sum(dim=1) * 0.1
    sel = gk.select(A, b, 40, method="gtp-reference")
    hist = sel.residual_norms
    slack = 1e-12 if dtype == torch.float64 else 1e-5
    assert np.all(np.diff(hist) <= slack * hist[0])
    assert np.all(sel.weights > 0)
    assert len(set(sel.indices.tolist())) == len(sel.indices)


def test_nnls_drops_an_atom_when_its_weight_turns_negative():
    A, b = nnls_drop_problem()
    sel = gk.select(A, b, 3, method="gtp-reference")
    ts = sel.per_target[0]
    assert ts.dropped == 1
    assert sorted(sel.indices.tolist()) == [0, 1]
    np.testing.assert_allclose(sel.weights, [1.0, 1.0], rtol=1e-10)
    from scipy.optimize import nnls
    w_ref, _ = nnls(A[[0, 1, 2]].numpy().T, b.numpy())
    np.testing.assert_allclose(w_ref, [1.0, 1.0, 0.0], atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n,dim,k", [(200, 80, 12), (120, 300, 30)])
def test_matches_sklearn_orthogonal_mp_without_positivity(seed, n, dim, k):
    sklearn_omp = pytest.importorskip("sklearn.linear_model").orthogonal_mp
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, dim, generator=g, dtype=torch.float64)
    A /= A.norm(dim=1, keepdim=True)  # sklearn's OMP assumes normalised atoms (columns of X)
    b = torch.randn(dim, generator=g, dtype=torch.float64)
    sel = gk.select(A, b, k, method="gtp-reference", positive=False, ridge=0.0, tol=0.0)
    coef = sklearn_omp(A.numpy().T, b.numpy(), n_nonzero_coefs=k)
    support = np.flatnonzero(coef)
    assert sorted(sel.indices.tolist()) == support.tolist()
    np.testing.assert_allclose(sel.weights, coef[sel.indices], rtol=1e-6, atol=1e-12)


def test_zero_rows_and_excluded_rows_never_selected():
    A, B, supports, _ = planted_problem(150, 60, 6, seed=4)
    A = A.clone()
    A[supports[0][0]] = 0.0
    banned = int(supports[0][1])
    for method in gk.METHODS:
        sel = gk.select(A, B[:, 0], 6, method=method, exclude=[banned])
        assert int(supports[0][0]) not in sel.indices.tolist(), method
        assert banned not in sel.indices.tolist(), method


def test_multi_target_pursues_each_target_independently():
    A, B, supports, _ = planted_problem(300, 100, 7, seed=9, m=3)
    sel = gk.select(A, B, 7, method="gtp-reference")
    assert sel.num_targets == 3
    for ts, S in zip(sel.per_target, supports):
        assert sorted(ts.indices.tolist()) == sorted(S.tolist())
    union = set().union(*[set(S.tolist()) for S in supports])
    assert set(sel.indices.tolist()) == union
    assert sel.residual_norms.shape[1] == 3


def test_same_inputs_same_selection_and_random_is_seeded():
    A, B, _, _ = planted_problem(200, 50, 5, seed=1, dtype=torch.float32)
    noisy = B[:, 0] + 0.1 * torch.randn(50, generator=torch.Generator().manual_seed(0))
    a1 = gk.select(A, noisy, 20).indices
    a2 = gk.select(A.numpy(), noisy.numpy(), 20).indices
    assert a1.tolist() == a2.tolist()
    r1 = gk.select(A, noisy, 20, method="random", seed=3).indices
    r2 = gk.select(A, noisy, 20, method="random", seed=3).indices
    r3 = gk.select(A, noisy, 20, method="random", seed=4).indices
    assert r1.tolist() == r2.tolist() and r1.tolist() != r3.tolist()


def test_checkpoint_weights_define_the_matched_norm():
    # Weighting checkpoint blocks by lr_t equals scaling them by sqrt(lr_t) without weights.
    g = torch.Generator().manual_seed(2)
    T, d = 3, 20
    A = torch.randn(150, T * d, generator=g, dtype=torch.float64)
    b = torch.randn(T * d, generator=g, dtype=torch.float64)
    lrs = torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)
    scale = lrs.sqrt().repeat_interleave(d)
    weighted = gk.select(A, b, 15, checkpoint_weights=lrs, num_checkpoints=T)
    scaled = gk.select(A * scale, b * scale, 15)
    assert weighted.indices.tolist() == scaled.indices.tolist()
    np.testing.assert_allclose(weighted.weights, scaled.weights, rtol=1e-9)


def test_guards_align_threshold_and_stop_ratio():
    g = torch.Generator().manual_seed(8)
    A = torch.randn(300, 50, generator=g, dtype=torch.float64)
    b = torch.randn(50, generator=g, dtype=torch.float64)
    sel = gk.select(A, b, 60, align_threshold=0.0)
    cos = (A @ b) / (A.norm(dim=1) * b.norm())
    assert bool((cos[sel.indices] > 0).all())
    assert sel.params["guard_excluded"] == int((cos <= 0).sum())
    early = gk.select(A, b, 60, stop_ratio=0.5)
    assert early.per_target[0].stopped_by == "guard"
    assert len(early.indices) < 60


def _span_problem():
    """Issue 14's repro: 100 rows in R^64 (scaled by 10) and a target in the span of 5 of them."""
    A = np.random.RandomState(6).randn(100, 64) * 10
    rs = np.random.RandomState(1)
    support = rs.choice(100, 5, replace=False)
    return A, A[support].T @ (rs.rand(5) + 0.5), sorted(support.tolist())


@pytest.mark.parametrize("method", ["gtp", "gtp-reference", "gtp-cosamp"])
@pytest.mark.parametrize("positive", [False, True])
def test_tol_zero_stops_at_the_residual_floor_with_a_warning(method, positive):
    """tol=0 on a target exactly in the span of 5 rows: pursuit went on picking from rounding noise
    (65 rows of rank 64, weights up to 2.1 where the largest true one is 1.38). It stops once the
    residual is rounding noise, says so (stopped_by, EarlyStopWarning), and keeps the 5 rows."""
    A, b, support = _span_problem()
    with pytest.warns(gk.EarlyStopWarning, match="rounding floor"):
        sel = gk.select(A, b, 100, method=method, positive=positive, tol=0.0)
    assert sorted(sel.indices.tolist()) == support
    assert sel.per_target[0].stopped_by == "residual_floor"
    assert sel.relative_residual < 1e-14
    assert issubclass(gk.EarlyStopWarning, RuntimeWarning)


def test_multiple_of_one_row_gtp_and_reference_agree():
    """b = 2 * A[4], k = 3, tol = 0: gtp gave [4, 14, 13] (or [4, 45, 52]), the reference [4]
    (or [4, 45, 15]): picks after an exact fit were rounding noise. Both now stop at [4]."""
    A, _, _ = _span_problem()
    for method in ("gtp", "gtp-reference", "gtp-cosamp"):
        with pytest.warns(gk.EarlyStopWarning):
            sel = gk.select(A, 2 * A[4], 3, method=method, positive=False, tol=0.0)
        assert sel.indices.tolist() == [4], method
        np.testing.assert_allclose(sel.weights, [2.0], rtol=1e-14)


@pytest.mark.parametrize("method", ["gtp", "gtp-reference", "gtp-cosamp"])
def test_stop_on_linear_dependence_warns(method):
    """Every candidate left is within 1e-7 of the span of the selection (so it still correlates
    with the residual): pursuit refuses them as dependent and stops short of k; it warns (as
    scikit-learn's OMP does), besides stopped_by and the rejected count."""
    g = torch.Generator().manual_seed(11)
    basis = torch.randn(4, 16, generator=g, dtype=torch.float64)
    near = torch.randn(8, 4, generator=g, dtype=torch.float64) @ basis
    A = torch.cat([basis, near + 1e-7 * torch.randn(8, 16, generator=g, dtype=torch.float64)])
    b = torch.randn(16, generator=g, dtype=torch.float64)  # not in the span: tol is out of reach
    with pytest.warns(gk.EarlyStopWarning, match="linearly dependent"):
        sel = gk.select(A, b, 10, method=method, positive=False)
    ts = sel.per_target[0]
    assert len(ts.indices) == 4 and ts.rejected > 0 and ts.stopped_by in ("exhausted", "max_iters")


def test_no_warning_when_the_budget_or_tol_is_reached():
    A, b, _ = _span_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", gk.EarlyStopWarning)
        assert gk.select(A, b, 100).per_target[0].stopped_by == "tolerance"  # default tol = 1e-6
        assert gk.select(A, b, 3).per_target[0].stopped_by == "budget"
