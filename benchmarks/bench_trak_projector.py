"""GTPProjector / GTPDattriProjector (K1, matrix generated in-kernel) against TRAK's and dattri's CPU projectors.

TRAK's BasicProjector against GTPProjector, and dattri's BasicProjector against GTPDattriProjector
(dattri's interface and scale; rows for a framework that is not installed are left out).

Same gradients, same (grad_dim, proj_dim, seed, proj_type); each projector runs in its own
subprocess so its peak resident memory can be read (ru_maxrss, minus the process's memory just
before the first projection). The matrices differ (different generators), so instead of
comparing outputs the JL property is checked for both: with E the proj_dim x grad_dim matrix of
+-1 entries, <E a, E b> / proj_dim (TRAK's sketch is E a, dattri's E a / sqrt(proj_dim)) estimates <a, b> with standard deviation about
|a||b| sqrt(2 / proj_dim) (Rademacher, a != b) - the table gives the largest and the RMS error
over all pairs of rows in those units, and the relative error of the squared norms.

    python benchmarks/bench_trak_projector.py [--grad-dim 1000000] [--proj-dim 2048] [--batch 32]

The machine is shared with other jobs: times are medians of --repeats runs; quote ratios.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch


NAMES = {"trak": "trak BasicProjector", "gtp": "GTPProjector (K1)",
         "dattri": "dattri BasicProjector", "gtp-dattri": "GTPDattriProjector (K1)"}


def _gradients(batch: int, grad_dim: int) -> torch.Tensor:
    # correlated rows (a shared component), so inner products are not all ~0
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(1, grad_dim, generator=gen)
    return (torch.randn(batch, grad_dim, generator=gen) + 0.7 * shared) / math.sqrt(grad_dim)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(which: str, grad_dim: int, proj_dim: int, batch: int, repeats: int) -> dict:
    grads = _gradients(batch, grad_dim)
    sys.path.insert(0, ".")
    if which == "trak":
        from trak.projectors import BasicProjector, ProjectionType
        base = _rss_mb()
        proj = BasicProjector(grad_dim, proj_dim, 0, ProjectionType.rademacher, "cpu")
    elif which == "gtp":
        from gtp_kernels.integrations.trak import GTPProjector
        base = _rss_mb()
        proj = GTPProjector(grad_dim, proj_dim, 0, "rademacher", "cpu")
    elif which == "dattri":
        from dattri.func.projection import BasicProjector, ProjectionType
        base = _rss_mb()
        proj = BasicProjector(grad_dim, proj_dim, 0, ProjectionType.rademacher, torch.device("cpu"))
    else:
        from gtp_kernels.integrations.dattri import GTPDattriProjector
        base = _rss_mb()
        proj = GTPDattriProjector(grad_dim, proj_dim, 0, "rademacher", "cpu")
    times = []
    sketch = None
    for _ in range(repeats):
        start = time.perf_counter()
        sketch = proj.project(grads, 0)  # model_id (TRAK) or ensemble_id (dattri)
        times.append(time.perf_counter() - start)
    g = grads.double()
    s = sketch.double()
    exact = g @ g.T
    approx = s @ s.T / (proj_dim if which in ("trak", "gtp") else 1)  # dattri's sketch is scaled already
    norms = exact.diagonal().sqrt()
    off = ~torch.eye(batch, dtype=torch.bool)
    err = ((approx - exact) / (norms[:, None] * norms[None, :]))[off] / math.sqrt(2 / proj_dim)
    norm_err = (approx.diagonal() / exact.diagonal() - 1).abs()
    return dict(which=which, median_s=statistics.median(times), peak_extra_mb=_rss_mb() - base,
                max_pair_err_sd=float(err.abs().max()), rms_pair_err_sd=float(err.pow(2).mean().sqrt()),
                max_norm_rel_err=float(norm_err.max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grad-dim", type=int, default=1_000_000)
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", choices=tuple(NAMES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.one, args.grad_dim, args.proj_dim, args.batch, args.repeats)))
        return
    rows = {}
    frameworks = [f for f in ("trak", "dattri") if importlib.util.find_spec(f) is not None]
    for which in [w for f in frameworks for w in (f, "gtp" if f == "trak" else "gtp-dattri")]:
        cmd = [sys.executable, __file__, "--one", which] + [f"--{k.replace('_', '-')}={v}" for k, v in
                                                          vars(args).items() if k != "one"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[which] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"CPU, torch {torch.__version__}, {args.threads} threads, shared machine; grads {args.batch} x "
          f"{args.grad_dim:,} fp32 -> proj_dim {args.proj_dim}, Rademacher, median of {args.repeats}")
    print(f"{'projector':<28} {'time s':>8} {'peak +MB':>9} {'max |err|/sd':>13} {'rms err/sd':>11} "
          f"{'max norm rel err':>17}")
    for which, r in rows.items():
        print(f"{NAMES[which]:<28} {r['median_s']:>8.3f} {r['peak_extra_mb']:>9.0f} {r['max_pair_err_sd']:>13.2f} "
              f"{r['rms_pair_err_sd']:>11.2f} {r['max_norm_rel_err']:>17.4f}")
    for theirs, ours in (("trak", "gtp"), ("dattri", "gtp-dattri")):
        if theirs in rows:
            print(f"time ratio {theirs}/{ours}: {rows[theirs]['median_s'] / rows[ours]['median_s']:.2f}")
    print(f"JL: errors in units of sqrt(2/proj_dim) = {math.sqrt(2 / args.proj_dim):.4f} (rms ~1 expected); "
          f"norms: expected relative error ~ sqrt(2/proj_dim)")


if __name__ == "__main__":
    main()
