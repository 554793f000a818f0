"""CORDS / GRAD-MATCH's OMP solvers (cords.selectionstrategies.helpers.omp_solvers), on GTP pursuit.

GRAD-MATCH calls ``OrthogonalMP_REG_Parallel(A, b, nnz=budget, positive=True, lam=lam,
tol=eps, device=device)`` with A = the training gradients transposed, (d, n): the atoms are
the *columns* of A, b (d,) is the target gradient, and the result is a dense weight vector of
length n whose non-zeros are the chosen examples. These functions keep that argument order,
defaults and return convention, and solve

    min_w ||b - A w||^2 + lam ||w||^2  s.t.  ||w||_0 <= nnz  (and w >= 0 when positive)

with :func:`gtp_kernels.select` on candidates A^T (ridge = lam, relative tol as CORDS's:
stop once ||r|| / ||b|| < tol).

Where the result can differ from CORDS's own solvers (README, "Drop-in for scikit-learn and
GRAD-MATCH"):

* positive=True: CORDS re-solves after dropping the most negative weight, one at a time, and
  stops altogether when the atom just added is the one dropped, so its support can end
  below nnz; GTP solves the non-negative least squares exactly (Lawson-Hanson), skips an atom
  that cannot enter, and keeps picking until nnz atoms or the tolerance.
* the first pick: CORDS weights it by <a, b> / ||a||^2, without the ridge; GTP uses
  <a, b> / (||a||^2 + lam) from the start, so with lam > 0 the second pick can differ.
With positive=False and lam = 0 both are plain OMP and agree to rounding.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

import numpy as np
import torch

from ..api import select
from ..validation import InputError, InputTypeError, check_bool, check_int, resolve_device


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputTypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise InputError(f"{name} must be finite and >= 0, got {value}")
    return value


def _solve(A: Any, b: Any, tol: Any, nnz: Any, positive: Any, lam: Any,
           device: Optional[torch.device]) -> tuple:
    """(indices, weights, n, dtype of A) for CORDS's problem; indices empty where CORDS picks
    nothing (tol > 1: its first check ||b|| / ||b|| < tol already holds; b = 0; A = 0)."""
    At = A.detach() if isinstance(A, torch.Tensor) else _from_numpy(A, "A")
    bt = b.detach() if isinstance(b, torch.Tensor) else _from_numpy(b, "b")
    for name, t in (("A", At), ("b", bt)):
        if not t.is_floating_point():
            raise InputTypeError(f"{name} must hold floating-point values, got {t.dtype}")
    if At.dim() != 2:
        raise InputError(f"A must be (d, n) with the candidates as columns, got shape {tuple(At.shape)}")
    d, n = At.shape
    if n == 0 or d == 0:
        raise InputError(f"A is empty (shape {tuple(At.shape)})")
    if bt.dim() != 1 or bt.shape[0] != d:
        raise InputError(f"b must be a vector of length d = {d} (A is (d, n)), got shape {tuple(bt.shape)}")
    tol = _real("tol", tol)
    lam = _real("lam", lam)
    positive = check_bool(positive, "positive")
    if nnz is None:
        k = n
    elif check_int(nnz, "nnz") < 1:
        raise InputError(f"nnz must be >= 1, got {nnz}")
    else:
        k = min(int(nnz), n)  # CORDS runs nnz iterations over n atoms: at most n picks
    if bt.device != At.device:
        bt = bt.to(At.device)
    empty = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64)
    if tol > 1 or not bool((bt != 0).any()) or not bool((At != 0).any()):
        return (*empty, n, At.dtype)
    sel = select(At.T.contiguous(), bt, k, positive=bool(positive), ridge=lam, tol=tol, device=device)
    return torch.as_tensor(sel.indices), torch.as_tensor(sel.weights), n, At.dtype


def _from_numpy(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, np.ndarray):
        raise InputTypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise InputTypeError(f"{name} must hold floating-point values, got numpy dtype {x.dtype}")
    return torch.from_numpy(np.ascontiguousarray(x))


def OrthogonalMP_REG_Parallel(A: Union[torch.Tensor, np.ndarray], b: Union[torch.Tensor, np.ndarray],
                              tol: float = 1e-4, nnz: Optional[int] = None, positive: bool = False,
                              lam: float = 1, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """GRAD-MATCH's solver, CORDS's signature: min ||b - A w||^2 + lam ||w||^2, ||w||_0 <= nnz.

    Args:
        A: (d, n), the n candidates as columns (GRAD-MATCH passes its per-example gradients
            transposed); torch tensor (or numpy array).
        b: (d,), the target.
        tol: stop once ||b - A w|| / ||b|| < tol (relative, as CORDS).
        nnz: budget, at most nnz non-zero weights (default n).
        positive: non-negative weights (exact NNLS; see the module docstring).
        lam: ridge.
        device: where the pursuit runs and the result lives ("cpu", "cuda", "cuda:1").

    Returns:
        w, a dense (n,) tensor on `device`: float64 for float64 A, else float32 (CORDS always
        returns float32). Its non-zeros are the selection (``torch.nonzero(w)``).
    """
    dev = resolve_device(device, "device")
    idx, weights, n, dtype = _solve(A, b, tol, nnz, positive, lam, dev)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.zeros(n, dtype=out_dtype, device=dev)
    w[idx.to(dev)] = weights.to(device=dev, dtype=out_dtype)
    return w


def OrthogonalMP_REG_Parallel_V1(A: Union[torch.Tensor, np.ndarray], b: Union[torch.Tensor, np.ndarray],
                                 tol: float = 1e-4, nnz: Optional[int] = None, positive: bool = False,
                                 lam: float = 1, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """GRAD-MATCH's default solver on GPU (``v1=True``): the same pursuit as
    :func:`OrthogonalMP_REG_Parallel`. (CORDS's V1 spends an iteration on a repeated pick instead
    of stopping; GTP never re-picks a chosen atom, so there is nothing to mirror.)"""
    return OrthogonalMP_REG_Parallel(A, b, tol=tol, nnz=nnz, positive=positive, lam=lam, device=device)


def OrthogonalMP_REG(A: Union[np.ndarray, torch.Tensor], b: Union[np.ndarray, torch.Tensor], tol: float = 1e-4,
                     nnz: Optional[int] = None, positive: bool = False, lam: float = 1) -> np.ndarray:
    """GRAD-MATCH's CPU solver, CORDS's signature (numpy in, numpy out): as
    :func:`OrthogonalMP_REG_Parallel` on the CPU, returning a float64 (n,) numpy array."""
    idx, weights, n, _ = _solve(A, b, tol, nnz, positive, lam, torch.device("cpu"))
    w = np.zeros(n, dtype=np.float64)
    w[idx.numpy()] = weights.numpy()
    return w


def load_cords_solvers() -> Optional[Any]:
    """CORDS's own ``omp_solvers`` module, for side-by-side comparisons; None without cords.

    Loaded by file path (cords/selectionstrategies/helpers/omp_solvers.py) because importing
    the package's strategies pulls torchvision, ray and the rest of CORDS's dependencies, while
    this module needs only numpy, scipy and torch. It sets ``np.seterr(all="raise")`` on
    import; numpy's error state is restored afterwards so nothing else is affected.
    """
    import importlib.util
    import os

    spec = importlib.util.find_spec("cords")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "selectionstrategies", "helpers",
                        "omp_solvers.py")
    if not os.path.exists(path):
        return None
    saved = np.geterr()
    try:
        module_spec = importlib.util.spec_from_file_location("cords_omp_solvers", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        np.seterr(**saved)
    return module
