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
    shards                [{"index", "file", "start", "stop", "bytes", "sha256", "header", "sample",
                          "input_sha256"}] for shards written: header is the .npy header (hex), sample
                          {"blocks", "block_bytes", "sha256"} a checksum of a fixed sample of the data
                          (see _shard_fingerprint), input_sha256 (optional) a digest of the examples the
                          rows were computed from; header, sample and input_sha256 are absent in stores
                          written before them
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
each writes its shard files, then merges its entry into the manifest under an exclusive lock on
``STORE/.lock``, re-reading the manifest inside the lock, so no writer loses another's entries.

Crash safety: a shard is written to a temp file ``.shard-XXXXX.npy.<host>.<pid>.<token>.tmp``,
flushed, fsync'ed, then ``os.replace``d into place; only then is the manifest (also temp file +
``os.replace``) updated to list it. A killed collection therefore leaves only listed, complete
shards (plus perhaps a stray temp file, removed by the next writer once provably stale: see
:func:`_remove_stale_temps`), and resuming recomputes exactly the unlisted shards.
Shards are computed independently and deterministically, so a resumed store equals an
uninterrupted one bit for bit. :func:`open_store` validates the manifest's schema (types, ranges,
lengths, N against shard_size and the shards listed) and checks it against the files (existence,
byte size, the whole .npy header and a sampled checksum by default; sha256 of every byte with
``verify="sha256"``); every problem is a :class:`StoreError` naming the store and the first
offending field or file. A writer resuming a store recomputes listed shards that fail the
default checks (with a RuntimeWarning), so a corrupt shard never carries into a complete store.

An incomplete store (``open_store(..., allow_incomplete=True)``) still describes all N rows
(``len``, ``n``, ``ids``); the row-level accessors (``rows``, ``iter_shards``) serve the written
shards and ``rows`` raises :class:`StoreError` for a row in an unwritten shard; the whole-store
accessors (``candidates``, ``trajectory_view``, ``mean``) refuse, since an answer over the written
rows alone would silently be a different store. ``complete``, ``written_shards``,
``missing_shards`` and ``n_written`` say what is there.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import operator
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

# absolute: tests load this file on its own, outside the package
from gtp_kernels.atomic import host_tag, process_alive, write_atomically

FORMAT_NAME = "gtp-trajectory"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STORE_DTYPES = ("float32", "float16")
# metadata entries that hold one value per checkpoint (checked to have length T when present)
PER_CHECKPOINT_METADATA = ("checkpoints", "learning_rates", "checkpoint_weights", "block_scales")
# a temp file untouched for this long is stale whoever wrote it (see _remove_stale_temps)
STALE_TEMP_SECONDS = 24 * 3600


class StoreError(ValueError):
    """A store folder that is missing, corrupt, incomplete or does not match what was asked."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
        # store.py is also loaded by path in a test (no package context): it imports only the leaf
        # module gtp_kernels.atomic, absolutely; validation (which imports selection) stays out
        for name in ("n", "t", "d", "shard_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
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


# --- the cheap per-shard fingerprint (verify="size") -----------------------------------------------
#
# Each shard entry records, besides its byte count and sha256, its whole .npy header (the bytes
# before the data: magic, version, the dict with descr, fortran_order and shape, padding) and a
# sha256 of a fixed sample of its data: SAMPLE_BLOCKS blocks of SAMPLE_BLOCK_BYTES at evenly spaced
# offsets (the first at the data's start, the last ending at the file's end); a shard whose data is
# at most SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES is hashed whole. Checking both reads ~256 KiB a shard.
# It catches any change to a header (fortran_order, shape, dtype), shards swapped or replaced by
# other data of the same size, and changes inside the sampled blocks; a change elsewhere in a large
# shard's data (a flipped byte) only the full sha256 sees.
SAMPLE_BLOCKS = 4
SAMPLE_BLOCK_BYTES = 1 << 16


def _npy_data_offset(head: bytes) -> int:
    """Where a .npy file's data starts, from its first bytes (format versions 1, 2 and 3);
    ValueError when they are not a .npy preamble."""
    if len(head) < 10 or head[:6] != b"\x93NUMPY":
        raise ValueError("no .npy magic string")
    major = head[6]
    if major == 1:
        return 10 + int.from_bytes(head[8:10], "little")
    if major in (2, 3) and len(head) >= 12:
        return 12 + int.from_bytes(head[8:12], "little")
    raise ValueError(f".npy format version {major}.{head[7]} is not known")


def _shard_fingerprint(path: Path, blocks: int = SAMPLE_BLOCKS, block_bytes: int = SAMPLE_BLOCK_BYTES) -> tuple[str, dict[str, Any]]:
    """(the .npy header as hex, {"blocks", "block_bytes", "sha256"} of the data sample): see above.
    ValueError for a file that is not a .npy file."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(12)
        offset = _npy_data_offset(head)
        if offset > size:
            raise ValueError("header longer than the file")
        handle.seek(0)
        header = handle.read(offset)
        data = size - offset
        digest = hashlib.sha256()
        if data <= blocks * block_bytes:
            spans = [(offset, data)]
        else:
            spans = [(offset + (data - block_bytes) * i // max(1, blocks - 1), block_bytes) for i in range(blocks)]
        for start, length in spans:
            handle.seek(start)
            digest.update(handle.read(length))
    return header.hex(), {"blocks": blocks, "block_bytes": block_bytes, "sha256": digest.hexdigest()}


def _check_fingerprint(root: Path, entry: dict[str, Any], entries: Sequence[dict[str, Any]]) -> str | None:
    """Why shard `entry`'s file does not match its recorded header or sample (None: it does, or
    the manifest predates them). `entries`: every listed shard, to name a swap."""
    if "header" not in entry and "sample" not in entry:
        return None  # a store written before fingerprints: size and header fields only
    sample = entry.get("sample") or {"blocks": SAMPLE_BLOCKS, "block_bytes": SAMPLE_BLOCK_BYTES}
    try:
        header, got = _shard_fingerprint(root / entry["file"], sample["blocks"], sample["block_bytes"])
    except (OSError, ValueError) as error:
        return f"is not a readable .npy file ({error})"
    if "header" in entry and header != entry["header"]:
        return (f"has a .npy header that differs from the one written ({_describe_header(header)} instead of "
                f"{_describe_header(entry['header'])})")
    if "sample" in entry and got["sha256"] != sample["sha256"]:
        for other in entries:
            same_kind = other is not entry and other.get("sample", {}).get("blocks") == sample["blocks"] \
                and other.get("sample", {}).get("block_bytes") == sample["block_bytes"]
            if same_kind and other["sample"]["sha256"] == got["sha256"]:
                return (f"holds the data of {other['file']} (rows {other['start']}..{other['stop'] - 1}): shard files "
                        "swapped or copied; its rows would be credited to the wrong examples")
        return ("fails its sampled checksum: its data differs from what was written (corrupt, or replaced by "
                "other data of the same size)")
    return None


def _describe_header(hex_header: str) -> str:
    """The dict part of a .npy header, for messages."""
    try:
        text = bytes.fromhex(hex_header).decode("latin-1")
    except ValueError:
        return "an unreadable header"
    start = text.find("{")
    return text[start:].strip() if start >= 0 else repr(text)


# --- temp files -----------------------------------------------------------------------------------
#
# Every temp file carries who wrote it: ".<target>.<host>.<pid>.<token>.tmp" (token: 16 random hex
# digits, so two writers in one process, or a reused pid, never share a name). A writer opening a
# store removes only temps that are provably stale:
#   * written on this host (same host tag) by a pid that no longer runs (os.kill(pid, 0) raises
#     ProcessLookupError): its writer is dead, nobody will rename it. A pid that was reused since
#     only keeps the temp longer (never the wrong way round), and our own pid counts as alive
#     (another writer object of this process may be mid-write);
#   * or, whatever wrote it (another host on a shared file system, where pids mean nothing; an
#     older version's ".<target>.tmp" without a pid), untouched for STALE_TEMP_SECONDS (a day): a
#     temp exists only while one shard is streamed to disk and fsync'ed, seconds to minutes.
# Only temps of the store's own files (shard-XXXXX.npy, manifest.json) are ever considered.
# Caveat: processes in separate pid namespaces that share a host name and a store folder look
# dead to each other; give such containers distinct host names (Docker's default does).

_TEMP_NAME = re.compile(r"^\.(?P<target>shard-\d{5,}\.npy|manifest\.json)"
                        r"(?:\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{16}))?\.tmp$")


def _remove_stale_temps(root: Path) -> list[Path]:
    """Remove the store's temp files whose writer is provably gone (rules above); returns them."""
    removed = []
    host = host_tag()
    for tmp in root.glob(".*.tmp"):
        match = _TEMP_NAME.match(tmp.name)
        if match is None:
            continue
        try:
            age = time.time() - tmp.stat().st_mtime
        except FileNotFoundError:  # its writer renamed it meanwhile
            continue
        dead_here = match["pid"] is not None and match["host"] == host and not process_alive(int(match["pid"]))
        if dead_here or age > STALE_TEMP_SECONDS:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


@contextlib.contextmanager
def _manifest_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on STORE/.lock (POSIX flock); a no-op where fcntl is unavailable.

    flock locks belong to the open file description, so two writer objects in one process
    exclude each other as two processes do."""
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


# --- the manifest ---------------------------------------------------------------------------------

def _read_manifest(path: Path) -> dict[str, Any]:
    """Read and fully validate ``path/manifest.json``; any problem is a one-line StoreError."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise StoreError(f"store {path}: no {MANIFEST} (not a trajectory store, or never started)")
    try:
        raw = manifest_path.read_bytes()
    except OSError as error:
        raise StoreError(f"store {path}: cannot read {MANIFEST} ({error.strerror or error})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise StoreError(f"store {path}: {MANIFEST} is not UTF-8 text (byte {error.start})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise StoreError(f"store {path}: {MANIFEST} is not valid JSON ({error.msg}, line {error.lineno})") from None
    except (ValueError, RecursionError) as error:
        raise StoreError(f"store {path}: {MANIFEST} is not valid JSON ({type(error).__name__})") from None
    _validate_manifest(path, manifest)
    return manifest


def _field_error(path: Path, name: str, problem: str, value: Any = ...) -> StoreError:
    got = "" if value is ... else f", got {_short(value)}"
    return StoreError(f"store {path}: {MANIFEST} field {name!r} {problem}{got}")


def _validate_manifest(path: Path, manifest: Any) -> None:
    bad = functools.partial(_field_error, path)

    if not isinstance(manifest, dict):
        raise StoreError(f"store {path}: {MANIFEST} top level is a JSON {_json_type(manifest)}, expected an object")
    if manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"store {path}: format is {_short(manifest.get('format'))}, expected {FORMAT_NAME!r}")
    version = manifest.get("version")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise StoreError(f"store {path}: format version {_short(version)} is not supported (expected {FORMAT_VERSION})")
    for key in ("N", "T", "d", "dtype", "shard_size", "example_ids", "shards", "complete", "metadata"):
        if key not in manifest:
            raise StoreError(f"store {path}: {MANIFEST} lacks {key!r}")
    for key in ("N", "T", "d", "shard_size"):
        if not _is_int(manifest[key]) or manifest[key] < 1:
            raise bad(key, "must be a positive integer", manifest[key])
    n, t, shard_size = manifest["N"], manifest["T"], manifest["shard_size"]
    if manifest["dtype"] not in STORE_DTYPES:
        raise bad("dtype", f"must be one of {list(STORE_DTYPES)}", manifest["dtype"])

    ids = manifest["example_ids"]
    if not isinstance(ids, list):
        raise bad("example_ids", "must be a list of strings", ids)
    if len(ids) != n:
        raise StoreError(f"store {path}: {MANIFEST} field 'example_ids' holds {len(ids)} example ids for N={n}")
    if not all(type(value) is str for value in ids):  # noqa: E721 - exact type, fast on 1M ids
        position = next(i for i, value in enumerate(ids) if not isinstance(value, str))
        raise bad("example_ids", f"entry {position} is not a string", ids[position])
    if len(set(ids)) != n:
        seen: set[str] = set()
        duplicate = next(value for value in ids if value in seen or seen.add(value))
        raise bad("example_ids", f"must be unique; {_short(duplicate)} appears more than once")

    metadata = manifest["metadata"]
    if not isinstance(metadata, dict):
        raise bad("metadata", "must be an object", metadata)
    for key in PER_CHECKPOINT_METADATA:
        value = metadata.get(key)
        if value is not None and (not isinstance(value, list) or len(value) != t):
            raise bad(f"metadata.{key}", f"must be a list of T={t} values (one per checkpoint)", value)
    for key in ("checkpoint_weights", "block_scales"):
        value = metadata.get(key)
        if value is not None and not all(_is_finite_number(v) and v >= 0 for v in value):
            raise bad(f"metadata.{key}", "must hold finite non-negative numbers", value)
    weights = metadata.get("checkpoint_weights")
    if weights is not None and not sum(weights) > 0:
        raise bad("metadata.checkpoint_weights", "must have a positive sum", weights)
    if "weights_applied" in metadata and not isinstance(metadata["weights_applied"], bool):
        raise bad("metadata.weights_applied", "must be true or false", metadata["weights_applied"])

    if not isinstance(manifest["complete"], bool):
        raise bad("complete", "must be true or false", manifest["complete"])
    shards = manifest["shards"]
    if not isinstance(shards, list):
        raise bad("shards", "must be a list of shard entries", shards)
    n_shards = -(-n // shard_size)
    seen_index: set[int] = set()
    for position, entry in enumerate(shards):
        _validate_shard_entry(path, position, entry, n, shard_size, seen_index)
    all_listed = len(seen_index) == n_shards
    if manifest["complete"] and not all_listed:
        missing = [i for i in range(n_shards) if i not in seen_index]
        raise StoreError(f"store {path}: {MANIFEST} field 'complete' is true but shard(s) {_short(missing)} of "
                         f"{n_shards} are not listed")
    if not manifest["complete"] and all_listed:
        raise bad("complete", f"is false but all {n_shards} shards are listed (inconsistent)")


def _validate_shard_entry(path: Path, position: int, entry: Any, n: int, shard_size: int, seen_index: set[int]) -> None:
    """One entry of the manifest's ``shards`` (its index is added to ``seen_index``)."""
    bad = functools.partial(_field_error, path)
    n_shards = -(-n // shard_size)
    where = f"shards[{position}]"
    if not isinstance(entry, dict):
        raise bad(where, "must be an object", entry)
    for key in ("index", "file", "start", "stop", "bytes", "sha256"):
        if key not in entry:
            raise StoreError(f"store {path}: {MANIFEST} field {where!r} lacks {key!r}")
    index = entry["index"]
    if not _is_int(index) or not 0 <= index < n_shards:
        raise bad(f"{where}.index", f"must be a shard number in [0, {n_shards}) (N={n}, shard_size={shard_size})", index)
    if index in seen_index:
        raise bad("shards", f"lists shard {index} twice")
    seen_index.add(index)
    if entry["file"] != _shard_file(index):
        raise bad(f"{where}.file", f"must be {_shard_file(index)!r} for shard {index}", entry["file"])
    start, stop = index * shard_size, min(n, (index + 1) * shard_size)
    if (entry["start"], entry["stop"]) != (start, stop) or not (_is_int(entry["start"]) and _is_int(entry["stop"])):
        raise StoreError(f"store {path}: {MANIFEST} field 'shards' lists rows {_short(entry['start'])}..{_short(entry['stop'])} "
                         f"for shard {index}, expected {start}..{stop} (N={n}, shard_size={shard_size})")
    if not _is_int(entry["bytes"]) or entry["bytes"] < 1:
        raise bad(f"{where}.bytes", "must be a positive integer", entry["bytes"])
    sha = entry["sha256"]
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise bad(f"{where}.sha256", "must be 64 lowercase hex digits", sha)
    # optional (stores written before them lack them): the cheap fingerprint, see _shard_fingerprint
    if "header" in entry:
        header = entry["header"]
        if not isinstance(header, str) or not re.fullmatch(r"(?:[0-9a-f]{2}){10,65536}", header) \
                or not header.startswith(b"\x93NUMPY".hex()):
            raise bad(f"{where}.header", "must be the .npy header as lowercase hex", header)
    if "sample" in entry:
        sample = entry["sample"]
        if not (isinstance(sample, dict) and _is_int(sample.get("blocks")) and sample["blocks"] >= 1
                and _is_int(sample.get("block_bytes")) and sample["block_bytes"] >= 1
                and isinstance(sample.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", sample["sha256"])):
            raise bad(f"{where}.sample", "must be {\"blocks\": int >= 1, \"block_bytes\": int >= 1, "
                      "\"sha256\": 64 lowercase hex digits}", sample)
    if "input_sha256" in entry and not (isinstance(entry["input_sha256"], str)
                                        and re.fullmatch(r"[0-9a-f]{64}", entry["input_sha256"])):
        raise bad(f"{where}.input_sha256", "must be 64 lowercase hex digits", entry["input_sha256"])


def _json_type(value: Any) -> str:
    for kind, name in ((type(None), "null"), (bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "array")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


class TrajectoryStoreWriter:
    """Create a store, or reopen one with the same spec to fill its missing shards.

    Several writers (processes, or objects in one process) may fill disjoint shards of one store
    at once: each shard is written to its own temp file and renamed, then merged into the
    manifest under ``STORE/.lock``; opening a writer removes only provably stale temp files.
    """

    def __init__(self, path: str | os.PathLike, spec: StoreSpec, resume: bool = True):
        self.path = Path(path)
        self.spec = spec
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"store {self.path}: exists and is not a folder")
        if (self.path / MANIFEST).exists() and not resume:
            raise StoreError(f"store {self.path} already exists (pass resume=True to continue it, or choose a new folder)")
        if not self.path.exists() or not (self.path / MANIFEST).exists():
            if self.path.is_dir() and any(self.path.glob("shard-*.npy")):
                raise StoreError(f"store {self.path}: holds shard files but no {MANIFEST} (not a store this code wrote)")
            self.path.mkdir(parents=True, exist_ok=True)
        with _manifest_lock(self.path):  # another writer may be creating or updating it right now
            if (self.path / MANIFEST).exists():
                if not resume:
                    raise StoreError(f"store {self.path} already exists (pass resume=True to continue it, or choose a new folder)")
                manifest = self._check_spec(_read_manifest(self.path))
                # Forget listed shards whose file went missing, changed size, header or sampled
                # data (the checks of open_store's default): they are recomputed.
                kept = []
                for shard in manifest["shards"]:
                    problem = self._shard_problem(shard, manifest["shards"])
                    if problem is None:
                        kept.append(shard)
                    else:
                        warnings.warn(f"store {self.path}: shard {shard['file']} {problem}; it will be recomputed",
                                      RuntimeWarning, stacklevel=2)
                if len(kept) != len(manifest["shards"]):
                    manifest["shards"] = kept
                    manifest["complete"] = len(kept) == spec.n_shards
                    self.manifest = manifest
                    self._save_manifest()
                self.manifest = manifest
            else:
                if any(self.path.glob("shard-*.npy")):
                    raise StoreError(f"store {self.path}: holds shard files but no {MANIFEST} (not a store this code wrote)")
                self.manifest = {**spec.header(), "shards": [], "complete": False}
                self._save_manifest()
        _remove_stale_temps(self.path)

    def _check_spec(self, manifest: dict[str, Any]) -> dict[str, Any]:
        for key, value in self.spec.header().items():
            if manifest.get(key) != value:
                raise StoreError(
                    f"store {self.path}: cannot resume, its {key!r} differs from this collection's "
                    f"({_short(manifest.get(key))} vs {_short(value)})"
                )
        return manifest

    def _shard_problem(self, shard: dict[str, Any], shards: Sequence[dict[str, Any]]) -> str | None:
        """Why a listed shard's file cannot be kept (None: it passes open_store's default checks)."""
        file = self.path / shard["file"]
        if not file.is_file():
            return "is missing"
        if file.stat().st_size != shard["bytes"]:
            return f"has {file.stat().st_size} bytes, manifest says {shard['bytes']}"
        return _check_fingerprint(self.path, shard, shards)

    def _save_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=1).encode("utf-8")
        write_atomically(self.path / MANIFEST, lambda handle: handle.write(text))

    def missing_shards(self) -> list[int]:
        """Shards no writer has listed yet (re-read from disk: other writers may have added some)."""
        self.manifest = self._check_spec(_read_manifest(self.path))
        done = {shard["index"] for shard in self.manifest["shards"]}
        return [index for index in range(self.spec.n_shards) if index not in done]

    def write_shard(self, index: int, rows: np.ndarray, input_sha256: str | None = None) -> None:
        """Write shard ``index`` (rows, T, d) atomically, then list it in the manifest.

        input_sha256: a digest of what the rows were computed from (the collection's tokenised
        examples of this shard), recorded so that a resume can refuse other data."""
        start, stop = self.spec.shard_rows(index)
        expected = (stop - start, self.spec.t, self.spec.d)
        if tuple(rows.shape) != expected:
            raise ValueError(f"shard {index}: shape {tuple(rows.shape)}, expected {expected}")
        array = np.ascontiguousarray(rows, dtype=self.spec.dtype)
        if not np.isfinite(array).all():
            raise ValueError(f"shard {index}: contains NaN or Inf (rows {start}..{stop})")
        file = self.path / _shard_file(index)
        write_atomically(file, lambda handle: np.save(handle, array, allow_pickle=False))
        if input_sha256 is not None and not (isinstance(input_sha256, str) and re.fullmatch(r"[0-9a-f]{64}", input_sha256)):
            raise ValueError(f"input_sha256 must be 64 lowercase hex digits, got {input_sha256!r}")
        header, sample = _shard_fingerprint(file)
        entry = {"index": index, "file": file.name, "start": start, "stop": stop,
                 "bytes": file.stat().st_size, "sha256": _sha256(file), "header": header, "sample": sample}
        if input_sha256 is not None:
            entry["input_sha256"] = input_sha256
        with _manifest_lock(self.path):
            # Other writers may have listed other shards since we last looked: the manifest on
            # disk, re-read inside the lock, is the truth; add this shard's entry to it.
            manifest = self._check_spec(_read_manifest(self.path))
            merged = {s["index"]: s for s in manifest["shards"]}
            merged[index] = entry
            manifest["shards"] = [merged[i] for i in sorted(merged)]
            manifest["complete"] = len(merged) == self.spec.n_shards
            self.manifest = manifest
            self._save_manifest()

    def finish(self) -> "TrajectoryStore":
        missing = self.missing_shards()
        if missing:
            raise StoreError(f"store {self.path}: {len(missing)} shard(s) still missing (first: {missing[0]})")
        return open_store(self.path)


def _short(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class TrajectoryStore:
    """A validated, read-only store. Arrays are memory-mapped; nothing is loaded until asked.

    On an incomplete store (opened with ``allow_incomplete=True``) ``len``, ``n`` and ``ids``
    still describe all N rows; ``rows`` and ``iter_shards`` serve the written shards (``rows``
    raises :class:`StoreError` for a row of an unwritten shard); ``candidates``,
    ``trajectory_view`` and ``mean`` refuse with :class:`StoreError`.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], shards: dict[int, np.ndarray]):
        self.path = path
        self.manifest = manifest
        self._shards = dict(sorted(shards.items()))  # shard number -> memmap (rows, T, d)

    n = property(lambda self: int(self.manifest["N"]))
    t = property(lambda self: int(self.manifest["T"]))
    d = property(lambda self: int(self.manifest["d"]))
    dtype = property(lambda self: np.dtype(self.manifest["dtype"]))
    metadata = property(lambda self: self.manifest["metadata"])
    shard_size = property(lambda self: int(self.manifest["shard_size"]))

    @property
    def n_shards(self) -> int:
        return -(-self.n // self.shard_size)

    @property
    def complete(self) -> bool:
        """True when every shard is written (always, unless opened with ``allow_incomplete``)."""
        return len(self._shards) == self.n_shards

    @property
    def written_shards(self) -> list[int]:
        return list(self._shards)

    @property
    def missing_shards(self) -> list[int]:
        return [i for i in range(self.n_shards) if i not in self._shards]

    @property
    def n_written(self) -> int:
        """Rows held by the written shards (N when complete)."""
        return sum(len(array) for array in self._shards.values())

    @property
    def ids(self) -> list[str]:
        """All N example ids in row order, written or not."""
        return list(self.manifest["example_ids"])

    @property
    def checkpoint_weights(self) -> list[float]:
        """w_t (sum 1), one per checkpoint; uniform when the manifest names none."""
        weights = self.metadata.get("checkpoint_weights")
        return [float(w) for w in weights] if weights is not None else [1.0 / self.t] * self.t

    @property
    def weights_applied(self) -> bool:
        return bool(self.metadata.get("weights_applied", False))

    @property
    def selection_checkpoint_weights(self) -> list[float] | None:
        """The weights a selection should still apply: None when the blocks already carry them
        (:func:`.store_selection.selection_weights` for a pursuit)."""
        from .store_selection import selection_weights

        return selection_weights(self, block_scale_invariant=False)

    def weights_for(self, block_scale_invariant: bool) -> list[float] | None:
        """The checkpoint weights a method should be given (:func:`.store_selection.selection_weights`)."""
        from .store_selection import selection_weights

        return selection_weights(self, block_scale_invariant)

    def __len__(self) -> int:
        """N, the store's rows, written or not (see ``n_written``)."""
        return self.n

    def _require_complete(self, what: str) -> None:
        if not self.complete:
            missing = self.missing_shards
            listed = ", ".join(str(i) for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise StoreError(
                f"store {self.path}: incomplete ({len(self._shards)}/{self.n_shards} shards written; missing "
                f"shard{'s' if len(missing) > 1 else ''} {listed}); {what} needs every row: resume the collection, "
                "or use iter_shards() / rows() for the written rows")

    def iter_shards(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(start, stop, memmap (rows, T, d)) per written shard in row order, for out-of-core passes.

        On an incomplete store only the written shards are yielded (their row ranges say where
        they belong)."""
        size = self.shard_size
        for index, array in self._shards.items():
            start = index * size
            yield start, start + len(array), array

    def trajectory_view(self) -> np.ndarray:
        """(N, T, d): the memory map itself for a one-shard store, else a concatenation in memory.
        Refuses an incomplete store."""
        self._require_complete("trajectory_view()")
        arrays = list(self._shards.values())
        if len(arrays) == 1:
            return arrays[0]
        return np.concatenate(arrays, axis=0)

    def candidates(self, as_tensor: bool = False, dtype: Any = None) -> Any:
        """(N, T*d) rows a_i (checkpoint blocks side by side), as NumPy or a torch tensor.
        Refuses an incomplete store (row i must be example ids[i]).

        A store of several shards (or a tensor, or another dtype) is copied into memory whole:
        to select from a store larger than RAM pass the store itself (``select(store, ...)``
        reads :meth:`rows_source`, the memory-mapped shards, a chunk at a time)."""
        self._require_complete("candidates()")
        matrix = self.trajectory_view().reshape(self.n, self.t * self.d)
        owned = len(self._shards) > 1  # concatenated in memory: already a copy of our own
        if dtype is not None and np.dtype(dtype) != matrix.dtype:
            matrix, owned = matrix.astype(dtype), True
        if as_tensor:
            import torch

            # one copy at most: the memory map itself would be a read-only tensor of the file
            return torch.from_numpy(matrix if owned else np.array(matrix, copy=True))
        return matrix

    def rows_source(self) -> Any:
        """The N rows a_i (N, T*d) as a :class:`gtp_kernels.selection.rows.RowSource` over the
        memory-mapped shards, in row order: selection reads them a chunk at a time in the
        store's dtype and never concatenates them (``select(store, ...)`` uses this). Refuses
        an incomplete store."""
        self._require_complete("rows_source()")
        from ..selection.rows import RowSource

        return RowSource(list(self._shards.values()))

    def mean(self) -> np.ndarray:
        """Mean row (T*d,) over all N rows, computed shard by shard in float64, returned float32
        (a target b). Refuses an incomplete store (a mean of some rows is another target)."""
        self._require_complete("mean()")
        total = np.zeros(self.t * self.d, dtype=np.float64)
        for start, stop, array in self.iter_shards():
            total += array.reshape(stop - start, -1).sum(axis=0, dtype=np.float64)
        return (total / self.n).astype(np.float32)

    def rows(self, indices: Sequence[int]) -> np.ndarray:
        """Rows a_i (len(indices), T*d) gathered without loading the whole store.

        Raises IndexError for a row outside [0, N) and StoreError for a row of a shard that is
        not written (an incomplete store)."""
        out = np.empty((len(indices), self.t * self.d), dtype=self.dtype)
        size = self.shard_size
        for position, index in enumerate(indices):
            index = operator.index(index)
            if not 0 <= index < self.n:
                raise IndexError(f"row {index} out of range [0, {self.n})")
            shard = index // size
            array = self._shards.get(shard)
            if array is None:
                raise StoreError(
                    f"store {self.path}: row {index} is in shard {shard} (rows {shard * size}..{min(self.n, (shard + 1) * size) - 1}), "
                    "which is not written yet (incomplete store)")
            out[position] = array[index - shard * size].reshape(-1)
        return out


def is_store(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a trajectory-store manifest (cheap: no validation)."""
    return (Path(path) / MANIFEST).is_file()


def open_store(path: str | os.PathLike, verify: str = "size", allow_incomplete: bool = False) -> TrajectoryStore:
    """Open and validate a store.

    Args:
        verify: "size" (the default; fast, ~256 KiB read per shard): each shard's byte count,
            its whole .npy header against the one recorded (fortran_order, shape, dtype) and a
            sha256 of a fixed sample of its data (SAMPLE_BLOCKS blocks of SAMPLE_BLOCK_BYTES,
            the whole data of a small shard), which catches swapped, copied or replaced shards;
            "sha256": also every shard's full checksum (reads all data once; the only mode that
            catches a change outside the sample, such as one flipped byte in a large shard);
            "none": the header's shape and dtype only. The manifest's schema is validated in
            every mode. Stores written before the header and sample were recorded get the size
            and header-field checks only.
        allow_incomplete: open a store whose collection has not finished: ``rows`` and
            ``iter_shards`` then serve the written shards; ``candidates``, ``trajectory_view``
            and ``mean`` refuse (see :class:`TrajectoryStore`).

    Raises:
        StoreError: a missing, malformed, corrupt or (without ``allow_incomplete``) incomplete
            store, with a one-line message naming the store and the problem.
    """
    if verify not in ("none", "size", "sha256"):
        raise ValueError(f"verify must be 'none', 'size' or 'sha256', got {verify!r}")
    root = Path(path)
    manifest = _read_manifest(root)  # schema, types, ranges and consistency checked there
    n, t, d, dtype, shard_size = manifest["N"], manifest["T"], manifest["d"], manifest["dtype"], manifest["shard_size"]
    n_shards = -(-n // shard_size)
    if not manifest["complete"] and not allow_incomplete:
        raise StoreError(f"store {root}: incomplete ({len(manifest['shards'])}/{n_shards} shards); resume the collection")
    arrays = {}
    for entry in sorted(manifest["shards"], key=lambda s: s["index"]):
        file = root / entry["file"]
        start, stop = entry["start"], entry["stop"]
        if not file.is_file():
            raise StoreError(f"store {root}: shard file {entry['file']} is missing")
        if verify != "none" and file.stat().st_size != entry["bytes"]:
            raise StoreError(f"store {root}: shard {entry['file']} has {file.stat().st_size} bytes, manifest says {entry['bytes']} (truncated or rewritten)")
        if verify == "sha256":  # every byte: it covers the header and sample too, which then say what changed
            if _sha256(file) != entry["sha256"]:
                problem = _check_fingerprint(root, entry, manifest["shards"])
                raise StoreError(f"store {root}: shard {entry['file']} fails its sha256 check "
                                 f"({'corrupt' if problem is None else problem})")
        elif verify == "size":
            problem = _check_fingerprint(root, entry, manifest["shards"])
            if problem is not None:
                raise StoreError(f"store {root}: shard {entry['file']} {problem}")
        try:
            array = np.load(file, mmap_mode="r", allow_pickle=False)
        except Exception as error:  # numpy raises several types for a broken header
            raise StoreError(f"store {root}: shard {entry['file']} is not a readable .npy file ({error})") from None
        if not isinstance(array, np.ndarray) or array.shape != (stop - start, t, d):
            raise StoreError(f"store {root}: shard {entry['file']} has shape {getattr(array, 'shape', None)}, expected {(stop - start, t, d)}")
        if array.dtype != np.dtype(dtype):
            raise StoreError(f"store {root}: shard {entry['file']} has dtype {array.dtype}, manifest says {dtype}")
        if array.size and not array.flags.c_contiguous:  # the writer saves C order; Fortran order transposes rows
            raise StoreError(f"store {root}: shard {entry['file']} is stored in Fortran order (fortran_order: True), "
                             "not as written (C order): its rows would be read scrambled")
        arrays[entry["index"]] = array
    return TrajectoryStore(root, manifest, arrays)


# metadata a candidate store and a target store must share for their rows to live in one space
# (gradient_type may differ: LESS pairs Adam-preconditioned candidates with plain target gradients)
SHARED_METADATA = ("model", "task", "learning_rates", "checkpoint_weights", "weights_applied", "normalisation")
SHARED_PROJECTION = ("kind", "seeds", "seed_mode", "d", "library")


def check_compatible(candidates: "TrajectoryStore", target: "TrajectoryStore") -> None:
    """StoreError unless the two stores' rows live in the same space: the same T and d, model,
    task, checkpoints (by name) and their learning rates and weights, whether the weights are
    built into the rows, normalisation and projection. Keys one store does not record are not
    compared (e.g. LESS imports record no model)."""
    def differ(what: str, a: Any, b: Any) -> StoreError:
        return StoreError(f"stores {candidates.path} and {target.path} do not match: {what} is {a!r} for the "
                          f"candidates but {b!r} for the target (collect both with the same settings)")

    if (candidates.t, candidates.d) != (target.t, target.d):
        raise differ("(T, d)", (candidates.t, candidates.d), (target.t, target.d))
    ma, mb = candidates.metadata, target.metadata
    for key in SHARED_METADATA:
        if key in ma and key in mb and not _same_value(ma[key], mb[key]):
            raise differ(key, ma[key], mb[key])
    if "checkpoints" in ma and "checkpoints" in mb:  # by name: the folders may have moved
        names_a = [Path(str(c)).name for c in ma["checkpoints"]]
        names_b = [Path(str(c)).name for c in mb["checkpoints"]]
        if names_a != names_b:
            raise differ("checkpoints", names_a, names_b)
    pa, pb = ma.get("projection") or {}, mb.get("projection") or {}
    for key in SHARED_PROJECTION:
        if key in pa and key in pb and pa[key] != pb[key]:
            raise differ(f"projection {key}", pa[key], pb[key])


def _same_value(a: Any, b: Any) -> bool:
    """Equal, with floats compared to 1e-9 relative (weights computed the same way twice)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return (isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
                and not isinstance(b, bool) and math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0))
    return a == b


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The validated manifest of the store folder ``path`` (schema, types, ranges, consistency);
    :class:`StoreError` naming the problem otherwise. Reads no shard."""
    return _read_manifest(Path(path))
