"""Distributed selection timed: `select_sharded` (exact) and `select_shard_and_merge` over gloo
with P local processes, against the single-process `select`.

    python benchmarks/bench_distributed_select.py [--n 200000] [--dim 1024] [--k 200] [--procs 2,4]

The launcher runs everything itself and prints one table: the single-process `select`
(method "gtp", one and two threads, each in its own process), then for each P one
`torchrun --nproc_per_node=P` of this file (one thread per rank), in which every rank builds
its contiguous block of the pool and runs `select_sharded`, then `select_shard_and_merge`
(`--repeats` times each, median of the slowest rank's wall time).

The pool: N rows of D float32 Gaussians, generated 4096 rows at a time from a seed per block,
so that a rank makes only its own rows and all runs see the same pool; the target mixes 40 rows
(spread over the pool) with positive weights, plus noise. Exact mode must return the very
rows the single process picks (checked). Bytes: every torch.distributed collective called by a
rank is counted (it wraps `all_gather` / `all_reduce` / `broadcast`), by the function of
distributed.py that called it: payload = the tensor a rank contributes; sent = what a rank puts
on the wire in the usual algorithms, (P - 1) x payload for an all-gather and 2 (P - 1) / P x
payload for a ring all-reduce. "Setup" (the collective input checks) is reported apart from
the per-iteration traffic. "In collectives" is the wall time ranks spend inside those calls
(transfer plus waiting for the slowest rank).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

BLOCK = 4096
TARGET_ROWS = 40


def pool_rows(start: int, stop: int, dim: int):
    """Rows [start, stop) of the pool (float32), the same whoever makes them."""
    import torch

    out = torch.empty(stop - start, dim, dtype=torch.float32)
    for b in range(start // BLOCK, -(-stop // BLOCK)):
        g = torch.Generator().manual_seed(10_000 + b)
        block = torch.randn(BLOCK, dim, generator=g, dtype=torch.float32)
        lo, hi = max(start, b * BLOCK), min(stop, (b + 1) * BLOCK)
        out[lo - start : hi - start] = block[lo - b * BLOCK : hi - b * BLOCK]
    return out


def target_vector(n: int, dim: int):
    import torch

    g = torch.Generator().manual_seed(7)
    rows = torch.linspace(0, n - 1, TARGET_ROWS).round().long().tolist()
    parts = torch.stack([pool_rows(r, r + 1, dim)[0] for r in rows]).double()
    weights = torch.rand(TARGET_ROWS, generator=g, dtype=torch.float64) + 0.5
    return (parts.T @ weights + 0.3 * torch.randn(dim, generator=g, dtype=torch.float64)).float()


def single(args: argparse.Namespace) -> dict:
    import torch

    import gtp_kernels as gk

    A, b = pool_rows(0, args.n, args.dim), target_vector(args.n, args.dim)
    times, picks, sel = [], None, None
    for _ in range(args.repeats):
        started = time.perf_counter()
        sel = gk.select(A, b, k=args.k, method="gtp")
        times.append(time.perf_counter() - started)
        picks = sel.indices.tolist()
    target = sel.per_target[0]
    return {"wall_s": statistics.median(times), "indices": picks, "threads": torch.get_num_threads(),
            "residual": float(sel.residual_norms[-1] / sel.residual_norms[0]), "passes": int(target.passes),
            "iterations": int(target.iterations)}


class CollectiveCounter:
    """Wraps torch.distributed's collectives to count calls, payload bytes and time per caller."""

    def __init__(self, world: int):
        import torch.distributed as dist

        self.world, self.dist = world, dist
        self.stats: dict = collections.defaultdict(lambda: {"calls": 0, "payload": 0, "sent": 0, "seconds": 0.0})
        for name in ("all_gather", "all_reduce", "broadcast"):
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, op: str, original):
        def counted(*args, **kwargs):
            tensor = args[1] if op == "all_gather" else args[0]
            payload = tensor.numel() * tensor.element_size()
            if op == "all_gather":
                sent = (self.world - 1) * payload
            elif op == "all_reduce":
                sent = 2 * (self.world - 1) * payload / self.world
            else:
                sent = payload
            caller = sys._getframe(1).f_code.co_name
            entry = self.stats[f"{caller}:{op}"]
            started = time.perf_counter()
            result = original(*args, **kwargs)
            entry["seconds"] += time.perf_counter() - started
            entry["calls"] += 1
            entry["payload"] += payload
            entry["sent"] += sent
            return result
        return counted

    def take(self) -> dict:
        out = {key: dict(value) for key, value in self.stats.items()}
        self.stats.clear()
        return out


def worker(args: argparse.Namespace, report: Path) -> None:
    import torch
    import torch.distributed as dist

    from gtp_kernels.selection.distributed import select_shard_and_merge, select_sharded

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cuts = [args.n * r // world for r in range(world + 1)]
    A, b = pool_rows(cuts[rank], cuts[rank + 1], args.dim), target_vector(args.n, args.dim)
    counter = CollectiveCounter(world)
    result = {"rank": rank, "threads": torch.get_num_threads()}
    for name, run in (("sharded", select_sharded), ("shard_and_merge", select_shard_and_merge)):
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            counter.take()
            started = time.perf_counter()
            sel = run(A, b, args.k)
            times.append(time.perf_counter() - started)
            stats = counter.take()
        target = sel.per_target[0]
        result[name] = {"wall_s": times, "indices": sel.indices.tolist(), "stats": stats,
                        "residual": float(sel.residual_norms[-1] / sel.residual_norms[0]),
                        "iterations": int(target.iterations), "passes": int(target.passes)}
    report.with_name(f"{report.name}.rank{rank}").write_text(json.dumps(result))
    dist.destroy_process_group()


def _env(threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _common(args) -> list[str]:
    return ["--n", str(args.n), "--dim", str(args.dim), "--k", str(args.k), "--repeats", str(args.repeats)]


def _per_iteration(stats: dict, iterations: int) -> tuple[float, float, float, float]:
    """(calls, payload bytes, sent bytes, seconds) per iteration of the pursuit (setup excluded)."""
    loop = [v for key, v in stats.items() if not key.startswith("_all_gather_json")]
    it = max(iterations, 1)
    return (sum(v["calls"] for v in loop) / it, sum(v["payload"] for v in loop) / it,
            sum(v["sent"] for v in loop) / it, sum(v["seconds"] for v in loop))


def launch(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="gtp_bench_dist_select_") as tmp:
        print(f"N = {args.n}, D = {args.dim} float32 ({args.n * args.dim * 4 / 1e9:.2f} GB), k = {args.k}, "
              f"exact pursuit; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
              f"{os.cpu_count()} cores", flush=True)
        singles = {}
        for threads in (1, 2):
            out = Path(tmp) / f"single{threads}.json"
            subprocess.run([sys.executable, __file__, "--single", str(out), *_common(args)], env=_env(threads), check=True)
            singles[threads] = json.loads(out.read_text())
            s = singles[threads]
            print(f"single process, {threads} thread(s): {s['wall_s']:.2f} s, {s['iterations']} iterations, "
                  f"{s['passes']} passes", flush=True)
        reference = singles[1]["indices"]
        assert singles[2]["indices"] == reference
        rows = []
        for p in args.procs:
            report = Path(tmp) / f"p{p}"
            # "--": torchrun's own parser would read --n as an abbreviation of its --nnodes etc.
            command = ["torchrun", "--standalone", f"--nproc_per_node={p}", "--", __file__, "--worker", str(report),
                       *_common(args)]
            subprocess.run(command, env=_env(1), check=True, stdout=subprocess.DEVNULL)
            ranks = [json.loads(report.with_name(f"{report.name}.rank{r}").read_text()) for r in range(p)]
            for mode in ("sharded", "shard_and_merge"):
                per_rank = [r[mode] for r in ranks]
                assert all(r["indices"] == per_rank[0]["indices"] for r in per_rank), "ranks disagree"
                wall = statistics.median(max(r["wall_s"][i] for r in per_rank) for i in range(args.repeats))
                first = per_rank[0]
                calls, payload, sent, seconds = _per_iteration(first["stats"], first["iterations"])
                setup = sum(v["payload"] for key, v in first["stats"].items() if key.startswith("_all_gather_json"))
                total_sent = sum(v["sent"] for v in first["stats"].values())
                same = first["indices"] == reference
                overlap = len(set(first["indices"]) & set(reference))
                rows.append((mode, p, wall, first["iterations"], calls, payload, sent, setup, total_sent,
                             max(sum(v["seconds"] for v in r["stats"].values()) for r in per_rank),
                             first["residual"], same, overlap, first["stats"]))
                print(f"P={p} {mode}: {wall:.2f} s, same picks as single: {same} ({overlap}/{len(reference)} shared), "
                      f"rel. residual {first['residual']:.6f} (single {singles[1]['residual']:.6f})", flush=True)
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
        print("| run | P | wall s (median) | vs single, 1 thread | vs single, 2 threads | iterations | "
              "collectives / iter | payload B / iter / rank | sent B / iter / rank | setup B / rank | "
              "sent B total / rank | s in collectives | rel. residual | picks = single |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for threads in (1, 2):
            s = singles[threads]
            print(f"| `select` gtp, {threads} thread(s) | 1 | {s['wall_s']:.2f} | {singles[1]['wall_s'] / s['wall_s']:.2f}x | "
                  f"{singles[2]['wall_s'] / s['wall_s']:.2f}x | {s['iterations']} | - | - | - | - | - | - | "
                  f"{s['residual']:.6f} | yes |")
        for (mode, p, wall, iters, calls, payload, sent, setup, total, in_coll, residual, same, overlap, _) in rows:
            name = "`select_sharded`" if mode == "sharded" else "`select_shard_and_merge`"
            per_iter = (f"{calls:.2f} | {payload:,.0f} | {sent:,.0f}" if mode == "sharded" else "- | - | -")
            print(f"| {name} | {p} | {wall:.2f} | {singles[1]['wall_s'] / wall:.2f}x | {singles[2]['wall_s'] / wall:.2f}x | "
                  f"{iters} | {per_iter} | {setup:,} | {total:,.0f} | {in_coll:.2f} | {residual:.6f} | "
                  f"{'yes' if same else f'no ({overlap}/{len(reference)})'} |")
        print("\nrank 0's collectives by caller (calls, payload bytes, sent bytes, seconds), last repeat:")
        for (mode, p, *_, stats) in rows:
            for key, v in sorted(stats.items()):
                print(f"  P={p} {mode:16s} {key:28s} {v['calls']:6d} {v['payload']:>14,} {v['sent']:>16,.0f} "
                      f"{v['seconds']:8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--procs", default="2,4")
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        Path(args.single).write_text(json.dumps(single(args)))
    elif args.worker:
        worker(args, Path(args.worker))
    else:
        args.procs = [int(p) for p in args.procs.split(",")]
        launch(args)


if __name__ == "__main__":
    main()
