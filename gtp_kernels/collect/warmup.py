"""The warm-up trajectory: brief training on a random share of the pool, T checkpoints saved.

As in LESS, the model (LoRA through peft by default, full fine-tuning when ``lora=None``) is
trained with AdamW (betas 0.9/0.999, eps 1e-8) under a linear schedule with warm-up on a random
``fraction`` of the pool, and a checkpoint is saved at the end of each of ``epochs`` epochs.
Checkpoint t records the average learning rate over its epoch, lr_t; the selection weighs
checkpoint t by w_t = lr_t / sum_s lr_s.

The warm-up also records its training loss: the first batch's (before any step) and each
epoch's mean of the per-batch losses, L_1..L_T. :func:`warmup_progress_report` flags a warm-up
that did not learn (the gradients at such checkpoints encode little beyond the label, and the
selection cannot tell useful rows from harmful ones), judged against the chance level ln C (C:
K labels, or V vocabulary tokens for a causal LM): a warm-up that started near chance must
lower its loss by 10%, and none may end within 5% of chance; collection then warns with
:class:`WarmupDidNotLearnWarning`.

Folder written (and read back by :func:`load_checkpoints`)::

    WARMUP/
      warmup.json                 settings, task, label2id, LoRA config, warm-up example ids,
                                  [{"name", "step", "epoch", "learning_rate"}] per checkpoint,
                                  first_batch_loss and epoch_losses [L_1..L_T] (absent in
                                  folders written before them)
      checkpoint-<epoch>/
        trainable.safetensors     every trainable parameter, named as in model.named_parameters()
        optimizer.pt              {"exp_avg": {name: m}, "exp_avg_sq": {name: v}, "step": int}
        adapter_model.safetensors + adapter_config.json   (LoRA: peft's own format, for reuse)

Checkpoints from elsewhere: a folder of ``checkpoint-<step>`` sub-folders each holding a peft
adapter (``adapter_model.safetensors``/``.bin``) and optionally an ``optimizer.pt`` (a torch
optimizer ``state_dict`` whose states follow the trainable parameters' order, as the
transformers Trainer writes) and ``trainer_state.json`` (learning rates from its log history);
learning rates can also be given explicitly.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..atomic import atomic_write_text
from ..validation import SEED_LIMIT, InputError, check_int, check_real, refused_pickle_reason
from .data import TokenizedExample, collate
from .models import align_pad_token_id, batch_loss, check_task, peft_task_type, wrap_for_training  # noqa: F401  (wrap_for_training: re-exported)

WARMUP_MANIFEST = "warmup.json"
# warmup_progress_report's thresholds (why these: see there)
MIN_RELATIVE_DROP = 0.10
CHANCE_MARGIN = 0.05
NEAR_CHANCE_START = 0.65


class WarmupDidNotLearnWarning(UserWarning):
    """The warm-up's training loss barely fell (see :func:`warmup_progress_report`). A warning,
    never an error: silence it with ``warnings.filterwarnings("ignore", category=WarmupDidNotLearnWarning)``."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings (LESS: r=128, alpha=512 on q/k/v/o; small defaults suit small models)."""

    r: int = 8
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None: peft's default for the architecture

    def __post_init__(self) -> None:
        check_int(self.r, "lora r", low=1, high=2**31 - 1)  # beyond it torch's shapes overflow
        if check_real(self.alpha, "lora alpha") <= 0:
            raise InputError(f"lora alpha must be positive, got {self.alpha!r}")
        if not 0 <= check_real(self.dropout, "lora dropout") < 1:
            raise InputError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None and not all(isinstance(m, str) and m for m in self.target_modules):
            raise InputError(f"lora target_modules must be non-empty module names, got {self.target_modules!r}")

    def peft_config(self, task: str) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=list(self.target_modules) if self.target_modules else None,
            task_type=peft_task_type(task),
        )


@dataclass(frozen=True)
class WarmupSettings:
    """How the warm-up trains; ``epochs`` is the number of checkpoints T."""

    fraction: float = 0.05
    epochs: int = 4
    learning_rate: float = 2e-5
    batch_size: int = 8
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    seed: int = 0
    lora: LoraSettings | None = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if not 0 < check_real(self.fraction, "warm-up fraction") <= 1:
            raise InputError(f"warm-up fraction must be in (0, 1], got {self.fraction!r}")
        for name in ("epochs", "batch_size"):
            check_int(getattr(self, name), f"warm-up {name}", low=1, high=2**31 - 1)
        if check_real(self.learning_rate, "warm-up learning_rate") <= 0:
            raise InputError(f"warm-up learning_rate must be positive, got {self.learning_rate!r}")
        check_real(self.weight_decay, "warm-up weight_decay", low=0.0)
        check_real(self.warmup_ratio, "warm-up warmup_ratio", low=0.0, high=1.0)
        check_int(self.seed, "warm-up seed", low=0, high=SEED_LIMIT - 1)  # torch.Generator's range


@dataclass
class Checkpoint:
    """One warm-up checkpoint: where its weights and optimizer moments live, and its learning rate."""

    name: str
    path: str
    learning_rate: float
    step: int = 0
    layout: str = "gtp"  # "gtp" (trainable.safetensors) or "peft" (an adapter folder)


def _linear_schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def warmup_train(
    model: torch.nn.Module,
    examples: Sequence[TokenizedExample],
    out_dir: str | os.PathLike,
    task: str,
    pad_token_id: int,
    settings: WarmupSettings = WarmupSettings(),
    label2id: dict[str, int] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[Checkpoint]:
    """Train ``model`` (already wrapped by :func:`wrap_for_training`) on a random ``fraction`` of
    ``examples`` and save one checkpoint per epoch into ``out_dir``; returns the checkpoints.
    The training losses (first batch, epoch means) go into ``warmup.json``; read them back with
    :func:`warmup_losses`.

    For classification, an unset ``model.config.pad_token_id`` is set to ``pad_token_id`` (see
    :func:`align_pad_token_id`); a decoder classifier's differing one is an InputError."""
    from safetensors.torch import save_file

    align_pad_token_id(model, pad_token_id, task)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(settings.seed)
    n_train = max(1, round(settings.fraction * len(examples)))
    chosen = sorted(rng.sample(range(len(examples)), n_train))
    train = [examples[i] for i in chosen]
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    warmup_steps = int(settings.warmup_ratio * total_steps)

    model.to(device).train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _linear_schedule(s, total_steps, warmup_steps))
    generator = torch.Generator().manual_seed(settings.seed)

    checkpoints: list[Checkpoint] = []
    epoch_losses: list[float] = []
    first_batch_loss = float("nan")
    step = 0
    bar = _progress(total_steps, "warm-up", progress)
    for epoch in range(1, settings.epochs + 1):
        order = torch.randperm(len(train), generator=generator).tolist()
        epoch_lrs = []
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
        for start in range(0, len(order), settings.batch_size):
            batch = collate([train[i] for i in order[start : start + settings.batch_size]], pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = batch_loss(logits, batch["labels"], task)
            epoch_lrs.append(optimizer.param_groups[0]["lr"])
            loss_sum += loss.detach().double()
            if step == 0:
                first_batch_loss = loss.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        epoch_losses.append(loss_sum.item() / len(epoch_lrs))
        name = f"checkpoint-{epoch}"
        folder = out / name
        folder.mkdir(exist_ok=True)
        state = optimizer.state_dict()["state"]
        try:
            save_file({n: p.detach().cpu().contiguous() for n, p in zip(names, trainable)}, str(folder / "trainable.safetensors"))
            # through a file object: a failed write is then an OSError (given a path, torch.save
            # reports a full disk as a RuntimeError "unexpected pos")
            with open(folder / "optimizer.pt", "wb") as handle:
                torch.save({
                    "exp_avg": {n: state[i]["exp_avg"].cpu() for i, n in enumerate(names)},
                    "exp_avg_sq": {n: state[i]["exp_avg_sq"].cpu() for i, n in enumerate(names)},
                    "step": step,
                }, handle)
            if hasattr(model, "save_pretrained") and hasattr(model, "peft_config"):
                model.save_pretrained(str(folder))
        except Exception as error:
            if type(error).__name__ != "SafetensorError":
                raise
            # safetensors reports I/O failures (a full disk) as its own error type
            raise OSError(f"cannot write the warm-up checkpoint {folder}: {str(error).strip().splitlines()[0]}") from None
        checkpoints.append(Checkpoint(name, str(folder), float(sum(epoch_lrs) / len(epoch_lrs)), step, "gtp"))
    if bar is not None:
        bar.close()
    model.eval()
    manifest = {
        "task": task, "label2id": label2id, "settings": _settings_json(settings),
        "warmup_example_ids": [t.id for t in train],
        "checkpoints": [{"name": c.name, "step": c.step, "learning_rate": c.learning_rate} for c in checkpoints],
        "first_batch_loss": first_batch_loss, "epoch_losses": epoch_losses,
    }
    # written last, atomically: its presence marks a finished warm-up
    atomic_write_text(out / WARMUP_MANIFEST, json.dumps(manifest, indent=1))
    return checkpoints


def _settings_json(settings: WarmupSettings) -> dict[str, Any]:
    data = asdict(settings)
    if data["lora"] is not None and data["lora"]["target_modules"] is not None:
        data["lora"]["target_modules"] = list(data["lora"]["target_modules"])
    return data


def settings_from_json(data: dict[str, Any]) -> WarmupSettings:
    lora = data.get("lora")
    lora_settings = None
    if lora is not None:
        targets = lora.get("target_modules")
        lora_settings = LoraSettings(lora["r"], lora["alpha"], lora["dropout"], tuple(targets) if targets else None)
    return WarmupSettings(**{**{k: v for k, v in data.items() if k != "lora"}, "lora": lora_settings})


def _progress(total: int, description: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="batch", dynamic_ncols=True)


def read_warmup_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / WARMUP_MANIFEST
    if not path.is_file():
        return None
    manifest = _read_json(path, "checkpoints")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("checkpoints"), list) or not manifest["checkpoints"]:
        raise InputError(f"checkpoints: {path} lists no checkpoints (not a warm-up folder this code wrote)")
    if "epoch_losses" in manifest or "first_batch_loss" in manifest:  # absent in older folders
        losses, first = manifest.get("epoch_losses"), manifest.get("first_batch_loss")
        if not (isinstance(losses, list) and len(losses) == len(manifest["checkpoints"])
                and all(_is_number(x) for x in losses) and _is_number(first)):
            raise InputError(f"checkpoints: {path} has malformed warm-up losses (first_batch_loss {first!r}, "
                             f"epoch_losses {losses!r}; expected a number and one number per checkpoint)")
    return manifest


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def warmup_losses(manifest: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``{"first_batch_loss": L_0, "epoch_losses": [L_1..L_T]}`` from a warm-up manifest (as
    :func:`read_warmup_manifest` returns it), or None when it records none (a folder written
    before the losses were recorded, or no manifest: checkpoints from elsewhere)."""
    if manifest is None or "epoch_losses" not in manifest:
        return None
    return {"first_batch_loss": float(manifest["first_batch_loss"]),
            "epoch_losses": [float(x) for x in manifest["epoch_losses"]]}


@dataclass(frozen=True)
class WarmupProgress:
    """What :func:`warmup_progress_report` found; ``learned`` is False when ``reasons`` is not empty."""

    task: str
    first_batch_loss: float
    epoch_losses: tuple[float, ...]
    relative_drop: float  # (L_ref - L_T) / L_ref, L_ref = max(L_0, L_1)
    chance_loss: float | None  # ln C: C = K labels (classification) or V tokens (causal_lm); None: C unknown
    reasons: tuple[str, ...]
    num_classes: int | None = None  # C, the number of outcomes the cross-entropy is over

    @property
    def learned(self) -> bool:
        return not self.reasons

    @property
    def reference_loss(self) -> float:
        """L_ref = max(L_0, L_1): where the warm-up started."""
        return max(self.first_batch_loss, self.epoch_losses[0])

    @property
    def start_over_chance(self) -> float | None:
        """L_ref / ln C: about 1 for a fresh model (or head), well below 1 for a model that
        already fits the data; None when no chance level is known."""
        return None if self.chance_loss is None else self.reference_loss / self.chance_loss

    @property
    def drop_rule_applies(self) -> bool:
        """Whether the r < MIN_RELATIVE_DROP rule applies: no chance level known, or the warm-up
        started near it (L_ref >= NEAR_CHANCE_START * ln C)."""
        ratio = self.start_over_chance
        return ratio is None or not ratio < NEAR_CHANCE_START  # NaN (a diverged start): applies

    def _chance_text(self) -> str:
        what = "labels" if self.task == "classification" else "tokens in the vocabulary"
        return f"chance level ln({self.num_classes}) = {self.chance_loss:.3f}, {self.num_classes} {what}"

    def message(self, settings: WarmupSettings | None = None) -> str:
        """One paragraph: the figures and, when flagged, why and what to change."""
        losses = " -> ".join(f"{x:.3f}" for x in self.epoch_losses)
        if self.learned:
            start = ""
            if self.chance_loss is not None:
                start = f"; it started at {self.start_over_chance:.2f} x {self._chance_text()}"
                if not self.drop_rule_applies and self.relative_drop < MIN_RELATIVE_DROP:
                    start += (f": a model that already fits the data (below {NEAR_CHANCE_START:g} x chance) "
                              "need not lower its loss much")
            return (f"the warm-up learned: training loss {self.first_batch_loss:.3f} on the first batch, epoch means "
                    f"{losses} ({self.relative_drop:.1%} lower){start}")
        hint = ("; a classifier with a freshly initialised head needs about 1e-2 over a few dozen steps, not the LLM default 2e-5"
                if self.task == "classification" else "")
        current = "" if settings is None else (f" (now lr {settings.learning_rate:g}, {settings.epochs} epochs, "
                                              f"fraction {settings.fraction:g})")
        return (f"the warm-up did not learn: training loss {self.first_batch_loss:.3f} on the first batch, epoch means "
                f"{losses}; {'; '.join(self.reasons)}. Gradients at barely trained checkpoints say little about which "
                "rows help (a classifier's: little beyond the label), so the selection cannot tell useful rows from "
                f"harmful ones. Warm up harder{current}: a larger "
                f"learning rate (--warmup-lr, WarmupSettings.learning_rate{hint}), more epochs (--warmup-epochs, epochs) or "
                "a larger share of the pool (--warmup-fraction, fraction), into a new --out folder (a finished "
                "warm-up there is reused as it is)")


def _class_count(num_classes: Any, num_labels: Any) -> int | None:
    """C from ``num_classes`` or its older name ``num_labels`` (both given: they must agree)."""
    if num_labels is not None:
        check_int(num_labels, "num_labels", low=2)
        if num_classes is not None and check_int(num_classes, "num_classes", low=2) != num_labels:
            raise InputError(f"num_classes ({num_classes}) and num_labels ({num_labels}) differ; pass one of them")
        return int(num_labels)
    return None if num_classes is None else check_int(num_classes, "num_classes", low=2)


def warmup_progress_report(losses: Mapping[str, Any], task: str, num_classes: int | None = None, *,
                           num_labels: int | None = None) -> WarmupProgress:
    """Did the warm-up learn? ``losses``: a warm-up manifest, or :func:`warmup_losses`' dict (as
    also recorded in a store's ``metadata["warmup_losses"]``).

    ``num_classes`` is C, the number of outcomes the training loss is a cross-entropy over: K
    labels for a classifier, V tokens (the vocabulary, the LM head's rows) for a causal LM; the
    chance level ln C is the loss of a uniform guess over them. None: no chance level known.
    ``num_labels`` is its older name (for a classifier, C = K), still accepted. C must be an
    integer >= 2 (InputError otherwise, before anything is judged).

    With L_0 the first batch's loss and L_1..L_T the epoch means, the reference is
    L_ref = max(L_0, L_1) and the relative drop r = (L_ref - L_T) / L_ref. Flagged when

    - r < MIN_RELATIVE_DROP (0.10), if the warm-up started near chance, L_ref >=
      NEAR_CHANCE_START (0.65) x ln C, or no chance level is known. A model that starts near
      chance (a fresh model, or a fresh classification head) has everything to learn; one that
      starts well below it already fits the data, and a small drop is what a pretrained LM at
      a small LoRA learning rate shows (LESS: 2e-5 on a 7B model, whose loss on instruction
      data starts near 2, 0.19 x ln 32000 = 10.4). Figures: in our quality study a MiniLM 5-topic
      classifier warmed too gently went 1.60 -> 1.59 (r < 0.01; 1.60 = 0.99 x ln 5) and its
      selection was near random, while a warm-up that learned went 1.60 -> 1.04 (r = 0.35):
      0.10 lies well between the two (15x the one, 1/3.5 of the other). The study's pretrained
      tiny Llama (task B, V = 30) went 1.42 -> 1.35 (r = 0.05) from 0.42 x ln 30 = 3.40 and its
      selections were the best of the study: not flagged. A fresh tiny Llama (the tests': V =
      44) starts at about 1.0 x ln V. NEAR_CHANCE_START = 0.65 is the midpoint on a ratio scale
      between those starts, sqrt(0.42 x 0.99) = 0.64: 1.5x from each (0.5 would leave the
      study's pretrained model 1.2x from a false alarm). The max in L_ref keeps a noisy first
      batch from flagging a warm-up that learned (and makes a one-epoch warm-up, L_1 = L_T,
      comparable). Data whose loss cannot fall (random text) is flagged too when the model
      starts near chance: the rule sees the loss, not why it stayed;
    - L_T >= (1 - CHANCE_MARGIN) ln C, for either task: within 5% of the loss of a uniform
      guess (ln 5 = 1.609: flagged above 1.529; ln 32000 = 10.37: above 9.86), whatever the
      drop and wherever it started: a model still at chance learned nothing;
    - any loss is not finite (a diverged warm-up).

    Returns a :class:`WarmupProgress`; it never raises for a warm-up that did not learn."""
    check_task(task)
    epoch_losses = losses.get("epoch_losses") if isinstance(losses, Mapping) else None
    first = losses.get("first_batch_loss") if isinstance(losses, Mapping) else None
    if not (isinstance(epoch_losses, (list, tuple)) and epoch_losses and all(_is_number(x) for x in epoch_losses)
            and _is_number(first)):
        raise InputError("losses: expected first_batch_loss (a number) and epoch_losses (a non-empty list of numbers), "
                         f"got {losses!r}")
    classes = _class_count(num_classes, num_labels)
    epochs = tuple(float(x) for x in epoch_losses)
    first = float(first)
    reference, last = max(first, epochs[0]), epochs[-1]
    drop = (reference - last) / reference if reference > 0 else 0.0
    chance = None if classes is None else math.log(classes)
    report = WarmupProgress(task, first, epochs, drop, chance, (), classes)  # the figures; reasons below
    reasons = []
    if not all(math.isfinite(x) for x in (first, *epochs)):
        reasons.append("a loss is not finite (the warm-up diverged)")
    else:
        if reference > 0 and drop < MIN_RELATIVE_DROP and report.drop_rule_applies:
            start = ("" if chance is None else
                     f"it started at {report.start_over_chance:.2f} x {report._chance_text()} (at least "
                     f"{NEAR_CHANCE_START:g} x: a model that should learn) and ")
            reasons.append(f"{start}the last epoch's mean is only {drop:.1%} below max(first batch, first epoch), "
                           f"less than {MIN_RELATIVE_DROP:.0%}")
        if chance is not None and last >= (1 - CHANCE_MARGIN) * chance:
            reasons.append(f"it is still within {CHANCE_MARGIN:.0%} of {report._chance_text()}")
    return dataclasses.replace(report, reasons=tuple(reasons))


def warn_if_warmup_did_not_learn(losses: Mapping[str, Any] | None, task: str, num_classes: int | None = None,
                                 settings: WarmupSettings | None = None, stacklevel: int = 2, *,
                                 num_labels: int | None = None) -> WarmupProgress | None:
    """:func:`warmup_progress_report` (``num_classes``: K labels or V tokens, see there), and a
    :class:`WarmupDidNotLearnWarning` when it flags the warm-up; None (no check) when no losses
    are known (checkpoints from elsewhere, older folders)."""
    if losses is None:
        _class_count(num_classes, num_labels)  # bad input is an error even without losses
        return None
    report = warmup_progress_report(losses, task, num_classes, num_labels=num_labels)
    if not report.learned:
        warnings.warn(report.message(settings), WarmupDidNotLearnWarning, stacklevel=stacklevel + 1)
    return report


def load_checkpoints(folder: str | os.PathLike, learning_rates: Sequence[float] | None = None) -> list[Checkpoint]:
    """Checkpoints in a warm-up folder written by :func:`warmup_train`, or ``checkpoint-<n>``
    peft adapter folders (ordered by n); learning rates from ``warmup.json``,
    ``trainer_state.json`` or ``learning_rates``."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"checkpoints: folder {root} does not exist")
    manifest = read_warmup_manifest(root)
    if manifest is not None:
        checkpoints = [Checkpoint(c["name"], str(root / c["name"]), float(c["learning_rate"]), int(c["step"]), "gtp") for c in manifest["checkpoints"]]
    else:
        found = []
        for child in root.iterdir():
            if child.is_dir() and child.name.startswith("checkpoint-") and child.name.split("-")[-1].isdigit():
                if not any((child / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
                    raise InputError(f"checkpoints: {child} has no adapter_model.safetensors/.bin (only peft adapter checkpoints are read)")
                found.append((int(child.name.split("-")[-1]), child))
        if not found:
            raise InputError(f"checkpoints: {root} has neither {WARMUP_MANIFEST} nor checkpoint-<n> folders")
        checkpoints = []
        previous_step = 0
        for step, child in sorted(found):
            checkpoints.append(Checkpoint(child.name, str(child), _trainer_state_lr(child, previous_step, step), step, "peft"))
            previous_step = step
    if learning_rates is not None:
        if len(learning_rates) != len(checkpoints):
            raise InputError(f"learning_rates: {len(learning_rates)} values for {len(checkpoints)} checkpoints")
        for checkpoint, lr in zip(checkpoints, learning_rates):
            checkpoint.learning_rate = float(lr)
    missing = [c.name for c in checkpoints if not (c.learning_rate > 0)]
    if missing:
        raise InputError(f"checkpoints: no learning rate known for {missing}; pass learning_rates")
    return checkpoints


def _trainer_state_lr(folder: Path, after_step: int, up_to_step: int) -> float:
    """Average logged learning rate over (after_step, up_to_step] from trainer_state.json; NaN if none."""
    path = folder / "trainer_state.json"
    if not path.is_file():
        return float("nan")
    state = _read_json(path, "checkpoints")
    history = state.get("log_history", []) if isinstance(state, dict) else None
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise InputError(f"checkpoints: {path} has no log_history list (not a transformers trainer_state.json)")
    lrs = [h["learning_rate"] for h in history if "learning_rate" in h and isinstance(h.get("step", 0), (int, float))
           and after_step < h.get("step", 0) <= up_to_step]
    if not all(isinstance(lr, (int, float)) and not isinstance(lr, bool) for lr in lrs):
        raise InputError(f"checkpoints: {path} logs a learning_rate that is not a number")
    return float(sum(lrs) / len(lrs)) if lrs else float("nan")


def _read_json(path: Path, what: str) -> Any:
    """A JSON file's content, or InputError naming it (bad JSON, too deeply nested, unreadable)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise InputError(f"{what}: {path} is not valid JSON ({error})") from None
    except RecursionError:
        raise InputError(f"{what}: {path} is nested too deeply to read as JSON") from None
    except OSError as error:
        raise InputError(f"{what}: cannot read {path} ({error.strerror or error})") from None


def _load_tensors(path: Path, what: str) -> Any:
    """torch.load(weights_only=True) of a checkpoint file; InputError when torch refuses it (a
    pickle holding more than tensors: refused, nothing of it ran) or cannot read it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise InputError(f"{what}: {path} was refused: it holds pickled Python objects besides tensors, which are "
                         f"never loaded ({refused_pickle_reason(error)})") from None
    except OSError as error:
        raise InputError(f"{what}: cannot read {path} ({error.strerror or error})") from None
    except (RuntimeError, EOFError, ValueError) as error:  # truncated, or not a torch file
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{what}: {path} is not a readable torch file ({type(error).__name__}: {first[:200]})") from None


def checkpoint_weights(checkpoints: Sequence[Checkpoint]) -> list[float]:
    """w_t = lr_t / sum_s lr_s (LESS's weighting)."""
    total = sum(c.learning_rate for c in checkpoints)
    return [c.learning_rate / total for c in checkpoints]


def load_trainable_state(checkpoint: Checkpoint, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The values of ``model``'s trainable parameters at ``checkpoint`` (names as in the model)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if checkpoint.layout == "gtp":
        from safetensors.torch import load_file

        state = load_file(str(Path(checkpoint.path) / "trainable.safetensors"))
    else:
        state = _peft_adapter_state(checkpoint, model)
    missing = [n for n in names if n not in state]
    if missing:
        raise InputError(f"checkpoint {checkpoint.name}: no weights for {len(missing)} trainable parameter(s), e.g. {missing[0]!r} (model and checkpoint differ)")
    reference = dict(model.named_parameters())
    out = {}
    for n in names:
        if state[n].shape != reference[n].shape:
            raise InputError(f"checkpoint {checkpoint.name}: {n} has shape {tuple(state[n].shape)}, model has {tuple(reference[n].shape)}")
        out[n] = state[n].to(device=reference[n].device, dtype=reference[n].dtype)
    return out


def _peft_adapter_state(checkpoint: Checkpoint, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Map a peft adapter file's keys onto the wrapped model's parameter names."""
    from peft.utils import set_peft_model_state_dict

    folder = Path(checkpoint.path)
    file = folder / "adapter_model.safetensors"
    if file.is_file():
        from safetensors.torch import load_file

        adapter = load_file(str(file))
    else:
        adapter = _load_tensors(folder / "adapter_model.bin", f"checkpoint {checkpoint.name}")
    # Load into the model and read the values back: peft owns the key mapping; restore afterwards.
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    set_peft_model_state_dict(model, adapter)
    after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in before:
                p.copy_(before[n])
    return {n: after[n] for n in names}


def load_adam_moments(checkpoint: Checkpoint, names: Sequence[str],
                      shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(exp_avg, exp_avg_sq) per trainable parameter name from the checkpoint's optimizer.pt.

    A torch optimizer state_dict numbers parameters group by group in the order the optimizer
    was built with. One group: trainable-parameter order. Several (the HF Trainer puts biases and
    norm weights in a no-decay group): the order that puts each group's names together, read off
    the names as the Trainer decides (bias/norm: no decay). Every entry is then checked against
    ``shapes`` (when given): an order that does not fit every shape is refused, rather than
    preconditioning a gradient with another parameter's moments.
    """
    path = Path(checkpoint.path) / "optimizer.pt"
    if not path.is_file():
        raise InputError(f"checkpoint {checkpoint.name}: no optimizer.pt, so Adam-preconditioned gradients are impossible (use gradient_type='sgd')")
    state = _load_tensors(path, f"checkpoint {checkpoint.name}")
    if not isinstance(state, dict):
        raise InputError(f"checkpoint {checkpoint.name}: {path} holds a {type(state).__name__}, not an optimizer state dict")
    if "exp_avg" in state and "exp_avg_sq" in state:
        avg, avg_sq = state["exp_avg"], state["exp_avg_sq"]
    elif "state" in state:  # torch optimizer state_dict: integer keys, numbered group by group
        indexed = state["state"]
        if len(indexed) != len(names):
            raise InputError(f"checkpoint {checkpoint.name}: optimizer state has {len(indexed)} entries for {len(names)} trainable parameters")
        order = _optimizer_order(checkpoint, list(names), state.get("param_groups"), indexed, shapes)
        avg = {n: indexed[k]["exp_avg"] for n, k in order.items()}
        avg_sq = {n: indexed[k]["exp_avg_sq"] for n, k in order.items()}
    else:
        raise InputError(f"checkpoint {checkpoint.name}: optimizer.pt has neither exp_avg/exp_avg_sq nor a torch 'state'")
    missing = [n for n in names if n not in avg]
    if missing:
        raise InputError(f"checkpoint {checkpoint.name}: optimizer state lacks {missing[0]!r}")
    if shapes is not None:
        for n in names:
            if avg[n].numel() != math.prod(shapes[n]) or avg_sq[n].numel() != math.prod(shapes[n]):
                raise InputError(f"checkpoint {checkpoint.name}: optimizer moments for {n!r} have "
                                 f"{avg[n].numel()} entries, the parameter {math.prod(shapes[n])}")
    return {n: (avg[n], avg_sq[n]) for n in names}


def _no_decay(name: str) -> bool:
    """The HF Trainer's no-weight-decay parameters, by name: biases and norm weights."""
    lowered = name.lower()
    return "bias" in lowered or "norm" in lowered or ".ln_" in lowered or lowered.startswith("ln_")


def _optimizer_order(checkpoint: Checkpoint, names: list, groups, indexed, shapes) -> dict:
    """{name: state key}: the numbering of a torch optimizer state_dict (see load_adam_moments)."""
    keys = sorted(indexed)
    sizes = [len(g.get("params", [])) for g in groups] if isinstance(groups, list) else []
    if len(sizes) <= 1:
        orders = [names]
    else:  # the HF Trainer's two groups: weight decay, then none (either may be empty)
        decay = [n for n in names if not _no_decay(n)]
        rest = [n for n in names if _no_decay(n)]
        orders = [order for order, split in ((decay + rest, [len(decay), len(rest)]),
                                             (rest + decay, [len(rest), len(decay)])) if sizes == split]
    for order in orders:
        if shapes is None or all(indexed[k]["exp_avg"].numel() == math.prod(shapes[n]) for n, k in zip(order, keys)):
            return dict(zip(order, keys))
    raise InputError(f"checkpoint {checkpoint.name}: cannot tell which optimizer moments belong to which parameter "
                     f"({len(sizes)} parameter groups of sizes {sizes}); use gradient_type='sgd', or save the moments "
                     "by name (exp_avg/exp_avg_sq dicts)")

