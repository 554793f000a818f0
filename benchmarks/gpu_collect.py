"""GPU: examples/s of gradient collection, batched (vmap + K1 Triton) vs one backward per example.

Standalone (run by benchmarks/gpu_check.sh, < 2 min on an H200). Model: a Llama built from a
config (hidden 768, 12 layers, ~110M parameters without embeddings, random weights), LoRA
r=128 alpha=512 on q/k/v/o (the LESS setting), bf16, sequences of 256 tokens, d = 8192.
The batched path is the pipeline's own step (per-example grads, Adam direction, K1 per
parameter); the baseline is LESS's loop (one backward per example) followed by the same K1.
A float32 correctness check (batched vs loop gradients on 3 padded examples) runs first.
Prints ``TABLE | collect | case | time | vs baseline | note |`` lines.
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


def build(dtype: torch.dtype, layers: int = 12):
    from transformers import LlamaConfig, LlamaForCausalLM

    from gtp_kernels.collect.warmup import LoraSettings, wrap_for_training

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512, pad_token_id=0)
    model = LlamaForCausalLM(config).to(dtype)
    model.set_attn_implementation("eager")
    model = wrap_for_training(model, "causal_lm", LoraSettings(r=128, alpha=512, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model.cuda().eval()


def batch_of(n: int, length: int, vocab: int = 32000, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    lengths[0] = length
    input_ids = torch.randint(1, vocab, (n, length), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    labels = torch.where(mask.bool(), input_ids, torch.full_like(input_ids, -100))
    labels[:, : length // 4] = -100  # a prompt that is not a target
    input_ids = input_ids * mask
    return {k: v.cuda() for k, v in {"input_ids": input_ids, "attention_mask": mask, "labels": labels}.items()}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    from gtp_kernels.collect.per_example import flatten_gradients, per_example_gradients, per_example_gradients_loop, trainable_parameters
    from gtp_kernels.collect.gradients import project_checkpoint
    from gtp_kernels.collect.projector import Projector

    # Correctness first, in float32 on a 2-layer copy.
    small = build(torch.float32, layers=2)
    check = batch_of(3, 64, seed=1)
    a = flatten_gradients(per_example_gradients(small, check, "causal_lm"))
    b = flatten_gradients(per_example_gradients_loop(small, check, "causal_lm"))
    rel = ((a - b).norm() / b.norm()).item()
    print(f"check: batched vs loop gradients, float32, relative error {rel:.2e}")
    if not rel < 1e-3:
        print("TABLE | collect | correctness | - | - | FAILED: batched vs loop rel err %.2e |" % rel)
        return 1
    del small

    model = build(torch.bfloat16)
    params = trainable_parameters(model)
    names = list(params)
    n_params = sum(p.numel() for p in params.values())
    d, batch_size, length = 8192, 16, 256
    projector = Projector({n: p.numel() for n, p in params.items()}, d, [0], device="cuda")
    moments = {n: (torch.zeros(p.numel(), device="cuda"), torch.full((p.numel(),), 1e-6, device="cuda")) for n, p in params.items()}
    batch = batch_of(batch_size, length, seed=2)

    def batched():
        return project_checkpoint(model, batch, "causal_lm", params, moments, names, projector, d, 0, 1.0, True, None)

    def looped():
        from gtp_kernels.collect.per_example import adam_precondition

        grads = per_example_gradients_loop(model, batch, "causal_lm")
        block = torch.zeros(batch_size, d, device="cuda")
        for n in names:
            m, v = moments[n]
            projector(adam_precondition(grads[n].reshape(batch_size, -1).float(), m, v), n, 0, block, 1.0)
        return block

    def timed(fn, repeats: int) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    # Same rows both ways (bf16 forward: loose tolerance on unit-normalised rows).
    x, y = batched(), looped()
    y = y / y.norm(dim=1, keepdim=True)
    cos = (x * y).sum(1).min().item()
    print(f"check: batched vs loop projected rows, min cosine {cos:.4f}")
    t_batched = timed(batched, 5)
    t_loop = timed(looped, 3)
    case = f"Llama-12L h768 LoRA r128 P={n_params / 1e6:.1f}M B={batch_size} S={length} d={d} bf16"
    print(f"TABLE | collect | {case} | {1e3 * t_batched / batch_size:.2f} ms/ex ({batch_size / t_batched:.0f} ex/s) | "
          f"{t_loop / t_batched:.1f}x vs one-at-a-time ({batch_size / t_loop:.0f} ex/s) | min cos {cos:.3f} |")
    return 0


if __name__ == "__main__":
    from timing import script_help

    script_help(__doc__)
    sys.exit(main())
