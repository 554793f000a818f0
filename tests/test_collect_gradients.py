"""collect.gradients: one checkpoint's block (normalised, scaled) and a shard's rows, batch-independent."""
import torch

from collect_tiny import instruction_records, tiny_llama, tiny_tokenizer
from gtp_kernels.collect.data import as_examples, collate, pad_token_id, tokenize_all
from gtp_kernels.collect.gradients import project_checkpoint, shard_rows
from gtp_kernels.collect.per_example import flatten_gradients, per_example_gradients_loop, trainable_parameters
from gtp_kernels.collect.projector import Projector
from gtp_kernels.collect.warmup import LoraSettings, wrap_for_training
from gtp_kernels.ops.project import projection_matrix


def _setup():
    tokenizer = tiny_tokenizer()
    tokens = tokenize_all(as_examples(instruction_records(5, seed=3)), tokenizer, "causal_lm")
    model = wrap_for_training(tiny_llama(dtype=torch.float64), "causal_lm", LoraSettings(r=2, alpha=4)).eval()
    params = trainable_parameters(model)
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters values so every gradient is non-zero
        for p in params.values():
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    return tokenizer, tokens, model, params


def test_block_is_the_normalised_scaled_projection_of_the_gradients():
    """block_i = c * P g_i / ||P g_i|| against looped float64 gradients projected by the dense Pi."""
    tokenizer, tokens, model, params = _setup()
    names = list(params)
    projector = Projector({n: p.numel() for n, p in params.items()}, 8, [3], backend="torch")
    batch = collate(tokens, pad_token_id(tokenizer))
    for normalise in (True, False):
        block = project_checkpoint(model, batch, "causal_lm", params, None, names, projector, 8, 3, 0.5, normalise, None)
        flat = flatten_gradients(per_example_gradients_loop(model, batch, "causal_lm")).double()
        projected = flat @ projection_matrix(8, flat.shape[1], 3, dtype=torch.float64).T
        if normalise:
            projected = projected / projected.norm(dim=1, keepdim=True)
        torch.testing.assert_close(block.double(), 0.5 * projected, rtol=1e-4, atol=1e-6)


def test_shard_rows_do_not_depend_on_the_batching():
    tokenizer, tokens, model, params = _setup()
    names = list(params)
    projector = Projector({n: p.numel() for n, p in params.items()}, 8, [0, 1], backend="torch", cache_mb=16)
    states = [params, {n: 2 * p for n, p in params.items()}]
    done = []
    args = ("causal_lm", pad_token_id(tokenizer))
    rest = (states, None, names, projector, 8, [0, 1], [0.6, 0.8], True, None, torch.device("cpu"))
    one = shard_rows(model, tokens, *args, 5, *rest)
    batched = shard_rows(model, tokens, *args, 2, *rest, on_batch=done.append)
    assert one.shape == (5, 2, 8) and done == [2, 2, 1]
    torch.testing.assert_close(batched, one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one.norm(dim=2), torch.tensor([[0.6, 0.8]] * 5), rtol=1e-5, atol=1e-6)
