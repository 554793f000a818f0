"""scikit-learn's orthogonal matching pursuit API, run on :func:`gtp_kernels.select`.

``orthogonal_mp(X, y, ...)`` solves, for each column y of Y,

    min_w ||y - X w||_2^2  s.t.  ||w||_0 <= n_nonzero_coefs      (budget mode), or
    min_w ||w||_0          s.t.  ||y - X w||_2^2 <= tol           (tolerance mode),

greedily: the atoms are the *columns* of X (n_samples, n_features); each step takes the column
with the largest |correlation| with the residual and re-fits least squares on the chosen
columns. That is GTP pursuit with positivity off and no ridge, on candidates A = X^T, so the
calls below only translate conventions:

* scikit-learn's ``tol`` is an absolute squared residual norm; ``select``'s is relative,
  ||r|| < tol_rel ||y||, so tol_rel = sqrt(tol) / ||y|| per column (a per-column call).
  In budget mode pursuit runs with tol 0 and stops at n_nonzero_coefs atoms.
* the result is a dense ``coef`` of scikit-learn's shapes ((n_features,) or (n_features,
  n_targets), squeezed as scikit-learn squeezes), float64 for ``orthogonal_mp`` and the
  Gram's dtype for ``orthogonal_mp_gram``.
* where scikit-learn warns that pursuit "ended prematurely" (nothing correlates any more, or
  every remaining atom is linearly dependent on the chosen ones) so do these functions, with
  scikit-learn's message. Unlike scikit-learn, the package's pursuit skips a dependent atom
  and tries the next one instead of stopping, so on dictionaries with dependent columns the
  supports can differ (both fit y equally well); elsewhere the coefficients agree to rounding.

``orthogonal_mp_gram(Gram, Xy, ...)`` runs the same pursuit on a factor of the Gram matrix:
with Gram = V diag(s) V^T (s above rounding), the rows A = V diag(sqrt s) and the target
b = diag(1/sqrt s) V^T Xy reproduce every inner product (A A^T = Gram, A b = Xy), and
||y - X w||^2 = ||b - A^T w||^2 + (||y||^2 - ||b||^2), which turns ``norms_squared`` and
``tol`` into the factor problem's tolerance.

Every call returns what scikit-learn returns; ``precompute``, ``copy_X``, ``copy_Gram`` and
``copy_Xy`` are accepted and change nothing (the pursuit never writes to its inputs and
caches the Gram columns it needs itself).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..api import select
from ..selection.common import STOP_BUDGET, STOP_TOLERANCE
from ..validation import InputError, InputTypeError, check_bool, check_int

# scikit-learn's own message (sklearn/linear_model/_omp.py), so code filtering on it still works
PREMATURE = (
    "Orthogonal matching pursuit ended prematurely due to linear"
    " dependence in the dictionary. The requested precision might"
    " not have been met."
)
# the pursuit's stops that reached what was asked; any other stop (nothing correlates any more,
# every remaining atom dependent, the iteration cap) is what scikit-learn calls premature
_COMPLETE_STOPS = (STOP_BUDGET, STOP_TOLERANCE)


@dataclass(frozen=True)
class _Fit:
    """One target column's outcome: atoms in selection order, their weights, and whether pursuit
    stopped short of its budget or tolerance."""

    indices: np.ndarray
    weights: np.ndarray
    premature: bool


_EMPTY = _Fit(np.zeros(0, dtype=np.int64), np.zeros(0), True)


def _as_float_tensor(x: Any, name: str, ndim: Tuple[int, ...]) -> torch.Tensor:
    """x as a floating torch tensor of one of the dimensions `ndim` (integers and bools become
    float64, as scikit-learn's check_array makes them); InputError otherwise."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise InputTypeError(f"{name} must be an array of numbers: {exc}") from None
        if arr.dtype.kind in "biu":
            arr = arr.astype(np.float64)
        if arr.dtype.kind != "f":
            raise InputTypeError(f"{name} must hold real numbers, got numpy dtype {arr.dtype}")
        with warnings.catch_warnings():  # read-only arrays: never written to
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dtype in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        t = t.to(torch.float64)
    if not t.is_floating_point():
        raise InputTypeError(f"{name} must hold real numbers, got {t.dtype}")
    if t.dim() not in ndim:
        want = " or ".join(f"{d}-D" for d in ndim)
        raise InputError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{name} contains NaN or Inf")
    return t


def _check_precompute(value: Any) -> None:
    """precompute is a flag (numpy's bools too, as scikit-learn accepts them) or 'auto'."""
    if not (isinstance(value, (bool, np.bool_)) or value == "auto"):
        raise InputTypeError(f"precompute must be True, False or 'auto', got {value!r}")


def _check_budget(n_nonzero_coefs: Any, tol: Any, n_features: int, default: int) -> Tuple[int, Optional[float]]:
    """(budget k, tol) as scikit-learn reads them: tol, when given, overrides the budget (k is
    then every atom); otherwise the budget defaults to `default`."""
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, (int, float, np.integer, np.floating)):
            raise InputTypeError(f"tol must be a number or None, got {tol!r}")
        tol = float(tol)
        if not (math.isfinite(tol) and tol >= 0):
            raise InputError(f"tol must be a finite number >= 0 (a squared residual norm), got {tol}")
    if n_nonzero_coefs is not None:
        n_nonzero_coefs = check_int(n_nonzero_coefs, "n_nonzero_coefs")
        if n_nonzero_coefs < 1:
            raise InputError(f"n_nonzero_coefs must be >= 1, got {n_nonzero_coefs}")
    if tol is not None:
        return n_features, tol
    k = default if n_nonzero_coefs is None else int(n_nonzero_coefs)
    if k < 1:
        raise InputError(f"The number of atoms must be positive (n_nonzero_coefs defaults to "
                         f"int(0.1 * {n_features}) = {k}; pass it)")
    if k > n_features:
        raise InputError(f"The number of atoms cannot be more than the number of features "
                         f"(n_nonzero_coefs={k}, n_features={n_features})")
    return k, None


def _select_as_sklearn(atoms: torch.Tensor, targets: torch.Tensor, k: int, *, positive: bool,
                       tol: float) -> List[_Fit]:
    """select() with plain least squares or NNLS, one _Fit per target column. The package's own
    early-stop warnings (RuntimeWarning subclasses of gtp_kernels) are not passed on: the caller
    reports early stops in scikit-learn's words, and counts such a warning as one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sel = select(atoms, targets, k, positive=positive, tol=tol, method="gtp")
    warned = False
    for w in caught:
        if issubclass(w.category, RuntimeWarning) and w.category.__module__.startswith("gtp_kernels"):
            warned = True
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    # a stop at the rounding floor with the budget full is complete: scikit-learn's loop ends
    # there too without a word
    return [_Fit(ts.indices, ts.weights,
                 warned or (ts.stopped_by not in _COMPLETE_STOPS and len(ts.indices) < sel.k))
            for ts in sel.per_target]


def _pursue(atoms: torch.Tensor, targets: torch.Tensor, k: int, tol: Optional[float], *, positive: bool,
            residual_offsets: Optional[Sequence[float]] = None) -> List[_Fit]:
    """One _Fit per column of targets (D, m): pursuit over the rows of atoms (N, D).

    Budget mode (tol None): one batched call at budget k, relative tolerance 0. Tolerance mode:
    stop once ||r||^2 + offset <= tol, one call per column (the relative tolerance differs per
    column); offset is what the rows cannot represent (the Gram route's ||y||^2 - ||b||^2).
    All-zero targets, or a dictionary of zero atoms, give no atom (scikit-learn: zeros and
    the premature warning).
    """
    m = targets.shape[1]
    fits: List[_Fit] = [_EMPTY] * m
    norms = torch.linalg.vector_norm(targets.to(torch.float64), dim=0).tolist()
    live = [t for t in range(m) if norms[t] > 0]
    if not live or not bool((atoms != 0).any()):
        return fits
    if tol is None:
        for t, fit in zip(live, _select_as_sklearn(atoms, targets[:, live], k, positive=positive, tol=0.0)):
            fits[t] = fit
        return fits
    for t in live:
        offset = 0.0 if residual_offsets is None else float(residual_offsets[t])
        reachable = tol - offset  # ||r||^2 at which to stop; <= 0: never (runs to every atom)
        rel = math.sqrt(reachable) / norms[t] if reachable > 0 else 0.0
        (fits[t],) = _select_as_sklearn(atoms, targets[:, t], k, positive=positive, tol=rel)
    return fits


def _prefix_paths(atoms: torch.Tensor, target: torch.Tensor, fit: _Fit) -> np.ndarray:
    """(n, n) least-squares weights of the first i + 1 atoms in column i (scikit-learn's path;
    zeros below the diagonal). One QR of the chosen atoms serves every prefix: the leading i
    columns of Q R are the QR of the first i atoms. The last column is pursuit's own weights."""
    n = len(fit.indices)
    path = np.zeros((n, n))
    if n == 0:
        return path
    rows = atoms.index_select(0, torch.as_tensor(fit.indices)).to(torch.float64)
    q, r = torch.linalg.qr(rows.T)  # (D, n), (n, n)
    qtb = q.T @ target.to(torch.float64)
    for i in range(n - 1):
        w = torch.linalg.solve_triangular(r[: i + 1, : i + 1], qtb[: i + 1, None], upper=True)
        path[: i + 1, i] = w[:, 0].numpy()
    path[:, n - 1] = fit.weights
    return path


def _assemble(fits: List[_Fit], n_features: int, dtype: np.dtype, paths: Optional[List[np.ndarray]],
              return_n_iter: bool):
    """Dense coefficients (and iteration counts) in scikit-learn's shapes, with its warning."""
    if any(f.premature for f in fits):
        warnings.warn(PREMATURE, RuntimeWarning, stacklevel=3)
    m = len(fits)
    n_iters = [len(f.indices) for f in fits]
    if paths is not None:
        # scikit-learn cuts its path to each target's length in turn: the common prefix
        steps = min(n_iters)
        coef = np.zeros((n_features, m, steps), dtype=dtype)
        for t, (f, path) in enumerate(zip(fits, paths)):
            for i in range(steps):
                coef[f.indices[: i + 1], t, i] = path[: i + 1, i]
    else:
        coef = np.zeros((n_features, m), dtype=dtype)
        for t, f in enumerate(fits):
            coef[f.indices, t] = f.weights
    coef = np.squeeze(coef)
    if return_n_iter:
        return coef, (n_iters[0] if m == 1 else n_iters)
    return coef


def _targets_2d(y: torch.Tensor, rows: int, name: str, rows_name: str) -> torch.Tensor:
    y2 = y.reshape(-1, 1) if y.dim() == 1 else y
    if y2.shape[0] != rows:
        raise InputError(f"{name} has {y2.shape[0]} rows but {rows_name} has {rows}")
    if y2.shape[1] == 0:
        raise InputError(f"{name} has no columns")
    return y2


def _omp(X: Any, y: Any, n_nonzero_coefs: Any, tol: Any, *, positive: bool, return_path: bool,
         return_n_iter: bool):
    Xt = _as_float_tensor(X, "X", (2,))
    n_samples, n_features = Xt.shape
    if n_samples == 0 or n_features == 0:
        raise InputError(f"X is empty (shape {tuple(Xt.shape)})")
    Y = _targets_2d(_as_float_tensor(y, "y", (1, 2)), n_samples, "y", "X")
    k, tol = _check_budget(n_nonzero_coefs, tol, n_features, max(int(0.1 * n_features), 1))
    atoms = Xt.T.contiguous()  # candidates: one row per column of X
    fits = _pursue(atoms, Y, k, tol, positive=positive)
    paths = [_prefix_paths(atoms, Y[:, t], f) for t, f in enumerate(fits)] if return_path else None
    return _assemble(fits, n_features, np.dtype(np.float64), paths, return_n_iter)


def orthogonal_mp(X: Any, y: Any, *, n_nonzero_coefs: Optional[int] = None, tol: Optional[float] = None,
                  precompute: Union[bool, str] = False, copy_X: bool = True, return_path: bool = False,
                  return_n_iter: bool = False):
    """Orthogonal matching pursuit with scikit-learn's signature and results, on GTP pursuit.

    Solves min ||y - X w||^2 s.t. ||w||_0 <= n_nonzero_coefs, or, when ``tol`` is given,
    min ||w||_0 s.t. ||y - X w||^2 <= tol, for each column of y.

    Args:
        X: (n_samples, n_features) dictionary; its columns are the atoms (numpy, torch or
            array-like; not modified).
        y: (n_samples,) or (n_samples, n_targets).
        n_nonzero_coefs: atoms per target (default max(int(0.1 * n_features), 1)).
        tol: squared residual norm at which to stop; overrides n_nonzero_coefs.
        precompute, copy_X: accepted for compatibility; nothing changes.
        return_path: return every step's coefficients, shape (n_features, n_targets, steps)
            (squeezed as scikit-learn squeezes).
        return_n_iter: also return the number of active atoms (an int, or a list per target).

    Returns:
        coef, float64, (n_features,) or (n_features, n_targets); with return_n_iter
        (coef, n_iters).

    Warns:
        RuntimeWarning (scikit-learn's "ended prematurely" message) when pursuit stopped short
        of the budget or the tolerance.

    Raises:
        InputError (a ValueError) for bad shapes, NaN/Inf, n_nonzero_coefs outside
        1..n_features or a negative tol; InputTypeError (also a TypeError) for wrong types.
    """
    _check_precompute(precompute)
    check_bool(copy_X, "copy_X")
    return _omp(X, y, n_nonzero_coefs, tol, positive=False, return_path=check_bool(return_path, "return_path"),
                return_n_iter=check_bool(return_n_iter, "return_n_iter"))


def orthogonal_mp_gram(Gram: Any, Xy: Any, *, n_nonzero_coefs: Optional[int] = None, tol: Optional[float] = None,
                       norms_squared: Optional[Any] = None, copy_Gram: bool = True, copy_Xy: bool = True,
                       return_path: bool = False, return_n_iter: bool = False):
    """Orthogonal matching pursuit from Gram = X^T X and Xy = X^T y (scikit-learn's signature).

    Pursuit runs on a factor of the Gram matrix (see the module docstring): the same atoms and
    coefficients as on X, in the Gram's precision (Xy is rounded to the Gram's dtype first, as
    scikit-learn's LAPACK calls do).

    Args:
        Gram: (n_features, n_features), symmetric positive semi-definite.
        Xy: (n_features,) or (n_features, n_targets).
        n_nonzero_coefs: atoms per target (default int(0.1 * n_features), which must be >= 1).
        tol: squared residual norm at which to stop; needs ``norms_squared``.
        norms_squared: ||y||^2 per target (a number for one target).
        copy_Gram, copy_Xy: accepted for compatibility; the inputs are never written to.
        return_path, return_n_iter: as in :func:`orthogonal_mp`.

    Returns:
        coef in the Gram's dtype, (n_features,) or (n_features, n_targets); with
        return_n_iter (coef, n_iters).
    """
    for name, value in (("copy_Gram", copy_Gram), ("copy_Xy", copy_Xy)):
        check_bool(value, name)
    return_path = check_bool(return_path, "return_path")
    return_n_iter = check_bool(return_n_iter, "return_n_iter")
    G = _as_float_tensor(Gram, "Gram", (2,))
    n = G.shape[0]
    if n == 0 or G.shape[1] != n:
        raise InputError(f"Gram must be a non-empty square matrix, got shape {tuple(G.shape)}")
    out_dtype = np.dtype(np.float32) if G.dtype != torch.float64 else np.dtype(np.float64)
    # Xy in the Gram's precision, as scikit-learn's LAPACK solves (of the Gram's dtype) take it
    Xy2 = _targets_2d(_as_float_tensor(Xy, "Xy", (1, 2)), n, "Xy", "Gram")
    Xy2 = Xy2.to(G.dtype if G.dtype in (torch.float32, torch.float64) else torch.float32).to(torch.float64)
    m = Xy2.shape[1]
    k, tol = _check_budget(n_nonzero_coefs, tol, n, int(0.1 * n))
    if tol is not None:
        if norms_squared is None:
            raise InputError("Gram OMP needs the precomputed norms in order to evaluate the error sum "
                             "of squares: pass norms_squared (||y||^2 per target) with tol")
        ns = np.asarray(norms_squared, dtype=np.float64).reshape(-1)
        if ns.shape[0] != m or not np.all(np.isfinite(ns)):
            raise InputError(f"norms_squared must hold {m} finite value(s), got {norms_squared!r}")

    # the factor: rows A with A A^T = Gram, target b with A b = Xy (in Xy's part of the range)
    G64 = G.to(torch.float64)
    s, V = torch.linalg.eigh((G64 + G64.T) / 2)
    eps = float(np.finfo(out_dtype).eps)
    keep = s > max(float(s[-1]), 0.0) * n * eps
    if not bool(keep.any()):  # Gram = 0: no atom has a direction
        fits = [_EMPTY] * m
        return _assemble(fits, n, out_dtype, [np.zeros((0, 0))] * m if return_path else None, return_n_iter)
    root = s[keep].sqrt()
    atoms = (V[:, keep] * root).contiguous()  # (n_features, rank)
    b = (V[:, keep].T @ Xy2) / root[:, None]  # (rank, m)
    offsets = None
    if tol is not None:
        offsets = (torch.as_tensor(ns) - (b * b).sum(dim=0)).tolist()  # ||y||^2 - ||b||^2
    fits = _pursue(atoms, b, k, tol, positive=False, residual_offsets=offsets)
    paths = [_prefix_paths(atoms, b[:, t], f) for t, f in enumerate(fits)] if return_path else None
    return _assemble(fits, n, out_dtype, paths, return_n_iter)


class OrthogonalMatchingPursuit:
    """A thin scikit-learn-style estimator on GTP pursuit: ``fit``, ``predict``, ``score``,
    ``coef_``, ``intercept_``, ``n_iter_``, ``n_nonzero_coefs_`` as in
    ``sklearn.linear_model.OrthogonalMatchingPursuit``, plus ``positive``.

    Args:
        n_nonzero_coefs: atoms per target (default max(int(0.1 * n_features), 1)); ignored
            when tol is set.
        tol: squared residual norm at which to stop.
        fit_intercept: centre X and y first (their column means), then
            intercept_ = mean(y) - mean(X) @ coef_.
        precompute: accepted for compatibility ('auto', True, False).
        positive: non-negative coefficients: the atoms are chosen by signed correlation and
            weighted by non-negative least squares (GTP's pursuit) instead of plain OMP.

    ``get_params``/``set_params`` follow scikit-learn's protocol, so ``sklearn.base.clone``
    and grid searches accept the estimator.
    """

    _param_names = ("n_nonzero_coefs", "tol", "fit_intercept", "precompute", "positive")

    def __init__(self, *, n_nonzero_coefs: Optional[int] = None, tol: Optional[float] = None,
                 fit_intercept: bool = True, precompute: Union[bool, str] = "auto", positive: bool = False):
        self.n_nonzero_coefs = n_nonzero_coefs
        self.tol = tol
        self.fit_intercept = fit_intercept
        self.precompute = precompute
        self.positive = positive

    def get_params(self, deep: bool = True) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self._param_names}

    def set_params(self, **params: Any) -> "OrthogonalMatchingPursuit":
        for name, value in params.items():
            if name not in self._param_names:
                raise InputError(f"invalid parameter {name!r} for OrthogonalMatchingPursuit; "
                                 f"valid ones: {', '.join(self._param_names)}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"OrthogonalMatchingPursuit({args})"

    def fit(self, X: Any, y: Any) -> "OrthogonalMatchingPursuit":
        Xa = _as_float_tensor(X, "X", (2,)).to(torch.float64).numpy()
        ya = _as_float_tensor(y, "y", (1, 2)).to(torch.float64).numpy()
        if ya.shape[0] != Xa.shape[0]:
            raise InputError(f"y has {ya.shape[0]} rows but X has {Xa.shape[0]}")
        fit_intercept = check_bool(self.fit_intercept, "fit_intercept")
        positive = check_bool(self.positive, "positive")
        _check_precompute(self.precompute)
        n_features = Xa.shape[1]
        if fit_intercept:
            X_offset, y_offset = Xa.mean(axis=0), ya.mean(axis=0)
            Xa, ya = Xa - X_offset, ya - y_offset
        coef, n_iter = _omp(Xa, ya, self.n_nonzero_coefs, self.tol, positive=positive, return_path=False,
                            return_n_iter=True)
        if self.tol is not None:
            self.n_nonzero_coefs_ = None
        elif self.n_nonzero_coefs is None:
            self.n_nonzero_coefs_ = max(int(0.1 * n_features), 1)
        else:
            self.n_nonzero_coefs_ = int(self.n_nonzero_coefs)
        self.coef_ = coef.T
        self.n_iter_ = n_iter
        self.n_features_in_ = n_features
        self.intercept_ = (y_offset - X_offset @ self.coef_.T) if fit_intercept else 0.0
        return self

    def predict(self, X: Any) -> np.ndarray:
        if not hasattr(self, "coef_"):
            raise InputError("this OrthogonalMatchingPursuit is not fitted yet: call fit first")
        Xa = _as_float_tensor(X, "X", (2,)).to(torch.float64).numpy()
        if Xa.shape[1] != self.n_features_in_:
            raise InputError(f"X has {Xa.shape[1]} features, the model was fitted on {self.n_features_in_}")
        return Xa @ self.coef_.T + self.intercept_

    def score(self, X: Any, y: Any) -> float:
        """R^2 of the prediction (averaged uniformly over targets), as scikit-learn's regressors."""
        ya = _as_float_tensor(y, "y", (1, 2)).to(torch.float64).numpy()
        pred = self.predict(X)
        ss_res = ((ya - pred) ** 2).sum(axis=0)
        ss_tot = ((ya - ya.mean(axis=0)) ** 2).sum(axis=0)
        safe = np.where(ss_tot > 0, ss_tot, 1.0)
        r2 = np.where(ss_tot > 0, 1.0 - ss_res / safe, np.where(ss_res == 0, 1.0, 0.0))
        return float(np.mean(r2))
