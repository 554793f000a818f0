"""K3: batched incremental (non-negative) least squares for pursuit, one call per iteration.

Each of m pursuits keeps the lower Cholesky factor ``L`` of ``G_S + lam*I`` (``G_S``: Gram matrix of
its selected atoms, in factor order), the support, the right-hand side ``A_S b`` and the weights.
:func:`lsq_update` appends one atom per pursuit and re-solves:

* append: ``y = L^{-1} g``, ``pivot^2 = (G_jj + lam) - ||y||^2`` (the factor's new diagonal, squared).
  The atom is numerically in the span of the support (``STATUS_DEPENDENT``, the state is left
  bit-for-bit unchanged) if ``pivot^2 <= dep_tol*(G_jj+lam)`` (sin^2 of its angle to the span), or if
  ``pivot^2 <= eps * s^2`` with ``s = sum_i |c_i| ||L_i||``, ``c = L^{-T} y`` (its coefficients on the
  support) and ``||L_i|| = sqrt(G_ii + lam)``: that is the rounding error of ``pivot^2``, which grows
  with the square of the support's conditioning because the factor comes from the Gram matrix (an
  exactly dependent atom scored ``pivot^2 / G_jj = 1.2e-10`` against a fixed 1e-10); or if it is not
  finite. Otherwise ``L`` gains the row ``[y^T, pivot]``.
* solve, ``positive=False``: ``w = L^{-T} L^{-1} rhs`` (ridge least squares on the support).
* solve, ``positive=True``: Lawson-Hanson inner loop warm-started from the previous weights with the
  new atom at weight 0. ``z`` = unconstrained solution on the support; if all ``z_i > 0``, ``w = z``;
  else ``alpha = min_{z_i <= 0} w_i / (w_i - z_i)``, ``w += alpha (z - w)``, every atom whose weight is
  now ``<= 0`` (the arg-min one always) leaves the factor, repeat. When all ``z_i > 0``, atoms whose
  share of the fit is negligible, ``z_i ||L_i|| <= weight_tol * ||u||`` (``u = L^{-1} rhs``, so
  ``||u|| = ||A_S^T z||``), leave the factor as if their weight were 0 and the loop repeats: such a
  weight is within rounding of zero, and whether it came out +1e-15 or -1e-15 must not decide a pick. A removal is a Cholesky downdate
  of the factor itself (no Gram matrix needed): the rows below the removed one are re-triangularised
  by Givens rotations (compiled op) or a QR of the same block (torch fallback).

Statuses are bit flags, one int32 per pursuit: ``APPENDED`` (pivot test passed), ``DEPENDENT``,
``DROPPED`` (>= 1 atom removed by the NNLS step), ``NEW_DROPPED`` (the new atom itself was removed;
always together with ``APPENDED | DROPPED``), ``INACTIVE`` (``new_atom[t] == -1``), ``FULL`` (the
factor already holds ``k_max`` atoms; nothing done: a kernel cannot raise without a host sync).

Backends: the compiled extension ``gtp_kernels._C`` (C++ CPU op, and a CUDA kernel with one thread
block per pursuit and one launch per call, no host sync) and a pure-torch fallback with the same
semantics (a Python loop over pursuits; used when the extension is absent, see
:func:`extension_status`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

# the compiled extension, shared with ops.products (lsq._C and lsq.extension_status stay here)
from ..validation import check_choice, check_int, check_real
from ._ext import extension as _C, extension_status  # noqa: F401
from ._library import register

STATUS_APPENDED = 1
STATUS_DEPENDENT = 2
STATUS_DROPPED = 4
STATUS_NEW_DROPPED = 8
STATUS_INACTIVE = 16
STATUS_FULL = 32
STATUS_BAD_SIZE = 64  # state.size outside [0, k_max] (a corrupt state): nothing done

#: Default relative pivot threshold by dtype: pivot^2 <= dep_tol * (G_jj + lam) means "dependent",
#: i.e. the new atom's angle to the span of the support is below about sqrt(dep_tol) radians.
DEFAULT_DEP_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
#: Default negligible-weight threshold by dtype (positive=True): an atom whose share of the fit,
#: z_i ||a_i|| / ||A_S^T z||, is at or below it is dropped.
DEFAULT_WEIGHT_TOL = {torch.float64: 1e-6, torch.float32: 1e-5}

LsqBackend = Literal["auto", "ext", "torch"]

@dataclass
class LsqState:
    """Batched factor state of m pursuits with capacity k_max each (plain tensors, one device).

    Only ``L[t, :size[t], :size[t]]`` (lower triangle) is meaningful; outside it the op keeps ``L`` at
    0, ``support`` at -1, ``rhs`` and ``weights`` at 0.
    """

    L: torch.Tensor  # (m, k_max, k_max) lower Cholesky factor of G_S + lam*I
    size: torch.Tensor  # (m,) int32 or int64 support sizes
    support: torch.Tensor  # (m, k_max) int64 atom indices in factor order, -1 beyond size
    rhs: torch.Tensor  # (m, k_max) A_S b in factor order
    weights: torch.Tensor  # (m, k_max) current weights, 0 beyond size

    @property
    def m(self) -> int:
        return self.L.shape[0]

    @property
    def k_max(self) -> int:
        return self.L.shape[1]

    def clone(self) -> "LsqState":
        return LsqState(*(t.clone() for t in (self.L, self.size, self.support, self.rhs, self.weights)))


def lsq_init(
    m: int, k_max: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
) -> LsqState:
    """Empty state for m pursuits of capacity k_max."""
    m = check_int(m, "m", low=0)
    k_max = check_int(k_max, "k_max", low=1)
    if dtype not in DEFAULT_DEP_TOL:
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return LsqState(
        L=torch.zeros(m, k_max, k_max, dtype=dtype, device=device),
        size=torch.zeros(m, dtype=torch.int64, device=device),
        support=torch.full((m, k_max), -1, dtype=torch.int64, device=device),
        rhs=torch.zeros(m, k_max, dtype=dtype, device=device),
        weights=torch.zeros(m, k_max, dtype=dtype, device=device),
    )


def _validate(
    state: LsqState,
    new_atom: torch.Tensor,
    gram_col: torch.Tensor,
    gram_diag: torch.Tensor,
    rhs_new: torch.Tensor,
) -> None:
    L = state.L
    if not isinstance(L, torch.Tensor) or L.dim() != 3 or L.shape[1] != L.shape[2]:
        raise ValueError(f"state.L must be a (m, k_max, k_max) tensor, got shape {tuple(getattr(L, 'shape', ()))}")
    if L.dtype not in DEFAULT_DEP_TOL:
        raise TypeError(f"state.L must be float32 or float64, got {L.dtype}")
    m, k = L.shape[0], L.shape[1]
    expected = {
        "state.size": (state.size, (m,), None),
        "state.support": (state.support, (m, k), torch.int64),
        "state.rhs": (state.rhs, (m, k), L.dtype),
        "state.weights": (state.weights, (m, k), L.dtype),
        "new_atom": (new_atom, (m,), torch.int64),
        "gram_col": (gram_col, (m, k), L.dtype),
        "gram_diag": (gram_diag, (m,), L.dtype),
        "rhs_new": (rhs_new, (m,), L.dtype),
    }
    for name, (t, shape, dtype) in expected.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if dtype is not None and t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
        if t.device != L.device:
            raise ValueError(f"{name} is on {t.device} but state.L is on {L.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if not L.is_contiguous():
        raise ValueError("state.L must be contiguous")
    if state.size.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"state.size must be int32 or int64, got {state.size.dtype}")
    if m and bool(((state.size < 0) | (state.size > k)).any()):  # one host sync, checked mode only
        raise ValueError(f"state.size must lie in [0, k_max={k}], got {state.size.tolist()[:8]}")


def _resolve(backend: str, device: torch.device) -> str:
    check_choice(backend, "backend", ("auto", "ext", "torch"))
    ext_ok = _C is not None and (device.type == "cpu" or (device.type == "cuda" and _C.has_cuda()))
    if backend == "auto":
        return "ext" if ext_ok else "torch"
    if backend == "ext" and not ext_ok:
        raise RuntimeError(
            f"backend='ext' on {device.type} tensors, but the extension is {extension_status()!r}"
        )
    return backend


def lsq_update(
    state: LsqState,
    new_atom: torch.Tensor,
    gram_col: torch.Tensor,
    gram_diag: torch.Tensor,
    rhs_new: torch.Tensor,
    *,
    lam: float = 0.0,
    positive: bool = True,
    dep_tol: float | None = None,
    weight_tol: float | None = None,
    backend: LsqBackend = "auto",
    checked: bool = True,
) -> torch.Tensor:
    """Append one atom per pursuit and re-solve, in place on ``state``; returns int32 statuses (m,).

    Args:
        new_atom: (m,) int64 atom index per pursuit, -1 for a pursuit that sits this call out.
        gram_col: (m, k_max); entry p is <a_{support[t, p]}, a_new> for p < size[t] (rest ignored).
        gram_diag: (m,) <a_new, a_new>; ``lam`` is added inside.
        rhs_new: (m,) <a_new, b_t>.
        lam: ridge term of G_S + lam*I (must be the same on every call for a state).
        positive: non-negative least squares (Lawson-Hanson) instead of plain least squares.
        dep_tol: relative pivot threshold; ``None`` takes DEFAULT_DEP_TOL[dtype].
        weight_tol: negligible share of the fit (positive only); ``None`` takes
            DEFAULT_WEIGHT_TOL[dtype], 0 keeps every positive weight.
        backend: "auto" (compiled op when built for the device, else torch), "ext" or "torch".
        checked: False skips the Python argument checks (tens of microseconds), for drivers
            that built every tensor themselves; the compiled op still checks shapes and dtypes.
    """
    if dep_tol is None:
        dep_tol = DEFAULT_DEP_TOL.get(state.L.dtype, 0.0)
    if weight_tol is None:
        weight_tol = DEFAULT_WEIGHT_TOL.get(state.L.dtype, 0.0)
    if checked:
        _validate(state, new_atom, gram_col, gram_diag, rhs_new)
        lam = check_real(lam, "lam", low=0.0)
        dep_tol = check_real(dep_tol, "dep_tol", low=0.0)
        weight_tol = check_real(weight_tol, "weight_tol", low=0.0)
    else:
        lam, dep_tol, weight_tol = float(lam), float(dep_tol), float(weight_tol)
    _resolve(backend, state.L.device)  # a bad or unavailable backend fails here, before the op
    if not _tracing():
        # eager (the pursuits' loop, once per iteration): the op's body without the dispatcher,
        # which costs ~80 us a call here, more than the update itself at small k
        return _lsq_update_kernel(state.L, state.size, state.support, state.rhs, state.weights, new_atom, gram_col,
                                  gram_diag, rhs_new, lam, bool(positive), dep_tol, weight_tol, backend)
    return _lsq_update_op(
        state.L, state.size, state.support, state.rhs, state.weights,
        new_atom, gram_col, gram_diag, rhs_new, lam, bool(positive), dep_tol, weight_tol, backend,
    )


# The registered op torch.ops.gtp_kernels.lsq_update (ops/_library.py; torch.compile / torch.export
# see it): the five state tensors are declared mutated (updated in place, as lsq_update documents);
# the statuses are the only output.
def _tracing() -> bool:
    """True under torch.compile or torch.export: they must see the registered op."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.compiler.is_compiling() or exporting()


def _lsq_update_kernel(L, size, support, rhs, weights, new_atom, gram_col, gram_diag, rhs_new, lam, positive,
                       dep_tol, weight_tol, backend):
    if _resolve(backend, L.device) == "ext":
        return _C.lsq_update(L, size, support, rhs, weights, new_atom, gram_col, gram_diag, rhs_new, lam,
                             positive, dep_tol, weight_tol)
    return lsq_update_torch(LsqState(L, size, support, rhs, weights), new_atom, gram_col, gram_diag, rhs_new,
                            lam=lam, positive=positive, dep_tol=dep_tol, weight_tol=weight_tol)


def _lsq_update_fake(L, size, support, rhs, weights, new_atom, gram_col, gram_diag, rhs_new, lam, positive,
                     dep_tol, weight_tol, backend):
    return new_atom.new_empty(new_atom.shape, dtype=torch.int32)


_lsq_update_op = register(
    "lsq_update(Tensor(a!) L, Tensor(b!) size, Tensor(c!) support, Tensor(d!) rhs, Tensor(e!) weights, "
    "Tensor new_atom, Tensor gram_col, Tensor gram_diag, Tensor rhs_new, float lam, bool positive, "
    "float dep_tol, float weight_tol, str backend) -> Tensor",
    _lsq_update_kernel, _lsq_update_fake)


# ------------------------------------------------------------------------------------------------
# Pure-torch fallback: the same algorithm, one pursuit at a time (host syncs; kept plain).


def _tri_lower(L: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L^{-1} x for lower-triangular L (n x n) and a vector x (n,)."""
    if L.shape[0] == 0:
        return x.clone()
    return torch.linalg.solve_triangular(L, x[:, None], upper=False)[:, 0]


def _tri_upper_t(L: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L^{-T} x."""
    if L.shape[0] == 0:
        return x.clone()
    return torch.linalg.solve_triangular(L.mT, x[:, None], upper=True)[:, 0]


def _remove_position(L: torch.Tensor, n: int, p: int, rhs, w, support, norms) -> None:
    """Delete row/column p of the factor L[:n, :n] and entry p of the per-atom arrays, in place.

    With row p deleted, the trailing rows M = L[p+1:n, p:n] satisfy M M^T = L33 L33^T + l32 l32^T,
    so the new trailing factor is R^T from the QR decomposition M^T = Q R (signs fixed so the diagonal
    is positive); the leading columns just move up one row.
    """
    if p < n - 1:
        M = L[p + 1 : n, p:n]
        R = torch.linalg.qr(M.mT, mode="r").R  # (n-p-1, n-p-1) upper
        signs = torch.where(R.diagonal() < 0, -1.0, 1.0).to(R.dtype)
        L[p : n - 1, :p] = L[p + 1 : n, :p].clone()
        L[p : n - 1, p : n - 1] = (R.mT * signs[None, :]).tril()
    L[n - 1, :n] = 0
    L[:n, n - 1] = 0
    for arr, fill in ((rhs, 0), (w, 0), (support, -1), (norms, 0)):
        arr[p : n - 1] = arr[p + 1 : n].clone()
        arr[n - 1] = fill


def lsq_update_torch(
    state: LsqState,
    new_atom: torch.Tensor,
    gram_col: torch.Tensor,
    gram_diag: torch.Tensor,
    rhs_new: torch.Tensor,
    *,
    lam: float,
    positive: bool,
    dep_tol: float,
    weight_tol: float = 0.0,
) -> torch.Tensor:
    """Pure-torch twin of the compiled op (inputs assumed validated)."""
    m, k_max = state.m, state.k_max
    status = torch.zeros(m, dtype=torch.int32)
    atoms = new_atom.tolist()
    sizes = state.size.tolist()
    for t in range(m):
        atom, n = atoms[t], sizes[t]
        if atom < 0:
            status[t] = STATUS_INACTIVE
            continue
        if n < 0 or n > k_max:
            status[t] = STATUS_BAD_SIZE
            continue
        if n == k_max:
            status[t] = STATUS_FULL
            continue
        L, rhs, w, sup = state.L[t], state.rhs[t], state.weights[t], state.support[t]
        y = _tri_lower(L[:n, :n], gram_col[t, :n])
        norms = torch.zeros(k_max, dtype=L.dtype, device=L.device)
        norms[:n] = torch.linalg.vector_norm(L[:n, :n], dim=1)  # sqrt(G_ii + lam)
        coef = _tri_upper_t(L[:n, :n], y)  # the atom's coefficients on the support
        s = float((coef.abs() * norms[:n]).sum())
        diag = gram_diag[t] + lam
        pivot2 = diag - torch.dot(y, y)
        d, p2 = float(diag), float(pivot2)
        eps = torch.finfo(L.dtype).eps
        if not (d > 0 and p2 > dep_tol * d and p2 > eps * s * s and math.isfinite(p2)):
            status[t] = STATUS_DEPENDENT
            continue
        L[n, :n] = y
        L[n, n] = torch.sqrt(pivot2)
        norms[n] = math.sqrt(d)
        sup[n] = atom
        rhs[n] = rhs_new[t]
        w[n] = 0
        st = STATUS_APPENDED
        new_pos = n
        n += 1
        while True:
            z = _tri_upper_t(L[:n, :n], _tri_lower(L[:n, :n], rhs[:n]))
            if not positive:
                w[:n] = z
                break
            nonpos = (z <= 0).nonzero().flatten()
            if nonpos.numel() == 0:
                # accepted, but for atoms whose share of the fit ||u|| = ||L^{-1} rhs|| is negligible
                negligible = z * norms[:n] <= weight_tol * torch.linalg.vector_norm(_tri_lower(L[:n, :n], rhs[:n]))
                w[:n] = torch.where(negligible, torch.zeros_like(z), z)
                if not (weight_tol > 0 and bool(negligible.any())):
                    break
            else:
                wi, zi = w[nonpos], z[nonpos]
                ratios = torch.where(wi > 0, wi / (wi - zi), torch.zeros_like(wi))
                blocking = int(nonpos[torch.argmin(ratios)])  # argmin returns the first minimum
                alpha = ratios.min()
                w[:n] = w[:n] + alpha * (z - w[:n])
                w[blocking] = 0
            for p in reversed((~(w[:n] > 0)).nonzero().flatten().tolist()):
                _remove_position(L, n, p, rhs, w, sup, norms)
                st |= STATUS_DROPPED
                if p == new_pos:
                    st |= STATUS_NEW_DROPPED
                    new_pos = -1
                elif p < new_pos:
                    new_pos -= 1
                n -= 1
        state.size[t] = n
        status[t] = st
    return status.to(state.L.device)
