"""collect.calibration: the calibration batch leaves the model as found; the plan's estimate arithmetic."""
from types import SimpleNamespace

import torch

from collect_tiny import instruction_records, tiny_llama, tiny_tokenizer
from gtp_kernels.collect.calibration import adapter_description, calibrate, plan_lines
from gtp_kernels.collect.data import as_examples, pad_token_id, tokenize_all
from gtp_kernels.collect.per_example import trainable_parameters
from gtp_kernels.collect.projector import Projector
from gtp_kernels.collect.warmup import LoraSettings, wrap_for_training


def test_calibrate_times_one_batch_and_leaves_the_model_as_found():
    tokenizer = tiny_tokenizer()
    tokenized = tokenize_all(as_examples(instruction_records(6)), tokenizer, "causal_lm")
    model = wrap_for_training(tiny_llama(), "causal_lm", LoraSettings(r=2, alpha=4)).train()
    params = trainable_parameters(model)
    projector = Projector({n: p.numel() for n, p in params.items()}, 8, [0], backend="torch")
    rng_before = torch.random.get_rng_state()
    result = calibrate(model, tokenized, "causal_lm", pad_token_id(tokenizer), 4, params, None, list(params), projector,
                       8, 0, True, None, torch.device("cpu"))
    assert result["examples"] == 4 and result["padded_tokens"] >= sum(len(x.input_ids) for x in tokenized[:4])
    assert all(result[key] >= 0 for key in ("project_s", "gradients_s", "train_step_s"))
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.random.get_rng_state(), rng_before)


def _example(length):
    return SimpleNamespace(input_ids=list(range(length)))


def test_plan_lines_estimate():
    """Per batch and checkpoint: gradient seconds per padded token x (rows x longest) plus K1 (per
    example when Pi is cached, per batch otherwise); the warm-up: epochs x examples x mean tokens."""
    tokenized = [_example(n) for n in (4, 8, 2, 6, 10)]
    calibration = {"examples": 2, "padded_tokens": 16, "gradients_s": 1.6, "project_s": 0.2, "train_step_s": 0.8}
    for cached in (True, False):
        lines = plan_lines(calibration, tokenized, 5, 3, 16, 32, 2, 4, [0, 1], 2, 1234, "LoRA r=2", "adam",
                           None, SimpleNamespace(cached=cached), torch.device("cpu"))
        # batches of shard 0: [4, 8], [2, 6]; shard 1: [10]; 0.1 s per padded token
        grads = 0.1 * (2 * 8 + 2 * 6 + 1 * 10)
        k1 = 0.2 * (1 + 1 + 0.5) if cached else 0.2 * 3
        seconds = 3 * (grads + k1)
        assert lines[0].startswith("plan: N=5 examples (mean 6, max 10 tokens; max_length 32), T=3 checkpoints, d=16")
        assert "2 of 2 shard(s) of 4 rows to write (5 examples)" in lines[0] and "1,234 trainable parameters (LoRA r=2)" in lines[0]
        assert f"({5 / seconds:.2f} examples/s)" in lines[1] and "warm-up" not in lines[1]
    warmup = SimpleNamespace(fraction=0.4, epochs=2)
    lines = plan_lines(calibration, tokenized, 5, 3, 16, 32, 2, 4, [0], 2, 1, "full fine-tuning", "adam", warmup,
                       SimpleNamespace(cached=False), torch.device("cpu"))
    assert "warm-up ~1 s, " in lines[1]  # 2 epochs x 2 examples x 6 tokens (the mean) x 0.05 s per token = 1.2 s


def test_adapter_description():
    assert adapter_description(LoraSettings(r=8)) == "LoRA r=8"
    assert adapter_description(None) == "full fine-tuning"
