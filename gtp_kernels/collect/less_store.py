"""Read the projected-gradient folders LESS (princeton-nlp/LESS) writes, to select without recomputing.

LESS's ``collect_grad_reps`` writes, for one checkpoint and one data file::

    <run>-ckpt<step>-<adam|sgd>/dim<d>/grads-<count>.pt     fp32 (n, d) shards, every 160 examples
                                      /all_orig.pt            all rows, each L2-normalised
                                      /all_unormalized.pt     all rows as projected

:func:`read_less_gradients` accepts a ``dim<d>`` folder, a checkpoint folder holding ``dim*``
folders, or a parent holding several checkpoint folders (ordered by the number after ``ckpt``,
else by name), and returns the (N, T, d) trajectory. LESS projects every checkpoint with one
shared matrix (seed 0) and does not record learning rates: pass LESS's checkpoint weights (the
average learning rate of each epoch, renormalised) to :func:`less_to_store` or the selection.
"""
from __future__ import annotations

import math
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..validation import (InputError, InputTypeError, check_bool, check_int, check_real_vector,
                          refused_pickle_reason)
from .store import StoreSpec, TrajectoryStore, TrajectoryStoreWriter

_DIM = re.compile(r"^dim(\d+)$")
_SHARD = re.compile(r"^grads-(\d+)\.pt$")
_CKPT = re.compile(r"ckpt[-_]?(\d+)")


@dataclass
class LessGradients:
    """A LESS gradient trajectory: (N, T, d) float32 rows plus where each checkpoint came from.

    It is a :class:`~.store_selection.StoreReader` (select from it with
    :func:`~.store_selection.select_from_stores`): ``example_ids`` default to the row numbers,
    ``weights`` (w_t, recorded, never built into the rows) to equal weights.
    """

    trajectory: torch.Tensor
    checkpoint_names: list[str]
    files: list[list[str]]
    normalized: bool
    path: Path = Path(".")
    example_ids: list[str] | None = None
    weights: list[float] | None = None

    @property
    def n(self) -> int:
        return int(self.trajectory.shape[0])

    @property
    def t(self) -> int:
        return int(self.trajectory.shape[1])

    @property
    def d(self) -> int:
        return int(self.trajectory.shape[2])

    @property
    def ids(self) -> list[str]:
        return list(self.example_ids) if self.example_ids is not None else [str(i) for i in range(self.n)]

    @property
    def checkpoint_weights(self) -> list[float]:
        return normalized_checkpoint_weights(self.weights, self.t)

    weights_applied = property(lambda self: False)
    complete = property(lambda self: True)

    @property
    def metadata(self) -> dict:
        """As :func:`less_to_store` records it (LESS projects every checkpoint with one shared matrix)."""
        return {"source": "LESS", "less_folder": str(self.path), "checkpoints": list(self.checkpoint_names),
                "normalisation": "unit" if self.normalized else "none", "checkpoint_weights": self.checkpoint_weights,
                "weights_applied": False,
                "projection": {"kind": "rademacher", "seed_mode": "shared", "library": "TRAK fast_jl"}}

    def rows_source(self):
        """The rows (N, T*d) as a RowSource over the trajectory (no copy)."""
        from ..selection.rows import RowSource

        return RowSource([self.trajectory])

    def mean(self) -> np.ndarray:
        """The mean row (T*d,), accumulated in float64, returned float32."""
        return self.trajectory.reshape(self.n, -1).double().mean(0).float().numpy()

    def iter_shards(self):
        """One shard: (0, N, the (N, T, d) rows as NumPy)."""
        yield 0, self.n, self.trajectory.numpy()


def dim_folder(checkpoint: Path, d: int | None) -> Path:
    if _DIM.match(checkpoint.name):
        return checkpoint
    dims = sorted((int(_DIM.match(p.name).group(1)), p) for p in checkpoint.iterdir() if p.is_dir() and _DIM.match(p.name))
    if not dims:
        raise InputError(f"LESS folder {checkpoint}: no dim<d> sub-folder")
    if d is None:
        if len(dims) > 1:
            raise InputError(f"LESS folder {checkpoint}: several projections {[n for n, _ in dims]}; pass d")
        return dims[0][1]
    for size, folder in dims:
        if size == d:
            return folder
    raise InputError(f"LESS folder {checkpoint}: no dim{d} (has {[n for n, _ in dims]})")


def load_rows(path: Path) -> torch.Tensor:
    try:
        rows = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refused it: nothing of it ran
        raise InputError(f"LESS file {path}: refused, it holds pickled Python objects besides tensors, which are "
                         f"not loaded ({refused_pickle_reason(error)})") from None
    except OSError as error:
        raise InputError(f"LESS file {path}: cannot read it ({error.strerror or error})") from None
    except Exception as error:  # truncated or not a torch file: torch raises RuntimeError, EOFError, ...
        raise InputError(f"LESS file {path}: not a readable torch tensor file ({type(error).__name__}: "
                         f"{_first_line(error)})") from None
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
        raise InputError(f"LESS file {path}: expected a 2-D tensor, got {type(rows).__name__} {getattr(rows, 'shape', '')}")
    if not rows.is_floating_point():
        raise InputError(f"LESS file {path}: expected floating-point gradients, got {rows.dtype}")
    return rows.float()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _check_arguments(folder, d, normalized) -> Path:
    """read_less_gradients' arguments, as InputError(TypeError) before any file is read."""
    if not isinstance(folder, (str, os.PathLike)):
        raise InputTypeError(f"folder must be a path, got {folder!r}")
    if d is not None:
        check_int(d, "d", low=1)
    check_bool(normalized, "normalized")
    return Path(folder)


def read_dim_folder(folder: Path, normalized: bool) -> tuple[torch.Tensor, list[str]]:
    merged = folder / ("all_orig.pt" if normalized else "all_unormalized.pt")
    if merged.is_file():
        return load_rows(merged), [str(merged)]
    shards = sorted((int(_SHARD.match(p.name).group(1)), p) for p in folder.iterdir() if _SHARD.match(p.name))
    if not shards:
        raise InputError(f"LESS folder {folder}: neither {merged.name} nor grads-*.pt shards")
    rows = torch.cat([load_rows(p) for _, p in shards])
    if normalized:  # what LESS's merge_and_normalize_info does to each shard
        rows = torch.nn.functional.normalize(rows, dim=1)
    return rows, [str(p) for _, p in shards]


def _checkpoint_folders(folder: Path, d: int | None) -> list[Path]:
    if _DIM.match(folder.name) or any(_DIM.match(p.name) for p in folder.iterdir() if p.is_dir()):
        return [folder]
    children = [p for p in folder.iterdir() if p.is_dir() and any(_DIM.match(q.name) for q in p.iterdir() if q.is_dir())]
    if not children:
        raise InputError(f"LESS folder {folder}: no dim<d> folder in it or in its sub-folders")

    def order(p: Path) -> tuple[int, str]:
        match = _CKPT.search(p.name)
        return (int(match.group(1)) if match else -1, p.name)

    return sorted(children, key=order)


def read_less_gradients(folder: str | os.PathLike, d: int | None = None, normalized: bool = True) -> LessGradients:
    """Read one LESS checkpoint folder, or a folder of them, into an (N, T, d) trajectory.

    ``normalized=True`` reads ``all_orig.pt`` (L2-normalised rows, what LESS matches with),
    ``False`` reads ``all_unormalized.pt``; without the merged file the ``grads-*.pt`` shards
    are concatenated in count order (and normalised when asked).
    """
    root = _check_arguments(folder, d, normalized)
    if not root.is_dir():
        raise InputError(f"LESS folder {root} does not exist")
    blocks, names, files = [], [], []
    for checkpoint in _checkpoint_folders(root, d):
        rows, sources = read_dim_folder(dim_folder(checkpoint, d), normalized)
        blocks.append(rows)
        names.append(checkpoint.name)
        files.append(sources)
    sizes = {tuple(b.shape) for b in blocks}
    if len(sizes) != 1:
        raise InputError(f"LESS folder {root}: checkpoints disagree on (N, d): {dict(zip(names, [tuple(b.shape) for b in blocks]))}")
    return LessGradients(torch.stack(blocks, dim=1), names, files, normalized, path=root)


def less_to_store(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    d: int | None = None,
    normalized: bool = True,
    checkpoint_weights: Sequence[float] | None = None,
    example_ids: Sequence[str] | None = None,
    shard_size: int = 65536,
) -> TrajectoryStore:
    """Convert a LESS gradient folder into a trajectory store (weights recorded, not applied).

    Every input is checked (finite values, ids, weights, shard_size) before anything is
    created; bad input raises :class:`InputError`. If writing fails midway, the folders this
    call created are removed again (an ``out`` that existed before, e.g. a store being resumed,
    is left as it is).
    """
    _check_arguments(folder, d, normalized)
    if not isinstance(out, (str, os.PathLike)):
        raise InputTypeError(f"out must be a path, got {out!r}")
    shard_size = check_int(shard_size, "shard_size", low=1)
    if checkpoint_weights is not None:
        weights_given = check_real_vector(checkpoint_weights, "checkpoint_weights")
        if weights_given.ndim != 1:
            raise InputError(f"checkpoint_weights must be one weight per checkpoint, got shape {weights_given.shape}")
        checkpoint_weights = weights_given.tolist()
    if example_ids is not None and (isinstance(example_ids, (str, bytes)) or not hasattr(example_ids, "__len__")):
        raise InputTypeError(f"example_ids must be a sequence of ids, got {type(example_ids).__name__}")
    less = read_less_gradients(folder, d=d, normalized=normalized)
    n, t, dim = less.trajectory.shape
    for first in range(0, n, 65536):  # in row blocks: no full-size boolean mask
        bad = ~torch.isfinite(less.trajectory[first : first + 65536])
        if bool(bad.any()):
            row, checkpoint, column = (int(x) for x in bad.nonzero()[0])
            raise InputError(f"LESS folder {folder}: gradient values are not finite (NaN/Inf), the first at row {first + row}, "
                             f"column {column} of checkpoint {less.checkpoint_names[checkpoint]} ({less.files[checkpoint][0]}); "
                             "nothing was written")
    if example_ids is not None and len(example_ids) != n:
        raise InputError(f"example_ids: {len(example_ids)} ids for the {n} rows in {folder}")
    weights = normalized_checkpoint_weights(checkpoint_weights, t)
    return write_trajectory_store(less.trajectory.numpy(), out, example_ids, weights, shard_size, {
        "source": "LESS", "less_folder": str(Path(folder).resolve()), "checkpoints": less.checkpoint_names,
        "normalisation": "unit" if normalized else "none",
        "projection": {"kind": "rademacher", "seed_mode": "shared", "library": "TRAK fast_jl"},
    })


def normalized_checkpoint_weights(checkpoint_weights: Sequence[float] | None, t: int) -> list[float]:
    """The T checkpoint weights scaled to sum 1 (equal weights for None), after checks."""
    if checkpoint_weights is None:
        return [1.0 / t] * t
    if len(checkpoint_weights) != t:
        raise InputError(f"checkpoint_weights: {len(checkpoint_weights)} weights for {t} checkpoints")
    total = float(sum(checkpoint_weights))
    if not math.isfinite(total) or total <= 0 or any(not w >= 0 for w in checkpoint_weights):
        raise InputError("checkpoint_weights must be non-negative with a positive sum")
    return [float(w) / total for w in checkpoint_weights]


def write_trajectory_store(trajectory: np.ndarray, out: str | os.PathLike, example_ids: Sequence[str] | None,
                           checkpoint_weights: list[float], shard_size: int, metadata: dict) -> TrajectoryStore:
    """Write an (N, T, d) float32 trajectory as a store (weights recorded, not applied): what converters share.

    Checks shard_size and the ids before anything is created; if writing fails midway, the
    folders this call created are removed again (an ``out`` that existed before is left as it is).
    """
    n, t, dim = trajectory.shape
    shard_size = check_int(shard_size, "shard_size", low=1)
    ids = [str(i) for i in (example_ids if example_ids is not None else range(n))]
    if len(set(ids)) != n:
        raise InputError(f"example_ids must be unique ({n - len(set(ids))} duplicate(s))")
    try:
        spec = StoreSpec(n=n, t=t, d=dim, example_ids=ids, dtype="float32", shard_size=shard_size, metadata={
            **metadata, "checkpoint_weights": checkpoint_weights, "weights_applied": False})
    except ValueError as error:
        raise InputError(str(error)) from None
    created = _first_missing(Path(out))
    try:
        writer = TrajectoryStoreWriter(out, spec, resume=True)
        for index in writer.missing_shards():
            start, stop = spec.shard_rows(index)
            writer.write_shard(index, np.ascontiguousarray(trajectory[start:stop], dtype=np.float32))
        return writer.finish()
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet (what creating it makes)."""
    path = path.absolute()
    created = None
    while not path.exists() and path != path.parent:
        created, path = path, path.parent
    return created
