"""Exact GTP over a trajectory store, its rows split across the ranks of a torchrun launch.

    torchrun --nproc_per_node=8 python/select_sharded_store.py --candidates pool_store \
        --target val_store --k 1000 --out selected_ids.json

Rank r loads only its block of the pool: whole shards [S*r/P, S*(r+1)/P) of the store's S
shards, in row order (so a rank holds about N/P rows, in the store's dtype), moves them to its
GPU when there is one (NCCL; gloo on CPUs), and calls ``gtp_kernels.select_sharded`` with the
target (the target store's mean row) and the pool's checkpoint weights. Every rank gets the same
selection, equal to ``gtp select`` on the whole store; rank 0 writes the chosen example ids (in
selection order) with their weights as JSON. ``--shard-and-merge`` runs the approximate
one-round mode instead. (``torchrun ... -m gtp_kernels -- select`` runs the exact mode and
writes gtp select's output folder; both read the store through
``gtp_kernels.collect.store_selection.select_sharded_from_stores``.)
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from gtp_kernels.atomic import atomic_write_text
from gtp_kernels.collect import open_store
from gtp_kernels.collect.store_selection import select_sharded_from_stores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", required=True, help="pool store folder (gtp collect)")
    parser.add_argument("--target", required=True, help="target store folder (its mean row is the target)")
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes: ids, rows, weights")
    parser.add_argument("--shard-and-merge", action="store_true", help="approximate one-round mode")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group("nccl" if on_gpu else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        pool = open_store(args.candidates)
        sel = select_sharded_from_stores(pool, open_store(args.target), args.k, shard_and_merge=args.shard_and_merge,
                                         device="cuda" if on_gpu else None)
        if rank == 0:
            chosen = [int(i) for i in sel.indices]
            result = {"ids": [pool.ids[i] for i in chosen], "rows": chosen,
                      "weights": [float(w) for w in sel.weights], "method": sel.method, "world_size": world}
            atomic_write_text(args.out, json.dumps(result, indent=1))
            print(f"{len(chosen)} examples selected over {world} ranks ({sel.method}) -> {args.out}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
