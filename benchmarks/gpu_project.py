"""K1 on a GPU: correctness first, then timings (standalone; < 90 s on an H200).

    python benchmarks/gpu_project.py

1. Checks on small awkward cases: the kernel's implied Pi (identity input) equals the CPU generator
   bit for bit (Rademacher; Gaussian to 1 float32 ulp), results match a float64 dense reference,
   chunked accumulation equals the whole, split-K equals the torch path on the GPU.
2. Timings, bf16 grads (B x P), d outputs, Rademacher unless stated:
   - the kernel (Pi generated in registers, never stored);
   - the compute ceiling: torch.matmul with a pre-materialised bf16 Pi^T of the same (B, d); when the
     P x d matrix does not fit in memory it is timed at the largest P that fits (P_fit) and scaled by
     P / P_fit (a large-K matmul is linear in K), which the note says;
   - block-wise generate-then-multiply (TRAK's basic projector: per block of features, draw +-1 with
     torch's CUDA generator into a bf16 block, matmul, accumulate).
   - Factored vs dense projection of one linear layer of a 1B-class model (n_in = n_out = 2048,
     S = 512 tokens): dense = form the per-example gradients (bmm) + project to d = 8192; factored =
     project_linear_factored with d_out x d_in = 64 x 128.
Lines starting with "TABLE " feed benchmarks/gpu_check.sh's summary.
"""
from __future__ import annotations

import math
import statistics
import sys
import time

import torch

START = time.perf_counter()
DEVICE = "cuda"  # a dry run of the script's logic on CPU (Triton interpreter) sets "cpu"
BUDGET_S = 60.0  # start no new case after this (gpu_check.sh kills the script at 150 s)


def table(kernel: str, case: str, t: str, vs: str, note: str) -> None:
    print(f"TABLE | {kernel} | {case} | {t} | {vs} | {note} |", flush=True)


def elapsed() -> float:
    return time.perf_counter() - START


def time_ms(fn, repeats: int = 3) -> float:
    """Median of `repeats` timed calls after one warm-up (which also compiles), CUDA events."""
    if DEVICE != "cuda":  # dry run
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def fmt_p(p: int) -> str:
    return f"{p >> 20}M" if p >= 1 << 20 else f"{p >> 10}k"


def checks(small: bool = False) -> bool:
    from gtp_kernels.ops.project import project, project_linear_factored, projection_matrix

    ok = True
    torch.manual_seed(0)
    dev = DEVICE
    # implied Pi, bit for bit
    for kind in ("rademacher", "gaussian"):
        for n_features, d, offset in [(333, 300, 2**40 - 100), (129, 260 if small else 4100, 2**33 - 7)]:
            eye = torch.eye(n_features, device=dev)
            implied = project(eye, d, 5, kind, offset).T.contiguous().cpu()
            expected = projection_matrix(d, n_features, 5, kind, offset, dtype=torch.float32)
            ulps = (implied.view(torch.int32).long() - expected.view(torch.int32).long()).abs().max().item()
            exact = torch.equal(implied, expected)
            good = exact if kind == "rademacher" else ulps <= 1
            ok &= good
            print(f"check implied Pi {kind} P={n_features} d={d} offset={offset}: "
                  f"{'bit-exact' if exact else f'max {ulps} ulp'} -> {'OK' if good else 'FAIL'}")
    # float64 reference, every dtype, awkward shapes, poisoned neighbours
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for kind in ("rademacher", "gaussian"):
            n_rows, n_features, d = (37, 513, 130) if small else (37, 5013, 300)
            grads = (torch.randn(n_rows, n_features, device=dev) * 2).to(dtype)
            out = torch.full((n_rows, d + 3), float("nan"), device=dev)
            out[:, 3:] = 0
            project(grads, d, 9, kind, 2**36, out=out, out_columns=slice(3, d + 3), scale=0.5)
            pi = projection_matrix(d, n_features, 9, kind, 2**36, device=dev)
            ref = 0.5 * grads.double() @ pi.T
            mag = 0.5 * grads.double().abs() @ pi.abs().T
            err = ((out[:, 3:].double() - ref).abs() / mag).max().item()
            good = err < 2e-5 and bool(torch.isnan(out[:, :3]).all())
            ok &= good
            print(f"check vs float64 {dtype} {kind}: max err / sum|terms| = {err:.2e} -> {'OK' if good else 'FAIL'}")
    # chunked == whole; split-K kernel == torch path on the GPU
    n_features, d = (3001, 256) if small else (300_001, 4096)
    grads = torch.randn(64, n_features, device=dev, dtype=torch.bfloat16)
    whole = project(grads, d, 1, feature_offset=2**34)
    chunked = torch.zeros_like(whole)
    for a, b in [(0, 1000), (1000, 1457), (1457, n_features)]:
        project(grads[:, a:b], d, 1, feature_offset=2**34 + a, out=chunked)
    via_torch = project(grads, d, 1, feature_offset=2**34, backend="torch")
    scale = via_torch.abs().max().item()
    e1 = (chunked - whole).abs().max().item() / scale
    e2 = (whole - via_torch).abs().max().item() / scale
    good = e1 < 1e-5 and e2 < 1e-5
    ok &= good
    print(f"check chunked vs whole {e1:.1e}, kernel vs torch path {e2:.1e} -> {'OK' if good else 'FAIL'}")
    # factored == explicit Kronecker projection
    x = torch.randn(3, 9, 40, device=dev)
    delta = torch.randn(3, 9, 24, device=dev)
    mask = torch.rand(3, 9, device=dev) > 0.3
    got = project_linear_factored(x, delta, 8, 4, 2, token_mask=mask, feature_offset=77)
    per_ex = torch.einsum("bsa,bsc->bac", delta.double() * mask[..., None], x.double()).reshape(3, -1)
    kron = torch.kron(projection_matrix(4, 24, 2, feature_offset=77, output_factor=True, device=dev),
                      projection_matrix(8, 40, 2, feature_offset=77, device=dev))
    e3 = ((got.double() - per_ex @ kron.T).abs().max() / (per_ex.abs() @ kron.abs().T).max()).item()
    ok &= e3 < 1e-5
    print(f"check factored vs Kronecker: {e3:.1e} -> {'OK' if e3 < 1e-5 else 'FAIL'}")
    return ok


def generate_then_multiply(grads: torch.Tensor, d: int, block: int, generator: torch.Generator) -> torch.Tensor:
    out = torch.zeros(grads.shape[0], d, device=grads.device, dtype=torch.float32)
    pi_block = torch.empty(block, d, device=grads.device, dtype=grads.dtype)
    for start in range(0, grads.shape[1], block):
        stop = min(grads.shape[1], start + block)
        blk = pi_block[: stop - start].bernoulli_(0.5, generator=generator).mul_(2).sub_(1)
        out += torch.matmul(grads[:, start:stop], blk).float()
    return out.mul_(1 / math.sqrt(d))


def bench_dense(n_rows: int, n_features: int, d: int, kind: str = "rademacher", baseline: bool = True) -> None:
    from gtp_kernels.ops.project import project

    case = f"bf16 B={n_rows} P={fmt_p(n_features)} d={d} {kind}"
    if elapsed() > BUDGET_S:
        table("K1 project", case, "skipped", "-", "time budget of the script spent")
        return
    grads = torch.randn(n_rows, n_features, device=DEVICE, dtype=torch.bfloat16)
    out = torch.zeros(n_rows, d, device=DEVICE)
    t_kernel = time_ms(lambda: project(grads, d, 1, kind, out=out))
    tflops = 2 * n_rows * n_features * d / (t_kernel * 1e-3) / 1e12
    # the ceiling: a premade bf16 Pi^T, at the largest P that fits in ~40 GB
    p_fit = min(n_features, (40 << 30) // (2 * d))
    pi_t = torch.empty(p_fit, d, device=DEVICE, dtype=torch.bfloat16).bernoulli_(0.5).mul_(2).sub_(1)
    g_fit = grads[:, :p_fit]
    t_fit = time_ms(lambda: torch.matmul(g_fit, pi_t), repeats=5)
    t_ceiling = t_fit * n_features / p_fit
    del pi_t
    empty_cache()
    note = "ceiling measured at this P" if p_fit == n_features else f"ceiling timed at P={fmt_p(p_fit)}, scaled by P"
    vs = f"{t_kernel / t_ceiling:.2f}x premade matmul ({t_ceiling:.1f} ms)"
    if baseline:
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        block = max(1, (1 << 28) // d)  # 256M entries (512 MB bf16) per block
        t_gen = time_ms(lambda: generate_then_multiply(grads, d, block, gen), repeats=2)
        vs += f"; generate-then-multiply {t_gen:.1f} ms = {t_gen / t_kernel:.1f}x the kernel's time"
    table("K1 project", case, f"{t_kernel:.2f} ms ({tflops:.0f} TFLOP/s)", vs, note + "; no Pi allocated")
    del grads, out
    empty_cache()


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def bench_factored(n_batch: int = 32, n_tokens: int = 512, n_in: int = 2048, n_out: int = 2048) -> None:
    from gtp_kernels.ops.project import project, project_linear_factored

    d_in, d_out = 128, 64
    case = f"linear {n_out}x{n_in}, B={n_batch} S={n_tokens}, d={d_in * d_out}"
    if elapsed() > BUDGET_S:
        table("K1 factored", case, "skipped", "-", "time budget of the script spent")
        return
    x = torch.randn(n_batch, n_tokens, n_in, device=DEVICE, dtype=torch.bfloat16)
    delta = torch.randn(n_batch, n_tokens, n_out, device=DEVICE, dtype=torch.bfloat16)
    mask = torch.ones(n_batch, n_tokens, device=DEVICE, dtype=torch.bool)
    mask[:, n_tokens * 3 // 4:] = False  # padding

    def dense():
        per_example = torch.bmm((delta * mask[..., None]).transpose(1, 2), x)  # (B, n_out, n_in), bf16
        return project(per_example.reshape(n_batch, n_out * n_in), d_in * d_out, 3)

    def factored():
        return project_linear_factored(x, delta, d_in, d_out, 3, token_mask=mask)

    t_dense = time_ms(dense)
    t_factored = time_ms(factored)
    table("K1 factored", case, f"{t_factored:.2f} ms", f"dense {t_dense:.2f} ms = {t_dense / t_factored:.1f}x factored",
          "dense = per-example grads (bmm) + project; different Pi (Kronecker), same d")


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_project: no CUDA device, nothing to do")
        return 0
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    ok = checks()
    table("K1 project", "correctness (implied Pi, float64 ref, chunks, factored)", "-", "-",
          "all checks OK" if ok else "CHECK FAILED: see log")
    bench_dense(32, 16 << 20, 4096)
    bench_dense(256, 16 << 20, 8192)
    bench_dense(128, 64 << 20, 8192, baseline=False)
    bench_dense(64, 256 << 20, 4096, baseline=False)
    bench_dense(32, 16 << 20, 4096, kind="gaussian", baseline=False)
    bench_factored()
    print(f"gpu_project: {elapsed():.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    from timing import script_help

    script_help(__doc__)
    sys.exit(main())
