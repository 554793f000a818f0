"""Sharded selection across torch.distributed ranks (gloo, 2 processes on this machine)
equals the single-process selection; bad input raises the same InputError on every rank.

Each spawn runs a list of cases (one process start per list, not per case); the harness
kills the ranks and fails if they do not finish in time (a rank left waiting in a collective
would otherwise hang the suite), and gloo's own timeout is short for the same reason.
"""
import datetime
import math
import pickle
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gtp_kernels as gk
from gtp_kernels.selection.common import SelectOptions
from gtp_kernels.selection.pursuit import gtp_pursuit
from gtp_kernels.validation import InputError, validate_problem

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

SPLIT = 137  # uneven shards: rank 0 holds rows [0, 137), rank 1 the rest
WORLD = 2
TIMEOUT_S = 90


def problem_data():
    g = torch.Generator().manual_seed(21)
    A = torch.randn(400, 64, generator=g, dtype=torch.float64)
    A[380:] = A[:20] * 2.0  # positive multiples across the shard boundary
    B = torch.stack([A[torch.randperm(400, generator=g)[:15]].T @ torch.rand(15, generator=g, dtype=torch.float64)
                     + 0.2 * torch.randn(64, generator=g, dtype=torch.float64) for _ in range(2)], 1)
    return A, B


def small_data():
    """40 rows, two targets that are non-negative mixtures of some of them plus noise."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(40, 16, generator=g, dtype=torch.float64)
    B = torch.stack([A[torch.randperm(40, generator=g)[:6]].T @ torch.rand(6, generator=g, dtype=torch.float64)
                     + 0.05 * torch.randn(16, generator=g, dtype=torch.float64) for _ in range(2)], 1)
    return A, B


# ---- cases: name -> (row cuts, pool transform, target transform, per-rank kwargs) -----------
# A case's pool is small_data()'s A after `pool`; rank r holds rows cuts[r]:cuts[r+1].

def _same(**kw):
    return lambda rank: dict(kw)


def _zero_first(A):
    A = A.clone()
    A[:17] = 0
    return A


def _nan_at_20(A):
    A = A.clone()
    A[20, 5] = float("nan")
    return A


def _local_exclude(rank):
    # global rows 2, 5, 20 and 33 excluded: rank 0 by a bool mask, rank 1 by local indices
    if rank == 0:
        mask = np.zeros(17, dtype=bool)
        mask[[2, 5]] = True
        return {"exclude": mask}
    return {"exclude": [20 - 17, 33 - 17]}


EQUAL_CASES = {
    # name: (cuts, pool, target scale, float32 pool, kwargs(rank), reference select() kwargs)
    "empty_last": ((0, 40, 40), None, 1.0, False, _same(k=6, strategy="direct"), {"k": 6}),
    "empty_last_cached": ((0, 40, 40), None, 1.0, False, _same(k=6, strategy="cached", prefetch=2), {"k": 6}),
    "empty_first": ((0, 0, 40), None, 1.0, False, _same(k=6), {"k": 6}),
    "zero_shard": ((0, 17, 40), _zero_first, 1.0, False, _same(k=6), {"k": 6}),
    "options": ((0, 30, 40), None, 1.0, False,
                _same(k=np.int64(6), ridge=0.1, max_iters=np.int64(20), stop_ratio=0.01, tol=1e-8),
                {"k": 6, "ridge": 0.1, "max_iters": 20, "stop_ratio": 0.01, "tol": 1e-8}),
    "huge_target_f32": ((0, 17, 40), None, 2.0 ** 700, True, _same(k=6), {"k": 6}),
    "tiny_target_f32": ((0, 17, 40), None, 2.0 ** -700, True, _same(k=6), {"k": 6}),
    "tiny_weights_f32": ((0, 17, 40), None, 1.0, True,
                         _same(k=6, checkpoint_weights=[1e-40, 3e-40], num_checkpoints=2, ridge=1e-42),
                         {"k": 6, "checkpoint_weights": [1e-40, 3e-40], "num_checkpoints": 2, "ridge": 1e-42}),
    "exclude_local": ((0, 17, 40), None, 1.0, False, lambda r: dict(k=6, **_local_exclude(r)),
                      {"k": 6, "exclude": [2, 5, 20, 33]}),
    "align_threshold": ((0, 17, 40), None, 1.0, False, _same(k=6, align_threshold=0.1),
                        {"k": 6, "align_threshold": 0.1}),
}

BAD_OPTIONS = {  # the same on every rank: the message select() gives
    "ridge_nan": {"ridge": float("nan")},
    "max_iters_0": {"max_iters": 0},
    "compute_dtype_f16": {"compute_dtype": torch.float16},
    "k_0": {"k": 0},
    "k_float": {"k": 2.5},
    "stop_ratio_1": {"stop_ratio": 1.0},
    "align_threshold_str": {"align_threshold": "0.1"},
    "min_cosine_2": {"min_cosine": 2.0},
    "backend_bad": {"backend": "cuda"},
    "exclude_float": {"exclude": np.array([0.5])},
    "align_excludes_all": {"align_threshold": 1.0},
}


def _error_cases():
    cases = {name: ((0, 17, 40), None, _same(**{"k": 6, **kw})) for name, kw in BAD_OPTIONS.items()}
    cases["nan_on_rank1"] = ((0, 17, 40), _nan_at_20, _same(k=6))
    cases["k_too_big"] = ((0, 17, 40), None, _same(k=41))
    cases["all_zero_pool"] = ((0, 17, 40), lambda A: torch.zeros_like(A), _same(k=3))
    cases["k_differs"] = ((0, 17, 40), None, lambda r: {"k": 6 + r})
    cases["target_differs"] = ((0, 17, 40), None, lambda r: {"k": 6, "target_shift": 1e-3 * r})
    cases["exclude_bad_on_rank1"] = ((0, 17, 40), None,
                                     lambda r: {"k": 6, "exclude": np.zeros(17 if r == 0 else 5, dtype=bool)})
    cases["still_works_after"] = ((0, 17, 40), None, _same(k=6))
    return cases


def _shard(A, cuts, rank):
    return A[cuts[rank]: cuts[rank + 1]]


def _outcome(fn):
    try:
        sel = fn()
        return ("ok", [(ts.indices.tolist(), ts.weights.tolist(), ts.stopped_by) for ts in sel.per_target],
                dict(sel.params))
    except Exception as err:  # recorded, compared across ranks in the parent
        return ("error", type(err).__name__, isinstance(err, InputError), str(err))


def _run_cases(rank, kind):
    from gtp_kernels.selection.distributed import select_shard_and_merge, select_sharded

    out = {}
    if kind == "pool":
        A, B = problem_data()
        shard = A[:SPLIT] if rank == 0 else A[SPLIT:]
        for s in ("direct", "cached"):
            out[s] = _outcome(lambda: select_sharded(shard, B, 25, strategy=s, prefetch=3))
        out["merge"] = _outcome(lambda: select_shard_and_merge(shard, B, 25))
        A, B = small_data()
        for name, (cuts, pool, scale, f32, kwargs, _) in EQUAL_CASES.items():
            P = A if pool is None else pool(A)
            P = P.float() if f32 else P
            out[name] = _outcome(lambda: select_sharded(_shard(P, cuts, rank), B * scale, **kwargs(rank)))
        out["merge_empty_shard"] = _outcome(lambda: select_shard_and_merge(_shard(A, (0, 40, 40), rank), B, 6))
    else:
        A, B = small_data()
        for name, (cuts, pool, kwargs) in _error_cases().items():
            P = A if pool is None else pool(A)
            kw = kwargs(rank)
            target = B + kw.pop("target_shift", 0.0)
            out[name] = _outcome(lambda: select_sharded(_shard(P, cuts, rank), target, **kw))
        out["merge_nan_on_rank1"] = _outcome(lambda: select_shard_and_merge(_shard(_nan_at_20(A), (0, 17, 40), rank),
                                                                            B, 6))
        # rank 0 in another entry point than rank 1: the same InputError, at once, on both
        shard = _shard(A, (0, 17, 40), rank)
        started = time.monotonic()
        entry = select_shard_and_merge if rank == 0 else select_sharded
        out["entry_differs"] = _outcome(lambda: entry(shard, B, 6))
        out["entry_differs_seconds"] = time.monotonic() - started
        out["after_entry_differs"] = _outcome(lambda: select_sharded(shard, B, 6))
    return out


def _worker(rank, world, init, out_dir, kind):
    torch.set_num_threads(1)  # ranks share this machine's cores: oversubscribed, each collective waits ~10x longer
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    try:
        out = _run_cases(rank, kind)
        with open(f"{out_dir}/{kind}{rank}.pkl", "wb") as f:
            pickle.dump(out, f)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, kind, world=WORLD, timeout=TIMEOUT_S):
    """Every rank's results; fails (after killing the ranks) instead of hanging."""
    ctx = mp.spawn(_worker, args=(world, f"file://{tmp_path}/rendezvous-{kind}", str(tmp_path), kind),
                   nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {world} ranks did not finish within {timeout} s (a rank left in a collective?)")
    return [pickle.load(open(tmp_path / f"{kind}{r}.pkl", "rb")) for r in range(world)]


@pytest.fixture(scope="module")
def pool_results(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("pool"), "pool")


@pytest.fixture(scope="module")
def error_results(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("errors"), "errors")


def _assert_same_on_every_rank(ranks, name):
    first = ranks[0][name]
    for r in range(1, len(ranks)):
        got = ranks[r][name]
        if first[0] == "ok":  # params hold the rank's own offset and row count
            assert got[:2] == first[:2], name
        else:
            assert got == first, name
    return first


def _assert_equal_selection(got, ref, name):
    assert got[0] == "ok", (name, got)
    assert len(got[1]) == len(ref.per_target)
    for (idx, w, stopped), ts in zip(got[1], ref.per_target):
        assert idx == ts.indices.tolist(), name
        assert stopped == ts.stopped_by, name
        np.testing.assert_allclose(w, ts.weights, rtol=1e-9, atol=0, err_msg=name)


def test_sharded_equals_single_process(pool_results):
    ranks = pool_results
    for name in ("direct", "cached", "merge"):
        _assert_same_on_every_rank(ranks, name)  # every rank returns the same selection
    A, B = problem_data()
    single = gtp_pursuit(validate_problem(A, B, 25), 25, SelectOptions(), strategy="direct")
    for strategy in ("direct", "cached"):
        assert ranks[0][strategy][0] == "ok", ranks[0][strategy]
        for (idx, w, _), ref in zip(ranks[0][strategy][1], single):
            assert idx == ref.indices.tolist()
            assert torch.allclose(torch.tensor(w, dtype=torch.float64), torch.from_numpy(ref.weights), rtol=1e-9)
    assert ranks[0]["merge"][0] == "ok", ranks[0]["merge"]
    for idx, _, _ in ranks[0]["merge"][1]:
        assert len(idx) == 25 and len(set(idx)) == 25 and all(0 <= i < 400 for i in idx)


@pytest.mark.parametrize("name", ["empty_last", "empty_last_cached", "empty_first", "zero_shard"])
def test_empty_or_all_zero_shard_equals_select(pool_results, name):
    """A shard with no rows, or only all-zero rows, is fine when the pool has selectable rows."""
    cuts, pool, scale, f32, _, ref_kw = EQUAL_CASES[name]
    got = _assert_same_on_every_rank(pool_results, name)
    A, B = small_data()
    P = A if pool is None else pool(A)
    _assert_equal_selection(got, gk.select(P, B, **ref_kw), name)


@pytest.mark.parametrize("name", ["options", "exclude_local", "align_threshold"])
def test_options_as_select(pool_results, name):
    """numpy integers, ridge/max_iters/stop_ratio/tol, per-shard exclude (local rows) and
    align_threshold give select()'s selection on the concatenated pool."""
    cuts, pool, scale, f32, _, ref_kw = EQUAL_CASES[name]
    got = _assert_same_on_every_rank(pool_results, name)
    A, B = small_data()
    ref = gk.select(A, B, **ref_kw)
    _assert_equal_selection(got, ref, name)
    if name == "align_threshold":
        assert ref.params["guard_excluded"] > 0  # the guard did exclude rows here
        assert got[2]["guard_excluded"] == ref.params["guard_excluded"]


@pytest.mark.parametrize("name", ["huge_target_f32", "tiny_target_f32", "tiny_weights_f32"])
def test_target_scaling_as_select(pool_results, name):
    """float64 targets of 2^+-700, or checkpoint weights of ~1e-40, with float32 candidates:
    select() scales them by powers of two inside (without it the float32 products overflow or
    underflow and nothing, or the wrong rows, are picked)."""
    cuts, pool, scale, f32, _, ref_kw = EQUAL_CASES[name]
    got = _assert_same_on_every_rank(pool_results, name)
    A, B = small_data()
    ref = gk.select(A.float(), B * scale, **ref_kw)
    assert all(len(ts.indices) == 6 for ts in ref.per_target)
    _assert_equal_selection(got, ref, name)


def test_merge_with_an_empty_shard(pool_results):
    got = _assert_same_on_every_rank(pool_results, "merge_empty_shard")
    assert got[0] == "ok", got
    for idx, w, _ in got[1]:
        assert 1 <= len(idx) <= 6 and len(set(idx)) == len(idx) and all(0 <= i < 40 for i in idx)
        assert all(x >= 0 for x in w)


@pytest.mark.parametrize("name", sorted(BAD_OPTIONS))
def test_bad_options_raise_as_select_on_every_rank(error_results, name):
    got = _assert_same_on_every_rank(error_results, name)
    assert got[0] == "error" and got[2], got  # an InputError, on every rank
    A, B = small_data()
    kw = {"k": 6, **BAD_OPTIONS[name]}
    with pytest.raises(InputError) as ref:
        gk.select(A, B, **kw)
    assert got[3] == str(ref.value)  # select()'s message
    assert got[1] == type(ref.value).__name__


@pytest.mark.parametrize("name, expected", [
    ("nan_on_rank1", r"rank 1 \(rows 17..39 of the pool; row numbers below count within the shard\): candidates contains NaN or Inf \(first at row 3\)"),
    ("merge_nan_on_rank1", r"rank 1 \(rows 17..39 of the pool; row numbers below count within the shard\): candidates contains NaN"),
    ("k_too_big", r"^k=41 is larger than the pool \(N=40 candidates over all ranks\)$"),
    ("all_zero_pool", r"no candidate can be selected: all 40 rows are all-zero"),
    ("k_differs", r"every rank must pass the same k: rank 1 has 7, rank 0 6"),
    ("target_differs", r"every rank must pass the same target: rank 1"),
    ("exclude_bad_on_rank1", r"rank 1 \(rows 17..39 of the pool; row numbers below count within the shard\): exclude mask must have shape \(23,\)"),
])
def test_bad_input_on_one_rank_raises_on_every_rank(error_results, name, expected):
    """Checks are collective: every rank raises the same InputError, naming the rank at fault,
    instead of one rank raising and the others dying in (or waiting on) a collective."""
    import re

    got = _assert_same_on_every_rank(error_results, name)
    assert got[0] == "error" and got[2], got
    assert re.search(expected, got[3]), got[3]


def test_group_usable_after_errors(error_results):
    got = _assert_same_on_every_rank(error_results, "still_works_after")
    A, B = small_data()
    _assert_equal_selection(got, gk.select(A, B, 6), "still_works_after")
    assert not math.isnan(got[1][0][1][0])


def test_ranks_in_different_entry_points_raise_at_once(error_results):
    """select_shard_and_merge on rank 0, select_sharded on rank 1: every rank raises the same
    InputError naming each rank's call, in the first exchange (before, the ranks went on to
    different collectives and waited for the process group's timeout: 30 min by default, 20 s
    here); the group still works afterwards."""
    got = _assert_same_on_every_rank(error_results, "entry_differs")
    assert got[0] == "error" and got[2], got
    assert got[3] == ("every rank must call the same entry point: rank 0 select_shard_and_merge, "
                      "rank 1 select_sharded")
    assert all(ranks["entry_differs_seconds"] < 10 for ranks in error_results)
    after = _assert_same_on_every_rank(error_results, "after_entry_differs")
    A, B = small_data()
    _assert_equal_selection(after, gk.select(A, B, 6), "after_entry_differs")
