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

__all__ = ["StoreReader", "selection_weights", "select_from_stores"]


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
    if isinstance(target, StoreReader):
        from .store import check_compatible

        check_compatible(candidates, target)  # e.g. another projection seed: rows in other spaces
        target = store_target(target, "examples" if target_mode == "joint" else target_mode)
    if target_mode == "joint":  # one column per target example, k rows in all (selection/joint.py)
        select_options.setdefault("targets", "joint")
    if checkpoint_weights is not None and candidates.weights_applied:
        raise InputError(f"checkpoint_weights: the rows of {candidates.path} already carry their checkpoint weights "
                         "(weights_applied); passing weights again would apply them twice")
    if checkpoint_weights is None:
        checkpoint_weights = selection_weights(candidates, spec.block_scale_invariant)
    return api.select(candidates.rows_source(), target, k, method=method, checkpoint_weights=checkpoint_weights,
                      num_checkpoints=candidates.t, **select_options)
