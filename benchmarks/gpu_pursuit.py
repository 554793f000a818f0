"""GPU timings of the selectors at the SPEC's scale (part of benchmarks/gpu_check.sh).

N = 1M candidates, D = 8192, bf16 (16.4 GB), k = 1000: the fast exact driver (auto and direct,
with its time split into correlation / column fetch / least-squares update / residual),
compressive sampling, the plain-PyTorch reference, and top-k; the floor is k passes over A
at the device-to-device copy bandwidth measured in the same run. First checks on a smaller
problem that the fast driver selects exactly what the reference selects.

    python benchmarks/gpu_pursuit.py                    # on the GPU machine
    python benchmarks/gpu_pursuit.py --device cpu --small   # smoke run of the same code
"""
from __future__ import annotations

import argparse
import time

import torch

import gtp_kernels as gk
from gtp_kernels.selection.common import SelectOptions
from gtp_kernels.selection.pursuit import gtp_pursuit
from gtp_kernels.validation import validate_problem


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_pool(n, dim, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    A = torch.empty(n, dim, dtype=dtype, device=device)
    step = 1 << 16
    for s in range(0, n, step):  # generate in chunks: no full-size fp32 temporary
        blk = torch.randn(min(step, n - s), dim, generator=g, device=device)
        A[s : s + step] = (blk / blk.norm(dim=1, keepdim=True)).to(dtype)
    idx = torch.randperm(n, generator=g, device=device)[:50]
    b = A[idx].float().T @ torch.rand(50, generator=g, device=device) + 0.02 * torch.randn(dim, generator=g, device=device)
    return A, b


def copy_bandwidth(nbytes, device, reps=10):
    """Bytes read + written per second by a device-to-device copy of nbytes."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    times.sort()
    return 2 * nbytes / times[len(times) // 2]


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    n, dim, k = (20_000, 256, 40) if args.small else (1_000_000, 8192, 1000)
    check = (4000, 128, 30) if args.small else (200_000, 2048, 200)

    # 1. exactness on the device
    A, b = make_pool(*check[:2], torch.bfloat16, device, seed=1)
    fast = gk.select(A, b, check[2], method="gtp")
    ref = gk.select(A, b, check[2], method="gtp-reference")
    same = fast.indices.tolist() == ref.indices.tolist()
    print(f"exactness N={check[0]} D={check[1]} k={check[2]} bf16: fast == reference: {same}")
    print(f"TABLE | pursuit | exactness N={check[0]} D={check[1]} k={check[2]} | - | identical: {same} | gtp vs gtp-reference |")
    del A, b

    # 2. the SPEC-scale timings
    A, b = make_pool(n, dim, torch.bfloat16, device)
    bw = copy_bandwidth(min(A.numel() * 2, 8 << 30), device)
    pass_floor = A.numel() * A.element_size() / bw * 2  # a pass reads A once: bytes / (read+write bw / 2)
    floor = k * pass_floor
    case = f"N={n} D={dim} bf16 k={k}"
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read+write); one pass over A >= {pass_floor * 1e3:.2f} ms; "
          f"k passes >= {floor:.2f} s")
    print(f"TABLE | pursuit | {case} k-pass floor | {floor:.2f} s | 1.00 | at copy bandwidth {bw / 1e9:.0f} GB/s |")
    problem = validate_problem(A, b, k)
    results = {}
    for strategy in ("auto", "direct"):
        phases = {}
        res, sec = timed(lambda: gtp_pursuit(problem, k, SelectOptions(), strategy=strategy), device)
        _, sec_profiled = timed(lambda: gtp_pursuit(problem, k, SelectOptions(), strategy=strategy,
                                                    phase_seconds=phases), device)
        results[strategy] = (res[0], sec)
        split = ", ".join(f"{p} {v:.2f}s" for p, v in phases.items() if isinstance(v, float))
        print(f"gtp ({strategy}: {phases.get('strategy')}): {sec:.2f} s, passes {res[0].passes:g}; "
              f"profiled {sec_profiled:.2f} s: {split}")
        print(f"TABLE | pursuit | {case} gtp {strategy} ({phases.get('strategy')}) | {sec:.2f} s | "
              f"{sec / floor:.2f} x floor | passes {res[0].passes:g}; {split} |")
    sel, sec = timed(lambda: gk.select(A, b, k, method="gtp-cosamp"), device)
    print(f"TABLE | pursuit | {case} gtp-cosamp | {sec:.2f} s | {sec / floor:.2f} x floor | "
          f"passes {sel.per_target[0].passes:g} |")
    sel, sec = timed(lambda: gk.select(A, b, k, method="topk"), device)
    print(f"TABLE | pursuit | {case} topk | {sec:.3f} s | {sec / floor:.3f} x floor | one pass |")
    # joint selection for 24 target examples (gtp select's default for a target store), with and
    # without the candidate screen; k / 5 rows in all to stay inside the part's time limit
    gen = torch.Generator(device=device).manual_seed(2)
    B = b[:, None] + (b.float().norm() / dim ** 0.5) * torch.randn(dim, 24, generator=gen, device=device)
    k_joint = max(1, k // 5)
    for screen in (None, 1.5):
        sel, sec = timed(lambda: gk.select(A, B, k_joint, targets="joint", screen=screen), device)
        print(f"TABLE | pursuit | N={n} D={dim} bf16 joint m=24 k={k_joint} screen={screen} | {sec:.2f} s | "
              f"{sec / (k_joint * pass_floor):.2f} x its floor | pool reads {sel.per_target[0].passes:.2f} |")
    if not args.skip_reference:
        ref, sec = timed(lambda: gk.select(A, b, k, method="gtp-reference"), device)
        fast_sec = results["auto"][1]
        same = ref.indices.tolist() == results["auto"][0].indices.tolist()
        print(f"TABLE | pursuit | {case} gtp-reference (plain torch) | {sec:.2f} s | gtp is {sec / fast_sec:.1f}x faster | "
              f"identical selection: {same} |")


if __name__ == "__main__":
    main()
