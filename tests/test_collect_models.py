"""collect.models: tasks and losses, loading checks, LoRA wrapping and the per-family quirks."""
import pytest
import torch
import torch.nn.functional as F

from collect_tiny import (
    classification_records, decoder_classifier, tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_tokenizer,
)
from gtp_kernels.collect.data import as_examples, collate, pad_token_id, tokenize_all
from gtp_kernels.collect.models import (
    TASKS, align_pad_token_id, attention_implementation, batch_loss, build_model, check_lm_head_loaded,
    check_pad_token_id, check_task, check_task_fits_config, example_loss, model_name, resolve_model_dtype,
    use_eager_attention, uses_causal_attention, vocabulary_size, wrap_for_training,
)
from gtp_kernels.collect.per_example import per_example_gradients_loop
from gtp_kernels.collect.warmup import LoraSettings
from gtp_kernels.validation import InputError


def test_tasks_and_their_check():
    assert TASKS == ("causal_lm", "classification")
    assert check_task("classification") == "classification"
    with pytest.raises(InputError, match="task must be 'causal_lm' or 'classification', got 'regression'"):
        check_task("regression")


def test_example_loss_against_hand_computed_cross_entropy():
    """causal LM: mean over the shifted target tokens (-100 skipped); classification: one CE (float64)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    labels = torch.tensor([-100, 3, -100, 6, 1])
    # positions 1..4 are predicted from 0..3; targets at 1, 3, 4
    want = -(torch.log_softmax(logits[0], -1)[3] + torch.log_softmax(logits[2], -1)[6]
             + torch.log_softmax(logits[3], -1)[1]) / 3
    torch.testing.assert_close(example_loss(logits, labels, "causal_lm"), want)
    class_logits = torch.randn(4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(example_loss(class_logits, torch.tensor(2), "classification"),
                               -torch.log_softmax(class_logits, -1)[2])
    with pytest.raises(ValueError, match="task must be"):
        example_loss(class_logits, torch.tensor(2), "regression")


def test_batch_loss_is_the_token_mean_over_the_batch():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, 5, 0]])
    tokens = [(b, s) for b in range(2) for s in range(1, 4) if labels[b, s] != -100]
    want = sum(-torch.log_softmax(logits[b, s - 1].float(), -1)[labels[b, s]] for b, s in tokens) / len(tokens)
    torch.testing.assert_close(batch_loss(logits, labels, "causal_lm"), want)
    class_logits = torch.randn(3, 4, generator=gen)
    torch.testing.assert_close(batch_loss(class_logits, torch.tensor([0, 3, 1]), "classification"),
                               F.cross_entropy(class_logits, torch.tensor([0, 3, 1])))


def test_encoders_and_decoders():
    assert uses_causal_attention(tiny_llama()) and uses_causal_attention(tiny_gpt2())
    assert not uses_causal_attention(tiny_bert_classifier())


def test_model_dtype_names():
    assert resolve_model_dtype("bf16") is torch.bfloat16 and resolve_model_dtype("float32") is torch.float32
    assert resolve_model_dtype(None) is None and resolve_model_dtype(torch.float16) is torch.float16
    with pytest.raises(InputError, match="model_dtype must be one of"):
        resolve_model_dtype("int8")


def test_model_names():
    assert model_name("some/folder") == "some/folder"
    assert model_name(tiny_llama()) == "LlamaForCausalLM"
    assert model_name(tiny_llama) == "tiny_llama"


def test_causal_lm_needs_an_lm_head_before_and_after_loading():
    from transformers import BertConfig, DistilBertConfig, LlamaConfig

    check_task_fits_config(LlamaConfig(architectures=["LlamaForCausalLM"]), "causal_lm", "m")
    check_task_fits_config(BertConfig(), "classification", "m")  # only causal_lm is checked
    with pytest.raises(InputError, match="has no causal-LM class"):
        check_task_fits_config(DistilBertConfig(), "causal_lm", "m")
    with pytest.raises(InputError, match="holds a BertModel"):
        check_task_fits_config(BertConfig(architectures=["BertModel"]), "causal_lm", "m")  # encoder only
    with pytest.raises(InputError, match="LlamaForSequenceClassification.*no causal-LM head"):
        check_task_fits_config(LlamaConfig(architectures=["LlamaForSequenceClassification"]), "causal_lm", "m")
    check_lm_head_loaded(tiny_llama(), [], "causal_lm", "m")
    with pytest.raises(InputError, match="lacks 1 of the model's weights"):
        check_lm_head_loaded(tiny_llama(), ["lm_head.weight"], "causal_lm", "m")
    with pytest.raises(InputError, match="no output"):
        check_lm_head_loaded(tiny_bert_classifier(), [], "causal_lm", "m")


def test_vocabulary_size_for_the_warm_up_chance_level():
    """V: the LM head's rows of a module (also LoRA-wrapped), else the config's vocab_size, else
    the tokenizer's length; None when nothing gives V >= 2."""
    from transformers import LlamaConfig

    from collect_tiny import VOCAB_SIZE

    model = tiny_llama()
    assert model.get_output_embeddings().weight.shape[0] == VOCAB_SIZE == 44
    assert vocabulary_size(model) == 44 and vocabulary_size(model.config) == 44
    assert vocabulary_size(wrap_for_training(tiny_llama(), "causal_lm", LoraSettings(r=2, alpha=4))) == 44
    padded = tiny_llama()
    padded.resize_token_embeddings(64)  # padded rows: the softmax is over all 64
    assert vocabulary_size(padded, tiny_tokenizer()) == 64
    assert vocabulary_size(LlamaConfig(vocab_size=32000)) == 32000
    assert vocabulary_size(None, tiny_tokenizer()) == len(tiny_tokenizer()) == 44  # a factory: the tokenizer
    assert vocabulary_size(LlamaConfig(vocab_size=1), tiny_tokenizer()) == 44
    assert vocabulary_size(None) is None and vocabulary_size(torch.nn.Linear(2, 2)) is None


def test_lora_wraps_adapters_and_full_finetuning_trains_everything():
    lora = wrap_for_training(tiny_llama(), "causal_lm", LoraSettings(r=2, alpha=4, target_modules=("q_proj",)))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("q_proj.lora_" in n for n in trainable)
    classifier = wrap_for_training(tiny_bert_classifier(), "classification", LoraSettings(r=2, alpha=4))
    assert any("classifier" in n for n, p in classifier.named_parameters() if p.requires_grad)  # the head trains too
    full = wrap_for_training(tiny_llama(), "causal_lm", None)
    assert all(p.requires_grad for p in full.parameters())
    with pytest.raises(InputError, match="lora target_modules"):
        wrap_for_training(tiny_llama(), "causal_lm", LoraSettings(target_modules=("nonexistent",)))


def test_pad_token_id_of_decoder_classifiers():
    model = decoder_classifier()
    check_pad_token_id(model, 0, "classification")  # unset: nothing to compare
    assert align_pad_token_id(model, 0, "classification").config.pad_token_id == 0
    with pytest.raises(InputError, match="config.pad_token_id is 0, but batches are padded with 3"):
        check_pad_token_id(model, 3, "classification")
    check_pad_token_id(model, 3, "causal_lm")  # only classifiers pool by the pad id
    encoder = tiny_bert_classifier()
    check_pad_token_id(encoder, encoder.config.pad_token_id + 1, "classification")  # encoders do not pool by it


def test_attention_implementation_switch():
    model = tiny_llama()
    before = attention_implementation(model)
    use_eager_attention(model)
    assert attention_implementation(model) == "eager"
    use_eager_attention(model, before)
    assert attention_implementation(model) == before
    use_eager_attention(torch.nn.Linear(2, 2))  # no switch: left as it is


@pytest.mark.parametrize("source", ["module", "factory", "folder"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decoder_classifier_built_by_the_pipeline_pools_real_tokens(arch, source, tmp_path):
    """The pipeline's model-building path sets an unset config.pad_token_id to collate's pad id, so
    batched (vmap) per-example gradients equal one unpadded backward per example (float64)."""
    from gtp_kernels.collect.per_example import flatten_gradients, per_example_gradients

    tokenizer = tiny_tokenizer()
    pad_id = pad_token_id(tokenizer)
    reference = decoder_classifier(arch).double()
    assert reference.config.pad_token_id is None
    model = {"module": reference, "factory": lambda: decoder_classifier(arch)}.get(source)
    if source == "folder":
        model = tmp_path / "model"
        reference.save_pretrained(model)
    label2id = {"blue": 0, "green": 1, "red": 2}
    built = build_model(model, "classification", label2id, torch.float64, 0, False, pad_id)
    assert built.config.pad_token_id == pad_id and reference.config.pad_token_id is None  # the module passed is untouched
    tokens = tokenize_all(as_examples(classification_records(6, seed=5)), tokenizer, "classification", label2id=label2id)
    batch = collate(tokens, pad_id)
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # padded
    batched = flatten_gradients(per_example_gradients(built, batch, "classification", chunk_size=4))
    looped = flatten_gradients(per_example_gradients_loop(reference, batch, "classification"))  # pad id unset: alone, unpadded
    assert looped.abs().max() > 1e-3
    torch.testing.assert_close(batched, looped, rtol=1e-9, atol=1e-12)


