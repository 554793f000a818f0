"""Resuming a store: what must match before a collection continues an existing store folder.

A store is resumed shard by shard (the writer recomputes exactly the unlisted shards), so before
any model work the folder's manifest must describe this collection (:func:`check_resumable`), and
the shards it keeps must have been computed from these very examples (:func:`check_inputs_unchanged`,
by each shard's :func:`shard_input_digest`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import TokenizedExample
from .store import MANIFEST, StoreError, read_manifest


def check_resumable(out: Path, resume: bool, n: int, ids: list[str], d: int, dtype: str, shard_size: int, task: str,
                     gradient_type: str, kind: str, seed: int, seed_mode: str, normalise: bool, weights_applied: bool) -> None:
    """Refuse, before any model work, to resume a store made with other data or settings (the
    writer checks the whole spec again once the checkpoints are known)."""
    if not (out / MANIFEST).exists():
        if out.is_dir() and any(out.glob("shard-*.npy")):
            raise StoreError(f"store {out}: holds shard files but no {MANIFEST} (not a store this code wrote)")
        return
    if not resume:
        raise StoreError(f"store {out} already exists (resume it, or choose a new folder)")
    manifest = read_manifest(out)
    meta = manifest.get("metadata") or {}
    wanted = {"N": (manifest.get("N"), n), "d": (manifest.get("d"), d), "dtype": (manifest.get("dtype"), dtype),
              "shard_size": (manifest.get("shard_size"), shard_size)}
    projection = meta.get("projection") or {}
    for key, value in (("task", task), ("gradient_type", gradient_type), ("normalisation", "unit" if normalise else "none"),
                       ("weights_applied", weights_applied)):
        if key in meta:
            wanted[key] = (meta[key], value)
    for key, value in (("kind", kind), ("seed", seed), ("seed_mode", seed_mode)):
        if key in projection:
            wanted[f"projection {key}"] = (projection[key], value)
    for key, (have, want) in wanted.items():
        if have != want:
            raise StoreError(f"store {out}: cannot resume, its {key!r} differs from this collection's ({have!r} vs {want!r}); "
                             "choose a new folder")
    if manifest.get("example_ids") != ids:
        raise StoreError(f"store {out}: cannot resume, its example ids differ from this data's (collected from other data?); "
                         "choose a new folder")


def shard_input_digest(examples: Sequence[TokenizedExample]) -> str:
    """sha256 of what a shard's gradients are computed from: each tokenised example's id, token
    ids and labels (or class id), in order. An edited example, another tokenizer, chat template,
    max_length or label mapping changes it."""
    digest = hashlib.sha256()
    for example in examples:
        for part in (example.id.encode("utf-8"), np.asarray(example.input_ids, dtype=np.int64).tobytes(),
                     np.asarray(example.labels if example.labels is not None else [], dtype=np.int64).tobytes(),
                     str(example.label).encode("ascii")):
            digest.update(len(part).to_bytes(8, "little"))  # length-prefixed: no two inputs share a stream
            digest.update(part)
    return digest.hexdigest()


def check_inputs_unchanged(out: Path, digests: Sequence[str], ids: Sequence[str], shard_size: int) -> None:
    """Refuse to resume a store whose written shards were computed from other examples than this
    data's (same ids, other content: an edited data file, or another tokenizer or format). Shards
    written before digests were recorded cannot be checked and are kept."""
    if not (out / MANIFEST).exists():
        return
    manifest = read_manifest(out)
    for entry in manifest["shards"]:
        recorded, index = entry.get("input_sha256"), entry["index"]
        if recorded is None or index >= len(digests) or recorded == digests[index]:
            continue
        start, stop = entry["start"], entry["stop"]
        raise StoreError(
            f"store {out}: cannot resume: shard {index} (rows {start}..{stop - 1}, examples {ids[start]!r}..{ids[stop - 1]!r}) "
            "was computed from other content than these examples now have (the data file was edited, or the tokenizer, "
            "chat template or label set changed); its gradients would mix with new ones. Collect into a new folder, "
            "or restore the data the store was collected from")
