"""The trajectory store: projected per-example gradients (N, T, d) on disk, memory-mappable.

Layout of a store folder::

    STORE/
      manifest.json          what the arrays are (below); rewritten atomically after each shard
      shard-00000.npy        rows [0, shard_size) as a (rows, T, d) array (NumPy .npy, C order)
      shard-00001.npy        rows [shard_size, 2*shard_size) ...

``manifest.json`` (format "gtp-trajectory", version 1)::

    format, version       "gtp-trajectory", 1
    N, T, d, dtype        rows, checkpoints, projected dims per checkpoint, "float32"|"float16"
    shard_size            rows per shard (the last shard may be shorter); shard i holds rows
                          [i*shard_size, min(N, (i+1)*shard_size))
    example_ids           N strings, row order
    shards                [{"index", "file", "start", "stop", "bytes", "sha256"}] for shards written
    complete              true once every shard is written
    metadata              how the numbers were made: model, task, checkpoints (paths/names),
                          learning_rates, checkpoint_weights (w_t, sum 1), weights_applied and
                          block_scales (c_t = sqrt(w_t) when applied), gradient_type ("adam"|"sgd"),
                          projection {"kind", "seed", "seeds" (one per checkpoint), "seed_mode"},
                          normalisation ("none"|"unit": each (example, checkpoint) block L2-normalised
                          before c_t), max_length, data source ...

Row i of ``candidates()`` is a_i = concat_t(block_t) in R^{T*d}; when ``weights_applied`` the
blocks already carry c_t = sqrt(w_t), so <a_i, a_j> = sum_t w_t <.,.> and a selection must not
weight them again (:attr:`TrajectoryStore.selection_checkpoint_weights` is then None).

Several processes may fill disjoint shards of one store at once (``collect_trajectory(shards=...)``):
manifest updates merge under an exclusive lock on ``STORE/.lock``.

Crash safety: a shard is written to ``.shard-XXXXX.npy.tmp``, flushed, fsync'ed, then
``os.replace``d into place; only then is the manifest (also temp file + ``os.replace``) updated
to list it. A killed collection therefore leaves only listed, complete shards (plus perhaps a
stray temp file, removed on resume), and resuming recomputes exactly the unlisted shards.
Shards are computed independently and deterministically, so a resumed store equals an
uninterrupted one bit for bit. :func:`open_store` checks the manifest against the files
(existence, byte size, .npy header shape and dtype, row counts; sha256 with
``verify="sha256"``) and raises :class:`StoreError` naming the first problem.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

FORMAT_NAME = "gtp-trajectory"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STORE_DTYPES = ("float32", "float16")


class StoreError(ValueError):
    """A store folder that is missing, corrupt, incomplete or does not match what was asked."""


@dataclass
class StoreSpec:
    """What a store will hold; a resumed collection must ask for exactly the same spec."""

    n: int
    t: int
    d: int
    example_ids: list[str]
    dtype: str = "float32"
    shard_size: int = 4096
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("n", "t", "d", "shard_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"dtype must be one of {STORE_DTYPES}, got {self.dtype!r}")
        self.example_ids = [str(i) for i in self.example_ids]
        if len(self.example_ids) != self.n:
            raise ValueError(f"example_ids: {len(self.example_ids)} ids for n={self.n} rows")
        if len(set(self.example_ids)) != self.n:
            raise ValueError("example_ids must be unique")
        # Round-trip through JSON so a comparison with a manifest read back is like for like.
        self.metadata = json.loads(json.dumps(self.metadata))

    @property
    def n_shards(self) -> int:
        return -(-self.n // self.shard_size)

    def shard_rows(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.n_shards:
            raise IndexError(f"shard index {index} out of range [0, {self.n_shards})")
        start = index * self.shard_size
        return start, min(self.n, start + self.shard_size)

    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "N": self.n, "T": self.t, "d": self.d,
            "dtype": self.dtype, "shard_size": self.shard_size, "example_ids": self.example_ids,
            "metadata": self.metadata,
        }


def _shard_file(index: int) -> str:
    return f"shard-{index:05d}.npy"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable where the platform allows
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


@contextlib.contextmanager
def _manifest_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on STORE/.lock (POSIX); a no-op where fcntl is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: single-writer only
        yield
        return
    with open(path / ".lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise StoreError(f"store {path}: no {MANIFEST} (not a trajectory store, or never started)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise StoreError(f"store {path}: {MANIFEST} is not valid JSON ({error.msg})") from None
    if manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"store {path}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise StoreError(f"store {path}: format version {manifest.get('version')!r} is not supported (expected {FORMAT_VERSION})")
    for key in ("N", "T", "d", "dtype", "shard_size", "example_ids", "shards", "complete", "metadata"):
        if key not in manifest:
            raise StoreError(f"store {path}: {MANIFEST} lacks {key!r}")
    return manifest


class TrajectoryStoreWriter:
    """Create a store, or reopen one with the same spec to fill its missing shards."""

    def __init__(self, path: str | os.PathLike, spec: StoreSpec, resume: bool = True):
        self.path = Path(path)
        self.spec = spec
        if (self.path / MANIFEST).exists():
            if not resume:
                raise StoreError(f"store {self.path} already exists (pass resume=True to continue it, or choose a new folder)")
            manifest = _read_manifest(self.path)
            wanted = spec.header()
            for key, value in wanted.items():
                if manifest.get(key) != value:
                    raise StoreError(
                        f"store {self.path}: cannot resume, its {key!r} differs from this collection's "
                        f"({_short(manifest.get(key))} vs {_short(value)})"
                    )
            self.manifest = manifest
            for stray in self.path.glob(".*.tmp"):
                stray.unlink()
            # Forget listed shards whose file went missing or changed size: they are recomputed.
            kept = []
            for shard in manifest["shards"]:
                file = self.path / shard["file"]
                if file.is_file() and file.stat().st_size == shard["bytes"]:
                    kept.append(shard)
            self.manifest["shards"] = kept
            self.manifest["complete"] = len(kept) == spec.n_shards
        else:
            if self.path.exists() and any(self.path.glob("shard-*.npy")):
                raise StoreError(f"store {self.path}: holds shard files but no {MANIFEST} (not a store this code wrote)")
            self.path.mkdir(parents=True, exist_ok=True)
            self.manifest = {**spec.header(), "shards": [], "complete": False}
            self._save_manifest()

    def _save_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=1).encode("utf-8")
        _write_atomically(self.path / MANIFEST, lambda handle: handle.write(text))

    def missing_shards(self) -> list[int]:
        done = {shard["index"] for shard in self.manifest["shards"]}
        return [index for index in range(self.spec.n_shards) if index not in done]

    def write_shard(self, index: int, rows: np.ndarray) -> None:
        """Write shard ``index`` (rows, T, d) atomically, then list it in the manifest."""
        start, stop = self.spec.shard_rows(index)
        expected = (stop - start, self.spec.t, self.spec.d)
        if tuple(rows.shape) != expected:
            raise ValueError(f"shard {index}: shape {tuple(rows.shape)}, expected {expected}")
        array = np.ascontiguousarray(rows, dtype=self.spec.dtype)
        if not np.isfinite(array).all():
            raise ValueError(f"shard {index}: contains NaN or Inf (rows {start}..{stop})")
        file = self.path / _shard_file(index)
        _write_atomically(file, lambda handle: np.save(handle, array, allow_pickle=False))
        entry = {"index": index, "file": file.name, "start": start, "stop": stop,
                 "bytes": file.stat().st_size, "sha256": _sha256(file)}
        with _manifest_lock(self.path):
            # Other processes may be filling other shards of this store (``shards=`` splits):
            # merge what the manifest on disk lists now, under an exclusive lock.
            on_disk = _read_manifest(self.path)["shards"]
            merged = {s["index"]: s for s in self.manifest["shards"] + on_disk if s["index"] != index}
            merged[index] = entry
            self.manifest["shards"] = [merged[i] for i in sorted(merged)]
            self.manifest["complete"] = len(self.manifest["shards"]) == self.spec.n_shards
            self._save_manifest()

    def finish(self) -> "TrajectoryStore":
        missing = self.missing_shards()
        if missing:
            raise StoreError(f"store {self.path}: {len(missing)} shard(s) still missing (first: {missing[0]})")
        return open_store(self.path)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


class TrajectoryStore:
    """A validated, read-only store. Arrays are memory-mapped; nothing is loaded until asked."""

    def __init__(self, path: Path, manifest: dict[str, Any], shards: list[np.ndarray]):
        self.path = path
        self.manifest = manifest
        self._shards = shards

    n = property(lambda self: int(self.manifest["N"]))
    t = property(lambda self: int(self.manifest["T"]))
    d = property(lambda self: int(self.manifest["d"]))
    dtype = property(lambda self: np.dtype(self.manifest["dtype"]))
    metadata = property(lambda self: self.manifest["metadata"])

    @property
    def ids(self) -> list[str]:
        return list(self.manifest["example_ids"])

    @property
    def checkpoint_weights(self) -> list[float]:
        """w_t (sum 1), one per checkpoint; uniform when the manifest names none."""
        weights = self.metadata.get("checkpoint_weights")
        return [float(w) for w in weights] if weights else [1.0 / self.t] * self.t

    @property
    def weights_applied(self) -> bool:
        return bool(self.metadata.get("weights_applied", False))

    @property
    def selection_checkpoint_weights(self) -> list[float] | None:
        """The weights a selection should still apply: None when the blocks already carry them."""
        return None if self.weights_applied else self.checkpoint_weights

    def __len__(self) -> int:
        return self.n

    def iter_shards(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(start, stop, memmap (rows, T, d)) per shard, for out-of-core passes."""
        for entry, array in zip(self.manifest["shards"], self._shards):
            yield entry["start"], entry["stop"], array

    def trajectory_view(self) -> np.ndarray:
        """(N, T, d): the memory map itself for a one-shard store, else a concatenation in memory."""
        if not self.manifest["complete"]:
            raise StoreError(f"store {self.path}: incomplete, only its written shards can be iterated (iter_shards)")
        if len(self._shards) == 1:
            return self._shards[0]
        return np.concatenate(self._shards, axis=0)

    def candidates(self, as_tensor: bool = False, dtype: Any = None) -> Any:
        """(N, T*d) rows a_i (checkpoint blocks side by side), as NumPy or a torch tensor."""
        matrix = self.trajectory_view().reshape(self.n, self.t * self.d)
        if dtype is not None:
            matrix = matrix.astype(dtype, copy=False)
        if as_tensor:
            import torch

            return torch.from_numpy(np.array(matrix, copy=True))
        return matrix

    def mean(self) -> np.ndarray:
        """Mean row (T*d,) computed shard by shard in float64, returned float32 (a target b)."""
        total = np.zeros(self.t * self.d, dtype=np.float64)
        for start, stop, array in self.iter_shards():
            total += array.reshape(stop - start, -1).sum(axis=0, dtype=np.float64)
        return (total / self.n).astype(np.float32)

    def rows(self, indices: Sequence[int]) -> np.ndarray:
        """Rows a_i (len(indices), T*d) gathered without loading the whole store."""
        out = np.empty((len(indices), self.t * self.d), dtype=self.dtype)
        size = int(self.manifest["shard_size"])
        for position, index in enumerate(indices):
            if not 0 <= index < self.n:
                raise IndexError(f"row {index} out of range [0, {self.n})")
            out[position] = self._shards[index // size][index % size].reshape(-1)
        return out


def is_store(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a trajectory-store manifest (cheap: no validation)."""
    return (Path(path) / MANIFEST).is_file()


def open_store(path: str | os.PathLike, verify: str = "size", allow_incomplete: bool = False) -> TrajectoryStore:
    """Open and validate a store.

    Args:
        verify: "size" (file sizes and .npy headers, fast), "sha256" (also every shard's
            checksum: reads all data once), or "none" (headers only).
        allow_incomplete: open a store whose collection has not finished (only its written
            shards are then iterable; ``candidates`` refuses).
    """
    if verify not in ("none", "size", "sha256"):
        raise ValueError(f"verify must be 'none', 'size' or 'sha256', got {verify!r}")
    root = Path(path)
    manifest = _read_manifest(root)
    n, t, d, dtype, shard_size = manifest["N"], manifest["T"], manifest["d"], manifest["dtype"], manifest["shard_size"]
    if dtype not in STORE_DTYPES:
        raise StoreError(f"store {root}: dtype {dtype!r} is not one of {STORE_DTYPES}")
    if len(manifest["example_ids"]) != n:
        raise StoreError(f"store {root}: {len(manifest['example_ids'])} example ids for N={n}")
    n_shards = -(-n // shard_size)
    if not manifest["complete"] and not allow_incomplete:
        raise StoreError(f"store {root}: incomplete ({len(manifest['shards'])}/{n_shards} shards); resume the collection")
    arrays = []
    listed = sorted(manifest["shards"], key=lambda s: s["index"])
    if manifest["complete"] and [s["index"] for s in listed] != list(range(n_shards)):
        raise StoreError(f"store {root}: marked complete but lists shards {[s['index'] for s in listed][:10]} of {n_shards}")
    for entry in listed:
        file = root / entry["file"]
        start, stop = entry["index"] * shard_size, min(n, (entry["index"] + 1) * shard_size)
        if (entry["start"], entry["stop"]) != (start, stop):
            raise StoreError(f"store {root}: shard {entry['index']} lists rows {entry['start']}..{entry['stop']}, expected {start}..{stop}")
        if not file.is_file():
            raise StoreError(f"store {root}: shard file {entry['file']} is missing")
        if verify != "none" and file.stat().st_size != entry["bytes"]:
            raise StoreError(f"store {root}: shard {entry['file']} has {file.stat().st_size} bytes, manifest says {entry['bytes']} (truncated or rewritten)")
        if verify == "sha256" and _sha256(file) != entry["sha256"]:
            raise StoreError(f"store {root}: shard {entry['file']} fails its sha256 check (corrupt)")
        try:
            array = np.load(file, mmap_mode="r", allow_pickle=False)
        except Exception as error:  # numpy raises several types for a broken header
            raise StoreError(f"store {root}: shard {entry['file']} is not a readable .npy file ({error})") from None
        if array.shape != (stop - start, t, d):
            raise StoreError(f"store {root}: shard {entry['file']} has shape {array.shape}, expected {(stop - start, t, d)}")
        if array.dtype != np.dtype(dtype):
            raise StoreError(f"store {root}: shard {entry['file']} has dtype {array.dtype}, manifest says {dtype}")
        arrays.append(array)
    return TrajectoryStore(root, manifest, arrays)
