"""collect_trajectory: data + model -> warm-up checkpoints -> per-example gradients -> K1 -> store.

For every example i and checkpoint t (weights theta_t, Adam moments m_t, v_t):

    g_i(t)     per-example gradient of its loss at theta_t (batched, :mod:`.per_example`)
    gbar_i(t)  = m_t' / sqrt(v_t' + eps)   ("adam", training candidates)   or g_i(t)   ("sgd", targets)
    p_i(t)     = Pi_t gbar_i(t) in R^d      (K1 ``project``, parameter by parameter with global offsets,
                                              so no concatenated P-vector is ever formed)
    block_i(t) = c_t * p_i(t) / ||p_i(t)||   ("unit" normalisation; without it, c_t * p_i(t))

with seed_t = seed + t ("per_checkpoint", the evolving subspace) or seed ("shared", as LESS),
and c_t = sqrt(w_t), w_t = lr_t / sum_s lr_s, when ``apply_checkpoint_weights`` (else c_t = 1 and
the weights are only recorded). Rows are written shard by shard (:mod:`.store`); an interrupted
run resumes at the first missing shard. Candidates and targets must use the same checkpoints
and projection: collect the pool first (it runs the warm-up into ``<out>/warmup``), then the
targets with ``checkpoints=<pool store>/warmup`` and ``gradient_type="sgd"``.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import math
import numbers
import os
import pickle
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..validation import InputError, check_int, refused_pickle_reason, resolve_device
from .data import TokenizedExample, ExampleFormat, as_examples, check_examples, collate, label_mapping, pad_token_id, read_jsonl, tokenize_all
from .per_example import adam_precondition, per_example_gradients, trainable_parameters
from .store import MANIFEST, STORE_DTYPES, StoreError, StoreSpec, TrajectoryStore, TrajectoryStoreWriter, _read_manifest, open_store
from .warmup import (
    LoraSettings, WarmupSettings, align_pad_token_id, check_pad_token_id, checkpoint_weights, load_adam_moments,
    load_checkpoints, load_trainable_state, read_warmup_manifest, settings_from_json, warmup_train, wrap_for_training,
)

GRADIENT_TYPES = ("adam", "sgd")
SEED_MODES = ("per_checkpoint", "shared")
BACKENDS = ("auto", "triton", "torch")


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return resolve_device(device, "device")


SIZE_LIMIT = 2**31 - 1  # sizes (d, rows per batch or shard, tokens): beyond it torch's shapes overflow or nothing fits


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    check_int(value, name, low=1, high=SIZE_LIMIT)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _not_found(what: str, name: str) -> str:
    return (f"{what}: {name!r} is neither a local model folder nor a model in the local Hugging Face cache; "
            "nothing is downloaded at run time (pass a folder holding config.json and the weights, "
            "or fetch the model beforehand)")


def _check_model_source(model: Any) -> Any:
    """A model path must be a local folder, or a model id already in the local HF cache (offline);
    returns its config."""
    name = os.fspath(model)
    if os.path.exists(name) and not os.path.isdir(name):
        raise InputError(f"model: {name} is a file; expected a Hugging Face model folder (config.json and the weights)")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        if not os.path.isdir(name):
            raise InputError(_not_found("model", name)) from None
        raise InputError(f"model: cannot read the model config in {name} ({_first_line(error)})") from None


# Checkpoint classes that carry a causal language-model head (LlamaForCausalLM, GPT2LMHeadModel, ...).
_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _no_lm_head(name: str, what: str) -> InputError:
    return InputError(
        f"model {name}: task 'causal_lm' needs a causal language model with its trained LM head, but {what}; "
        "transformers would attach a freshly initialised LM head, and the gradients would be those of a random head. "
        "For labelled text pass --task classification (task='classification': the warm-up trains a classification "
        "head), or pass a causal LM")


def _check_task_fits_config(config: Any, task: str, name: str) -> None:
    """Before any work: a causal_lm collection needs a checkpoint that holds a causal-LM head (an
    encoder-only checkpoint such as a sentence-embedding BERT would get a random one)."""
    if task != "causal_lm" or config is None:
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", "?")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise _no_lm_head(name, f"its model type {model_type!r} has no causal-LM class in transformers")
    if architectures and not any(a.endswith(_CAUSAL_LM_SUFFIXES) for a in architectures):
        raise _no_lm_head(name, f"its checkpoint holds a {', '.join(architectures)} (config.json's architectures), "
                                "no causal-LM head")


def _check_lm_head_loaded(built: torch.nn.Module, missing: Sequence[str], task: str, name: str) -> None:
    """After loading: no causal-LM weight may be freshly initialised (the checkpoint lacked it), and
    a module must have an output (LM head) layer at all."""
    if task != "causal_lm":
        return
    if missing:
        shown = ", ".join(list(missing)[:3]) + (", ..." if len(missing) > 3 else "")
        raise _no_lm_head(name, f"its checkpoint lacks {len(missing)} of the model's weights ({shown})")
    get_output = getattr(built, "get_output_embeddings", None)
    if callable(get_output) and get_output() is None:
        raise _no_lm_head(name, f"{type(built).__name__} has no output (LM head) layer")


def _load_tokenizer(source: Any) -> Any:
    """AutoTokenizer from a local folder (or the local HF cache) only; a clean error otherwise."""
    name = os.fspath(source)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        if not os.path.isdir(name):
            raise InputError(_not_found("tokenizer", name)) from None
        raise InputError(f"tokenizer: cannot load a tokenizer from {name} ({_first_line(error)}); "
                         "pass a tokenizer folder (--tokenizer)") from None


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
    if dtype not in table:
        raise InputError(f"model_dtype must be one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def _build_model(model: Any, task: str, label2id: dict[str, int] | None, model_dtype: torch.dtype | None, seed: int,
                 progress: bool = True, pad_id: int | None = None) -> torch.nn.Module:
    """A fresh base model each call (peft wrapping mutates it); random heads seeded identically.
    For classification its ``config.pad_token_id`` is aligned with ``pad_id``, the id collate
    pads with (:func:`align_pad_token_id`: set when unset, a decoder's differing one refused)."""
    torch.manual_seed(seed)
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        import transformers

        # transformers renamed torch_dtype to dtype in 4.56.
        dtype_key = "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"
        kwargs: dict[str, Any] = {dtype_key: model_dtype} if model_dtype is not None else {}
        kwargs["local_files_only"] = True  # offline: a local folder or the local HF cache, never a download
        name = os.fspath(model)
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        if not progress:  # quiet: no "Loading weights" bar either
            hf_logging.disable_progress_bar()
        try:
            if task == "causal_lm":
                # transformers' load report is replaced by ours: any missing weight is an InputError
                verbosity = hf_logging.get_verbosity()
                hf_logging.set_verbosity_error()
                try:
                    built, loading = AutoModelForCausalLM.from_pretrained(name, output_loading_info=True, **kwargs)
                finally:
                    hf_logging.set_verbosity(verbosity)
                missing = list(loading.get("missing_keys") or [])
            else:
                id2label = {i: label for label, i in label2id.items()}
                built = AutoModelForSequenceClassification.from_pretrained(
                    name, num_labels=len(label2id), id2label=id2label, label2id=label2id, **kwargs)
                missing = []
        except pickle.UnpicklingError as error:  # torch.load(weights_only=True) refused it: nothing of it ran
            raise InputError(f"model: {name}: a weights file was refused, it holds pickled Python objects besides "
                             f"tensors, which are never loaded ({refused_pickle_reason(error)}); "
                             "save the model as safetensors") from None
        except (OSError, ValueError, KeyError) as error:
            if not os.path.isdir(name) and not _in_local_cache(name):
                raise InputError(_not_found("model", name)) from None
            raise InputError(f"model: cannot load {name} as a {task} model offline ({_first_line(error)})") from None
        finally:
            if bars and not progress:
                hf_logging.enable_progress_bar()
    elif isinstance(model, torch.nn.Module):
        built, missing = copy.deepcopy(model), []
    elif callable(model):
        built, missing = model(), []
    else:
        raise TypeError(f"model must be a path, an nn.Module or a zero-argument factory, got {type(model).__name__}")
    _check_lm_head_loaded(built, missing, task, _model_name(model))
    if model_dtype is not None:
        built = built.to(model_dtype)
    if pad_id is not None:
        align_pad_token_id(built, pad_id, task, f"model {_model_name(model)}")
    return built


def _check_resumable(out: Path, resume: bool, n: int, ids: list[str], d: int, dtype: str, shard_size: int, task: str,
                     gradient_type: str, kind: str, seed: int, seed_mode: str, normalise: bool, weights_applied: bool) -> None:
    """Refuse, before any model work, to resume a store made with other data or settings (the
    writer checks the whole spec again once the checkpoints are known)."""
    if not (out / MANIFEST).exists():
        if out.is_dir() and any(out.glob("shard-*.npy")):
            raise StoreError(f"store {out}: holds shard files but no {MANIFEST} (not a store this code wrote)")
        return
    if not resume:
        raise StoreError(f"store {out} already exists (resume it, or choose a new folder)")
    manifest = _read_manifest(out)
    meta = manifest.get("metadata") or {}
    wanted = {"N": (manifest.get("N"), n), "d": (manifest.get("d"), d), "dtype": (manifest.get("dtype"), dtype),
              "shard_size": (manifest.get("shard_size"), shard_size)}
    projection = meta.get("projection") or {}
    for key, value in (("task", task), ("gradient_type", gradient_type), ("normalisation", "unit" if normalise else "none"),
                       ("weights_applied", weights_applied)):
        if key in meta:
            wanted[key] = (meta[key], value)
    for key, value in (("kind", kind), ("seed", seed), ("seed_mode", seed_mode)):
        if key in projection:
            wanted[f"projection {key}"] = (projection[key], value)
    for key, (have, want) in wanted.items():
        if have != want:
            raise StoreError(f"store {out}: cannot resume, its {key!r} differs from this collection's ({have!r} vs {want!r}); "
                             "choose a new folder")
    if manifest.get("example_ids") != ids:
        raise StoreError(f"store {out}: cannot resume, its example ids differ from this data's (collected from other data?); "
                         "choose a new folder")


def shard_input_digest(examples: Sequence[TokenizedExample]) -> str:
    """sha256 of what a shard's gradients are computed from: each tokenised example's id, token
    ids and labels (or class id), in order. An edited example, another tokenizer, chat template,
    max_length or label mapping changes it."""
    digest = hashlib.sha256()
    for example in examples:
        for part in (example.id.encode("utf-8"), np.asarray(example.input_ids, dtype=np.int64).tobytes(),
                     np.asarray(example.labels if example.labels is not None else [], dtype=np.int64).tobytes(),
                     str(example.label).encode("ascii")):
            digest.update(len(part).to_bytes(8, "little"))  # length-prefixed: no two inputs share a stream
            digest.update(part)
    return digest.hexdigest()


def _check_inputs_unchanged(out: Path, digests: Sequence[str], ids: Sequence[str], shard_size: int) -> None:
    """Refuse to resume a store whose written shards were computed from other examples than this
    data's (same ids, other content: an edited data file, or another tokenizer or format). Shards
    written before digests were recorded cannot be checked and are kept."""
    if not (out / MANIFEST).exists():
        return
    manifest = _read_manifest(out)
    for entry in manifest["shards"]:
        recorded, index = entry.get("input_sha256"), entry["index"]
        if recorded is None or index >= len(digests) or recorded == digests[index]:
            continue
        start, stop = entry["start"], entry["stop"]
        raise StoreError(
            f"store {out}: cannot resume: shard {index} (rows {start}..{stop - 1}, examples {ids[start]!r}..{ids[stop - 1]!r}) "
            "was computed from other content than these examples now have (the data file was edited, or the tokenizer, "
            "chat template or label set changed); its gradients would mix with new ones. Collect into a new folder, "
            "or restore the data the store was collected from")


def _in_local_cache(name: str) -> bool:
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - only asking whether it is there
        return False


def _model_name(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    if isinstance(model, torch.nn.Module):
        return type(model).__name__
    return getattr(model, "__name__", type(model).__name__)


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

    def __init__(self, projector: "_Projector"):
        self.projector, self.seconds = projector, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        self.projector(*args, **kwargs)
        self.seconds += time.perf_counter() - started


def _calibrate(
    net: torch.nn.Module, tokenized: Sequence[Any], task: str, pad_id: int, batch_size: int, params: dict[str, torch.Tensor],
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]] | None, names: Sequence[str], projector: "_Projector",
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
    attention = getattr(getattr(net, "config", None), "_attn_implementation", None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        net.eval()
        if hasattr(net, "set_attn_implementation"):
            try:
                net.set_attn_implementation("eager")  # as collection runs it (see below)
            except (ValueError, NotImplementedError):
                pass
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        _project_checkpoint(net, batch, task, params, moments, names, timed, d, seed, 1.0, normalise, chunk_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        collect_s = time.perf_counter() - started
        if attention is not None and hasattr(net, "set_attn_implementation"):
            try:
                net.set_attn_implementation(attention)  # the warm-up trains as the model was loaded
            except (ValueError, NotImplementedError):
                pass
        started = time.perf_counter()
        logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        from .warmup import _batch_loss

        _batch_loss(logits, batch["labels"], task).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_s = time.perf_counter() - started
        del logits
        for parameter in net.parameters():
            parameter.grad = None
    net.train(was_training)
    return {"examples": len(batch_examples), "padded_tokens": padded_tokens, "project_s": timed.seconds,
            "gradients_s": max(collect_s - timed.seconds, 0.0), "train_step_s": train_s}


def _adapter(lora: Any) -> str:
    return f"LoRA r={lora.r}" if lora is not None else "full fine-tuning"


def _plan_lines(
    calibration: dict[str, float], tokenized: Sequence[Any], spec_n: int, t_count: int, d: int, max_length: int,
    batch_size: int, shard_size: int, todo: Sequence[int], n_shards: int, trainable: int, adapter: str, gradient_type: str,
    warmup: Any, projector: "_Projector", device: torch.device,
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
                                    + project_per_batch * (share if projector.cache else 1.0))
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
        f"{trainable:,} trainable parameters ({adapter}), K1 Pi {'cached' if projector.cache else 'generated per batch'}",
    ]
    estimate = (f"estimate (one calibration batch of {calibration['examples']:.0f} on {device.type}): "
                + (f"warm-up ~{_duration(warmup_s)}, " if warmup is not None else "")
                + f"collection ~{_duration(collect_s)} ({len(rows) / max(collect_s, 1e-9):.2f} examples/s)")
    if peak is not None:
        estimate += f", peak memory ~{(peak + shard_buffer) / 2**30:.1f} GiB RSS"
    if device.type == "cuda":
        estimate += f", {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB on the GPU"
    return lines + [estimate]


def collect_trajectory(
    model: str | os.PathLike | torch.nn.Module | Callable[[], torch.nn.Module],
    data: str | os.PathLike | Sequence[dict],
    out: str | os.PathLike,
    *,
    tokenizer: Any = None,
    task: str = "causal_lm",
    checkpoints: str | os.PathLike | None = None,
    learning_rates: Sequence[float] | None = None,
    warmup: WarmupSettings | None = None,
    gradient_type: str = "adam",
    d: int = 8192,
    seed: int = 0,
    seed_mode: str = "per_checkpoint",
    kind: str = "rademacher",
    normalise: bool = True,
    apply_checkpoint_weights: bool = True,
    dtype: str = "float32",
    batch_size: int = 16,
    shard_size: int = 1024,
    max_length: int = 512,
    fmt: ExampleFormat = ExampleFormat(),
    device: str | torch.device = "auto",
    model_dtype: str | torch.dtype | None = None,
    vmap_chunk_size: int | None = None,
    backend: str = "auto",
    projection_cache_mb: float = 1024.0,
    resume: bool = True,
    progress: bool = True,
    shards: Sequence[int] | None = None,
    on_shard_written: Callable[[int], None] | None = None,
    coordinator: Any = None,
) -> TrajectoryStore:
    """Collect the (N, T, d) gradient trajectory of ``data`` into the store folder ``out``.

    Args:
        model: a Hugging Face model folder (or a model id already in the local Hugging Face cache;
            loaded offline, never downloaded), an ``nn.Module`` (deep-copied), or a
            factory returning a fresh, identically initialised module.
        data: a JSONL file or a list of dicts (fields: see :class:`ExampleFormat`).
        tokenizer: a tokenizer, or a tokenizer folder; defaults to the model folder's. Folders and
            model ids load with ``local_files_only=True``: nothing is downloaded.
        task: 'causal_lm' or 'classification'.
        checkpoints: an existing warm-up folder (ours, or ``checkpoint-<n>`` peft adapters); when
            None, warm up on ``warmup.fraction`` of ``data`` into ``<out>/warmup`` (reused if done).
        learning_rates: override the checkpoints' learning rates (one per checkpoint).
        gradient_type: 'adam' (candidates, LESS) or 'sgd' (targets).
        d, seed, seed_mode, kind: the projection (seed_t = seed + t, or seed for every t).
        normalise: unit-normalise each (example, checkpoint) block (LESS does).
        apply_checkpoint_weights: multiply block t by sqrt(w_t) in the store.
        dtype: the store's dtype, 'float32' or 'float16'.
        batch_size: examples per vmap'd backward; shard_size: rows per store shard.
        backend: K1 backend ("auto": the Triton kernel on CUDA, the torch path on CPU).
        projection_cache_mb: on the torch (CPU) path, regenerating Pi for every batch dominates
            the cost, so each checkpoint's Pi (P x d float32 per distinct seed) is materialised
            once with ``projection_matrix`` when it fits in this many MiB (0: never). The Triton
            path always generates Pi in-kernel.
        shards: compute only these shard indices (split a collection across jobs); the returned
            store is then possibly incomplete (opened with allow_incomplete).
        on_shard_written: called with each shard index after it is durably written.
        coordinator: set by :func:`.distributed.collect_distributed` on each rank of a
            multi-process collection (its hooks: wait for rank 0's warm-up, announce it, split
            the missing shards); None in a single process.

    Raises:
        InputError: a bad option, data file, checkpoint folder or model source, before any model
            or tokenizer loads (the options, then the data, then the checkpoints, then the model);
            for classification, a decoder classifier whose ``config.pad_token_id`` is set and differs
            from the tokenizer's pad id (an unset one is set to it), before any training or collection.
        StoreError: ``out`` is a store that cannot be resumed with these settings.
    """
    # Every option, the data, the checkpoints and the model source are checked here, before any
    # model or tokenizer loads, so a mistake is one clear InputError (or StoreError) up front.
    if task not in ("causal_lm", "classification"):
        raise InputError(f"task must be 'causal_lm' or 'classification', got {task!r}")
    if gradient_type not in GRADIENT_TYPES:
        raise InputError(f"gradient_type must be one of {GRADIENT_TYPES}, got {gradient_type!r}")
    if seed_mode not in SEED_MODES:
        raise InputError(f"seed_mode must be one of {SEED_MODES}, got {seed_mode!r}")
    if kind not in ("rademacher", "gaussian"):
        raise InputError(f"kind must be 'rademacher' or 'gaussian', got {kind!r}")
    if dtype not in STORE_DTYPES:
        raise InputError(f"dtype (of the store) must be one of {STORE_DTYPES}, got {dtype!r}")
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _positive_int("d (projected dimensions per checkpoint)", d)
    _positive_int("batch_size", batch_size)
    _positive_int("shard_size", shard_size)
    _positive_int("max_length", max_length)
    _positive_int("vmap_chunk_size", vmap_chunk_size, allow_none=True)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise InputError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    seed = int(seed)
    if (isinstance(projection_cache_mb, bool) or not isinstance(projection_cache_mb, numbers.Real)
            or not projection_cache_mb >= 0):
        raise InputError(f"projection_cache_mb must be a number >= 0, got {projection_cache_mb!r}")
    if learning_rates is not None:
        learning_rates = list(learning_rates)
        if not learning_rates or not all(isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0 for lr in learning_rates):
            raise InputError(f"learning_rates must be positive numbers, one per checkpoint, got {learning_rates!r}")
    if shards is not None:
        shards = list(shards)
        if not shards:
            raise InputError("shards: no shard index given")
        bad = [x for x in shards if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0]
        if bad:
            raise InputError(f"shards must be shard indices (integers >= 0), got {bad[0]!r}")
    if warmup is not None and not isinstance(warmup, WarmupSettings):
        raise InputError(f"warmup must be a WarmupSettings, got {type(warmup).__name__}")
    is_path = isinstance(model, (str, os.PathLike))
    if not is_path and not isinstance(model, torch.nn.Module) and not callable(model):
        raise InputError(f"model must be a path, an nn.Module or a zero-argument factory, got {type(model).__name__}")
    if tokenizer is None and not is_path:
        raise InputError("tokenizer: required when model is not a model folder")
    from ..ops._dispatch import resolve_backend
    from ..ops.project import project  # K1; imported here so the rest of collect works without it

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"out: {out} is a file; the store is a folder")
    from ..io import check_output_folder

    check_output_folder(out, "out")  # a read-only file system, no permission: before any work
    if not resume and (out / MANIFEST).exists():
        raise StoreError(f"store {out} already exists (resume it, or choose a new folder)")
    device = _resolve_device(device)
    model_dtype = _resolve_dtype(model_dtype)
    try:
        resolve_backend(backend, torch.empty(0, device=device))
    except (RuntimeError, ValueError) as error:
        raise InputError(f"backend: {_first_line(error)}") from None

    # The data, before any model or tokenizer: file, JSON, ids and the fields the task reads.
    examples = read_jsonl(data, fmt) if isinstance(data, (str, os.PathLike)) else as_examples(data, fmt)
    if not examples:
        raise InputError(f"data: no examples in {data}" if isinstance(data, (str, os.PathLike)) else "data: no examples")
    check_examples(examples, task, fmt)
    n_shards = -(-len(examples) // shard_size)
    if shards is not None and max(shards) >= n_shards:
        raise InputError(f"shards: index {max(shards)} out of range; {len(examples)} examples make {n_shards} shard(s) "
                         f"of {shard_size} rows (indices 0..{n_shards - 1})")

    # Checkpoints: given, or a (possibly finished) warm-up of our own.
    if coordinator is not None:
        coordinator.wait_for_checkpoints()  # ranks > 0: rank 0 warms up (once) and says when it is done
    warmup_dir = Path(checkpoints) if checkpoints is not None else out / "warmup"
    warm_manifest = read_warmup_manifest(warmup_dir) if warmup_dir.is_dir() else None
    if warm_manifest is not None and warm_manifest.get("task", task) != task:
        raise InputError(f"checkpoints: {warmup_dir} was trained for task {warm_manifest.get('task')!r}, not {task!r}")
    ckpts = None
    if checkpoints is not None or warm_manifest is not None:
        ckpts = load_checkpoints(warmup_dir, learning_rates)
        t_expected = len(ckpts)
    else:
        t_expected = (warmup or WarmupSettings()).epochs
        if learning_rates is not None and len(learning_rates) != t_expected:
            raise InputError(f"learning_rates: {len(learning_rates)} values for the {t_expected} checkpoints the warm-up saves")
    if seed + t_expected > 2**64:
        raise InputError(f"seed: {seed} + {t_expected} checkpoints leaves [0, 2^64)")
    if ckpts is not None and gradient_type == "adam":
        lacking = [c.name for c in ckpts if not (Path(c.path) / "optimizer.pt").is_file()]
        if lacking:
            raise InputError(f"checkpoints: {lacking[0]} in {warmup_dir} has no optimizer.pt, so Adam-preconditioned "
                             "gradients are impossible (collect targets with gradient_type 'sgd')")
    _check_resumable(out, resume, len(examples), [e.id for e in examples], d, dtype, shard_size, task, gradient_type,
                     kind, seed, seed_mode, normalise, apply_checkpoint_weights)

    # Only now the model (offline: a local folder or the local HF cache) and the tokenizer.
    config = _check_model_source(model) if is_path else None
    _check_task_fits_config(config, task, _model_name(model))
    if isinstance(model, torch.nn.Module):
        _check_lm_head_loaded(model, [], task, _model_name(model))
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _load_tokenizer(model if tokenizer is None else tokenizer)
    pad_id = pad_token_id(tokenizer)
    if task == "classification":  # a decoder classifier's pad id must be the batches' (a factory's: when built)
        if is_path:
            check_pad_token_id(config, pad_id, task, f"model {_model_name(model)}")
        elif isinstance(model, torch.nn.Module):
            check_pad_token_id(model, pad_id, task, f"model {_model_name(model)}")
    label2id = None
    if task == "classification":
        label2id = (warm_manifest or {}).get("label2id") or label_mapping(examples, fmt)
    tokenized = tokenize_all(examples, tokenizer, task, fmt, max_length, label2id)
    # what each shard's rows are computed from; a resume must find the shards it keeps unchanged
    input_digests = [shard_input_digest(tokenized[s * shard_size : (s + 1) * shard_size]) for s in range(n_shards)]
    _check_inputs_unchanged(out, input_digests, [e.id for e in examples], shard_size)
    projector, calibration = None, None
    if warm_manifest is not None:
        settings = settings_from_json(warm_manifest["settings"])
        lora = settings.lora
    elif checkpoints is not None:
        settings, lora = None, (warmup or WarmupSettings()).lora  # peft adapters: LoRA settings are in the adapter
    else:
        settings = warmup or WarmupSettings()
        lora = settings.lora
        trainee = wrap_for_training(_build_model(model, task, label2id, model_dtype, settings.seed, progress, pad_id), task, lora)
        if progress:  # the plan, with a time and memory estimate, before the warm-up
            trainee.to(device)
            names = list(trainable_parameters(trainee))
            params = trainable_parameters(trainee)
            seeds = [seed + t if seed_mode == "per_checkpoint" else seed for t in range(t_expected)]
            projector = _Projector(project, names, {n: params[n].numel() for n in names}, d, kind, backend, device,
                                   sorted(set(seeds)), projection_cache_mb)
            todo = [s for s in range(n_shards) if shards is None or s in set(shards)]
            calibration = _calibrate(trainee, tokenized, task, pad_id, batch_size, params, None, names, projector, d,
                                     seeds[0], normalise, vmap_chunk_size, device)
            for line in _plan_lines(calibration, tokenized, len(tokenized), t_expected, d, max_length, batch_size,
                                    shard_size, todo, n_shards, sum(x.numel() for x in params.values()), _adapter(lora),
                                    gradient_type, settings, projector, device):
                print(line, flush=True)
            del params
        warmup_train(trainee, tokenized, warmup_dir, task, pad_id, settings, label2id, device, progress)
        del trainee
    if ckpts is None:
        ckpts = load_checkpoints(warmup_dir, learning_rates)
    if coordinator is not None:
        coordinator.checkpoints_ready()

    # The model whose forward is differentiated; each checkpoint's trainable values are passed in.
    net = _build_model(model, task, label2id, model_dtype, settings.seed if settings else 0, progress, pad_id)
    if ckpts[0].layout == "peft":
        from peft import PeftModel

        try:
            net = PeftModel.from_pretrained(net, ckpts[0].path, is_trainable=True, local_files_only=True)
        except pickle.UnpicklingError as error:  # refused by torch.load(weights_only=True): nothing ran
            raise InputError(f"checkpoints: the peft adapter in {ckpts[0].path} was refused, it holds pickled Python "
                             f"objects besides tensors, which are never loaded ({refused_pickle_reason(error)})") from None
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise InputError(f"checkpoints: cannot load the peft adapter {ckpts[0].path} onto "
                             f"{_model_name(model)} ({_first_line(error)})") from None
    else:
        net = wrap_for_training(net, task, lora)
    net.to(device).eval()
    # vmap has no batching rule for the fused SDPA backward and would loop over examples.
    if hasattr(net, "set_attn_implementation"):
        try:
            net.set_attn_implementation("eager")
        except (ValueError, NotImplementedError):
            pass
    names = list(trainable_parameters(net))
    states = [load_trainable_state(c, net) for c in ckpts]
    moments = None
    shapes = {n: tuple(states[0][n].shape) for n in names}  # checks which moments belong to which parameter
    if gradient_type == "adam":
        moments = [{n: (m.to(device, torch.float32).reshape(-1), v.to(device, torch.float32).reshape(-1))
                    for n, (m, v) in load_adam_moments(c, names, shapes).items()} for c in ckpts]

    t_count = len(ckpts)
    weights = checkpoint_weights(ckpts)
    scales = [math.sqrt(w) if apply_checkpoint_weights else 1.0 for w in weights]
    seeds = [seed + t if seed_mode == "per_checkpoint" else seed for t in range(t_count)]
    spec = StoreSpec(n=len(tokenized), t=t_count, d=d, example_ids=[x.id for x in tokenized], dtype=dtype, shard_size=shard_size, metadata={
        "model": _model_name(model), "task": task, "label2id": label2id,
        "checkpoints": [str(Path(c.path).resolve()) for c in ckpts], "learning_rates": [c.learning_rate for c in ckpts],
        "checkpoint_weights": weights, "weights_applied": apply_checkpoint_weights, "block_scales": scales,
        "gradient_type": gradient_type, "normalisation": "unit" if normalise else "none",
        "projection": {"kind": kind, "seed": seed, "seeds": seeds, "seed_mode": seed_mode, "d": d},
        "trainable_parameters": int(sum(states[0][n].numel() for n in names)),
        "max_length": max_length, "format": asdict(fmt),
        "data": str(Path(data).resolve()) if isinstance(data, (str, os.PathLike)) else "in-memory records",
    })
    writer = TrajectoryStoreWriter(out, spec, resume=resume)
    sizes = {n: states[0][n].numel() for n in names}
    if projector is None or projector.key != _Projector.key_of(names, sizes, sorted(set(seeds))):
        projector = _Projector(project, names, sizes, d, kind, backend, device, sorted(set(seeds)), projection_cache_mb)
    todo = writer.missing_shards()
    if shards is not None:
        wanted = set(int(s) for s in shards)
        todo = [s for s in todo if s in wanted]
    if coordinator is not None:
        todo = coordinator.assign_shards(todo)  # this rank's share, from one list every rank agrees on
    if progress and todo and calibration is None:  # the plan, before any gradient is collected
        calibration = _calibrate(net, tokenized, task, pad_id, batch_size, states[0], moments[0] if moments else None,
                                 names, projector, d, seeds[0], normalise, vmap_chunk_size, device)
        for line in _plan_lines(calibration, tokenized, spec.n, t_count, d, max_length, batch_size, shard_size, todo,
                                spec.n_shards, spec.metadata["trainable_parameters"],
                                "peft adapter" if ckpts[0].layout == "peft" else _adapter(lora),
                                gradient_type, None, projector, device):
            print(line, flush=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        done_rows = spec.n - sum(spec.shard_rows(s)[1] - spec.shard_rows(s)[0] for s in writer.missing_shards())
        bar = tqdm(total=spec.n, initial=done_rows, desc=f"collect {gradient_type} T={t_count} d={d}", unit="ex", dynamic_ncols=True)
    for shard in todo:
        start, stop = spec.shard_rows(shard)
        rows = torch.empty(stop - start, t_count, d, dtype=torch.float32, device=device)
        for b0 in range(start, stop, batch_size):
            b1 = min(stop, b0 + batch_size)
            batch = {k: v.to(device) for k, v in collate(tokenized[b0:b1], pad_id).items()}
            for t in range(t_count):
                rows[b0 - start : b1 - start, t] = _project_checkpoint(
                    net, batch, task, states[t], moments[t] if moments else None, names, projector,
                    d, seeds[t], scales[t], normalise, vmap_chunk_size)
            if bar is not None:
                bar.update(b1 - b0)
        if not torch.isfinite(rows).all():
            raise InputError(f"shard {shard}: the gradients of rows {start}..{stop - 1} are not finite (NaN/Inf); "
                             "check the model and checkpoints (a diverged warm-up? try model_dtype float32)")
        writer.write_shard(shard, rows.cpu().numpy(), input_sha256=input_digests[shard])
        if on_shard_written is not None:
            on_shard_written(shard)
    if bar is not None:
        bar.close()
    if writer.missing_shards():
        return open_store(out, allow_incomplete=True)
    return writer.finish()


def _project_checkpoint(
    net: torch.nn.Module, batch: dict[str, torch.Tensor], task: str, state: dict[str, torch.Tensor],
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]] | None, names: Sequence[str], projector: "_Projector",
    d: int, seed: int, scale: float, normalise: bool, chunk_size: int | None,
) -> torch.Tensor:
    """(B, d) block for one checkpoint: per-example gradients, Adam direction, K1 projection
    parameter by parameter (global feature offsets), then normalisation and the block scale."""
    grads = per_example_gradients(net, batch, task, params=state, chunk_size=chunk_size)
    n_rows = batch["input_ids"].shape[0]
    block = torch.zeros(n_rows, d, dtype=torch.float32, device=batch["input_ids"].device)
    for name in names:
        flat = grads[name].reshape(n_rows, -1)
        if moments is not None:
            exp_avg, exp_avg_sq = moments[name]
            flat = adam_precondition(flat.float(), exp_avg, exp_avg_sq)
        if flat.dtype == torch.float64:  # K1 takes fp32/fp16/bf16
            flat = flat.float()
        projector(flat.contiguous(), name, seed, block, 1.0 if normalise else scale)
    if normalise:
        norms = block.norm(dim=1, keepdim=True)
        block = torch.where(norms > 0, block / norms.clamp_min(torch.finfo(torch.float32).tiny), block) * scale
    return block


class _Projector:
    """K1 for one parameter at its global feature offset: ``project`` (in-kernel Pi), or on the
    torch path a cached dense ``projection_matrix`` (same Pi entries) when it fits the budget."""

    def __init__(self, project: Callable[..., torch.Tensor], names: Sequence[str], sizes: dict[str, int], d: int,
                 kind: str, backend: str, device: torch.device, seeds: Sequence[int], cache_mb: float):
        from ..ops._dispatch import resolve_backend
        from ..ops.project import projection_matrix

        self.project, self.d, self.kind, self.backend = project, d, kind, backend
        self.key = self.key_of(names, sizes, seeds)
        self.offsets: dict[str, int] = {}
        offset = 0
        for name in names:
            self.offsets[name] = offset
            offset += sizes[name]
        self.cache: dict[tuple[int, str], torch.Tensor] = {}
        probe = torch.empty(0, device=device)
        cache_bytes = len(seeds) * offset * d * 4
        if resolve_backend(backend, probe) == "torch" and cache_bytes <= cache_mb * 2**20:
            for seed in seeds:
                for name in names:
                    self.cache[(seed, name)] = projection_matrix(
                        d, sizes[name], seed, kind, self.offsets[name], dtype=torch.float32, device=device).T.contiguous()

    @staticmethod
    def key_of(names: Sequence[str], sizes: dict[str, int], seeds: Sequence[int]) -> tuple:
        """What a projector depends on besides d, kind, backend and device (fixed per collection)."""
        return tuple(names), tuple(sizes[n] for n in names), tuple(seeds)

    def __call__(self, flat: torch.Tensor, name: str, seed: int, block: torch.Tensor, scale: float) -> None:
        cached = self.cache.get((seed, name))
        if cached is not None:
            block.addmm_(flat.float(), cached, alpha=scale)
        else:
            # no per-call finiteness check (a host sync per parameter): each shard is checked whole
            self.project(flat, self.d, seed, kind=self.kind, feature_offset=self.offsets[name], out=block,
                         scale=scale, backend=self.backend, check_finite=False)


def add_collect_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``gtp collect`` options (the CLI owner adds them to its sub-parser)."""
    parser.add_argument("--model", required=True,
                        help="Hugging Face model folder, or a model id already in the local HF cache (loaded offline, never downloaded)")
    parser.add_argument("--data", required=True,
                        help="JSON-lines file of examples, a dataset saved with save_to_disk, or a parquet file")
    parser.add_argument("--out", required=True, help="store folder (created, or resumed if it exists)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model; loaded offline)")
    parser.add_argument("--task", choices=("causal_lm", "classification"), default="causal_lm")
    parser.add_argument("--checkpoints", default=None, help="existing warm-up folder (default: warm up into OUT/warmup)")
    parser.add_argument("--learning-rates", default=None, metavar="LR1,LR2,...", help="override the checkpoints' learning rates")
    parser.add_argument("--gradient-type", choices=GRADIENT_TYPES, default="adam", help="adam: candidates (LESS); sgd: targets")
    parser.add_argument("--d", type=int, default=8192, help="projected dimensions per checkpoint (default 8192)")
    parser.add_argument("--seed", type=int, default=0, help="projection seed (checkpoint t uses seed+t unless --shared-seed)")
    parser.add_argument("--shared-seed", action="store_true", help="one projection for every checkpoint (as LESS)")
    parser.add_argument("--kind", choices=("rademacher", "gaussian"), default="rademacher")
    parser.add_argument("--no-normalise", action="store_true", help="keep projected norms (default: unit-normalise each checkpoint block)")
    parser.add_argument("--no-checkpoint-weights", action="store_true", help="record, but do not apply, sqrt(w_t) to the blocks")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="store dtype")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per batched backward")
    parser.add_argument("--vmap-chunk-size", type=int, default=None, help="bound memory: examples per vmap chunk")
    parser.add_argument("--shard-size", type=int, default=1024, help="rows per store shard (the resume unit)")
    parser.add_argument("--shards", default=None, metavar="I,J,...", help="compute only these shards (split across jobs)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model-dtype", default=None, help="float32 | bfloat16 | float16 (default: as saved)")
    parser.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto", help="projection kernel")
    parser.add_argument("--projection-cache-mb", type=float, default=1024.0,
                        help="CPU path: materialise Pi once if it fits in this many MiB (default 1024; 0 = never)")
    parser.add_argument("--warmup-fraction", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=int, default=4, help="T: checkpoints saved, one per epoch")
    parser.add_argument("--warmup-lr", type=float, default=2e-5)
    parser.add_argument("--warmup-batch-size", type=int, default=8)
    parser.add_argument("--warmup-seed", type=int, default=0)
    parser.add_argument("--full-finetune", action="store_true", help="warm up every parameter instead of LoRA")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--lora-targets", default=None, metavar="q_proj,v_proj", help="modules to adapt (default: peft's)")
    parser.add_argument("--id-field", default="id")
    parser.add_argument("--messages-field", default="messages")
    parser.add_argument("--prompt-field", default="instruction")
    parser.add_argument("--response-field", default="response")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--label-field", default="label")
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--no-resume", action="store_true", help="refuse to continue an existing store")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _csv(text: str | None, kind: Callable[[str], Any], option: str = "", example: str = "") -> list[Any] | None:
    """Parse a comma-separated option value; a bad item is an InputError naming the option."""
    if text is None:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        values = [kind(x) for x in items]
    except ValueError:
        what = "numbers" if kind is float else "integers" if kind is int else "values"
        raise InputError(f"{option or 'value'}: expected comma-separated {what}{f' like {example}' if example else ''}, "
                         f"got {text!r}") from None
    if not values:
        raise InputError(f"{option or 'value'}: empty list {text!r}{f'; expected e.g. {example}' if example else ''}")
    return values


def collect_from_args(args: argparse.Namespace) -> TrajectoryStore:
    """Run :func:`collect_trajectory` from parsed ``add_collect_arguments`` options.

    Option values are parsed here and checked (with the data, checkpoints and model source) by
    :func:`collect_trajectory` before anything loads; mistakes raise :class:`InputError`.
    """
    shards = _csv(args.shards, int, "--shards", "0,2,5")
    learning_rates = _csv(args.learning_rates, float, "--learning-rates", "2e-5,1e-5")
    targets = _csv(args.lora_targets, str, "--lora-targets", "q_proj,v_proj") if args.lora_targets else None
    lora = None if args.full_finetune else LoraSettings(
        r=args.lora_r, alpha=args.lora_alpha, target_modules=tuple(targets) if targets else None)
    warmup = WarmupSettings(fraction=args.warmup_fraction, epochs=args.warmup_epochs, learning_rate=args.warmup_lr,
                            batch_size=args.warmup_batch_size, seed=args.warmup_seed, lora=lora)
    fmt = ExampleFormat(id_field=args.id_field, messages_field=args.messages_field, prompt_field=args.prompt_field,
                        response_field=args.response_field, text_field=args.text_field, label_field=args.label_field,
                        use_chat_template=not args.no_chat_template)
    from .distributed import collect_distributed, is_main_process

    started = time.perf_counter()
    # under torchrun (WORLD_SIZE > 1) every rank fills its share of one store; else collect_trajectory
    store = collect_distributed(
        args.model, args.data, args.out, tokenizer=args.tokenizer, task=args.task, checkpoints=args.checkpoints,
        learning_rates=learning_rates, warmup=warmup, gradient_type=args.gradient_type, d=args.d,
        seed=args.seed, seed_mode="shared" if args.shared_seed else "per_checkpoint", kind=args.kind,
        normalise=not args.no_normalise, apply_checkpoint_weights=not args.no_checkpoint_weights, dtype=args.dtype,
        batch_size=args.batch_size, shard_size=args.shard_size, max_length=args.max_length, fmt=fmt, device=args.device,
        model_dtype=args.model_dtype, vmap_chunk_size=args.vmap_chunk_size, backend=args.backend,
        projection_cache_mb=args.projection_cache_mb,
        resume=not args.no_resume, progress=not args.quiet, shards=shards,
    )
    if not args.quiet and is_main_process():
        state = "complete" if store.manifest["complete"] else "incomplete (other shards pending)"
        print(f"store {store.path}: N={store.n} T={store.t} d={store.d} {store.dtype} {state} "
              f"in {time.perf_counter() - started:.1f} s")
    return store
