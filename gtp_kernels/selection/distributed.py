"""GTP with the candidate rows sharded across torch.distributed ranks (SPEC algorithm 3).

Exact mode, ``select_sharded``: every rank holds a contiguous block of rows (any sizes, rank
order = row order) and the same targets. Each iteration every rank finds its local best per
target (one pass over its shard, K2 on GPUs), an all-gather picks the global winner (largest
value, ties to the lowest global index), and the winning rows reach every rank by an
all-reduce of a zero-filled buffer that only the owner fills (exact: x + 0 = x). Every rank
then applies the same float64 least-squares update to the same replicated state, so all
ranks return the same selection, and it equals the single-process selection on the
concatenated rows. With the cached strategy each rank caches the columns of its own rows;
prefetch lists are merged across ranks so every rank fetches the same atoms.

Communication per iteration: one all-gather of 2m numbers, one all-reduce of m rows (D
values each), plus a small one per cache miss. Works with gloo (CPU tensors) and NCCL (CUDA).

Approximate shard-and-merge mode, ``select_shard_and_merge``: each rank selects k from its own
shard, the union of all ranks' picks (at most world * k rows) is gathered, and a final pursuit
runs over the union on every rank (as the paper's distributed framework is usually read).

Input checks are collective: each rank checks its own shard and the options as
:func:`gtp_kernels.select` does, then one exchange (two all-gathers of a few bytes) lets every
rank raise the same InputError (naming the failing rank) or go on. The budget, the float32
row-norm range and "some row is selectable" are judged over the whole pool, so a shard may be
empty, all zero or all excluded. Every rank must call the same entry point and pass the same
k, target, options and candidate dtype (checked in the same exchange: ranks in different entry
points would otherwise wait on each other's collectives until the process group's timeout).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..validation import InputError, InputTypeError, Problem, as_tensor, check_backend, check_row_norm_range
from .common import Selection, selection_timings
from .prepare import Prepared, check_options, prepare_shard
from .pursuit import LocalRows, gtp_pursuit


class ShardedRows(LocalRows):
    """Rows [offset, offset + n_local) live on this rank; the others elsewhere in `group`."""

    def __init__(self, offset: int, n_local: int, group=None):
        self.offset, self.n_local, self.group = offset, n_local, group
        self.world = dist.get_world_size(group)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts)

    def best(self, values: torch.Tensor, idx: torch.Tensor):
        # float64 carries both: values exactly, indices exactly below 2^53
        mine = torch.stack([values.to(torch.float64), (idx + self.offset).to(torch.float64)])
        every = self._gather(mine)  # (world, 2, m)
        vals, ids = every[:, 0], every[:, 1]
        best_v = vals.max(dim=0).values
        # ties: the lowest global index among the ranks holding the best value
        cand = torch.where(vals == best_v, ids, torch.full_like(ids, float("inf")))
        best_i = cand.min(dim=0).values
        return best_v.to(values.dtype), best_i.to(torch.long)

    def top(self, key: torch.Tensor, count: int) -> List[int]:
        n = min(count, key.numel())
        values = torch.full((count,), -float("inf"), dtype=torch.float64, device=key.device)
        ids = torch.full((count,), -1.0, dtype=torch.float64, device=key.device)
        if n:
            v, i = torch.topk(key, n)
            values[:n], ids[:n] = v.to(torch.float64), (i + self.offset).to(torch.float64)
        every = self._gather(torch.stack([values, ids]))  # (world, 2, count)
        vals, gids = every[:, 0].reshape(-1), every[:, 1].reshape(-1)
        order = sorted(range(vals.numel()), key=lambda q: (-float(vals[q]), float(gids[q])))
        return [int(gids[q]) for q in order[:count] if vals[q] > -float("inf")]

    def fetch(self, A: torch.Tensor, atoms: List[int], dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(len(atoms), A.shape[1], dtype=torch.float64, device=A.device)
        for i, a in enumerate(atoms):
            if self.offset <= a < self.offset + self.n_local:
                out[i] = A[a - self.offset].to(torch.float64)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out.to(dtype)

    def local(self, atoms: List[int]) -> List[int]:
        return [a - self.offset for a in atoms if self.offset <= a < self.offset + self.n_local]

    def agree(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        if dist.get_backend(self.group) == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())


def _require_group(what: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{what} needs an initialised torch.distributed process group")


def _comm_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_json(payload: Any, group) -> List[Any]:
    """Every rank's (JSON-able) payload, in rank order: two all-gathers of a few bytes."""
    data = json.dumps(payload).encode()
    device, world = _comm_device(group), dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s) for s in sizes]
    buf = torch.zeros(max(lengths), dtype=torch.uint8)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(device)
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf, group=group)
    return [json.loads(bytes(p[:n].cpu().tolist()).decode()) for p, n in zip(parts, lengths)]


def _local_checks(candidates, target, k, checkpoint_weights, num_checkpoints, exclude, options):
    """This rank's part of select()'s checks (prepare.check_options, prepare.prepare_shard):
    (report for the other ranks, local state). Errors are reported, not raised, so that every
    rank can raise the same one."""
    report: Dict[str, Any] = {"error": None, "rows": None, "n": 0, "selectable": 0, "aligned": 0,
                              "norms": [float("inf"), 0.0], "setup": None}
    try:
        clean = check_options(**options)
        A = as_tensor(candidates, "candidates")
        check_backend(clean["backend"], A.device)
        if A.dim() >= 1:
            report["rows"] = int(A.shape[0])
        shard = prepare_shard(A, target, k, checkpoint_weights=checkpoint_weights,
                              num_checkpoints=num_checkpoints, exclude=exclude, checked=clean)
        prepared = shard.prepared
        b = shard.targets.detach().contiguous()
        digest = hashlib.sha256(b.view(torch.uint8).cpu().numpy().tobytes()).hexdigest()[:16]
        setup = {"k": repr(int(k))}
        setup.update({name: repr(value) for name, value in clean.items()})
        setup.update({
            "candidates dtype": str(A.dtype), "device type": A.device.type,
            "checkpoints (T, d)": repr((prepared.problem.num_checkpoints, prepared.problem.checkpoint_dim)),
            "target": f"{tuple(b.shape)} {b.dtype} sha256 {digest}",
            "checkpoint_weights": repr(None if prepared.checkpoint_weights is None
                                       else prepared.checkpoint_weights.tolist()),
        })
        report.update(n=prepared.problem.num_candidates, selectable=shard.selectable,
                      aligned=shard.selectable - prepared.guard_excluded,
                      norms=[float(x) for x in shard.norm_range], setup=setup,
                      guard_excluded=prepared.guard_excluded)
        return report, (prepared, A.dtype)
    except InputError as err:
        report["error"] = ["type" if isinstance(err, InputTypeError) else "input", str(err)]
        return report, None
    except Exception as err:  # a failure, not bad input: the other ranks are told, this one re-raises
        report["error"] = ["internal", f"{type(err).__name__}: {err}"]
        return report, err


def _judge(reports: List[Dict[str, Any]], k: Any, exclude: Any, align_threshold, compute_dtype,
           candidates_dtype) -> None:
    """The same verdict on every rank, from every rank's report; raises InputError if any.

    The entry point is judged first: ranks in different functions would go on to different
    collectives and wait on each other until the process group's timeout."""
    entries = [rep.get("entry") for rep in reports]
    if any(e != entries[0] for e in entries):
        calls = ", ".join(f"rank {r} {e or 'another collective'}" for r, e in enumerate(entries))
        raise InputError(f"every rank must call the same entry point: {calls}")
    errors = [(r, rep["error"]) for r, rep in enumerate(reports) if rep["error"] is not None]
    if errors:
        r, (kind, msg) = errors[0]
        if kind == "internal":
            raise RuntimeError(f"select_sharded failed on rank {r}: {msg}")
        if len(errors) < len(reports) or any(e != errors[0][1] for _, e in errors):
            rows = [rep["rows"] for rep in reports]
            where = ""
            if rows[r] is not None and all(x is not None for x in rows[:r]):
                start = sum(rows[:r])
                where = (f" (rows {start}..{start + rows[r] - 1} of the pool; row numbers below count within "
                         f"the shard)" if rows[r] else " (no rows)")
            msg = f"rank {r}{where}: {msg}"
        raise (InputTypeError if kind == "type" else InputError)(msg)
    first = reports[0]["setup"]
    for r, rep in enumerate(reports[1:], 1):
        for key, value in rep["setup"].items():
            if value != first[key]:
                raise InputError(f"every rank must pass the same {key}: rank {r} has {value}, rank 0 {first[key]}")
    total = sum(rep["n"] for rep in reports)
    if k > total:
        raise InputError(f"k={k} is larger than the pool (N={total} candidates over all ranks)")
    if compute_dtype is None:
        compute_dtype = torch.float64 if candidates_dtype == torch.float64 else torch.float32
    lowest = min(rep["norms"][0] for rep in reports)
    highest = max(rep["norms"][1] for rep in reports)
    check_row_norm_range((lowest, highest), compute_dtype, candidates_dtype)  # validate_problem's, over the pool
    if sum(rep["selectable"] for rep in reports) == 0:
        reason = "all-zero or excluded" if exclude is not None else "all-zero"
        raise InputError(f"no candidate can be selected: all {total} rows are {reason}")
    if sum(rep["aligned"] for rep in reports) == 0:
        raise InputError(f"align_threshold={align_threshold} excludes every candidate")


def _prepare(what, candidates, target, k, checkpoint_weights, num_checkpoints, exclude, options, group):
    """Collective checks; on success this rank's prepared (scaled, guarded) problem and the pool layout."""
    _require_group(what)
    report, state = _local_checks(candidates, target, k, checkpoint_weights, num_checkpoints, exclude, options)
    report["entry"] = what
    reports = _all_gather_json(report, group)
    if isinstance(state, Exception):
        raise state
    _judge(reports, k, exclude, options["align_threshold"], options["compute_dtype"],
           None if state is None else state[1])
    rank = dist.get_rank(group)
    info = {"offset": sum(rep["n"] for rep in reports[:rank]), "total": sum(rep["n"] for rep in reports),
            "guard_excluded": sum(rep["guard_excluded"] for rep in reports)}
    return state[0], info


def _padded(problem: Problem) -> Problem:
    """An empty shard as one excluded zero row: its correlations are -inf, it never wins (the
    pursuit needs a row to reduce over; the placement still says it holds none)."""
    if problem.num_candidates:
        return problem
    A = torch.zeros(1, problem.dim, dtype=problem.candidates.dtype, device=problem.candidates.device)
    return Problem(A, problem.targets, problem.num_checkpoints, problem.checkpoint_dim,
                   problem.checkpoint_weights, torch.ones(1, dtype=torch.bool, device=A.device))


def select_sharded(local_candidates, target, k: int, *, group=None, checkpoint_weights=None,
                   num_checkpoints: Optional[int] = None, exclude=None, positive: bool = True,
                   ridge: float = 0.0, tol: float = 1e-6, min_cosine: Optional[float] = None,
                   align_threshold: Optional[float] = None, stop_ratio: Optional[float] = None,
                   max_iters: Optional[int] = None, compute_dtype: Optional[torch.dtype] = None,
                   backend: str = "auto", strategy: str = "auto", prefetch: Optional[int] = None):
    """Exact GTP over rows sharded across the ranks of `group`; the same result on every rank.

    local_candidates: this rank's rows (N_r, D) or (N_r, T, d), rank order = global row order;
    any N_r >= 0, and a shard may be all zero or all excluded as long as the pool has a
    selectable row. target: (D,) or (D, m), identical on every rank. k, checkpoint_weights,
    num_checkpoints and the options (positive, ridge, tol, min_cosine, align_threshold,
    stop_ratio, max_iters, compute_dtype, backend) as for :func:`gtp_kernels.select`, the same
    on every rank; k is checked against the whole pool. exclude: this rank's own rows that may
    never be selected, as a bool mask of length N_r or local row indices in [0, N_r) (global
    row g = this rank's offset + local row). strategy/prefetch: as for the single-process
    pursuit (the ranks agree on the strategy).

    Returns a :class:`gtp_kernels.Selection` with global row indices, equal on every rank and
    to ``gtp_kernels.select`` on the concatenated rows. Raises InputError on every rank (naming
    the rank at fault) for bad input on any rank, before the pursuit starts.
    """
    t0 = time.perf_counter()
    options = dict(positive=positive, ridge=ridge, tol=tol, min_cosine=min_cosine,
                   align_threshold=align_threshold, stop_ratio=stop_ratio, max_iters=max_iters,
                   compute_dtype=compute_dtype, backend=backend, strategy=strategy, prefetch=prefetch)
    prepared, info = _prepare("select_sharded", local_candidates, target, k, checkpoint_weights,
                              num_checkpoints, exclude, options, group)
    k, problem = int(k), prepared.problem
    placement = ShardedRows(info["offset"], problem.num_candidates, group)
    t1 = time.perf_counter()
    per_target = gtp_pursuit(_padded(problem), k, prepared.options, strategy=prepared.checked["strategy"],
                             prefetch=prepared.checked["prefetch"], placement=placement)
    return _selection("gtp-sharded", k, prepared.finish(per_target, k), prepared, info, t0, t1, group)


# the options a sharded Selection reports in its params, in this order
SHARDED_PARAMS = ("positive", "ridge", "tol", "min_cosine", "align_threshold", "stop_ratio", "max_iters", "backend")


def _selection(name: str, k: int, per_target, prepared: Prepared, info: Dict[str, Any], t0: float, t1: float,
               group) -> Selection:
    t2 = time.perf_counter()
    extra = {"local_candidates": prepared.problem.num_candidates, "offset": info["offset"],
             "world_size": dist.get_world_size(group)}
    if name == "gtp-sharded":
        extra.update(strategy=prepared.checked["strategy"], prefetch=prepared.checked["prefetch"])
    params = prepared.params(SHARDED_PARAMS, guard_excluded=info["guard_excluded"], num_candidates=info["total"],
                             **extra)
    return Selection(name, k, tuple(per_target), params, selection_timings(t0, t1, t2))


def select_shard_and_merge(local_candidates, target, k: int, *, group=None, checkpoint_weights=None,
                           num_checkpoints: Optional[int] = None, exclude=None, positive: bool = True,
                           ridge: float = 0.0, tol: float = 1e-6, min_cosine: Optional[float] = None,
                           align_threshold: Optional[float] = None, stop_ratio: Optional[float] = None,
                           max_iters: Optional[int] = None, compute_dtype: Optional[torch.dtype] = None,
                           backend: str = "auto"):
    """Approximate mode: pursue k on each shard, then once more over the union of the picks.

    Arguments and checks as for :func:`select_sharded`. One round of communication (the picked
    rows); the result is identical on every rank but not, in general, equal to the exact
    selection. Returns a :class:`gtp_kernels.Selection`.
    """
    t0 = time.perf_counter()
    options = dict(positive=positive, ridge=ridge, tol=tol, min_cosine=min_cosine,
                   align_threshold=align_threshold, stop_ratio=stop_ratio, max_iters=max_iters,
                   compute_dtype=compute_dtype, backend=backend, strategy="auto", prefetch=None)
    prepared, info = _prepare("select_shard_and_merge", local_candidates, target, k, checkpoint_weights,
                              num_checkpoints, exclude, options, group)
    k, offset, problem, opts = int(k), info["offset"], prepared.problem, prepared.options
    t1 = time.perf_counter()
    picks: List[int] = []
    if bool((~problem.exclude).any()):  # an empty, all-zero or all-excluded shard picks nothing
        local = gtp_pursuit(problem, min(k, problem.num_candidates), opts)
        picks = sorted({int(i) + offset for ts in local for i in ts.indices})
    # every rank learns every rank's picks, then the rows themselves
    device = _comm_device(group)
    n = torch.tensor([len(picks)], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    counts = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(counts, n, group=group)
    width = max(1, max(int(c) for c in counts))
    mine = torch.full((width,), -1, dtype=torch.int64, device=device)
    mine[: len(picks)] = torch.tensor(picks, dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    union = sorted(int(a) for part in every for a in part.tolist() if a >= 0)
    rows = ShardedRows(offset, problem.num_candidates, group).fetch(problem.candidates, union,
                                                                    problem.candidates.dtype)
    merged = Problem(rows, problem.targets, problem.num_checkpoints, problem.checkpoint_dim,
                     problem.checkpoint_weights, torch.zeros(len(union), dtype=torch.bool, device=rows.device))
    final = gtp_pursuit(_padded(merged), max(1, min(k, len(union))), opts)
    per_target = [replace(ts, indices=np.asarray([union[i] for i in ts.indices.tolist()], dtype=np.int64))
                  for ts in final]
    return _selection("gtp-shard-and-merge", k, prepared.finish(per_target, k), prepared, info, t0, t1, group)
