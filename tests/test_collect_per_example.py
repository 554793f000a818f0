"""Batched per-example gradients equal one backward pass per example; Adam preconditioning formula."""
import pytest
import torch

from collect_tiny import classification_records, instruction_records, tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_tokenizer
from gtp_kernels.collect.data import as_examples, collate, pad_token_id, tokenize_all
from gtp_kernels.collect.per_example import (
    adam_precondition, flatten_gradients, per_example_gradients, per_example_gradients_loop, trainable_parameters,
)
from gtp_kernels.collect.warmup import LoraSettings, wrap_for_training

CASES = {
    "llama-causal": (tiny_llama, "causal_lm", dict(chat_template=True)),
    "gpt2-causal": (tiny_gpt2, "causal_lm", dict()),
    "bert-classifier": (tiny_bert_classifier, "classification", dict(bert_style=True)),
}


def _batch(task, tokenizer, n=6, seed=0):
    records = instruction_records(n, seed) if task == "causal_lm" else classification_records(n, seed)
    batch = collate(tokenize_all(as_examples(records), tokenizer, task), pad_token_id(tokenizer))
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max(), "the batch must contain padding for this test to mean anything"
    return batch


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_equals_loop_full_model_float64(case):
    make, task, tok_kwargs = CASES[case]
    model = make(dtype=torch.float64)
    batch = _batch(task, tiny_tokenizer(**tok_kwargs))
    batched = per_example_gradients(model, batch, task, chunk_size=4)  # chunking across a batch of 6
    looped = per_example_gradients_loop(model, batch, task)
    assert list(batched) == list(looped) == list(trainable_parameters(model))
    a, b = flatten_gradients(batched), flatten_gradients(looped)
    assert a.shape == (6, sum(p.numel() for p in model.parameters()))
    assert b.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", ["llama-causal", "bert-classifier"])
def test_batched_equals_loop_lora_trainable_only(case):
    make, task, tok_kwargs = CASES[case]
    model = wrap_for_training(make(dtype=torch.float64), task, LoraSettings(r=4, alpha=8)).eval()
    # LoRA B starts at zero, which makes A's gradient zero: move away from the init first.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    names = list(trainable_parameters(model))
    assert names and all("lora_" in n or "classifier" in n or "score" in n for n in names)
    batch = _batch(task, tiny_tokenizer(**tok_kwargs), seed=3)
    batched = per_example_gradients(model, batch, task)
    looped = per_example_gradients_loop(model, batch, task)
    assert list(batched) == names
    a, b = flatten_gradients(batched), flatten_gradients(looped)
    assert a.shape[1] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(g.abs().max() > 0 for n, g in batched.items() if "lora_A" in n)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_gradients_at_other_parameter_values():
    """params= evaluates at given values without touching the module's own weights."""
    model = tiny_llama(dtype=torch.float64)
    batch = _batch("causal_lm", tiny_tokenizer())
    shifted = {n: p + 0.01 * torch.randn_like(p) for n, p in trainable_parameters(model).items()}
    got = flatten_gradients(per_example_gradients(model, batch, "causal_lm", params=shifted))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(shifted[n])
    want = flatten_gradients(per_example_gradients_loop(model, batch, "causal_lm"))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_adam_precondition_hand_computed():
    g = torch.tensor([[0.5, -2.0, 0.0], [1.0, 1.0, -1.0]], dtype=torch.float64)
    m = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64)
    v = torch.tensor([0.01, 0.04, 0.0], dtype=torch.float64)
    got = adam_precondition(g, m, v)
    # Row 0 by hand: m' = 0.9 m + 0.1 g ; v' = 0.999 v + 0.001 g^2 ; m' / sqrt(v' + 1e-8)
    m0 = [0.09 + 0.05, 0.18 - 0.2, -0.27 + 0.0]
    v0 = [0.00999 + 0.00025, 0.03996 + 0.004, 0.0 + 0.0]
    want0 = torch.tensor([m0[i] / (v0[i] + 1e-8) ** 0.5 for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(got[0], want0, rtol=1e-12, atol=0)
    m1 = [0.09 + 0.1, 0.18 + 0.1, -0.27 - 0.1]
    v1 = [0.00999 + 0.001, 0.03996 + 0.001, 0.001]
    want1 = torch.tensor([m1[i] / (v1[i] + 1e-8) ** 0.5 for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(got[1], want1, rtol=1e-12, atol=0)


def test_adam_precondition_shape_error():
    with pytest.raises(ValueError, match="moment shape"):
        adam_precondition(torch.zeros(2, 3), torch.zeros(4), torch.zeros(4))


def _left_pad(batch):
    """The same examples, padding moved to the left (labels and mask moved with their tokens)."""
    length = batch["input_ids"].shape[1]
    out = {k: v.clone() for k, v in batch.items()}
    for row in range(length and batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        for key in ("input_ids", "attention_mask") + (("labels",) if batch["labels"].dim() == 2 else ()):
            out[key][row] = torch.roll(batch[key][row], length - n)
    return out


def tiny_decoder_classifier(arch="llama", pad=None, seed=0, dtype=torch.float32):
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    from collect_tiny import VOCAB_SIZE

    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, num_labels=3, pad_token_id=pad)
        return LlamaForSequenceClassification(config).to(dtype).eval()
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=128, num_labels=3, pad_token_id=pad)
    return GPT2ForSequenceClassification(config).to(dtype).eval()


@pytest.mark.parametrize("case", ["llama-causal", "gpt2-causal"])
def test_left_padded_batch_equals_loop(case):
    """Left padding: explicit position_ids keep absolute-position models (GPT-2) right too."""
    make, task, tok_kwargs = CASES[case]
    model = make(dtype=torch.float64)
    right = _batch(task, tiny_tokenizer(**tok_kwargs), n=5, seed=7)
    left = _left_pad(right)
    assert not torch.equal(left["attention_mask"], right["attention_mask"])
    looped = flatten_gradients(per_example_gradients_loop(model, right, task))
    assert looped.abs().max() > 1e-3
    torch.testing.assert_close(flatten_gradients(per_example_gradients_loop(model, left, task)), looped, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(flatten_gradients(per_example_gradients(model, left, task, chunk_size=2)), looped,
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_decoder_classifier(arch):
    model = tiny_decoder_classifier(arch, pad=0, dtype=torch.float64)
    right = _batch("classification", tiny_tokenizer(), n=5, seed=2)
    looped = flatten_gradients(per_example_gradients_loop(model, right, "classification"))
    for batch in (right, _left_pad(right)):
        torch.testing.assert_close(flatten_gradients(per_example_gradients(model, batch, "classification")), looped,
                                   rtol=1e-9, atol=1e-12)


def test_refusals_padding_side_and_unset_pad_token_id():
    # A bidirectional encoder is refused a left-padded batch (some derive positions from the pad id).
    batch = _batch("classification", tiny_tokenizer(bert_style=True))
    with pytest.raises(ValueError, match="not right-padded"):
        per_example_gradients(tiny_bert_classifier(), _left_pad(batch), "classification")
    # A decoder classifier without config.pad_token_id would pool a padding position: refused.
    with pytest.raises(ValueError, match="pad_token_id"):
        per_example_gradients(tiny_decoder_classifier("llama", pad=None), _batch("classification", tiny_tokenizer()), "classification")
