"""Input array files and output folders.

Readers accept .npy (memory-mapped), .pt (a tensor, or a dict holding exactly one tensor)
and .safetensors (one tensor, or ``FILE:KEY``). Output paths are checked before any work
starts, and a selection's output folder is written whole or not at all (write_output_folder:
staged beside it, renamed into place once). Single files are written with gtp_kernels.atomic.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np
import torch

from .atomic import fsync_folder, host_tag, process_alive
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


SELECTION_FILES = ("selection.jsonl", "summary.json")
EXAMPLES_FILE = "selected.jsonl"
OUTPUT_FILES = SELECTION_FILES + (EXAMPLES_FILE,)  # what an output folder of a selection may hold


def render_selection(selection, ids: Optional[Sequence[Any]] = None,
                     examples: Optional[Sequence[Any]] = None,
                     extra_summary: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """The text of ``selection.jsonl`` and ``summary.json``, by file name (``extra_summary``'s
    keys are added to the summary: inputs, version, command line)."""
    records = selection.records(ids)
    if examples is not None:
        for rec in records:
            rec["example"] = examples[rec["index"]]
    summary = selection.summary()
    summary.update(extra_summary or {})
    return {"selection.jsonl": jsonl(records),
            "summary.json": json.dumps(summary, indent=2) + "\n"}


# --- output folders written whole: staged as a sibling, renamed into place once ---
#
# OUT is written as PARENT/.OUT.tmp-<host>-<pid>/ (every file written and fsync'ed), then renamed
# to OUT. Replacing an existing OUT moves it aside to PARENT/.OUT.old-<host>-<pid>/ first and
# removes it after. A crash leaves OUT as it was, or the new OUT, or (between the two renames of
# a replacement) no OUT beside the complete old and new folders: never a mix of runs. Staging
# folders of processes that are gone (same host, dead pid) or older than a day are removed by
# the next write to the same OUT.

_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)$")
STALE_STAGING_SECONDS = 24 * 3600
# temp files an earlier, file-by-file writer left inside an output folder (atomic_write_files)
_OLD_TEMP = re.compile(r"^\.(?:" + "|".join(re.escape(n) for n in OUTPUT_FILES) + r")\..+\.tmp$")


def _staging_path(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{host_tag()}-{os.getpid()}"


def clean_stale_staging(out: os.PathLike) -> list:
    """Remove the staging folders of earlier writes of ``out`` whose writer is gone (this host,
    dead pid) or that are older than STALE_STAGING_SECONDS; returns the paths removed."""
    out = Path(os.path.abspath(out))
    removed = []
    if not out.parent.is_dir():
        return removed
    host = host_tag()
    for entry in out.parent.iterdir():
        match = _STAGING.match(entry.name)
        if match is None or match["name"] != out.name:
            continue
        try:
            age = time.time() - entry.lstat().st_mtime
        except FileNotFoundError:
            continue
        dead = match["host"] == host and not process_alive(int(match["pid"]))
        if dead or age > STALE_STAGING_SECONDS:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
            removed.append(entry)
    return removed


def check_replaceable_folder(out: os.PathLike, what: str, force: bool,
                             owned: Sequence[str] = OUTPUT_FILES) -> Path:
    """Refuse, before any work, an output folder that may not be (re)written whole: one that
    exists and is not a folder, a non-empty folder without ``force``, or (with ``force``) one
    holding anything but the files ``owned`` names; or one whose parent cannot take the staging
    folder. Creates nothing."""
    p = Path(os.path.abspath(out))
    if not p.name:
        raise InputError(f"{what} {out}: choose a folder to create, not the file system root")
    if p.is_symlink():
        raise InputError(f"{what} {out} is a symbolic link; pass the folder it points to")
    if p.exists() and not p.is_dir():
        raise InputError(f"{what} {out} exists and is not a folder")
    _check_writable_folder(p.parent, what, Path(out))
    if p.is_dir():
        entries = sorted(e.name for e in p.iterdir())
        if entries and not force:
            raise InputError(f"{what} {out} is not empty ({', '.join(entries[:3])}"
                             f"{', ...' if len(entries) > 3 else ''}); pass --force to replace it, or choose a new folder")
        foreign = [name for name in entries
                   if not ((name in owned and (p / name).is_file() and not (p / name).is_symlink())
                           or _OLD_TEMP.match(name))]
        if foreign:
            raise InputError(f"{what} {out} holds {foreign[0]!r}, which is not a selection output; --force only "
                             f"replaces a folder of {', '.join(owned)}: choose another folder")
    return p


def write_output_folder(out: os.PathLike, files: Dict[str, bytes], *, force: bool = False,
                        owned: Sequence[str] = OUTPUT_FILES) -> Path:
    """Write ``files`` (name -> bytes) as the folder ``out``, all of them at once.

    Every file is written and fsync'ed in a staging folder beside ``out``, which is then renamed
    to ``out`` in one step (see above). An existing non-empty ``out`` is refused unless
    ``force``, and then must hold only ``owned`` files (check_replaceable_folder); it is moved
    aside, the new folder renamed in, and the old one removed. Files get the mode a plain
    ``open()`` gives. Returns ``out``.
    """
    target = check_replaceable_folder(out, "output folder", force, owned)
    clean_stale_staging(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = _staging_path(target, "tmp")
    if stage.exists():  # our own pid's leftover (an earlier failed call in this process)
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        for name, data in files.items():
            if Path(name).name != name or name.startswith("."):
                raise ValueError(f"output file names must be plain names, got {name!r}")
            with open(stage / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        fsync_folder(stage)
        _put_in_place(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    fsync_folder(target.parent)
    return target


def _put_in_place(stage: Path, target: Path) -> None:
    """Rename the complete staging folder to target, moving a non-empty target aside first."""
    if target.is_dir() and any(target.iterdir()):
        old = _staging_path(target, "old")
        if old.exists():
            shutil.rmtree(old)
        os.rename(target, old)
        try:
            os.rename(stage, target)
        except BaseException:
            os.rename(old, target)  # put the previous output back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, target)  # absent, or an empty folder: one rename
