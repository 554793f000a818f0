"""CPU table for BENCHMARKS.md: every selector side by side in one run, as ratios.

For each (N, D, k): the fast exact driver (both strategies and auto), compressive sampling,
the plain-PyTorch reference, top-k, and the naive floor (k single passes A @ r with torch,
timed here as the median of a few passes times k: what a GEMV-per-atom method pays). Reports
seconds, ratio to that floor, passes over A, and whether the fast driver's selection is
identical to the reference's. Two stricter floors are printed per case: k passes of our own
row-products kernel (the passes the drivers make on CPU) and k plain reads of A (A.sum()).

    python benchmarks/pursuit_table.py                 # the issue's three shapes
    python benchmarks/pursuit_table.py --grid          # cost growth over N and k
    python benchmarks/pursuit_table.py --quick         # small shapes, a smoke run
    python benchmarks/pursuit_table.py --grid --plot grid.png   # also a chart of "x floor"
"""
from __future__ import annotations

import argparse

import torch

import gtp_kernels as gk
from gtp_kernels.selection.common import SelectOptions
from gtp_kernels.selection.pursuit import gtp_pursuit
from gtp_kernels.ops.products import row_products
from gtp_kernels.validation import validate_problem
from timing import median_seconds, timed


def pool(n: int, dim: int, seed: int = 0):
    """Unit-norm Gaussian rows; the target mixes 50 rows plus noise (pursuit runs to k)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, dim, generator=g)
    A /= A.norm(dim=1, keepdim=True)
    b = A[torch.randperm(n, generator=g)[:50]].T @ torch.rand(50, generator=g) + 0.05 * torch.randn(dim, generator=g)
    return A, b


def floor_seconds(A, k: int, reps: int = 7, how: str = "torch") -> float:
    """k x the median time of one pass: "torch" A @ r, "kernel" row_products, "read" A.sum()."""
    r = torch.randn(A.shape[1], dtype=A.dtype)
    one = {"torch": lambda: A @ r, "kernel": lambda: row_products(A, r[None]), "read": lambda: A.sum()}[how]
    return median_seconds(one, reps) * k


def run_case(n: int, dim: int, k: int, with_reference: bool = True):
    A, b = pool(n, dim)
    problem = validate_problem(A, b, k)
    floor = floor_seconds(A, k)
    strict = {how: floor_seconds(A, k, how=how) for how in ("kernel", "read")}
    rows = []
    results = {}
    for strategy in ("cached", "direct", "auto"):
        res, sec = timed(lambda: gtp_pursuit(problem, k, SelectOptions(), strategy=strategy))
        results[strategy] = res[0]
        rows.append((f"gtp ({strategy})", sec, res[0].passes))
    sel, sec = timed(lambda: gk.select(A, b, k, method="gtp-cosamp"))
    rows.append(("gtp-cosamp", sec, sel.per_target[0].passes))
    cos_resid = gk.fit_residual(A, b, sel.indices)
    exact_resid = gk.fit_residual(A, b, results["auto"].indices)
    identical = None
    if with_reference:
        ref, sec = timed(lambda: gk.select(A, b, k, method="gtp-reference"))
        rows.append(("gtp-reference", sec, ref.per_target[0].passes))
        identical = all(results[s].indices.tolist() == ref.indices.tolist() for s in ("cached", "direct"))
        if not identical:  # fp32 reference rounding vs ours: settle it against float64
            ref64 = gk.select(A.double(), b.double(), k, method="gtp-reference")
            same64 = all(results[s].indices.tolist() == ref64.indices.tolist() for s in ("cached", "direct"))
            identical = f"no; fast == float64 reference: {same64}, fp32 reference == float64: " \
                        f"{ref.indices.tolist() == ref64.indices.tolist()}"
    sel, sec = timed(lambda: gk.select(A, b, k, method="topk"))
    rows.append(("topk", sec, 1))
    return floor, strict, rows, identical, cos_resid / exact_resid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-reference", action="store_true", help="skip the plain reference (slow)")
    ap.add_argument("--plot", metavar="FILE", help="also chart each method's time / the k-pass floor "
                                                  "(format from the suffix: .png, .pdf, .svg)")
    args = ap.parse_args()
    if args.plot:
        from gtp_kernels.demo import plot_format

        plot_format(args.plot)  # an unwritable format fails now, not after the run
    torch.manual_seed(0)
    if args.quick:
        cases = [(5000, 512, 50), (3000, 256, 100)]
    elif args.grid:
        cases = [(n, 1024, k) for n in (10_000, 20_000, 40_000) for k in (50, 200, 800)]
    else:
        cases = [(100_000, 2048, 200), (20_000, 1024, 800), (20_000, 8192, 200)]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| N | D | k | method | seconds | x floor | x kernel-pass floor | passes over A |")
    print("|---|---|---|---|---|---|---|---|")
    chart = []  # (case label, {method: time / floor})
    for n, dim, k in cases:
        floor, strict, rows, identical, cos_ratio = run_case(n, dim, k, with_reference=not args.no_reference)
        chart.append((f"N={n // 1000}k D={dim} k={k}",
                      {"k passes of our kernel": strict["kernel"] / floor,
                       **{name: sec / floor for name, sec, _ in rows if name not in ("gtp (cached)", "gtp (direct)")}}))
        kf = strict["kernel"]
        print(f"| {n} | {dim} | {k} | k-pass floor (torch A @ r) | {floor:.2f} | 1.00 | {floor / kf:.2f} | {k} |")
        print(f"| {n} | {dim} | {k} | k passes of our kernel | {kf:.2f} | {kf / floor:.2f} | 1.00 | {k} |")
        print(f"| {n} | {dim} | {k} | k plain reads of A | {strict['read']:.2f} | {strict['read'] / floor:.2f} | "
              f"{strict['read'] / kf:.2f} | {k} |")
        secs = dict((name, sec) for name, sec, _ in rows)
        for name, sec, passes in rows:
            print(f"| {n} | {dim} | {k} | {name} | {sec:.2f} | {sec / floor:.2f} | {sec / kf:.2f} | {passes:g} |")
        note = f"fast == reference: {identical}; cosamp residual / exact: {cos_ratio:.3f}"
        if "gtp-reference" in secs:
            note += f"; reference / cosamp: {secs['gtp-reference'] / secs['gtp-cosamp']:.1f}x"
        print(f"| {n} | {dim} | {k} | ({note}) | | | | |")
    if args.plot:
        save_chart(chart, args.plot)
        print(f"wrote {args.plot}")


def save_chart(chart, path: str) -> None:
    """Grouped bars, one group per case: each method's time over the k-pass floor (log scale;
    1 = the floor, what a GEMV-per-atom method pays). Written to a temp file, then renamed."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from gtp_kernels.demo import plot_format
    from gtp_kernels.atomic import atomic_write_bytes

    methods = list(dict.fromkeys(name for _, ratios in chart for name in ratios))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(chart)), 4.0))
    for j, name in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(chart))]
        ax.bar(xs, [ratios.get(name, float("nan")) for _, ratios in chart], width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ratio_labels = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x")
    ax.yaxis.set_major_formatter(ratio_labels)
    ax.yaxis.set_minor_formatter(ratio_labels)
    ax.tick_params(axis="y", which="both", labelsize=7)
    ax.set_xticks(range(len(chart)), [label for label, _ in chart], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("time / k-pass floor (torch A @ r)")
    ax.set_title(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads: lower is faster")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=plot_format(path), dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())  # temp file, then rename


if __name__ == "__main__":
    main()
