"""gtp_kernels.compat.cords side by side with CORDS's own GRAD-MATCH solvers.

CORDS (pip install --no-deps cords==0.0.4; .ci/run installs it, test-only) is read from its
module file cords/selectionstrategies/helpers/omp_solvers.py, loaded by path: importing the
package's strategies would pull torchvision, ray and the rest of its dependencies, while this
module needs only numpy, scipy and torch (gtp_kernels.compat.cords.load_cords_solvers);
the loader restores numpy's error state so that nothing else in the session is affected, and
each CORDS call runs under its own setting. Without cords the side-by-side tests skip; the
convention tests run regardless.
"""
import contextlib
import inspect

import numpy as np
import pytest
import torch

import gtp_kernels as gk
from gtp_kernels.compat import OrthogonalMP_REG, OrthogonalMP_REG_Parallel, OrthogonalMP_REG_Parallel_V1
from gtp_kernels.compat.cords import load_cords_solvers


CORDS = load_cords_solvers()
needs_cords = pytest.mark.skipif(CORDS is None, reason="cords is not installed (pip install --no-deps cords==0.0.4)")


@contextlib.contextmanager
def _cords_numpy_errors():
    """CORDS runs with the error state it sets for itself on import."""
    saved = np.seterr(all="raise")
    try:
        yield
    finally:
        np.seterr(**saved)


def _gaussian(seed, d=64, n=300, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, n, generator=g, dtype=dtype), torch.randn(d, generator=g, dtype=dtype)


def _correlated(seed, d=30, n=80):
    """Candidates sharing a common direction (like per-example gradients early in training):
    CORDS's drop-the-most-negative step fires here and ends its support below nnz."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, 1, generator=g, dtype=torch.float64)
    A = common + 0.5 * torch.randn(d, n, generator=g, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64) + common[:, 0]
    return A, b


def _rel_residual(A, b, w):
    A, b, w = (np.asarray(x, dtype=np.float64) for x in (A, b, w))
    return float(np.linalg.norm(b - A @ w) / np.linalg.norm(b))


@needs_cords
@pytest.mark.parametrize("name", ["OrthogonalMP_REG_Parallel", "OrthogonalMP_REG_Parallel_V1", "OrthogonalMP_REG"])
def test_signatures_are_cords(name):
    """Same parameter names, order and defaults: positional and keyword calls carry over."""
    ours = inspect.signature(globals()[name])
    theirs = inspect.signature(getattr(CORDS, name))
    assert [(p.name, p.default) for p in ours.parameters.values()] == \
           [(p.name, p.default) for p in theirs.parameters.values()]


@needs_cords
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("positive, lam", [(False, 0.0), (False, 1.0), (True, 0.0), (True, 0.5)])
def test_equals_cords_on_random_problems(seed, positive, lam):
    """Gaussian candidates: CORDS's solvers and ours pick the same rows with the same weights
    (float64 numpy solver to 1e-10; CORDS's torch solver returns float32)."""
    A, b = _gaussian(seed)
    with _cords_numpy_errors():
        ref_np = CORDS.OrthogonalMP_REG(A.numpy(), b.numpy(), nnz=20, positive=positive, lam=lam, tol=1e-4)
        ref_t = CORDS.OrthogonalMP_REG_Parallel(A, b, nnz=20, positive=positive, lam=lam, tol=1e-4)
    ours_np = OrthogonalMP_REG(A.numpy(), b.numpy(), nnz=20, positive=positive, lam=lam, tol=1e-4)
    ours_t = OrthogonalMP_REG_Parallel(A, b, nnz=20, positive=positive, lam=lam, tol=1e-4)
    assert np.count_nonzero(ref_np) == 20
    np.testing.assert_array_equal(ours_np != 0, ref_np != 0)
    assert np.abs(ours_np - ref_np).max() <= 1e-10 * np.abs(ref_np).max()
    assert torch.equal(ours_t != 0, ref_t != 0)
    assert ours_t.dtype == torch.float64  # CORDS: float32 always; ours keeps float64 input's precision
    torch.testing.assert_close(ours_t.float(), ref_t, rtol=1e-5, atol=1e-6 * float(ref_t.abs().max()))


@needs_cords
def test_float32_gradmatch_call_selects_as_cords():
    """GRAD-MATCH's own call on float32 gradients: the same rows, float32 weights out."""
    A, b = _gaussian(8, d=128, n=500, dtype=torch.float32)  # (seed 7: CORDS drops a row, see below)
    with _cords_numpy_errors():
        ref = CORDS.OrthogonalMP_REG_Parallel(A, b, nnz=30, positive=True, lam=0.5, tol=1e-4, device="cpu")
    ours = OrthogonalMP_REG_Parallel(A, b, nnz=30, positive=True, lam=0.5, tol=1e-4, device="cpu")
    assert ours.dtype == torch.float32 and ours.shape == (500,)
    assert torch.nonzero(ours).view(-1).tolist() == torch.nonzero(ref).view(-1).tolist()
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-5)


@needs_cords
@pytest.mark.parametrize("seed", [6, 24, 92])
def test_budget_where_cords_drops_rows(seed):
    """Where CORDS's positivity step drops rows its support ends below nnz; GTP refills to nnz
    with exact NNLS weights and fits at least as well (README: where budgets differ)."""
    A, b = _correlated(seed)
    with _cords_numpy_errors():
        ref = CORDS.OrthogonalMP_REG(A.numpy(), b.numpy(), nnz=10, positive=True, lam=0.0, tol=1e-4)
    ours = OrthogonalMP_REG(A.numpy(), b.numpy(), nnz=10, positive=True, lam=0.0, tol=1e-4)
    assert np.count_nonzero(ref) < 10
    assert np.count_nonzero(ours) == 10
    assert np.all(ours >= 0)
    assert _rel_residual(A, b, ours) <= _rel_residual(A, b, ref) + 1e-12


def test_return_convention_and_positional_order():
    """CORDS's order (A, b, tol, nnz, positive, lam, device); A is (d, n), atoms as columns."""
    A, b = _gaussian(1, d=40, n=90)
    w = OrthogonalMP_REG_Parallel(A.float(), b.float(), 1e-4, 6, True, 0.5, "cpu")
    assert isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.shape == (90,)
    assert 1 <= int((w != 0).sum()) <= 6 and bool((w >= 0).all())
    sel = gk.select(A.T.contiguous(), b, 6, positive=True, ridge=0.5, tol=1e-4)
    expected = torch.zeros(90, dtype=torch.float64)
    expected[torch.as_tensor(sel.indices)] = torch.as_tensor(sel.weights)
    w64 = OrthogonalMP_REG_Parallel(A, b, 1e-4, 6, True, 0.5, "cpu")
    assert torch.equal(w64, expected)
    assert torch.equal(OrthogonalMP_REG_Parallel_V1(A, b, 1e-4, 6, True, 0.5, "cpu"), expected)
    wn = OrthogonalMP_REG(A.numpy(), b.numpy(), 1e-4, 6, True, 0.5)
    assert isinstance(wn, np.ndarray) and wn.dtype == np.float64
    np.testing.assert_array_equal(wn, expected.numpy())


def test_tolerance_is_relative_and_checked_first():
    A, b = _gaussian(2, d=40, n=200)
    w = OrthogonalMP_REG(A.numpy(), b.numpy(), tol=0.5, positive=False, lam=0.0)
    assert _rel_residual(A, b, w) < 0.5
    # one atom fewer would not have reached it
    k = int(np.count_nonzero(w))
    assert _rel_residual(A, b, OrthogonalMP_REG(A.numpy(), b.numpy(), tol=0.0, nnz=k - 1, lam=0.0)) >= 0.5
    # CORDS tests ||r|| / ||b|| < tol before its first pick: tol > 1 selects nothing
    assert not np.any(OrthogonalMP_REG(A.numpy(), b.numpy(), tol=1.5))
    assert not bool(OrthogonalMP_REG_Parallel(A, torch.zeros(40, dtype=torch.float64)).any())


@pytest.mark.parametrize("kwargs, error, match", [
    ({"nnz": 0}, gk.InputError, "nnz must be >= 1"),
    ({"nnz": 2.0}, TypeError, "nnz must be an integer"),
    ({"lam": -1.0}, gk.InputError, "lam must be finite and >= 0"),
    ({"tol": float("nan")}, gk.InputError, "tol must be finite"),
    ({"positive": "no"}, TypeError, "positive must be True or False"),
    ({"device": "tpu"}, gk.InputError, "device 'tpu'"),
])
def test_bad_options_raise(kwargs, error, match):
    A, b = _gaussian(3, d=10, n=20)
    with pytest.raises(error, match=match):
        OrthogonalMP_REG_Parallel(A, b, **kwargs)


def test_bad_shapes_raise():
    A, b = _gaussian(3, d=10, n=20)
    with pytest.raises(gk.InputError, match=r"b must be a vector of length d = 10"):
        OrthogonalMP_REG_Parallel(A, b[:9])
    with pytest.raises(gk.InputError, match=r"A must be \(d, n\)"):
        OrthogonalMP_REG(A[0].numpy(), b.numpy())
    with pytest.raises(TypeError, match="floating-point"):
        OrthogonalMP_REG(A.numpy().astype(np.int64), b.numpy())


def test_cords_loader_restores_numpy_error_state_and_reports_absence(monkeypatch):
    before = np.geterr()
    module = load_cords_solvers()
    assert np.geterr() == before  # CORDS's module sets np.seterr(all="raise") on import
    if module is not None:
        assert callable(module.OrthogonalMP_REG_Parallel)
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert load_cords_solvers() is None
