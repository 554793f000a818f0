"""One budget semantics for every method: k per target column, and the result says which
column(s) each row serves."""
import json

import numpy as np
import pytest
import torch

import gtp_kernels as gk
import gtp_kernels.selection.baselines as baselines
from problems import planted_problem


def _less_float64(A, B, T, lrs):
    """(N, m) LESS scores sum_t w_t cos(a^t, b^t), w = lrs / sum(lrs), in float64."""
    n, m = A.shape[0], B.shape[1]
    a = A.to(torch.float64).reshape(n, T, -1)
    b = B.to(torch.float64).T.reshape(m, T, -1)
    w = torch.as_tensor(lrs, dtype=torch.float64)
    w = w / w.sum()
    cos = torch.einsum("ntd,mtd->nmt", torch.nn.functional.normalize(a, dim=-1),
                       torch.nn.functional.normalize(b, dim=-1))
    return cos @ w


def _problem(m=3, n=90, T=3, d=8, seed=21):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, T * d, generator=g), torch.randn(T * d, m, generator=g), [3.0, 2.0, 1.0]


@pytest.mark.parametrize("streaming", [False, True])  # True: chunks of one row, a running top-k merges them
def test_topk_takes_k_per_column_by_each_columns_own_score(monkeypatch, streaming):
    if streaming:
        monkeypatch.setattr(baselines, "_CHUNK_ELEMENTS", 40)
        monkeypatch.setattr(baselines, "_FULL_SCORES_ELEMENTS", 0)
    A, B, lrs = _problem()
    sel = gk.select(A, B, 7, method="topk", checkpoint_weights=lrs, num_checkpoints=3)
    ref = _less_float64(A, B, 3, lrs)
    assert sel.num_targets == 3 and sel.summary()["num_targets"] == 3
    for c, ts in enumerate(sel.per_target):
        want = torch.argsort(ref[:, c], descending=True, stable=True)[:7].tolist()
        assert ts.indices.tolist() == want
        np.testing.assert_allclose(ts.weights, ref[want, c].numpy(), rtol=1e-5, atol=1e-6)
    union = set().union(*(set(ts.indices.tolist()) for ts in sel.per_target))
    assert set(sel.indices.tolist()) == union and len(sel.indices) <= 21
    for i, columns, w in zip(sel.indices.tolist(), sel.row_targets, sel.weights.tolist()):
        assert list(columns) == [c for c, ts in enumerate(sel.per_target) if i in ts.indices.tolist()]
        assert w == pytest.approx(max(float(ref[i, c]) for c in columns), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("streaming", [False, True])
def test_topk_ties_go_to_the_lowest_index_per_column(monkeypatch, streaming):
    if streaming:
        monkeypatch.setattr(baselines, "_CHUNK_ELEMENTS", 8)  # one row per chunk
        monkeypatch.setattr(baselines, "_FULL_SCORES_ELEMENTS", 0)
    A = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    B = torch.eye(2)
    sel = gk.select(A, B, 2, method="topk")
    assert [ts.indices.tolist() for ts in sel.per_target] == [[0, 2], [1, 3]]


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_topk_reduce_is_one_ranking_shared_by_every_column(reduce):
    A, B, lrs = _problem()
    sel = gk.select(A, B, 7, method="topk", checkpoint_weights=lrs, num_checkpoints=3, topk_reduce=reduce)
    ref = _less_float64(A, B, 3, lrs)
    merged = ref.mean(1) if reduce == "mean" else ref.amax(1)
    want = torch.argsort(merged, descending=True, stable=True)[:7].tolist()
    assert sel.indices.tolist() == want and sel.num_targets == 3
    assert all(ts.indices.tolist() == want for ts in sel.per_target)
    assert sel.row_targets == [(0, 1, 2)] * 7
    np.testing.assert_allclose(sel.weights, merged[want].numpy(), rtol=1e-5, atol=1e-6)


def test_topk_per_column_honours_exclusions():
    A, B, lrs = _problem(m=2)
    first = gk.select(A, B, 5, method="topk")
    banned = [int(ts.indices[0]) for ts in first.per_target]
    sel = gk.select(A, B, 5, method="topk", exclude=banned)
    assert len(sel.per_target) == 2
    for ts in sel.per_target:
        assert not set(banned) & set(ts.indices.tolist()) and len(ts.indices) == 5


def test_random_gives_k_per_column_disjoint_and_m1_unchanged():
    A, B, _ = _problem(m=3, n=50)
    one = gk.select(A, B[:, 0], 6, method="random", seed=4)
    gen = torch.Generator().manual_seed(4)
    assert one.indices.tolist() == torch.randperm(50, generator=gen)[:6].tolist()  # as before: m = 1
    sel = gk.select(A, B, 6, method="random", seed=4)
    cols = [ts.indices.tolist() for ts in sel.per_target]
    assert all(len(c) == 6 for c in cols) and cols[0] == one.indices.tolist()
    assert len(set(sum(cols, []))) == 18 and len(sel.indices) == 18  # disjoint: the largest union
    assert sel.row_targets == [(0,)] * 6 + [(1,)] * 6 + [(2,)] * 6
    assert (sel.weights == 1).all()


def test_random_reuses_rows_only_once_the_pool_is_used_up():
    A, B, _ = _problem(m=3, n=10)
    sel = gk.select(A, B, 4, method="random", seed=1)
    assert all(len(ts.indices) == 4 and len(set(ts.indices.tolist())) == 4 for ts in sel.per_target)
    assert len(sel.indices) == 10


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
