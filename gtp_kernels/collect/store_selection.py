"""Selection from stores: what a selection reads from a store, and the one call that selects.

A store of gradient trajectories holds rows a_i = concat_t(block_t) in R^{T*d}. Whatever
backs it (a :class:`~.store.TrajectoryStore` folder, LESS's gradient files through
:class:`~.less_store.LessGradients`), a selection needs the same few things of it, the
:class:`StoreReader` protocol: the rows (a row source read a chunk at a time), the target
rows (their mean, or every row), the example ids, the checkpoint weights w_t and whether the
blocks already carry c_t = sqrt(w_t), and the metadata saying how the rows were made.

The selection semantics live here, not in the stores:

- checkpoint weights (:func:`selection_weights`): rows whose blocks carry sqrt(w_t) already
  weigh <a_i, a_j> = sum_t w_t <.,.>, so the pursuits take them as they are (no weights); a
  method that compares blocks by cosine (LESS top-k: ``block_scale_invariant``) cancels the
  block scales and needs w_t itself; rows without built-in weights get w_t either way;
- the target (:func:`.targets.store_target`): the mean target row, or one column per example;
- compatibility (:func:`.store.check_compatible`): candidates and target must live in one space.

:func:`select_from_stores` puts them together for ``gtp select``, ``gtp less-select`` and
the recipes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from ..validation import InputError
from .targets import store_target

__all__ = ["StoreReader", "selection_weights", "select_from_stores", "rank_rows", "select_sharded_from_stores"]


@runtime_checkable
class StoreReader(Protocol):
    """What a selection reads from a store of (N, T, d) gradient trajectories."""

    path: Path  # where the rows live (named in errors and summaries)

    @property
    def n(self) -> int: ...  # rows (examples)

    @property
    def t(self) -> int: ...  # checkpoints

    @property
    def d(self) -> int: ...  # projected dimensions per checkpoint

    @property
    def ids(self) -> list[str]: ...  # the N example ids, row order

    @property
    def metadata(self) -> Mapping[str, Any]: ...  # how the rows were made (model, projection, ...)

    @property
    def checkpoint_weights(self) -> list[float]: ...  # w_t, sum 1

    @property
    def weights_applied(self) -> bool: ...  # the blocks carry c_t = sqrt(w_t)

    @property
    def complete(self) -> bool: ...  # every row is there

    def rows_source(self) -> Any:
        """The N rows (N, T*d) as a :class:`gtp_kernels.selection.rows.RowSource`."""
        ...

    def mean(self) -> np.ndarray:
        """The mean row (T*d,), float32."""
        ...

    def iter_shards(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(start, stop, rows (stop - start, T, d)) in row order."""
        ...


def selection_weights(store: StoreReader, block_scale_invariant: bool) -> list[float] | None:
    """The checkpoint weights a method should be given for the store's rows: w_t when the method
    compares blocks by cosine (``block_scale_invariant``, it cancels built-in block scales) or when
    the blocks carry no weights; None (the rows as they are) when they carry sqrt(w_t)."""
    if block_scale_invariant or not store.weights_applied:
        return list(store.checkpoint_weights)
    return None


def _target_and_weights(candidates: StoreReader, target: StoreReader | Any, target_mode: str,
                        checkpoint_weights: Sequence[float] | None, block_scale_invariant: bool) -> tuple:
    """(target, checkpoint weights) for a selection over ``candidates``: a target store is checked
    compatible and made a target by ``target_mode`` ("joint" takes one column per example);
    given weights are refused when the rows already carry theirs, else the store's are used."""
    if isinstance(target, StoreReader):
        from .store import check_compatible

        check_compatible(candidates, target)  # e.g. another projection seed: rows in other spaces
        target = store_target(target, "examples" if target_mode == "joint" else target_mode)
    if checkpoint_weights is not None and candidates.weights_applied:
        raise InputError(f"checkpoint_weights: the rows of {candidates.path} already carry their checkpoint weights "
                         "(weights_applied); passing weights again would apply them twice")
    if checkpoint_weights is None:
        checkpoint_weights = selection_weights(candidates, block_scale_invariant)
    return target, checkpoint_weights


def select_from_stores(candidates: StoreReader, target: StoreReader | Any, k: int, *, method: str | None = None,
                       target_mode: str = "mean", checkpoint_weights: Sequence[float] | None = None,
                       **select_options: Any) -> Any:
    """``gtp_kernels.select`` on the rows of a candidate store, for a target store or array.

    Args:
        candidates: the candidate rows (a :class:`StoreReader`, complete).
        target: a target store (checked compatible with the candidates, :func:`.store.check_compatible`;
            made a target by :func:`.targets.store_target` with ``target_mode``), or a target as
            ``select`` takes it ((T*d,) or (T*d, m)).
        target_mode: "mean" (one column, the mean of the target examples), "examples" (one column
            per example, each its own k rows) or "joint" (one column per example and k rows in all
            shared by them: ``select(..., targets="joint")``).
        k, method: as ``select``.
        checkpoint_weights: w_t to use instead of the store's; refused when the candidates' blocks
            already carry their weights (they would be applied twice).
        select_options: passed on to ``select`` (e.g. ``seed``, ``fill``, ``device``).

    Returns:
        The :class:`gtp_kernels.api.Selection`; row i is example ``candidates.ids[i]``.
    """
    from .. import api

    spec = api.METHODS.get(method or api.DEFAULT_METHOD)
    if spec is None:
        raise InputError(f"method: unknown method {method!r}; choose one of: {', '.join(api.METHODS)}")
    target, checkpoint_weights = _target_and_weights(candidates, target, target_mode, checkpoint_weights,
                                                     spec.block_scale_invariant)
    if target_mode == "joint":  # one column per target example, k rows in all (selection/joint.py)
        select_options.setdefault("targets", "joint")
    return api.select(candidates.rows_source(), target, k, method=method, checkpoint_weights=checkpoint_weights,
                      num_checkpoints=candidates.t, **select_options)


def rank_rows(store: StoreReader, rank: int, world: int) -> tuple[int, np.ndarray]:
    """(offset, rows (n_r, T*d) in the store's dtype): rank `rank`'s contiguous block of a complete
    store's N rows among `world` ranks, in row order (rank order = row order, as
    :func:`gtp_kernels.select_sharded` needs). With S >= world shards a rank takes whole shards
    [S*r/P, S*(r+1)/P) (no shard is split); with fewer shards than ranks, rows [N*r/P, N*(r+1)/P)."""
    if not 0 <= rank < world:
        raise InputError(f"rank {rank} is outside [0, {world})")
    if not store.complete:
        raise InputError(f"candidate store {store.path}: incomplete (shards missing); resume the collection")
    shards = list(store.iter_shards())  # memory maps: nothing read yet
    if len(shards) >= world:
        cuts = [len(shards) * r // world for r in range(world + 1)]
        bounds = [shards[c][0] if c < len(shards) else store.n for c in cuts]
    else:
        bounds = [store.n * r // world for r in range(world + 1)]
    low, high = bounds[rank], bounds[rank + 1]
    pieces = [array[max(low, start) - start:min(high, stop) - start]
              for start, stop, array in shards if start < high and low < stop]
    block = np.concatenate(pieces) if pieces else np.empty((0, store.t, store.d), dtype=shards[0][2].dtype)
    return low, np.ascontiguousarray(block).reshape(high - low, store.t * store.d)


def select_sharded_from_stores(candidates: StoreReader, target: StoreReader | Any, k: int, *, group: Any = None,
                               target_mode: str = "mean", checkpoint_weights: Sequence[float] | None = None,
                               shard_and_merge: bool = False, device: Any = None, **select_options: Any) -> Any:
    """:func:`gtp_kernels.select_sharded` (exact GTP) on a candidate store whose rows are split
    across the ranks of `group` (an initialised torch.distributed group); every rank calls it alike.

    Each rank reads only its block (:func:`rank_rows`), moved to ``device`` (None: the CPU); the
    target (a target store, made one column by ``target_mode`` "mean" or one per example by
    "examples", or a (T*d,) / (T*d, m) array) and the checkpoint weights are the ones
    :func:`select_from_stores` gives method "gtp", so the selection equals that single-process
    one. ``shard_and_merge``: the approximate one-round mode
    (:func:`gtp_kernels.selection.distributed.select_shard_and_merge`) instead. select_options:
    passed on (positive, ridge, tol, align_threshold, stop_ratio, compute_dtype, ...).

    Returns the :class:`gtp_kernels.Selection`, the same on every rank; row i is example
    ``candidates.ids[i]``.
    """
    import torch
    import torch.distributed as dist

    from ..selection.distributed import select_shard_and_merge, select_sharded

    if target_mode not in ("mean", "examples"):
        raise InputError(f"target mode {target_mode!r}: the sharded selection pursues each target column on its own; "
                         "use 'mean' or 'examples'")
    target, checkpoint_weights = _target_and_weights(candidates, target, target_mode, checkpoint_weights,
                                                     block_scale_invariant=False)  # gtp's weights
    _, block = rank_rows(candidates, dist.get_rank(group), dist.get_world_size(group))
    rows = torch.from_numpy(block)
    target = torch.as_tensor(target)
    if device is not None:
        rows, target = rows.to(device), target.to(device)
    run = select_shard_and_merge if shard_and_merge else select_sharded
    return run(rows, target, k, group=group, checkpoint_weights=checkpoint_weights, num_checkpoints=candidates.t,
               **select_options)
