"""The public API (api.py): select's method registry, its progress bar, fit_residual, and the
Selection every method returns (union over targets, weights, records, summary)."""
import numpy as np
import pytest
import torch

import gtp_kernels as gk
import gtp_kernels.api as api
from gtp_kernels.selection.common import TargetSelection
from gtp_kernels.validation import InputError

A = torch.randn(20, 12, generator=torch.Generator().manual_seed(0))
b = torch.randn(12, generator=torch.Generator().manual_seed(1))


def test_progress_bar_completes_for_methods_that_pick_at_once(monkeypatch):
    bars = []

    class Bar:
        def __init__(self, total):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, x=1):
            self.n += x

        def close(self):
            pass

    def fake_progress_bar(enabled, total, desc):
        bar = Bar(total)
        return bar, bar.update

    monkeypatch.setattr(api, "_progress_bar", fake_progress_bar)
    for method in ("topk", "random", "gtp"):
        bars.clear()
        gk.select(A, torch.stack([b, -b], dim=1), 3, method=method, progress=True)
        assert bars[-1].n == bars[-1].total == 6, method


def test_fit_residual_checks_its_indices():
    with pytest.raises(InputError, match=r"indices must lie in \[0, 20\)"):
        gk.fit_residual(A, b, [1000])
    with pytest.raises(InputError, match=r"indices must lie in \[0, 20\)"):
        gk.fit_residual(A, b, [-1])
    with pytest.raises(InputError, match="indices must be integers"):
        gk.fit_residual(A, b, [0.5])
    for bools in ([True, 1], [True, False] * 10, np.ones(20, dtype=bool), torch.zeros(20, dtype=torch.bool)):
        with pytest.raises(InputError, match="got bools"):  # numpy would read them as rows 0 and 1
            gk.fit_residual(A, b, bools)
    assert gk.fit_residual(A, b, torch.tensor([1, 2])) == gk.fit_residual(A, b, [1, 2])


def test_fit_residual_computes_in_float64_for_any_pool():
    """fit_residual fits in float64: float32 pools outside select's float32 range, and pools
    with no selectable row, are scored rather than refused."""
    big = A * 1e20
    target = big[:3].sum(dim=0).double()
    assert gk.fit_residual(big, target, [0, 1, 2]) < 1e-6
    assert gk.fit_residual(torch.zeros(20, 12), b, [0, 1]) == pytest.approx(1.0)


@pytest.mark.parametrize("ridge", ["0.1", float("nan"), -1.0, 1j])
def test_fit_residual_checks_ridge(ridge):
    with pytest.raises(InputError, match="ridge must be"):
        gk.fit_residual(A, b, [0, 1], ridge=ridge)


def test_fit_residual_is_the_float64_nnls_residual_of_the_given_rows():
    """Against scipy's NNLS on the same rows, in float64; max over target columns."""
    from scipy.optimize import nnls

    B = torch.stack([b, A[:4].sum(dim=0)], dim=1)
    rows = [0, 1, 2, 3, 7]
    want = []
    for c in range(2):
        target = B[:, c].double().numpy()
        _, resid = nnls(A[rows].double().numpy().T, target)
        want.append(resid / np.linalg.norm(target))
    assert gk.fit_residual(A, B[:, 0], rows) == pytest.approx(want[0], rel=1e-9)
    assert gk.fit_residual(A, B, rows) == pytest.approx(max(want), rel=1e-9)
    # the second column is in the rows' cone, up to the float32 rounding of its sum
    assert gk.fit_residual(A, B[:, 1], rows) < 1e-6
    assert gk.fit_residual(A, b, []) == 1.0


def _echo_first_rows(problem, k, opts, progress):
    """A toy method: rows 0..k-1 of the pool, weights 1."""
    return [TargetSelection(indices=np.arange(k, dtype=np.int64), weights=np.ones(k),
                            residual_norms=np.zeros(0), stopped_by="n/a") for _ in range(problem.num_targets)]


def test_register_method_adds_a_selectable_method_and_refuses_duplicates():
    spec = api.MethodSpec("first-rows-test", _echo_first_rows, "rows 0..k-1", exact=False, fit_weights=False)
    api.register_method(spec)
    try:
        assert gk.METHODS["first-rows-test"] is spec
        sel = gk.select(A, torch.stack([b, -b], dim=1), 3, method="first-rows-test")
        assert sel.method == "first-rows-test" and sel.indices.tolist() == [0, 1, 2]
        assert sel.row_targets == [(0, 1)] * 3
        assert sel.weights.tolist() == [1.0, 1.0, 1.0]  # not fit weights: the largest, not the sum
        with pytest.raises(ValueError, match="already registered"):
            api.register_method(spec)
    finally:
        del api._REGISTRY["first-rows-test"]
    with pytest.raises(InputError, match="unknown method"):
        gk.select(A, b, 3, method="first-rows-test")


def _target(indices, weights, norms=(), filled=0):
    return TargetSelection(indices=np.asarray(indices, dtype=np.int64), weights=np.asarray(weights, dtype=float),
                           residual_norms=np.asarray(norms, dtype=float), stopped_by="budget", filled=filled)


def test_selection_union_over_targets():
    """Pursued rows first in order of first selection, then rows only filling added; fit
    weights summed over the targets that hold a row, scores (fit_weights=False) maxed."""
    per_target = (_target([4, 2, 9], [1.0, 0.5, 0.0], [2.0, 1.0], filled=1), _target([2, 7], [0.25, 3.0], [4.0, 1.0, 0.5]))
    sel = gk.Selection("gtp", 3, per_target, {}, {"total_s": 0.1})
    assert sel.indices.tolist() == [4, 2, 7, 9]
    assert sel.weights.tolist() == [1.0, 0.75, 3.0, 0.0]
    assert sel.row_targets == [(0,), (0, 1), (1,), (0,)]
    assert sel.filled.tolist() == [False, False, False, True] and sel.num_filled == 1 and sel.num_pursued == 3
    np.testing.assert_array_equal(sel.residual_norms, [[2.0, 4.0], [1.0, 1.0], [1.0, 0.5]])  # padded by the last
    assert sel.relative_residual == pytest.approx(0.5)
    scores = gk.Selection("topk", 3, per_target, {}, {}, fit_weights=False)
    assert scores.weights.tolist() == [1.0, 0.5, 3.0, 0.0]
    records = sel.records(ids=["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"])
    assert records[1] == {"rank": 1, "index": 2, "weight": 0.75, "targets": [0, 1], "filled": False, "id": "c"}
    summary = sel.summary()
    assert (summary["selected"], summary["pursued"], summary["filled"], summary["num_targets"]) == (4, 3, 1, 2)
    assert [t["selected"] for t in summary["targets"]] == [3, 2]
