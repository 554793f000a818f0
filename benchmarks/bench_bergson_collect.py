"""Collection side by side, CPU: gtp's per-example gradients + K1 projection vs bergson.collect_gradients,
on the same random GPT-2 (built from a config, no download) and the same token sequences, one checkpoint.

    python benchmarks/bench_bergson_collect.py --examples 96 --layers 2 --hidden 128 --bergson-dim 16

gtp side: ``per_example_gradients`` (vmap, as `gtp collect`) then ``Projector`` (K1, Rademacher) to
``d`` features per checkpoint, over the same weight matrices bergson projects (``--gtp-params same``:
the blocks' attention and MLP weights, no biases, embeddings or layer norms) or over every parameter
(``--gtp-params all``). ``d`` defaults to bergson's total width, so both write the same number of
features per example. bergson side: ``collect_gradients`` with ``GradientProcessor(projection_dim=p)``:
per module, the (out x in) gradient is projected on both sides to p x p (Rademacher, JL scale), so
d = p^2 x modules; it also writes its memmapped index and data.hf to a temporary directory (timed).
Each side runs in its own process (peak RSS is its own: ru_maxrss); the best of ``--repeats`` runs
is kept; the sides alternate. Prints examples/s (wall), CPU seconds per example (process time,
all threads: the figure to trust on a shared machine), peak RSS and the projection, as a table last.
``--side gtp|bergson`` runs one side in this process and prints its JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def _model_and_data(args):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=args.vocab, n_positions=args.max_length, n_embd=args.hidden, n_layer=args.layers,
                        n_head=args.heads, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.max_length // 2, args.max_length + 1, (args.examples,), generator=generator)
    sequences = [torch.randint(1, args.vocab, (int(n),), generator=generator).tolist() for n in lengths]
    return model, sequences


def _bergson_modules(model):
    """The modules bergson hooks on GPT-2: the blocks' Conv1D layers (c_attn, c_proj, c_fc, mlp.c_proj)."""
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in model.named_modules() if isinstance(module, Conv1D)]


def _run_gtp(args) -> dict:
    import torch

    from gtp_kernels.collect.per_example import per_example_gradients
    from gtp_kernels.collect.projector import Projector

    model, sequences = _model_and_data(args)
    model.set_attn_implementation("eager")  # as `gtp collect` runs collection (vmap has no SDPA batching rule)
    if args.gtp_params == "same":
        wanted = {f"{m}.weight" for m in _bergson_modules(model)}
        params = {n: p for n, p in model.named_parameters() if n in wanted}
    else:
        params = dict(model.named_parameters())
    names = list(params)
    d = args.d or args.bergson_dim**2 * len(_bergson_modules(model))
    projector = Projector({n: p.numel() for n, p in params.items()}, d, [0], device="cpu",
                          cache_mb=float(args.cache_mb))
    batches = []
    for start in range(0, len(sequences), args.batch_size):
        chunk = sequences[start : start + args.batch_size]
        length = max(len(s) for s in chunk)
        input_ids = torch.zeros((len(chunk), length), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for row, s in enumerate(chunk):
            input_ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
            labels[row, : len(s)] = torch.tensor(s)
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    best, best_cpu, best_grad_cpu = float("inf"), 0.0, 0.0
    for _ in range(args.repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        grad_cpu = 0.0
        rows_out = []
        for batch in batches:
            grad_started = time.process_time()
            grads = per_example_gradients(model, batch, "causal_lm", params=params)
            grad_cpu += time.process_time() - grad_started
            rows = batch["input_ids"].shape[0]
            out = torch.zeros(rows, d)
            for name in names:
                projector(grads[name].reshape(rows, -1), name, 0, out, 1.0)
            rows_out.append(out)
        wall = time.perf_counter() - started
        if wall < best:
            best, best_cpu, best_grad_cpu = wall, time.process_time() - cpu_started, grad_cpu
    features = torch.cat(rows_out)
    assert features.shape == (len(sequences), d) and bool(features.abs().sum() > 0)
    return {"examples_per_s": len(sequences) / best, "wall_s": best, "cpu_s_per_example": best_cpu / len(sequences),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "d": d,
            "gradient_cpu_s_per_example": best_grad_cpu / len(sequences),
            "gradient_width": sum(p.numel() for p in params.values()), "tensors": len(names),
            "projection": f"K1 Rademacher, whole gradient ({len(names)} tensors) -> d={d}"
                          + (", Pi cached" if projector.cache else ", Pi generated in kernel")}


def _run_bergson(args) -> dict:
    import numpy as np
    from datasets import Dataset

    from bergson import GradientProcessor, IndexConfig, collect_gradients, load_gradients

    model, sequences = _model_and_data(args)
    # an id column besides input_ids: bergson drops input_ids from its saved data and cannot add its loss
    # column to a dataset left with no columns (as in tests/test_integration_bergson.py)
    data = Dataset.from_dict({"id": [str(i) for i in range(len(sequences))], "input_ids": sequences})
    modules = _bergson_modules(model)
    best, best_cpu = float("inf"), 0.0
    root = tempfile.mkdtemp(prefix="bench_bergson_")
    try:
        for repeat in range(args.repeats):
            path = os.path.join(root, f"run{repeat}")
            cfg = IndexConfig(run_path=path, projection_dim=args.bergson_dim)
            started, cpu_started = time.perf_counter(), time.process_time()
            collect_gradients(model, data, GradientProcessor(projection_dim=args.bergson_dim), cfg)
            wall = time.perf_counter() - started
            if wall < best:
                best, best_cpu = wall, time.process_time() - cpu_started
            shutil.move(cfg.partial_run_path, path)  # what bergson's build command does after collection
        info = json.loads(open(os.path.join(path, "info.json")).read())
        rows = np.array(load_gradients(path))
        assert rows.shape[0] == len(sequences) and np.abs(rows).sum() > 0
        d = int(sum(info["grad_sizes"].values()))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    width = sum(model.get_submodule(m).weight.numel() for m in modules)
    return {"examples_per_s": len(sequences) / best, "wall_s": best, "cpu_s_per_example": best_cpu / len(sequences),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "d": d,
            "gradient_width": width, "tensors": len(info["grad_sizes"]),
            "projection": f"per module p x p, p={args.bergson_dim} Rademacher JL ({len(info['grad_sizes'])} modules) -> d={d}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=96, help="token sequences (default 96)")
    parser.add_argument("--max-length", type=int, default=32, help="longest sequence; lengths uniform in [L/2, L]")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16, help="gtp side's batch (bergson batches by tokens)")
    parser.add_argument("--bergson-dim", type=int, default=16, help="bergson projection_dim p (p x p per module)")
    parser.add_argument("--d", type=int, default=0, help="gtp's d per checkpoint (default: bergson's total width)")
    parser.add_argument("--gtp-params", choices=("same", "all"), default="same",
                        help="gtp differentiates bergson's weight matrices (same) or every parameter (all)")
    parser.add_argument("--cache-mb", type=int, default=1024,
                        help="gtp's budget for a cached dense Pi on CPU (as collect's; default 1024 MB)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each side's process")
    parser.add_argument("--side", choices=("gtp", "bergson"), default=None, help="run one side here, print JSON")
    args = parser.parse_args()
    if args.side:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(_run_gtp(args) if args.side == "gtp" else _run_bergson(args)))
        return
    passed = [a for a in sys.argv[1:]]
    results = {}
    for side in ("gtp", "bergson"):
        run = subprocess.run([sys.executable, __file__, *passed, "--side", side], stdout=subprocess.PIPE, text=True,
                             check=True)
        results[side] = json.loads(run.stdout.strip().splitlines()[-1])
    g, b = results["gtp"], results["bergson"]
    print(f"random GPT-2: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; {args.examples} sequences "
          f"of {args.max_length // 2}-{args.max_length} tokens; {args.threads} thread(s); best of {args.repeats}")
    print("| side | examples/s (wall) | CPU s / example | peak RSS (MiB) | gradient width | projection |")
    print("|---|---|---|---|---|---|")
    for side, r in results.items():
        print(f"| {side} | {r['examples_per_s']:.1f} | {r['cpu_s_per_example'] * 1e3:.1f} ms | {r['peak_rss_mib']:.0f} | "
              f"{r['gradient_width']:,} | {r['projection']} |")
    print(f"gtp: per-example gradients {g['gradient_cpu_s_per_example'] * 1e3:.1f} ms CPU / example, "
          f"K1 projection {(g['cpu_s_per_example'] - g['gradient_cpu_s_per_example']) * 1e3:.1f} ms; "
          "bergson's figure is its whole collect_gradients call (gradients, projection, index written)")
    print(f"gtp / bergson: {g['examples_per_s'] / b['examples_per_s']:.2f}x examples/s, "
          f"{g['cpu_s_per_example'] / b['cpu_s_per_example']:.2f}x CPU per example, "
          f"peak RSS {g['peak_rss_mib'] / b['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
