"""Hugging Face ``datasets`` in and out (``pip install gtp_kernels[datasets]``).

In: wherever ``--data`` takes JSON lines (``gtp collect``, ``gtp select --data``) it also takes a
dataset saved with ``Dataset.save_to_disk`` (a folder) or a parquet file; each row is one record,
its id the ``id_field`` column or, without that column, the row position (as a JSON line's id is
its line number).

Out: :func:`selection_to_dataset` writes the chosen rows back as a dataset, ``Dataset.select`` of
the rows in selection order plus the columns ``gtp_rank``, ``gtp_weight`` and, for a multi-target
selection object, ``gtp_targets`` (the target columns whose support holds the row);
``gtp to-dataset`` does it from a ``gtp select`` output folder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ..validation import InputError


def is_dataset_path(path: str | os.PathLike) -> bool:
    """A ``save_to_disk`` folder (dataset_info.json / state.json inside) or a ``.parquet`` file."""
    p = Path(path)
    if p.is_dir():
        return (p / "state.json").is_file() or (p / "dataset_info.json").is_file()
    return p.suffix == ".parquet"


def load_dataset_any(path: str | os.PathLike):
    """The ``datasets.Dataset`` at path (saved folder, parquet file, or JSON lines)."""
    try:
        import datasets
    except ImportError:
        raise InputError(f"data: {path} is a Hugging Face dataset; install the extra: pip install gtp_kernels[datasets]") from None
    p = Path(path)
    if not p.exists():
        raise InputError(f"data: {path} does not exist")
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                raise InputError(f"data: {path} is a DatasetDict ({', '.join(ds)}); pass one split's folder")
            return ds
        if p.suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(p))
        return datasets.Dataset.from_json(str(p))
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets/pyarrow raise many types for a bad file
        raise InputError(f"data: cannot read {path} as a dataset ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def read_dataset_examples(path: str | os.PathLike, id_field: str) -> list[tuple[str, dict[str, Any]]]:
    """[(id, record)] of every row, in order."""
    ds = load_dataset_any(path)
    rows = ds.to_list()
    if id_field in ds.column_names:
        return [(str(row[id_field]), row) for row in rows]
    return [(str(position), row) for position, row in enumerate(rows)]


def _row_positions(ds, id_field: str, ids: Sequence[Any]) -> list[int]:
    if id_field in ds.column_names:
        where = {str(v): i for i, v in enumerate(ds[id_field])}
    else:
        where = {str(i): i for i in range(len(ds))}
    missing = [str(i) for i in ids if str(i) not in where]
    if missing:
        raise InputError(f"data: {len(missing)} selected ids are not in the dataset (first: {missing[0]!r}; ids from "
                         f"{id_field!r} or the row position)")
    return [where[str(i)] for i in ids]


def selection_to_dataset(selection, data: str | os.PathLike, out: str | os.PathLike, *, ids: Sequence[Any] | None = None,
                         id_field: str = "id", overwrite: bool = False):
    """Write ``Dataset.select`` of the chosen rows (selection order) with gtp_rank / gtp_weight
    (/ gtp_targets) columns to ``out`` (``save_to_disk``; written to a temp folder, then renamed).

    ``selection``: a :class:`gtp_kernels.Selection` (rows are its indices, or ``ids[index]`` when
    the candidates were a store with those example ids) or a list of selection.jsonl records
    (``id`` when present, else ``index``). Returns the new dataset.
    """
    ds = load_dataset_any(data)
    if isinstance(selection, (list, tuple)):
        keys = [rec["id"] if "id" in rec else rec["index"] for rec in selection]
        weights = [float(rec["weight"]) for rec in selection]
        targets = None
    else:
        chosen = selection.indices.tolist()
        keys = [ids[i] for i in chosen] if ids is not None else chosen
        weights = [float(w) for w in selection.weights.tolist()]
        targets = None
        if selection.num_targets > 1:
            members = [set(ts.indices.tolist()) for ts in selection.per_target]
            targets = [[t for t, rows in enumerate(members) if i in rows] for i in chosen]
    positions = _row_positions(ds, id_field, keys)
    taken = set(ds.column_names) & {"gtp_rank", "gtp_weight", "gtp_targets"}
    if taken:
        raise InputError(f"data: the dataset already has column(s) {sorted(taken)}")
    picked = ds.select(positions).add_column("gtp_rank", list(range(len(positions))))
    picked = picked.add_column("gtp_weight", weights)
    if targets is not None:
        picked = picked.add_column("gtp_targets", targets)
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"--out {out} exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        picked.save_to_disk(str(staging / "ds"))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging / "ds", out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return picked


# ------------------------------------------------------------------------------------------------
# gtp to-dataset


def add_to_dataset_parser(sub) -> None:
    p = sub.add_parser("to-dataset", help="write a selection back as a Hugging Face dataset (save_to_disk)",
                       description="Dataset.select of the rows a `gtp select` run chose (OUT/selection.jsonl), in "
                                   "selection order, with gtp_rank and gtp_weight columns, saved with save_to_disk.")
    p.add_argument("--selection", required=True, help="a gtp select output folder, or its selection.jsonl")
    p.add_argument("--data", required=True, help="the pool: a save_to_disk folder, a parquet file or JSON lines")
    p.add_argument("--id-field", default="id", help="id column (default: id; without it, row positions)")
    p.add_argument("--out", required=True, help="folder for the selected dataset")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run_to_dataset)


def run_to_dataset(args) -> int:
    path = Path(args.selection)
    if path.is_dir():
        path = path / "selection.jsonl"
    if not path.is_file():
        raise InputError(f"--selection: {path} not found")
    try:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise InputError(f"--selection: cannot read {path} ({exc})") from None
    picked = selection_to_dataset(records, args.data, args.out, id_field=args.id_field, overwrite=args.overwrite)
    print(f"wrote {len(picked)} selected rows to {args.out}")
    return 0
