"""Joint selection (targets="joint"): gtp-cosamp against exact joint gtp, side by side.

N = 20k unit-norm rows, D = 512, m = 24 target columns (each a non-negative mix of the same 300
rows plus noise), k = 100; the rows in memory (fp32) and memory-mapped (.npy, fp32 and fp16).
The two methods alternate which goes first; one warm-up round, then medians of REPEAT rounds
(wall and process CPU time), printed as cosamp / gtp ratios with the passes over A and whether
the picks agree. Run: PYTHONPATH=. python benchmarks/joint_cosamp.py
"""
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import script_help  # noqa: E402

import gtp_kernels as gk  # noqa: E402

N, D, M, K = 20_000, 512, 24, 100
REPEAT = 7


def problem():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(N, D, generator=g)
    A /= A.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(1)
    B = A[torch.randperm(N, generator=g)[:300]].T @ torch.rand(300, M, generator=g)
    return A, B + 0.05 * torch.randn(D, M, generator=g)


def compare(rows, B):
    wall = {"gtp": [], "gtp-cosamp": []}
    cpu = {"gtp": [], "gtp-cosamp": []}
    sel = {}
    for r in range(REPEAT + 1):
        for method in (["gtp", "gtp-cosamp"] if r % 2 else ["gtp-cosamp", "gtp"]):
            t, c = time.perf_counter(), time.process_time()
            sel[method] = gk.select(rows, B, K, method=method, targets="joint")
            if r:  # round 0 warms up
                wall[method].append(time.perf_counter() - t)
                cpu[method].append(time.process_time() - c)
    med = {name: {m: statistics.median(v) for m, v in d.items()} for name, d in (("wall", wall), ("cpu", cpu))}
    same = sel["gtp"].indices.tolist() == sel["gtp-cosamp"].indices.tolist()
    return med, {m: s.per_target[0].passes for m, s in sel.items()}, same


def main():
    script_help(__doc__)
    A, B = problem()
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "a32.npy"), A.numpy())
        np.save(os.path.join(tmp, "a16.npy"), A.half().numpy())
        cases = {"in memory, fp32": A, "memory-mapped, fp32": np.load(os.path.join(tmp, "a32.npy"), mmap_mode="r"),
                 "memory-mapped, fp16": np.load(os.path.join(tmp, "a16.npy"), mmap_mode="r")}
        print(f"N = {N}, D = {D}, m = {M}, k = {K}; medians of {REPEAT}")
        print("| rows | gtp s (wall / CPU) | gtp-cosamp s | cosamp / gtp wall | CPU | passes gtp / cosamp | same picks |")
        print("|---|---|---|---|---|---|---|")
        for name, rows in cases.items():
            med, passes, same = compare(rows, B)
            w, c = med["wall"], med["cpu"]
            print(f"| {name} | {w['gtp']:.2f} / {c['gtp']:.2f} | {w['gtp-cosamp']:.2f} / {c['gtp-cosamp']:.2f} | "
                  f"{w['gtp-cosamp'] / w['gtp']:.2f} | {c['gtp-cosamp'] / c['gtp']:.2f} | "
                  f"{passes['gtp']:.0f} / {passes['gtp-cosamp']:.0f} | {same} |")


if __name__ == "__main__":
    main()
