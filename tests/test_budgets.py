"""One budget semantics for every method: k per target column, and the result says which
column(s) each row serves."""
import json

import pytest
import torch

import gtp_kernels as gk
from problems import planted_problem


@pytest.mark.parametrize("method", list(gk.METHODS))
def test_every_method_budgets_k_per_column_and_writes_the_columns(method):
    A, B, _, _ = planted_problem(120, 40, 3, seed=5, m=2, dtype=torch.float32)
    sel = gk.select(A, B, 5, method=method)
    assert sel.num_targets == 2
    assert all(len(ts.indices) <= 5 for ts in sel.per_target)
    if method in ("topk", "random"):
        assert all(len(ts.indices) == 5 for ts in sel.per_target)
    from gtp_kernels.files import render_selection
    lines = [json.loads(x) for x in render_selection(sel)["selection.jsonl"].splitlines()]
    assert [r["index"] for r in lines] == sel.indices.tolist()
    assert [tuple(r["targets"]) for r in lines] == sel.row_targets
    for r in lines:
        for c in r["targets"]:
            assert r["index"] in sel.per_target[c].indices.tolist()
