"""Random selection problems with known answers, shared by the pursuit tests."""
from __future__ import annotations

import numpy as np
import torch


def planted_problem(n: int, dim: int, k: int, seed: int, dtype=torch.float64, m: int = 1):
    """Gaussian A (n, dim) and b = A_S^T w* with w* > 0 (well away from 0), |S| = k per target.

    Returns A, B (dim, m), supports (list of index tensors), weights (list).
    """
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, dim, generator=g, dtype=torch.float64)
    A /= A.norm(dim=1, keepdim=True)
    cols, supports, weights = [], [], []
    for _ in range(m):
        S = torch.randperm(n, generator=g)[:k]
        w = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
        cols.append(A[S].T @ w)
        supports.append(S)
        weights.append(w)
    return A.to(dtype), torch.stack(cols, dim=1).to(dtype), supports, weights


def nnls_drop_problem(dtype=torch.float64):
    """A problem where the NNLS step must drop an already-selected atom.

    a3 = (a1 + a2)/sqrt(2) + 0.3 e2 (normalised) is picked first (highest correlation with
    b = a1 + a2 - 0.1 e2); once a1 and a2 are in, the unconstrained weight of a3 is clearly
    negative (the target leans away from e2) and NNLS drops it.
    """
    g = torch.Generator().manual_seed(7)
    dim = 12
    e = torch.eye(dim, dtype=torch.float64)
    a1, a2 = e[0], e[1]
    b = 1.0 * a1 + 1.0 * a2 - 0.1 * e[2]
    a3 = (a1 + a2) / (2 ** 0.5) + 0.3 * e[2]
    a3 = a3 / a3.norm()
    noise = torch.randn(40, dim, generator=g, dtype=torch.float64) * 0.05
    noise[:, :3] = 0  # fillers orthogonal to b: never useful
    noise += 0.2 * e[3]
    A = torch.cat([torch.stack([a1, a2, a3]), noise / noise.norm(dim=1, keepdim=True)])
    return A.to(dtype), b.to(dtype)


def clustered_problem(seed: int):
    """A small pool of clusters of near-copies (a centre, scaled by up to 10%, plus noise of norm
    1e-12..1e-3 of it), a target mixing 5 rows (plus 1% noise half the time) and a budget.

    Issue 14: gtp and gtp-reference kept different near-copies (of negligible weight) on such
    pools. Returns A (N, D) float64, b (D,), k."""
    rs = np.random.RandomState(seed)
    D = int(rs.choice([8, 16, 24]))
    clusters, per = int(rs.randint(3, 8)), int(rs.randint(2, 6))
    spread = 10.0 ** rs.uniform(-12, -3)
    centres = rs.randn(clusters, D)
    A = np.concatenate([c * (1 + 0.1 * rs.rand(per, 1)) + spread * rs.randn(per, D) for c in centres])
    A = A[rs.permutation(len(A))]
    mix = rs.choice(len(A), min(len(A), 5), replace=False)
    b = A[mix].T @ (rs.rand(len(mix)) + 0.1)
    if rs.rand() < 0.5:
        b = b + 0.01 * np.linalg.norm(b) / np.sqrt(D) * rs.randn(D)
    return A, b, int(rs.randint(2, min(len(A), 2 * D)))
