"""Trajectory store: round trip, resume after interruption, refusal of corrupt or mismatched stores."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gtp_kernels.collect.store import StoreError, StoreSpec, TrajectoryStoreWriter, open_store


def _spec(n=23, t=3, d=5, shard_size=7, dtype="float32", **metadata):
    return StoreSpec(n=n, t=t, d=d, example_ids=[f"id{i}" for i in range(n)], dtype=dtype, shard_size=shard_size,
                     metadata={"checkpoint_weights": [0.5, 0.3, 0.2], "weights_applied": False, **metadata})


def _rows(spec, index):
    start, stop = spec.shard_rows(index)
    rng = np.random.default_rng(1000 + index)
    return rng.standard_normal((stop - start, spec.t, spec.d)).astype(spec.dtype)


def _fill(path, spec, indices=None):
    writer = TrajectoryStoreWriter(path, spec)
    for index in writer.missing_shards() if indices is None else indices:
        writer.write_shard(index, _rows(spec, index))
    return writer


def _read_bytes(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip(tmp_path, dtype):
    spec = _spec(dtype=dtype)
    store = _fill(tmp_path / "s", spec).finish()
    want = np.concatenate([_rows(spec, i) for i in range(spec.n_shards)])
    assert store.n == 23 and store.t == 3 and store.d == 5 and store.dtype == np.dtype(dtype)
    assert store.ids == [f"id{i}" for i in range(23)]
    np.testing.assert_array_equal(store.trajectory_view(), want)
    np.testing.assert_array_equal(store.candidates(), want.reshape(23, 15))
    np.testing.assert_array_equal(store.candidates(as_tensor=True).numpy(), want.reshape(23, 15))
    np.testing.assert_array_equal(store.rows([22, 0, 7]), want.reshape(23, 15)[[22, 0, 7]])
    np.testing.assert_allclose(store.mean(), want.reshape(23, 15).astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
    assert store.checkpoint_weights == [0.5, 0.3, 0.2]
    assert store.selection_checkpoint_weights == [0.5, 0.3, 0.2]
    assert [(a, b) for a, b, _ in store.iter_shards()] == [(0, 7), (7, 14), (14, 21), (21, 23)]
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 4
    open_store(tmp_path / "s", verify="sha256")


def test_resume_after_injected_failure_equals_uninterrupted(tmp_path):
    spec = _spec()
    _fill(tmp_path / "full", spec).finish()
    writer = TrajectoryStoreWriter(tmp_path / "part", spec)
    writer.write_shard(0, _rows(spec, 0))
    writer.write_shard(2, _rows(spec, 2))
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "part")
    partial = open_store(tmp_path / "part", allow_incomplete=True)
    assert [a for a, _, _ in partial.iter_shards()] == [0, 14]
    resumed = TrajectoryStoreWriter(tmp_path / "part", spec)
    assert resumed.missing_shards() == [1, 3]
    _fill(tmp_path / "part", spec)
    assert _read_bytes(tmp_path / "part") == _read_bytes(tmp_path / "full")


def test_killed_writer_mid_shard_resumes_bit_for_bit(tmp_path):
    """A writer process killed (SIGKILL) after 2 shards, in the middle of writing the 3rd."""
    spec = _spec(n=40, shard_size=8)
    _fill(tmp_path / "full", spec).finish()
    script = textwrap.dedent(f"""
        import os, signal, sys
        import numpy as np
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_collect_store import _spec, _rows
        from gtp_kernels.collect.store import TrajectoryStoreWriter
        import gtp_kernels.collect.store as store_module
        spec = _spec(n=40, shard_size=8)
        writer = TrajectoryStoreWriter({str(tmp_path / 'part')!r}, spec)
        writer.write_shard(0, _rows(spec, 0)); writer.write_shard(1, _rows(spec, 1))
        real_save = np.save
        def dying_save(handle, array, **kw):
            real_save(handle, array[: len(array) // 2], **kw)  # half a shard on disk ...
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)                # ... then the process dies
        store_module.np.save = dying_save
        writer.write_shard(2, _rows(spec, 2))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True)
    assert result.returncode != 0
    leftovers = sorted(os.listdir(tmp_path / "part"))
    assert [x for x in leftovers if x.startswith(".shard-00002.npy.") and x.endswith(".tmp")] and "shard-00002.npy" not in leftovers
    writer = TrajectoryStoreWriter(tmp_path / "part", spec)
    assert not [x for x in os.listdir(tmp_path / "part") if x.endswith(".tmp")]  # its writer is dead: removed
    assert writer.missing_shards() == [2, 3, 4]
    _fill(tmp_path / "part", spec)
    assert _read_bytes(tmp_path / "part") == _read_bytes(tmp_path / "full")


def test_mismatched_resume_refused(tmp_path):
    _fill(tmp_path / "s", _spec(), indices=[0])
    with pytest.raises(StoreError, match="'d' differs"):
        TrajectoryStoreWriter(tmp_path / "s", _spec(d=6))
    with pytest.raises(StoreError, match="'metadata' differs"):
        TrajectoryStoreWriter(tmp_path / "s", _spec(gradient_type="sgd"))
    with pytest.raises(StoreError, match="already exists"):
        TrajectoryStoreWriter(tmp_path / "s", _spec(), resume=False)


def test_corrupt_stores_refused(tmp_path):
    spec = _spec()
    root = tmp_path / "s"
    _fill(root, spec).finish()
    shard = root / "shard-00001.npy"
    original = shard.read_bytes()

    shard.write_bytes(original[:-8])  # truncated
    with pytest.raises(StoreError, match="bytes, manifest says"):
        open_store(root)
    flipped = bytearray(original)
    flipped[-3] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(flipped))
    open_store(root)  # size check alone cannot see it ...
    with pytest.raises(StoreError, match="sha256"):
        open_store(root, verify="sha256")  # ... the checksum does
    shard.write_bytes(original)

    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for key, value, message in [("d", 6, "shape"), ("dtype", "float16", "dtype"), ("N", 24, "example ids"),
                                ("format", "other", "format"), ("version", 99, "version")]:
        broken = {**manifest, key: value}
        manifest_path.write_text(json.dumps(broken))
        with pytest.raises(StoreError, match=message):
            open_store(root, verify="none")
    manifest_path.write_text("{ not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        open_store(root)
    manifest_path.write_text(json.dumps(manifest))
    os.remove(root / "shard-00003.npy")
    with pytest.raises(StoreError, match="missing"):
        open_store(root)
    with pytest.raises(StoreError, match="no manifest.json"):
        open_store(tmp_path / "nowhere")


def test_bad_shard_arguments(tmp_path):
    spec = _spec()
    writer = TrajectoryStoreWriter(tmp_path / "s", spec)
    with pytest.raises(ValueError, match="expected"):
        writer.write_shard(0, np.zeros((6, 3, 5)))
    bad = _rows(spec, 0)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        writer.write_shard(0, bad)
    with pytest.raises(ValueError, match="unique"):
        StoreSpec(n=2, t=1, d=1, example_ids=["a", "a"])


def test_two_writers_filling_disjoint_shards(tmp_path):
    """Two writers (as two jobs with shards=...) on one store: neither loses the other's shards."""
    spec = _spec()
    first, second = TrajectoryStoreWriter(tmp_path / "s", spec), TrajectoryStoreWriter(tmp_path / "s", spec)
    first.write_shard(0, _rows(spec, 0))
    second.write_shard(1, _rows(spec, 1))
    first.write_shard(2, _rows(spec, 2))
    second.write_shard(3, _rows(spec, 3))
    store = open_store(tmp_path / "s", verify="sha256")
    want = np.concatenate([_rows(spec, i) for i in range(spec.n_shards)])
    np.testing.assert_array_equal(store.trajectory_view(), want)
