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
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..validation import InputError, Problem, validate_problem
from .common import SelectOptions
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


def _shard_layout(n_local: int, device: torch.device, group) -> tuple:
    sizes = torch.tensor([n_local], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    parts = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(parts, sizes, group=group)
    counts = [int(p) for p in parts]
    rank = dist.get_rank(group)
    return sum(counts[:rank]), sum(counts)


def _validated_shard(local_candidates, target, k, checkpoint_weights, num_checkpoints, group):
    # Validate this shard alone (k checked against the whole pool below).
    problem = validate_problem(local_candidates, target, 1, checkpoint_weights=checkpoint_weights,
                               num_checkpoints=num_checkpoints)
    offset, total = _shard_layout(problem.num_candidates, problem.candidates.device, group)
    if k > total:
        raise InputError(f"k={k} is larger than the pool (N={total} candidates over all ranks)")
    return problem, offset, total


def select_sharded(local_candidates, target, k: int, *, group=None, checkpoint_weights=None,
                   num_checkpoints: Optional[int] = None, strategy: str = "auto",
                   prefetch: Optional[int] = None, **options):
    """Exact GTP over rows sharded across the ranks of `group`; the same result on every rank.

    local_candidates: this rank's rows (N_r, D) or (N_r, T, d), rank order = global row order;
    target: (D,) or (D, m), identical on every rank; options: those of SelectOptions
    (positive, ridge, tol, min_cosine, stop_ratio, max_iters, compute_dtype, backend);
    strategy/prefetch: as for the single-process pursuit (the ranks agree on the strategy).
    Returns a :class:`gtp_kernels.Selection` with global row indices, equal on every rank.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("select_sharded needs an initialised torch.distributed process group")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k must be an integer >= 1, got {k!r}")
    problem, offset, _ = _validated_shard(local_candidates, target, k, checkpoint_weights, num_checkpoints, group)
    placement = ShardedRows(offset, problem.num_candidates, group)
    t0 = time.perf_counter()
    per_target = gtp_pursuit(problem, k, SelectOptions(**options), strategy=strategy, prefetch=prefetch,
                             placement=placement)
    return _selection("gtp-sharded", k, per_target, options, time.perf_counter() - t0, group)


def _selection(name, k, per_target, options, seconds, group):
    from ..api import Selection

    params = {**{key: str(v) for key, v in options.items()}, "world_size": dist.get_world_size(group)}
    return Selection(name, int(k), tuple(per_target), params, {"select_s": seconds, "total_s": seconds})


def select_shard_and_merge(local_candidates, target, k: int, *, group=None, checkpoint_weights=None,
                           num_checkpoints: Optional[int] = None, **options):
    """Approximate mode: pursue k on each shard, then once more over the union of the picks.

    One round of communication (the picked rows); the result is identical on every rank but
    not, in general, equal to the exact selection. Returns a :class:`gtp_kernels.Selection`.
    """
    t0 = time.perf_counter()
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("select_shard_and_merge needs an initialised torch.distributed process group")
    problem, offset, _ = _validated_shard(local_candidates, target, k, checkpoint_weights, num_checkpoints, group)
    opts = SelectOptions(**options)
    k_local = min(k, problem.num_candidates)
    local = gtp_pursuit(problem, k_local, opts)
    picks = sorted({int(i) + offset for ts in local for i in ts.indices})
    # every rank learns every rank's picks, then the rows themselves
    n = torch.tensor([len(picks)], dtype=torch.int64, device=problem.candidates.device)
    world = dist.get_world_size(group)
    counts = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(counts, n, group=group)
    width = max(int(c) for c in counts)
    mine = torch.full((width,), -1, dtype=torch.int64, device=n.device)
    mine[: len(picks)] = torch.tensor(picks, dtype=torch.int64, device=n.device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    union = sorted(int(a) for part in every for a in part.tolist() if a >= 0)
    rows = ShardedRows(offset, problem.num_candidates, group).fetch(problem.candidates, union,
                                                                    problem.candidates.dtype)
    merged = Problem(rows, problem.targets, problem.num_checkpoints, problem.checkpoint_dim,
                     problem.checkpoint_weights, torch.zeros(len(union), dtype=torch.bool, device=rows.device))
    final = gtp_pursuit(merged, min(k, len(union)), opts)
    per_target = [replace(ts, indices=np.asarray([union[i] for i in ts.indices.tolist()], dtype=np.int64))
                  for ts in final]
    return _selection("gtp-shard-and-merge", k, per_target, options, time.perf_counter() - t0, group)
