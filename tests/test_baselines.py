"""The baselines (selection/baselines.py): top-k by the LESS score against a float64
reference, k per target column or one shared ranking, ties to the lowest index, exclusions,
streaming chunks; random selection, seeded and disjoint across columns."""
import numpy as np
import pytest
import torch

import gtp_kernels as gk
import gtp_kernels.selection.baselines as baselines
from gtp_kernels.selection.baselines import less_scores, top_k_per_column
from gtp_kernels.validation import validate_problem


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
        monkeypatch.setattr(baselines, "CHUNK_ELEMENTS", 40)
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
        monkeypatch.setattr(baselines, "CHUNK_ELEMENTS", 8)  # one row per chunk
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


def _less_score_float64(A, B, T, lrs):
    a = A.to(torch.float64).reshape(A.shape[0], T, -1)
    bt = B.to(torch.float64).T.reshape(B.shape[1], T, -1)
    w = torch.as_tensor(lrs, dtype=torch.float64) / sum(lrs)
    score = torch.zeros(A.shape[0], B.shape[1], dtype=torch.float64)
    for i in range(A.shape[0]):
        for c in range(B.shape[1]):
            for t in range(T):
                score[i, c] += w[t] * torch.dot(a[i, t], bt[c, t]) / (a[i, t].norm() * bt[c, t].norm())
    return score


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_topk_equals_direct_float64_less_score(reduce):
    g = torch.Generator().manual_seed(11)
    T, d, n, m = 3, 7, 50, 4
    A = torch.randn(n, T * d, generator=g, dtype=torch.float32)
    B = torch.randn(T * d, m, generator=g, dtype=torch.float32)
    lrs = [3.0, 2.0, 1.0]
    ref = _less_score_float64(A, B, T, lrs)
    ref = ref.mean(1) if reduce == "mean" else ref.amax(1)
    problem = validate_problem(A, B, 5, checkpoint_weights=lrs, num_checkpoints=T)
    got = less_scores(problem, reduce, torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)  # float32 inputs, float64 maths
    sel = gk.select(A.reshape(n, T, d), B, 10, method="topk", checkpoint_weights=lrs, topk_reduce=reduce)
    assert sel.indices.tolist() == torch.argsort(ref, descending=True, stable=True)[:10].tolist()


def test_top_k_per_column_is_each_columns_float64_ranking_with_exclusions_last():
    """top_k_per_column directly: (k, m) rows and scores, best first; excluded rows score -inf
    and come last when the eligible rows run out."""
    A, B, lrs = _problem(m=2, n=12)
    problem = validate_problem(A, B, 12, checkpoint_weights=lrs, num_checkpoints=3, exclude=[0, 5])
    rows, scores = top_k_per_column(problem, 12, torch.float64)
    ref = _less_float64(A, B, 3, lrs)
    assert rows.shape == (12, 2) and scores.shape == (12, 2)
    for c in range(2):
        eligible = [i for i in torch.argsort(ref[:, c], descending=True, stable=True).tolist() if i not in (0, 5)]
        assert rows[:10, c].tolist() == eligible
        torch.testing.assert_close(scores[:10, c], ref[eligible, c], rtol=1e-12, atol=1e-12)
        assert sorted(rows[10:, c].tolist()) == [0, 5] and bool((scores[10:, c] == -float("inf")).all())


def test_less_scores_refuses_an_unknown_reduction():
    A, B, lrs = _problem(m=2, n=12)
    with pytest.raises(ValueError, match="'mean' or 'max'"):
        less_scores(validate_problem(A, B, 3), "median")
