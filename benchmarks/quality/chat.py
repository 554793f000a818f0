"""Task B: a generative causal LM on an instruction mixture in chat format (``messages``).

Four generated skills (tokens are space-separated characters, one token each):
  add   "add 3 7 + 4 5"        -> "8 2"          (two-digit addition)
  rev   "rev c a f b"          -> "b f a c"      (string reversal)
  sort  "sort 5 2 9 1"         -> "1 2 5 9"      (sort digits)
  get   "get b : a 3 b 7 c 1"  -> "7"            (key-value lookup)
The pool mixes them equally, with a share of wrong answers and exact duplicates of a few
examples. A small Llama (transformers LlamaConfig, ~0.1M parameters) is pretrained briefly from
scratch on a separate draw of the same mixture (seeded, cached). The target is a few clean
examples of one skill (``sort``, fixed before any run); selection goes through
``collect_trajectory`` and ``select``; the selection fine-tunes a fresh LoRA adapter on the
pretrained model (same steps, learning rate and batch for every method and budget); metrics are
exact match of greedy answers on held-out prompts of the target skill and their answer loss.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from study import (budget_rows, joint_residual_curves, mean_spread, near_copy_picks, plot_accuracy, plot_residuals,
                   residual_curves, save_figure, select_accepts, select_budget, stage, variant_table, COLOURS)

SKILLS = ("add", "rev", "sort", "get")
TARGET_SKILL = "sort"
LETTERS = "abcdefgh"
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "<user>", "<assistant>"]
VOCAB = SPECIALS + list("0123456789") + list(LETTERS) + ["+", ":"] + list(SKILLS)
CHAT_TEMPLATE = (
    "{{ '[BOS] ' }}{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatSettings:
    pool: int                # distinct pool examples
    dup_sources: int         # examples copied exactly
    copies_per_source: int
    wrong_share: float       # share of pool answers that are wrong
    targets: int             # clean target examples per seed
    test: int                # held-out target-skill prompts
    seeds: tuple
    budgets_pct: tuple
    pretrain_examples: int
    pretrain_steps: int
    hidden: int
    layers: int
    d: int
    checkpoints: int
    warmup_fraction: float
    finetune_steps: int
    finetune_batch: int
    finetune_lr: float
    lora_r: int


FULL = ChatSettings(pool=1000, dup_sources=20, copies_per_source=10, wrong_share=0.25, targets=8, test=150,
                    seeds=(0, 1, 2), budgets_pct=(1, 2, 5, 10), pretrain_examples=4000, pretrain_steps=400,
                    hidden=64, layers=2, d=512, checkpoints=2, warmup_fraction=0.1, finetune_steps=40,
                    finetune_batch=16, finetune_lr=5e-3, lora_r=8)
QUICK = ChatSettings(pool=80, dup_sources=2, copies_per_source=4, wrong_share=0.25, targets=4, test=20,
                     seeds=(0, 1), budgets_pct=(5, 10, 20), pretrain_examples=200, pretrain_steps=10,
                     hidden=32, layers=1, d=64, checkpoints=2, warmup_fraction=0.25, finetune_steps=4,
                     finetune_batch=8, finetune_lr=5e-3, lora_r=2)


def make_example(skill: str, rng: random.Random, wrong: bool = False) -> Dict[str, Any]:
    """One example of ``skill`` (prompt, answer tokens); ``wrong`` gives a wrong answer of the right shape."""
    if skill == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        prompt = f"add {' '.join(str(a))} + {' '.join(str(b))}"
        value = a + b if not wrong else rng.choice([v for v in range(20, 199) if v != a + b])
        answer = list(str(value))
    elif skill == "rev":
        word = [rng.choice(LETTERS) for _ in range(rng.randint(4, 6))]
        prompt = "rev " + " ".join(word)
        answer = word[::-1]
        while wrong and answer == word[::-1]:
            answer = rng.sample(word, len(word))
    elif skill == "sort":
        digits = [rng.choice("0123456789") for _ in range(rng.randint(4, 6))]
        prompt = "sort " + " ".join(digits)
        answer = sorted(digits)
        while wrong and answer == sorted(digits):
            answer = rng.sample(digits, len(digits))
    elif skill == "get":
        keys = rng.sample(LETTERS, rng.randint(3, 4))
        values = [rng.choice("0123456789") for _ in keys]
        asked = rng.randrange(len(keys))
        prompt = f"get {keys[asked]} : " + " ".join(f"{k} {v}" for k, v in zip(keys, values))
        answer = [values[asked] if not wrong else rng.choice([v for v in "0123456789" if v != values[asked]])]
    else:
        raise ValueError(skill)
    return {"skill": skill, "prompt": prompt, "answer": " ".join(answer), "wrong": wrong}


def hash_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def as_record(example_id: str, example: Dict[str, Any]) -> Dict[str, Any]:
    return {"id": example_id, "messages": [{"role": "user", "content": example["prompt"]},
                                           {"role": "assistant", "content": example["answer"] + " [EOS]"}]}


def build_data(s: ChatSettings, seed: int = 0) -> Dict[str, Any]:
    rng = random.Random(1000 + seed)
    pool, group_of = [], {}
    for i in range(s.pool):
        pool.append(make_example(SKILLS[i % len(SKILLS)], rng, wrong=rng.random() < s.wrong_share))
    rng.shuffle(pool)
    for source in sorted(rng.sample(range(s.pool), s.dup_sources)):
        group_of[source] = source
        for _ in range(s.copies_per_source):
            group_of[len(pool)] = source
            pool.append(dict(pool[source]))
    pretrain = [make_example(SKILLS[i % len(SKILLS)], rng, wrong=rng.random() < s.wrong_share)
                for i in range(s.pretrain_examples)]
    targets = [make_example(TARGET_SKILL, rng) for _ in range(s.targets * len(s.seeds))]
    test = [make_example(TARGET_SKILL, rng) for _ in range(s.test)]
    return {"pool": pool, "group_of": group_of, "pretrain": pretrain, "targets": targets, "test": test}


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                  eos_token="[EOS]")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tokenized(records: List[Dict[str, Any]], tok) -> list:
    from gtp_kernels.collect.data import Example, tokenize_causal

    return [tokenize_causal(Example(r["id"], r), tok, max_length=64) for r in records]


def batch_tensors(items: list, pad_id: int):
    import torch

    width = max(len(t.input_ids) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, t in enumerate(items):
        ids[row, : len(t.input_ids)] = torch.tensor(t.input_ids)
        labels[row, : len(t.labels)] = torch.tensor(t.labels)
        mask[row, : len(t.input_ids)] = 1
    return ids, labels, mask


def train_steps(model, items: list, steps: int, batch: int, lr: float, seed: int, pad_id: int) -> None:
    """AdamW on the answer tokens, batches drawn with replacement (the same count for every selection)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        picks = torch.randint(len(items), (min(batch, len(items)),), generator=generator).tolist()
        ids, labels, mask = batch_tensors([items[i] for i in picks], pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


def pretrained_model(s: ChatSettings, data: Dict[str, Any], cache: Path, tok, times: Dict[str, float]) -> Path:
    """The tiny Llama pretrained on the mixture, saved with its tokenizer (cached by settings)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = cache / f"tiny_llama_h{s.hidden}_l{s.layers}_n{s.pretrain_examples}_s{s.pretrain_steps}"
    if (folder / "config.json").exists():
        return folder
    with stage(times, "pretrain tiny Llama on the mixture"):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=s.hidden, intermediate_size=2 * s.hidden,
                             num_hidden_layers=s.layers, num_attention_heads=4, num_key_value_heads=4,
                             max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                             tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
        items = tokenized([as_record(f"p{i}", e) for i, e in enumerate(data["pretrain"])], tok)
        # the loss on every token after the prompt, as in fine-tuning; prompts are seen as context
        train_steps(model, items, s.pretrain_steps, 32, 3e-3, seed=0, pad_id=tok.pad_token_id)
        temp = folder.with_name(folder.name + ".tmp")
        model.save_pretrained(str(temp))
        tok.save_pretrained(str(temp))
        temp.replace(folder)
    return folder


def evaluate(model, tok, test: List[Dict[str, Any]]) -> Dict[str, float]:
    """Exact match of greedy answers (up to EOS) and the mean answer-token loss on ``test``."""
    import torch

    records = [as_record(f"t{i}", e) for i, e in enumerate(test)]
    items = tokenized(records, tok)
    with torch.inference_mode():
        ids, labels, mask = batch_tensors(items, tok.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                                 ignore_index=-100).item()
        # greedy decoding of every prompt in one left-padded batch (no cache: sequences are short)
        prompts = [[t.input_ids[j] for j in range(len(t.labels)) if t.labels[j] == -100] for t in items]
        answers = [[x for x in t.labels if x != -100] for t in items]  # ends with EOS
        width = max(len(p) for p in prompts)
        current = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(current)
        for row, prompt in enumerate(prompts):
            current[row, width - len(prompt):] = torch.tensor(prompt)
            attention[row, width - len(prompt):] = 1
        produced = [[] for _ in prompts]
        finished = [False] * len(prompts)
        for _ in range(max(len(a) for a in answers) + 1):
            positions = (attention.cumsum(1) - 1).clamp_min(0)
            nxt = model(input_ids=current, attention_mask=attention, position_ids=positions).logits[:, -1].argmax(-1)
            for row, token in enumerate(nxt.tolist()):
                if not finished[row]:
                    produced[row].append(token)
                    finished[row] = token == tok.eos_token_id
            if all(finished):
                break
            current = torch.cat([current, nxt[:, None]], dim=1)
            attention = torch.cat([attention, torch.ones_like(nxt)[:, None]], dim=1)
        correct = sum(p == a for p, a in zip(produced, answers))
    return {"exact_match": correct / len(items), "answer_loss": loss}


def finetune_and_score(base_model, tok, items: list, s: ChatSettings, seed: int, test) -> Dict[str, float]:
    """A fresh LoRA adapter on a copy of the pretrained model, trained on ``items``, then scored."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=s.lora_r, lora_alpha=2 * s.lora_r, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"]))
    train_steps(model, items, s.finetune_steps, s.finetune_batch, s.finetune_lr, seed, tok.pad_token_id)
    return evaluate(model, tok, test)


def run(s: ChatSettings, cache: Path, out: Path, times: Dict[str, float], progress: bool, quick: bool) -> Dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import transformers

    from gtp_kernels import METHODS as REGISTRY
    from gtp_kernels.collect.pipeline import collect_trajectory
    from gtp_kernels.collect.store import check_compatible
    from gtp_kernels.collect.warmup import LoraSettings, WarmupSettings

    transformers.logging.set_verbosity_error()
    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tok = tokenizer()
    data = build_data(s)
    base = pretrained_model(s, data, cache, tok, times)
    pool_records = [as_record(f"x{i}", e) for i, e in enumerate(data["pool"])]
    target_records = [as_record(f"g{i}", e) for i, e in enumerate(data["targets"])]
    common = dict(task="causal_lm", d=s.d, max_length=64, batch_size=32, shard_size=4096, progress=progress,
                  device="cpu")
    warmup = WarmupSettings(fraction=s.warmup_fraction, epochs=s.checkpoints, learning_rate=3e-3, batch_size=16,
                            seed=0, lora=LoraSettings(r=s.lora_r, alpha=2 * s.lora_r,
                                                      target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
    with stage(times, "collect chat pool (warm-up + adam gradients)"):
        store = collect_trajectory(base, pool_records, cache / "chat_pool_store", warmup=warmup, gradient_type="adam",
                                   **common)
    with stage(times, "collect chat targets (sgd gradients)"):
        target_store = collect_trajectory(base, target_records, cache / "chat_target_store",
                                          checkpoints=cache / "chat_pool_store" / "warmup", gradient_type="sgd",
                                          **common)
    check_compatible(store, target_store)
    matrix = np.asarray(store.candidates(), dtype=np.float32)
    target_rows = np.asarray(target_store.candidates(), dtype=np.float32)
    pool = data["pool"]
    n = len(pool)
    on_skill = np.asarray([e["skill"] == TARGET_SKILL for e in pool])
    wrong = np.asarray([e["wrong"] for e in pool])
    items = tokenized(pool_records, tok)

    def weights_for(method: str):
        return store.weights_for(REGISTRY[method].block_scale_invariant)

    def target_for(seed: int, mode: str = "mean") -> np.ndarray:
        rows = target_rows[seed * s.targets : (seed + 1) * s.targets]
        return rows.mean(axis=0) if mode == "mean" else np.ascontiguousarray(rows.T)

    results: Dict[str, Any] = {"settings": asdict(s), "target_skill": TARGET_SKILL, "n": n,
                               "wrong_answers": int(wrong.sum()), "duplicate_rows": len(data["group_of"]),
                               "on_skill_share": float(on_skill.mean()),
                               "collection": {k: v for k, v in store.metadata.items() if k not in ("ids", "format")}}
    with stage(times, "fine-tune + evaluate, chat"):
        base_model = transformers.LlamaForCausalLM.from_pretrained(str(base))
        results["pretrained"] = evaluate(base_model, tok, data["test"])
        variants: Dict[str, Any] = {}
        memo_file = cache / "finetune_memo.json"  # (settings, seed, rows) -> scores: reruns reuse them
        memo = json.loads(memo_file.read_text()) if memo_file.exists() else {}
        settings_key = json.dumps(asdict(s), sort_keys=True)

        def scored(rows: np.ndarray, seed: int) -> Dict[str, float]:
            key = f"{hash_text(settings_key)}:{seed}:{hash_text(','.join(map(str, sorted(rows.tolist()))))}"
            if key not in memo:
                memo[key] = finetune_and_score(base_model, tok, [items[i] for i in sorted(rows.tolist())], s, seed,
                                               data["test"])
                memo_file.write_text(json.dumps(memo))
            return memo[key]

        full = [scored(np.arange(n), seed) for seed in s.seeds]
        results["full_pool"] = {m: mean_spread([f[m] for f in full]) for m in ("exact_match", "answer_loss")}
        runs = variant_table(select_accepts("targets"))
        for name, v in runs.items():
            per_budget = {}
            for pct in s.budgets_pct:
                budget = budget_rows(pct, n)
                scores, copies, bad, skill, secs = [], [], [], [], []
                for seed in s.seeds:
                    picked = select_budget(matrix, target_for(seed, v.mode), budget, v.method,
                                           store_weights=weights_for, num_checkpoints=store.t, seed=seed,
                                           align_threshold=v.align, fill=v.fill, joint=v.mode == "joint",
                                           topk_reduce=v.topk_reduce, screen=v.screen)
                    scores.append(scored(picked.indices, seed))
                    copies.append(near_copy_picks(picked.indices, data["group_of"]))
                    bad.append(int(wrong[picked.indices].sum()))
                    skill.append(float(on_skill[picked.indices].mean()))
                    secs.append(picked.seconds)
                per_budget[str(pct)] = {"budget": budget, "selected": len(picked.indices),
                                        "exact_match": mean_spread([x["exact_match"] for x in scores]),
                                        "answer_loss": mean_spread([x["answer_loss"] for x in scores]),
                                        "duplicate_picks": copies, "wrong_answer_picks": bad,
                                        "on_target_skill_share": skill, "select_seconds": float(np.median(secs))}
            variants[name] = per_budget
        results["variants"] = variants
    with stage(times, "residual curves, chat"):
        top = max(1, round(max(s.budgets_pct) * n / 100))
        target = target_for(0)
        orders = {m: select_budget(matrix, target, top, m, store_weights=weights_for, num_checkpoints=store.t, seed=0).indices
                  for m in ("gtp", "topk", "random")}
        ks = sorted(set(np.unique(np.geomspace(1, top, num=12).round().astype(int)).tolist()))
        ks = [k for k in ks if all(len(o) >= k for o in orders.values())]
        results["residual_curve"] = {"k": ks, **residual_curves(matrix, target, ks, orders,
                                                                 store.selection_checkpoint_weights, store.t)}
        if "gtp joint" in runs:  # the joint objective: per-example columns, RMS relative residual
            examples = target_for(0, "joint")
            joint_orders = {name: select_budget(matrix, examples, top, runs[name].method, store_weights=weights_for,
                                                num_checkpoints=store.t, seed=0, joint=True,
                                                topk_reduce=runs[name].topk_reduce).indices
                            for name in ("gtp joint", "topk joint mean-cos", "random")}
            jks = [k for k in ks if all(len(o) >= k for o in joint_orders.values())]
            results["joint_residual_curve"] = {"k": jks, **joint_residual_curves(
                matrix, examples, jks, joint_orders, store.selection_checkpoint_weights, store.t)}

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for ax, metric, label in ((axes[0], "exact_match", "exact match, held-out sort prompts"),
                              (axes[1], "answer_loss", "answer loss, held-out sort prompts")):
        shown = [m for m in ("gtp fill=target", "topk", "random", "gtp per-example", "topk per-example", "gtp joint",
                             "gtp joint fill=target", "gtp select defaults", "topk joint mean-cos") if m in variants]
        table = {m: {b: v[metric] for b, v in variants[m].items()} for m in shown}
        plot_accuracy(ax, s.budgets_pct, table, results["full_pool"][metric], label + " (mean +- std)",
                      f"chat mixture, target skill {TARGET_SKILL!r}")
    curve = results["residual_curve"]
    plot_residuals(axes[2], curve["k"], {m: curve[m] for m in ("gtp", "topk", "random")},
                   "chat mixture: residual against k (seed 0)")
    joint = results.get("joint_residual_curve")
    if joint:  # per-example targets: RMS over the columns of the relative residual
        for m in (m for m in joint if m != "k"):
            axes[2].plot(joint["k"], joint[m], marker="x", linestyle="--", label=f"{m} (per-example RMS)",
                         color=COLOURS.get(m, COLOURS.get(m.split(" ")[0])))
        axes[2].legend(fontsize=8)
    save_figure(fig, out / "chat_quality.png")
    plt.close(fig)
    (cache / "chat_results.json").write_text(json.dumps(results, default=str))
    return results
