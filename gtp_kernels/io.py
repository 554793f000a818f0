"""Reading candidate/target arrays and writing selections, atomically.

Readers accept .npy (memory-mapped), .pt (a tensor, or a dict holding exactly one tensor)
and .safetensors (one tensor, or ``FILE:KEY``). Writers put each file in place with a
temp-file + ``os.replace`` so a crash never leaves a half-written output.
"""
from __future__ import annotations

import functools
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
            if key is not None:
                raise InputError(f"{name}: {path} is a .npy file, which holds one array and has no keys; "
                                 f"drop ':{key}'")
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
            elif key is not None:
                raise InputError(f"{name}: {path} holds a single {type(obj).__name__}, not a dict of tensors; "
                                 f"drop ':{key}'")
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


@functools.lru_cache(maxsize=None)
def _umask() -> int:
    """The process umask, read once: from /proc where it is shown (no change to process state),
    else by setting and restoring it (before any file of ours is written)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file."""
    return 0o666 & ~_umask()


def _stage_bytes(path: Path, data: bytes) -> str:
    """Write data to a temp file next to path (mode as a plain open() gives), fsync; return its name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        f = os.fdopen(fd, "wb")  # owns (and closes) fd from here, whatever fails next
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    try:
        with f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), _new_file_mode())  # mkstemp makes 0600; outputs are ordinary files
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write_bytes(path: os.PathLike, data: bytes) -> None:
    """Write bytes to path via a temp file in the same folder and an atomic rename."""
    atomic_write_files({Path(path): data})


def atomic_write_text(path: os.PathLike, text: str) -> None:
    """Write text to path via a temp file in the same folder and an atomic rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_files(files: Dict[os.PathLike, bytes], remove: Iterable[os.PathLike] = ()) -> None:
    """Write several files as one step: every temp file first, then the renames, back to back.

    ``remove`` lists files to delete once every temp file is written (stale outputs), just
    before the renames. If staging any file fails, no output is touched and every temp file is
    removed. (Each rename is atomic; only a crash between them can leave a mix.)
    """
    staged = []
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            staged.append((_stage_bytes(path, data), path))
        for path in remove:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        while staged:
            tmp, path = staged[0]
            os.replace(tmp, path)
            staged.pop(0)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def check_output_file(path: os.PathLike, what: str) -> Path:
    """Refuse, before any work, an output file path that cannot be written.

    Checks that the path is not a folder (or other non-file), and that its nearest existing
    ancestor is a writable folder. Creates nothing.
    """
    p = Path(path)
    if p.exists() and not p.is_file():
        raise InputError(f"{what} {p} exists and is not a file")
    _check_writable_folder(p.parent, what, p)
    return p


def check_output_folder(path: os.PathLike, what: str, files: Sequence[str] = ()) -> Path:
    """Refuse, before any work, an output folder that cannot hold ``files``. Creates nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{what} {p} exists and is not a folder")
    _check_writable_folder(p, what, p)
    for name in files:
        f = p / name
        if f.exists() and not f.is_file():
            raise InputError(f"{what}: {f} exists and is not a file (it would be overwritten)")
    return p


def _check_writable_folder(folder: Path, what: str, shown: Path) -> None:
    probe = folder
    while not probe.exists():
        if probe.is_symlink():
            raise InputError(f"{what} {shown}: {probe} is a broken symbolic link")
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if not probe.is_dir():
        raise InputError(f"{what} {shown}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{what} {shown}: no permission to write in {probe}")


def jsonl(records: Iterable[Dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def render_selection(selection, ids: Optional[Sequence[Any]] = None,
                     examples: Optional[Sequence[Any]] = None) -> Dict[str, str]:
    """The text of ``selection.jsonl`` and ``summary.json``, by file name."""
    records = selection.records(ids)
    if examples is not None:
        for rec in records:
            rec["example"] = examples[rec["index"]]
    return {"selection.jsonl": jsonl(records),
            "summary.json": json.dumps(selection.summary(), indent=2) + "\n"}


def write_selection(out_dir: os.PathLike, selection, ids: Optional[Sequence[Any]] = None,
                    examples: Optional[Sequence[Any]] = None) -> Dict[str, Path]:
    """Write ``selection.jsonl`` (rank, index, weight[, id, example]) and ``summary.json``.

    Each file is complete or absent: both are rendered in memory and staged as temp files
    first, then renamed into place together. Returns the paths written.
    """
    out = Path(out_dir)
    texts = render_selection(selection, ids, examples)
    paths = {"selection": out / "selection.jsonl", "summary": out / "summary.json"}
    atomic_write_files({paths["selection"]: texts["selection.jsonl"].encode("utf-8"),
                        paths["summary"]: texts["summary.json"].encode("utf-8")})
    return paths
