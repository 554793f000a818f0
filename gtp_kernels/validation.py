"""Every input check of the public API, in one place, raised before any work starts.

All errors are :class:`InputError` (a ``ValueError``) or ``TypeError`` with a one-line message
that names the offending argument, so that the CLI can print it as is.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# candidate row norms that float32 products handle: Gram entries up to 2^100 and down to 2^-100
# stay normal (float32 spans 2^-126..2^128), with room for sums over D and the weights
FLOAT32_ROW_NORMS = (2.0 ** -50, 2.0 ** 50)


class InputError(ValueError):
    """Bad input to gtp_kernels: wrong shape, dtype, non-finite values, impossible budget."""


class InputTypeError(InputError, TypeError):
    """Input of the wrong type or dtype (both an InputError and a TypeError)."""


@dataclass(frozen=True)
class Problem:
    """A validated selection problem.

    Attributes:
        candidates: A, (N, D), the candidate feature rows, on the caller's device and dtype.
        targets: B, (D, m), one target column per pursuit.
        num_checkpoints: T (1 when no trajectory structure was given).
        checkpoint_dim: d, with D = T * d.
        checkpoint_weights: (T,) float64 weights lr_t, or None for plain inner products.
        exclude: (N,) bool, rows that may never be selected (all-zero rows, user exclusions).
    """

    candidates: torch.Tensor
    targets: torch.Tensor
    num_checkpoints: int
    checkpoint_dim: int
    checkpoint_weights: Optional[torch.Tensor]
    exclude: torch.Tensor

    @property
    def num_candidates(self) -> int:
        return self.candidates.shape[0]

    @property
    def dim(self) -> int:
        return self.candidates.shape[1]

    @property
    def num_targets(self) -> int:
        return self.targets.shape[1]

    def feature_weights(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """(D,) per-feature weights w_t repeated d times, or None when unweighted.

        The weighted inner product <a, b>_W = sum_t w_t <a^t, b^t> is what every GTP method
        matches in; it equals scaling each checkpoint block by sqrt(w_t) (SPEC: c_t = sqrt(lr_t)).
        """
        if self.checkpoint_weights is None:
            return None
        w = self.checkpoint_weights.to(device=self.candidates.device, dtype=dtype)
        return w.repeat_interleave(self.checkpoint_dim)


def resolve_device(spec: Any, what: str = "device") -> torch.device:
    """A device gtp_kernels can run on here ('cpu', 'cuda', 'cuda:N'), or InputError naming
    `what` (the argument or flag)."""
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{what} {spec!r} is not a device torch knows (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InputError(f"{what} {spec!r}: CUDA is not available ({why}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{what} {spec!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise InputError(f"{what} {spec!r}: gtp_kernels runs on cpu or cuda")
    return dev


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """Accept a torch tensor or a numpy array (memory-mapped arrays stay zero-copy)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise InputTypeError(f"{name} must hold floating-point values, got numpy dtype {x.dtype}")
        with warnings.catch_warnings():
            # Read-only (memory-mapped) arrays stay zero-copy: gtp_kernels never writes to inputs.
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.ascontiguousarray(x))
    raise InputTypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise InputTypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_finite(t: torch.Tensor, name: str, row_offset: int = 0) -> None:
    # Chunked so that a memory-mapped pool is checked without a second full-size copy.
    flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    step = max(1, (1 << 24) // max(1, flat.shape[1]))
    for start in range(0, flat.shape[0], step):
        block = flat[start : start + step]
        if not torch.isfinite(block).all():
            bad = (~torch.isfinite(block)).nonzero()[0]
            row = row_offset + start + int(bad[0])
            raise InputError(f"{name} contains NaN or Inf (first at row {row})")


def validate_problem(
    candidates: ArrayLike,
    target: ArrayLike,
    k: int,
    *,
    checkpoint_weights: Optional[Union[ArrayLike, Sequence[float]]] = None,
    num_checkpoints: Optional[int] = None,
    exclude: Optional[ArrayLike] = None,
    compute_dtype: Optional[torch.dtype] = None,
    require_selectable: bool = True,
) -> Problem:
    """Check and normalise the inputs of :func:`gtp_kernels.select`.

    candidates: (N, D), or (N, T, d) for a trajectory (viewed as (N, T*d)).
    target: (D,) for one target, (D, m) for m targets pursued together.
    k: the budget, 1 <= k <= N.
    checkpoint_weights: (T,) non-negative finite weights (e.g. learning rates), not all zero.
    num_checkpoints: T when candidates are given flat as (N, T*d).
    exclude: (N,) bool mask or a sequence of row indices that may never be selected.
    compute_dtype: the dtype of the N-sized products (None: float64 for float64 candidates,
        else float32). In float32 the candidates' row norms must lie within 2^-50..2^50
        (FLOAT32_ROW_NORMS), where products of rows and Gram entries neither overflow nor
        underflow; targets of any magnitude are fine (select() scales them by a power of two).
    require_selectable: refuse a pool whose rows are all zero or excluded (selection does; a
        fit on given rows, fit_residual, does not need it).
    """
    A = as_tensor(candidates, "candidates")
    b = as_tensor(target, "target")
    _check_float(A, "candidates")
    _check_float(b, "target")

    if num_checkpoints is not None:
        if isinstance(num_checkpoints, bool) or not isinstance(num_checkpoints, (int, np.integer)):
            raise InputTypeError(f"num_checkpoints must be an integer, got {num_checkpoints!r}")
        num_checkpoints = int(num_checkpoints)
    if A.dim() == 3:
        N, T, d = A.shape
        if num_checkpoints is not None and num_checkpoints != T:
            raise InputError(f"num_checkpoints={num_checkpoints} but candidates have T={T} checkpoints")
        A = A.reshape(N, T * d)
    elif A.dim() == 2:
        N = A.shape[0]
        if num_checkpoints is None:
            T = _checkpoints_from_weights(checkpoint_weights, A.shape[1])
        else:
            T = num_checkpoints
        if T < 1 or A.shape[1] % T != 0:
            raise InputError(f"num_checkpoints={num_checkpoints} does not divide D={A.shape[1]}")
        d = A.shape[1] // T
    else:
        raise InputError(f"candidates must be (N, D) or (N, T, d), got shape {tuple(A.shape)}")
    D = A.shape[1]
    if N == 0 or D == 0:
        raise InputError(f"candidates are empty (shape {tuple(A.shape)})")

    _check_target_shape(tuple(A.shape), tuple(b.shape), T, num_checkpoints is not None or A.dim() == 3)
    if b.dim() == 1:
        b = b.reshape(-1, 1)
    if b.shape[1] == 0:
        raise InputError("target has no columns (m = 0)")
    if b.device != A.device:
        raise InputError(f"target is on {b.device} but candidates are on {A.device}")

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InputTypeError(f"k must be an integer, got {type(k).__name__}")
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    if k > N:
        raise InputError(f"k={k} is larger than the pool (N={N} candidates)")

    zero_rows, norm_range = _finite_rows_and_zero_rows(A, "candidates")
    if compute_dtype is None:
        compute_dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    check_row_norm_range(norm_range, compute_dtype)
    _check_finite(b, "target")
    zero_cols = (b == 0).all(dim=0)
    if bool(zero_cols.any()):
        raise InputError(f"target column {int(zero_cols.nonzero()[0])} is all zero: nothing to match")

    weights = None
    if checkpoint_weights is not None:
        w = torch.as_tensor(np.asarray(checkpoint_weights, dtype=np.float64)
                            if not isinstance(checkpoint_weights, torch.Tensor)
                            else checkpoint_weights.detach().cpu().to(torch.float64))
        if w.dim() != 1 or w.shape[0] != T:
            raise InputError(f"checkpoint_weights must have T={T} entries (one per checkpoint; candidates "
                             f"{tuple(A.shape)} with num_checkpoints={num_checkpoints}), got shape {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()):
            raise InputError("checkpoint_weights contain NaN or Inf")
        if bool((w < 0).any()):
            raise InputError("checkpoint_weights must be non-negative")
        if bool((w == 0).all()):
            raise InputError("checkpoint_weights are all zero")
        weights = w

    excl = torch.zeros(N, dtype=torch.bool, device=A.device)
    if exclude is not None:
        mask, idx = _exclusion(exclude, N)
        if mask is not None:
            excl |= mask.to(A.device)
        else:
            excl[idx.to(A.device)] = True
    # All-zero rows carry no direction: never selectable.
    excl |= zero_rows
    if require_selectable and bool(excl.all()):
        reason = "all-zero or excluded" if exclude is not None else "all-zero"
        raise InputError(f"no candidate can be selected: all {N} rows are {reason}")
    return Problem(A, b, T, d, weights, excl)


def _checkpoints_from_weights(checkpoint_weights: Any, D: int) -> int:
    """T for flat (N, D) candidates given checkpoint weights but no num_checkpoints: the number
    of weights when it divides D (the only T they fit), else an InputError naming num_checkpoints."""
    if checkpoint_weights is None:
        return 1
    shape = tuple(checkpoint_weights.shape) if isinstance(checkpoint_weights, (torch.Tensor, np.ndarray)) \
        else np.shape(checkpoint_weights) if isinstance(checkpoint_weights, (list, tuple)) else ()
    if len(shape) != 1 or shape[0] < 1:
        return 1  # not a list of weights: the weights' own check says so
    count = shape[0]
    if D % count != 0:
        raise InputError(f"checkpoint_weights has {count} entries but the flat candidates' D={D} is not a "
                         f"multiple of {count}: pass num_checkpoints=T for (N, T*d) rows, or (N, T, d) candidates")
    return count


def _check_target_shape(a_shape: tuple, b_shape: tuple, T: int, t_given: bool) -> None:
    """InputError for a target that is not (D,) or (D, m), saying what to do with it."""
    N, D = a_shape[0], a_shape[1] if len(a_shape) == 2 else a_shape[1] * a_shape[2]
    flat_a = len(a_shape) == 2
    if len(b_shape) == 1 and b_shape[0] == D:
        return
    if len(b_shape) == 2 and b_shape[0] == D:
        return
    got = f"target has shape {b_shape} but candidates have shape {a_shape} (D={D})"
    length = b_shape[0] if len(b_shape) else None
    if flat_a and length == N and N != D and (len(b_shape) == 1 or b_shape[0] != D):
        raise InputError(f"{got}: the target matches the candidates' first axis, so the candidates look "
                         f"transposed; pass them as (N examples, D features), e.g. transpose them (A.T)")
    if len(b_shape) == 2 and b_shape[1] == D:
        what = "one row" if b_shape[0] == 1 else f"{b_shape[0]} rows"
        fix = "reshape the target to (D,)" if b_shape[0] == 1 else \
            "reshape the target to (D,) or (D, m): transpose it (target.T) for one column per row"
        raise InputError(f"{got}: it holds {what} of length D; {fix}")
    if len(b_shape) == 2 and b_shape[0] * b_shape[1] == D:
        t_hint = "" if t_given or b_shape[0] == 1 else \
            f"; pass num_checkpoints={b_shape[0]} if the candidates are flat (N, T*d) trajectories"
        raise InputError(f"{got}: it looks like a (T, d) trajectory; reshape the target to (D,) "
                         f"(target.reshape(-1)){t_hint}")
    if len(b_shape) == 3 and b_shape[1] * b_shape[2] == D:
        raise InputError(f"{got}: it looks like (m, T, d) trajectories; reshape the target to (D, m) "
                         f"(target.reshape(m, -1).T)")
    if len(b_shape) not in (1, 2):
        raise InputError(f"target must be (D,) or (D, m), got shape {b_shape}; reshape the target to (D,) or (D, m)")
    raise InputError(f"target has D={b_shape[0]} but candidates have D={D}; reshape the target to (D,) or (D, m)")


def check_row_norm_range(norm_range: tuple, compute_dtype: torch.dtype) -> None:
    """InputError when float32 products of rows with norms in (smallest, largest) could
    overflow or underflow (FLOAT32_ROW_NORMS); nothing to check in float64."""
    low, high = FLOAT32_ROW_NORMS
    smallest, largest = norm_range
    if compute_dtype == torch.float64 or (smallest >= low and largest <= high):
        return
    found = []
    if smallest < low:
        found.append("the smallest underflows float32" if smallest == 0 else f"the smallest is {smallest:.3g}")
    if largest > high:
        found.append("the largest overflows float32" if largest == float("inf") else f"the largest is {largest:.3g}")
    raise InputError(
        f"candidate row norms must lie in {low:.3g}..{high:.3g} for float32 products "
        f"({', '.join(found)}): scale the candidates (by a power of two to keep every bit) "
        f"or pass compute_dtype=torch.float64")


def _exclusion(exclude: Any, N: int):
    """(mask, None) for a boolean mask of length N, (None, indices) for integer row indices.

    Booleans are a mask whatever the container (a Python list of bools too: read as integers
    it would exclude rows 0 and 1); anything else that is not integer is refused, as is uint8
    (a mask in old torch, indices in numpy).
    """
    if isinstance(exclude, torch.Tensor):
        arr = exclude.detach().cpu().numpy() if exclude.dtype != torch.bfloat16 else None
        if arr is None:
            raise InputTypeError("exclude must be a bool mask or integer row indices, got torch.bfloat16")
    else:
        try:
            arr = np.asarray(exclude)
        except (TypeError, ValueError) as err:
            raise InputTypeError(f"exclude must be a bool mask or integer row indices ({err})") from None
    if arr.dtype == np.bool_:
        if arr.shape != (N,):
            raise InputError(f"exclude mask must have shape ({N},), got {tuple(arr.shape)}")
        return torch.from_numpy(np.ascontiguousarray(arr)), None
    if arr.size == 0:  # e.g. [] (numpy makes it float64): nothing excluded
        return None, torch.zeros(0, dtype=torch.int64)
    if arr.dtype == np.uint8:
        raise InputTypeError("exclude as uint8 is ambiguous (a mask or row indices?): pass a bool mask "
                             "or int64 indices")
    if arr.dtype.kind not in "iu":
        raise InputTypeError(f"exclude must be a bool mask or integer row indices, got dtype {arr.dtype}")
    idx = torch.from_numpy(arr.astype(np.int64).reshape(-1))
    if int(idx.min()) < 0 or int(idx.max()) >= N:
        raise InputError(f"exclude indices must lie in [0, {N}), got values from {int(idx.min())} "
                         f"to {int(idx.max())}")
    return None, idx


def _finite_rows_and_zero_rows(A: torch.Tensor, name: str) -> tuple:
    """One chunked pass over A: raise on NaN/Inf; return the (N,) mask of all-zero rows and
    (smallest, largest) norm of the other rows (0 / inf where float32 norms under/overflow).

    A row norm is NaN or Inf exactly when the row holds one, or when it overflows; only then
    is the chunk checked element by element (which also tells overflow from bad values). A
    zero norm is confirmed on the row's values (it underflows for tiny rows).
    """
    zero = torch.empty(A.shape[0], dtype=torch.bool, device=A.device)
    step = max(1, (1 << 24) // max(1, A.shape[1]))
    acc = torch.float64 if A.dtype == torch.float64 else torch.float32
    # running extremes stay on the device: one host sync per chunk (the finiteness test), as before
    lo = torch.full((), float("inf"), dtype=acc, device=A.device)
    hi = torch.zeros((), dtype=acc, device=A.device)
    for start in range(0, A.shape[0], step):
        block = A[start : start + step]
        norms = torch.linalg.vector_norm(block, dim=1, dtype=acc)
        if not bool(torch.isfinite(norms).all()):
            _check_finite(block, name, row_offset=start)
        is_zero = norms == 0
        zero[start : start + step] = is_zero
        lo = torch.minimum(lo, norms.masked_fill(is_zero, float("inf")).min())
        hi = torch.maximum(hi, norms.max())
    low, high = float(lo), float(hi)
    if bool(zero.any()):  # a norm also underflows to 0 (float32 rows of ~1e-23): look at the rows
        rows = zero.nonzero().flatten()
        for start in range(0, rows.numel(), step):  # a chunk at a time: no copy of every zero row
            chunk = rows[start : start + step]
            underflowed = (A.index_select(0, chunk) != 0).any(dim=1)
            if bool(underflowed.any()):
                zero[chunk[underflowed]] = False
                low = 0.0
    return zero, (low, high)
