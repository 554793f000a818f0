"""A projector for dattri (``pip install gtp_kernels[dattri]``) running K1 with the projection generated in-kernel.

dattri's projectors (``dattri.func.projection.AbstractProjector``) map a batch of features
(B x feature_dim, or a dict of (B, ...) blocks) to B x proj_dim with a random matrix that depends on
(seed, ensemble_id). :class:`GTPDattriProjector` keeps that interface and returns

    sketch = features @ E^T / sqrt(proj_dim),    E (proj_dim x feature_dim) with entries +-1 or N(0, 1)

i.e. the scale of dattri's ``BasicProjector`` and ``CudaProjector`` (they divide by sqrt(proj_dim) so
that ||sketch|| estimates ||features||). That is K1's own matrix: ``project(features, proj_dim, key)``.
It is never stored (BasicProjector holds a feature_dim x block_size matrix); a dict is projected block
by block at its global offset, equal to projecting dattri's ``_vectorize`` of it (flattened, dict order).

For one (seed, ensemble_id) the matrix is TRAK's ``GTPProjector``'s for (seed, model_id) divided by
sqrt(proj_dim). It differs from dattri's (another generator): results match dattri's statistically,
inner products to the JL tolerance (relative error ~ sqrt(2/proj_dim)), not bit for bit.
"""
from __future__ import annotations

from typing import Union

import torch

from .sketch import Gradients, checked_kind, model_seed, sketch

try:
    from dattri.func.projection import AbstractProjector, ProjectionType
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("gtp_kernels.integrations.dattri needs dattri: pip install gtp_kernels[dattri] "
                      "(or pip install --no-deps dattri)") from exc

__all__ = ["GTPDattriProjector", "model_seed"]


class GTPDattriProjector(AbstractProjector):
    """dattri projector on K1 (``Pi`` generated in-kernel; Triton on CUDA, blocked torch on CPU).

    Args follow dattri's ``BasicProjector``: feature_dim, proj_dim, seed, proj_type ("rademacher" or
    "normal", a string or dattri's ``ProjectionType``), device, dtype (of the returned sketch, float32
    by default as in dattri's BasicProjector; None = the features' dtype), ensemble_id (kept for dattri's
    interface: ``project`` takes the ensemble id on every call). ``backend``: K1's backend ("auto",
    "triton", "torch"). Other keyword arguments dattri's projectors take (block_size,
    max_batch_size, ...) are accepted and ignored: nothing is blocked or cached here.
    """

    def __init__(self, feature_dim: int, proj_dim: int, seed: int, proj_type: Union[str, "ProjectionType"],
                 device: Union[str, torch.device], dtype: torch.dtype | None = torch.float32, ensemble_id: int = 0,
                 backend: str = "auto", **kwargs) -> None:
        super().__init__(feature_dim, proj_dim, seed, proj_type, device)
        self.kind = checked_kind("feature_dim", feature_dim, proj_dim, seed, proj_type)
        self.dtype = dtype
        self.ensemble_id = ensemble_id
        self.backend = backend
        self.device = torch.device(device)

    def project(self, features: Gradients, ensemble_id: int) -> torch.Tensor:
        """(B, proj_dim) sketch of features (B, feature_dim) or a dict of (B, ...) blocks, for ensemble_id."""
        return sketch(features, dim_name="feature_dim", dim=self.feature_dim, proj_dim=self.proj_dim,
                      key=model_seed(self.seed, ensemble_id), kind=self.kind, scale=1.0,
                      device=self.device, dtype=self.dtype, backend=self.backend)

    def free_memory(self) -> None:
        """Nothing to free: the matrix is generated inside the kernel on every call."""
