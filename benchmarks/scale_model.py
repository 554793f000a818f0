"""Cost model: GTP selection on a GPU cluster, from measured per-pass and per-collective figures.

    python benchmarks/scale_model.py                       # the projection in docs/SCALE.md
    python benchmarks/scale_model.py --gpus 16 --dim 65536 --k-eff 50000
    python benchmarks/scale_model.py --k2-efficiency 0.8 --collective-us 25 --k3-sm-gbs 150

Every input is a flag; the defaults are the figures docs/SCALE.md explains (measured ones from
BENCHMARKS.md and SPEC.md, assumptions marked there), so the table can be re-run when GPU
measurements arrive (`benchmarks/gpu_check.sh`). Per-GPU quantities; the least-squares state
is replicated on every rank (every rank applies the same update), so it does not shrink with G.

Model, per iteration j = 1..k of one target (m = 1):
    pass       N/G * D * bytes / (BW * eff)                      K2 over this GPU's shard
    fetch      j * D * 4 B / (BW * eff)                          Gram column from the selected rows (fp32)
    K3         sweeps * 4 j^2 B / bw_K3                          the float64 triangle, j^2/2 entries, read
                                                                 `sweeps` times (append + two solves); bw_K3 is
                                                                 one SM's bandwidth (today: one block per target)
                                                                 or the whole GPU's (a grid-wide solve)
    collective c_ag + c_ar(D * 8 B)                              all-gather of the local best, all-reduce of
                                                                 the winning row
Exact pursuit makes `exact_pass_ratio * k` passes (1.0 when no column cache fits: N x k columns
never do at this size); compressive sampling `k / cosamp_k_per_pass` passes plus in-sample work
of the same size (BENCHMARKS.md: passes <= k/11.8, in-sample work ~1-1.7x the passes, at k <= 800),
and the same k incremental least-squares updates (it pursues atom by atom inside its sample).
"""
from __future__ import annotations

import argparse


def _fmt_s(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB"


def model(a: argparse.Namespace) -> list[tuple[str, str, str]]:
    bw = a.bandwidth_tbs * 1e12
    k, d = a.k, a.dim
    k_eff = min(k, a.k_eff if a.k_eff else d)  # atoms with a positive weight: at most D (below)
    rows_per_gpu = a.n / a.gpus
    shard_bytes = rows_per_gpu * d * a.bytes
    pass_s = shard_bytes / (bw * a.k2_efficiency)
    exact_passes = a.exact_pass_ratio * k
    cosamp_passes = k / a.cosamp_k_per_pass
    cosamp_work = cosamp_passes * (1 + a.cosamp_sample_work)
    # sums over j = 1..k of the per-iteration terms
    sum_j = k * (k + 1) / 2
    sum_j2 = k * (k + 1) * (2 * k + 1) / 6
    fetch_s = sum_j * d * 4 / (bw * a.k2_efficiency)
    k3_bw_one_sm = a.k3_sm_gbs * 1e9
    k3_one_sm_s = a.k3_sweeps * 4 * sum_j2 / k3_bw_one_sm
    k3_grid_s = a.k3_sweeps * 4 * sum_j2 / (bw * a.k2_efficiency)
    # a grid-wide triangular solve still has ~j/tile dependent steps per sweep, a few us each
    k3_grid_latency_s = a.k3_sweeps * sum_j / a.k3_tile * a.k3_step_us * 1e-6
    k3_grid_s = max(k3_grid_s, k3_grid_latency_s)
    coll_iter_s = 2 * a.collective_us * 1e-6 + d * 8 / (a.link_gbs * 1e9)
    coll_s = k * coll_iter_s
    factor_bytes = k * k * 8
    rows_bytes = k * d * 4
    gpu_bytes = shard_bytes + factor_bytes + rows_bytes + a.workspace_gb * 1e9

    exact_total_now = exact_passes * pass_s + fetch_s + k3_one_sm_s + coll_s
    exact_total_grid = exact_passes * pass_s + fetch_s + k3_grid_s + coll_s
    cosamp_total_now = cosamp_work * pass_s + fetch_s + k3_one_sm_s + coll_s
    cosamp_total_grid = cosamp_work * pass_s + fetch_s + k3_grid_s + coll_s
    rows = [
        ("pool", f"N = {a.n:,.0f}, D = {d:,}, {a.bytes} B/value, {a.gpus} GPUs, k = {k:,}",
         f"{_gb(a.n * d * a.bytes)} in all"),
        ("shard per GPU", f"{rows_per_gpu:,.0f} rows", _gb(shard_bytes)),
        ("one pass (K2) per GPU", f"{_gb(shard_bytes)} / ({a.bandwidth_tbs} TB/s x {a.k2_efficiency})", _fmt_s(pass_s)),
        ("passes, exact", f"{a.exact_pass_ratio} x k", f"{exact_passes:,.0f} -> {_fmt_s(exact_passes * pass_s)}"),
        ("passes, compressive", f"k / {a.cosamp_k_per_pass} (+{a.cosamp_sample_work:.0%} in-sample work)",
         f"{cosamp_passes:,.0f} -> {_fmt_s(cosamp_work * pass_s)}"),
        ("collectives per iteration", f"all-gather 16 B + all-reduce {d * 8 / 1e3:.0f} KB, "
         f"{a.collective_us} us latency each, {a.link_gbs} GB/s", _fmt_s(coll_iter_s)),
        ("collectives, all iterations", f"k x the above", _fmt_s(coll_s)),
        ("Gram columns (fetch), all iterations", "sum_j j x D x 4 B", _fmt_s(fetch_s)),
        ("K3 at j = k, per iteration", f"{a.k3_sweeps} sweeps of {_gb(4 * k * k)} (float64 triangle)",
         f"one SM ({a.k3_sm_gbs} GB/s): {_fmt_s(a.k3_sweeps * 4 * k * k / k3_bw_one_sm)}; "
         f"whole GPU: {_fmt_s(max(a.k3_sweeps * 4 * k * k / (bw * a.k2_efficiency), a.k3_sweeps * k / a.k3_tile * a.k3_step_us * 1e-6))}"),
        ("K3, all iterations", "sum_j of the above (O(k^3))",
         f"one SM: {_fmt_s(k3_one_sm_s)}; grid-wide: {_fmt_s(k3_grid_s)}"),
        ("memory per GPU", f"shard + k^2 x 8 B factor ({_gb(factor_bytes)}) + selected rows fp32 ({_gb(rows_bytes)}) "
         f"+ {a.workspace_gb} GB workspace", f"{_gb(gpu_bytes)} of {a.gpu_memory_gb} GB"),
        ("total, exact", "passes + fetch + K3 + collectives",
         f"K3 as today (one block): {_fmt_s(exact_total_now)}; grid-wide K3: {_fmt_s(exact_total_grid)}"),
        ("total, compressive", "passes + in-sample + fetch + K3 + collectives",
         f"K3 as today: {_fmt_s(cosamp_total_now)}; grid-wide K3: {_fmt_s(cosamp_total_grid)}"),
        ("rank bound", f"NNLS solutions have at most D = {d:,} positive weights (Caratheodory); "
         f"the Gram of > D rows is singular without ridge",
         f"useful atoms <= {k_eff:,}" + (" < k" if k_eff < k else "")),
    ]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=float, default=10e6, help="candidates N")
    p.add_argument("--dim", type=int, default=8192, help="D = T * d")
    p.add_argument("--bytes", type=int, default=2, help="bytes per stored value (bf16: 2)")
    p.add_argument("--k", type=int, default=50_000)
    p.add_argument("--k-eff", type=int, default=None, help="atoms that can carry weight (default min(k, D))")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=141.0, help="H200: 141 GB HBM3e")
    p.add_argument("--bandwidth-tbs", type=float, default=4.3, help="H200 device copy bandwidth (SPEC.md, measured)")
    p.add_argument("--k2-efficiency", type=float, default=0.85,
                   help="K2 pass time as a fraction of copy bandwidth (assumed; gpu_correlate.py measures it)")
    p.add_argument("--exact-pass-ratio", type=float, default=1.0,
                   help="passes per pick of exact pursuit (1: no column cache; measured 0.13-0.75 on CPU at k <= 800)")
    p.add_argument("--cosamp-k-per-pass", type=float, default=11.8, help="picks per pass (measured: >= 11.8 at k <= 800)")
    p.add_argument("--cosamp-sample-work", type=float, default=1.0,
                   help="in-sample work as a fraction of the passes (measured 0.7-1.7 at k <= 800)")
    p.add_argument("--collective-us", type=float, default=20.0,
                   help="NCCL small-message latency per collective, 8 GPUs on NVSwitch (assumed, see SCALE.md)")
    p.add_argument("--link-gbs", type=float, default=200.0, help="NVLink bus bandwidth per GPU for the row all-reduce")
    p.add_argument("--k3-sweeps", type=int, default=3, help="reads of the Cholesky triangle per update")
    p.add_argument("--k3-sm-gbs", type=float, default=100.0,
                   help="bandwidth one SM (one thread block, K3 today) draws from HBM (assumed)")
    p.add_argument("--k3-tile", type=int, default=64, help="rows per dependent step of a grid-wide triangular solve")
    p.add_argument("--k3-step-us", type=float, default=3.0, help="latency of one dependent step (grid sync)")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="K2 partial results, masks, scores")
    args = p.parse_args()
    print("| quantity | how | value |")
    print("|---|---|---|")
    for name, how, value in model(args):
        print(f"| {name} | {how} | {value} |")


if __name__ == "__main__":
    main()
