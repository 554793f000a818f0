"""What the TRAK and dattri projectors share: argument checks, the per-checkpoint seed, the blockwise sketch.

TRAK's and dattri's projectors have one interface under two sets of names (grad_dim / feature_dim,
model_id / ensemble_id) and two scales (TRAK's sketch is grads @ E^T, dattri's grads @ E^T / sqrt(proj_dim),
E with entries +-1 or N(0, 1)); both are the collection's :class:`~gtp_kernels.collect.projector.Projector`
(K1 at global feature offsets) with ``scale`` sqrt(proj_dim) or 1.
"""
from __future__ import annotations

import hashlib
import math
from typing import Mapping, Union

import torch

from ..collect.projector import Projector

_KINDS = {"rademacher": "rademacher", "normal": "gaussian"}
_PROJECTABLE = (torch.bfloat16, torch.float16, torch.float32)

Gradients = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def model_seed(seed: int, model_id: int) -> int:
    """The K1 seed (in [0, 2^64)) for (seed, model_id): a hash, so every pair gets its own matrix."""
    digest = hashlib.blake2b(f"gtp-trak:{int(seed)}:{int(model_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def checked_kind(dim_name: str, dim: int, proj_dim: int, seed: int, proj_type: object) -> str:
    """K1's kind for proj_type ("rademacher" or "normal", a string or either framework's enum), after checks."""
    for name, value in ((dim_name, dim), ("proj_dim", proj_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    kind = _KINDS.get(getattr(proj_type, "value", proj_type))
    if kind is None:
        raise ValueError(f"proj_type must be 'rademacher' or 'normal', got {proj_type!r}")
    return kind


def sketch(grads: Gradients, *, dim_name: str, dim: int, proj_dim: int, key: int, kind: str, scale: float,
           device: torch.device, dtype: torch.dtype | None, backend: str) -> torch.Tensor:
    """scale * grads @ Pi^T (B, proj_dim) with K1's Pi for key, in dtype (None: the gradients' dtype).

    grads: (B, dim) or a dict of (B, ...) blocks, projected block by block at their global offset
    (no flattened copy), which equals projecting the blocks flattened and concatenated in dict order.
    """
    blocks = list(grads.values()) if isinstance(grads, Mapping) else [grads]
    if not blocks:
        raise ValueError("grads is an empty dict")
    n_rows = blocks[0].shape[0]
    widths = [math.prod(b.shape[1:]) for b in blocks]
    if sum(widths) != dim:
        raise ValueError(f"grads have {sum(widths)} features per example, the projector was built for "
                         f"{dim_name}={dim}")
    out = torch.zeros(n_rows, proj_dim, dtype=torch.float32, device=device)
    # every call checks its result for NaN/Inf (the frameworks hand over any gradients)
    projector = Projector({str(j): width for j, width in enumerate(widths)}, proj_dim, [key], kind=kind,
                          backend=backend, device=device, check_finite=True)
    for j, block in enumerate(blocks):
        if block.shape[0] != n_rows:
            raise ValueError(f"every gradient block must have {n_rows} rows, got {tuple(block.shape)}")
        flat = block.detach().reshape(n_rows, widths[j]).to(device)
        if flat.dtype not in _PROJECTABLE:
            flat = flat.to(torch.float32)
        projector(flat, str(j), key, out, scale)
    return out.to(dtype or blocks[0].dtype)
