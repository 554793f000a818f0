"""Joint selection with the candidate screen against without it, side by side.

``select(..., targets="joint", screen=1.5)`` (gtp select's default for joint targets) ranks the
rows in one pass and runs the pursuit on the ~1.5 k kept rows; unscreened joint gtp scans all N
rows at every pick. The same problem as bench_pursuit.py's ``select joint`` group (unit-norm
rows, 24 target columns each a non-negative mix of 300 rows plus noise), k = 100, fp32 in
memory. Medians of 5 after a warm-up, alternating which runs first; pool reads from
``TargetSelection.passes``. Run: PYTHONPATH=. python benchmarks/joint_screen.py
"""
from __future__ import annotations

import statistics
import time

import torch

import gtp_kernels as gk

K, M, REPEATS = 100, 24, 5


def problem(n: int, d: int):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(n, d, generator=g)
    A /= A.norm(dim=1, keepdim=True)
    B = A[torch.randperm(n, generator=g)[:300]].T @ torch.rand(300, M, generator=g)
    return A, B + 0.05 * torch.randn(d, M, generator=g)


def main() -> None:
    print("| N x D | unscreened joint gtp s | screened (1.5) s | ratio | pool reads unscreened / screened |")
    print("|---|---|---|---|---|")
    for n, d in ((20_000, 512), (200_000, 1024)):
        A, B = problem(n, d)
        gk.select(A, B, K, targets="joint", screen=1.5)  # warm-up
        times = {None: [], 1.5: []}
        passes = {}
        for repeat in range(REPEATS):
            for screen in ((None, 1.5) if repeat % 2 == 0 else (1.5, None)):
                started = time.perf_counter()
                sel = gk.select(A, B, K, targets="joint", screen=screen)
                times[screen].append(time.perf_counter() - started)
                passes[screen] = sel.per_target[0].passes
        plain, screened = statistics.median(times[None]), statistics.median(times[1.5])
        print(f"| {n // 1000}k x {d} | {plain:.2f} | {screened:.2f} | {plain / screened:.1f}x | "
              f"{passes[None]:.0f} / {passes[1.5]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
