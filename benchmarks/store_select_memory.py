"""Peak memory and time of ``gtp select`` from a trajectory store vs the same rows as one .npy.

Builds an fp16 store of about --gb GB with the store writer (random rows, T checkpoints of d
dims, shard by shard) and the same rows as one memory-mapped .npy, then runs ``gtp select``
on each in a fresh subprocess per run, sampling the process's anonymous resident memory
(RssAnon in /proc/self/status; file-backed pages of the memory maps are page cache, not
counted) every 2 ms, and reports the peak above the level after imports, and the wall time.
Files go to a temp folder under --workdir, removed at the end unless --keep.

    python benchmarks/store_select_memory.py --gb 4 --k 32 --methods gtp-cosamp,gtp

--tree PATH runs an older checkout's package on the store too (e.g. a `git archive` of the
commit before the row source, for the before/after row). The machine is shared: times are
indicative; memory peaks are what the code allocates.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

RUNNER = r"""
import os, sys, threading, time, json
sys.path.insert(0, os.environ["GTP_TREE"])
import torch, numpy  # imports first: the baseline includes them
from gtp_kernels.cli import main

def rss_anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
base = rss_anon()
peak = [base]
done = threading.Event()
def poll():
    while not done.is_set():
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.002)
thread = threading.Thread(target=poll, daemon=True)
thread.start()
t0 = time.perf_counter()
rc = main(sys.argv[1:])
wall = time.perf_counter() - t0
done.set(); thread.join()
peak[0] = max(peak[0], rss_anon())
print("RESULT " + json.dumps({"rc": rc, "wall_s": wall, "base_bytes": base, "peak_extra_bytes": peak[0] - base}))
"""


def build(work: Path, gb: float, t: int, d: int, shard_size: int, seed: int) -> tuple[Path, Path, Path, int]:
    sys.path.insert(0, str(ROOT))
    from tqdm.auto import tqdm

    from gtp_kernels.collect.store import StoreSpec, TrajectoryStoreWriter

    n = int(gb * 1e9) // (t * d * 2)
    n -= n % shard_size or 0
    spec = StoreSpec(n=n, t=t, d=d, example_ids=[f"ex{i}" for i in range(n)], dtype="float16", shard_size=shard_size,
                     metadata={"checkpoint_weights": [1.0 / t] * t, "weights_applied": False})
    writer = TrajectoryStoreWriter(work / "store", spec)
    npy = np.lib.format.open_memmap(work / "rows.npy", mode="w+", dtype=np.float16, shape=(n, t * d))
    rng = np.random.default_rng(seed)
    planted = rng.choice(n, 40, replace=False)
    target = np.zeros(t * d, dtype=np.float64)
    for index in tqdm(range(spec.n_shards), desc="writing store + npy", unit="shard"):
        start, stop = spec.shard_rows(index)
        rows = rng.standard_normal((stop - start, t * d), dtype=np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        rows = rows.astype(np.float16)
        writer.write_shard(index, rows.reshape(-1, t, d))
        npy[start:stop] = rows
        for j in planted[(planted >= start) & (planted < stop)]:
            target += rows[j - start].astype(np.float64) * (1.0 + (j % 7) / 7)
    npy.flush()
    del npy
    writer.finish()
    target += 0.05 * np.linalg.norm(target) / np.sqrt(t * d) * rng.standard_normal(t * d)
    np.save(work / "target.npy", target.astype(np.float32))
    return work / "store", work / "rows.npy", work / "target.npy", n


def run(tree: Path, candidates: Path, target: Path, k: int, method: str, out: Path) -> dict:
    env = {**os.environ, "GTP_TREE": str(tree)}
    args = ["select", "--candidates", str(candidates), "--target", str(target), "--k", str(k), "--method", method,
            "--out", str(out)]
    if candidates.is_file():
        args += ["--checkpoint-weights", ",".join(["0.25"] * 4), "--num-checkpoints", "4"]
    proc = subprocess.run([sys.executable, "-c", RUNNER, *args], env=env, capture_output=True, text=True,
                          cwd=str(tree))
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(line[0][len("RESULT "):])
    summary = json.loads((out / "summary.json").read_text())
    result["selected"] = summary["selected"]
    result["relative_residual"] = summary["relative_residual"]
    result["indices"] = [json.loads(x)["index"] for x in (out / "selection.jsonl").read_text().splitlines()]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=4.0, help="store size in GB (default 4)")
    parser.add_argument("--t", type=int, default=4)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--methods", default="gtp-cosamp,gtp")
    parser.add_argument("--workdir", default="/work/tmp")
    parser.add_argument("--tree", default=None, help="also run this checkout's package on the store (before/after)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (store, rows.npy, target.npy)")
    parser.add_argument("--reuse", default=None, metavar="DIR",
                        help="use the store, rows.npy and target.npy a --keep run left in DIR (not removed)")
    args = parser.parse_args()
    if args.t != 4:
        raise SystemExit("--t must be 4 (the .npy runs pass 4 checkpoint weights)")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gtp-store-bench-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        if args.reuse:
            reuse = Path(args.reuse)
            store, npy, target = reuse / "store", reuse / "rows.npy", reuse / "target.npy"
            n = json.loads((store / "manifest.json").read_text())["N"]
        else:
            store, npy, target, n = build(work, args.gb, args.t, args.d, args.shard_size, seed=0)
        size = sum(f.stat().st_size for f in store.glob("shard-*.npy"))
        print(f"N = {n}, D = {args.t * args.d}, fp16 store {size / 1e9:.2f} GB in {len(list(store.glob('shard-*.npy')))} "
              f"shards, .npy {npy.stat().st_size / 1e9:.2f} GB; built in {time.perf_counter() - t0:.0f} s")
        subprocess.run(["cat", str(npy), *map(str, sorted(store.glob("shard-*.npy")))], stdout=subprocess.DEVNULL)
        runs = [(ROOT, "store", store), (ROOT, ".npy", npy)]
        if args.tree:
            runs.insert(0, (Path(args.tree), "store (--tree)", store))
        print(f"{'method':<11} {'source':<15} {'peak extra anon MB':>18} {'x store':>8} {'wall s':>8}  selected  rel. residual")
        for method in args.methods.split(","):
            picks = {}
            for tree, label, source in runs:
                r = run(tree, source, target, args.k, method, work / f"out-{method}-{label.split()[0].strip('.')}")
                picks[label] = r["indices"]
                print(f"{method:<11} {label:<15} {r['peak_extra_bytes'] / 1e6:>18.0f} "
                      f"{r['peak_extra_bytes'] / size:>8.3f} {r['wall_s']:>8.1f}  {r['selected']:>8}  "
                      f"{r['relative_residual']:.6f}", flush=True)
            print(f"  same selection from every source: {len({tuple(v) for v in picks.values()}) == 1}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
