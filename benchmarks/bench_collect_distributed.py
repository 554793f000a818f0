"""Collection across processes on CPU: examples/s of `collect_distributed` at P = 1 and P = 2.

    python benchmarks/bench_collect_distributed.py [--examples 256] [--rounds 2] [--max-procs 2]

The launcher builds a small Llama (hidden 192, 4 layers, random weights, saved as a model
folder), a pool of causal-LM examples and one warm-up (LoRA r 8, 2 checkpoints), then runs
`torchrun --nproc_per_node=P` on this file for P = 1, 2, 1, 2, ... (alternating, so that the
machine's load falls on both sides alike). Each worker calls `collect_distributed` with the
shared checkpoints (collection only: the warm-up is the same single-process run at every P),
one thread per rank (torchrun's default), and reports its wall time and the shards it wrote.
Each run writes a fresh store; the stores of every run are compared byte for byte with the
first P = 1 store. The table gives the median examples/s per P and the ratio, for the whole
call (model load, process group, Pi materialised) and in the steady state (each rank's shards
after its first, over the time between their completions, summed over ranks); the load average
before and after is printed, since on a shared machine P ranks get less than P cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

COLLECT = dict(d=1024, batch_size=16, shard_size=32, max_length=64, progress=False)


def _records(n: int):
    import random

    from collect_tiny import WORDS

    rng = random.Random(0)
    return [{"id": f"ex{i}", "instruction": " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))),
             "response": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20)))} for i in range(n)]


def prepare(root: Path, n: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from collect_tiny import tiny_tokenizer, write_jsonl
    from gtp_kernels.collect import LoraSettings, WarmupSettings, collect_trajectory

    tokenizer = tiny_tokenizer(chat_template=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_jsonl(root / "pool.jsonl", _records(n))
    # the warm-up (and one shard, to have it done) in one process: every timed run shares it
    warm = WarmupSettings(fraction=0.1, epochs=2, learning_rate=1e-3, batch_size=8, lora=LoraSettings(r=8, alpha=16))
    collect_trajectory(str(root / "model"), root / "pool.jsonl", root / "warm_store", warmup=warm, shards=[0], **COLLECT)


def worker(root: Path, out: Path, report: Path) -> None:
    import torch.distributed as dist

    from gtp_kernels.collect.distributed import collect_distributed

    rank = int(os.environ.get("RANK", "0"))
    written: list[int] = []
    stamps: list[float] = []
    started = time.perf_counter()

    def on_shard_written(shard: int) -> None:
        written.append(shard)
        stamps.append(time.perf_counter() - started)

    store = collect_distributed(str(root / "model"), root / "pool.jsonl", out, checkpoints=root / "warm_store" / "warmup",
                                device="cpu", on_shard_written=on_shard_written, **COLLECT)
    wall = time.perf_counter() - started
    assert store.complete and not dist.is_initialized()
    report.with_name(f"{report.name}.rank{rank}").write_text(
        json.dumps({"rank": rank, "wall_s": wall, "shards": written, "stamps": stamps}))


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def launch(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="gtp_bench_dist_collect_"))
    try:
        print(f"preparing in {root} (model, {args.examples} examples, warm-up) ...", flush=True)
        prepare(root, args.examples)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        print(f"load average before (1, 5, 15 min): {_load()}  cores: {os.cpu_count()}", flush=True)
        walls: dict[int, list[float]] = {}
        rates: dict[int, list[float]] = {}
        reference = None
        counts = {}
        for round_ in range(args.rounds):
            for p in range(1, args.max_procs + 1):
                out, report = root / f"store_p{p}_r{round_}", root / f"report_p{p}_r{round_}"
                command = ["torchrun", "--standalone", f"--nproc_per_node={p}", "--", str(Path(__file__).resolve()),
                           "--worker", str(root), str(out), str(report)]
                started = time.perf_counter()
                subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                launcher_s = time.perf_counter() - started
                ranks = [json.loads(report.with_name(f"{report.name}.rank{r}").read_text()) for r in range(p)]
                wall = max(r["wall_s"] for r in ranks)
                walls.setdefault(p, []).append(wall)
                # steady state, set-up excluded: each rank's shards after its first, over the time between
                rate = sum((len(r["stamps"]) - 1) * COLLECT["shard_size"] / (r["stamps"][-1] - r["stamps"][0])
                           for r in ranks)
                rates.setdefault(p, []).append(rate)
                counts[p] = [len(r["shards"]) for r in ranks]
                files = sorted(out.glob("shard-*.npy"))
                if reference is None:
                    reference = out
                same = all(f.read_bytes() == (reference / f.name).read_bytes() for f in files) and \
                    len(files) == len(list(reference.glob("shard-*.npy")))
                print(f"round {round_} P={p}: collect {wall:.2f} s (torchrun incl. start-up {launcher_s:.1f} s), "
                      f"steady {rate:.2f} ex/s, shards per rank {counts[p]}, same bytes as the first P=1 store: {same}", flush=True)
                if not same:
                    raise SystemExit("stores differ")
                if out != reference:
                    shutil.rmtree(out)
        print(f"load average after (1, 5, 15 min): {_load()}")
        base = statistics.median(walls[1])
        print(f"\nN = {args.examples}, {COLLECT['shard_size']}-row shards, d = {COLLECT['d']}, T = 2, "
              f"batch {COLLECT['batch_size']}, one thread per rank; medians of {args.rounds}")
        steady = statistics.median(rates[1])
        print("| P | collect s | examples/s (whole call) | vs P = 1 | steady examples/s | vs P = 1 | shards per rank |")
        print("|---|---|---|---|---|---|---|")
        for p in sorted(walls):
            median, rate = statistics.median(walls[p]), statistics.median(rates[p])
            print(f"| {p} | {median:.2f} | {args.examples / median:.2f} | {base / median:.2f}x | {rate:.2f} | "
                  f"{rate / steady:.2f}x | {counts[p]} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-procs", type=int, default=2)
    launch(parser.parse_args())


if __name__ == "__main__":
    main()
