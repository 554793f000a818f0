"""float32 against float64 pools in exact pursuit on CPU, side by side in one run (issue 14).

The same unit-norm Gaussian pool (N = 2000, D = 256), target 50 rows + noise, k = 100, passed as
float32 and as float64 to gk.select (method "gtp"); median seconds of 7 runs each, interleaved.
Prints one table row per dtype and their ratio. Usage: python benchmarks/dtype_pursuit.py
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import script_help  # noqa: E402

import gtp_kernels as gk  # noqa: E402


def main() -> None:
    script_help(__doc__)
    rs = np.random.RandomState(0)
    n, dim, k = 2000, 256, 100
    A64 = rs.randn(n, dim)
    A64 /= np.linalg.norm(A64, axis=1, keepdims=True)
    b = A64[:50].T @ (rs.rand(50) + 0.5) + 0.05 * rs.randn(dim) / np.sqrt(dim)
    pools = {"float32": A64.astype(np.float32), "float64": A64}
    picks = {name: gk.select(A, b, k).indices.tolist() for name, A in pools.items()}  # warm-up
    times = {name: [] for name in pools}
    for _ in range(7):
        for name, A in pools.items():
            t = time.perf_counter()
            gk.select(A, b, k)
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"N={n} D={dim} k={k}, same picks: {picks['float32'] == picks['float64']}")
    for name in pools:
        print(f"| {name} | {med[name]:.3f} s |")
    print(f"float32 / float64: {med['float32'] / med['float64']:.2f}")


if __name__ == "__main__":
    main()
