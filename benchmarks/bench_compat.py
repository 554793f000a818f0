"""The drop-ins against the solvers they replace, side by side in one run (CPU).

For a few pool shapes (N candidates of dimension D, budget k) it times, as medians:

* scikit-learn's ``orthogonal_mp(X, y, n_nonzero_coefs=k)`` (X = A^T, float64) against
  ``gtp_kernels.compat.orthogonal_mp`` on the same arrays;
* CORDS's ``OrthogonalMP_REG_Parallel(A, b, nnz=k, positive=True, lam=0.5, tol=1e-4)``, the
  call GRAD-MATCH makes (float32 torch tensors, A = (D, N)), against
  ``gtp_kernels.compat.OrthogonalMP_REG_Parallel``; and CORDS's numpy ``OrthogonalMP_REG``
  (its CPU path) against ours;

and prints the ratio theirs / ours (> 1: the drop-in is faster) and whether both chose the
same rows. CORDS rows are left out when cords is not installed (pip install --no-deps
cords==0.0.4). Usage: python benchmarks/bench_compat.py
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_seconds, script_help  # noqa: E402

from gtp_kernels.compat import OrthogonalMP_REG, OrthogonalMP_REG_Parallel, orthogonal_mp  # noqa: E402
from gtp_kernels.compat.cords import load_cords_solvers  # noqa: E402

SHAPES = [(2000, 256, 50), (10000, 1024, 100), (20000, 1024, 200)]  # (N, D, k)
REPEAT = 3


def problem(n, d, seed=0):
    """A pool whose rows share a direction (as gradients do) and a target made of 20 of them plus noise."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(1, d, generator=g, dtype=torch.float64)
    idx = torch.randperm(n, generator=g)[:20]
    b = A[idx].T @ torch.rand(20, generator=g, dtype=torch.float64) + 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
    return A, b


def main() -> None:
    script_help(__doc__)
    from sklearn.linear_model import orthogonal_mp as sk_orthogonal_mp

    cords = load_cords_solvers()
    print(f"torch threads: {torch.get_num_threads()}; median of {REPEAT} after a warm-up; "
          f"cords: {'0.0.4' if cords is not None else 'not installed'}")
    header = f"{'solver':<34} {'N':>6} {'D':>5} {'k':>4} {'theirs s':>9} {'ours s':>8} {'ratio':>6}  same rows"
    print(header)
    print("-" * len(header))
    for n, d, k in SHAPES:
        A, b = problem(n, d)
        X, y = A.T.contiguous().numpy(), b.numpy()
        ref = sk_orthogonal_mp(X, y, n_nonzero_coefs=k)
        ours = orthogonal_mp(X, y, n_nonzero_coefs=k)
        t_ref = median_seconds(lambda: sk_orthogonal_mp(X, y, n_nonzero_coefs=k), REPEAT)
        t_ours = median_seconds(lambda: orthogonal_mp(X, y, n_nonzero_coefs=k), REPEAT)
        same = bool(np.array_equal(ref != 0, ours != 0))
        print(f"{'sklearn orthogonal_mp (float64)':<34} {n:>6} {d:>5} {k:>4} {t_ref:>9.3f} {t_ours:>8.3f} "
              f"{t_ref / t_ours:>6.1f}  {same}")
        if cords is None:
            continue
        A32, b32 = A.T.contiguous().float(), b.float()  # GRAD-MATCH: (D, N) float32
        kw = dict(nnz=k, positive=True, lam=0.5, tol=1e-4)

        def cords_parallel():
            saved = np.seterr(all="raise")
            try:
                return cords.OrthogonalMP_REG_Parallel(A32, b32, device="cpu", **kw)
            finally:
                np.seterr(**saved)

        ref = cords_parallel()
        ours = OrthogonalMP_REG_Parallel(A32, b32, device="cpu", **kw)
        t_ref = median_seconds(cords_parallel, REPEAT)
        t_ours = median_seconds(lambda: OrthogonalMP_REG_Parallel(A32, b32, device="cpu", **kw), REPEAT)
        same = torch.equal(ref != 0, ours != 0)
        print(f"{'CORDS OrthogonalMP_REG_Parallel':<34} {n:>6} {d:>5} {k:>4} {t_ref:>9.3f} {t_ours:>8.3f} "
              f"{t_ref / t_ours:>6.1f}  {same} ({int((ref != 0).sum())} vs {int((ours != 0).sum())} rows)")
        A_np, b_np = A.T.contiguous().numpy(), b.numpy()

        def cords_numpy():
            saved = np.seterr(all="raise")
            try:
                return cords.OrthogonalMP_REG(A_np, b_np, **kw)
            finally:
                np.seterr(**saved)

        ref = cords_numpy()
        ours = OrthogonalMP_REG(A_np, b_np, **kw)
        t_ref = median_seconds(cords_numpy, REPEAT)
        t_ours = median_seconds(lambda: OrthogonalMP_REG(A_np, b_np, **kw), REPEAT)
        same = bool(np.array_equal(ref != 0, ours != 0))
        print(f"{'CORDS OrthogonalMP_REG (numpy)':<34} {n:>6} {d:>5} {k:>4} {t_ref:>9.3f} {t_ours:>8.3f} "
              f"{t_ref / t_ours:>6.1f}  {same} ({np.count_nonzero(ref)} vs {np.count_nonzero(ours)} rows)")


if __name__ == "__main__":
    main()
