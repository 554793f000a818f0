"""LESS-sized selection out of core: a 270k x (4 x 8192) fp16 trajectory store on one CPU machine.

The paper's setting (LESS): ~270k candidates, T = 4 checkpoints, d = 8192, fp16: 17.7 GB a
store, more than the page cache of a shared machine holds. Two steps:

    python benchmarks/bench_store_out_of_core.py generate --out /work/data/less270k
    python benchmarks/bench_store_out_of_core.py run --store /work/data/less270k --k 1000

``generate`` writes the store through the package's writer (``TrajectoryStoreWriter``), shard
by shard (rows a_i ~ N(0, I/D), so ||a_i|| ~ 1), never holding more than one shard, then plants
two targets: b = A_S^T w + noise with a known support S (|S| = --planted, w uniform in
[0.5, 1.5], noise --noise * ||A_S^T w|| spread over D), one with S drawn from all N rows and one
with S drawn from the first --small-n rows (the smaller pool of the memory comparison). They go
next to the store as ``planted-full.npz`` / ``planted-small.npz`` (not part of the store format).

``run`` opens the store as a user's would (``open_store``, ``rows_source()``: memory-mapped
shards, read a chunk at a time in fp16) and, for each pool (all N; the first --small-n rows):

* the read floor: one chunked integer ``sum`` over the mapped shards' bytes (the same bytes a
  pass reads, through the same chunk loop; integers because torch's fp16 ``sum`` is
  compute-bound at ~0.2 GB/s here), --floor-reps times: the first from an evicted page cache
  (the store's files are dropped with POSIX_FADV_DONTNEED before every measurement, unless
  --warm), the others from what the page cache kept (median);
* ``gtp-cosamp`` and exact ``gtp`` at k (``gtp_kernels.api.select``), each in a fresh
  subprocess that samples its anonymous resident memory (RssAnon; page cache of the maps is
  file-backed and not counted) every 5 ms and records VmHWM;
* passes over A (counted by wrapping the row source's ``chunks``), time per pass, and the
  ratio pass / floor; the exact run stops after --max-seconds (reported as capped, with the
  projected total from the measured time per pass).

The machine is shared: the load average is printed next to the figures; ratios measured side
by side are the robust part.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _save_atomically(path: Path, **arrays: np.ndarray) -> None:
    from gtp_kernels.atomic import write_atomically

    write_atomically(path, lambda handle: np.savez(handle, **arrays))


def generate(args: argparse.Namespace) -> None:
    from gtp_kernels.collect.store import StoreSpec, TrajectoryStoreWriter, open_store

    n, t, d = args.n, args.t, args.d
    dim = t * d
    spec = StoreSpec(n=n, t=t, d=d, example_ids=[f"ex{i}" for i in range(n)], dtype="float16",
                     shard_size=args.shard_size,
                     metadata={"checkpoint_weights": [1.0 / t] * t, "weights_applied": False,
                               "source": "benchmarks/bench_store_out_of_core.py generate",
                               "rows": "iid N(0, 1/D) per entry", "seed": args.seed})
    writer = TrajectoryStoreWriter(args.out, spec)  # resumes: listed shards are kept
    missing = writer.missing_shards()
    scale = np.float32(1.0 / np.sqrt(dim))
    shard = np.empty((args.shard_size, t, d), dtype=np.float16)
    sub = 256  # rows generated in float32 at a time (32 MiB at D = 32768)
    t0 = time.perf_counter()
    for count, index in enumerate(missing):
        start, stop = spec.shard_rows(index)
        rows = shard[: stop - start].reshape(stop - start, dim)
        rng = np.random.default_rng([args.seed, index])  # per shard: a resumed store is the same store
        for lo in range(0, stop - start, sub):
            block = rng.standard_normal((min(sub, stop - start - lo), dim), dtype=np.float32)
            block *= scale
            rows[lo : lo + block.shape[0]] = block
        writer.write_shard(index, shard[: stop - start])
        if count % 8 == 0 or count == len(missing) - 1:
            done = count + 1
            rate = (time.perf_counter() - t0) / done
            print(f"shard {index} written ({done}/{len(missing)} this run, {rate:.1f} s/shard, "
                  f"~{rate * (len(missing) - done) / 60:.0f} min left)", flush=True)
    store = writer.finish()
    print(f"store complete: {store.path} N={store.n} T={store.t} d={store.d} {store.dtype}, "
          f"{sum(a.nbytes for _, _, a in store.iter_shards()) / 1e9:.2f} GB of rows", flush=True)

    store = open_store(args.out)
    rng = np.random.default_rng([args.seed, 10**6])
    for name, pool in (("full", n), ("small", min(args.small_n, n))):
        support = np.sort(rng.choice(pool, args.planted, replace=False))
        weights = rng.uniform(0.5, 1.5, args.planted)
        signal = store.rows(support).astype(np.float64).T @ weights
        noise = rng.standard_normal(dim) * (args.noise * np.linalg.norm(signal) / np.sqrt(dim))
        target = (signal + noise).astype(np.float32)
        _save_atomically(Path(args.out) / f"planted-{name}.npz", support=support, weights=weights, target=target,
                         pool=np.int64(pool), noise=np.float64(args.noise))
        print(f"planted-{name}.npz: |S| = {args.planted} in [0, {pool}), noise {args.noise}", flush=True)


# ----------------------------------------------------------------------------------------------
# run: one selection per fresh subprocess (memory peaks of one run only)

RUNNER = r"""
import json, os, sys, threading, time
sys.path.insert(0, os.environ["GTP_ROOT"])
import numpy as np, torch
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
from gtp_kernels.collect.store import open_store
from gtp_kernels.selection.rows import RowSource

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

cfg = json.loads(sys.argv[1])
store = open_store(cfg["store"])
shards = [a for _, _, a in store.iter_shards()]
if cfg["rows"] < store.n:
    keep, total = [], 0
    for a in shards:
        if total >= cfg["rows"]:
            break
        keep.append(a[: cfg["rows"] - total])
        total += len(keep[-1])
    shards = keep
source = RowSource(shards)
planted = np.load(cfg["planted"])
b = torch.from_numpy(planted["target"])

# a pass: one run of chunks() from row 0 to the end, timed from its start to its end (the
# consumer's product on each chunk included); a pass abandoned midway is not counted
passes, pass_seconds = [0], []
chunks = source.chunks
def counting_chunks(*a, **kw):
    start = time.perf_counter()
    for item in chunks(*a, **kw):
        if item[0] == 0:
            passes[0] += 1
        yield item
    pass_seconds.append(time.perf_counter() - start)
source.chunks = counting_chunks

base = status("RssAnon")
peak = [base]
done = threading.Event()
def poll():
    while not done.is_set():
        peak[0] = max(peak[0], status("RssAnon"))
        time.sleep(0.005)
threading.Thread(target=poll, daemon=True).start()

result = {}
t0 = time.perf_counter()
if cfg["mode"] == "floor":
    times = []
    for _ in range(cfg["reps"]):
        s = time.perf_counter()
        total = 0.0
        for _, chunk in source.chunks():
            # the bytes as integers: a read at memory speed (torch's fp16 sum runs ~0.2 GB/s here)
            flat = chunk.reshape(-1).view(torch.int16).numpy()
            words = flat.view(np.uint64) if flat.nbytes % 8 == 0 else flat
            total += int(words.sum())
        times.append(time.perf_counter() - s)
    result["floor_s"] = sorted(times)[len(times) // 2]
    result["floor_all_s"] = times
else:
    from gtp_kernels.api import select
    kw = dict(cfg.get("kwargs", {}))
    if cfg["max_seconds"]:
        # a time cap: stop the pursuit at the first chunk read after the deadline (raised out
        # of the chunk loop), keeping the passes completed and their times
        deadline = t0 + cfg["max_seconds"]
        counted = source.chunks
        class Capped(Exception):
            pass
        def capped_chunks(*a, **kw2):
            for item in counted(*a, **kw2):
                if time.perf_counter() > deadline:
                    raise Capped()
                yield item
        source.chunks = capped_chunks
    try:
        sel = select(source, b, cfg["k"], method=cfg["mode"], **kw)
        result["capped"] = False
        support = np.asarray(sel.indices).reshape(-1)
        truth = set(planted["support"].tolist())
        result["selected"] = int(support.size)
        result["method_passes"] = [int(ts.passes) for ts in sel.per_target]
        result["recovered"] = int(sum(int(i) in truth for i in support))
        hist = getattr(sel, "residual_norms", None)
        if hist is not None and len(hist):
            result["rel_residual"] = float(np.asarray(hist).reshape(-1)[-1]) / float(np.linalg.norm(planted["target"]))
    except Exception as error:
        if type(error).__name__ != "Capped":
            raise
        result["capped"] = True
result["wall_s"] = time.perf_counter() - t0
done.set()
result["passes"] = passes[0]
result["pass_seconds"] = pass_seconds
result["base_anon"] = base
result["peak_anon"] = max(peak[0], status("RssAnon"))
result["vmhwm"] = status("VmHWM")
print("RESULT " + json.dumps(result), flush=True)
"""


def _drop_page_cache(store_path: Path) -> None:
    """Evict the store's shard files from the page cache (POSIX_FADV_DONTNEED; pages another
    process maps stay): the next read starts cold, as on a machine whose page cache the store
    does not fit."""
    for path in sorted(Path(store_path).glob("shard-*.npy")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _cached_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _run_one(cfg: dict, threads: int) -> dict:
    if cfg.get("cold"):
        _drop_page_cache(Path(cfg["store"]))
    env = dict(os.environ, GTP_ROOT=str(ROOT), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(cfg)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run {cfg['mode']} failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def run(args: argparse.Namespace) -> None:
    from gtp_kernels.collect.store import open_store

    store = open_store(args.store)
    dim = store.t * store.d
    pools = [(name, n) for name, n in (("full", store.n), ("small", min(args.small_n, store.n)))
             if name in args.pools.split(",")]
    rows_out = []
    print(f"store {args.store}: N={store.n} T={store.t} d={store.d} {store.dtype}; k={args.k}; "
          f"threads={args.threads}; load {_load()}", flush=True)
    for name, n_rows in pools:
        planted = str(Path(args.store) / f"planted-{name}.npz")
        common = {"store": str(args.store), "rows": n_rows, "planted": planted, "k": args.k, "cold": args.cold}
        gb = n_rows * dim * store.dtype.itemsize / 1e9
        floor = _run_one({**common, "mode": "floor", "reps": args.floor_reps, "max_seconds": 0}, args.threads)
        reps = floor["floor_all_s"]
        # with --cold the first read starts from an evicted page cache, the others from whatever
        # the machine's page cache kept of the previous one
        floor["floor_cold_s"] = reps[0]
        warm = sorted(reps[1:]) or reps
        floor["floor_warm_s"] = warm[len(warm) // 2]
        print(f"[{name}] N={n_rows} ({gb:.1f} GB): read floor {'cold' if args.cold else 'first'} {reps[0]:.1f} s "
              f"({gb / reps[0]:.2f} GB/s), then {floor['floor_warm_s']:.1f} s ({gb / floor['floor_warm_s']:.2f} GB/s); "
              f"all {[round(x, 1) for x in reps]}; peak anon {floor['peak_anon'] / 2**30:.2f} GiB; "
              f"page cache {_cached_gib():.1f} GiB; load {_load()}", flush=True)
        for method in args.methods.split(","):
            cap = args.max_seconds if method == "gtp" else args.max_seconds_cosamp
            res = _run_one({**common, "mode": method, "max_seconds": cap, "kwargs": {}}, args.threads)
            times = sorted(res["pass_seconds"])
            per_pass = times[len(times) // 2] if times else float("nan")  # median full pass
            row = {"pool": name, "N": n_rows, "GB": gb, "method": method, "floor_cold_s": floor["floor_cold_s"],
                   "floor_warm_s": floor["floor_warm_s"], "floor_all_s": reps, **res, "per_pass_s": per_pass,
                   "ratio_cold": per_pass / floor["floor_cold_s"], "ratio_warm": per_pass / floor["floor_warm_s"],
                   "load": os.getloadavg(), "page_cache_gib": _cached_gib(), "floor_peak_anon": floor["peak_anon"]}
            rows_out.append(row)
            extra = (f"CAPPED at {cap:.0f} s after {res['passes']} passes" if res.get("capped")
                     else f"recovered {res.get('recovered')} planted rows, rel residual "
                          f"{res.get('rel_residual', float('nan')):.3g}")
            passes_time = sum(res["pass_seconds"])
            print(f"[{name}] {method}: {res['passes']} passes ({passes_time:.0f} s in them), {res['wall_s']:.0f} s "
                  f"total, first pass {res['pass_seconds'][0] if res['pass_seconds'] else float('nan'):.1f} s, "
                  f"median pass {per_pass:.1f} s = {row['ratio_cold']:.2f} x cold floor, {row['ratio_warm']:.2f} x "
                  f"warm floor; peak anon "
                  f"{res['peak_anon'] / 2**30:.2f} GiB (base {res['base_anon'] / 2**30:.2f}), VmHWM "
                  f"{res['vmhwm'] / 2**30:.2f} GiB; {extra}; load {_load()}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("--out", type=Path, required=True)
    gen.add_argument("--n", type=int, default=270_336)
    gen.add_argument("--t", type=int, default=4)
    gen.add_argument("--d", type=int, default=8192)
    gen.add_argument("--shard-size", type=int, default=2048)
    gen.add_argument("--small-n", type=int, default=67_584)
    gen.add_argument("--planted", type=int, default=1000)
    gen.add_argument("--noise", type=float, default=0.05)
    gen.add_argument("--seed", type=int, default=0)
    rn = sub.add_parser("run")
    rn.add_argument("--store", type=Path, required=True)
    rn.add_argument("--k", type=int, default=1000)
    rn.add_argument("--small-n", type=int, default=67_584)
    rn.add_argument("--methods", default="gtp-cosamp,gtp")
    rn.add_argument("--pools", default="full,small", help="which pools: full (all N rows), small (--small-n)")
    rn.add_argument("--max-seconds", type=float, default=1500.0, help="cap for the exact gtp run (0: none)")
    rn.add_argument("--max-seconds-cosamp", type=float, default=0.0, help="cap for the gtp-cosamp run (0: none)")
    rn.add_argument("--floor-reps", type=int, default=3)
    rn.add_argument("--threads", type=int, default=1)
    rn.add_argument("--warm", dest="cold", action="store_false",
                    help="do not evict the store from the page cache before each measurement")
    rn.add_argument("--json", type=Path)
    args = parser.parse_args()
    generate(args) if args.command == "generate" else run(args)


if __name__ == "__main__":
    main()
