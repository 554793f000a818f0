"""The projection stage: K1 applied to named parameter blocks at their global feature offsets.

Parameters p_1, ..., p_n (in a fixed order, sizes P_1, ..., P_n) are laid end to end in one
P-vector; parameter j starts at offset o_j = P_1 + ... + P_{j-1}. For a batch of per-example
gradients G_j (B, P_j) of parameter j,

    out += scale * G_j @ Pi_seed[:, o_j : o_j + P_j]^T        (Pi_seed in R^{d x P}, K1's entries)

so projecting the parameters one by one and accumulating equals projecting the concatenated
gradient (SPEC K1), without ever forming the (B, P) concatenation. On the torch (CPU) path
regenerating Pi for every batch dominates the cost, so when every (seed, parameter) slice of Pi
fits in ``cache_mb`` MiB they are materialised once (``projection_matrix``, the same entries);
the Triton path always generates Pi in-kernel.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

__all__ = ["Projector"]


class Projector:
    """K1 for named parameter blocks at their global feature offsets, Pi cached when it fits.

    Args:
        sizes: parameter name -> number of entries P_j, in the flattening order.
        d: projected dimensions.
        seeds: every seed this projector will be called with (the cache holds one Pi per seed).
        kind: "rademacher" or "gaussian" (K1's Pi entries).
        backend: K1 backend, "auto", "triton" or "torch".
        device: where blocks, outputs and a cached Pi live.
        cache_mb: on the torch path, materialise Pi once when len(seeds) * P * d float32 fit in
            this many MiB (0: never).
        check_finite: let K1 check each call's result for NaN/Inf (a host sync per call); the
            collection passes False and checks each shard whole.
        project: the K1 function (default :func:`gtp_kernels.ops.project.project`).
    """

    def __init__(self, sizes: Mapping[str, int], d: int, seeds: Sequence[int], *, kind: str = "rademacher",
                 backend: str = "auto", device: torch.device | str = "cpu", cache_mb: float = 0.0,
                 check_finite: bool = False, project: Callable[..., torch.Tensor] | None = None):
        from ..ops._dispatch import resolve_backend
        from ..ops.project import project as k1_project, projection_matrix

        device = torch.device(device)
        names = list(sizes)
        self.project = project if project is not None else k1_project
        self.d, self.kind, self.backend, self.check_finite = d, kind, backend, check_finite
        self.key = self.key_of(sizes, seeds)
        self.offsets: dict[str, int] = {}
        offset = 0
        for name in names:
            self.offsets[name] = offset
            offset += sizes[name]
        self.cache: dict[tuple[int, str], torch.Tensor] = {}
        cache_bytes = len(seeds) * offset * d * 4
        if cache_mb > 0 and cache_bytes <= cache_mb * 2**20 and resolve_backend(backend, torch.empty(0, device=device)) == "torch":
            for seed in seeds:
                for name in names:
                    self.cache[(seed, name)] = projection_matrix(
                        d, sizes[name], seed, kind, self.offsets[name], dtype=torch.float32, device=device).T.contiguous()

    @property
    def cached(self) -> bool:
        """True when Pi is materialised (the torch path within the cache budget)."""
        return bool(self.cache)

    @staticmethod
    def key_of(sizes: Mapping[str, int], seeds: Sequence[int]) -> tuple:
        """What a projector depends on besides d, kind, backend and device (fixed per collection):
        two projectors with equal keys (and those) project identically."""
        return tuple(sizes), tuple(sizes.values()), tuple(seeds)

    def __call__(self, flat: torch.Tensor, name: str, seed: int, block: torch.Tensor, scale: float) -> None:
        """block += scale * flat @ Pi_seed[:, o_name : o_name + P_name]^T; flat is (B, P_name)."""
        cached = self.cache.get((seed, name))
        if cached is not None:
            block.addmm_(flat.float(), cached, alpha=scale)
        else:
            self.project(flat, self.d, seed, kind=self.kind, feature_offset=self.offsets[name], out=block,
                         scale=scale, backend=self.backend, check_finite=self.check_finite)
