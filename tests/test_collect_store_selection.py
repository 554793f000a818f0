"""collect.store_selection: the StoreReader protocol, the checkpoint-weight rule, select_from_stores."""
import numpy as np
import pytest
import torch

from gtp_kernels import select
from gtp_kernels.collect.less_store import LessGradients
from gtp_kernels.collect.store import StoreError, StoreSpec, TrajectoryStoreWriter, open_store
from gtp_kernels.collect.store_selection import StoreReader, select_from_stores, selection_weights
from gtp_kernels.collect.targets import store_target
from gtp_kernels.validation import InputError

WEIGHTS = [0.7, 0.3]


def _store(folder, rows, weights_applied, metadata=None):
    """rows (n, T, d) float32 as a store; with weights_applied the blocks are scaled by sqrt(w_t) first."""
    n, t, d = rows.shape
    if weights_applied:
        rows = (rows * np.sqrt(np.asarray(WEIGHTS))[None, :, None]).astype(np.float32)
    meta = {"checkpoint_weights": WEIGHTS, "weights_applied": weights_applied,
            "projection": {"kind": "rademacher", "seeds": [1, 2], "seed_mode": "per_checkpoint", "d": d},
            **(metadata or {})}
    writer = TrajectoryStoreWriter(folder, StoreSpec(n=n, t=t, d=d, example_ids=[f"{folder.name}{i}" for i in range(n)],
                                                     shard_size=max(1, n // 3), metadata=meta))
    for index in range(writer.spec.n_shards):
        start, stop = writer.spec.shard_rows(index)
        writer.write_shard(index, rows[start:stop])
    writer.finish()
    return open_store(folder)


@pytest.fixture
def rows():
    rng = np.random.default_rng(0)
    return rng.standard_normal((30, 2, 6)).astype(np.float32), rng.standard_normal((4, 2, 6)).astype(np.float32)


def test_trajectory_store_and_less_gradients_are_store_readers(tmp_path, rows):
    pool, _ = rows
    store = _store(tmp_path / "pool", pool, weights_applied=False)
    less = LessGradients(torch.from_numpy(pool), ["ckpt1", "ckpt2"], [], True, path=tmp_path, weights=[7.0, 3.0])
    for reader in (store, less):
        assert isinstance(reader, StoreReader)
        assert (reader.n, reader.t, reader.d) == (30, 2, 6) and reader.complete and not reader.weights_applied
        np.testing.assert_allclose(reader.checkpoint_weights, WEIGHTS)
        np.testing.assert_allclose(reader.mean(), pool.reshape(30, -1).astype(np.float64).mean(0), rtol=1e-6, atol=1e-7)
        assert reader.rows_source().shape == (30, 12)
        assert sum(stop - start for start, stop, _ in reader.iter_shards()) == 30
    assert less.ids == [str(i) for i in range(30)] and store.ids[0] == "pool0"
    assert not isinstance(pool, StoreReader)


def test_selection_weights_rule(tmp_path, rows):
    pool, _ = rows
    weighted = _store(tmp_path / "w", pool, weights_applied=True)
    plain = _store(tmp_path / "p", pool, weights_applied=False)
    assert selection_weights(weighted, block_scale_invariant=False) is None  # the blocks carry sqrt(w_t)
    assert selection_weights(weighted, block_scale_invariant=True) == WEIGHTS  # cosine cancels them
    assert selection_weights(plain, False) == WEIGHTS == selection_weights(plain, True)
    # the store's own accessors say the same
    assert weighted.selection_checkpoint_weights is None and weighted.weights_for(True) == WEIGHTS


@pytest.mark.parametrize("method", ["gtp", "topk"])
@pytest.mark.parametrize("weights_applied", [False, True])
def test_select_from_stores_equals_select_with_the_rule(tmp_path, rows, method, weights_applied):
    pool, val = rows
    candidates = _store(tmp_path / "pool", pool, weights_applied)
    target = _store(tmp_path / "val", val, weights_applied)
    got = select_from_stores(candidates, target, 5, method=method, seed=3)
    weights = selection_weights(candidates, method == "topk")
    want = select(candidates.candidates(), target.mean(), 5, method=method, checkpoint_weights=weights,
                  num_checkpoints=2, seed=3)
    assert got.indices.tolist() == want.indices.tolist()
    np.testing.assert_allclose(np.asarray(got.weights), np.asarray(want.weights), rtol=1e-5, atol=1e-6)


def test_select_from_stores_target_modes_and_arrays(tmp_path, rows):
    pool, val = rows
    candidates = _store(tmp_path / "pool", pool, True)
    target = _store(tmp_path / "val", val, True)
    per_example = select_from_stores(candidates, target, 2, method="topk", target_mode="examples")
    assert per_example.num_targets == 4
    as_array = select_from_stores(candidates, store_target(target, "examples"), 2, method="topk")
    assert per_example.indices.tolist() == as_array.indices.tolist()


def test_select_from_stores_refusals(tmp_path, rows):
    pool, val = rows
    candidates = _store(tmp_path / "pool", pool, True)
    other = _store(tmp_path / "val", val, True, {"projection": {"kind": "gaussian", "seeds": [1, 2], "d": 6}})
    with pytest.raises(StoreError, match="projection kind"):
        select_from_stores(candidates, other, 2)
    with pytest.raises(InputError, match="twice"):
        select_from_stores(candidates, candidates.mean(), 2, checkpoint_weights=WEIGHTS)
    with pytest.raises(InputError, match="unknown method"):
        select_from_stores(candidates, candidates.mean(), 2, method="nope")


def test_less_gradients_select_as_their_converted_store(tmp_path, rows):
    """A LESS reader selects exactly as the store less_to_store would write from it."""
    from gtp_kernels.collect.less_store import write_trajectory_store

    pool, val = rows
    less = LessGradients(torch.from_numpy(pool), ["ckpt1", "ckpt2"], [], True, path=tmp_path, weights=WEIGHTS)
    store = write_trajectory_store(pool, tmp_path / "converted", None, WEIGHTS, 7, {})
    target = val.reshape(4, -1).mean(0)
    for method in ("gtp", "topk"):
        a = select_from_stores(less, target, 4, method=method)
        b = select_from_stores(store, target, 4, method=method)
        assert a.indices.tolist() == b.indices.tolist()
