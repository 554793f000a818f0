"""K2 on the GPU: check correlate_topk / candidate_scores against float64, then time them.

Standalone (run by benchmarks/gpu_check.sh; needs < 90 s on an H200):

1. Checks on awkward shapes (N, D not multiples of the blocks), every dtype, exclusion,
   row scale, absolute ranking, m_top 1 / 64 / 300 (the chunked path), kernel outputs
   poisoned first: indices must equal a float64 reference (apart from counted near-ties).
2. Times on N = 1M, D = 8192, bf16 (16.4 GB) for m = 1, 2, 4, 8 and m_top = 1, 64: median ms,
   achieved GB/s (N*D*2 bytes read), fraction of a device-to-device copy of the same bytes
   measured in the same run (copy_ of a same-size buffer, read + write bytes counted), and
   the ratio to torch's (A @ R.to(bf16)).float() + argmax / topk.
3. A few launch shapes for m = 1 and 8 (printed, for choosing the default).

Prints `TABLE | kernel | case | time | vs baseline | note |` lines for the summary.

GTP_K2_DRY_RUN=1 TRITON_INTERPRET=1 runs the same code on the CPU at tiny sizes (to test the
script itself where no GPU is at hand; its numbers mean nothing).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from gtp_kernels.ops import correlate as k2  # noqa: E402

DRY = os.environ.get("GTP_K2_DRY_RUN") == "1"
DEVICE = "cpu" if DRY else "cuda"
SHRINK = 64 if DRY else 1  # divides the sizes in a dry run
START = time.time()
BUDGET_S = 80.0
_POISON_KEY = (0x7F7FFFFF << 32) | (2147483647 * 2)  # decodes to row 0, value float32-max


def elapsed() -> float:
    return time.time() - START


def table(kernel: str, case: str, time_s: str, vs: str, note: str) -> None:
    print(f"TABLE | {kernel} | {case} | {time_s} | {vs} | {note} |", flush=True)


def poisoned(shape, dtype, device):
    fill = float("nan") if dtype.is_floating_point else _POISON_KEY
    return torch.full(shape, fill, dtype=dtype, device=device)


def check_topk(n, d, m, m_top, dtype, *, exclude=None, scale=False, absolute=False, seed=0):
    """(mismatches that are not near-ties, near-tie swaps, max value error / bound)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    A = torch.randn(n, d, device=DEVICE, generator=g).to(dtype)
    R = torch.randn(d, m, device=DEVICE, generator=g)
    ex = None
    if exclude == "shared":
        ex = torch.rand(n, device=DEVICE, generator=g) < 0.2
    elif exclude == "per_column":
        ex = torch.rand(n, m, device=DEVICE, generator=g) < 0.2
    rs = 0.5 + torch.rand(n, device=DEVICE, generator=g) if scale else None
    v, i = k2.correlate_topk(A, R, m_top, exclude=ex, row_scale=rs, absolute=absolute, backend="triton")
    v_ref, i_ref = k2.correlate_topk_reference(A, R, m_top, exclude=ex, row_scale=rs, absolute=absolute,
                                               compute_dtype=torch.float64)
    S = k2.candidate_scores_reference(A, R, row_scale=rs, compute_dtype=torch.float64)
    bound = A.double().abs() @ R.double().abs()
    if rs is not None:
        bound = bound * rs.double()[:, None]
    key = S.abs() if absolute else S
    cols = torch.arange(m, device=DEVICE)[:, None].expand(-1, m_top)
    valid = i >= 0
    assert torch.equal(valid, i_ref >= 0), "padding differs"
    ii, rr = i.clamp(min=0), i_ref.clamp(min=0)
    err = ((v.double() - S[ii, cols]).abs() / bound[ii, cols].clamp(min=1e-30))[valid]
    differ = (i != i_ref) & valid
    gap = (key[ii, cols] - key[rr, cols]).abs()
    near = gap <= 4e-5 * (bound[ii, cols] + bound[rr, cols])
    return int((differ & ~near).sum()), int((differ & near).sum()), float(err.max()) if err.numel() else 0.0


def run_checks() -> bool:
    ok = True
    saved = k2._new_output
    k2._new_output = poisoned
    try:
        cases = [
            (50021, 2000, 1, 1, torch.bfloat16, None, False, False),
            (50021, 2000, 8, 64, torch.bfloat16, "per_column", True, True),
            (30011, 1500, 3, 1, torch.float16, "shared", True, False),
            (30011, 1500, 3, 16, torch.float32, "per_column", False, True),
            (20011, 999, 2, 300, torch.bfloat16, "shared", True, False),  # m_top > 256: chunked
        ]
        for n, d, m, m_top, dtype, exclude, scale, absolute in cases:
            n, d = n // SHRINK + 1, d // SHRINK + 3
            bad, near, err = check_topk(n, d, m, m_top, dtype, exclude=exclude, scale=scale, absolute=absolute)
            passed = bad == 0 and err <= 2e-5
            ok &= passed
            name = f"{str(dtype).split('.')[-1]} N={n} D={d} m={m} top={m_top} excl={exclude} scale={scale} abs={absolute}"
            print(f"check topk {name}: {'PASS' if passed else 'FAIL'} mismatches={bad} near_tie_swaps={near} "
                  f"max_err/bound={err:.2e}", flush=True)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            g = torch.Generator(device=DEVICE).manual_seed(1)
            A = torch.randn(40009 // SHRINK, 777 // SHRINK, device=DEVICE, generator=g).to(dtype)
            X = torch.randn(777 // SHRINK, 5, device=DEVICE, generator=g)
            out = k2.candidate_scores(A, X, backend="triton")
            exact = A.double() @ X.double()
            bound = A.double().abs() @ X.double().abs()
            rel = float(((out.double() - exact).abs() / bound).max())
            passed = not torch.isnan(out).any().item() and rel <= 2e-5
            ok &= passed
            print(f"check candidate_scores {dtype}: {'PASS' if passed else 'FAIL'} max_err/bound={rel:.2e}", flush=True)
    except Exception as exc:  # report and still time
        ok = False
        print(f"check crashed: {type(exc).__name__}: {exc}", flush=True)
    finally:
        k2._new_output = saved
    table("K2 check", "GPU vs float64, 5 topk + 3 scores cases", "-", "-", "PASS" if ok else "FAIL")
    return ok


def bench(fn) -> float:
    if DRY:
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[1]
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def run_timings(checked: bool) -> None:
    n, d = (1 << 20) // SHRINK**2, 8192 // SHRINK
    A = torch.randn(n, d, device=DEVICE, dtype=torch.bfloat16)
    a_bytes = A.numel() * A.element_size()
    dst = torch.empty_like(A)
    copy_ms = bench(lambda: dst.copy_(A))
    del dst
    if not DRY:
        torch.cuda.empty_cache()
    copy_bw = 2 * a_bytes / copy_ms / 1e6  # GB/s, read + write
    print(f"copy: {copy_ms:.3f} ms for {a_bytes / 1e9:.1f} GB read + write: {copy_bw:.0f} GB/s", flush=True)
    table("d2d copy", f"{a_bytes / 1e9:.1f} GB bf16 buffer", f"{copy_ms:.3f} ms", "-",
          f"{copy_bw:.0f} GB/s (read+write)")
    flag = "" if checked else "; CHECK FAILED"
    for m_top in (1, 64):
        for m in (1, 2, 4, 8):
            if elapsed() > BUDGET_S - 15:
                print(f"skipping m={m} m_top={m_top}: time budget", flush=True)
                continue
            R = torch.randn(d, m, device=DEVICE)
            Rb = R.to(torch.bfloat16)
            ms = bench(lambda: k2.correlate_topk(A, R, m_top, backend="triton"))
            if m_top == 1:
                base = bench(lambda: (A @ Rb).float().argmax(dim=0))
            else:
                base = bench(lambda: torch.topk((A @ Rb).float(), m_top, dim=0))
            bw = a_bytes / ms / 1e6
            table("K2 correlate_topk", f"bf16 N={n} D={d} m={m} top={m_top}", f"{ms:.3f} ms",
                  f"{base / ms:.2f}x faster than torch A@R+{'argmax' if m_top == 1 else 'topk'} ({base:.3f} ms)",
                  f"{bw:.0f} GB/s = {bw / copy_bw:.2f} of copy{flag}")
    if elapsed() < BUDGET_S - 15:
        R = torch.randn(d, 4, device=DEVICE)
        ex = torch.zeros(n, 4, dtype=torch.bool, device=DEVICE)
        ex[torch.randint(0, n, (1000,), device=DEVICE)] = True
        ms = bench(lambda: k2.correlate_topk(A, R, 1, exclude=ex, absolute=True, backend="triton"))
        bw = a_bytes / ms / 1e6
        table("K2 correlate_topk", f"bf16 N={n} D={d} m=4 top=1 +exclude(N,m) +absolute", f"{ms:.3f} ms", "-",
              f"{bw:.0f} GB/s = {bw / copy_bw:.2f} of copy{flag}")
    if elapsed() < BUDGET_S - 10:
        X = torch.randn(d, 8, device=DEVICE)
        ms = bench(lambda: k2.candidate_scores(A, X, backend="triton"))
        Xb = X.to(torch.bfloat16)
        base = bench(lambda: (A @ Xb).float())
        bw = a_bytes / ms / 1e6
        table("K2 candidate_scores", f"bf16 N={n} D={d} p=8", f"{ms:.3f} ms",
              f"{base / ms:.2f}x vs torch (A@X.bf16).float() ({base:.3f} ms)", f"{bw:.0f} GB/s = {bw / copy_bw:.2f} of copy")
    # launch shapes, m_top = 1 (for choosing the default): the first is the default
    sms = 4 if DRY else torch.cuda.get_device_properties(0).multi_processor_count
    shapes = [
        k2._default_config(A),
        k2.KernelConfig(128, 64, 8, 4, 1 << 30),  # one program per block (no persistence)
        k2.KernelConfig(128, 128, 8, 3, None),
        k2.KernelConfig(64, 128, 4, 4, 4 * sms),
        k2.KernelConfig(256, 64, 8, 3, None),
    ]
    for m in (1, 8):
        R = torch.randn(d, m, device=DEVICE)
        for cfg in shapes:
            if elapsed() > BUDGET_S:
                print(f"skipping shape m={m} {cfg}: time budget", flush=True)
                continue
            try:
                ms = bench(lambda: k2.correlate_topk_triton(A, R, 1, config=cfg))
                bw = a_bytes / ms / 1e6
                print(f"shape m={m} {cfg}: {ms:.3f} ms, {bw:.0f} GB/s = {bw / copy_bw:.2f} of copy", flush=True)
            except Exception as exc:
                print(f"shape m={m} {cfg}: failed: {type(exc).__name__}: {exc}", flush=True)


def main() -> None:
    if not DRY and not torch.cuda.is_available():
        print("no CUDA device: nothing to do")
        return
    name = "cpu (dry run)" if DRY else torch.cuda.get_device_name(0)
    print(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}", flush=True)
    checked = run_checks()
    print(f"checks done at {elapsed():.1f} s", flush=True)
    run_timings(checked)
    print(f"done in {elapsed():.1f} s", flush=True)


if __name__ == "__main__":
    from timing import script_help

    script_help(__doc__)
    main()
