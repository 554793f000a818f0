"""One preparation path for every selection entry point: option checks, validation, scaling,
guards and the candidate screen. :func:`gtp_kernels.select` calls :func:`prepare`; the sharded selects
(selection.distributed) call :func:`check_options` and :func:`prepare_shard`, which run the same
checks on one rank's rows and leave the judgments over the whole pool (budget, row-norm range,
some row selectable) to the collective exchange.

After the checks, the problem is scaled by powers of two (common.ProblemScaling: exact, picks
unchanged, float32 products in range) and the SPEC guard applied: with ``align_threshold``,
candidates whose cosine with every target column is at or below it are excluded. Then, with
``screen``, only the rows that rank high by cosine with some target column stay candidates
(:func:`exclude_unscreened`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from ..ops.backends import BACKENDS, CHUNK_ELEMENTS
from ..validation import (SEED_LIMIT, InputError, Problem, as_tensor, check_backend, check_bool, check_choice,
                          check_int, check_number, exclusion_rows, finite_rows_and_zero_rows, resolve_device,
                          validate_problem)
from .baselines import TOPK_REDUCE
from .common import (ProblemScaling, SelectOptions, TargetSelection, scale_problem, selection_params,
                     warn_early_stops, weighted_norm)
from .fill import FILL_SCORES
from .pursuit import STRATEGIES
from .rows import row_chunks

COMPUTE_DTYPES = (None, torch.float32, torch.float64)


def check_options(**options: Any) -> Dict[str, Any]:
    """The options given, checked in one order (select's) and cleaned (floats, ints, bools);
    InputError (InputTypeError for a wrong type) naming the first bad one. Options not named
    here pass through unchanged."""
    out = dict(options)
    if "compute_dtype" in options and options["compute_dtype"] not in COMPUTE_DTYPES:
        raise InputError(f"compute_dtype must be torch.float32 or torch.float64, got {options['compute_dtype']}")
    for name in ("ridge", "tol"):
        if name in options:
            out[name] = check_number(options[name], name, low=0.0)
    for name in ("min_cosine", "align_threshold"):
        if options.get(name) is not None:
            out[name] = check_number(options[name], name, low=-1.0, high=1.0)
    if options.get("screen") is not None:
        out["screen"] = check_number(options["screen"], "screen", low=1.0)
    if options.get("stop_ratio") is not None:
        out["stop_ratio"] = check_number(options["stop_ratio"], "stop_ratio", low=0.0)
        if not out["stop_ratio"] < 1:
            raise InputError(f"stop_ratio must lie in [0, 1), got {out['stop_ratio']}")
    if "backend" in options:
        out["backend"] = check_choice(options["backend"], "backend", BACKENDS)
    if options.get("max_iters") is not None:
        out["max_iters"] = check_int(options["max_iters"], "max_iters", low=1)
    if "topk_reduce" in options:
        value = options["topk_reduce"]
        if not isinstance(value, str) or value not in TOPK_REDUCE:  # check_choice, with what each means
            raise InputError(f"topk_reduce must be 'mean' or 'max' (one ranking for every column) or 'column' "
                             f"(each column its own), got {value!r}")
    if "fill" in options:
        out["fill"] = check_choice(options["fill"], "fill", (None,) + FILL_SCORES)
    for name in ("positive", "progress"):
        if name in options:
            out[name] = check_bool(options[name], name)
    if options.get("batch_size") is not None:
        out["batch_size"] = check_int(options["batch_size"], "batch_size", low=1)
    if "seed" in options:
        out["seed"] = check_int(options["seed"], "seed", low=0, high=SEED_LIMIT - 1)
    if options.get("prefetch") is not None:
        out["prefetch"] = check_int(options["prefetch"], "prefetch", low=0)
    if "strategy" in options:
        out["strategy"] = check_choice(options["strategy"], "strategy", STRATEGIES)
    return out


def select_options(checked: Dict[str, Any], scaling: Optional[ProblemScaling] = None) -> SelectOptions:
    """The methods' options from checked ones (those SelectOptions has); with the problem's
    scaling, its ridge."""
    fields = {f.name for f in dataclasses.fields(SelectOptions)}
    opts = SelectOptions(**{name: value for name, value in checked.items() if name in fields})
    return opts if scaling is None else dataclasses.replace(opts, ridge=scaling.ridge(opts.ridge))


def _cosines_by_chunk(problem: Problem):
    """(start, cos) per chunk of rows: cos[i, c] = cos_W(a_i, b_c) in the pursuit's inner product
    (float64 for float64 candidates, else float32); one pass over the rows."""
    dtype = torch.float64 if problem.candidates.dtype == torch.float64 else torch.float32
    fw = problem.feature_weights(dtype)
    B = problem.targets.to(dtype)
    Bw = B if fw is None else B * fw[:, None]
    b_norms = weighted_norm(B.T, fw)
    for start, a in row_chunks(problem.candidates, CHUNK_ELEMENTS):  # a tensor or a row source
        a = a.to(dtype)
        yield start, (a @ Bw) / (weighted_norm(a, fw)[:, None].clamp_min(torch.finfo(dtype).tiny) * b_norms)


def _with_exclude(problem: Problem, exclude: torch.Tensor) -> Problem:
    return Problem(problem.candidates, problem.targets, problem.num_checkpoints, problem.checkpoint_dim,
                   problem.checkpoint_weights, exclude)


def exclude_misaligned(problem: Problem, threshold: float) -> tuple:
    """SPEC guard: keep only candidates with cos(a_i, b) > threshold for some target column.
    (the problem with them excluded, how many it excluded)."""
    best = torch.full((problem.num_candidates,), -float("inf"), dtype=torch.float64, device=problem.exclude.device)
    for start, cos in _cosines_by_chunk(problem):
        best[start : start + cos.shape[0]] = cos.amax(dim=1).to(best)
    misaligned = (best <= threshold) & ~problem.exclude
    return _with_exclude(problem, problem.exclude | misaligned), int(misaligned.sum())


def screen_size(screen: float, k: int, num_targets: int, joint: bool) -> int:
    """Rows the screen keeps at least: ceil(screen * K), K = the most rows the selection can
    hold (k for a joint selection, k per column otherwise: k * m)."""
    return math.ceil(screen * k * (1 if joint else num_targets))


def _ranked(values: torch.Tensor, rows: torch.Tensor, keep: int) -> tuple:
    """Per column, the ``keep`` best (value, row) pairs of (n, m) ``values`` for the (n, m)
    ``rows``: largest value first, ties to the lowest row. The caller passes rows in increasing
    order within each column (chunks arrive in row order and a chunk's rows follow every row
    kept before it), so a stable sort by value alone breaks ties by row, and the ranking does
    not depend on how the rows were chunked."""
    order = torch.argsort(values, dim=0, descending=True, stable=True)[:keep]
    return values.gather(0, order), rows.gather(0, order)


def exclude_unscreened(problem: Problem, size: int) -> tuple:
    """Candidate screen: keep as candidates only the rows that rank high by cosine with some
    target column; (the problem with the others excluded, how many it excluded).

    Each column c ranks the selectable rows by cos_W(a_i, b_c) (largest first, ties to the lowest
    index). The screen keeps the union U_r of every column's r best rows for the smallest r with
    |U_r| >= size (whole ranks: every column's first row, then every column's second, ..., so no
    column is favoured by its position), or every selectable row when fewer remain.

    Why: pursuit picks the row most correlated with the *residual*. Once the rows that explain a
    target's main directions are in, what is left of the residual is the part no typical row
    explains, and rows that are atypical for the target (a mislabelled example: its label's
    gradient direction plus another class's features) fit such leftovers well: without a screen,
    joint pursuit picked mislabelled rows at the pool's rate from a 5% budget on in the quality
    study, although their cosine with the targets is low. Restricting pursuit to rows that are
    individually close to some target (sure independence screening, Fan & Lv 2008, before the
    pursuit) keeps pursuit's joint choice (no near-copies, every target served) among rows a
    per-target ranking would also consider. Memory: m * size values, one pass over the rows.
    """
    n, m = problem.num_candidates, problem.num_targets
    selectable = int((~problem.exclude).sum())
    if size >= selectable:
        return problem, 0
    device = problem.exclude.device
    best_values = torch.empty((0, m), dtype=torch.float64, device=device)
    best_rows = torch.empty((0, m), dtype=torch.int64, device=device)
    for start, cos in _cosines_by_chunk(problem):
        cos = cos.to(device=device, dtype=torch.float64)
        cos.masked_fill_(problem.exclude[start : start + cos.shape[0], None], -math.inf)
        rows = torch.arange(start, start + cos.shape[0], device=device)[:, None].expand_as(cos)
        values, rows = _ranked(cos, rows, size)
        best_values, best_rows = _ranked(torch.cat([best_values, values]), torch.cat([best_rows, rows]), size)
    # a row enters the union at the first rank where some column lists it; whole ranks are kept
    # until the union holds ``size`` rows: up to the size-th smallest first rank
    ranks = torch.arange(best_rows.shape[0], device=device)[:, None].expand_as(best_rows)
    listed = torch.isfinite(best_values)  # excluded rows rank last, never kept
    first_rank = torch.full((n,), best_rows.shape[0], dtype=torch.int64, device=device)
    first_rank.scatter_reduce_(0, best_rows[listed], ranks[listed], reduce="amin")
    last_rank = torch.sort(first_rank).values[size - 1]
    keep = first_rank <= last_rank
    unscreened = ~keep & ~problem.exclude
    return _with_exclude(problem, problem.exclude | unscreened), int(unscreened.sum())


@dataclass(frozen=True)
class Prepared:
    """A checked, scaled and guarded problem, ready for a method.

    problem: scaled (common.ProblemScaling) and with the guard's exclusions; options: the
    methods' options (ridge scaled with the problem); checked: the options as checked, for
    the Selection's params; checkpoint_weights: as given (validated, unscaled);
    guard_excluded: rows the align_threshold guard excluded; screened_out: rows the screen
    excluded (after the guard).
    """

    problem: Problem
    scaling: ProblemScaling
    options: SelectOptions
    checked: Dict[str, Any]
    checkpoint_weights: Optional[torch.Tensor]
    guard_excluded: int = 0
    screened_out: int = 0

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.options.resolved_compute_dtype(self.problem.candidates.dtype)

    def finish(self, per_target: List[TargetSelection], k: int, fit_weights: bool = True,
               stacklevel: int = 4) -> List[TargetSelection]:
        """A method's results as the original problem's (scaling undone), with the
        EarlyStopWarning for numerical early stops; waits for the device's work."""
        per_target = self.scaling.undo(per_target, fit_weights)
        warn_early_stops(per_target, k, self.checked["tol"], stacklevel=stacklevel)
        if self.problem.candidates.is_cuda:
            torch.cuda.synchronize()
        return per_target

    def params(self, keys, guard_excluded: Optional[int] = None, **extra: Any) -> Dict[str, Any]:
        """The Selection's params (common.selection_params) for the checked options ``keys``."""
        return selection_params(self.checked, keys,
                                guard_excluded=self.guard_excluded if guard_excluded is None else guard_excluded,
                                screened_out=self.screened_out,
                                compute_dtype=self.compute_dtype, problem=self.problem,
                                checkpoint_weights=self.checkpoint_weights, **extra)


def scale_and_guard(problem: Problem, checked: Dict[str, Any], guard: bool = True, k: Optional[int] = None,
                    joint: bool = False) -> Prepared:
    """The validated problem scaled by powers of two (exact) and, when ``guard`` and
    align_threshold is set, with the misaligned candidates excluded; then, with ``screen``
    (``k`` given), the rows outside the candidate screen excluded (:func:`exclude_unscreened`)."""
    user_weights = problem.checkpoint_weights  # reported as given
    problem, scaling = scale_problem(problem)
    guard_excluded = screened_out = 0
    if guard and checked.get("align_threshold") is not None:
        problem, guard_excluded = exclude_misaligned(problem, checked["align_threshold"])
    if guard and checked.get("screen") is not None and k is not None:
        size = screen_size(checked["screen"], k, problem.num_targets, joint)
        problem, screened_out = exclude_unscreened(problem, size)
    return Prepared(problem, scaling, select_options(checked, scaling), checked, user_weights, guard_excluded,
                    screened_out)


def prepare(candidates, target, k, *, checkpoint_weights=None, num_checkpoints=None, exclude=None,
            device=None, joint: bool = False, **options: Any) -> Prepared:
    """select()'s checks and preparation: the options (check_options), the problem
    (validate_problem: shapes, dtypes, NaN/Inf, the budget, the row-norm range, some row
    selectable), the backend on the device, then the move to ``device``, scaling, guard and
    screen (``joint``: k is the whole selection's budget, not each column's). InputError before
    any work."""
    checked = check_options(**options)
    dev = None if device is None else resolve_device(device, "device")
    problem = validate_problem(candidates, target, k, checkpoint_weights=checkpoint_weights,
                               num_checkpoints=num_checkpoints, exclude=exclude,
                               compute_dtype=checked.get("compute_dtype"))
    check_backend(checked.get("backend", "auto"), problem.candidates.device if dev is None else dev)
    if dev is not None:
        problem = Problem(problem.candidates.to(dev), problem.targets.to(dev), problem.num_checkpoints,
                          problem.checkpoint_dim, problem.checkpoint_weights, problem.exclude.to(dev))
    prepared = scale_and_guard(problem, checked, k=int(k), joint=joint)
    if checked.get("align_threshold") is not None and int((~prepared.problem.exclude).sum()) == 0:
        raise InputError(f"align_threshold={checked['align_threshold']} excludes every candidate")
    return prepared


@dataclass(frozen=True)
class PreparedShard:
    """One rank's shard, prepared: ``prepared`` as for select (rows local to this rank), the
    targets as validated (unscaled), the rows still selectable (before the guard) and the
    (smallest, largest) norm of the non-zero rows, for the judgments over the whole pool."""

    prepared: Prepared
    targets: torch.Tensor
    selectable: int
    norm_range: tuple


def prepare_shard(candidates, target, k, *, checkpoint_weights, num_checkpoints, exclude,
                  checked: Dict[str, Any]) -> PreparedShard:
    """select()'s preparation on one rank's rows, options already checked (check_options).

    The shard's shape, dtype, the target, budget and checkpoint arguments are checked by
    validate_problem on a one-row stand-in of the shard's shape (the shard itself may be empty
    or all zero: the caller judges that over the whole pool), its values (NaN/Inf, zero rows,
    row norms) and ``exclude`` by validate_problem's own helpers; then scaling and guard, the
    guard only where a row is selectable. k is checked against the pool by the caller.
    """
    A = as_tensor(candidates, "candidates")
    probe = A
    if A.dim() in (2, 3) and all(s > 0 for s in A.shape[1:]):
        probe = torch.ones((1,) + tuple(A.shape[1:]), dtype=A.dtype, device=A.device)
    try:  # a valid budget is checked against the whole pool later: the stand-in has one row
        k_ok = check_int(k, "k", low=1) >= 1
    except InputError:
        k_ok = False
    head = validate_problem(probe, target, 1 if k_ok else k, checkpoint_weights=checkpoint_weights,
                            num_checkpoints=num_checkpoints, compute_dtype=torch.float64)
    flat = A.reshape(A.shape[0], head.dim)
    zero_rows, norm_range = finite_rows_and_zero_rows(flat, "candidates")
    excl = torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
    if exclude is not None:
        mask, idx = exclusion_rows(exclude, flat.shape[0])
        if mask is not None:
            excl |= mask.to(flat.device)
        else:
            excl[idx.to(flat.device)] = True
    excl |= zero_rows
    problem = Problem(flat, head.targets, head.num_checkpoints, head.checkpoint_dim, head.checkpoint_weights, excl)
    selectable = int((~excl).sum())
    return PreparedShard(scale_and_guard(problem, checked, guard=selectable > 0), head.targets, selectable,
                         norm_range)
