"""Compressive sampling against exact pursuit: residual, passes over A, in-sample work.

For each (N, D, k, seed) on the pursuit_table pool (unit-norm Gaussian rows, target = 50 rows
+ 0.05 noise): the relative residual of the best non-negative fit on each method's rows
(``fit_residual``), their ratio (the issue asks <= 1.05), the passes over A (exact pursuit:
its iterations, one read each for the direct strategy, and the reads its default auto
strategy reported, fewer where cached columns serve; the issue asks k / cosamp passes >= 10),
and compressive sampling's in-sample work: the row products of its
in-sample correlation steps in passes' worth (rows / N, one pass = N row products of D).
Seconds are wall clock on a shared machine; read passes and in-sample work instead.

    python benchmarks/cosamp_quality.py              # the grid, seeds 0-2, then the two big shapes
    python benchmarks/cosamp_quality.py --no-big     # the grid only
    python benchmarks/cosamp_quality.py --quick      # small shapes, a smoke run
"""
from __future__ import annotations

import argparse

import torch

import gtp_kernels as gk
from gtp_kernels.selection import cosamp
from pursuit_table import pool
from timing import timed

GRID = [(n, 1024, k) for n in (10_000, 20_000, 40_000) for k in (50, 200, 800)]
BIG = [(100_000, 2048, 200), (20_000, 8192, 200)]
QUICK = [(3000, 512, 400), (5000, 512, 50)]


class InSampleCounter:
    """Counts the rows of compressive sampling's in-sample correlation steps."""

    def __init__(self):
        self.rows = 0
        self._orig = cosamp._SampledPursuit._sample_correlations

    def __enter__(self):
        orig, counter = self._orig, self

        def counted(pursuit, rows_w):
            counter.rows += rows_w.shape[0]
            return orig(pursuit, rows_w)

        cosamp._SampledPursuit._sample_correlations = counted
        return self

    def __exit__(self, *exc):
        cosamp._SampledPursuit._sample_correlations = self._orig


def run_case(n: int, dim: int, k: int, seed: int) -> dict:
    A, b = pool(n, dim, seed)
    exact, exact_s = timed(lambda: gk.select(A, b, k, method="gtp"))
    with InSampleCounter() as count:
        cos, cos_s = timed(lambda: gk.select(A, b, k, method="gtp-cosamp"))
    r_exact = gk.fit_residual(A, b, exact.indices)
    r_cos = gk.fit_residual(A, b, cos.indices)
    it_exact = exact.per_target[0].iterations  # one read of A each (direct strategy)
    p_exact = exact.per_target[0].passes  # what the auto strategy reported
    p_cos = cos.per_target[0].passes
    return dict(n=n, dim=dim, k=k, seed=seed, r_exact=r_exact, r_cos=r_cos, ratio=r_cos / r_exact,
                it_exact=it_exact, p_exact=p_exact, p_cos=p_cos, p_ratio=it_exact / p_cos,
                in_sample=count.rows / n,
                exact_s=exact_s, cos_s=cos_s, ok=r_cos <= 1.05 * r_exact and p_cos * 10 <= k)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-big", action="store_true")
    ap.add_argument("--seeds", default="0,1,2", help="seeds for the grid (the big shapes use 0)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cases = [(n, d, k, s) for n, d, k in (QUICK if args.quick else GRID) for s in seeds]
    if not (args.quick or args.no_big):
        cases += [(n, d, k, 0) for n, d, k in BIG]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| N | D | k | seed | exact resid | cosamp resid | ratio | exact iters (auto passes) "
          "| cosamp passes | pass ratio | in-sample (passes) | exact s | cosamp s | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst, fewest, failed = 0.0, float("inf"), 0
    for n, dim, k, seed in cases:
        c = run_case(n, dim, k, seed)
        worst, fewest = max(worst, c["ratio"]), min(fewest, c["p_ratio"])
        failed += not c["ok"]
        print(f"| {n} | {dim} | {k} | {seed} | {c['r_exact']:.4g} | {c['r_cos']:.4g} | {c['ratio']:.3f} "
              f"| {c['it_exact']} ({c['p_exact']:g}) | {c['p_cos']:g} | {c['p_ratio']:.1f} | {c['in_sample']:.1f} "
              f"| {c['exact_s']:.2f} | {c['cos_s']:.2f} | {'yes' if c['ok'] else 'NO'} |", flush=True)
    print(f"\nworst residual ratio {worst:.3f}; fewest passes saved {fewest:.1f}x; "
          f"{failed} of {len(cases)} miss (ratio <= 1.05 and passes <= k/10)")


if __name__ == "__main__":
    main()
