"""JSONL reading, chat templates and target-token masks."""

import pytest

from collect_tiny import tiny_tokenizer, write_jsonl
from gtp_kernels.collect.data import (
    IGNORE_INDEX, ExampleFormat, as_examples, collate, label_mapping, read_jsonl, tokenize_all, tokenize_causal,
)


def test_read_jsonl_ids_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "text": "the cat"}, {"text": "a dog"}])
    examples = read_jsonl(path)
    assert [e.id for e in examples] == ["x", "1"]
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 3 is not a JSON object"):
        read_jsonl(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n')
    with pytest.raises(ValueError, match="duplicate example id '1'"):
        read_jsonl(tmp_path / "c.jsonl")


def test_causal_mask_without_template():
    tokenizer = tiny_tokenizer()
    (example,) = as_examples([{"instruction": "the cat sat", "response": "on a mat"}])
    tokens = tokenize_causal(example, tokenizer)
    words = tokenizer.convert_ids_to_tokens(tokens.input_ids)
    assert words == ["[BOS]", "the", "cat", "sat", "on", "a", "mat", "[EOS]"]
    targets = [w for w, label in zip(words, tokens.labels) if label != IGNORE_INDEX]
    assert targets == ["on", "a", "mat", "[EOS]"]


def test_causal_mask_with_chat_template_and_messages():
    tokenizer = tiny_tokenizer(chat_template=True)
    record = {"messages": [{"role": "user", "content": "the red fox"}, {"role": "assistant", "content": "jumps over"}]}
    (tokens,) = tokenize_all(as_examples([record]), tokenizer, "causal_lm")
    words = tokenizer.convert_ids_to_tokens(tokens.input_ids)
    assert words == ["<user>", "the", "red", "fox", "<assistant>", "jumps", "over"]
    assert [w for w, label in zip(words, tokens.labels) if label != IGNORE_INDEX] == ["jumps", "over"]
    off = tokenize_all(as_examples([record]), tokenizer, "causal_lm", ExampleFormat(use_chat_template=False))[0]
    assert "<user>" not in tokenizer.convert_ids_to_tokens(off.input_ids)


def test_truncation_leaving_no_target_is_an_error():
    tokenizer = tiny_tokenizer()
    examples = as_examples([{"instruction": "the cat sat on a mat", "response": "fast"}])
    with pytest.raises(ValueError, match="no target token"):
        tokenize_all(examples, tokenizer, "causal_lm", max_length=4)


def test_classification_labels_and_collate():
    tokenizer = tiny_tokenizer(bert_style=True)
    examples = as_examples([{"text": "the cat", "label": "b"}, {"text": "a big red dog", "label": "a"}])
    assert label_mapping(examples) == {"a": 0, "b": 1}
    tokens = tokenize_all(examples, tokenizer, "classification")
    batch = collate(tokens, pad_token_id=0)
    assert batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="not one of"):
        tokenize_all(examples, tokenizer, "classification", label2id={"a": 0})
    with pytest.raises(ValueError, match="none of the fields"):
        tokenize_all(as_examples([{"foo": 1}]), tokenizer, "causal_lm")
