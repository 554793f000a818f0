"""Examples as JSON lines, formatted (chat template when the tokenizer has one) and tokenised.

Each JSONL line is one example. The fields read are configurable (:class:`ExampleFormat`):

- ``messages``: a list of ``{"role", "content"}`` turns (the Tulu/LESS layout); the last turn is
  the response, everything before it the prompt;
- ``prompt_field`` / ``response_field`` (default ``instruction`` / ``response``; an optional
  ``input_field`` is appended to the prompt);
- ``text_field`` (default ``text``): plain text, every token a target;
- ``label_field`` (default ``label``) for sequence classification.

Causal LM targets: only response tokens count in the loss (prompt tokens get label -100), so the
per-example loss is the mean over the example's own target tokens. Ids come from ``id_field``
when present, else ``"<line number>"``, and travel into the trajectory store so a selection can
be written back as the examples themselves.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from ..validation import InputError

IGNORE_INDEX = -100
TASKS = ("causal_lm", "classification")


@dataclass(frozen=True)
class ExampleFormat:
    """Which JSON fields hold what, and how a prompt and a response are joined without a template."""

    id_field: str = "id"
    messages_field: str = "messages"
    prompt_field: str = "instruction"
    input_field: str = "input"
    response_field: str = "response"
    text_field: str = "text"
    label_field: str = "label"
    separator: str = "\n"
    use_chat_template: bool = True


@dataclass
class Example:
    """One raw example: its id and its JSON record."""

    id: str
    record: dict[str, Any]


@dataclass
class TokenizedExample:
    """Token ids plus either per-token labels (causal LM, -100 = not a target) or a class id."""

    id: str
    input_ids: list[int]
    labels: list[int] | None = None
    label: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_jsonl(path: str | os.PathLike, fmt: ExampleFormat = ExampleFormat()) -> list[Example]:
    """Read a JSON-lines file; blank lines are skipped, ids must be unique.

    A missing, unreadable or malformed file is an :class:`InputError` naming the file (and line).
    """
    examples: list[Example] = []
    from ..integrations.hf_datasets import is_dataset_path  # a saved dataset or parquet file also reads here
    if is_dataset_path(path):
        from ..integrations.hf_datasets import read_dataset_examples

        return as_examples([Example(i, r) for i, r in read_dataset_examples(path, fmt.id_field)], fmt)
    if os.path.isdir(path):
        raise InputError(f"data: {path} is a folder, not a JSON-lines file or a saved dataset")
    try:
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise InputError(f"data: {path} line {line_number + 1} is not valid JSON ({error.msg})") from None
                except RecursionError:  # json's decoder recurses once per nesting level
                    raise InputError(f"data: {path} line {line_number + 1} is nested too deeply to read as JSON "
                                     f"(over ~{sys.getrecursionlimit()} levels)") from None
                if not isinstance(record, dict):
                    raise InputError(f"data: {path} line {line_number + 1} is not a JSON object")
                example_id = str(record[fmt.id_field]) if fmt.id_field in record else str(line_number)
                examples.append(Example(example_id, record))
    except FileNotFoundError:
        raise InputError(f"data: file {path} does not exist") from None
    except UnicodeDecodeError as error:
        raise InputError(f"data: {path} is not UTF-8 text ({error.reason} at byte {error.start}); expected JSON lines") from None
    except OSError as error:
        raise InputError(f"data: cannot read {path} ({error.strerror or error})") from None
    return as_examples(examples, fmt)


def as_examples(data: Iterable[Example | dict[str, Any]], fmt: ExampleFormat = ExampleFormat()) -> list[Example]:
    """Accept Examples or plain dicts (ids from ``id_field`` or the position); check ids are unique."""
    examples = []
    for position, item in enumerate(data):
        if isinstance(item, Example):
            examples.append(item)
        elif isinstance(item, dict):
            examples.append(Example(str(item.get(fmt.id_field, position)), item))
        else:
            raise TypeError(f"data: items must be dicts or Examples, got {type(item).__name__}")
    seen: set[str] = set()
    for example in examples:
        if example.id in seen:
            raise InputError(f"data: duplicate example id {example.id!r} (ids come from the {fmt.id_field!r} field)")
        seen.add(example.id)
    return examples


def _prompt_response(record: dict[str, Any], fmt: ExampleFormat) -> tuple[list[dict[str, str]] | None, str | None, str | None]:
    """Return (messages, prompt, response); messages is None for the text-only layout."""
    if fmt.messages_field in record:
        messages = record[fmt.messages_field]
        if not isinstance(messages, list) or not messages:
            raise InputError(f"data: field {fmt.messages_field!r} must be a non-empty list of turns")
        for turn in messages:
            if not isinstance(turn, dict) or "content" not in turn:
                raise InputError(f"data: field {fmt.messages_field!r} must hold {{'role', 'content'}} turns, got {str(turn)[:60]!r}")
        return messages, None, None
    if fmt.prompt_field in record and fmt.response_field in record:
        prompt = str(record[fmt.prompt_field])
        if record.get(fmt.input_field):
            prompt = prompt + fmt.separator + str(record[fmt.input_field])
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record[fmt.response_field])}]
        return messages, prompt, str(record[fmt.response_field])
    if fmt.text_field in record:
        return None, None, str(record[fmt.text_field])
    raise InputError(
        f"data: a record has none of the fields {fmt.messages_field!r}, "
        f"{fmt.prompt_field!r}+{fmt.response_field!r} or {fmt.text_field!r}: {sorted(record)[:8]}"
    )


def check_examples(examples: Sequence[Example], task: str, fmt: ExampleFormat = ExampleFormat()) -> None:
    """Check every record has the fields ``task`` reads (no tokenizer needed), naming the first
    that does not; :func:`collect_trajectory` runs this before any model or tokenizer loads."""
    if task not in TASKS:
        raise InputError(f"task must be one of {TASKS}, got {task!r}")
    for example in examples:
        try:
            if task == "causal_lm":
                _prompt_response(example.record, fmt)
            else:
                _classification_fields(example, fmt)
        except InputError as error:
            message = str(error)
            if repr(example.id) not in message:
                message = message.replace("data: ", f"data: example {example.id!r}: ", 1)
            raise InputError(message) from None


def _classification_fields(example: Example, fmt: ExampleFormat) -> tuple[str, str]:
    record = example.record
    if fmt.label_field not in record:
        raise InputError(f"data: example {example.id!r} has no label field {fmt.label_field!r}")
    text = record.get(fmt.text_field, record.get(fmt.prompt_field))
    if text is None:
        raise InputError(f"data: example {example.id!r} has no {fmt.text_field!r} or {fmt.prompt_field!r} field")
    return str(text), str(record[fmt.label_field])


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def tokenize_causal(example: Example, tokenizer: Any, fmt: ExampleFormat = ExampleFormat(), max_length: int = 512) -> TokenizedExample:
    """Tokenise for a causal LM; labels mask every prompt token with -100.

    With a chat template the prompt is ``apply_chat_template(turns[:-1], add_generation_prompt=True)``
    and the full text the template over all turns; without one, turns are joined by ``separator``
    and the response ends with the EOS token. The prompt length in tokens decides the mask
    (as LESS does), and truncation keeps the first ``max_length`` tokens.
    """
    messages, _, text = _prompt_response(example.record, fmt)
    if messages is None:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_length]
        return TokenizedExample(example.id, ids, labels=list(ids))
    if fmt.use_chat_template and _has_chat_template(tokenizer):
        prompt_text = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    else:
        prompt_text = fmt.separator.join(str(turn["content"]) for turn in messages[:-1]) + fmt.separator
        prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
        full_ids = tokenizer(prompt_text + str(messages[-1]["content"]), add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            full_ids = list(full_ids) + [tokenizer.eos_token_id]
    full_ids = list(full_ids)[:max_length]
    n_prompt = min(len(prompt_ids), len(full_ids))
    labels = [IGNORE_INDEX] * n_prompt + full_ids[n_prompt:]
    return TokenizedExample(example.id, full_ids, labels=labels)


def tokenize_classification(
    example: Example, tokenizer: Any, label2id: dict[str, int], fmt: ExampleFormat = ExampleFormat(), max_length: int = 512
) -> TokenizedExample:
    """Tokenise for sequence classification: text (or prompt) plus a class id from ``label_field``."""
    text, label = _classification_fields(example, fmt)
    if label not in label2id:
        raise InputError(f"data: example {example.id!r} has label {label!r}, not one of {sorted(label2id)}")
    ids = tokenizer(str(text), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return TokenizedExample(example.id, list(ids), label=label2id[label])


def label_mapping(examples: Sequence[Example], fmt: ExampleFormat = ExampleFormat()) -> dict[str, int]:
    """Sorted distinct labels -> class ids (deterministic whatever the example order)."""
    labels = sorted({str(e.record[fmt.label_field]) for e in examples if fmt.label_field in e.record})
    if not labels:
        raise InputError(f"data: no example has the label field {fmt.label_field!r}")
    return {label: index for index, label in enumerate(labels)}


def tokenize_all(
    examples: Sequence[Example],
    tokenizer: Any,
    task: str,
    fmt: ExampleFormat = ExampleFormat(),
    max_length: int = 512,
    label2id: dict[str, int] | None = None,
) -> list[TokenizedExample]:
    """Tokenise every example for ``task`` ('causal_lm' or 'classification')."""
    if task == "causal_lm":
        out = [tokenize_causal(e, tokenizer, fmt, max_length) for e in examples]
        empty = [t.id for t in out if all(label == IGNORE_INDEX for label in t.labels[1:])]
        if empty:
            raise InputError(f"data: {len(empty)} example(s) have no target token after truncation (first: {empty[0]!r}); raise max_length")
        return out
    if task == "classification":
        if label2id is None:
            label2id = label_mapping(examples, fmt)
        return [tokenize_classification(e, tokenizer, label2id, fmt, max_length) for e in examples]
    raise InputError(f"task must be one of {TASKS}, got {task!r}")


def collate(batch: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids and attention_mask (B, S); labels (B, S) with -100 on padding or (B,)."""
    if not batch:
        raise ValueError("collate: empty batch")
    length = max(len(t.input_ids) for t in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, item in enumerate(batch):
        input_ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids, dtype=torch.long)
        attention_mask[row, : len(item.input_ids)] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if batch[0].labels is not None:
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(batch):
            labels[row, : len(item.labels)] = torch.tensor(item.labels, dtype=torch.long)
        out["labels"] = labels
    else:
        out["labels"] = torch.tensor([item.label for item in batch], dtype=torch.long)
    return out


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is masked out of every loss)."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def write_selected_examples(
    data: str | os.PathLike,
    selected_ids: Sequence[str],
    out: str | os.PathLike,
    fmt: ExampleFormat = ExampleFormat(),
    weights: Sequence[float] | None = None,
) -> int:
    """Write the selected examples themselves, in selection order, as JSON lines.

    ``data`` is the JSONL file the store was collected from (ids as :func:`read_jsonl` assigns
    them); each output line is the original record plus ``"_rank"`` (and ``"_weight"``). Written
    to a temp file and renamed, so a partial file never appears. Returns the number written.
    """
    by_id = {example.id: example.record for example in read_jsonl(data, fmt)}
    ids = [str(i) for i in selected_ids]
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise InputError(f"selected_ids: {len(unknown)} id(s) not in {data} (first: {unknown[0]!r}); was the store collected from it?")
    if weights is not None and len(weights) != len(ids):
        raise InputError(f"weights: {len(weights)} values for {len(ids)} ids")
    from ..atomic import atomic_write_text  # temp file + rename; removed if writing fails

    atomic_write_text(out, selected_examples_text(by_id, ids, weights))
    return len(ids)


def selected_examples_text(by_id: dict[str, dict[str, Any]], selected_ids: Sequence[str],
                           weights: Sequence[float] | None = None) -> str:
    """The JSON lines of :func:`write_selected_examples`: each record plus ``"_rank"`` (and
    ``"_weight"``), in selection order; ``by_id`` maps example ids to records."""
    lines = []
    for rank, example_id in enumerate(selected_ids):
        record = {**by_id[str(example_id)], "_rank": rank}
        if weights is not None:
            record["_weight"] = float(weights[rank])
        lines.append(json.dumps(record) + "\n")
    return "".join(lines)
