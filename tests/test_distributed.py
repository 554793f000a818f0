"""Sharded selection across torch.distributed ranks (gloo, 2 processes on this machine)
equals the single-process selection."""
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gtp_kernels.selection.common import SelectOptions
from gtp_kernels.selection.pursuit import gtp_pursuit
from gtp_kernels.validation import validate_problem

SPLIT = 137  # uneven shards: rank 0 holds rows [0, 137), rank 1 the rest


def problem_data():
    g = torch.Generator().manual_seed(21)
    A = torch.randn(400, 64, generator=g, dtype=torch.float64)
    A[380:] = A[:20] * 2.0  # positive multiples across the shard boundary
    B = torch.stack([A[torch.randperm(400, generator=g)[:15]].T @ torch.rand(15, generator=g, dtype=torch.float64)
                     + 0.2 * torch.randn(64, generator=g, dtype=torch.float64) for _ in range(2)], 1)
    return A, B


def _worker(rank, world, init, out_dir):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        from gtp_kernels.selection.distributed import select_sharded, select_shard_and_merge

        A, B = problem_data()
        shard = A[:SPLIT] if rank == 0 else A[SPLIT:]
        results = {s: select_sharded(shard, B, 25, strategy=s, prefetch=3) for s in ("direct", "cached")}
        results["merge"] = select_shard_and_merge(shard, B, 25)
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
            pickle.dump({s: [(r.indices.tolist(), r.weights.tolist()) for r in res.per_target]
                         for s, res in results.items()}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_sharded_equals_single_process(tmp_path):
    init = f"file://{tmp_path}/rendezvous"
    mp.spawn(_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    ranks = [pickle.load(open(tmp_path / f"rank{r}.pkl", "rb")) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank returns the same selection
    A, B = problem_data()
    single = gtp_pursuit(validate_problem(A, B, 25), 25, SelectOptions(), strategy="direct")
    for strategy in ("direct", "cached"):
        for (idx, w), ref in zip(ranks[0][strategy], single):
            assert idx == ref.indices.tolist()
            assert torch.allclose(torch.tensor(w, dtype=torch.float64), torch.from_numpy(ref.weights), rtol=1e-9)
    for idx, _ in ranks[0]["merge"]:
        assert len(idx) == 25 and len(set(idx)) == 25 and all(0 <= i < 400 for i in idx)
