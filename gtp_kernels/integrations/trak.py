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

import math
from typing import Union

import torch

from .sketch import Gradients, checked_kind, model_seed, sketch

try:
    from trak.projectors import AbstractProjector, ProjectionType
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("gtp_kernels.integrations.trak needs TRAK: pip install gtp_kernels[trak] "
                      "(or pip install --no-deps traker)") from exc

__all__ = ["GTPProjector", "model_seed"]


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
        self.kind = checked_kind("grad_dim", grad_dim, proj_dim, seed, proj_type)
        self.dtype = dtype
        self.backend = backend
        self.device = torch.device(device)

    def project(self, grads: Gradients, model_id: int) -> torch.Tensor:
        """(B, proj_dim) sketch of grads (B, grad_dim) or a dict of (B, ...) blocks, for checkpoint model_id."""
        return sketch(grads, dim_name="grad_dim", dim=self.grad_dim, proj_dim=self.proj_dim,
                      key=model_seed(self.seed, model_id), kind=self.kind, scale=math.sqrt(self.proj_dim),
                      device=self.device, dtype=self.dtype, backend=self.backend)

    def free_memory(self) -> None:
        """Nothing to free: the matrix is generated inside the kernel on every call."""
