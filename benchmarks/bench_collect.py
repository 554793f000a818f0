"""Collection throughput on CPU: batched per-example gradients (vmap) vs one backward per example.

Run as a script for a side-by-side table (examples/s and the ratio), or under pytest-benchmark:

    python benchmarks/bench_collect.py [--batch-size 16] [--examples 64]
    python -m pytest benchmarks/bench_collect.py --benchmark-only

Model: a Llama built from a config (hidden 64, 2 layers, random weights), LoRA r=8 on the
attention projections (the LESS setting), causal-LM examples of 10-40 tokens, float32. The
"+ K1" rows add the projection to d=1024 as the pipeline does it on CPU: Pi materialised once
(``projection_matrix``) or regenerated every batch by ``project``'s torch path.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import torch  # noqa: E402

from collect_tiny import WORDS, tiny_tokenizer  # noqa: E402
from gtp_kernels.collect.data import as_examples, collate, pad_token_id, tokenize_all  # noqa: E402
from gtp_kernels.collect.per_example import per_example_gradients, per_example_gradients_loop, trainable_parameters  # noqa: E402
from gtp_kernels.collect.warmup import LoraSettings, wrap_for_training  # noqa: E402


def _setup(n_examples: int, lora: bool = True, seed: int = 0):
    import random

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("eager")
    if lora:
        model = wrap_for_training(model, "causal_lm", LoraSettings(r=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    model.eval()
    rng = random.Random(seed)
    records = [{"instruction": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25))),
                "response": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))} for _ in range(n_examples)]
    tokens = tokenize_all(as_examples(records), tokenizer, "causal_lm")
    return model, tokens, pad_token_id(tokenizer)


def _batches(tokens, pad_id, batch_size):
    return [collate(tokens[i : i + batch_size], pad_id) for i in range(0, len(tokens), batch_size)]


def run_batched(model, batches, projector=None):
    names = list(trainable_parameters(model))
    for batch in batches:
        grads = per_example_gradients(model, batch, "causal_lm")
        if projector is not None:
            _project(grads, names, projector)


def run_loop(model, batches, projector=None):
    names = list(trainable_parameters(model))
    for batch in batches:
        grads = per_example_gradients_loop(model, batch, "causal_lm")
        if projector is not None:
            _project(grads, names, projector)


def make_projector(model, d: int, cache_mb: float):
    """The pipeline's K1 step (Pi cached as a dense matrix on CPU when cache_mb allows)."""
    from gtp_kernels.collect.projector import Projector

    params = trainable_parameters(model)
    return Projector({n: p.numel() for n, p in params.items()}, d, [0], device="cpu", cache_mb=cache_mb)


def _project(grads, names, projector):
    rows = next(iter(grads.values())).shape[0]
    out = torch.zeros(rows, projector.d)
    for name in names:
        projector(grads[name].reshape(rows, -1), name, 0, out, 1.0)
    return out


def _projection_available() -> bool:
    try:
        import gtp_kernels.ops.project  # noqa: F401
    except ImportError:
        return False
    return True


def _rates(fns, model, batches, n_examples, repeats, **kw) -> list[float]:
    """Examples/s of each function, runs interleaved and the best run kept (the machine may be
    shared: interleaving exposes every function to the same background load)."""
    for fn in fns:
        fn(model, batches[:1], **kw)  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for index, fn in enumerate(fns):
            start = time.perf_counter()
            fn(model, batches, **kw)
            best[index] = min(best[index], time.perf_counter() - start)
    return [n_examples / b for b in best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.examples} examples, batch {args.batch_size}")
    print(f"{'case':<48}{'batched ex/s':>14}{'loop ex/s':>12}{'ratio':>8}")
    for lora in (True, False):
        model, tokens, pad_id = _setup(args.examples, lora)
        batches = _batches(tokens, pad_id, args.batch_size)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        cases = [(None, "")]
        if _projection_available():
            cases.append((make_projector(model, 1024, 2048), " + K1 d=1024 (Pi cached)"))
            if lora:
                cases.append((make_projector(model, 1024, 0), " + K1 d=1024 (Pi generated)"))
        for projector, suffix in cases:
            batched, loop = _rates([run_batched, run_loop], model, batches, args.examples, args.repeats, projector=projector)
            label = f"{'LoRA' if lora else 'full'} P={n_params}{suffix}"
            print(f"{label:<48}{batched:>14.1f}{loop:>12.1f}{batched / loop:>7.2f}x")


# pytest-benchmark entry points (not collected by `pytest tests`).
def test_batched_lora(benchmark):
    model, tokens, pad_id = _setup(32)
    batches = _batches(tokens, pad_id, 16)
    benchmark(run_batched, model, batches)


def test_loop_lora(benchmark):
    model, tokens, pad_id = _setup(32)
    batches = _batches(tokens, pad_id, 16)
    benchmark(run_loop, model, batches)


if __name__ == "__main__":
    main()
