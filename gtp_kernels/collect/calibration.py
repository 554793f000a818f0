"""The plan printed before a collection: one calibration batch, then a time and memory estimate.

Nothing here changes what is collected; :func:`calibrate` leaves the model as it found it and
:func:`plan_lines` only reads. Per checkpoint, a batch costs its padded tokens times the
calibrated gradient time per token, plus K1 (per example with a cached Pi, per batch when Pi is
regenerated); the warm-up costs its examples' tokens at the calibrated training-step time per
token, per epoch.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Sequence

import torch

from .data import collate
from .gradients import project_checkpoint
from .models import attention_implementation, batch_loss, use_eager_attention
from .projector import Projector


def _peak_rss_bytes() -> int | None:
    """This process's peak resident set size so far (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class _TimedProjector:
    """Wraps a projector to time the K1 part of a calibration batch apart from the gradients."""

    def __init__(self, projector: Projector):
        self.projector, self.seconds = projector, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        self.projector(*args, **kwargs)
        self.seconds += time.perf_counter() - started


def calibrate(
    net: torch.nn.Module, tokenized: Sequence[Any], task: str, pad_id: int, batch_size: int, params: dict[str, torch.Tensor],
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]] | None, names: Sequence[str], projector: Projector,
    d: int, seed: int, normalise: bool, chunk_size: int | None, device: torch.device,
) -> dict[str, float]:
    """Time one batch (the data's first, as collection will see it) at one checkpoint: per-example
    gradients, K1, and a plain batched forward/backward (the warm-up's step). The model is left as
    found: eval mode, its attention implementation, no .grad, the global RNG untouched."""
    batch_examples = list(tokenized[:batch_size])
    batch = {k: v.to(device) for k, v in collate(batch_examples, pad_id).items()}
    padded_tokens = batch["input_ids"].numel()
    timed = _TimedProjector(projector)
    was_training = net.training
    attention = attention_implementation(net)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        net.eval()
        use_eager_attention(net)  # as collection runs it
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        project_checkpoint(net, batch, task, params, moments, names, timed, d, seed, 1.0, normalise, chunk_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        collect_s = time.perf_counter() - started
        if attention is not None:
            use_eager_attention(net, attention)  # the warm-up trains as the model was loaded
        started = time.perf_counter()
        logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        batch_loss(logits, batch["labels"], task).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_s = time.perf_counter() - started
        del logits
        for parameter in net.parameters():
            parameter.grad = None
    net.train(was_training)
    return {"examples": len(batch_examples), "padded_tokens": padded_tokens, "project_s": timed.seconds,
            "gradients_s": max(collect_s - timed.seconds, 0.0), "train_step_s": train_s}


def adapter_description(lora: Any) -> str:
    return f"LoRA r={lora.r}" if lora is not None else "full fine-tuning"


def plan_lines(
    calibration: dict[str, float], tokenized: Sequence[Any], spec_n: int, t_count: int, d: int, max_length: int,
    batch_size: int, shard_size: int, todo: Sequence[int], n_shards: int, trainable: int, adapter: str, gradient_type: str,
    warmup: Any, projector: Projector, device: torch.device,
) -> list[str]:
    """The plan printed before any work, with its time and memory estimate from the calibration.

    Per checkpoint, a batch costs its padded tokens times the calibrated gradient time per token,
    plus K1 (per example with a cached Pi, per batch when Pi is regenerated); the warm-up costs
    its examples' tokens at the calibrated training-step time per token, per epoch."""
    lengths = [len(x.input_ids) for x in tokenized]
    rows = [r for s in todo for r in range(s * shard_size, min(spec_n, (s + 1) * shard_size))]
    grad_per_token = calibration["gradients_s"] / calibration["padded_tokens"]
    project_per_batch = calibration["project_s"]
    collect_s = 0.0
    for shard in todo:
        start, stop = shard * shard_size, min(spec_n, (shard + 1) * shard_size)
        for b0 in range(start, stop, batch_size):
            chunk = lengths[b0 : min(stop, b0 + batch_size)]
            share = len(chunk) / calibration["examples"]
            collect_s += t_count * (grad_per_token * len(chunk) * max(chunk)
                                    + project_per_batch * (share if projector.cached else 1.0))
    warmup_s = 0.0
    if warmup is not None:
        n_train = max(1, round(warmup.fraction * len(tokenized)))
        mean_tokens = sum(lengths) / len(lengths)
        warmup_s = warmup.epochs * n_train * mean_tokens * calibration["train_step_s"] / calibration["padded_tokens"]
    peak = _peak_rss_bytes()
    shard_buffer = 2 * min(shard_size, spec_n) * t_count * d * 4  # the shard's rows, and their copy as written
    lines = [
        f"plan: N={spec_n} examples (mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)} tokens; "
        f"max_length {max_length}), T={t_count} checkpoints, d={d}, {gradient_type} gradients, batch {batch_size}, "
        f"{len(todo)} of {n_shards} shard(s) of {shard_size} rows to write ({len(rows)} examples), "
        f"{trainable:,} trainable parameters ({adapter}), K1 Pi {'cached' if projector.cached else 'generated per batch'}",
    ]
    estimate = (f"estimate (one calibration batch of {calibration['examples']:.0f} on {device.type}): "
                + (f"warm-up ~{_duration(warmup_s)}, " if warmup is not None else "")
                + f"collection ~{_duration(collect_s)} ({len(rows) / max(collect_s, 1e-9):.2f} examples/s)")
    if peak is not None:
        estimate += f", peak memory ~{(peak + shard_buffer) / 2**30:.1f} GiB RSS"
    if device.type == "cuda":
        estimate += f", {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB on the GPU"
    return lines + [estimate]
