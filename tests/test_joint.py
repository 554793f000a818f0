"""Joint selection (``select(..., targets="joint")``): one budget shared by several target
columns, each scaled to unit norm, against a float64 reference written from the definition
(scipy's NNLS per column on the shared support, from scratch every iteration)."""
import numpy as np
import pytest
import torch
from scipy.optimize import nnls

import gtp_kernels as gk
from gtp_kernels.validation import InputError


def reference_joint(A, B, k, feature_weights=None, tol=1e-6, min_cosine=1e-10):
    """Simultaneous non-negative OMP from its definition (selection/joint.py), float64.

    Returns (support in pick order, (|S|, m) weights for the unit columns, (iterations + 1, m)
    relative residual norms)."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64).reshape(A.shape[1], -1)
    fw = np.ones(A.shape[1]) if feature_weights is None else np.asarray(feature_weights, dtype=np.float64)
    sq = np.sqrt(fw)
    Aw, Bw = A * sq, B * sq[:, None]  # plain inner products in the weighted space
    U = Bw / np.linalg.norm(Bw, axis=0)
    m = U.shape[1]
    norms = np.linalg.norm(Aw, axis=1)
    support, banned = [], set()
    W = np.zeros((0, m))
    R = U.copy()
    hist = [np.ones(m)]
    for _ in range(2 * k + 10):
        if len(support) == k:
            break
        score = np.linalg.norm(np.maximum(Aw @ R, 0.0), axis=1) / np.where(norms > 0, norms, np.inf)
        score[support + sorted(banned)] = -np.inf
        score[norms == 0] = -np.inf
        j = int(np.argmax(score))
        if score[j] <= min_cosine * np.linalg.norm(R):
            break
        trial = support + [j]
        Wt = np.stack([nnls(Aw[trial].T, U[:, c])[0] for c in range(m)], axis=1)
        keep = (Wt > 0).any(axis=1)
        if not keep[-1]:
            banned.add(j)
        support = [a for a, kept in zip(trial, keep) if kept]
        W = Wt[keep]
        R = U - Aw[support].T @ W
        hist.append(np.linalg.norm(R, axis=0))
        if np.sqrt(np.mean(hist[-1] ** 2)) < tol:
            break
    return support, W, np.asarray(hist)


def unit_weights(sel):
    """(|S|, m) weights of each column for its unit-norm target, from the per-column results."""
    return np.stack([ts.weights / ts.residual_norms[0] for ts in sel.per_target], axis=1)


@pytest.mark.parametrize("n, dim, m, k, seed", [(37, 13, 3, 5, 0), (50, 9, 1, 4, 1), (61, 23, 5, 9, 2),
                                                  (29, 31, 2, 7, 3)])
def test_matches_the_float64_reference_on_awkward_shapes(n, dim, m, k, seed):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, dim))
    B = rng.standard_normal((dim, m)) * rng.uniform(0.1, 30.0, m)  # columns of very different norms
    sel = gk.select(A, B, k, targets="joint")
    support, W, hist = reference_joint(A, B, k)
    assert sel.indices.tolist() == support
    np.testing.assert_allclose(unit_weights(sel), W, rtol=1e-8, atol=1e-10)
    rel = np.stack([ts.residual_norms / ts.residual_norms[0] for ts in sel.per_target], axis=1)
    np.testing.assert_allclose(rel, hist, rtol=1e-8, atol=1e-12)
    # the combined weight: the mean over columns of the unit-column weights
    np.testing.assert_allclose(sel.weights, W.mean(axis=1), rtol=1e-8, atol=1e-12)
    # each column's weights fit its own target: b_j ~ A_S^T w_j, with the reported residual
    for c, ts in enumerate(sel.per_target):
        r = B[:, c] - A[ts.indices].T @ ts.weights
        assert np.linalg.norm(r) == pytest.approx(ts.residual_norms[-1], rel=1e-8)


def test_matches_the_reference_with_checkpoint_weights():
    rng = np.random.default_rng(7)
    T, d = 3, 7
    A = rng.standard_normal((45, T * d))
    B = rng.standard_normal((T * d, 4))
    lr = np.array([0.5, 2.0, 0.125])
    sel = gk.select(A, B, 6, targets="joint", checkpoint_weights=lr, num_checkpoints=T)
    support, W, _ = reference_joint(A, B, 6, feature_weights=np.repeat(lr, d))
    assert sel.indices.tolist() == support
    np.testing.assert_allclose(unit_weights(sel), W, rtol=1e-8, atol=1e-10)


def planted_shared(n=200, dim=80, k=6, m=4, seed=0):
    """B = A_S^T W* with W* >= 0 on one support S of k rows; every row of S serves some column
    and no column uses all of S (columns share parts of the support)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, dim))
    S = rng.choice(n, k, replace=False)
    W = rng.uniform(0.5, 2.0, (k, m)) * (rng.random((k, m)) < 0.6)
    W[np.arange(k), np.arange(k) % m] = rng.uniform(0.5, 2.0, k)  # every row used by some column
    W[0, :] = 0.0
    W[0, 1] = 1.0
    return A, A[S].T @ W, S, W


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_a_planted_shared_support(seed):
    A, B, S, W = planted_shared(seed=seed)
    sel = gk.select(A, B, len(S), targets="joint")
    assert sorted(sel.indices.tolist()) == sorted(S.tolist())
    assert sel.relative_residual < 1e-6
    order = [S.tolist().index(i) for i in sel.indices.tolist()]
    for c, ts in enumerate(sel.per_target):  # each column's own weights, zeros included
        np.testing.assert_allclose(ts.weights, W[order, c], rtol=1e-6, atol=1e-8)
    # a larger budget stops at the fit: nothing is left to match
    more = gk.select(A, B, 3 * len(S), targets="joint")
    assert sorted(more.indices.tolist()) == sorted(S.tolist())
    assert more.per_target[0].stopped_by == "tolerance"


@pytest.mark.parametrize("seed", range(4))
def test_residual_norms_never_increase(seed):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((120, 40)) + 0.5  # correlated rows: the NNLS active set moves
    B = rng.standard_normal((40, 6)) + 0.5
    sel = gk.select(A, B, 30, targets="joint")
    norms = sel.residual_norms  # (iterations + 1, m)
    assert norms.shape[1] == 6 and norms.shape[0] > 5
    assert (np.diff(norms, axis=0) <= 1e-12 * norms[:-1]).all()
    rms = np.sqrt(np.mean((norms / norms[0]) ** 2, axis=1))
    assert (np.diff(rms) <= 1e-12).all()


def test_never_picks_exact_duplicates_or_positive_multiples():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((40, 30))
    A = np.concatenate([base, base[:10] * 3.0, base[:10]])  # copies of rows 0..9 at 40..59
    B = base[:8].T @ rng.uniform(0.5, 1.5, (8, 3)) + 0.1 * rng.standard_normal((30, 3))
    sel = gk.select(A, B, 25, targets="joint")
    units = A[sel.indices] / np.linalg.norm(A[sel.indices], axis=1, keepdims=True)
    cos = units @ units.T - np.eye(len(units))
    assert cos.max() < 1 - 1e-9
    top = gk.select(A, B, 25, targets="joint", method="topk")  # top-k takes copies
    tops = A[top.indices] / np.linalg.norm(A[top.indices], axis=1, keepdims=True)
    assert (tops @ tops.T - np.eye(len(tops))).max() > 1 - 1e-9


def test_one_column_matches_gtp_on_rows_of_equal_norm():
    rng = np.random.default_rng(5)
    A = rng.standard_normal((90, 25))
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    b = rng.standard_normal(25)
    joint = gk.select(A, b, 12, targets="joint")
    plain = gk.select(A, b, 12)
    assert joint.indices.tolist() == plain.indices.tolist()
    np.testing.assert_allclose(joint.weights * np.linalg.norm(b), plain.weights, rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_recover_the_planted_support(dtype):
    A, B, S, _ = planted_shared(seed=4)
    A_low = torch.as_tensor(A).to(dtype)
    B_exact = (A_low.to(torch.float64)[torch.as_tensor(S)].T
               @ torch.as_tensor(planted_shared(seed=4)[3]))  # the target of the rounded rows
    sel = gk.select(A_low, B_exact.to(torch.float32), len(S), targets="joint")
    assert sorted(sel.indices.tolist()) == sorted(S.tolist())
    assert sel.params["compute_dtype"] == "torch.float32"
    assert sel.relative_residual < 1e-4


def test_joint_baselines_share_one_ranking_and_budget():
    rng = np.random.default_rng(2)
    A = rng.standard_normal((70, 12))
    B = rng.standard_normal((12, 4))
    for reduce in ("mean", "max"):
        sel = gk.select(A, B, 9, targets="joint", method="topk", topk_reduce=reduce)
        ref = gk.select(A, B, 9, method="topk", topk_reduce=reduce)  # one ranking serving every column
        assert len(sel.indices) == 9 and sel.indices.tolist() == ref.indices.tolist()
    mean = gk.select(A, B, 9, targets="joint", method="topk")  # "column" reads as "mean" in joint mode
    assert mean.indices.tolist() == gk.select(A, B, 9, method="topk", topk_reduce="mean").indices.tolist()
    rand = gk.select(A, B, 9, targets="joint", method="random", seed=3)
    assert len(rand.indices) == 9 and len(set(rand.indices.tolist())) == 9
    assert rand.params["targets"] == "joint"


def test_fill_tops_the_shared_selection_up_to_k():
    A, B, S, _ = planted_shared(seed=1)
    sel = gk.select(A, B, 15, targets="joint", fill="target")
    assert len(sel.indices) == 15 and sel.num_filled == 15 - len(S)
    assert sorted(sel.indices[: len(S)].tolist()) == sorted(S.tolist())
    assert (sel.weights[len(S):] == 0).all() and sel.filled[len(S):].all()
    assert all(len(ts.indices) == 15 for ts in sel.per_target)


def test_bad_input_is_refused():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((20, 6))
    B = rng.standard_normal((6, 2))
    with pytest.raises(InputError, match="targets"):
        gk.select(A, B, 3, targets="together")
    with pytest.raises(InputError, match="targets"):
        gk.select(A, B, 3, targets=1)
    with pytest.raises(InputError, match="joint"):
        gk.select(A, B, 3, targets="joint", method="gtp-reference")
    with pytest.raises(InputError, match="all zero"):
        gk.select(A, np.zeros((6, 2)), 3, targets="joint")
    with pytest.raises(InputError):
        gk.select(A, B, 21, targets="joint")


def test_rows_in_blocks_select_as_one_array():
    A, B, S, _ = planted_shared(n=90, dim=40, k=5, m=3, seed=6)
    whole = gk.select(A, B, 8, targets="joint", fill="target")
    blocks = gk.select([A[:31], A[31:70], A[70:]], B, 8, targets="joint", fill="target")
    assert blocks.indices.tolist() == whole.indices.tolist()
    np.testing.assert_allclose(blocks.weights, whole.weights, rtol=1e-12)
