"""Reading candidate/target arrays and writing selections, atomically.

Readers accept .npy (memory-mapped), .pt (a tensor, or a dict holding exactly one tensor)
and .safetensors (one tensor, or ``FILE:KEY``). Writers put each file in place with a
temp-file + ``os.replace`` so a crash never leaves a half-written output.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np
import torch

from .validation import InputError

ARRAY_SUFFIXES = (".npy", ".pt", ".pth", ".safetensors")


def _split_key(spec: str) -> tuple:
    # "file.safetensors:key" selects one tensor of several; a plain path has no key.
    path, sep, key = spec.rpartition(":")
    if sep and path and Path(path).suffix in ARRAY_SUFFIXES and not Path(spec).exists():
        return path, key
    return spec, None


def _only_tensor(mapping: Dict[str, Any], path: str, key: Optional[str]) -> Any:
    if key is not None:
        if key not in mapping:
            raise InputError(f"{path} has no tensor {key!r} (has: {', '.join(map(str, mapping))})")
        return mapping[key]
    if len(mapping) != 1:
        raise InputError(f"{path} holds {len(mapping)} tensors ({', '.join(map(str, mapping))}); "
                         f"name one as {path}:KEY")
    return next(iter(mapping.values()))


def load_array(spec: str, name: str = "array") -> torch.Tensor:
    """Load one float array from .npy / .pt / .safetensors (``FILE:KEY`` picks a tensor)."""
    path, key = _split_key(str(spec))
    p = Path(path)
    if not p.exists():
        raise InputError(f"{name} file not found: {path}")
    if p.is_dir():
        raise InputError(f"{name} path is a folder, expected a .npy/.pt/.safetensors file: {path}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
            if arr.dtype.kind != "f":
                raise InputError(f"{name} ({path}) holds {arr.dtype}, expected floating point")
            with warnings.catch_warnings():
                # Read-only memory map: gtp_kernels never writes to its inputs.
                warnings.simplefilter("ignore", UserWarning)
                out = torch.from_numpy(arr)
        elif suffix in (".pt", ".pth"):
            obj = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                obj = _only_tensor(obj, path, key)
            if not isinstance(obj, torch.Tensor):
                raise InputError(f"{name} ({path}) does not hold a tensor")
            out = obj
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            out = _only_tensor(load_file(str(p)), path, key)
        else:
            raise InputError(f"{name}: unsupported file type {suffix!r} (use .npy, .pt or .safetensors)")
    except InputError:
        raise
    except Exception as exc:  # corrupt or truncated files surface here
        raise InputError(f"cannot read {name} from {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    return out


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: os.PathLike, text: str) -> None:
    """Write text to path via a temp file in the same folder and an atomic rename."""
    _atomic_write_bytes(Path(path), text.encode("utf-8"))


def jsonl(records: Iterable[Dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_selection(out_dir: os.PathLike, selection, ids: Optional[Sequence[Any]] = None,
                    examples: Optional[Sequence[Any]] = None) -> Dict[str, Path]:
    """Write ``selection.jsonl`` (rank, index, weight[, id, example]) and ``summary.json``.

    Each file is complete or absent: both are rendered in memory first, then renamed into
    place. Returns the paths written.
    """
    out = Path(out_dir)
    records = selection.records(ids)
    if examples is not None:
        for rec in records:
            rec["example"] = examples[rec["index"]]
    summary = selection.summary()
    lines = jsonl(records)
    summary_text = json.dumps(summary, indent=2) + "\n"
    paths = {"selection": out / "selection.jsonl", "summary": out / "summary.json"}
    atomic_write_text(paths["selection"], lines)
    atomic_write_text(paths["summary"], summary_text)
    return paths
