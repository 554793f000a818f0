"""A projector for TRAK (``pip install gtp_kernels[trak]``) running K1 with the projection generated in-kernel.

TRAK's projectors (``trak.projectors.AbstractProjector``) map a batch of per-example gradients
(B x grad_dim, or a dict of per-parameter blocks (B x ...)) to B x proj_dim with a random matrix
that depends on (seed, model_id). :class:`GTPProjector` keeps that interface and returns

    sketch = grads @ E^T,    E (proj_dim x grad_dim) with entries +-1 (``rademacher``) or N(0, 1) (``normal``)

i.e. the same entry distribution and scale as TRAK's ``BasicProjector`` / ``CudaProjector`` (TRAK
divides by sqrt(grad_dim) itself), so it drops into ``TRAKer(..., projector=GTPProjector(...))``.
E is K1's matrix times sqrt(proj_dim): ``project(grads, proj_dim, key, scale=sqrt(proj_dim))``. It is
never stored (no grad_dim x block matrix as in BasicProjector, no fast_jl CUDA extension); a dict of
gradients is projected block by block at its global offset (no flattened copy), which equals the
projection of the flattened vector in the dict's order (TRAK's ``vectorize`` order).

The matrices differ from TRAK's (another generator), so results match TRAK's statistically, not
bit for bit: inner products are preserved to the usual JL tolerance (relative error ~ sqrt(2/proj_dim)).
"""
from __future__ import annotations

import hashlib
import math
from typing import Mapping, Union

import torch

from ..ops.project import project

try:
    from trak.projectors import AbstractProjector, ProjectionType
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("gtp_kernels.integrations.trak needs TRAK: pip install gtp_kernels[trak] "
                      "(or pip install --no-deps traker)") from exc

_KINDS = {"rademacher": "rademacher", "normal": "gaussian"}
_PROJECTABLE = (torch.bfloat16, torch.float16, torch.float32)


def model_seed(seed: int, model_id: int) -> int:
    """The K1 seed (in [0, 2^64)) for (seed, model_id): a hash, so every pair gets its own matrix."""
    digest = hashlib.blake2b(f"gtp-trak:{int(seed)}:{int(model_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class GTPProjector(AbstractProjector):
    """TRAK projector on K1 (``Pi`` generated in-kernel; Triton on CUDA, blocked torch on CPU).

    Args follow TRAK's projectors: grad_dim (parameters), proj_dim, seed, proj_type
    ("rademacher" or "normal"), device. ``dtype``: the dtype of the returned sketch (None = the
    gradients' dtype, as TRAK's projectors). ``backend``: K1's backend ("auto", "triton", "torch").
    Extra keyword arguments TRAK passes to its own projectors (max_batch_size, block_size, ...) are
    accepted and ignored.
    """

    def __init__(self, grad_dim: int, proj_dim: int, seed: int, proj_type: Union[str, "ProjectionType"],
                 device: Union[str, torch.device], dtype: torch.dtype | None = None, backend: str = "auto",
                 *args, **kwargs) -> None:
        super().__init__(grad_dim, proj_dim, seed, proj_type, device)
        for name, value in (("grad_dim", grad_dim), ("proj_dim", proj_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        kind = _KINDS.get(getattr(proj_type, "value", proj_type))
        if kind is None:
            raise ValueError(f"proj_type must be 'rademacher' or 'normal', got {proj_type!r}")
        self.kind = kind
        self.dtype = dtype
        self.backend = backend
        self.device = torch.device(device)

    def project(self, grads: Union[torch.Tensor, Mapping[str, torch.Tensor]], model_id: int) -> torch.Tensor:
        """(B, proj_dim) sketch of grads (B, grad_dim) or a dict of (B, ...) blocks, for checkpoint model_id."""
        blocks = list(grads.values()) if isinstance(grads, Mapping) else [grads]
        if not blocks:
            raise ValueError("grads is an empty dict")
        n_rows = blocks[0].shape[0]
        widths = [math.prod(b.shape[1:]) for b in blocks]
        if sum(widths) != self.grad_dim:
            raise ValueError(f"grads have {sum(widths)} features per example, the projector was built for "
                             f"grad_dim={self.grad_dim}")
        key = model_seed(self.seed, model_id)
        out = torch.zeros(n_rows, self.proj_dim, dtype=torch.float32, device=self.device)
        offset = 0
        for block, width in zip(blocks, widths):
            if block.shape[0] != n_rows:
                raise ValueError(f"every gradient block must have {n_rows} rows, got {tuple(block.shape)}")
            flat = block.detach().reshape(n_rows, width).to(self.device)
            if flat.dtype not in _PROJECTABLE:
                flat = flat.to(torch.float32)
            project(flat, self.proj_dim, key, kind=self.kind, feature_offset=offset, out=out,
                    scale=math.sqrt(self.proj_dim), backend=self.backend)
            offset += width
        return out.to(self.dtype or blocks[0].dtype)

    def free_memory(self) -> None:
        """Nothing to free: the matrix is generated inside the kernel on every call."""
