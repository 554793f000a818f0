"""Filling the budget (select's ``fill``): pursuit stops early, the rest of each column's budget
goes to the best remaining candidates by a stated score, weight 0, marked, never a near-copy."""
import numpy as np
import pytest
import torch

import gtp_kernels as gk
from gtp_kernels.selection.fill import NEAR_COPY_COSINE
from problems import planted_problem


def _cos_w(A, v, weights=None, T=1):
    """float64 cos_W(a_i, v) with <x, y>_W = sum_t w_t <x^t, y^t>."""
    A = A.to(torch.float64)
    v = v.to(torch.float64)
    fw = torch.ones(A.shape[1], dtype=torch.float64) if weights is None else \
        torch.as_tensor(weights, dtype=torch.float64).repeat_interleave(A.shape[1] // T)
    return (A * fw) @ v / (torch.sqrt((A * A * fw).sum(1)) * torch.sqrt((v * v * fw).sum()))


def _best_rows(scores, banned, count):
    scores = scores.clone()
    scores[list(banned)] = -float("inf")
    return torch.sort(scores, descending=True, stable=True).indices[:count].tolist()


def test_without_fill_pursuit_stops_short_and_nothing_changes():
    A, B, supports, _ = planted_problem(200, 50, 4, seed=1, dtype=torch.float32)
    plain = gk.select(A, B[:, 0], 10)
    assert len(plain.indices) == 4 and plain.per_target[0].stopped_by == "tolerance"
    assert plain.num_filled == 0 and plain.num_pursued == 4 and not plain.filled.any()
    assert plain.params["fill"] is None


@pytest.mark.parametrize("method", ["gtp", "gtp-reference", "gtp-cosamp"])
def test_fill_target_tops_up_with_the_rows_most_similar_to_the_target(method):
    A, B, supports, _ = planted_problem(200, 50, 4, seed=1, dtype=torch.float32)
    b = B[:, 0]
    plain = gk.select(A, b, 10, method=method)
    sel = gk.select(A, b, 10, method=method, fill="target")
    n = len(plain.indices)
    assert len(sel.indices) == 10 and sel.num_pursued == n and sel.num_filled == 10 - n
    assert sel.indices[:n].tolist() == plain.indices.tolist()
    np.testing.assert_array_equal(sel.weights[:n], plain.weights)
    assert (sel.weights[n:] == 0).all() and sel.filled.tolist() == [False] * n + [True] * (10 - n)
    np.testing.assert_array_equal(sel.residual_norms, plain.residual_norms)  # the fit is unchanged
    assert sel.indices[n:].tolist() == _best_rows(_cos_w(A, b), plain.indices.tolist(), 10 - n)
    assert sel.per_target[0].filled == 10 - n and sel.per_target[0].num_pursued == n
    summary = sel.summary()
    assert (summary["pursued"], summary["filled"]) == (n, 10 - n)
    assert (summary["targets"][0]["pursued"], summary["targets"][0]["filled"]) == (n, 10 - n)
    assert [r["filled"] for r in sel.records()] == sel.filled.tolist()


def test_fill_residual_takes_what_pursuit_would_take_next():
    # a target off the span of any few rows, pursuit stopped by the iteration cap: the residual is real
    g = torch.Generator().manual_seed(3)
    A = torch.randn(300, 40, generator=g, dtype=torch.float64)
    b = torch.randn(40, generator=g, dtype=torch.float64)
    plain = gk.select(A, b, 12, max_iters=5)
    assert plain.per_target[0].stopped_by == "max_iters"
    sel = gk.select(A, b, 12, max_iters=5, fill="residual")
    n = len(plain.indices)
    rows = A[torch.as_tensor(plain.indices)]
    r = b - rows.T @ torch.as_tensor(plain.weights)
    assert sel.indices[n:].tolist() == _best_rows(_cos_w(A, r), plain.indices.tolist(), 12 - n)
    # and differs from the target's ranking here: the two scores are different policies
    by_target = gk.select(A, b, 12, max_iters=5, fill="target")
    assert by_target.indices[n:].tolist() != sel.indices[n:].tolist()


def test_fill_residual_plain_omp_ranks_by_absolute_correlation():
    g = torch.Generator().manual_seed(4)
    A = torch.randn(150, 30, generator=g, dtype=torch.float64)
    b = torch.randn(30, generator=g, dtype=torch.float64)
    plain = gk.select(A, b, 9, positive=False, max_iters=4)
    sel = gk.select(A, b, 9, positive=False, max_iters=4, fill="residual")
    n = len(plain.indices)
    r = b - A[torch.as_tensor(plain.indices)].T @ torch.as_tensor(plain.weights)
    assert sel.indices[n:].tolist() == _best_rows(_cos_w(A, r).abs(), plain.indices.tolist(), 9 - n)


def test_fill_scores_in_the_checkpoint_weighted_inner_product():
    g = torch.Generator().manual_seed(5)
    T, d = 2, 10
    A = torch.randn(120, T * d, generator=g, dtype=torch.float64)
    b = A[:3].sum(0)
    lrs = [0.95, 0.05]
    sel = gk.select(A, b, 8, checkpoint_weights=lrs, num_checkpoints=T, max_iters=3, fill="target")
    n = sel.num_pursued
    assert n < 8
    want = _best_rows(_cos_w(A, b, lrs, T), sel.indices[:n].tolist(), 8 - n)
    assert sel.indices[n:].tolist() == want
    unweighted = _best_rows(_cos_w(A, b), sel.indices[:n].tolist(), 8 - n)
    assert want != unweighted  # the weights matter in this problem


def test_fill_never_takes_a_near_copy_of_a_selected_row_or_of_another_fill():
    g = torch.Generator().manual_seed(6)
    D = 30
    base = torch.randn(60, D, generator=g, dtype=torch.float64)

    def near(row):
        return row + 0.01 * row.norm() * torch.randn(D, generator=g, dtype=torch.float64) / D ** 0.5

    b = base[0]
    halfway = base[0] + base[59] * base[0].norm() / base[59].norm()  # cosine with b about 0.7
    # the rows most similar to b after row 0 itself: two near-copies of it, two of each other
    A = torch.cat([base, torch.stack([near(base[0]), near(base[0]), near(halfway), near(halfway)])])
    sel = gk.select(A, b, 6, fill="target")
    assert sel.indices[: sel.num_pursued].tolist() == [0]
    filled = sel.indices[sel.num_pursued:].tolist()
    assert len(filled) == 5
    assert 60 not in filled and 61 not in filled  # near-copies of the selected row
    assert len({62, 63} & set(filled)) == 1  # one of two near-copies of each other
    unit = torch.nn.functional.normalize(A[torch.as_tensor(sel.indices)], dim=1)
    cos = unit @ unit.T
    assert (cos - torch.eye(len(cos), dtype=cos.dtype)).max() <= NEAR_COPY_COSINE
    # without the near-copy rule the top scores would have been exactly those copies
    assert set(_best_rows(_cos_w(A, b), [0], 4)) == {60, 61, 62, 63}


def test_fill_respects_exclusions_and_stops_when_the_pool_runs_out():
    g = torch.Generator().manual_seed(7)
    A = torch.randn(8, 20, generator=g, dtype=torch.float64)
    A[5] = 0.0  # never selectable
    b = A[0] * 2.0
    sel = gk.select(A, b, 8, exclude=[3], fill="target")
    assert 3 not in sel.indices.tolist() and 5 not in sel.indices.tolist()
    assert len(sel.indices) == 6 and sel.num_pursued == 1 and sel.num_filled == 5


def test_fill_with_align_threshold_fills_only_aligned_rows():
    g = torch.Generator().manual_seed(8)
    A = torch.randn(100, 20, generator=g, dtype=torch.float64)
    b = A[0] + A[1]
    sel = gk.select(A, b, 30, align_threshold=0.0, fill="target")
    cos = _cos_w(A, b)
    assert (cos[torch.as_tensor(sel.indices)] > 0).all()
    assert len(sel.indices) == min(30, int((cos > 0).sum()))


def test_fill_is_per_target_column():
    A, B, supports, _ = planted_problem(200, 50, 4, seed=2, dtype=torch.float32, m=2)
    sel = gk.select(A, B, 7, fill="target")
    assert sel.num_targets == 2
    for c, ts in enumerate(sel.per_target):
        assert len(ts.indices) == 7 and ts.num_pursued == 4 and ts.filled == 3
        want = _best_rows(_cos_w(A, B[:, c]), ts.indices[:4].tolist(), 3)
        assert ts.indices[4:].tolist() == want
    served = dict(zip(sel.indices.tolist(), sel.row_targets))
    for c, ts in enumerate(sel.per_target):
        assert all(c in served[i] for i in ts.indices.tolist())
    # pursued rows of the union come first, then the filled ones
    assert sel.filled.tolist() == sorted(sel.filled.tolist())
    assert sel.num_pursued == len(set(supports[0].tolist()) | set(supports[1].tolist()))


@pytest.mark.parametrize("method", ["topk", "random"])
def test_fill_leaves_methods_that_always_give_k_alone(method):
    A, B, _, _ = planted_problem(100, 20, 4, seed=3, dtype=torch.float32)
    plain = gk.select(A, B[:, 0], 9, method=method)
    sel = gk.select(A, B[:, 0], 9, method=method, fill="residual")
    assert sel.indices.tolist() == plain.indices.tolist() and sel.num_filled == 0


@pytest.mark.parametrize("bad", ["topk", "", 1, True])
def test_fill_bad_value_is_an_input_error(bad):
    A, B, _, _ = planted_problem(50, 10, 2, seed=3, dtype=torch.float32)
    with pytest.raises(gk.InputError, match="fill must be"):
        gk.select(A, B[:, 0], 3, fill=bad)
