"""Eager cost of going through the registered ops (torch.ops.gtp_kernels.*) on CPU, small inputs.

Each public function (project, correlate_topk, lsq_update) now calls its torch.library custom op.
This times, side by side in one run, the public function against the same work done by calling the
op's body directly (what the function did before registration), on inputs small enough that the
per-call overhead is visible. Prints medians and the difference per call.

    python benchmarks/bench_registered_ops.py [--repeats 2000]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from gtp_kernels.ops import correlate as k2
from gtp_kernels.ops import lsq as k3
from gtp_kernels.ops import project as k1


def median_us(fn, repeats: int, rounds: int = 7) -> float:
    """Median over rounds of the mean time per call (microseconds); calls interleave with the rival's."""
    for _ in range(max(10, repeats // 20)):
        fn()
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        per_round.append((time.perf_counter() - start) / repeats * 1e6)
    return statistics.median(per_round)


def cases():
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(4, 64, generator=gen)
    out = torch.zeros(4, 16)

    def project_public():
        k1.project(grads, 16, 7, out=out)

    def project_direct():  # the pre-registration body: checks, then the torch path into the view
        k1._check_grads("grads", grads, 2)
        k1._check_offset(0, grads.shape[1])
        k1._project_into_impl(grads, 16, 7, "rademacher", 0, out[:, 0:16], 0.25, "auto")

    A = torch.randn(64, 32, generator=gen)
    R = torch.randn(32, 2, generator=gen)

    def correlate_public():
        k2.correlate_topk(A, R, 2)

    def correlate_direct():
        k2.correlate_topk_reference(A, R, 2)

    m, k_max = 4, 8
    state = k3.lsq_init(m, k_max)
    new_atom = torch.full((m,), -1, dtype=torch.int64)  # every pursuit sits out: the op's cheapest path
    gram_col = torch.zeros(m, k_max, dtype=torch.float64)
    gram_diag = torch.ones(m, dtype=torch.float64)
    rhs_new = torch.ones(m, dtype=torch.float64)
    backend = k3._resolve("auto", torch.device("cpu"))

    def lsq_public():
        k3.lsq_update(state, new_atom, gram_col, gram_diag, rhs_new, checked=False, backend=backend)

    def lsq_direct():
        if backend == "ext":
            k3._C.lsq_update(state.L, state.size, state.support, state.rhs, state.weights, new_atom, gram_col,
                             gram_diag, rhs_new, 0.0, True, 1e-10)
        else:
            k3.lsq_update_torch(state, new_atom, gram_col, gram_diag, rhs_new, lam=0.0, positive=True,
                                dep_tol=1e-10)

    return [("project (4x64 -> 16)", project_public, project_direct),
            ("correlate_topk (64x32, m=2, top 2)", correlate_public, correlate_direct),
            (f"lsq_update (m=4, k_max=8, {backend}, inactive)", lsq_public, lsq_direct)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, median of 7 rounds x {args.repeats} calls (shared machine)")
    print(f"{'op':<44} {'direct us':>10} {'public us':>10} {'overhead us':>12} {'ratio':>6}")
    for name, public, direct in cases():
        # alternate, so drifting machine load hits both sides alike
        d1 = median_us(direct, args.repeats)
        p1 = median_us(public, args.repeats)
        d2 = median_us(direct, args.repeats)
        p2 = median_us(public, args.repeats)
        d, p = min(d1, d2), min(p1, p2)
        print(f"{name:<44} {d:>10.1f} {p:>10.1f} {p - d:>12.1f} {p / d:>6.2f}")


if __name__ == "__main__":
    main()
