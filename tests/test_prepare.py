"""The one preparation path (selection/prepare.py): option checks, validation, the exact
power-of-two scaling, the align_threshold guard and the candidate screen, for select and for one
rank's shard."""
import math

import numpy as np
import pytest
import torch

import gtp_kernels as gk
from gtp_kernels.selection.prepare import (check_options, exclude_misaligned, exclude_unscreened, prepare,
                                           prepare_shard, screen_size, select_options)
from gtp_kernels.selection.rows import RowSource

from conftest import requires_cuda
from gtp_kernels.validation import InputError, InputTypeError, validate_problem

A = torch.randn(30, 12, generator=torch.Generator().manual_seed(0))
B = torch.randn(12, 2, generator=torch.Generator().manual_seed(1))


def test_check_options_cleans_numpy_values_and_passes_others_through():
    out = check_options(ridge=np.float32(0.5), tol=0, max_iters=np.int64(7), positive=np.bool_(False),
                        seed=np.uint8(3), batch_size=None, fill=None, strategy="cached", prefetch=np.int32(2),
                        backend="torch", compute_dtype=torch.float64, anything="as given")
    assert out == dict(ridge=0.5, tol=0.0, max_iters=7, positive=False, seed=3, batch_size=None, fill=None,
                       strategy="cached", prefetch=2, backend="torch", compute_dtype=torch.float64,
                       anything="as given")
    assert type(out["max_iters"]) is int and type(out["ridge"]) is float and type(out["positive"]) is bool


@pytest.mark.parametrize("options,error,match", [
    (dict(ridge=-1.0, max_iters=0), InputError, r"ridge must be finite and lie in \[0, inf\]"),  # select's order
    (dict(max_iters=0, positive="yes"), InputError, "max_iters must be an integer >= 1, got 0"),
    (dict(max_iters=1.5), InputTypeError, "max_iters must be an integer"),
    (dict(prefetch=-1), InputError, "prefetch must be an integer >= 0"),
    (dict(strategy="fast"), InputError, "strategy must be 'auto', 'direct' or 'cached', got 'fast'"),
    (dict(backend="cuda"), InputError, "backend must be 'auto', 'triton' or 'torch', got 'cuda'"),
    (dict(compute_dtype=torch.float16), InputError, "compute_dtype must be torch.float32 or torch.float64"),
    (dict(stop_ratio=1.0), InputError, r"stop_ratio must lie in \[0, 1\)"),
    (dict(min_cosine=1.5), InputError, r"min_cosine must be finite and lie in \[-1, 1\]"),
    (dict(fill="best"), InputError, "fill must be None, 'target' or 'residual', got 'best'"),
    (dict(screen=0.5), InputError, r"screen must be finite and lie in \[1, inf\]"),
    (dict(screen=float("nan")), InputError, "screen must be finite"),
    (dict(screen="2"), InputTypeError, "screen must be a number"),
])
def test_check_options_raises_on_the_first_bad_option(options, error, match):
    with pytest.raises(error, match=match):
        check_options(**options)


def test_prepare_scales_exactly_by_powers_of_two_and_keeps_the_given_weights():
    w = torch.tensor([3.0, 1e-3, 0.5], dtype=torch.float64)
    targets = B * torch.tensor([1e6, 1e-7])
    prepared = prepare(A, targets, 4, checkpoint_weights=w, num_checkpoints=3, ridge=0.3, tol=1e-6)
    scaled = prepared.problem.targets
    peaks = scaled.abs().amax(dim=0).tolist()
    assert all(0.5 <= p < 1 for p in peaks)
    for c, scale in enumerate(prepared.scaling.target_scales):
        assert math.frexp(scale)[0] == 0.5  # a power of two: exact
        torch.testing.assert_close(scaled[:, c] * scale, targets[:, c].double(), rtol=0, atol=0)
    c = prepared.scaling.weight_scale
    assert math.log(c, 4).is_integer() and 0.25 <= float(prepared.problem.checkpoint_weights.max()) < 1
    torch.testing.assert_close(prepared.problem.checkpoint_weights * c, w, rtol=0, atol=0)
    assert prepared.options.ridge == 0.3 / c and prepared.checked["ridge"] == 0.3
    assert prepared.checkpoint_weights.tolist() == w.tolist()  # reported as given
    params = prepared.params(("ridge", "tol"))
    assert (params["ridge"], params["tol"], params["checkpoint_weights"]) == (0.3, 1e-6, w.tolist())
    assert "guard_excluded" not in params  # reported after align_threshold only
    assert (params["num_candidates"], params["dim"], params["num_targets"]) == (30, 12, 2)


def test_select_options_takes_the_methods_fields_and_scales_ridge():
    prepared = prepare(A, B, 4, ridge=0.5, max_iters=9, batch_size=5, seed=2, positive=False, fill="target")
    opts = prepared.options
    assert (opts.ridge, opts.max_iters, opts.batch_size, opts.seed, opts.positive) == (0.5, 9, 5, 2, False)
    assert select_options({"ridge": 0.5, "strategy": "cached"}).ridge == 0.5  # strategy is no SelectOptions field


def _misaligned_float64(A, B, threshold):
    a = A.double() / A.double().norm(dim=1, keepdim=True)
    b = B.double() / B.double().norm(dim=0, keepdim=True)
    return (a @ b).amax(dim=1) <= threshold


@pytest.mark.parametrize("threshold", [-0.2, 0.0, 0.3])
def test_guard_excludes_the_rows_aligned_with_no_target(threshold):
    prepared = prepare(A, B, 3, align_threshold=threshold)
    want = _misaligned_float64(A, B, threshold)
    assert prepared.problem.exclude.tolist() == want.tolist()
    assert prepared.guard_excluded == int(want.sum()) > 0
    assert prepared.params(("align_threshold",))["guard_excluded"] == int(want.sum())
    problem, count = exclude_misaligned(validate_problem(A, B, 3, exclude=[0]), threshold)
    assert count == int((want & (torch.arange(30) != 0)).sum()) and bool(problem.exclude[0])


def test_guard_that_excludes_everything_is_an_input_error():
    with pytest.raises(InputError, match="align_threshold=0.99 excludes every candidate"):
        prepare(A, B, 3, align_threshold=0.99)


def test_prepare_shard_prepares_a_rank_rows_as_prepare_does():
    checked = check_options(ridge=0.1, tol=1e-6, align_threshold=0.0, positive=True, backend="auto",
                            compute_dtype=None, min_cosine=None, stop_ratio=None, max_iters=None,
                            strategy="auto", prefetch=None)
    options = {k: v for k, v in checked.items() if k not in ("strategy", "prefetch")}
    whole = prepare(A[10:], B, 3, exclude=[0], **options)  # the same rows through select's path
    shard = prepare_shard(A[10:], B, 25, checkpoint_weights=None, num_checkpoints=None, exclude=[0],
                          checked=checked)  # k above the shard's rows: judged over the pool later
    assert shard.prepared.problem.exclude.tolist() == whole.problem.exclude.tolist()
    assert shard.prepared.guard_excluded == whole.guard_excluded > 0
    torch.testing.assert_close(shard.prepared.problem.targets, whole.problem.targets, rtol=0, atol=0)
    assert shard.prepared.options == whole.options
    assert shard.selectable == 19  # 20 rows, one excluded (before the guard)
    norms = A[10:].double().norm(dim=1)  # over every non-zero row, excluded or not
    assert shard.norm_range == pytest.approx((float(norms.min()), float(norms.max())), rel=1e-6)


def test_prepare_shard_accepts_empty_and_all_zero_shards():
    checked = check_options(ridge=0.0, tol=1e-6, align_threshold=0.0, backend="auto", compute_dtype=None)
    for rows in (A[:0], torch.zeros(5, 12)):
        shard = prepare_shard(rows, B, 3, checkpoint_weights=None, num_checkpoints=None, exclude=None,
                              checked=checked)
        assert shard.selectable == 0 and shard.prepared.guard_excluded == 0
        assert shard.prepared.problem.num_candidates == rows.shape[0]
    with pytest.raises(InputError, match="NaN or Inf"):
        bad = A[:5].clone()
        bad[2, 3] = float("nan")
        prepare_shard(bad, B, 3, checkpoint_weights=None, num_checkpoints=None, exclude=None, checked=checked)


def _screened_float64(A, B, exclude, size, weights=None, T=1):
    """The screen from its definition, in float64 and plain Python: each column ranks the
    selectable rows by weighted cosine (ties to the lowest row); whole ranks r = 1, 2, ... until
    the union of the columns' r best rows holds ``size`` rows. The kept rows, as a set."""
    A, B = A.double(), B.double()
    if weights is not None:
        scale = torch.as_tensor(weights, dtype=torch.float64).sqrt().repeat_interleave(A.shape[1] // T)
        A, B = A * scale, B * scale[:, None]
    cos = (A / A.norm(dim=1, keepdim=True)) @ (B / B.norm(dim=0, keepdim=True))
    rows = [i for i in range(A.shape[0]) if i not in set(exclude)]
    if size >= len(rows):
        return set(rows)
    rankings = [sorted(rows, key=lambda i: (-float(cos[i, c]), i)) for c in range(B.shape[1])]
    kept = set()
    for r in range(len(rows)):
        kept.update(ranking[r] for ranking in rankings)
        if len(kept) >= size:
            return kept
    raise AssertionError("unreachable")


@pytest.mark.parametrize("n,m,size", [(37, 1, 5), (37, 3, 7), (41, 4, 13), (23, 5, 22), (23, 2, 30)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_screen_keeps_the_union_of_whole_ranks_as_its_definition_says(n, m, size, dtype):
    g = torch.Generator().manual_seed(n * 10 + m)
    A = torch.randn(n, 15, generator=g).to(dtype)
    Bm = torch.randn(15, m, generator=g)
    weights = [0.5, 2.0, 1.0]
    exclude = [0, 4, n - 1]
    problem = validate_problem(A, Bm, 1, checkpoint_weights=weights, num_checkpoints=3, exclude=exclude)
    screened, count = exclude_unscreened(problem, size)
    want = _screened_float64(A.double(), Bm, exclude, size, weights, T=3)
    kept = set(torch.nonzero(~screened.exclude).flatten().tolist())
    assert kept == want
    assert count == n - len(exclude) - len(want)
    assert len(want) >= min(size, n - len(exclude))


def test_screen_breaks_ties_by_the_lowest_row_whatever_the_chunks():
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    A = torch.cat([base, base, base])  # every row three times: rows i, i + 6, i + 12 tie for every column
    Bm = torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    problem = validate_problem(A, Bm, 1)
    want = _screened_float64(A, Bm, [], 5)
    assert all(i - 6 in want for i in want if i >= 6)  # a tie goes to the first copy
    for blocks in ([A], [A[:4], A[4:7], A[7:13], A[13:]], [A[i : i + 1] for i in range(18)]):
        chunked = validate_problem(RowSource(blocks), Bm, 1) if len(blocks) > 1 else problem
        screened, _ = exclude_unscreened(chunked, 5)
        assert set(torch.nonzero(~screened.exclude).flatten().tolist()) == want


def test_screen_size_counts_the_rows_the_selection_can_hold():
    assert screen_size(2.0, 10, 1, joint=False) == 20
    assert screen_size(2.0, 10, 4, joint=False) == 80  # k per column
    assert screen_size(2.0, 10, 4, joint=True) == 20  # k in all
    assert screen_size(1.5, 7, 1, joint=True) == 11  # ceil


def test_select_with_a_screen_picks_inside_it_and_reports_what_it_excluded():
    g = torch.Generator().manual_seed(5)
    A = torch.randn(60, 12, generator=g, dtype=torch.float64)
    Bm = torch.randn(12, 3, generator=g, dtype=torch.float64)
    for targets, size in (("joint", 8), ("columns", 24)):
        sel = gk.select(A, Bm, 4, targets=targets, screen=2, fill="target")
        kept = _screened_float64(A, Bm, [], size)
        assert set(sel.indices.tolist()) <= kept  # pursued and filled rows alike
        assert sel.params["screen"] == 2.0 and sel.params["screened_out"] == 60 - len(kept)
    whole = gk.select(A, Bm, 4, targets="joint")
    wide = gk.select(A, Bm, 4, targets="joint", screen=15)  # 60 rows: the screen keeps them all
    assert wide.params["screened_out"] == 0 and wide.indices.tolist() == whole.indices.tolist()
    assert whole.params["screen"] is None and whole.params["screened_out"] == 0


def test_screen_keeps_pursuit_from_chasing_the_residual_with_an_atypical_row():
    """b = (1, 0.5, 0, 0). Typical rows are close to b but explain its first coordinate only; an
    atypical row (0, 1, 0.9, 0) has cosine 0.33 with b but, once a typical row is in, the largest
    correlation with the residual (0, 0.5, 0, 0): pursuit takes it second. The screen (2 x 2 rows
    of 6) leaves pursuit the rows close to b."""
    typical = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.05, 0.1, 0.0], [1.0, 0.1, 0.0, 0.1],
                            [1.0, 0.0, 0.05, 0.05], [0.9, 0.1, 0.0, 0.2]], dtype=torch.float64)
    atypical = torch.tensor([[0.0, 1.0, 0.9, 0.0]], dtype=torch.float64)
    A = torch.cat([typical, atypical])
    b = torch.tensor([1.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    assert gk.select(A, b, 2).indices.tolist() == [2, 5]  # the closest typical row, then the atypical one
    screened = gk.select(A, b, 2, screen=2)
    assert 5 not in screened.indices.tolist() and screened.params["screened_out"] == 2


@pytest.mark.parametrize("method", sorted(gk.METHODS))
@pytest.mark.parametrize("targets", ["columns", "joint"])
def test_screened_select_equals_the_whole_pool_with_the_others_excluded(method, targets):
    """select runs the method and the fill on the screened rows alone (api._screened_rows); the
    picks, weights and residuals are those of the whole pool with the unscreened rows excluded,
    for a tensor and for row blocks read in place."""
    g = torch.Generator().manual_seed(7)
    A = torch.randn(83, 2, 7, generator=g, dtype=torch.float64)
    Bm = torch.randn(14, 3, generator=g, dtype=torch.float64)
    options = dict(method=method, targets=targets, checkpoint_weights=[0.3, 1.2], fill="target", seed=5)
    if targets == "joint" and method not in ("gtp", "gtp-cosamp", "topk", "random"):
        pytest.skip(f"{method} has no joint mode")
    k = 5
    screened = gk.select(A, Bm, k, screen=1.5, exclude=[1, 2], **options)
    prepared = prepare(A, Bm, k, checkpoint_weights=[0.3, 1.2], exclude=[1, 2])
    size = screen_size(1.5, k, 3, targets == "joint")
    outside = exclude_unscreened(prepared.problem, size)[0].exclude.numpy()
    whole = gk.select(A, Bm, k, exclude=outside, **options)
    blocks = gk.select([A[:30].numpy(), A[30:].numpy()], Bm, k, screen=1.5, exclude=[1, 2], **options)
    for got in (screened, blocks):
        assert got.indices.tolist() == whole.indices.tolist()
        np.testing.assert_allclose(got.weights, whole.weights, rtol=1e-12, atol=1e-12)
        for g_t, w_t in zip(got.per_target, whole.per_target):
            assert g_t.indices.tolist() == w_t.indices.tolist() and g_t.filled == w_t.filled
            np.testing.assert_allclose(g_t.residual_norms, w_t.residual_norms, rtol=1e-12, atol=1e-12)
    assert screened.params["screened_out"] == int(outside.sum()) - 2 and screened.params["num_candidates"] == 83
    kept_share = (83 - int(outside.sum())) / 83  # passes count reads of the pool: the screen's, then the method's
    for s_t, w_t in zip(screened.per_target, whole.per_target):
        assert s_t.passes == pytest.approx(1.0 + w_t.passes * kept_share, rel=1e-12)


@requires_cuda
@pytest.mark.parametrize("targets", ["columns", "joint"])
def test_screen_on_cuda_keeps_and_selects_what_it_does_on_the_cpu(targets):
    """The screen's ranking (stable sorts, scatter_reduce) and the gathered method on a GPU; a GPU
    run is the only place this is checked (CI has none)."""
    g = torch.Generator().manual_seed(11)
    A = torch.randn(301, 3, 9, generator=g, dtype=torch.float64)
    Bm = torch.randn(27, 4, generator=g, dtype=torch.float64)
    options = dict(targets=targets, checkpoint_weights=[0.5, 1.0, 2.0], screen=1.5, fill="target", exclude=[3, 7])
    on_cpu = gk.select(A, Bm, 9, **options)
    on_gpu = gk.select(A, Bm, 9, device="cuda", **options)
    assert on_gpu.indices.tolist() == on_cpu.indices.tolist()
    assert on_gpu.params["screened_out"] == on_cpu.params["screened_out"] > 0
    np.testing.assert_allclose(on_gpu.weights, on_cpu.weights, rtol=1e-9, atol=1e-12)
    problem = validate_problem(A.cuda(), Bm.cuda(), 1, checkpoint_weights=[0.5, 1.0, 2.0], exclude=[3, 7])
    kept = exclude_unscreened(problem, 40)[0].exclude.cpu()
    want = exclude_unscreened(validate_problem(A, Bm, 1, checkpoint_weights=[0.5, 1.0, 2.0], exclude=[3, 7]), 40)[0]
    assert kept.tolist() == want.exclude.tolist()
