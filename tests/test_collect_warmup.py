"""Warm-up: T checkpoints with their learning rates, weights and Adam moments; foreign peft checkpoints;
the recorded training losses and the check that flags a warm-up that did not learn."""
import json
import math
import random
import warnings

import pytest
import torch

from collect_tiny import classification_records, decoder_classifier, instruction_records, tiny_llama, tiny_tokenizer
from gtp_kernels.collect.data import as_examples, collate, tokenize_all
from gtp_kernels.collect.models import batch_loss
from gtp_kernels.validation import InputError
from gtp_kernels.collect.warmup import (
    LoraSettings, WarmupDidNotLearnWarning, WarmupSettings, checkpoint_weights, load_adam_moments,
    load_checkpoints, load_trainable_state, read_warmup_manifest, warmup_losses, warmup_progress_report, warmup_train,
    warn_if_warmup_did_not_learn, wrap_for_training,
)


def _warm(tmp_path, lora=LoraSettings(r=4, alpha=8)):
    tokenizer = tiny_tokenizer()
    tokens = tokenize_all(as_examples(instruction_records(20)), tokenizer, "causal_lm")
    settings = WarmupSettings(fraction=0.5, epochs=3, learning_rate=1e-2, batch_size=4, warmup_ratio=0.0, lora=lora)
    model = wrap_for_training(tiny_llama(), "causal_lm", lora)
    checkpoints = warmup_train(model, tokens, tmp_path / "warm", "causal_lm", 0, settings, progress=False)
    return model, checkpoints


def test_checkpoints_learning_rates_and_state(tmp_path):
    model, checkpoints = _warm(tmp_path)
    assert [c.name for c in checkpoints] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    # 10 examples, batch 4: 3 steps an epoch, 9 in all; linear decay lr*(9-s)/9 at step s.
    want = [1e-2 * sum(9 - s for s in range(3 * e, 3 * e + 3)) / 27 for e in range(3)]
    assert [c.learning_rate for c in checkpoints] == pytest.approx(want, rel=1e-12)
    assert checkpoint_weights(checkpoints) == pytest.approx([w / sum(want) for w in want])
    assert load_checkpoints(tmp_path / "warm")[2].learning_rate == checkpoints[2].learning_rate
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    last = load_trainable_state(checkpoints[2], model)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(last[n], p.detach(), rtol=0, atol=0)
    first = load_trainable_state(checkpoints[0], model)
    assert any(not torch.equal(first[n], last[n]) for n in names)
    moments = load_adam_moments(checkpoints[2], names)
    assert set(moments) == set(names)
    assert all(v.min() >= 0 for _, v in moments.values()) and any(m.abs().max() > 0 for m, _ in moments.values())
    manifest = json.loads((tmp_path / "warm" / "warmup.json").read_text())
    assert len(manifest["warmup_example_ids"]) == 10


def test_foreign_peft_checkpoint_folder(tmp_path):
    """A transformers-Trainer-like folder: peft adapter, torch optimizer state_dict, trainer_state.json."""
    model, checkpoints = _warm(tmp_path)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ours = torch.load(tmp_path / "warm" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    foreign = tmp_path / "trainer" / "checkpoint-9"
    model.save_pretrained(str(foreign))
    torch.save({"state": {i: {"step": torch.tensor(9.0), "exp_avg": ours["exp_avg"][n], "exp_avg_sq": ours["exp_avg_sq"][n]}
                          for i, n in enumerate(names)}, "param_groups": [{"params": list(range(len(names)))}]},
               foreign / "optimizer.pt")
    (foreign / "trainer_state.json").write_text(json.dumps({"log_history": [
        {"step": 3, "learning_rate": 5.0}, {"step": 6, "learning_rate": 3.0}, {"step": 9, "learning_rate": 1.0}]}))
    (loaded,) = load_checkpoints(tmp_path / "trainer")
    assert loaded.layout == "peft" and loaded.learning_rate == pytest.approx(3.0)
    fresh = wrap_for_training(tiny_llama(), "causal_lm", LoraSettings(r=4, alpha=8))
    state = load_trainable_state(loaded, fresh)
    want = load_trainable_state(checkpoints[2], fresh)
    for n in names:
        torch.testing.assert_close(state[n], want[n], rtol=0, atol=0)
    assert all(not torch.equal(p, state[n]) for n, p in fresh.named_parameters() if "lora_B" in n)  # fresh untouched
    moments = load_adam_moments(loaded, names)
    for n in names:
        torch.testing.assert_close(moments[n][0], ours["exp_avg"][n])
    with pytest.raises(ValueError, match="learning_rates"):
        load_checkpoints(tmp_path / "trainer", learning_rates=[1.0, 2.0])


def test_full_finetune_and_errors(tmp_path):
    model, checkpoints = _warm(tmp_path, lora=None)
    assert all(p.requires_grad for p in model.parameters())
    state = load_trainable_state(checkpoints[0], model)
    assert len(state) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoints(tmp_path / "nothing")
    with pytest.raises(ValueError, match="fraction"):
        WarmupSettings(fraction=0)


def test_decoder_classifier_without_pad_token_id(tmp_path):
    """warmup_train pads batches > 1 with pad_token_id: an unset config.pad_token_id of a decoder
    classifier is set to it (transformers would refuse the batch); a differing one is an InputError."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from collect_tiny import VOCAB_SIZE, classification_records
    from gtp_kernels.validation import InputError

    def classifier(pad):
        torch.manual_seed(0)
        return LlamaForSequenceClassification(LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_labels=3, pad_token_id=pad))

    label2id = {"blue": 0, "green": 1, "red": 2}
    tokens = tokenize_all(as_examples(classification_records(8, seed=2)), tiny_tokenizer(), "classification", label2id=label2id)
    settings = WarmupSettings(fraction=1.0, epochs=1, learning_rate=1e-3, batch_size=4, lora=LoraSettings(r=2, alpha=4))
    model = wrap_for_training(classifier(None), "classification", settings.lora)
    (checkpoint,) = warmup_train(model, tokens, tmp_path / "warm", "classification", 0, settings, label2id, progress=False)
    assert model.config.pad_token_id == 0 and checkpoint.step == 2
    with pytest.raises(InputError, match="pad_token_id is 7"):
        warmup_train(wrap_for_training(classifier(7), "classification", settings.lora), tokens, tmp_path / "warm7",
                     "classification", 0, settings, label2id, progress=False)
    assert not (tmp_path / "warm7").exists()


def _trainer_style_optimizer_state(model, groups):
    """An AdamW state_dict after one step, with the parameters grouped as given (names lists)."""
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [params[n] for n in group]} for group in groups], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    return opt, opt.state_dict()


def test_adam_moments_follow_the_trainers_parameter_groups(tmp_path):
    """The HF Trainer numbers parameters group by group (weight decay first, then biases and
    norm weights): the moments must reach the parameter they belong to, not the one at the same
    position in the model's order; groups we cannot place are refused, not guessed."""
    from gtp_kernels.collect.warmup import Checkpoint, _no_decay

    model = tiny_llama()
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    decay = [n for n in names if not _no_decay(n)]
    rest = [n for n in names if _no_decay(n)]
    assert decay and rest and names != decay + rest  # the model's order interleaves the groups
    opt, state = _trainer_style_optimizer_state(model, [decay, rest])
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    torch.save(state, folder / "optimizer.pt")
    moments = load_adam_moments(Checkpoint("checkpoint-1", str(folder), 1e-3), names, shapes)
    params = dict(model.named_parameters())
    for n in names:
        torch.testing.assert_close(moments[n][0], opt.state[params[n]]["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(moments[n][1], opt.state[params[n]]["exp_avg_sq"], rtol=0, atol=0)
    # groups split some other way: refused (a shape check catches what the split cannot place)
    odd = [names[::2], names[1::2]]
    _, state = _trainer_style_optimizer_state(model, odd)
    torch.save(state, folder / "optimizer.pt")
    with pytest.raises(InputError, match="cannot tell which optimizer moments"):
        load_adam_moments(Checkpoint("checkpoint-1", str(folder), 1e-3), names, shapes)


# ---- the recorded losses, and the check that flags a warm-up that did not learn ----


def test_losses_are_recorded_and_read_back(tmp_path):
    """warmup.json holds the first batch's loss before any step (recomputed here on a fresh copy
    of the model) and one finite mean per epoch; warmup_losses reads them back."""
    _warm(tmp_path)
    manifest = json.loads((tmp_path / "warm" / "warmup.json").read_text())
    losses = warmup_losses(read_warmup_manifest(tmp_path / "warm"))
    assert losses == {"first_batch_loss": manifest["first_batch_loss"], "epoch_losses": manifest["epoch_losses"]}
    assert len(losses["epoch_losses"]) == 3 and all(math.isfinite(x) and x > 0 for x in losses["epoch_losses"])
    # the first batch as warmup_train draws it: the sampled share (random.Random(seed)), then torch.randperm
    tokens = tokenize_all(as_examples(instruction_records(20)), tiny_tokenizer(), "causal_lm")
    train = [tokens[i] for i in sorted(random.Random(0).sample(range(20), 10))]
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    fresh = wrap_for_training(tiny_llama(), "causal_lm", LoraSettings(r=4, alpha=8)).double().train()
    batch = collate([train[i] for i in order[:4]], 0)
    with torch.no_grad():
        want = batch_loss(fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                          batch["labels"], "causal_lm").item()
    assert losses["first_batch_loss"] == pytest.approx(want, rel=1e-5)  # float32 forward against float64


def test_a_manifest_without_losses_still_loads(tmp_path):
    """Folders written before the losses were recorded: checkpoints load, no losses, no check."""
    _warm(tmp_path)
    path = tmp_path / "warm" / "warmup.json"
    manifest = json.loads(path.read_text())
    old = {k: v for k, v in manifest.items() if k not in ("first_batch_loss", "epoch_losses")}
    path.write_text(json.dumps(old))
    assert [c.name for c in load_checkpoints(tmp_path / "warm")] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert warmup_losses(read_warmup_manifest(tmp_path / "warm")) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_warmup_did_not_learn(None, "causal_lm") is None
    path.write_text(json.dumps({**old, "first_batch_loss": 1.0, "epoch_losses": [1.0, 0.5]}))  # 2 for 3 checkpoints
    with pytest.raises(InputError, match="malformed warm-up losses"):
        load_checkpoints(tmp_path / "warm")


def _classifier_warm_up(tmp_path, learning_rate):
    """A tiny Llama classifier (3 labels) warmed up on 12 examples whose label word ends the text."""
    label2id = {"blue": 0, "green": 1, "red": 2}
    records = [{**r, "text": f"{r['text']} {r['label']}"} for r in classification_records(12, seed=1)]
    tokens = tokenize_all(as_examples(records), tiny_tokenizer(), "classification", label2id=label2id)
    settings = WarmupSettings(fraction=1.0, epochs=3, learning_rate=learning_rate, batch_size=4, warmup_ratio=0.0,
                              lora=LoraSettings(r=2, alpha=4))
    folder = tmp_path / f"warm-{learning_rate:g}"
    warmup_train(wrap_for_training(decoder_classifier(), "classification", settings.lora), tokens, folder,
                 "classification", 0, settings, label2id, progress=False)
    return warmup_losses(read_warmup_manifest(folder)), settings


def test_the_check_flags_a_warm_up_that_did_not_learn(tmp_path):
    """lr 1e-7 leaves the loss at chance level (ln 3): flagged, with a warning that names the
    options to change; lr 1e-2 learns (the loss falls by half): no warning."""
    still, settings = _classifier_warm_up(tmp_path, 1e-7)
    with pytest.warns(WarmupDidNotLearnWarning) as caught:
        report = warn_if_warmup_did_not_learn(still, "classification", 3, settings)
    assert not report.learned and len(report.reasons) == 2, report  # both rules fire
    assert report.chance_loss == pytest.approx(math.log(3), rel=1e-15)
    assert report.epoch_losses[-1] > 0.95 * math.log(3) and report.relative_drop < 0.01
    text = str(caught[0].message)
    assert all(s in text for s in ("--warmup-lr", "--warmup-epochs", "--warmup-fraction", "now lr 1e-07", "ln(3)"))
    assert issubclass(WarmupDidNotLearnWarning, UserWarning)

    learned, settings = _classifier_warm_up(tmp_path, 1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", WarmupDidNotLearnWarning)
        report = warn_if_warmup_did_not_learn(learned, "classification", 3, settings)
    assert report.learned and learned["epoch_losses"][-1] < 0.5 * learned["first_batch_loss"], learned


LN = math.log


@pytest.mark.parametrize("task, first, epochs, classes, flagged", [
    ("classification", 1.600, [1.598, 1.595, 1.592, 1.590], 5, 2),  # the quality study's lr 1e-3 warm-up: both rules
    ("classification", 1.600, [1.45, 1.25, 1.10, 1.04], 5, 0),       # its lr 1e-2 one: 35% lower, well below ln 5
    ("classification", 1.600, [1.598, 1.595, 1.592, 1.590], None, 1),  # no label count: the drop rule alone
    ("classification", 1.900, [1.70, 1.65], 5, 1),   # 13% lower from a noisy first batch, but within 5% of ln 5
    ("causal_lm", 3.000, [2.50], None, 0),           # one epoch: compared with the first batch
    ("causal_lm", 3.000, [2.90, 2.80, 2.75], None, 1),  # no vocabulary known: an LM whose loss fell 8%, flagged
    ("causal_lm", 3.000, [2.90, float("nan")], None, 1),  # diverged
    ("causal_lm", 3.000, [2.90, float("nan")], 64, 1),    # diverged, whatever the chance level
    # pretrained-like: 1.42 = 0.34 x ln 64 and 5% lower: it already fits the data, not flagged
    ("causal_lm", 1.400, [1.42, 1.38, 1.35], 64, 0),
    ("causal_lm", 1.400, [1.42, 1.38, 1.35], None, 1),  # the same without a vocabulary: the drop rule as before
    ("causal_lm", 1.337, [1.424, 1.347], 30, 0),        # the quality study's chat warm-up (V = 30): 0.42 x ln 30
    # fresh: starts at ln 44 = 3.784 (1.00 x), 7.9% lower, ends 0.92 x ln 44: the drop rule
    ("causal_lm", 3.800, [3.79, 3.65, 3.50], 44, 1),
    ("causal_lm", 3.800, [3.79, 3.75, 3.70], 44, 2),   # fresh, 2.6% lower and still within 5% of ln 44: both
    ("causal_lm", 4.300, [4.10, 3.70], 44, 1),         # 14% lower from above chance, yet within 5% of ln 44
    ("causal_lm", 3.800, [3.00, 2.50], 44, 0),         # fresh, learned: 34% lower
    ("causal_lm", 10.0, [9.95, 9.90], 32000, 2),       # a 7B-sized vocabulary, still at chance (ln 32000 = 10.37): both
    ("causal_lm", 2.00, [1.98, 1.95], 32000, 0),       # a pretrained LLM at lr 2e-5: 0.19 x ln 32000, 2.5% lower
])
def test_the_rules_on_given_losses(task, first, epochs, classes, flagged):
    report = warmup_progress_report({"first_batch_loss": first, "epoch_losses": epochs}, task, classes)
    assert len(report.reasons) == flagged and report.learned == (flagged == 0), report
    assert report.num_classes == classes
    reference = max(first, epochs[0])
    if classes is None:
        assert report.chance_loss is None and report.start_over_chance is None and report.drop_rule_applies
    else:
        assert report.chance_loss == pytest.approx(LN(classes), rel=1e-15)
        assert report.start_over_chance == pytest.approx(reference / LN(classes), rel=1e-12)
    if math.isfinite(epochs[-1]):
        assert report.relative_drop == pytest.approx((reference - epochs[-1]) / reference, rel=1e-12)


def test_the_messages_say_where_the_warm_up_started():
    """A pretrained-like start far below chance: learned, and the message says why a small drop is
    fine; a fresh start: flagged, with its start against chance and the drop."""
    pretrained = warmup_progress_report({"first_batch_loss": 1.337, "epoch_losses": [1.424, 1.347]}, "causal_lm", 30)
    text = pretrained.message()
    assert pretrained.learned and "0.42 x chance level ln(30) = 3.401, 30 tokens in the vocabulary" in text, text
    assert "already fits the data" in text and "5.4% lower" in text, text
    fresh = warmup_progress_report({"first_batch_loss": 3.8, "epoch_losses": [3.79, 3.65, 3.5]}, "causal_lm", 44)
    (reason,) = fresh.reasons
    assert "started at 1.00 x chance level ln(44) = 3.784" in reason and "only 7.9% below" in reason, reason
    assert "did not learn" in fresh.message() and reason in fresh.message()
    labels = warmup_progress_report({"first_batch_loss": 1.6, "epoch_losses": [1.598, 1.59]}, "classification", 5)
    assert "within 5% of chance level ln(5) = 1.609, 5 labels" in labels.message()


def test_the_near_chance_start_boundary():
    """The drop rule applies from L_ref = NEAR_CHANCE_START x ln V up (here a 5% drop, ending far
    below the 5%-of-chance line): just below the boundary it does not, just above it does."""
    from gtp_kernels.collect.warmup import MIN_RELATIVE_DROP, NEAR_CHANCE_START

    assert NEAR_CHANCE_START == 0.65 and MIN_RELATIVE_DROP == 0.10
    chance = LN(1000)
    for factor, flagged in ((1 - 1e-9, False), (1 + 1e-9, True), (1.0 + 0.2, True), (0.9, False)):
        start = factor * NEAR_CHANCE_START * chance
        report = warmup_progress_report({"first_batch_loss": start, "epoch_losses": [start, 0.95 * start]},
                                        "causal_lm", 1000)
        assert report.learned != flagged and report.drop_rule_applies == flagged, (factor, report)
        assert report.relative_drop == pytest.approx(0.05, rel=1e-12)
    # the drop rule's own boundary, at a fresh start: 10% lower is enough, a hair less is not
    for drop, flagged in ((0.10 + 1e-9, False), (0.10 - 1e-9, True)):
        start = 0.9 * chance
        report = warmup_progress_report({"first_batch_loss": start, "epoch_losses": [(1 - drop) * start]},
                                        "causal_lm", 1000)
        assert report.learned != flagged, (drop, report)


def test_the_check_refuses_what_is_not_a_loss_record():
    losses = {"first_batch_loss": 1.0, "epoch_losses": [1.0]}
    with pytest.raises(InputError, match="epoch_losses"):
        warmup_progress_report({"epoch_losses": []}, "causal_lm")
    with pytest.raises(InputError, match="task"):
        warmup_progress_report(losses, "regression")
    for bad in (0, 1, -5, 2.0, "64", True, float("nan")):  # C must be an integer >= 2
        with pytest.raises(InputError, match="num_classes"):
            warmup_progress_report(losses, "causal_lm", bad)
        with pytest.raises(InputError, match="num_labels"):
            warmup_progress_report(losses, "classification", num_labels=bad)
        with pytest.raises(InputError, match="num_classes"):  # early: even with no losses to judge
            warn_if_warmup_did_not_learn(None, "causal_lm", bad)
    with pytest.raises(InputError, match="differ"):
        warmup_progress_report(losses, "classification", 5, num_labels=3)


def test_num_labels_keeps_working():
    """The older keyword: the same report as num_classes, positional or by name."""
    losses = {"first_batch_loss": 1.6, "epoch_losses": [1.598, 1.59]}
    by_position = warmup_progress_report(losses, "classification", 5)
    assert warmup_progress_report(losses, "classification", num_labels=5) == by_position
    assert warmup_progress_report(losses, "classification", num_classes=5) == by_position
    assert warmup_progress_report(losses, "classification", 5, num_labels=5) == by_position
    with pytest.warns(WarmupDidNotLearnWarning, match="ln\\(5\\)"):
        assert warn_if_warmup_did_not_learn(losses, "classification", num_labels=5) == by_position
