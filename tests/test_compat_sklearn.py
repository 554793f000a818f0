"""gtp_kernels.compat.sklearn against scikit-learn: its own test suite, and side by side.

Part 1 is scikit-learn's sklearn/linear_model/tests/test_omp.py (scikit-learn 1.9.1), ported
to run against our drop-ins: the tests are theirs, unchanged except that orthogonal_mp,
orthogonal_mp_gram and OrthogonalMatchingPursuit are imported from gtp_kernels.compat.
test_omp_cv is left out (it tests OrthogonalMatchingPursuitCV, which we do not provide).

    Copyright (c) 2007-2024 The scikit-learn developers. All rights reserved.
    BSD 3-Clause License (https://github.com/scikit-learn/scikit-learn/blob/main/COPYING):
    Redistribution and use in source and binary forms, with or without modification, are
    permitted provided that the following conditions are met: redistributions of source code
    must retain the above copyright notice, this list of conditions and the following
    disclaimer; redistributions in binary form must reproduce the above copyright notice,
    this list of conditions and the following disclaimer in the documentation and/or other
    materials provided with the distribution; neither the name of the copyright holder nor the
    names of its contributors may be used to endorse or promote products derived from this
    software without specific prior written permission. THIS SOFTWARE IS PROVIDED BY THE
    COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR IMPLIED WARRANTIES,
    INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A
    PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS
    BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
    DAMAGES ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE.

Part 2 compares coefficients with scikit-learn's on random problems (float64, to 1e-10) and
checks what is ours (positive, input errors, torch inputs).
"""
import warnings

import numpy as np
import pytest
import torch

sklearn = pytest.importorskip("sklearn")

from sklearn.datasets import make_sparse_coded_signal  # noqa: E402
from sklearn.linear_model import LinearRegression  # noqa: E402
from sklearn.utils import check_random_state  # noqa: E402
from sklearn.utils._testing import (  # noqa: E402
    assert_allclose,
    assert_array_almost_equal,
    assert_array_equal,
    ignore_warnings,
)

import gtp_kernels as gk  # noqa: E402
from gtp_kernels.compat import (  # noqa: E402
    OrthogonalMatchingPursuit,
    orthogonal_mp,
    orthogonal_mp_gram,
)

# ---------------------------------------------------------------------------------------------
# Part 1: scikit-learn's test_omp.py (BSD-3-Clause, the scikit-learn developers)
# ---------------------------------------------------------------------------------------------

n_samples, n_features, n_nonzero_coefs, n_targets = 25, 35, 5, 3
y, X, gamma = make_sparse_coded_signal(
    n_samples=n_targets,
    n_components=n_features,
    n_features=n_samples,
    n_nonzero_coefs=n_nonzero_coefs,
    random_state=0,
)
y, X, gamma = y.T, X.T, gamma.T
# Make X not of norm 1 for testing
X *= 10
y *= 10
G, Xy = np.dot(X.T, X), np.dot(X.T, y)
# this makes X (n_samples, n_features)
# and y (n_samples, 3)


def test_correct_shapes():
    assert orthogonal_mp(X, y[:, 0], n_nonzero_coefs=5).shape == (n_features,)
    assert orthogonal_mp(X, y, n_nonzero_coefs=5).shape == (n_features, 3)


def test_correct_shapes_gram():
    assert orthogonal_mp_gram(G, Xy[:, 0], n_nonzero_coefs=5).shape == (n_features,)
    assert orthogonal_mp_gram(G, Xy, n_nonzero_coefs=5).shape == (n_features, 3)


def test_n_nonzero_coefs():
    assert np.count_nonzero(orthogonal_mp(X, y[:, 0], n_nonzero_coefs=5)) <= 5
    assert (
        np.count_nonzero(orthogonal_mp(X, y[:, 0], n_nonzero_coefs=5, precompute=True))
        <= 5
    )


def test_tol():
    tol = 0.5
    gamma = orthogonal_mp(X, y[:, 0], tol=tol)
    gamma_gram = orthogonal_mp(X, y[:, 0], tol=tol, precompute=True)
    assert np.sum((y[:, 0] - np.dot(X, gamma)) ** 2) <= tol
    assert np.sum((y[:, 0] - np.dot(X, gamma_gram)) ** 2) <= tol


def test_with_without_gram():
    assert_array_almost_equal(
        orthogonal_mp(X, y, n_nonzero_coefs=5),
        orthogonal_mp(X, y, n_nonzero_coefs=5, precompute=True),
    )


def test_with_without_gram_tol():
    assert_array_almost_equal(
        orthogonal_mp(X, y, tol=1.0), orthogonal_mp(X, y, tol=1.0, precompute=True)
    )


def test_unreachable_accuracy():
    assert_array_almost_equal(
        orthogonal_mp(X, y, tol=0), orthogonal_mp(X, y, n_nonzero_coefs=n_features)
    )
    warning_message = (
        "Orthogonal matching pursuit ended prematurely "
        "due to linear dependence in the dictionary. "
        "The requested precision might not have been met."
    )
    with pytest.warns(RuntimeWarning, match=warning_message):
        assert_array_almost_equal(
            orthogonal_mp(X, y, tol=0, precompute=True),
            orthogonal_mp(X, y, precompute=True, n_nonzero_coefs=n_features),
        )


@pytest.mark.parametrize("positional_params", [(X, y), (G, Xy)])
@pytest.mark.parametrize(
    "keyword_params",
    [{"n_nonzero_coefs": n_features + 1}],
)
def test_bad_input(positional_params, keyword_params):
    with pytest.raises(ValueError):
        orthogonal_mp(*positional_params, **keyword_params)


def test_perfect_signal_recovery():
    (idx,) = gamma[:, 0].nonzero()
    gamma_rec = orthogonal_mp(X, y[:, 0], n_nonzero_coefs=5)
    gamma_gram = orthogonal_mp_gram(G, Xy[:, 0], n_nonzero_coefs=5)
    assert_array_equal(idx, np.flatnonzero(gamma_rec))
    assert_array_equal(idx, np.flatnonzero(gamma_gram))
    assert_array_almost_equal(gamma[:, 0], gamma_rec, decimal=2)
    assert_array_almost_equal(gamma[:, 0], gamma_gram, decimal=2)


def test_orthogonal_mp_gram_readonly():
    # Non-regression test for:
    # https://github.com/scikit-learn/scikit-learn/issues/5956
    (idx,) = gamma[:, 0].nonzero()
    G_readonly = G.copy()
    G_readonly.setflags(write=False)
    Xy_readonly = Xy.copy()
    Xy_readonly.setflags(write=False)
    gamma_gram = orthogonal_mp_gram(
        G_readonly, Xy_readonly[:, 0], n_nonzero_coefs=5, copy_Gram=False, copy_Xy=False
    )
    assert_array_equal(idx, np.flatnonzero(gamma_gram))
    assert_array_almost_equal(gamma[:, 0], gamma_gram, decimal=2)


def test_estimator():
    omp = OrthogonalMatchingPursuit(n_nonzero_coefs=n_nonzero_coefs)
    omp.fit(X, y[:, 0])
    assert omp.coef_.shape == (n_features,)
    assert omp.intercept_.shape == ()
    assert np.count_nonzero(omp.coef_) <= n_nonzero_coefs

    omp.fit(X, y)
    assert omp.coef_.shape == (n_targets, n_features)
    assert omp.intercept_.shape == (n_targets,)
    assert np.count_nonzero(omp.coef_) <= n_targets * n_nonzero_coefs

    coef_normalized = omp.coef_[0].copy()
    omp.set_params(fit_intercept=True)
    omp.fit(X, y[:, 0])
    assert_array_almost_equal(coef_normalized, omp.coef_)

    omp.set_params(fit_intercept=False)
    omp.fit(X, y[:, 0])
    assert np.count_nonzero(omp.coef_) <= n_nonzero_coefs
    assert omp.coef_.shape == (n_features,)
    assert omp.intercept_ == 0

    omp.fit(X, y)
    assert omp.coef_.shape == (n_targets, n_features)
    assert omp.intercept_ == 0
    assert np.count_nonzero(omp.coef_) <= n_targets * n_nonzero_coefs


def test_estimator_n_nonzero_coefs():
    """Check `n_nonzero_coefs_` correct when `tol` is and isn't set."""
    omp = OrthogonalMatchingPursuit(n_nonzero_coefs=n_nonzero_coefs)
    omp.fit(X, y[:, 0])
    assert omp.n_nonzero_coefs_ == n_nonzero_coefs

    omp = OrthogonalMatchingPursuit(n_nonzero_coefs=n_nonzero_coefs, tol=0.5)
    omp.fit(X, y[:, 0])
    assert omp.n_nonzero_coefs_ is None


def test_identical_regressors():
    newX = X.copy()
    newX[:, 1] = newX[:, 0]
    gamma = np.zeros(n_features)
    gamma[0] = gamma[1] = 1.0
    newy = np.dot(newX, gamma)
    warning_message = (
        "Orthogonal matching pursuit ended prematurely "
        "due to linear dependence in the dictionary. "
        "The requested precision might not have been met."
    )
    with pytest.warns(RuntimeWarning, match=warning_message):
        orthogonal_mp(newX, newy, n_nonzero_coefs=2)


def test_swapped_regressors():
    gamma = np.zeros(n_features)
    # X[:, 21] should be selected first, then X[:, 0] selected second,
    # which will take X[:, 21]'s place in case the algorithm does
    # column swapping for optimization (which is the case at the moment)
    gamma[21] = 1.0
    gamma[0] = 0.5
    new_y = np.dot(X, gamma)
    new_Xy = np.dot(X.T, new_y)
    gamma_hat = orthogonal_mp(X, new_y, n_nonzero_coefs=2)
    gamma_hat_gram = orthogonal_mp_gram(G, new_Xy, n_nonzero_coefs=2)
    assert_array_equal(np.flatnonzero(gamma_hat), [0, 21])
    assert_array_equal(np.flatnonzero(gamma_hat_gram), [0, 21])


def test_no_atoms():
    y_empty = np.zeros_like(y)
    Xy_empty = np.dot(X.T, y_empty)
    gamma_empty = ignore_warnings(orthogonal_mp)(X, y_empty, n_nonzero_coefs=1)
    gamma_empty_gram = ignore_warnings(orthogonal_mp)(G, Xy_empty, n_nonzero_coefs=1)
    assert np.all(gamma_empty == 0)
    assert np.all(gamma_empty_gram == 0)


def test_omp_path():
    path = orthogonal_mp(X, y, n_nonzero_coefs=5, return_path=True)
    last = orthogonal_mp(X, y, n_nonzero_coefs=5, return_path=False)
    assert path.shape == (n_features, n_targets, 5)
    assert_array_almost_equal(path[:, :, -1], last)
    path = orthogonal_mp_gram(G, Xy, n_nonzero_coefs=5, return_path=True)
    last = orthogonal_mp_gram(G, Xy, n_nonzero_coefs=5, return_path=False)
    assert path.shape == (n_features, n_targets, 5)
    assert_array_almost_equal(path[:, :, -1], last)


def test_omp_return_path_prop_with_gram():
    path = orthogonal_mp(X, y, n_nonzero_coefs=5, return_path=True, precompute=True)
    last = orthogonal_mp(X, y, n_nonzero_coefs=5, return_path=False, precompute=True)
    assert path.shape == (n_features, n_targets, 5)
    assert_array_almost_equal(path[:, :, -1], last)


def test_omp_reaches_least_squares():
    # Use small simple data; it's a sanity check but OMP can stop early
    rng = check_random_state(0)
    n_samples, n_features = (10, 8)
    n_targets = 3
    X = rng.randn(n_samples, n_features)
    Y = rng.randn(n_samples, n_targets)
    omp = OrthogonalMatchingPursuit(n_nonzero_coefs=n_features)
    lstsq = LinearRegression()
    omp.fit(X, Y)
    lstsq.fit(X, Y)
    assert_array_almost_equal(omp.coef_, lstsq.coef_)


@pytest.mark.parametrize("data_type", (np.float32, np.float64))
def test_omp_gram_dtype_match(data_type):
    # verify matching input data type and output data type
    coef = orthogonal_mp_gram(
        G.astype(data_type), Xy.astype(data_type), n_nonzero_coefs=5
    )
    assert coef.dtype == data_type


def test_omp_gram_numerical_consistency():
    # verify numericaly consistency among np.float32 and np.float64
    coef_32 = orthogonal_mp_gram(
        G.astype(np.float32), Xy.astype(np.float32), n_nonzero_coefs=5
    )
    coef_64 = orthogonal_mp_gram(
        G.astype(np.float32), Xy.astype(np.float64), n_nonzero_coefs=5
    )
    assert_allclose(coef_32, coef_64)


# ---------------------------------------------------------------------------------------------
# Part 2: side by side with scikit-learn, and what is ours
# ---------------------------------------------------------------------------------------------

from sklearn.linear_model import OrthogonalMatchingPursuit as SkOMP  # noqa: E402
from sklearn.linear_model import orthogonal_mp as sk_orthogonal_mp  # noqa: E402
from sklearn.linear_model import orthogonal_mp_gram as sk_orthogonal_mp_gram  # noqa: E402

PREMATURE = "Orthogonal matching pursuit ended prematurely"


def _random_problem(seed):
    """Dense Gaussian dictionaries of awkward shapes (more atoms than samples and fewer), a
    scale that is not 1, one to three targets; a budget up to half the rank."""
    rng = np.random.RandomState(seed)
    n, p, m = rng.randint(20, 90), rng.randint(10, 120), rng.randint(1, 4)
    X = rng.randn(n, p) * rng.choice([1e-3, 1.0, 7.0])
    Y = rng.randn(n, m) * rng.choice([0.01, 1.0, 30.0])
    k = rng.randint(1, min(n, p) // 2 + 2)
    return X, Y, k


def _rel(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("seed", range(6))
def test_orthogonal_mp_equals_sklearn_on_random_problems(seed):
    X, Y, k = _random_problem(seed)
    ours, n_ours = orthogonal_mp(X, Y, n_nonzero_coefs=k, return_n_iter=True)
    ref, n_ref = sk_orthogonal_mp(X, Y, n_nonzero_coefs=k, return_n_iter=True)
    assert ours.shape == ref.shape and ours.dtype == np.float64
    assert n_ours == n_ref
    assert_array_equal(ours != 0, ref != 0)  # the same supports
    assert _rel(ours, ref) < 1e-10
    # tolerance mode: an absolute squared residual norm, reached at the same step
    tol = 0.2 * float(np.min(np.sum(Y ** 2, axis=0)))
    ours, n_ours = orthogonal_mp(X, Y, tol=tol, return_n_iter=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # unreachable tolerances warn in both
        ref, n_ref = sk_orthogonal_mp(X, Y, tol=tol, return_n_iter=True)
    assert n_ours == n_ref
    assert _rel(ours, ref) < 1e-10
    # the path: every step's least-squares coefficients
    path = orthogonal_mp(X, Y, n_nonzero_coefs=k, return_path=True)
    ref_path = sk_orthogonal_mp(X, Y, n_nonzero_coefs=k, return_path=True)
    assert path.shape == ref_path.shape
    assert _rel(path, ref_path) < 1e-10


@pytest.mark.parametrize("seed", range(3))
def test_orthogonal_mp_gram_equals_sklearn_on_random_problems(seed):
    X, Y, k = _random_problem(10 + seed)
    G, XY, norms = X.T @ X, X.T @ Y, np.sum(Y ** 2, axis=0)
    ours = orthogonal_mp_gram(G, XY, n_nonzero_coefs=k)
    ref = sk_orthogonal_mp_gram(G, XY, n_nonzero_coefs=k)
    assert_array_equal(ours != 0, ref != 0)
    assert _rel(ours, ref) < 1e-10
    tol = 0.2 * float(norms.min())
    ours, n_ours = orthogonal_mp_gram(G, XY, tol=tol, norms_squared=norms, return_n_iter=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref, n_ref = sk_orthogonal_mp_gram(G, XY, tol=tol, norms_squared=norms, return_n_iter=True)
    assert n_ours == n_ref
    assert _rel(ours, ref) < 1e-10


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_estimator_equals_sklearn(fit_intercept):
    rng = np.random.RandomState(3)
    Xr, Yr = rng.randn(60, 40) + 2.0, rng.randn(60, 2) - 5.0  # offsets: the intercept matters
    for y_fit in (Yr[:, 0], Yr):
        ours = OrthogonalMatchingPursuit(n_nonzero_coefs=7, fit_intercept=fit_intercept).fit(Xr, y_fit)
        ref = SkOMP(n_nonzero_coefs=7, fit_intercept=fit_intercept).fit(Xr, y_fit)
        assert ours.coef_.shape == ref.coef_.shape
        assert np.shape(ours.intercept_) == np.shape(ref.intercept_)
        assert _rel(ours.coef_, ref.coef_) < 1e-10
        assert np.allclose(ours.intercept_, ref.intercept_, rtol=1e-10, atol=1e-12)
        assert ours.n_iter_ == ref.n_iter_
        assert np.allclose(ours.predict(Xr[:5]), ref.predict(Xr[:5]), rtol=1e-10)
        assert ours.score(Xr, y_fit) == pytest.approx(ref.score(Xr, y_fit), rel=1e-10)


def test_estimator_positive_is_gtp_pursuit():
    """positive=True: the package's non-negative pursuit on the centred data."""
    rng = np.random.RandomState(4)
    Xr = rng.randn(80, 50)
    w_true = np.zeros(50)
    w_true[[3, 17, 29, 41]] = [1.5, 0.7, 2.0, 0.4]
    yr = Xr @ w_true + 3.0 + 0.01 * rng.randn(80)
    est = OrthogonalMatchingPursuit(n_nonzero_coefs=6, positive=True).fit(Xr, yr)
    assert np.all(est.coef_ >= 0)
    Xc, yc = Xr - Xr.mean(axis=0), yr - yr.mean()
    sel = gk.select(Xc.T.copy(), yc, 6, positive=True, tol=0.0)
    expected = np.zeros(50)
    expected[sel.indices] = sel.weights
    assert_array_equal(est.coef_, expected)
    assert set(np.flatnonzero(w_true)) <= set(np.flatnonzero(est.coef_))
    assert est.intercept_ == pytest.approx(yr.mean() - Xr.mean(axis=0) @ est.coef_)
    # plain OMP on the same data puts weight on negative directions too
    rng2 = np.random.RandomState(5)
    y_mixed = Xr @ np.where(rng2.rand(50) < 0.2, rng2.randn(50), 0.0)
    assert np.any(OrthogonalMatchingPursuit(n_nonzero_coefs=8).fit(Xr, y_mixed).coef_ < 0)
    assert np.all(OrthogonalMatchingPursuit(n_nonzero_coefs=8, positive=True).fit(Xr, y_mixed).coef_ >= 0)


def test_estimator_params_protocol():
    est = OrthogonalMatchingPursuit(n_nonzero_coefs=3, positive=True)
    assert est.get_params() == {"n_nonzero_coefs": 3, "tol": None, "fit_intercept": True,
                                "precompute": "auto", "positive": True}
    clone = sklearn.base.clone(est)
    assert clone.get_params() == est.get_params() and clone is not est
    with pytest.raises(ValueError, match="invalid parameter 'alpha'"):
        est.set_params(alpha=1.0)
    with pytest.raises(ValueError, match="not fitted"):
        OrthogonalMatchingPursuit().predict(X)


def test_torch_and_list_inputs_give_the_numpy_result():
    ref = orthogonal_mp(X, y, n_nonzero_coefs=5)
    assert_array_equal(orthogonal_mp(torch.from_numpy(X), torch.from_numpy(y), n_nonzero_coefs=5), ref)
    assert_array_equal(orthogonal_mp(X.tolist(), y[:, 0].tolist(), n_nonzero_coefs=5), ref[:, 0])
    # float32 dictionaries: float32 products, the same atoms, float64 coefficients out
    coef32 = orthogonal_mp(X.astype(np.float32), y.astype(np.float32), n_nonzero_coefs=5)
    assert coef32.dtype == np.float64
    assert_array_equal(coef32 != 0, ref != 0)
    assert np.abs(coef32 - ref).max() < 1e-4 * np.abs(ref).max()


def test_inputs_are_not_modified():
    Xc, yc, Gc, Xyc = X.copy(), y.copy(), G.copy(), Xy.copy()
    orthogonal_mp(Xc, yc, n_nonzero_coefs=5, copy_X=False)
    orthogonal_mp_gram(Gc, Xyc, n_nonzero_coefs=5, copy_Gram=False, copy_Xy=False)
    assert_array_equal(Xc, X) and assert_array_equal(yc, y)
    assert_array_equal(Gc, G) and assert_array_equal(Xyc, Xy)


def test_zero_target_column_warns_and_gets_zero_coefficients():
    Y = y.copy()
    Y[:, 1] = 0.0
    with pytest.warns(RuntimeWarning, match=PREMATURE):
        coef, n_iter = orthogonal_mp(X, Y, n_nonzero_coefs=5, return_n_iter=True)
    assert n_iter == [5, 0, 5]
    assert np.all(coef[:, 1] == 0)
    assert_array_equal(coef[:, [0, 2]], orthogonal_mp(X, y[:, [0, 2]], n_nonzero_coefs=5))


def test_budget_reached_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        orthogonal_mp(X, y, n_nonzero_coefs=5)
        orthogonal_mp(X, y, tol=1.0)
        orthogonal_mp_gram(G, Xy, n_nonzero_coefs=5)


@pytest.mark.parametrize("call, match", [
    (lambda: orthogonal_mp(X, y, n_nonzero_coefs=0), "n_nonzero_coefs must be >= 1"),
    (lambda: orthogonal_mp(X, y, n_nonzero_coefs=2.5), "n_nonzero_coefs must be an integer"),
    (lambda: orthogonal_mp(X, y, n_nonzero_coefs=True), "n_nonzero_coefs must be an integer"),
    (lambda: orthogonal_mp(X, y, tol=-1.0), "tol must be a finite number >= 0"),
    (lambda: orthogonal_mp(X, y, tol="0.5"), "tol must be a number"),
    (lambda: orthogonal_mp(X, y[:-1]), "y has 24 rows but X has 25"),
    (lambda: orthogonal_mp(X[0], y), "X must be 2-D"),
    (lambda: orthogonal_mp(np.where(X > 1, np.nan, X), y), "X contains NaN or Inf"),
    (lambda: orthogonal_mp(X, y, precompute="yes"), "precompute must be True, False or 'auto'"),
    (lambda: orthogonal_mp(X, y, return_path="no"), "return_path must be True or False"),
    (lambda: orthogonal_mp(X.astype(complex), y), "X must hold real numbers"),
    (lambda: orthogonal_mp_gram(G, Xy, tol=0.5), "needs the precomputed norms"),
    (lambda: orthogonal_mp_gram(G[:, :-1], Xy), "square"),
    (lambda: orthogonal_mp_gram(G[:5, :5], Xy[:5]), "The number of atoms must be positive"),
    (lambda: orthogonal_mp_gram(G, Xy, tol=0.5, norms_squared=[1.0]), "norms_squared must hold 3"),
])
def test_bad_input_raises_input_error(call, match):
    with pytest.raises(gk.InputError, match=match):
        call()
