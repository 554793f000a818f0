"""Mechanics of the fast exact pursuit: the row buffer through NNLS drops, and the auto
strategy's switch from cached to direct, by the cost model and by measured time (the
selection must not change)."""
import random

import pytest
import torch

import gtp_kernels as gk
from gtp_kernels.selection import cached, pursuit
from gtp_kernels.selection.common import SelectOptions
from gtp_kernels.selection.pursuit import follow_factor_order, gtp_pursuit
from gtp_kernels.validation import validate_problem
from test_pursuit import assert_same, noisy_problem


def _naive(rows_by_atom, new_support):
    return torch.stack([rows_by_atom[a] for a in new_support]) if new_support else None


@pytest.mark.parametrize("seed", range(40))
def test_follow_factor_order_matches_gather_after_any_drop(seed):
    rng = random.Random(seed)
    n_old, dim = rng.randint(0, 12), 7
    old = rng.sample(range(100), n_old)
    new_atom = 100 + seed
    rows_by_atom = {a: torch.randn(dim, dtype=torch.float64) for a in old + [new_atom]}
    buf = torch.full((16, dim), float("nan"), dtype=torch.float64)  # poisoned past the support
    for p, a in enumerate(old):
        buf[p] = rows_by_atom[a]
    # what the factor does: drop any subset, keep relative order, the new atom last if kept
    kept_new = rng.random() < 0.6
    survivors = [a for a in old if rng.random() < 0.7] if rng.random() < 0.8 else list(old)
    new_support = survivors + ([new_atom] if kept_new else [])
    follow_factor_order(buf, old, new_support, new_atom, rows_by_atom[new_atom])
    expect = _naive(rows_by_atom, new_support)
    if expect is not None:
        assert torch.equal(buf[: len(new_support)], expect)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_auto_switches_from_cached_to_direct_without_changing_the_selection(m, dtype, rtol):
    # D = 96: the cached product reaches a pass at ~38 columns (CPU), well before k = 60
    A, B = noisy_problem(900, 96, seed=11 + m, dtype=dtype, m=m)
    k = 60
    switch = cached.switch_columns(96, A.element_size(), A.element_size(), on_gpu=False)
    assert switch < k
    phases = {}
    fast = gtp_pursuit(validate_problem(A, B, k), k, SelectOptions(), strategy="auto", prefetch=8,
                       phase_seconds=phases)
    assert phases["strategy"] == f"cached, direct from support size {phases['switched_at_support']}"
    assert 0 < phases["switched_at_support"] < k  # it did switch, part-way
    # the same dict through a run that does not switch reports that run only
    gtp_pursuit(validate_problem(A, B, k), k, SelectOptions(), strategy="direct", phase_seconds=phases)
    assert phases["strategy"] == "direct" and "switched_at_support" not in phases
    assert_same(fast, gk.select(A, B, k, method="gtp-reference"), rtol)
    # and it read A fewer times than a pass per atom would
    assert fast[0].passes < sum(len(f.indices) for f in fast) / m + 5


class _SimulatedCost:
    """Stand-ins for the driver's clock and its products over A: time advances only by the
    scripted cost of each product (p = 1: a pass; p > 1: a column fetch), so the measured
    switch sees exactly the costs a test describes."""

    def __init__(self, pass_cost, fetch_cost):
        self.pass_cost, self.fetch_cost = pass_cost, fetch_cost
        self.t, self.passes, self.fetches = 0.0, 0, 0

    def clock(self):
        return self.t

    def products(self, real):
        def timed_products(A, X, *args, **kwargs):
            if X.shape[1] == 1:
                self.passes += 1
                self.t += self.pass_cost(self.passes)
            else:
                self.fetches += 1
                self.t += self.fetch_cost(self.fetches)
            return real(A, X, *args, **kwargs)
        return timed_products


@pytest.mark.parametrize("pass_cost,fetch_cost,switch", [
    # cached iterations (about one fetch in eight) far dearer than passes: switch to direct
    (lambda i: 1.0, lambda i: 40.0, True),
    # ... and cheaper: stay cached
    (lambda i: 1.0, lambda i: 2.0, False),
    # only the first fetch is dear (with the cache's first touch): sunk, not measured
    (lambda i: 1.0, lambda i: 1000.0 if i == 1 else 2.0, False),
    # the starting pass found A in cache (10x cheaper than later ones): the windows look dear
    # against it, the probe's pass re-measures, and the columns are kept
    (lambda i: 0.1 if i == 1 else 1.0, lambda i: 2.0, False),
])
def test_auto_measured_switch_on_cpu(monkeypatch, pass_cost, fetch_cost, switch):
    """auto on CPU: a window of 16 cached iterations (after the first) measured dearer than
    1.25 passes each makes it time one pass again (a re-anchor, used by that iteration) and
    switch to direct only if the window is dearer than that pass too; the selection is the
    reference's either way."""
    A, B = noisy_problem(900, 256, seed=5, dtype=torch.float64, m=1)
    k = 60
    model_switch = cached.switch_columns(256, A.element_size(), A.element_size(), on_gpu=False)
    assert model_switch > k + 2 * 8 + 1  # the model alone would never switch here
    sim = _SimulatedCost(pass_cost, fetch_cost)
    monkeypatch.setattr(cached, "cpu_seconds", sim.clock)
    monkeypatch.setattr(cached, "candidate_products", sim.products(cached.candidate_products))
    phases = {}
    fast = gtp_pursuit(validate_problem(A, B, k), k, SelectOptions(), strategy="auto", prefetch=8,
                       phase_seconds=phases)
    monkeypatch.undo()
    assert_same(fast, gk.select(A, B, k, method="gtp-reference"), 1e-9)
    if switch:  # the first cached iteration, one window, the probe's iteration; then direct
        assert phases["switched_at_support"] == 2 + cached.MEASURE_ITERATIONS
        assert fast[0].passes >= k - cached.MEASURE_ITERATIONS - 2
    else:
        assert "switched_at_support" not in phases
        assert fast[0].passes < k / 2
