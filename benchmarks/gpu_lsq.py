"""GPU timings of the K3 update (one append + NNLS solve per pursuit) at k = 100, 1000, 4000 and
m = 1, 8, float32 and float64: the CUDA op vs the same update written with torch.linalg calls
(solve_triangular for the new row, two triangular solves for the weights; no drop handling, so the
baseline does less work) and vs a fresh Cholesky solve of the whole support (what the plain-torch
reference pursuit does). Standalone; prints `TABLE | ... |` lines. Run by benchmarks/gpu_check.sh.

Each timed call appends atom k to a state holding k atoms; a tiny reset (size back to k, row k and
the k-th entries cleared, weights restored) follows every call and is timed alone and subtracted.
Calls are captured in a CUDA graph (20 per replay) so launch gaps do not count; on failure the
script falls back to triton.testing.do_bench medians and says so.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from gtp_kernels.ops import lsq

REPS_PER_GRAPH = 20


def time_ms(fn, label: str) -> tuple[float, str]:
    """Median milliseconds per fn() call: CUDA-graph replays, else do_bench."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(REPS_PER_GRAPH):
                fn()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        replays = max(3, min(15, int(0.2 / max(first, 1e-6))))  # about 0.2 s per timing at most
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / REPS_PER_GRAPH)
        return statistics.median(times), "graph"
    except Exception as exc:  # noqa: BLE001 - report and fall back
        print(f"  ({label}: CUDA graph failed: {type(exc).__name__}: {exc}; using do_bench)")
        torch.cuda.synchronize()
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"), "do_bench"


def case(m: int, k: int, dtype: torch.dtype, dev: str = "cuda") -> list[str]:
    g = torch.Generator(device=dev).manual_seed(1000 * k + m)
    D = 2 * k + 64
    A = torch.randn(k + 1, D, generator=g, device=dev, dtype=torch.float64) / D**0.5
    w_true = 0.5 + torch.rand(k + 1, generator=g, device=dev, dtype=torch.float64)
    b = A.T @ w_true
    G = A @ A.T
    L_ref = torch.linalg.cholesky(G)  # (k+1) x (k+1), float64
    w_ref = torch.cholesky_solve((A @ b)[:, None], L_ref)[:, 0]

    state = lsq.lsq_init(m, k + 1, dtype, dev)
    state.L[:, :k, :k] = L_ref[:k, :k].to(dtype)
    state.size.fill_(k)
    state.support[:, :k] = torch.arange(k, device=dev)
    state.rhs[:, :k] = (A[:k] @ b).to(dtype)
    state.weights[:, :k] = torch.cholesky_solve((A[:k] @ b)[:, None], L_ref[:k, :k])[:, 0].to(dtype)
    w_snapshot = state.weights.clone()
    new_atom = torch.full((m,), k, dtype=torch.int64, device=dev)
    gram_col = torch.full((m, k + 1), float("nan"), dtype=dtype, device=dev)
    gram_col[:, :k] = G[k, :k].to(dtype)
    gram_diag = G[k, k].to(dtype).expand(m).contiguous()
    rhs_new = (A[k] @ b).to(dtype).expand(m).contiguous()

    def reset():
        state.size.fill_(k)
        state.L[:, k].zero_()
        state.support[:, k] = -1
        state.rhs[:, k] = 0
        state.weights.copy_(w_snapshot)

    def op():
        lsq.lsq_update(state, new_atom, gram_col, gram_diag, rhs_new, positive=True, backend="ext")

    def op_and_reset():
        op()
        reset()

    # Correctness first (poisoned row k and weights, fresh random problem per case).
    state.L[:, k].fill_(float("nan"))
    state.weights[:, k] = float("nan")
    status = lsq.lsq_update(state, new_atom, gram_col, gram_diag, rhs_new, positive=True, backend="ext")
    status = status.cpu()  # waits for the kernel
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    row_err = ((state.L[:, k, : k + 1].double() - L_ref[k]).norm(dim=1) / L_ref[k].norm()).max().item()
    w_err = ((state.weights.double() - w_ref).norm(dim=1) / w_ref.norm()).max().item()
    ok = bool((status == lsq.STATUS_APPENDED).all()) and row_err < tol and w_err < tol
    note = f"row err {row_err:.1e}, w err {w_err:.1e}" + ("" if ok else " MISMATCH")
    print(f"  m={m} k={k} {dtype}: status {status.unique().tolist()}, {note}")
    reset()

    # Baseline 1: the same update with torch.linalg calls (batched over m, no host sync, no drops).
    Lb = state.L.clone()
    rhs_b = state.rhs.clone()
    rhs_b[:, k] = rhs_new

    def torch_update():
        Lk = Lb[:, :k, :k]
        y = torch.linalg.solve_triangular(Lk, gram_col[:, :k, None], upper=False)[..., 0]
        pivot = torch.sqrt(gram_diag - (y * y).sum(1))
        Lb[:, k, :k] = y
        Lb[:, k, k] = pivot
        L1 = Lb[:, : k + 1, : k + 1]
        u = torch.linalg.solve_triangular(L1, rhs_b[:, : k + 1, None], upper=False)
        return torch.linalg.solve_triangular(L1.mT, u, upper=True)

    # Baseline 2: a fresh Cholesky solve of the support's Gram matrix (the reference pursuit).
    Gs = G.to(dtype).expand(m, k + 1, k + 1).contiguous()
    rhs_s = (A @ b).to(dtype).expand(m, k + 1)[..., None].contiguous()

    def fresh_solve():
        Lf, _ = torch.linalg.cholesky_ex(Gs)
        return torch.cholesky_solve(rhs_s, Lf)

    if dev != "cuda":  # --dry-run on CPU: exercise the setup and the baselines, no timing
        torch_update(), fresh_solve(), op_and_reset()
        return [f"dry run m={m} k={k}: {note}"] if ok else [f"DRY RUN MISMATCH m={m} k={k}: {note}"]
    t_reset, how = time_ms(reset, "reset")
    t_both, how2 = time_ms(op_and_reset, "op")
    t_op = max(t_both - t_reset, 1e-6)
    t_torch, how3 = time_ms(torch_update, "torch update")
    t_fresh, how4 = time_ms(fresh_solve, "fresh solve")
    timing = "graph" if {how, how2, how3, how4} == {"graph"} else "do_bench for some"
    name = "f64" if dtype == torch.float64 else "f32"
    return [
        f"TABLE | K3 lsq_update | m={m} k={k} {name} | {t_op * 1e3:.1f} us | "
        f"{t_torch / t_op:.1f}x vs torch.linalg update ({t_torch * 1e3:.1f} us), "
        f"{t_fresh / t_op:.1f}x vs fresh Cholesky ({t_fresh * 1e3:.1f} us) | {note}; {timing} |"
    ]


def main() -> int:
    print("extension:", lsq.extension_status())
    if "--dry-run" in sys.argv:  # checks this script's logic on a machine without a GPU
        for dtype in (torch.float32, torch.float64):
            for line in case(2, 50, dtype, dev="cpu") + case(1, 300, dtype, dev="cpu"):
                print(line)
        return 0
    if not torch.cuda.is_available():
        print("TABLE | K3 lsq_update | - | - | - | skipped: no CUDA device |")
        return 0
    if not lsq.extension_status().startswith("cpu+cuda"):
        print(f"TABLE | K3 lsq_update | - | - | - | skipped: extension {lsq.extension_status()} |")
        return 1
    print("device:", torch.cuda.get_device_name())
    lines = []
    start = time.time()
    for dtype in (torch.float32, torch.float64):
        for k in (100, 1000, 4000):
            for m in (1, 8):
                lines += case(m, k, dtype)
                if time.time() - start > 50:
                    print("  (stopping early: time budget)")
                    break
            else:
                continue
            break
    print(f"total {time.time() - start:.1f} s")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    from timing import script_help

    script_help(__doc__)
    sys.exit(main())
