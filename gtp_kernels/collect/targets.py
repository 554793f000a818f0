"""A target store as the target of a selection: its mean row, or one column per example.

LESS scores every validation example and averages the scores over a task's examples; GTP
matches one target vector per column. ``mode="mean"`` pursues the mean gradient of the target
examples (one column: k rows in all); ``mode="examples"`` gives every target example its own
column (n columns, k rows each: the union holds up to n * k rows; top-k's
``topk_reduce="mean"`` then ranks exactly as LESS does over one task's examples).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..validation import InputError
from .store import StoreError

if TYPE_CHECKING:
    from .store_selection import StoreReader

TARGET_MODES = ("mean", "examples")


def store_target(store: "StoreReader", mode: str = "mean") -> np.ndarray:
    """The target of ``select`` from a complete target store (any :class:`~.store_selection.StoreReader`), float32: the mean row (D,)
    (``mode="mean"``) or every example's row as a column, (D, n) (``mode="examples"``, column j
    being ``store.ids[j]``). An all-zero example row is refused in "examples" mode (it would be
    a column with nothing to match), naming the example."""
    if mode not in TARGET_MODES:
        raise InputError(f"target mode must be 'mean' or 'examples', got {mode!r}")
    if mode == "mean":
        return store.mean()
    if not store.complete:
        raise StoreError(f"target store {store.path}: incomplete (shards missing); a target of every example "
                         "needs every row: resume the collection")
    columns = np.empty((store.t * store.d, store.n), dtype=np.float32)
    for start, stop, array in store.iter_shards():
        columns[:, start:stop] = np.asarray(array, dtype=np.float32).reshape(stop - start, -1).T
    zero = np.flatnonzero(~columns.any(axis=0))
    if zero.size:
        raise StoreError(f"target store {store.path}: example {store.ids[int(zero[0])]!r} has an all-zero gradient "
                         f"({zero.size} such example{'s' if zero.size > 1 else ''}); with target mode 'examples' every "
                         "example is a column to match: drop them, or use the mean")
    return columns
