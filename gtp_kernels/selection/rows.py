"""Candidate rows that live in several blocks (a store's memory-mapped shards): a row source.

Selection reads the candidates A (N x D) in two ways only: passes over every row (checks,
products A X, LESS scores) and fetches of a few rows by global index (the selected atoms, a
compressive-sampling sample). :class:`RowSource` serves both from a sequence of row blocks
without ever concatenating them:

* ``chunks(max_elements)`` yields ``(start, rows)`` views, in row order, of at most
  ``max_elements`` values each, in the blocks' stored dtype (fp16, bf16, fp32 or fp64) and
  never straddling two blocks; a consumer upcasts one chunk at a time, so the extra memory of
  a pass is one chunk, whatever N.
* ``index_select(indices)`` gathers rows by global index (any order, repeats allowed) into a
  (len, D) tensor of the stored dtype, touching only the blocks that hold them.

Blocks are torch tensors or NumPy arrays (a ``np.load(..., mmap_mode="r")`` memory map stays a
memory map: the pages a pass touches are file-backed page cache, not process memory; a pass
tells the kernel it reads the map in order and asks for the next chunk while the current one is
processed, see :func:`_advise`), each
(n_i, D) or (n_i, T, d) (a trajectory; rows are then the T*d values side by side), all of one
dtype and device. :meth:`TrajectoryStore.rows_source` gives a store's shards as one.

The module-level helpers take either a plain tensor or a row source, so that one loop serves
both: for a tensor, :func:`row_chunks` is the slicing loop the checks always did and
:func:`gather_rows` is ``index_select``; the N-sized products keep their tensor fast paths
and run a row source a chunk at a time through them (``ops.backends.candidate_products``).
"""
from __future__ import annotations

import bisect
import math
import mmap
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..ops.backends import CHUNK_ELEMENTS  # noqa: F401 - values per chunk of a pass (re-exported)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class RowSourceError(ValueError):
    """Blocks that cannot form one row source (the caller turns it into its own error type)."""


class RowSourceTypeError(RowSourceError, TypeError):
    """Blocks of the wrong type or dtype."""


def tensor_from_array(array: np.ndarray) -> torch.Tensor:
    """A numpy array as a tensor sharing its memory (a read-only memory map stays zero-copy:
    gtp_kernels never writes to its inputs, so torch's non-writable warning is silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(array))


def _block_tensor(block, position: int) -> torch.Tensor:
    if isinstance(block, torch.Tensor):
        return block.detach()
    if isinstance(block, np.ndarray):
        if block.dtype.kind != "f":
            raise RowSourceTypeError(f"block {position} holds numpy dtype {block.dtype}, expected floating point")
        return tensor_from_array(block)
    raise RowSourceTypeError(f"block {position} is a {type(block).__name__}, expected a torch.Tensor or numpy.ndarray")


# ---- memory-mapped blocks: read-ahead hints --------------------------------------------------
#
# A pass faults a memory map in page by page, and the kernel's default read-ahead on a mapping is
# small: on our VM (a virtual disk that reads ~0.5 GB/s with O_DIRECT) a pass over fp16 shards not
# in page cache read 0.18-0.25 GB/s. Telling the kernel the pass is sequential (MADV_SEQUENTIAL:
# aggressive read-ahead) and asking for the next chunk while the current one is processed
# (MADV_WILLNEED) read the same shards at 0.6-1.1 GB/s (benchmarks/bench_store_out_of_core.py).
# Hints only: a platform without madvise, or a refusal, leaves the plain reads.
_MADV_SEQUENTIAL = getattr(mmap, "MADV_SEQUENTIAL", None)
_MADV_WILLNEED = getattr(mmap, "MADV_WILLNEED", None)


def _mapped_region(block) -> Optional[Tuple[mmap.mmap, int, int]]:
    """(the mmap, byte offset of the block's first row in it, bytes per row) for a C-contiguous
    view of a NumPy memory map (``np.load(..., mmap_mode=...)``, ``np.memmap``), else None."""
    mapping = getattr(block, "_mmap", None)
    if not isinstance(block, np.ndarray) or not isinstance(mapping, mmap.mmap) or not block.flags.c_contiguous \
            or block.ndim == 0 or block.shape[0] == 0 or not hasattr(mapping, "madvise"):
        return None
    try:
        base = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
    except (ValueError, TypeError, BufferError):  # a closed map: no hints
        return None
    offset = block.ctypes.data - base
    row_bytes = block.nbytes // block.shape[0]
    if offset < 0 or offset + block.nbytes > len(mapping):
        return None
    return mapping, offset, row_bytes


def _advise(region: Optional[Tuple[mmap.mmap, int, int]], first_row: int, rows: int, advice: Optional[int]) -> None:
    """madvise(advice) over rows [first_row, first_row + rows) of a mapped block (page-aligned
    outwards); a no-op without a region or the advice, errors ignored (it is a hint)."""
    if region is None or advice is None or rows <= 0:
        return
    mapping, offset, row_bytes = region
    start = offset + first_row * row_bytes
    stop = min(len(mapping), start + rows * row_bytes)
    aligned = start - start % mmap.PAGESIZE
    if stop <= aligned:
        return
    try:
        mapping.madvise(advice, aligned, stop - aligned)
    except (OSError, ValueError):
        pass


class RowSource:
    """The rows of A (N x D) as a sequence of row blocks, read a chunk or a few rows at a time.

    Attributes (read-only): ``num_rows`` (N), ``dim`` (D), ``dtype`` (the stored dtype),
    ``device``, ``row_shape`` ((D,), or (T, d) for trajectory blocks), ``shape`` ((N, D)),
    ``is_cuda``, ``num_blocks``, ``block_starts`` (the global row number of each block's
    first row, then N). ``element_size()`` is bytes per stored value.

    A row source duck-types the few tensor attributes the selection code reads for metadata
    (``shape``, ``dtype``, ``device``, ``is_cuda``, ``element_size()``, ``to(device)``); every read
    of values goes through ``chunks`` or ``index_select`` (or the helpers below).
    """

    def __init__(self, blocks: Sequence[Union[torch.Tensor, np.ndarray]]):
        if isinstance(blocks, (torch.Tensor, np.ndarray)) or not isinstance(blocks, Sequence):
            raise RowSourceTypeError(f"blocks must be a list or tuple of arrays, got {type(blocks).__name__}")
        tensors = [_block_tensor(b, i) for i, b in enumerate(blocks)]
        regions = [_mapped_region(b) for b in blocks]
        if not tensors:
            raise RowSourceError("no blocks")
        first = tensors[0]
        for i, t in enumerate(tensors):
            if t.dim() not in (2, 3):
                raise RowSourceError(f"block {i} has shape {tuple(t.shape)}; blocks are (n, D) or (n, T, d)")
            if t.dtype != first.dtype:
                raise RowSourceTypeError(f"block {i} is {t.dtype} but block 0 is {first.dtype}; blocks share one dtype")
            if t.device != first.device:
                raise RowSourceError(f"block {i} is on {t.device} but block 0 is on {first.device}")
            if tuple(t.shape[1:]) != tuple(first.shape[1:]):
                raise RowSourceError(f"block {i} has rows of shape {tuple(t.shape[1:])} but block 0 has "
                                     f"{tuple(first.shape[1:])}")
        self._row_shape = tuple(int(s) for s in first.shape[1:])
        self._dim = int(math.prod(self._row_shape))
        self._dtype = first.dtype
        self._device = first.device
        # empty blocks hold nothing to read; every kept block is seen as (n_i, D)
        self._blocks: List[torch.Tensor] = [t.reshape(t.shape[0], self._dim) if t.is_contiguous() else t
                                            for t in tensors if t.shape[0] > 0]
        # per kept block: where it lies in a memory map (read-ahead hints), or None
        self._regions = [r for t, r in zip(tensors, regions) if t.shape[0] > 0]
        starts = [0]
        for t in self._blocks:
            starts.append(starts[-1] + int(t.shape[0]))
        self._starts = starts

    # ---- what it holds ---------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return self._starts[-1]

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def is_cuda(self) -> bool:
        return self._device.type == "cuda"

    @property
    def row_shape(self) -> Tuple[int, ...]:
        return self._row_shape

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_rows, self._dim))

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def block_starts(self) -> List[int]:
        return list(self._starts)

    def element_size(self) -> int:
        return torch.empty((), dtype=self._dtype).element_size()

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return (f"RowSource(N={self.num_rows}, D={self._dim}, dtype={self._dtype}, device={self._device}, "
                f"blocks={self.num_blocks})")

    def _select(self, b: int, local: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows `local` (local row numbers) of block b as (len, D)."""
        block = self._blocks[b]
        if block.dim() == 2:
            return block.index_select(0, local) if out is None else torch.index_select(block, 0, local, out=out)
        rows = block.index_select(0, local).reshape(local.numel(), self._dim)  # only these rows copied
        return rows if out is None else out.copy_(rows)

    # ---- reads -----------------------------------------------------------------------------
    def chunks(self, max_elements: int = CHUNK_ELEMENTS) -> Iterator[Tuple[int, torch.Tensor]]:
        """(start, rows (n, D)) in row order, in the stored dtype; each chunk holds at most
        max_elements values (at least one row) and lies in one block (a view where the block is
        contiguous)."""
        step = max(1, int(max_elements) // max(1, self._dim))
        for b, block in enumerate(self._blocks):
            base = self._starts[b]
            n = int(block.shape[0])
            region = self._regions[b]
            _advise(region, 0, n, _MADV_SEQUENTIAL)  # memory-mapped: read ahead along the pass
            for lo in range(0, n, step):
                # ask for the next chunk (of this block, or the next block's first) before
                # this one is processed, so that its reads overlap the work on this one
                if lo + step < n:
                    _advise(region, lo + step, step, _MADV_WILLNEED)
                elif b + 1 < len(self._blocks):
                    _advise(self._regions[b + 1], 0, step, _MADV_WILLNEED)
                chunk = block[lo : lo + step]
                if chunk.dim() != 2:  # a non-contiguous trajectory block: flattened one chunk at a time
                    chunk = chunk.reshape(chunk.shape[0], self._dim)
                yield base + lo, chunk

    def index_select(self, indices: Union[torch.Tensor, Sequence[int]],
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows by global index, (len(indices), D) in the stored dtype (into `out` if given: a
        (len, D) tensor of the stored dtype on this device). IndexError outside [0, N)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
        count = idx.numel()
        if out is None:
            out = torch.empty(count, self._dim, dtype=self._dtype, device=self._device)
        elif out.shape != (count, self._dim) or out.dtype != self._dtype or out.device != self._device:
            raise ValueError(f"out must be ({count}, {self._dim}) {self._dtype} on {self._device}, "
                             f"got {tuple(out.shape)} {out.dtype} on {out.device}")
        if count == 0:
            return out
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= self.num_rows:
            raise IndexError(f"row indices must lie in [0, {self.num_rows}), got values from {low} to {high}")
        first_block = bisect.bisect_right(self._starts, low) - 1
        if first_block == bisect.bisect_right(self._starts, high) - 1:  # all in one block (one row: always)
            local = idx - self._starts[first_block]
            return self._select(first_block, local.to(self._device), out)
        block_of = torch.searchsorted(torch.tensor(self._starts[1:]), idx, right=True)
        for b in torch.unique(block_of).tolist():
            positions = (block_of == b).nonzero().flatten()
            local = idx[positions] - self._starts[b]
            rows = self._select(b, local.to(self._device))
            out.index_copy_(0, positions.to(self._device), rows)
        return out

    def to(self, device: Union[str, torch.device]) -> Union["RowSource", torch.Tensor]:
        """This source where it already is; elsewhere one (N, D) tensor on `device`, copied a
        block at a time (e.g. a memory-mapped store onto a GPU: host memory stays one block)."""
        device = torch.device(device)
        if device.type == self._device.type and (device.index is None or device == self._device):
            return self
        out = torch.empty(self.num_rows, self._dim, dtype=self._dtype, device=device)
        for start, chunk in self.chunks():
            out[start : start + chunk.shape[0]].copy_(chunk)
        return out


RowsLike = Union[torch.Tensor, RowSource]


def row_chunks(A: RowsLike, max_elements: int = CHUNK_ELEMENTS) -> Iterator[Tuple[int, torch.Tensor]]:
    """(start, rows) chunks of at most max_elements values, of a 2-D tensor or a row source."""
    if isinstance(A, RowSource):
        yield from A.chunks(max_elements)
        return
    step = max(1, int(max_elements) // max(1, A.shape[1]))
    for start in range(0, A.shape[0], step):
        yield start, A[start : start + step]


def gather_rows(A: RowsLike, indices: Union[torch.Tensor, Sequence[int]],
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows `indices` of a 2-D tensor or a row source, (len, D) in its dtype (index_select:
    advanced indexing, A[list], copies far slower on CPU)."""
    if isinstance(A, RowSource):
        return A.index_select(indices, out=out)
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).to(A.device)
    if out is None:
        return A.index_select(0, idx)
    return torch.index_select(A, 0, idx, out=out)


def rows_matmul(A: RowsLike, X: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A @ X in dtype, plainly: one matmul for a tensor (A upcast whole, as the reference always
    did), a chunk at a time for a row source (each chunk upcast alone)."""
    if not isinstance(A, RowSource):
        return A.to(dtype) @ X
    out = torch.empty((A.num_rows,) + tuple(X.shape[1:]), dtype=dtype, device=A.device)
    for start, chunk in A.chunks():
        out[start : start + chunk.shape[0]] = chunk.to(dtype) @ X
    return out
