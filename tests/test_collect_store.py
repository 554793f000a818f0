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
    open_store(root, verify="none")  # sizes and header fields alone cannot see it ...
    with pytest.raises(StoreError, match="sha256"):
        open_store(root, verify="sha256")  # ... the checksum does
    with pytest.raises(StoreError, match="sampled checksum"):
        open_store(root)  # ... and so does the default's sample, which covers all of a small shard
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


def _flip_fortran_order(path):
    data = bytearray(path.read_bytes())
    at = data.index(b"'fortran_order': False")
    data[at : at + 22] = b"'fortran_order': True "  # same length: the header stays valid
    path.write_bytes(bytes(data))


def test_default_verify_catches_header_changes_and_swapped_shards(tmp_path):
    spec = _spec()  # shards 0..2 hold 7 rows each: same size
    root = tmp_path / "s"
    _fill(root, spec).finish()
    shard0, shard1 = root / "shard-00000.npy", root / "shard-00001.npy"
    original0, original1 = shard0.read_bytes(), shard1.read_bytes()

    _flip_fortran_order(shard1)  # rows would be read scrambled
    with pytest.raises(StoreError, match="shard-00001.npy has a .npy header that differs.*'fortran_order': True"):
        open_store(root)
    shard1.write_bytes(original1)

    shard0.write_bytes(original1)  # swapped: rows credited to the wrong ids
    shard1.write_bytes(original0)
    with pytest.raises(StoreError, match="shard-00000.npy holds the data of shard-00001.npy .rows 7..13.: shard files swapped"):
        open_store(root)
    with pytest.raises(StoreError, match="swapped"):
        open_store(root, verify="sha256")
    open_store(root, verify="none")  # "none" still reads the header fields only
    shard0.write_bytes(original0)
    shard1.write_bytes(original1)
    open_store(root)


def test_a_flip_outside_the_sample_is_caught_by_sha256_only(tmp_path):
    """The default reads SAMPLE_BLOCKS blocks of a large shard; a byte between them needs sha256."""
    from gtp_kernels.collect import store as store_module
    spec = StoreSpec(n=8, t=1, d=20000, example_ids=[f"id{i}" for i in range(8)], shard_size=8)
    root = tmp_path / "s"
    TrajectoryStoreWriter(root, spec).write_shard(0, np.random.default_rng(0).standard_normal((8, 1, 20000)))
    shard = root / "shard-00000.npy"
    data = bytearray(shard.read_bytes())
    assert len(data) - 128 > store_module.SAMPLE_BLOCKS * store_module.SAMPLE_BLOCK_BYTES
    data[128 + store_module.SAMPLE_BLOCK_BYTES + 1000] ^= 0x01  # after the first sampled block, before the second
    shard.write_bytes(bytes(data))
    open_store(root)
    with pytest.raises(StoreError, match="sha256"):
        open_store(root, verify="sha256")
    data[-5] ^= 0x01  # inside the last sampled block
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="sampled checksum"):
        open_store(root)


def test_resume_recomputes_a_corrupt_or_swapped_shard(tmp_path):
    spec = _spec()
    _fill(tmp_path / "full", spec).finish()
    root = tmp_path / "s"
    _fill(root, spec).finish()
    shard0, shard1 = root / "shard-00000.npy", root / "shard-00001.npy"
    original0 = shard0.read_bytes()
    shard0.write_bytes(shard1.read_bytes())
    flipped = bytearray(shard1.read_bytes())
    flipped[200] ^= 0x10
    shard1.write_bytes(bytes(flipped))
    with pytest.warns(RuntimeWarning, match="shard-00000.npy holds the data of shard-00001.npy"):
        writer = TrajectoryStoreWriter(root, spec)
    assert writer.missing_shards() == [0, 1]  # not carried into a "complete" store
    _fill(root, spec)
    assert shard0.read_bytes() == original0
    assert _read_bytes(root) == _read_bytes(tmp_path / "full")
    open_store(root, verify="sha256")


def test_stores_written_before_fingerprints_still_open(tmp_path):
    root = tmp_path / "s"
    _fill(root, _spec()).finish()
    manifest = json.loads((root / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["header"], entry["sample"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    open_store(root)
    open_store(root, verify="sha256")
    _flip_fortran_order(root / "shard-00002.npy")  # no recorded header: the array's own order is checked
    with pytest.raises(StoreError, match="Fortran order"):
        open_store(root)


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


# --- an incomplete store (opened with allow_incomplete=True) -------------------------------------

def _incomplete(tmp_path):
    """N=10, shard_size=4: shards 0 (rows 0..3) and 2 (rows 8..9) written, shard 1 (rows 4..7) not."""
    spec = _spec(n=10, shard_size=4)
    _fill(tmp_path / "s", spec, indices=[0, 2])
    want = np.concatenate([_rows(spec, i) for i in range(spec.n_shards)]).reshape(10, -1)
    return spec, open_store(tmp_path / "s", allow_incomplete=True), want


def test_incomplete_store_rows_are_indexed_by_shard_number(tmp_path):
    _, store, want = _incomplete(tmp_path)
    np.testing.assert_array_equal(store.rows([8, 0, 9, 3]), want[[8, 0, 9, 3]])
    with pytest.raises(StoreError, match=r"row 4 is in shard 1 \(rows 4\.\.7\), which is not written"):
        store.rows([4])
    with pytest.raises(StoreError, match="shard 1"):
        store.rows([0, 7])
    with pytest.raises(IndexError):
        store.rows([10])


def test_incomplete_store_whole_store_accessors_refuse(tmp_path):
    _, store, _ = _incomplete(tmp_path)
    for call in (store.mean, store.candidates, lambda: store.candidates(as_tensor=True), store.trajectory_view):
        with pytest.raises(StoreError, match=r"incomplete \(2/3 shards written; missing shard 1\)"):
            call()


def test_incomplete_store_describes_what_is_written(tmp_path):
    spec, store, want = _incomplete(tmp_path)
    assert len(store) == store.n == 10 and store.ids == [f"id{i}" for i in range(10)]  # the whole store's rows
    assert not store.complete and store.written_shards == [0, 2] and store.missing_shards == [1]
    assert store.n_written == 6
    got = [(start, stop, np.asarray(array).reshape(stop - start, -1)) for start, stop, array in store.iter_shards()]
    assert [(a, b) for a, b, _ in got] == [(0, 4), (8, 10)]
    for start, stop, rows in got:
        np.testing.assert_array_equal(rows, want[start:stop])
    written = np.concatenate([rows for _, _, rows in got]).astype(np.float64)
    np.testing.assert_allclose(np.mean(written, axis=0), want[[0, 1, 2, 3, 8, 9]].astype(np.float64).mean(0))
    full = _fill(tmp_path / "s", spec).finish()  # resumed to the end: everything available
    assert full.complete and full.missing_shards == [] and full.n_written == 10
    np.testing.assert_allclose(full.mean(), want.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)


# --- several writers on one store ------------------------------------------------------------------

def test_second_writer_keeps_a_running_writers_temp_files(tmp_path, monkeypatch):
    """Writer B opens (resume=True) while writer A is in the middle of writing a shard."""
    import gtp_kernels.collect.store as store_module
    spec = _spec()
    first = TrajectoryStoreWriter(tmp_path / "s", spec)
    opened = []
    real_save = np.save

    def save_then_open_second_writer(handle, array, **kw):
        real_save(handle, array, **kw)
        if not opened:  # A's shard is now a temp file on disk, not yet renamed
            assert [p for p in os.listdir(tmp_path / "s") if p.endswith(".tmp")]
            opened.append(TrajectoryStoreWriter(tmp_path / "s", spec))

    monkeypatch.setattr(store_module.np, "save", save_then_open_second_writer)
    first.write_shard(0, _rows(spec, 0))  # FileNotFoundError on os.replace when B removed A's temp
    monkeypatch.setattr(store_module.np, "save", real_save)
    second = opened[0]
    second.write_shard(1, _rows(spec, 1))
    first.write_shard(2, _rows(spec, 2))
    second.write_shard(3, _rows(spec, 3))
    assert first.missing_shards() == second.missing_shards() == []
    store = open_store(tmp_path / "s", verify="sha256")
    np.testing.assert_array_equal(store.trajectory_view(), np.concatenate([_rows(spec, i) for i in range(spec.n_shards)]))
    assert not [p for p in os.listdir(tmp_path / "s") if p.endswith(".tmp")]


def test_two_processes_fill_disjoint_shards_at_once(tmp_path):
    """Two processes create one store at the same moment and fill its even / odd shards, each
    reopening the store (resume=True, which cleans temp files) before every shard."""
    import gtp_kernels.collect.store as store_module
    root = tmp_path / "s"
    barrier = tmp_path / "ready"
    barrier.mkdir()
    script = textwrap.dedent(f"""
        import importlib.util, os, sys, time
        import numpy as np
        # store.py alone (no torch import, so both start in well under a second)
        module_spec = importlib.util.spec_from_file_location("standalone_store", {store_module.__file__!r})
        store = sys.modules["standalone_store"] = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(store)
        spec = store.StoreSpec(n=60, t=3, d=5, example_ids=[f"id{{i}}" for i in range(60)], shard_size=2,
                               metadata={{"checkpoint_weights": [0.5, 0.3, 0.2], "weights_applied": False}})
        def _rows(spec, index):  # as the test module's _rows
            start, stop = spec.shard_rows(index)
            return np.random.default_rng(1000 + index).standard_normal((stop - start, spec.t, spec.d)).astype(spec.dtype)
        parity = int(sys.argv[1])
        open(os.path.join({str(barrier)!r}, str(parity)), "w").close()
        deadline = time.time() + 60
        while len(os.listdir({str(barrier)!r})) < 2 and time.time() < deadline:  # both imported: go
            time.sleep(0.001)
        for index in range(parity, spec.n_shards, 2):
            store.TrajectoryStoreWriter({str(root)!r}, spec).write_shard(index, _rows(spec, index))
    """)
    cwd = os.path.dirname(os.path.dirname(__file__))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(p)], cwd=cwd, stderr=subprocess.PIPE) for p in (0, 1)]
    errors = [proc.communicate(timeout=120)[1].decode() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errors
    spec = _spec(n=60, shard_size=2)
    store = open_store(root, verify="sha256")
    np.testing.assert_array_equal(store.trajectory_view(), np.concatenate([_rows(spec, i) for i in range(spec.n_shards)]))
    assert not [p for p in os.listdir(root) if p.endswith(".tmp")]


def test_only_stale_temp_files_are_removed(tmp_path):
    import time
    from gtp_kernels.atomic import host_tag as _host_tag
    spec = _spec()
    root = tmp_path / "s"
    _fill(root, spec, indices=[0])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs (reaped)
    host = _host_tag()  # temp names carry host, pid and a random token: ".<file>.<host>.<pid>.<token>.tmp"
    names = {
        "dead": f".shard-00001.npy.{host}.{dead.pid}.0123456789abcdef.tmp",
        "alive": f".shard-00002.npy.{host}.{os.getpid()}.0123456789abcdef.tmp",
        "other_host": f".manifest.json.elsewhere-{host}.{dead.pid}.0123456789abcdef.tmp",
        "legacy_fresh": ".shard-00003.npy.tmp",
        "legacy_old": ".manifest.json.tmp",
        "other_host_old": f".shard-00001.npy.elsewhere.{dead.pid}.fedcba9876543210.tmp",
        "not_ours": ".notes.txt.tmp",
    }
    for name in names.values():
        (root / name).write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 86400
    for key in ("legacy_old", "other_host_old", "not_ours"):
        os.utime(root / names[key], (two_days_ago, two_days_ago))
    TrajectoryStoreWriter(root, spec)
    left = set(os.listdir(root))
    assert {names[k] for k in ("alive", "other_host", "legacy_fresh", "not_ours")} <= left
    assert not {names[k] for k in ("dead", "legacy_old", "other_host_old")} & left


# --- a malformed manifest is a StoreError naming the store and the field -----------------------------

def _set(key, value):
    def mutate(manifest):
        manifest[key] = value
        return manifest
    return mutate


def _shard0(key, value=None, delete=False):
    def mutate(manifest):
        if delete:
            del manifest["shards"][0][key]
        else:
            manifest["shards"][0][key] = value
        return manifest
    return mutate


def _meta(key, value):
    def mutate(manifest):
        manifest["metadata"][key] = value
        return manifest
    return mutate


def _dup_id(manifest):
    manifest["example_ids"][5] = manifest["example_ids"][4]
    return manifest


def _int_id(manifest):
    manifest["example_ids"][3] = 3
    return manifest


def _dup_shard(manifest):
    manifest["shards"][1] = dict(manifest["shards"][0])
    return manifest


def _drop_shard(manifest):
    del manifest["shards"][1]
    return manifest


CORRUPTIONS = [
    ("shard_size_zero", _set("shard_size", 0), "'shard_size'"),
    ("shard_size_string", _set("shard_size", "4"), "'shard_size'"),
    ("shard_size_bool", _set("shard_size", True), "'shard_size'"),
    ("shard_size_mismatch", _set("shard_size", 6), "shards"),
    ("N_negative", _set("N", -1), "'N'"),
    ("N_float", _set("N", 23.0), "'N'"),
    ("T_zero", _set("T", 0), "'T'"),
    ("d_string", _set("d", "5"), "'d'"),
    ("dtype_unknown", _set("dtype", "int8"), "'dtype'"),
    ("version_bool", _set("version", True), "version"),
    ("shard_without_bytes", _shard0("bytes", delete=True), "'shards[0]' lacks 'bytes'"),
    ("shard_bytes_string", _shard0("bytes", "100"), "'shards[0].bytes'"),
    ("shard_index_string", _shard0("index", "0"), "'shards[0].index'"),
    ("shard_index_out_of_range", _shard0("index", 99), "'shards[0].index'"),
    ("shard_file_elsewhere", _shard0("file", "../shard-00000.npy"), "'shards[0].file'"),
    ("shard_sha256_null", _shard0("sha256", None), "'shards[0].sha256'"),
    ("shard_header_not_hex", _shard0("header", "{'descr': '<f4'}"), "'shards[0].header'"),
    ("shard_sample_without_digest", _shard0("sample", {"blocks": 4, "block_bytes": 65536}), "'shards[0].sample'"),
    ("shard_sample_zero_blocks", _shard0("sample", {"blocks": 0, "block_bytes": 65536, "sha256": "0" * 64}),
     "'shards[0].sample'"),
    ("shard_input_sha256_short", _shard0("input_sha256", "abc"), "'shards[0].input_sha256'"),
    ("shard_not_object", _set("shards", [1, 2, 3, 4]), "'shards[0]'"),
    ("shard_duplicate", _dup_shard, "'shards'"),
    ("shards_null", _set("shards", None), "'shards'"),
    ("shards_missing_one", _drop_shard, "complete"),
    ("example_ids_duplicate", _dup_id, "'example_ids'"),
    ("example_ids_not_strings", _int_id, "'example_ids'"),
    ("example_ids_null", _set("example_ids", None), "'example_ids'"),
    ("complete_string", _set("complete", "false"), "'complete'"),
    ("complete_false_but_all_listed", _set("complete", False), "'complete'"),
    ("metadata_list", _set("metadata", []), "'metadata'"),
    ("checkpoint_weights_length", _meta("checkpoint_weights", [0.5, 0.5]), "checkpoint_weights"),
    ("checkpoint_weights_nan", _meta("checkpoint_weights", [0.5, float("nan"), 0.5]), "checkpoint_weights"),
    ("checkpoint_weights_string", _meta("checkpoint_weights", "uniform"), "checkpoint_weights"),
    ("checkpoint_weights_negative", _meta("checkpoint_weights", [1.5, -0.7, 0.2]), "checkpoint_weights"),
    ("weights_applied_string", _meta("weights_applied", "no"), "weights_applied"),
    ("block_scales_length", _meta("block_scales", [1.0]), "block_scales"),
    ("top_level_list", lambda m: [m], "top level"),
    ("top_level_null", lambda m: None, "top level"),
    ("not_utf8", b"\xff\xfe{\"format\": 1}", "UTF-8"),
    ("not_json", b"{ not json", "not valid JSON"),
    ("lacks_key", lambda m: {k: v for k, v in m.items() if k != "complete"}, "'complete'"),
]


def _corrupt(root, corruption):
    manifest_path = root / "manifest.json"
    if isinstance(corruption, bytes):
        manifest_path.write_bytes(corruption)
        return
    manifest_path.write_text(json.dumps(corruption(json.loads(manifest_path.read_text()))))


@pytest.mark.parametrize("name,corruption,field", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_malformed_manifest_is_a_store_error(tmp_path, name, corruption, field):
    root = tmp_path / "s"
    _fill(root, _spec()).finish()
    _corrupt(root, corruption)
    for verify in ("none", "size", "sha256"):
        with pytest.raises(StoreError) as info:
            open_store(root, verify=verify, allow_incomplete=True)
        message = str(info.value)
        assert message.startswith(f"store {root}: ") and field in message and "\n" not in message, message
    with pytest.raises(StoreError, match="store"):
        TrajectoryStoreWriter(root, _spec())  # resuming reads the same manifest


@pytest.mark.parametrize("name,corruption,field", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_malformed_manifest_through_the_cli(tmp_path, capsys, name, corruption, field):
    from gtp_kernels.cli import main as cli_main
    root = tmp_path / "s"
    _fill(root, _spec()).finish()
    _corrupt(root, corruption)
    np.save(tmp_path / "t.npy", np.ones(15, dtype=np.float32))
    capsys.readouterr()
    code = cli_main(["select", "--candidates", str(root), "--target", str(tmp_path / "t.npy"), "--k", "2",
                     "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("gtp: error: store ") and field in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


# --- less_to_store checks its input before writing anything ---------------------------------------

def _less_folder(root, rows):
    import torch
    for t in range(rows.shape[1]):
        dim = root / f"run-ckpt{t + 1}-adam" / f"dim{rows.shape[2]}"
        dim.mkdir(parents=True)
        torch.save(rows[:, t].clone(), dim / "all_orig.pt")
        torch.save(rows[:, t].clone(), dim / "all_unormalized.pt")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_less_to_store_non_finite_is_an_input_error_and_writes_nothing(tmp_path, bad):
    import torch
    from gtp_kernels.collect.less_store import less_to_store
    from gtp_kernels.validation import InputError
    rows = torch.randn(9, 2, 8, generator=torch.Generator().manual_seed(0))
    rows[6, 1, 3] = bad
    _less_folder(tmp_path / "grads", rows)
    for out in (tmp_path / "out", tmp_path / "new" / "deeper" / "out"):
        with pytest.raises(InputError, match=r"not finite.*row 6.*run-ckpt2-adam"):
            less_to_store(tmp_path / "grads", out, shard_size=4)
    assert sorted(os.listdir(tmp_path)) == ["grads"]


def test_less_to_store_bad_arguments_and_failed_writes_leave_nothing(tmp_path, monkeypatch):
    import torch
    import gtp_kernels.collect.store as store_module
    from gtp_kernels.collect.less_store import less_to_store
    from gtp_kernels.validation import InputError
    _less_folder(tmp_path / "grads", torch.randn(9, 2, 8, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(InputError, match="example_ids"):
        less_to_store(tmp_path / "grads", tmp_path / "out", example_ids=["a"] * 9)
    with pytest.raises(InputError, match="shard_size"):
        less_to_store(tmp_path / "grads", tmp_path / "out", shard_size=0)
    real_write = store_module.TrajectoryStoreWriter.write_shard

    def failing_write(self, index, rows):
        if index == 1:
            raise OSError(28, "No space left on device")
        real_write(self, index, rows)

    monkeypatch.setattr(store_module.TrajectoryStoreWriter, "write_shard", failing_write)
    with pytest.raises(OSError, match="No space"):
        less_to_store(tmp_path / "grads", tmp_path / "made" / "out", shard_size=4)
    assert sorted(os.listdir(tmp_path)) == ["grads"]
    monkeypatch.setattr(store_module.TrajectoryStoreWriter, "write_shard", real_write)
    store = less_to_store(tmp_path / "grads", tmp_path / "out", shard_size=4)
    assert store.complete and store.n == 9
