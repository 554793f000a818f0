"""bergson gradient indexes in, a trajectory store out (no bergson import needed to read).

bergson (EleutherAI) writes a gradient index as a folder with ``info.json`` (``num_grads``,
``grad_sizes``: the per-module widths in column order, ``base_dtype``) and ``gradients.bin``: a
C-order (num_grads, sum(grad_sizes)) array of that dtype, row i the (projected) gradient of
example i, and ``processor_config.yaml`` (its projection: dimension, type, seed). One index is one
model, so a trajectory is one index per checkpoint: :func:`bergson_to_store` stacks T indexes of the
same examples and modules into an (N, T, d) float32 store, d = sum(grad_sizes), with the checkpoint
weights recorded (not applied), as ``less_to_store`` does for LESS.

Per-token indexes (``attribute_tokens``: rows are tokens, not examples) are refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..collect.less_store import normalized_checkpoint_weights, write_trajectory_store
from ..collect.store import TrajectoryStore
from ..validation import InputError

__all__ = ["read_bergson_index", "bergson_to_store"]

# numpy has no bfloat16 without ml_dtypes: read its bits as int16 and let torch reinterpret them
_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "bfloat16": np.int16}


def _index_info(index: Path) -> dict:
    try:
        info = json.loads((index / "info.json").read_text())
    except FileNotFoundError:
        raise InputError(f"bergson index {index}: no info.json (is it an index folder?)") from None
    except (OSError, ValueError) as error:
        raise InputError(f"bergson index {index}: info.json unreadable: {error}") from None
    if info.get("attribute_tokens"):
        raise InputError(f"bergson index {index} is per-token (attribute_tokens): rows are tokens, not examples")
    if "base_dtype" in info:
        dtype = str(info["base_dtype"])
    else:  # older indexes: a structured dtype, one field per module
        dtype = str(info.get("dtype", {}).get("formats", ["?"])[0]).lstrip("<>=|")
        dtype = {"f4": "float32", "f2": "float16", "f8": "float64"}.get(dtype, dtype)
    if dtype not in _DTYPES:
        raise InputError(f"bergson index {index}: gradient dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    sizes = info.get("grad_sizes")
    if not isinstance(sizes, dict) or not sizes or not isinstance(info.get("num_grads"), int):
        raise InputError(f"bergson index {index}: info.json lacks num_grads or grad_sizes")
    return {"num_grads": info["num_grads"], "grad_sizes": {str(k): int(v) for k, v in sizes.items()}, "dtype": dtype}


def read_bergson_index(index: str | os.PathLike) -> tuple[torch.Tensor, dict[str, int]]:
    """(num_grads, d) float32 gradients of one bergson index and its per-module widths (column order)."""
    root = Path(index)
    info = _index_info(root)
    n, d = info["num_grads"], sum(info["grad_sizes"].values())
    path = root / "gradients.bin"
    np_dtype = np.dtype(_DTYPES[info["dtype"]])
    expected = n * d * np_dtype.itemsize
    size = path.stat().st_size if path.exists() else None
    if size != expected:
        raise InputError(f"bergson index {root}: gradients.bin has {size} bytes, info.json says "
                         f"{n} x {d} {info['dtype']} = {expected} (an index still being written?)")
    raw = torch.from_numpy(np.fromfile(path, dtype=np_dtype).reshape(n, d))
    rows = raw.view(torch.bfloat16) if info["dtype"] == "bfloat16" else raw
    return rows.to(torch.float32), info["grad_sizes"]


def _projection(index: Path) -> dict:
    config = index / "processor_config.yaml"
    if not config.exists():
        return {"library": "bergson"}
    import yaml  # bergson itself needs pyyaml; only read when the file is there

    settings = yaml.safe_load(config.read_text()) or {}
    keys = ("projection_dim", "projection_type", "projection_seed", "projection_target", "projection_scale")
    return {"library": "bergson", **{k: settings[k] for k in keys if k in settings}}


def bergson_to_store(
    indexes: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    checkpoint_weights: Sequence[float] | None = None,
    example_ids: Sequence[str] | None = None,
    shard_size: int = 65536,
) -> TrajectoryStore:
    """Convert T bergson gradient indexes (one per checkpoint, same examples and modules) into a store.

    Every index is read and checked (same rows, modules and projection; finite values) before
    anything is written; bad input raises :class:`InputError`.
    """
    if isinstance(indexes, (str, os.PathLike)) or not indexes:
        raise InputError("indexes: a non-empty list of bergson index folders, one per checkpoint")
    roots = [Path(i) for i in indexes]
    blocks, modules, projections = [], None, None
    for root in roots:
        rows, sizes = read_bergson_index(root)
        projection = _projection(root)
        if modules is None:
            modules, projections = sizes, projection
        elif sizes != modules or rows.shape[0] != blocks[0].shape[0]:
            raise InputError(f"bergson index {root}: {rows.shape[0]} rows of modules {sizes}, but {roots[0]} has "
                             f"{blocks[0].shape[0]} rows of {modules}")
        elif projection != projections:
            raise InputError(f"bergson index {root} was projected with {projection}, {roots[0]} with {projections}")
        bad = ~torch.isfinite(rows)
        if bool(bad.any()):
            row, column = (int(x) for x in bad.nonzero()[0])
            raise InputError(f"bergson index {root}: gradient values are not finite, the first at row {row}, "
                             f"column {column}; nothing was written")
        blocks.append(rows)
    trajectory = torch.stack(blocks, dim=1)
    if example_ids is not None and len(example_ids) != trajectory.shape[0]:
        raise InputError(f"example_ids: {len(example_ids)} ids for the {trajectory.shape[0]} rows of the indexes")
    weights = normalized_checkpoint_weights(checkpoint_weights, len(roots))
    return write_trajectory_store(trajectory.numpy(), out, example_ids, weights, shard_size, {
        "source": "bergson", "bergson_indexes": [str(r.resolve()) for r in roots],
        "checkpoints": [r.name for r in roots], "modules": modules, "normalisation": "none",
        "projection": projections,
    })
