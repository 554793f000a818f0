"""Row sources: candidates in blocks (a store's memory-mapped shards), read a chunk at a time.

Selection from a row source must equal selection from the same rows as one tensor, for every
method and option, with the checks streamed (errors name global rows)."""
import numpy as np
import pytest
import torch

import gtp_kernels as gk
from gtp_kernels.collect.store import StoreSpec, TrajectoryStoreWriter
from gtp_kernels.selection import rows as rows_module
from gtp_kernels.selection.rows import RowSource, gather_rows, row_chunks, rows_matmul
from gtp_kernels.validation import InputError, InputTypeError

SPLITS = (0, 37, 38, 38, 150, 301)  # block edges: a one-row block and an empty one among them


def _pool(n=301, t=2, d=24, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, t, d)).astype(dtype)
    A[7] = 0  # an all-zero row: never selectable
    A[200:205] = A[10]  # duplicates: ties and dependence
    b = A[[3, 50, 160, 250]].astype(np.float64).reshape(4, -1).T @ np.array([1.0, 0.5, 2.0, 0.7])
    b += 0.01 * rng.standard_normal(t * d)
    return A, b


def _blocks(A):
    return [A[lo:hi] for lo, hi in zip(SPLITS[:-1], SPLITS[1:])]


def test_chunks_cover_rows_in_order_within_blocks():
    A, _ = _pool()
    source = RowSource(_blocks(A))
    assert (source.num_rows, source.dim, source.row_shape, source.num_blocks) == (301, 48, (2, 24), 4)
    assert source.block_starts == [0, 37, 38, 150, 301] and source.shape == (301, 48)
    seen = []
    for start, chunk in source.chunks(max_elements=48 * 20):
        assert chunk.shape[0] <= 20 and chunk.dtype == torch.float32
        assert not any(start < edge < start + chunk.shape[0] for edge in source.block_starts)  # one block each
        np.testing.assert_array_equal(chunk.numpy(), A.reshape(301, 48)[start : start + chunk.shape[0]])
        seen.append((start, chunk.shape[0]))
    assert [s for s, _ in seen] == sorted(s for s, _ in seen) and sum(n for _, n in seen) == 301
    flat = torch.from_numpy(A.reshape(301, 48))
    assert [(s, c.shape[0]) for s, c in row_chunks(flat, 48 * 100)] == [(0, 100), (100, 100), (200, 100), (300, 1)]


def test_index_select_by_global_row():
    A, _ = _pool()
    source = RowSource(_blocks(A))
    flat = A.reshape(301, 48)
    for idx in ([300, 0, 37, 36, 149, 150, 37, 0], [37], [], [5, 6]):
        got = source.index_select(idx)
        assert got.shape == (len(idx), 48)
        np.testing.assert_array_equal(got.numpy(), flat[idx])
        np.testing.assert_array_equal(gather_rows(torch.from_numpy(flat), idx).numpy(), flat[idx])
    out = torch.full((3, 48), float("nan"))
    assert source.index_select(torch.tensor([299, 1, 40]), out=out) is out
    np.testing.assert_array_equal(out.numpy(), flat[[299, 1, 40]])
    with pytest.raises(IndexError, match=r"\[0, 301\)"):
        source.index_select([301])
    with pytest.raises(IndexError):
        source.index_select([-1])
    x = torch.randn(48, 2, dtype=torch.float64)
    np.testing.assert_allclose(rows_matmul(source, x, torch.float64).numpy(), flat.astype(np.float64) @ x.numpy(),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", list(gk.METHODS))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, "bfloat16"])
def test_select_from_blocks_equals_select_from_one_tensor(method, dtype):
    A, b = _pool(dtype=np.float32 if dtype == "bfloat16" else dtype)
    tensor = torch.from_numpy(A).to(torch.bfloat16) if dtype == "bfloat16" else torch.from_numpy(A)
    blocks = [tensor[lo:hi] for lo, hi in zip(SPLITS[:-1], SPLITS[1:])]
    for options in ({}, dict(checkpoint_weights=[0.7, 0.3], exclude=[3, 11], align_threshold=0.0, positive=False)):
        want = gk.select(tensor, b, 12, method=method, **options)
        got = gk.select(blocks, b, 12, method=method, **options)
        assert got.params["num_checkpoints"] == 2  # T from the trajectory blocks
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.weights, want.weights)
        np.testing.assert_array_equal(got.residual_norms, want.residual_norms)
        assert got.params["guard_excluded"] == want.params["guard_excluded"]


def test_select_from_a_store_and_its_row_source(tmp_path):
    A, b = _pool(dtype=np.float16)
    spec = StoreSpec(n=301, t=2, d=24, example_ids=[f"x{i}" for i in range(301)], dtype="float16", shard_size=64)
    writer = TrajectoryStoreWriter(tmp_path / "s", spec)
    for index in range(spec.n_shards):
        start, stop = spec.shard_rows(index)
        writer.write_shard(index, A[start:stop])
    store = writer.finish()
    source = store.rows_source()
    assert source.num_blocks == 5 and source.dtype == torch.float16 and source.row_shape == (2, 24)
    want = gk.select(torch.from_numpy(A), b, 10, method="gtp")
    for candidates in (store, source):
        got = gk.select(candidates, b, 10, method="gtp")
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.weights, want.weights)
    assert gk.fit_residual(store, b, want.indices) == gk.fit_residual(A, b, want.indices)


def test_checks_are_streamed_and_name_global_rows():
    A, b = _pool()
    A[160, 1, 3] = np.nan  # in the fourth block, local row 10
    with pytest.raises(InputError, match="NaN or Inf .first at row 160"):
        gk.select(_blocks(A), b, 5)
    A, b = _pool()
    A[250] *= 2.0 ** 60  # a row norm float32 products cannot hold
    with pytest.raises(InputError, match="row norms must lie in"):
        gk.select(_blocks(A), b, 5)
    assert len(gk.select(_blocks(A), b, 5, compute_dtype=torch.float64).indices) == 5
    zeros = np.zeros((10, 2, 24), dtype=np.float32)
    with pytest.raises(InputError, match="all 20 rows are all-zero"):
        gk.select([zeros, zeros], b, 5)


def test_bad_blocks_are_input_errors():
    A, b = _pool()
    with pytest.raises(InputTypeError, match="block 1 is torch.float64 but block 0 is torch.float32"):
        gk.select([torch.from_numpy(A[:10]), torch.from_numpy(A[10:]).double()], b, 5)
    with pytest.raises(InputError, match="block 1 has rows of shape"):
        gk.select([A[:10], A[10:, :1]], b, 5)
    with pytest.raises(InputTypeError, match="block 0 holds numpy dtype int64"):
        gk.select([np.zeros((3, 48), dtype=np.int64)], b, 1)
    with pytest.raises(InputError, match="no blocks"):
        gk.select([], b, 1)
    with pytest.raises(InputTypeError, match="candidates must be"):
        gk.select("rows.npy", b, 1)


def test_passes_never_hold_more_than_a_chunk_of_upcast_rows(monkeypatch):
    """Every read of a row source goes through chunks() or index_select(): the largest upcast
    copy is one chunk, however many rows there are."""
    A, b = _pool(n=301)
    source = RowSource(_blocks(A.astype(np.float16)))
    largest = []
    real_chunks = RowSource.chunks

    def spying_chunks(self, max_elements=rows_module.CHUNK_ELEMENTS):
        for start, chunk in real_chunks(self, 48 * 16):  # tiny chunks: every consumer must cope
            largest.append(chunk.shape[0])
            yield start, chunk

    monkeypatch.setattr(RowSource, "chunks", spying_chunks)
    want = gk.select(torch.from_numpy(A.astype(np.float16)), b, 12, method="gtp-cosamp")
    got = gk.select(source, b, 12, method="gtp-cosamp")
    np.testing.assert_array_equal(got.indices, want.indices)
    assert largest and max(largest) <= 16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["gtp", "gtp-cosamp"])
def test_passes_read_16_bit_chunks_in_their_stored_dtype(monkeypatch, method, dtype):
    """On CPU the pursuits' passes over a 16-bit row source hand each chunk as stored to the
    row-products op (which converts in registers): no float32 copy of a chunk is made for them."""
    from gtp_kernels.ops import products

    A, b = _pool(n=301)
    tensor = torch.from_numpy(A).to(dtype)
    source = RowSource([tensor[lo:hi] for lo, hi in zip(SPLITS[:-1], SPLITS[1:])])
    seen = []
    real = products.row_products

    def spying_row_products(a, x, **kwargs):
        seen.append((a.dtype, a.shape[0]))
        return real(a, x, **kwargs)

    monkeypatch.setattr(products, "row_products", spying_row_products)  # ops.backends imports it per call
    want = gk.select(tensor, b, 12, method="gtp-reference")  # float32 products of the stored values
    got = gk.select(source, b, 12, method=method)
    assert seen and {d for d, _ in seen} == {dtype}
    assert sum(n for _, n in seen) >= 301  # at least one whole pass went through it
    if method == "gtp":
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_allclose(got.weights, want.weights, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cosamp_samples_16_bit_rows_as_stored(monkeypatch, dtype):
    """On CPU gtp-cosamp keeps its sample in the stored 16-bit dtype (half the memory of a float32
    copy): the same products, so the same selection bit for bit as with an upcast sample."""
    from gtp_kernels.selection import cosamp

    A, b = _pool(n=301)
    tensor = torch.from_numpy(A).to(dtype)
    source = RowSource([tensor[lo:hi] for lo, hi in zip(SPLITS[:-1], SPLITS[1:])])
    buffers = []
    real_gather = cosamp._SampledPursuit._gather

    def spying_gather(self, A_, idx):
        rows = real_gather(self, A_, idx)
        buffers.append(rows.dtype)
        return rows

    monkeypatch.setattr(cosamp._SampledPursuit, "_gather", spying_gather)
    stored = gk.select(source, b, 12, method="gtp-cosamp")
    assert buffers and set(buffers) == {dtype}
    monkeypatch.setattr(cosamp, "sample_keeps_stored_dtype", lambda A_, dtype_: False)
    buffers.clear()
    upcast = gk.select(source, b, 12, method="gtp-cosamp")
    assert set(buffers) == {torch.float32}
    np.testing.assert_array_equal(stored.indices, upcast.indices)
    np.testing.assert_array_equal(stored.weights, upcast.weights)
    np.testing.assert_array_equal(stored.residual_norms, upcast.residual_norms)


def test_cosamp_sample_bytes_are_capped(monkeypatch):
    """The sample never holds more than MAX_SAMPLE_BYTES of rows (here 20 rows of 48 fp16
    values), however large N; the selection still reaches k with a residual like exact pursuit's."""
    from gtp_kernels.selection import cosamp

    monkeypatch.setattr(cosamp, "MAX_SAMPLE_BYTES", 20 * 48 * 2)
    monkeypatch.setattr(cosamp, "MIN_SAMPLE", 8)
    A, b = _pool(n=301)
    tensor = torch.from_numpy(A).to(torch.float16)
    sizes = []
    real_gather = cosamp._SampledPursuit._gather

    def spying_gather(self, A_, idx):
        sizes.append(len(idx))
        return real_gather(self, A_, idx)

    monkeypatch.setattr(cosamp._SampledPursuit, "_gather", spying_gather)
    capped = gk.select(tensor, b, 12, method="gtp-cosamp")
    assert sizes and max(sizes) <= 20
    exact = gk.select(tensor, b, 12, method="gtp")
    assert len(capped.indices) == 12
    assert gk.fit_residual(tensor, b, capped.indices) <= 1.05 * gk.fit_residual(tensor, b, exact.indices)


def test_memory_mapped_blocks_get_read_ahead_hints(tmp_path, monkeypatch):
    """A pass over memory-mapped blocks advises each block sequential and asks for the next
    chunk (this block's, or the next block's first) before yielding the current one; the
    ranges lie inside the maps; the rows read are unchanged. Plain arrays get no hints."""
    A, _ = _pool(n=301)
    np.save(tmp_path / "a.npy", A[:150])
    np.save(tmp_path / "b.npy", A[150:])
    maps = [np.load(tmp_path / "a.npy", mmap_mode="r"), np.load(tmp_path / "b.npy", mmap_mode="r")[3:]]
    calls = []
    real = rows_module._advise

    def spying_advise(region, first_row, rows, advice):
        if region is not None:
            mapping, offset, row_bytes = region
            assert row_bytes == 48 * 4 and 0 <= offset + first_row * row_bytes < len(mapping)
            calls.append((id(mapping), first_row, rows, advice))
        return real(region, first_row, rows, advice)

    monkeypatch.setattr(rows_module, "_advise", spying_advise)
    source = RowSource(maps + [A[:5]])  # a plain array last: no region, no hints
    got = np.concatenate([c.numpy() for _, c in source.chunks(48 * 40)])  # chunks of 40 rows
    np.testing.assert_array_equal(got, np.concatenate([A[:150], A[153:], A[:5]]).reshape(-1, 48))
    seq, need = rows_module._MADV_SEQUENTIAL, rows_module._MADV_WILLNEED
    first, second = id(maps[0]._mmap), id(maps[1]._mmap)
    assert (first, 0, 150, seq) in calls and (second, 0, 148, seq) in calls
    assert [(m, r) for m, r, _, a in calls if a == need] == [(first, 40), (first, 80), (first, 120), (second, 0),
                                                             (second, 40), (second, 80), (second, 120)]
    assert rows_module._mapped_region(A) is None and rows_module._mapped_region(maps[1][::2]) is None
    offset = rows_module._mapped_region(maps[1])[1]
    assert offset == rows_module._mapped_region(np.load(tmp_path / "b.npy", mmap_mode="r"))[1] + 3 * 48 * 4


def test_to_device_copies_a_block_at_a_time():
    A, _ = _pool()
    source = RowSource(_blocks(A))
    assert source.to("cpu") is source
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA to move a row source")
    on_gpu = source.to("cuda")
    assert isinstance(on_gpu, torch.Tensor) and on_gpu.is_cuda
    np.testing.assert_array_equal(on_gpu.cpu().numpy(), A.reshape(301, 48))
