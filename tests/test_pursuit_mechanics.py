"""Mechanics of the fast exact pursuit: the row buffer through NNLS drops, and the auto
strategy's switch from cached to direct, by the cost model and by measured time (the
selection must not change)."""
import random

import pytest
import torch

import gtp_kernels as gk
from gtp_kernels.selection import pursuit
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
    switch = pursuit.switch_columns(96, A.element_size(), A.element_size(), on_gpu=False)
    assert switch < k
    phases = {}
    fast = gtp_pursuit(validate_problem(A, B, k), k, SelectOptions(), strategy="auto", prefetch=8,
                       phase_seconds=phases)
    assert phases["strategy"] == f"cached, direct from support size {phases['switched_at_support']}"
    assert 0 < phases["switched_at_support"] < k  # it did switch, part-way
    assert_same(fast, gk.select(A, B, k, method="gtp-reference"), rtol)
    # and it read A fewer times than a pass per atom would
    assert fast[0].passes < sum(len(f.indices) for f in fast) / m + 5


class _FakeClock:
    """Clock stand-in: call n returns f(n), so the driver's measured intervals are scripted."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def __call__(self):
        self.n += 1
        return self.f(self.n)


class _IntervalClock:
    """Clock stand-in that scripts intervals: the first reading pair spans the starting pass
    (pass_cost), pair i after it spans cached iteration i (iteration_cost(i), i from 1)."""

    def __init__(self, pass_cost, iteration_cost):
        self.pass_cost, self.iteration_cost = pass_cost, iteration_cost
        self.calls, self.t = 0, 0.0

    def __call__(self):
        self.calls += 1
        if self.calls % 2 == 0:  # the end of an interval
            pair = self.calls // 2
            self.t += self.pass_cost if pair == 1 else self.iteration_cost(pair - 1)
        return self.t


@pytest.mark.parametrize("iteration_cost,switch", [
    (lambda i: 100.0 if i == 1 else 0.5, False),  # only the first (sunk: first fetch) is dear
    (lambda i: 1.2, False),  # dearer than a pass, within the margin: keep the cached columns
    (lambda i: 1.3, True),  # beyond the margin: switch
])
def test_auto_measured_switch_ignores_sunk_cost_and_noise(monkeypatch, iteration_cost, switch):
    A, B = noisy_problem(900, 256, seed=5, dtype=torch.float64, m=1)
    k = 60
    assert pursuit.SWITCH_MARGIN == 1.25
    monkeypatch.setattr(pursuit, "_cpu_seconds", _IntervalClock(1.0, iteration_cost))
    phases = {}
    fast = gtp_pursuit(validate_problem(A, B, k), k, SelectOptions(), strategy="auto", prefetch=8,
                       phase_seconds=phases)
    monkeypatch.undo()
    assert_same(fast, gk.select(A, B, k, method="gtp-reference"), 1e-9)
    if switch:  # after the first cached iteration and one window
        assert phases["switched_at_support"] == 1 + pursuit.MEASURE_ITERATIONS
    else:
        assert "switched_at_support" not in phases


@pytest.mark.parametrize("clock,expect_measured_switch", [
    (lambda n: float(n * n), True),  # cached iterations ever dearer than the first pass: switch
    (lambda n: 0.0 if n == 1 else 1e9, False),  # the pass "took" 1e9 s: no measured switch
])
def test_auto_measured_switch_on_cpu(monkeypatch, clock, expect_measured_switch):
    """auto on CPU switches after 16 cached iterations measured dearer than a pass; the
    selection is the reference's either way."""
    A, B = noisy_problem(900, 256, seed=5, dtype=torch.float64, m=1)
    k = 60
    model_switch = pursuit.switch_columns(256, A.element_size(), A.element_size(), on_gpu=False)
    assert model_switch > k + 2 * 8 + 1  # the model alone would never switch here
    monkeypatch.setattr(pursuit, "_cpu_seconds", _FakeClock(clock))
    fast = gtp_pursuit(validate_problem(A, B, k), k, SelectOptions(), strategy="auto", prefetch=8)
    monkeypatch.undo()
    assert_same(fast, gk.select(A, B, k, method="gtp-reference"), 1e-9)
    passes = fast[0].passes
    if expect_measured_switch:
        # cached for 16 iterations (a few fetches), then one pass per remaining iteration
        assert k - pursuit.MEASURE_ITERATIONS <= passes < k
    else:
        assert passes < k / 2
