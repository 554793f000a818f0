"""`torchrun --nproc_per_node=2 -m gtp_kernels -- select` (gloo, CPU) on a trajectory store writes
the selection a single-process `gtp select` writes (the same rows, weights to 1e-12), rank 0
alone writes and prints, and methods the sharded selection does not run are refused.

Each launch is a subprocess with one thread per rank and a time limit, so that a rank left
waiting in a collective fails the test instead of hanging the suite.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
N, T, D, SHARD_SIZE = 29, 2, 8, 6  # five shards, the last one short
METADATA = {"checkpoint_weights": [0.7, 0.3]}

needs_torchrun = pytest.mark.skipif(not dist.is_available() or shutil.which("torchrun") is None,
                                    reason="torch.distributed or torchrun not available")


def _write_store(folder, rows, shard_size):
    from gtp_kernels.collect.store import StoreSpec, TrajectoryStoreWriter

    n = len(rows)
    writer = TrajectoryStoreWriter(folder, StoreSpec(n=n, t=T, d=D, example_ids=[f"{folder.name}{i}" for i in range(n)],
                                                     shard_size=shard_size, metadata=METADATA))
    for index, start in enumerate(range(0, n, shard_size)):
        writer.write_shard(index, rows[start:start + shard_size])
    writer.finish()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A pool store of N rows in five shards and a target store of four rows near pool rows."""
    root = tmp_path_factory.mktemp("dist_select")
    rng = np.random.default_rng(3)
    pool = rng.standard_normal((N, T, D)).astype(np.float32)
    target = (pool[[2, 11, 17, 26]] + 0.1 * rng.standard_normal((4, T, D))).astype(np.float32)
    _write_store(root / "pool", pool, SHARD_SIZE)
    _write_store(root / "val", target, 4)
    return root


def _gtp(launcher, stores, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = launcher + ["-m", "gtp_kernels", "--", "select", "--candidates", str(stores / "pool"),
                          "--target", str(stores / "val"), "--k", "5", "--out", str(out), "--device", "cpu", *extra]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def _torchrun(processes):
    return ["torchrun", "--standalone", f"--nproc_per_node={processes}"]


def _lines(out: Path) -> list:
    return [json.loads(line) for line in (out / "selection.jsonl").read_text(encoding="utf-8").splitlines()]


@needs_torchrun
@pytest.mark.parametrize("target_mode", ["mean", "examples"])
def test_two_ranks_select_what_one_process_selects(stores, tmp_path, target_mode):
    single = _gtp([sys.executable], stores, tmp_path / "single", "--target-mode", target_mode, "--fill", "none")
    assert single.returncode == 0, single.stderr[-5000:]
    extra = ["--target-mode", target_mode] if target_mode != "mean" else []  # mean: the default under torchrun
    done = _gtp(_torchrun(2), stores, tmp_path / "ranks", *extra)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    got, want = _lines(tmp_path / "ranks"), _lines(tmp_path / "single")
    assert len(want) >= 5 and len(got) == len(want)
    for g, w in zip(got, want):
        assert {key: g[key] for key in g if key != "weight"} == {key: w[key] for key in w if key != "weight"}
        np.testing.assert_allclose(g["weight"], w["weight"], rtol=1e-12, atol=1e-12)
    summary = json.loads((tmp_path / "ranks" / "summary.json").read_text(encoding="utf-8"))
    assert summary["params"]["world_size"] == 2 and summary["inputs"]["target"]["mode"] == target_mode
    # rank 0 alone prints: one selection line, one "wrote" line
    assert done.stdout.count("wrote ") == 1 and done.stdout.count("method=gtp-sharded") == 1, done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranks", "single"]


@needs_torchrun
@pytest.mark.parametrize("option,said", [
    (("--method", "topk"), ("--method topk", "supported: gtp")),  # only exact gtp runs sharded
    (("--screen", "2"), ("--screen 2", "--screen none")),  # the screen ranks the whole pool
])
def test_what_the_sharded_selection_cannot_do_is_refused_under_torchrun(stores, tmp_path, option, said):
    done = _gtp(_torchrun(2), stores, tmp_path / "out", *option)
    assert done.returncode != 0
    assert all(words in done.stderr for words in said), done.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("world", [1, 2, 3, 5, 7, 40])
def test_rank_rows_split_the_store_in_row_order(stores, world):
    """Every rank's block, in rank order, is the whole store; whole shards when there are at
    least as many shards as ranks."""
    from gtp_kernels.collect import open_store
    from gtp_kernels.collect.store_selection import rank_rows

    store = open_store(stores / "pool")
    blocks = [rank_rows(store, rank, world) for rank in range(world)]
    offsets = [offset for offset, _ in blocks]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert all(offset + len(rows) == nxt for (offset, rows), nxt in zip(blocks, offsets[1:] + [N]))
    np.testing.assert_array_equal(np.concatenate([rows for _, rows in blocks]), store.candidates())
    if world <= store.n_shards:
        assert all(offset % SHARD_SIZE == 0 for offset in offsets)
        assert all(len(rows) > 0 for _, rows in blocks)
