"""Every input check of the public API, in one place, raised before any work starts.

All errors are :class:`InputError` (a ``ValueError``) or ``TypeError`` with a one-line message
that names the offending argument, so that the CLI can print it as is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from .ops.backends import BACKENDS, CHUNK_ELEMENTS
from .selection.rows import (RowSource, RowSourceError, RowSourceTypeError, gather_rows, row_chunks,
                             tensor_from_array)

ArrayLike = Union[torch.Tensor, np.ndarray]
# candidates: an array, or rows in blocks (a RowSource, a list of arrays, or an object with a
# rows_source() method such as a TrajectoryStore), read a chunk at a time
CandidatesLike = Union[torch.Tensor, np.ndarray, RowSource, Sequence[ArrayLike], Any]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# candidate row norms that float32 products handle: Gram entries up to 2^100 and down to 2^-100
# stay normal (float32 spans 2^-126..2^128), with room for sums over D and the weights
FLOAT32_ROW_NORMS = (2.0 ** -50, 2.0 ** 50)
# ... and float64 ones, likewise (float64 spans 2^-1022..2^1024): rows of norm ~1e155 overflowed
# their Gram entries (an empty selection, "no_correlation"), ~1e-160 underflowed them
FLOAT64_ROW_NORMS = (2.0 ** -400, 2.0 ** 400)


class InputError(ValueError):
    """Bad input to gtp_kernels: wrong shape, dtype, non-finite values, impossible budget."""


class InputTypeError(InputError, TypeError):
    """Input of the wrong type or dtype (both an InputError and a TypeError)."""


@dataclass(frozen=True)
class Problem:
    """A validated selection problem.

    Attributes:
        candidates: A, (N, D), the candidate feature rows, on the caller's device and dtype: a
            tensor, or a RowSource (blocks read a chunk at a time; see selection.rows).
        targets: B, (D, m), one target column per pursuit.
        num_checkpoints: T (1 when no trajectory structure was given).
        checkpoint_dim: d, with D = T * d.
        checkpoint_weights: (T,) float64 weights lr_t, or None for plain inner products.
        exclude: (N,) bool, rows that may never be selected (all-zero rows, user exclusions).
    """

    candidates: Union[torch.Tensor, RowSource]
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


# ---- scalar option checks, shared by every entry point: one message style, raised before any work ----

SEED_LIMIT = 2 ** 64  # seeds are unsigned 64-bit (torch.Generator.manual_seed, the Philox keys)


def check_int(value: Any, name: str, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` as an int: a Python or numpy integer (not a bool, not a float that happens to
    be whole) within [low, high]. InputTypeError for another type, InputError out of range."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputTypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if low is not None and value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value}")
    if high is not None and value > high:
        shown = "2^64 - 1" if high == SEED_LIMIT - 1 else str(high)
        raise InputError(f"{name} must be an integer <= {shown}, got {value}")
    return value


def check_real(value: Any, name: str, *, low: float = -math.inf, high: float = math.inf,
               finite: bool = True) -> float:
    """``value`` as a float: a real Python or numpy number (not a bool, a complex number or a
    string), finite unless ``finite=False``, within [low, high]. InputTypeError for another
    type, InputError for NaN/Inf or out of range."""
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating))):
        raise InputTypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise InputError(f"{name} must be a finite number, got {value}")
    if not low <= value <= high:
        raise InputError(f"{name} must lie in [{low:g}, {high:g}], got {value}")
    return value


def check_number(value: Any, name: str, *, low: float = -math.inf, high: float = math.inf) -> float:
    """A selection option's real number: finite, within [low, high], as float, in the messages
    select() has always given ("must be a number", "must be finite and lie in [low, high]").
    InputTypeError for another type (a bool, a string, a complex number), InputError else."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputTypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise InputError(f"{name} must be finite and lie in [{low:g}, {high:g}], got {value}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """``value`` as a bool: True or False (numpy's too), nothing else: ``"no"`` or ``0`` would
    otherwise be read by truthiness (``"no"`` as True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise InputTypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """``value`` when it is one of ``choices`` (compared by type and value: ``1`` is not
    ``True``), else InputError listing them."""
    for choice in choices:
        if (isinstance(value, type(choice)) and isinstance(value, (bool, np.bool_)) == isinstance(choice, bool)
                and value == choice):
            return choice
    listed = [repr(c) for c in choices]
    options = listed[0] if len(listed) == 1 else f"{', '.join(listed[:-1])} or {listed[-1]}"
    raise InputError(f"{name} must be {options}, got {value!r}")


def check_real_vector(value: Any, name: str) -> np.ndarray:
    """A 1-D sequence, numpy array or tensor of real numbers as a float64 numpy array.

    Refuses (InputTypeError) strings and other non-numbers, bools, and complex values (a cast
    to float would keep only the real part); NaN/Inf and ranges are the caller's to judge.
    """
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool or value.device.type == "meta":
            raise InputTypeError(f"{name} must hold real numbers, got a {value.dtype} tensor on {value.device}")
        return value.detach().cpu().to(torch.float64).numpy().reshape(value.shape)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iuf":
            raise InputTypeError(f"{name} must hold real numbers, got numpy dtype {value.dtype}")
        return value.astype(np.float64)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise InputTypeError(f"{name} must be a sequence of real numbers, got {value!r}")
    entries = list(value)
    for i, entry in enumerate(entries):
        if isinstance(entry, (bool, np.bool_)) or not isinstance(entry, (int, float, np.integer, np.floating)):
            raise InputTypeError(f"{name} must hold real numbers, got {entry!r} at position {i}")
    return np.asarray([float(e) for e in entries], dtype=np.float64)


def check_backend(backend: Any, device: torch.device, name: str = "backend") -> str:
    """``backend`` ('auto', 'triton' or 'torch') usable on ``device``: 'triton' needs triton
    importable and, on the CPU, the Triton interpreter (TRITON_INTERPRET=1, slow: for tests)."""
    backend = check_choice(backend, name, BACKENDS)
    if backend == "triton":
        from .ops._dispatch import interpreting, triton_available

        if not triton_available():
            raise InputError(f"{name}='triton': triton cannot be imported here; use 'auto' or 'torch'")
        if device.type != "cuda" and not interpreting():
            raise InputError(f"{name}='triton' on {device.type} tensors needs the Triton interpreter "
                             "(set TRITON_INTERPRET=1 before triton is imported; slow, for testing); "
                             "use 'auto' or 'torch' on the CPU")
    return backend


def check_device_type(t: torch.Tensor, name: str) -> None:
    """gtp_kernels computes on cpu or cuda tensors: a meta (or other) device is refused here
    rather than failing deep inside a method."""
    if t.device.type not in ("cpu", "cuda"):
        raise InputError(f"{name} is on the {t.device.type} device; gtp_kernels runs on cpu or cuda tensors"
                         + (" (a meta tensor holds no values)" if t.device.type == "meta" else ""))


def refused_pickle_reason(error: BaseException) -> str:
    """What torch.load(weights_only=True) refused, in one line (its UnpicklingError runs to a
    dozen lines of advice, with terminal colour codes): the 'WeightsUnpickler error' line when
    present, e.g. "Unsupported global: GLOBAL builtins.print was not an allowed global"."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". Please use")[0][:200]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:200] if lines else type(error).__name__


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
    """Accept a torch tensor or a numpy array (memory-mapped arrays stay zero-copy).

    A tensor that requires grad is read as its values (detached, no copy): selection is not
    differentiable, and its weights come back as numpy arrays. Tensors must be on cpu or cuda.
    """
    if isinstance(x, torch.Tensor):
        check_device_type(x, name)
        return x.detach()
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise InputTypeError(f"{name} must hold floating-point values, got numpy dtype {x.dtype}")
        return tensor_from_array(x)
    raise InputTypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def as_candidates(x: Any, name: str = "candidates") -> Union[torch.Tensor, RowSource]:
    """A tensor for a tensor or numpy array (as as_tensor); a RowSource for a RowSource, a list
    or tuple of arrays (row blocks in order), or an object with a ``rows_source()`` method (a
    TrajectoryStore: its memory-mapped shards). Nothing is copied."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return as_tensor(x, name)
    if isinstance(x, RowSource):
        return x
    make = getattr(x, "rows_source", None)
    if callable(make):
        x = make()
        if not isinstance(x, RowSource):
            raise InputTypeError(f"{name}.rows_source() must return a RowSource, got {type(x).__name__}")
        return x
    if isinstance(x, (list, tuple)):
        try:
            return RowSource(x)
        except RowSourceError as err:
            error = InputTypeError if isinstance(err, RowSourceTypeError) else InputError
            raise error(f"{name} given as a list of row blocks: {err}") from None
    raise InputTypeError(f"{name} must be a torch.Tensor, numpy.ndarray, a list of row blocks or a RowSource "
                         f"(e.g. a trajectory store), got {type(x).__name__}")


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise InputTypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_finite(t: torch.Tensor, name: str, row_offset: int = 0) -> None:
    # Chunked so that a memory-mapped pool is checked without a second full-size copy.
    flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    step = max(1, CHUNK_ELEMENTS // max(1, flat.shape[1]))
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
    A = as_candidates(candidates, "candidates")
    b = as_tensor(target, "target")
    _check_float(A, "candidates")
    _check_float(b, "target")
    # a row source is (N, D), or (N, T, d) when its blocks are trajectories; its rows stay flat
    a_shape = tuple(A.shape) if isinstance(A, torch.Tensor) else (A.num_rows,) + A.row_shape

    if num_checkpoints is not None:
        if isinstance(num_checkpoints, bool) or not isinstance(num_checkpoints, (int, np.integer)):
            raise InputTypeError(f"num_checkpoints must be an integer, got {num_checkpoints!r}")
        num_checkpoints = int(num_checkpoints)
    if len(a_shape) == 3:
        N, T, d = a_shape
        if num_checkpoints is not None and num_checkpoints != T:
            raise InputError(f"num_checkpoints={num_checkpoints} but candidates have T={T} checkpoints")
        if isinstance(A, torch.Tensor):
            A = A.reshape(N, T * d)
    elif len(a_shape) == 2:
        N = a_shape[0]
        if num_checkpoints is None:
            T = _checkpoints_from_weights(checkpoint_weights, a_shape[1])
        else:
            T = num_checkpoints
        if T < 1 or a_shape[1] % T != 0:
            raise InputError(f"num_checkpoints={num_checkpoints} does not divide D={a_shape[1]}")
        d = a_shape[1] // T
    else:
        raise InputError(f"candidates must be (N, D) or (N, T, d), got shape {a_shape}")
    D = A.shape[1]
    if N == 0 or D == 0:
        raise InputError(f"candidates are empty (shape {a_shape})")

    _check_target_shape(a_shape, tuple(b.shape), T, num_checkpoints is not None or len(a_shape) == 3)
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

    zero_rows, norm_range = finite_rows_and_zero_rows(A, "candidates")
    if compute_dtype is None:
        compute_dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    check_row_norm_range(norm_range, compute_dtype, A.dtype)
    _check_finite(b, "target")
    zero_cols = (b == 0).all(dim=0)
    if bool(zero_cols.any()):
        raise InputError(f"target column {int(zero_cols.nonzero()[0])} is all zero: nothing to match")

    weights = None
    if checkpoint_weights is not None:
        w = torch.from_numpy(check_real_vector(checkpoint_weights, "checkpoint_weights"))
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
        mask, idx = exclusion_rows(exclude, N)
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


def check_row_norm_range(norm_range: tuple, compute_dtype: torch.dtype,
                         candidates_dtype: torch.dtype = torch.float64) -> None:
    """InputError when products of rows with norms in (smallest, largest) could overflow or
    underflow in the compute dtype (FLOAT32_ROW_NORMS, FLOAT64_ROW_NORMS). Rows of a narrower
    dtype always fit float64 products (their norms, taken in float32, may read inf or 0)."""
    wide = compute_dtype == torch.float64
    if wide and candidates_dtype != torch.float64:
        return
    low, high = FLOAT64_ROW_NORMS if wide else FLOAT32_ROW_NORMS
    name = "float64" if wide else "float32"
    smallest, largest = norm_range
    if smallest >= low and largest <= high:
        return
    found = []
    if smallest < low:
        found.append(f"the smallest underflows {name}" if smallest == 0 else f"the smallest is {smallest:.3g}")
    if largest > high:
        found.append(f"the largest overflows {name}" if largest == float("inf") else f"the largest is {largest:.3g}")
    advice = "" if wide else " or pass compute_dtype=torch.float64"
    raise InputError(
        f"candidate row norms must lie in {low:.3g}..{high:.3g} for {name} products "
        f"({', '.join(found)}): scale the candidates (by a power of two to keep every bit){advice}")


def exclusion_rows(exclude: Any, N: int):
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
        if isinstance(exclude, (list, tuple)):
            _refuse_mixed_bools(exclude)
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


def _refuse_mixed_bools(entries: Sequence[Any]) -> None:
    """A list holding bools and other values (``[True, 0, 1]``) is neither a mask nor indices:
    numpy would read it as the integers [1, 0, 1] and exclude rows by accident."""
    kinds = {isinstance(e, (bool, np.bool_)) for e in entries}
    if len(kinds) == 2:
        first = next(i for i, e in enumerate(entries) if not isinstance(e, (bool, np.bool_)))
        raise InputTypeError(f"exclude mixes bools and other values (position {first} is {entries[first]!r}): "
                             "pass a bool mask of length N or integer row indices, not both")


# elements per slice when 16-bit rows are upcast for their norms: 8 MB of float32, cache-resident
_NORM_SLICE_ELEMENTS = 1 << 21


def block_row_norms(block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """||row||_2 of every row of ``block``, accumulated in ``dtype``.

    fp16/bf16 rows on the CPU are upcast a cache-sized slice of rows at a time: torch's
    vector_norm(dtype=float32) on 16-bit input ran at ~1.1 GB/s here (34 MB in 31 ms), the
    sliced upcast at ~5 GB/s (6.8 ms), with the same float32 values (the upcast is exact and
    both sum in float32), so the input check's pass no longer costs many times a read of the pool.
    """
    if block.device.type != "cpu" or block.dtype not in (torch.float16, torch.bfloat16) or block.ndim != 2:
        return torch.linalg.vector_norm(block, dim=1, dtype=dtype)
    out = torch.empty(block.shape[0], dtype=dtype)
    step = max(1, _NORM_SLICE_ELEMENTS // max(1, block.shape[1]))
    for lo in range(0, block.shape[0], step):
        out[lo : lo + step] = torch.linalg.vector_norm(block[lo : lo + step].to(dtype), dim=1)
    return out


def finite_rows_and_zero_rows(A: Union[torch.Tensor, RowSource], name: str) -> tuple:
    """One chunked pass over A: raise on NaN/Inf; return the (N,) mask of all-zero rows and
    (smallest, largest) norm of the other rows (0 / inf where float32 norms under/overflow).

    A row norm is NaN or Inf exactly when the row holds one, or when it overflows; only then
    is the chunk checked element by element (which also tells overflow from bad values). A
    zero norm is confirmed on the row's values (it underflows for tiny rows).
    """
    zero = torch.empty(A.shape[0], dtype=torch.bool, device=A.device)
    step = max(1, CHUNK_ELEMENTS // max(1, A.shape[1]))
    acc = torch.float64 if A.dtype == torch.float64 else torch.float32
    # running extremes stay on the device: one host sync per chunk (the finiteness test), as before
    lo = torch.full((), float("inf"), dtype=acc, device=A.device)
    hi = torch.zeros((), dtype=acc, device=A.device)
    for start, block in row_chunks(A, CHUNK_ELEMENTS):  # a row source: a chunk of a block at a time
        norms = block_row_norms(block, acc)
        if not bool(torch.isfinite(norms).all()):
            _check_finite(block, name, row_offset=start)
        is_zero = norms == 0
        zero[start : start + block.shape[0]] = is_zero
        lo = torch.minimum(lo, norms.masked_fill(is_zero, float("inf")).min())
        hi = torch.maximum(hi, norms.max())
    low, high = float(lo), float(hi)
    if bool(zero.any()):  # a norm also underflows to 0 (float32 rows of ~1e-23): look at the rows
        rows = zero.nonzero().flatten()
        for start in range(0, rows.numel(), step):  # a chunk at a time: no copy of every zero row
            chunk = rows[start : start + step]
            underflowed = (gather_rows(A, chunk) != 0).any(dim=1)
            if bool(underflowed.any()):
                zero[chunk[underflowed]] = False
                low = 0.0
    return zero, (low, high)
