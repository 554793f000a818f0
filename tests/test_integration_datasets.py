"""Hugging Face datasets in (--data as a saved dataset or parquet) and out (the selection as a dataset)."""
import json

import numpy as np
import pytest

datasets = pytest.importorskip("datasets", reason="datasets not installed (pip install gtp_kernels[datasets])")

from gtp_kernels.cli import main as cli_main  # noqa: E402
from gtp_kernels.collect.data import ExampleFormat, read_jsonl  # noqa: E402
from gtp_kernels.integrations.hf_datasets import selection_to_dataset  # noqa: E402
from test_cli import _store_problem  # noqa: E402


def _pool_dataset(n=30, with_ids=True):
    rows = {"text": [f"example {i}" for i in range(n)], "score": [float(i) / 7 for i in range(n)]}
    if with_ids:
        rows = {"id": [f"ex{i}" for i in range(n)], **rows}
    return datasets.Dataset.from_dict(rows)


@pytest.mark.parametrize("kind", ["saved", "parquet"])
def test_read_examples_from_saved_dataset_and_parquet(tmp_path, kind):
    ds = _pool_dataset(6)
    path = tmp_path / ("pool" if kind == "saved" else "pool.parquet")
    ds.save_to_disk(str(path)) if kind == "saved" else ds.to_parquet(str(path))
    examples = read_jsonl(path, ExampleFormat(id_field="id"))
    assert [e.id for e in examples] == [f"ex{i}" for i in range(6)]
    assert examples[4].record == {"id": "ex4", "text": "example 4", "score": 4 / 7}
    # without an id column the row position is the id, as a JSON line's number is
    no_ids = tmp_path / "noid.parquet"
    _pool_dataset(3, with_ids=False).to_parquet(str(no_ids))
    assert [e.id for e in read_jsonl(no_ids)] == ["0", "1", "2"]


@pytest.mark.parametrize("kind", ["saved", "parquet"])
def test_select_data_as_dataset_writes_the_same_examples_as_jsonl(tmp_path, capsys, kind):
    args = _store_problem(tmp_path)  # writes pool.jsonl with ids ex0..ex29 and the same texts
    path = tmp_path / ("pool_ds" if kind == "saved" else "pool.parquet")
    ds = datasets.Dataset.from_json(str(tmp_path / "pool.jsonl"))
    ds.save_to_disk(str(path)) if kind == "saved" else ds.to_parquet(str(path))
    assert cli_main(args + ["--out", str(tmp_path / "a"), "--data", str(tmp_path / "pool.jsonl")]) == 0
    assert cli_main(args + ["--out", str(tmp_path / "b"), "--data", str(path)]) == 0
    assert (tmp_path / "a" / "selected.jsonl").read_text() == (tmp_path / "b" / "selected.jsonl").read_text()


def test_selection_back_to_dataset_cli_and_api(tmp_path, capsys):
    args = _store_problem(tmp_path)
    pool = tmp_path / "pool_ds"
    source = _pool_dataset(30)
    source.save_to_disk(str(pool))
    out = tmp_path / "sel"
    assert cli_main(args + ["--out", str(out)]) == 0
    chosen = [json.loads(x) for x in (out / "selection.jsonl").read_text().splitlines()]
    assert cli_main(["to-dataset", "--selection", str(out), "--data", str(pool), "--out", str(tmp_path / "ds")]) == 0
    picked = datasets.load_from_disk(str(tmp_path / "ds"))
    assert picked["id"] == [c["id"] for c in chosen]
    assert picked["text"] == [f"example {int(c['id'][2:])}" for c in chosen]
    assert picked["gtp_rank"] == list(range(len(chosen)))
    np.testing.assert_allclose(picked["gtp_weight"], [c["weight"] for c in chosen])
    # a second run refuses to replace it silently
    assert cli_main(["to-dataset", "--selection", str(out), "--data", str(pool), "--out", str(tmp_path / "ds")]) == 2
    assert "exists" in capsys.readouterr().err


def test_selection_object_with_several_targets_gets_a_targets_column(tmp_path):
    import gtp_kernels as gk

    rng = np.random.default_rng(0)
    A = rng.standard_normal((20, 12))
    B = np.stack([A[[1, 4]].sum(0), A[[4, 9]].sum(0)], axis=1)  # two targets sharing row 4
    sel = gk.select(A, B, 2)
    pool = tmp_path / "pool.parquet"
    _pool_dataset(20).to_parquet(str(pool))
    picked = selection_to_dataset(sel, pool, tmp_path / "out", ids=[f"ex{i}" for i in range(20)])
    rows = sel.indices.tolist()
    assert picked["id"] == [f"ex{i}" for i in rows]
    members = [set(ts.indices.tolist()) for ts in sel.per_target]
    assert picked["gtp_targets"] == [[t for t in range(2) if i in members[t]] for i in rows]
    assert any(len(t) == 2 for t in picked["gtp_targets"])  # row 4 serves both
    assert datasets.load_from_disk(str(tmp_path / "out"))["gtp_weight"] == picked["gtp_weight"]
