"""K1 on CPU (pytest-benchmark): the projection through project(backend="torch") — Philox entries
generated block by block — vs what TRAK's basic projector does (materialise a block of Pi with
torch's own generator, multiply, next block) vs a matmul with Pi materialised beforehand (the
compute ceiling, which needs the whole d x P matrix in memory).

    python -m pytest benchmarks/bench_project.py --benchmark-only -q
    python benchmarks/bench_project.py            # side-by-side table with ratios

The Triton kernel is not timed here: on CPU it only runs through the interpreter (tests), its
timings are in benchmarks/gpu_project.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from gtp_kernels.ops.project import project
from timing import median_seconds

CASES = {  # name: (B, P, d)
    "B32-P32k-d1024": (32, 1 << 15, 1024),
    "B8-P64k-d512": (8, 1 << 16, 512),
}
TRAK_BLOCK = 4096  # features per generated block, as the basic projector chunks its matrix


def project_counter_based(grads: torch.Tensor, d: int, seed: int) -> torch.Tensor:
    return project(grads, d, seed, backend="torch")


def project_generate_then_multiply(grads: torch.Tensor, d: int, seed: int) -> torch.Tensor:
    """TRAK-basic style: per feature block, seed a torch.Generator, draw +-1, scale, multiply."""
    out = torch.zeros(grads.shape[0], d)
    generator = torch.Generator()
    for block, start in enumerate(range(0, grads.shape[1], TRAK_BLOCK)):
        stop = min(grads.shape[1], start + TRAK_BLOCK)
        generator.manual_seed(seed + block)
        signs = torch.randint(0, 2, (stop - start, d), generator=generator).to(torch.float32).mul_(2).sub_(1)
        out += grads[:, start:stop].float() @ signs
    return out.mul_(1 / math.sqrt(d))


def _inputs(case: str):
    n_rows, n_features, d = CASES[case]
    grads = torch.randn(n_rows, n_features, generator=torch.Generator().manual_seed(0))
    return grads, d


@pytest.mark.parametrize("case", list(CASES))
def test_counter_based_project(benchmark, case):
    grads, d = _inputs(case)
    benchmark.pedantic(project_counter_based, args=(grads, d, 1), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("case", list(CASES))
def test_generate_then_multiply(benchmark, case):
    grads, d = _inputs(case)
    benchmark.pedantic(project_generate_then_multiply, args=(grads, d, 1), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("case", list(CASES))
def test_premade_matrix_matmul(benchmark, case):
    grads, d = _inputs(case)
    pi_t = torch.randint(0, 2, (grads.shape[1], d), generator=torch.Generator().manual_seed(1)).float() * 2 - 1
    benchmark.pedantic(lambda: grads @ pi_t, rounds=5, warmup_rounds=1)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| case | project (Philox, torch) | generate-then-multiply | premade Pi matmul | project / premade |")
    for case in CASES:
        grads, d = _inputs(case)
        pi_t = torch.randint(0, 2, (grads.shape[1], d)).float() * 2 - 1
        t_project = median_seconds(lambda: project_counter_based(grads, d, 1), 3)
        t_trak = median_seconds(lambda: project_generate_then_multiply(grads, d, 1), 3)
        t_premade = median_seconds(lambda: grads @ pi_t, 3)
        print(f"| {case} | {t_project * 1e3:.1f} ms | {t_trak * 1e3:.1f} ms | {t_premade * 1e3:.1f} ms "
              f"| {t_project / t_premade:.1f}x |")


if __name__ == "__main__":
    from timing import script_help

    script_help(__doc__)
    main()
