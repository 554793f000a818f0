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
run resumes at the first missing shard (:mod:`.resume`).

:func:`collect_trajectory` runs its stages top to bottom, each a function below: options
(:func:`check_options`), plan (data, checkpoints, resumability; nothing loaded yet), model
inputs (model source, tokenizer, tokenised examples; model-family rules in :mod:`.models`),
warm-up (:mod:`.warmup`), the gradient model, the store spec, the projection
(:class:`.projector.Projector`) and the shards (:func:`.gradients.shard_rows`, one shard at a
time: the unit a job or a rank computes). The plan and its time estimate (:mod:`.calibration`)
print before the warm-up and before the gradients. Candidates and targets must use the same checkpoints
and projection: collect the pool first (it runs the warm-up into ``<out>/warmup``), then the
targets with ``checkpoints=<pool store>/warmup`` and ``gradient_type="sgd"``.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..validation import SEED_LIMIT, InputError, check_backend, check_choice, check_int, check_real, resolve_device
from . import models
from .calibration import adapter_description, calibrate, plan_lines
from .data import (
    ExampleFormat, TokenizedExample, as_examples, check_examples, label_mapping, pad_token_id, read_jsonl, tokenize_all,
)
from .gradients import Moments, shard_rows
from .per_example import trainable_parameters
from .projector import Projector
from .resume import check_inputs_unchanged, check_resumable, shard_input_digest
from .store import (
    MANIFEST, STORE_DTYPES, StoreError, StoreSpec, TrajectoryStore, TrajectoryStoreWriter, open_store, read_manifest,
)
from .warmup import (
    Checkpoint, LoraSettings, WarmupSettings, checkpoint_weights, load_adam_moments, load_checkpoints,
    load_trainable_state, read_warmup_manifest, settings_from_json, warmup_losses, warmup_train,
    warn_if_warmup_did_not_learn, wrap_for_training,
)

GRADIENT_TYPES = ("adam", "sgd")
SEED_MODES = ("per_checkpoint", "shared")
KINDS = ("rademacher", "gaussian")
BACKENDS = ("auto", "triton", "torch")
SIZE_LIMIT = 2**31 - 1  # sizes (d, rows per batch or shard, tokens): beyond it torch's shapes overflow or nothing fits


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return resolve_device(device, "device")


@dataclass(frozen=True)
class CollectOptions:
    """The checked options of one collection (:func:`collect_trajectory`'s keywords, see there)."""

    task: str
    gradient_type: str
    d: int
    seed: int
    seed_mode: str
    kind: str
    normalise: bool
    apply_checkpoint_weights: bool
    dtype: str
    batch_size: int
    shard_size: int
    max_length: int
    fmt: ExampleFormat
    vmap_chunk_size: int | None
    backend: str
    projection_cache_mb: float
    resume: bool
    progress: bool
    learning_rates: list[float] | None
    shards: list[int] | None
    warmup: WarmupSettings | None

    def seeds(self, t_count: int) -> list[int]:
        """seed_t per checkpoint: seed + t ("per_checkpoint") or seed ("shared")."""
        return [self.seed + t if self.seed_mode == "per_checkpoint" else self.seed for t in range(t_count)]


@dataclass
class _Plan:
    """What the options, the data and the checkpoints decide, before any model or tokenizer loads."""

    out: Path
    device: torch.device
    model_dtype: torch.dtype | None
    examples: list
    n_shards: int
    warmup_dir: Path
    warm_manifest: dict[str, Any] | None
    checkpoints: list[Checkpoint] | None  # None: the warm-up is still to run
    t_count: int


@dataclass
class _Inputs:
    """The examples as the model sees them."""

    tokenizer: Any
    pad_id: int
    label2id: dict[str, int] | None
    tokenized: list[TokenizedExample]
    input_digests: list[str]  # per shard: what its rows are computed from
    num_classes: int | None = None  # the warm-up check's C: K labels or V tokens (None: unknown, or K < 2)


@dataclass
class _WarmUp:
    """The trajectory's checkpoints, and how they were trained."""

    settings: WarmupSettings | None  # None: foreign peft checkpoints (their LoRA settings are in the adapter)
    lora: LoraSettings | None
    checkpoints: list[Checkpoint]
    projector: Projector | None = None  # made for the plan before the warm-up, reused when it fits
    calibration: dict[str, float] | None = None
    losses: dict[str, Any] | None = None  # the warm-up's training losses (warmup_losses); None: not recorded


@dataclass
class _GradientModel:
    """The model whose forward is differentiated, and each checkpoint's trainable values."""

    net: torch.nn.Module
    names: list[str]
    states: list[dict[str, torch.Tensor]]
    moments: list[Moments] | None  # per checkpoint, "adam" only


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

    A rerun with nothing left to write (every shard, or every one of ``shards``, written) returns
    the store after the options, data, inputs and spec checks, without building the model.

    Warns:
        WarmupDidNotLearnWarning: on rank 0, when the warm-up's recorded losses say it did not
            learn (:func:`.warmup.warmup_progress_report`, judged against chance ln C: C = the
            label count, or for a causal LM the vocabulary: the model's LM-head rows or config
            ``vocab_size``, the tokenizer's length for a factory).

    Raises:
        InputError: a bad option, data file, checkpoint folder or model source, before any model
            or tokenizer loads (the options, then the data, then the checkpoints, then the model);
            for classification, a decoder classifier whose ``config.pad_token_id`` is set and differs
            from the tokenizer's pad id (an unset one is set to it), before any training or collection.
        StoreError: ``out`` is a store that cannot be resumed with these settings.
    """
    # Every option, the data, the checkpoints and the model source are checked before any model
    # or tokenizer loads, so a mistake is one clear InputError (or StoreError) up front.
    opts = check_options(
        task=task, gradient_type=gradient_type, d=d, seed=seed, seed_mode=seed_mode, kind=kind, normalise=normalise,
        apply_checkpoint_weights=apply_checkpoint_weights, dtype=dtype, batch_size=batch_size, shard_size=shard_size,
        max_length=max_length, fmt=fmt, vmap_chunk_size=vmap_chunk_size, backend=backend,
        projection_cache_mb=projection_cache_mb, resume=resume, progress=progress, learning_rates=learning_rates,
        shards=shards, warmup=warmup)
    _check_model_argument(model, tokenizer)
    plan = _plan(data, out, checkpoints, device, model_dtype, opts, coordinator)
    inputs = _model_inputs(model, tokenizer, plan, opts)
    warm = _warm_up(model, plan, inputs, opts)
    if coordinator is None or coordinator.rank == 0:  # one warning, not one per rank
        warn_if_warmup_did_not_learn(warm.losses, opts.task, inputs.num_classes, warm.settings, stacklevel=2)
    if coordinator is not None:
        coordinator.checkpoints_ready()
    finished = _finished_store(model, data, plan, inputs, warm, opts, coordinator)
    if finished is not None:  # a rerun on a store with nothing left to do: no model is built
        return finished
    grad_model = _gradient_model(model, plan, inputs, warm, opts)
    spec, seeds, scales = _store_spec(model, data, warm, inputs, _trainable_count(grad_model), opts)
    projector = _projection(warm.projector, grad_model, seeds, plan.device, opts)
    writer = TrajectoryStoreWriter(plan.out, spec, resume=opts.resume)
    todo = writer.missing_shards()
    if opts.shards is not None:
        todo = [s for s in todo if s in set(opts.shards)]
    if coordinator is not None:
        todo = coordinator.assign_shards(todo)  # this rank's share, from one list every rank agrees on
    if opts.progress and todo:  # the plan, before any gradient is collected
        _print_collection_plan(warm, grad_model, inputs, spec, todo, projector, seeds, plan.device, opts)
    _write_shards(writer, spec, todo, grad_model, inputs, projector, seeds, scales, plan.device, opts, on_shard_written)
    if writer.missing_shards():
        return open_store(plan.out, allow_incomplete=True)
    return writer.finish()


def check_options(*, task: str, gradient_type: str, d: int, seed: int, seed_mode: str, kind: str, normalise: bool,
                  apply_checkpoint_weights: bool, dtype: str, batch_size: int, shard_size: int, max_length: int,
                  fmt: ExampleFormat, vmap_chunk_size: int | None, backend: str, projection_cache_mb: float,
                  resume: bool, progress: bool, learning_rates: Sequence[float] | None, shards: Sequence[int] | None,
                  warmup: WarmupSettings | None) -> CollectOptions:
    """The options of :func:`collect_trajectory`, checked (InputError naming the first bad one)."""
    models.check_task(task)
    check_choice(gradient_type, "gradient_type", GRADIENT_TYPES)
    check_choice(seed_mode, "seed_mode", SEED_MODES)
    check_choice(kind, "kind", KINDS)
    check_choice(dtype, "dtype (of the store)", STORE_DTYPES)
    check_choice(backend, "backend", BACKENDS)
    d = check_int(d, "d (projected dimensions per checkpoint)", low=1, high=SIZE_LIMIT)
    batch_size = check_int(batch_size, "batch_size", low=1, high=SIZE_LIMIT)
    shard_size = check_int(shard_size, "shard_size", low=1, high=SIZE_LIMIT)
    max_length = check_int(max_length, "max_length", low=1, high=SIZE_LIMIT)
    if vmap_chunk_size is not None:
        vmap_chunk_size = check_int(vmap_chunk_size, "vmap_chunk_size", low=1, high=SIZE_LIMIT)
    try:
        seed = check_int(seed, "seed", low=0, high=SEED_LIMIT - 1)
    except InputError:
        raise InputError(f"seed must be an integer in [0, 2^64), got {seed!r}") from None
    projection_cache_mb = check_real(projection_cache_mb, "projection_cache_mb", low=0.0, finite=False)
    if learning_rates is not None:
        learning_rates = list(learning_rates)
        if not learning_rates or not all(isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0
                                         for lr in learning_rates):
            raise InputError(f"learning_rates must be positive numbers, one per checkpoint, got {learning_rates!r}")
    if shards is not None:
        shards = [check_int(x, "shards", low=0) for x in shards]
        if not shards:
            raise InputError("shards: no shard index given")
    if warmup is not None and not isinstance(warmup, WarmupSettings):
        raise InputError(f"warmup must be a WarmupSettings, got {type(warmup).__name__}")
    return CollectOptions(task, gradient_type, d, seed, seed_mode, kind, normalise, apply_checkpoint_weights, dtype,
                          batch_size, shard_size, max_length, fmt, vmap_chunk_size, backend, projection_cache_mb,
                          resume, progress, learning_rates, shards, warmup)


def _check_model_argument(model: Any, tokenizer: Any) -> None:
    if not isinstance(model, (str, os.PathLike, torch.nn.Module)) and not callable(model):
        raise InputError(f"model must be a path, an nn.Module or a zero-argument factory, got {type(model).__name__}")
    if tokenizer is None and not isinstance(model, (str, os.PathLike)):
        raise InputError("tokenizer: required when model is not a model folder")


def _plan(data: Any, out: Any, checkpoints: Any, device: Any, model_dtype: Any, opts: CollectOptions,
          coordinator: Any = None) -> _Plan:
    """Stage 1, before any model or tokenizer: the output folder, the device, the data (file, JSON,
    ids and the fields the task reads), the checkpoints (given, or a possibly finished warm-up of
    our own) and whether an existing store there can be resumed."""
    from ..files import check_output_folder

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"out: {out} is a file; the store is a folder")
    check_output_folder(out, "out")  # a read-only file system, no permission: before any work
    if not opts.resume and (out / MANIFEST).exists():
        raise StoreError(f"store {out} already exists (resume it, or choose a new folder)")
    device = _resolve_device(device)
    model_dtype = models.resolve_model_dtype(model_dtype)
    check_backend(opts.backend, device)  # 'triton' needs triton, and on the CPU its interpreter

    is_file = isinstance(data, (str, os.PathLike))
    examples = read_jsonl(data, opts.fmt) if is_file else as_examples(data, opts.fmt)
    if not examples:
        raise InputError(f"data: no examples in {data}" if is_file else "data: no examples")
    check_examples(examples, opts.task, opts.fmt)
    n_shards = -(-len(examples) // opts.shard_size)
    if opts.shards is not None and max(opts.shards) >= n_shards:
        raise InputError(f"shards: index {max(opts.shards)} out of range; {len(examples)} examples make {n_shards} "
                         f"shard(s) of {opts.shard_size} rows (indices 0..{n_shards - 1})")

    if coordinator is not None:
        coordinator.wait_for_checkpoints()  # ranks > 0: rank 0 warms up (once) and says when it is done
    warmup_dir = Path(checkpoints) if checkpoints is not None else out / "warmup"
    warm_manifest = read_warmup_manifest(warmup_dir) if warmup_dir.is_dir() else None
    if warm_manifest is not None and warm_manifest.get("task", opts.task) != opts.task:
        raise InputError(f"checkpoints: {warmup_dir} was trained for task {warm_manifest.get('task')!r}, not {opts.task!r}")
    ckpts = None
    if checkpoints is not None or warm_manifest is not None:
        ckpts = load_checkpoints(warmup_dir, opts.learning_rates)
        t_count = len(ckpts)
    else:
        t_count = (opts.warmup or WarmupSettings()).epochs
        if opts.learning_rates is not None and len(opts.learning_rates) != t_count:
            raise InputError(f"learning_rates: {len(opts.learning_rates)} values for the {t_count} checkpoints "
                             "the warm-up saves")
    if opts.seed + t_count > SEED_LIMIT:
        raise InputError(f"seed: {opts.seed} + {t_count} checkpoints leaves [0, 2^64)")
    if ckpts is not None and opts.gradient_type == "adam":
        lacking = [c.name for c in ckpts if not (Path(c.path) / "optimizer.pt").is_file()]
        if lacking:
            raise InputError(f"checkpoints: {lacking[0]} in {warmup_dir} has no optimizer.pt, so Adam-preconditioned "
                             "gradients are impossible (collect targets with gradient_type 'sgd')")
    check_resumable(out, opts.resume, len(examples), [e.id for e in examples], opts.d, opts.dtype, opts.shard_size,
                    opts.task, opts.gradient_type, opts.kind, opts.seed, opts.seed_mode, opts.normalise,
                    opts.apply_checkpoint_weights)
    return _Plan(out, device, model_dtype, examples, n_shards, warmup_dir, warm_manifest, ckpts, t_count)


def _model_inputs(model: Any, tokenizer: Any, plan: _Plan, opts: CollectOptions) -> _Inputs:
    """Stage 2: the model source (offline: a local folder or the local HF cache) and whether it
    fits the task, the tokenizer, the label set, the tokenised examples; a resumed store's
    written shards must come from these very examples."""
    is_path = isinstance(model, (str, os.PathLike))
    name = models.model_name(model)
    config = models.check_model_source(model) if is_path else None
    models.check_task_fits_config(config, opts.task, name)
    if isinstance(model, torch.nn.Module):
        models.check_lm_head_loaded(model, [], opts.task, name)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = models.load_tokenizer(model if tokenizer is None else tokenizer)
    pad_id = pad_token_id(tokenizer)
    # a decoder classifier's pad id must be the batches' (a factory's: when built)
    pad_source = config if is_path else model if isinstance(model, torch.nn.Module) else None
    if pad_source is not None:
        models.check_pad_token_id(pad_source, pad_id, opts.task, f"model {name}")
    label2id = None
    if opts.task == "classification":
        label2id = (plan.warm_manifest or {}).get("label2id") or label_mapping(plan.examples, opts.fmt)
    tokenized = tokenize_all(plan.examples, tokenizer, opts.task, opts.fmt, opts.max_length, label2id)
    size = opts.shard_size
    digests = [shard_input_digest(tokenized[s * size : (s + 1) * size]) for s in range(plan.n_shards)]
    check_inputs_unchanged(plan.out, digests, [e.id for e in plan.examples], size)
    return _Inputs(tokenizer, pad_id, label2id, tokenized, digests, _class_count(model, config, tokenizer, label2id))


def _class_count(model: Any, config: Any, tokenizer: Any, label2id: dict[str, int] | None) -> int | None:
    """C for the warm-up check's chance level ln C: the K labels of a classifier (None for one
    label), the V tokens of a causal LM's vocabulary: from the model folder's config or the
    module, the tokenizer's length for a factory (not built yet)."""
    if label2id is not None:
        return len(label2id) if len(label2id) >= 2 else None
    return models.vocabulary_size(model if isinstance(model, torch.nn.Module) else config, tokenizer)


def _warm_up(model: Any, plan: _Plan, inputs: _Inputs, opts: CollectOptions) -> _WarmUp:
    """Stage 3: the checkpoints: given, finished earlier, or trained now into ``<out>/warmup``
    (after the plan and its estimate are printed)."""
    if plan.warm_manifest is not None:
        settings = settings_from_json(plan.warm_manifest["settings"])
        warm = _WarmUp(settings, settings.lora, plan.checkpoints, losses=warmup_losses(plan.warm_manifest))
    elif plan.checkpoints is not None:  # foreign peft adapters: their LoRA settings are in the adapter
        warm = _WarmUp(None, (opts.warmup or WarmupSettings()).lora, plan.checkpoints)
    else:
        settings = opts.warmup or WarmupSettings()
        warm = _WarmUp(settings, settings.lora, [])
        trainee = models.build_model(model, opts.task, inputs.label2id, plan.model_dtype, settings.seed, opts.progress,
                                     inputs.pad_id)
        trainee = wrap_for_training(trainee, opts.task, warm.lora)
        if opts.progress:  # the plan, with a time and memory estimate, before the warm-up
            trainee.to(plan.device)
            warm.projector, warm.calibration = _print_warmup_plan(trainee, plan, inputs, warm, opts)
        warmup_train(trainee, inputs.tokenized, plan.warmup_dir, opts.task, inputs.pad_id, settings, inputs.label2id,
                     plan.device, opts.progress)
        del trainee
        warm.checkpoints = load_checkpoints(plan.warmup_dir, opts.learning_rates)
        warm.losses = warmup_losses(read_warmup_manifest(plan.warmup_dir))
    return warm


def _gradient_model(model: Any, plan: _Plan, inputs: _Inputs, warm: _WarmUp, opts: CollectOptions) -> _GradientModel:
    """Stage 4: the model whose forward is differentiated (LoRA-wrapped as trained, or carrying
    the foreign adapter), in eval mode with eager attention; each checkpoint's trainable values
    and, for "adam", its optimizer moments (checked against the parameters' shapes)."""
    ckpts = warm.checkpoints
    net = models.build_model(model, opts.task, inputs.label2id, plan.model_dtype,
                             warm.settings.seed if warm.settings else 0, opts.progress, inputs.pad_id)
    if ckpts[0].layout == "peft":
        net = models.attach_checkpoint_adapter(net, ckpts[0], models.model_name(model))
    else:
        net = wrap_for_training(net, opts.task, warm.lora)
    net.to(plan.device).eval()
    models.use_eager_attention(net)
    names = list(trainable_parameters(net))
    states = [load_trainable_state(c, net) for c in ckpts]
    moments = None
    shapes = {n: tuple(states[0][n].shape) for n in names}  # checks which moments belong to which parameter
    if opts.gradient_type == "adam":
        device = plan.device
        moments = [{n: (m.to(device, torch.float32).reshape(-1), v.to(device, torch.float32).reshape(-1))
                    for n, (m, v) in load_adam_moments(c, names, shapes).items()} for c in ckpts]
    return _GradientModel(net, names, states, moments)


def _trainable_count(grad_model: _GradientModel) -> int:
    return int(sum(grad_model.states[0][n].numel() for n in grad_model.names))


def _store_spec(model: Any, data: Any, warm: _WarmUp, inputs: _Inputs, trainable_parameters: int,
                opts: CollectOptions) -> tuple[StoreSpec, list[int], list[float]]:
    """Stage 5: the store's layout and metadata, with each checkpoint's seed_t and block scale c_t.

    The warm-up's losses are recorded (``warmup_losses``) only when known, so that a store
    begun before they were recorded still resumes (its metadata must equal the spec's)."""
    ckpts = warm.checkpoints
    t_count = len(ckpts)
    weights = checkpoint_weights(ckpts)
    scales = [math.sqrt(w) if opts.apply_checkpoint_weights else 1.0 for w in weights]
    seeds = opts.seeds(t_count)
    metadata = {
        "model": models.model_name(model), "task": opts.task, "label2id": inputs.label2id,
        "checkpoints": [str(Path(c.path).resolve()) for c in ckpts], "learning_rates": [c.learning_rate for c in ckpts],
        "checkpoint_weights": weights, "weights_applied": opts.apply_checkpoint_weights, "block_scales": scales,
        "gradient_type": opts.gradient_type, "normalisation": "unit" if opts.normalise else "none",
        "projection": {"kind": opts.kind, "seed": opts.seed, "seeds": seeds, "seed_mode": opts.seed_mode, "d": opts.d},
        "trainable_parameters": trainable_parameters,
        "max_length": opts.max_length, "format": asdict(opts.fmt),
        "data": str(Path(data).resolve()) if isinstance(data, (str, os.PathLike)) else "in-memory records",
    }
    if warm.losses is not None:
        metadata["warmup_losses"] = warm.losses
    spec = StoreSpec(n=len(inputs.tokenized), t=t_count, d=opts.d, example_ids=[x.id for x in inputs.tokenized],
                     dtype=opts.dtype, shard_size=opts.shard_size, metadata=metadata)
    return spec, seeds, scales


def _finished_store(model: Any, data: Any, plan: _Plan, inputs: _Inputs, warm: _WarmUp, opts: CollectOptions,
                    coordinator: Any) -> TrajectoryStore | None:
    """The store, when this call has no shard left to write and the store provably describes this
    collection; None otherwise (then the full path runs, with every check it makes).

    The full spec is compared with the manifest as the writer compares it, except that the
    trainable-parameter count is read from the first checkpoint's trainable.safetensors instead of
    a built model: only our own checkpoint layout records exactly the trainable parameters, so peft
    adapters always take the full path. What only a built model can check (checkpoint shapes
    against the model, the Adam moments' shapes, a factory's pad id) was checked when the shards
    were written and is not repeated: a model folder edited since to other shapes is not noticed
    here (the full path would refuse the checkpoints); one edited to the same shapes is not noticed
    by either. With a coordinator, rank 0 decides for every rank (one path for all)."""
    done = False
    if coordinator is None or coordinator.rank == 0:
        done = _nothing_to_write(model, data, plan, inputs, warm, opts)
    if coordinator is not None:
        done = coordinator.decided_by_rank_0(done)
    if not done:
        return None
    return open_store(plan.out, allow_incomplete=opts.shards is not None)


def _nothing_to_write(model: Any, data: Any, plan: _Plan, inputs: _Inputs, warm: _WarmUp, opts: CollectOptions) -> bool:
    manifest_path = plan.out / MANIFEST
    if not opts.resume or not manifest_path.is_file() or warm.checkpoints[0].layout != "gtp":
        return False
    trainable = Path(warm.checkpoints[0].path) / "trainable.safetensors"
    if not trainable.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(trainable), framework="pt") as handle:  # shapes from the header: no tensor is read
            count = sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    except Exception:  # noqa: BLE001 - an unreadable checkpoint: the full path reports it
        return False
    spec, _, _ = _store_spec(model, data, warm, inputs, int(count), opts)
    manifest = read_manifest(plan.out)
    if any(manifest.get(key) != value for key, value in spec.header().items()):
        return False  # the full path raises the error it always raised
    # the writer re-checks the spec and forgets shards whose files are gone or damaged
    todo = TrajectoryStoreWriter(plan.out, spec, resume=True).missing_shards()
    if opts.shards is not None:
        todo = [s for s in todo if s in set(opts.shards)]
    return not todo


def _projection(made: Projector | None, grad_model: _GradientModel, seeds: Sequence[int], device: torch.device,
                opts: CollectOptions) -> Projector:
    """Stage 6: K1 over the trainable parameters (the plan's projector when it projects the same)."""
    sizes = {n: grad_model.states[0][n].numel() for n in grad_model.names}
    if made is not None and made.key == Projector.key_of(sizes, sorted(set(seeds))):
        return made
    return Projector(sizes, opts.d, sorted(set(seeds)), kind=opts.kind, backend=opts.backend, device=device,
                     cache_mb=opts.projection_cache_mb)


def _write_shards(writer: TrajectoryStoreWriter, spec: StoreSpec, todo: Sequence[int], grad_model: _GradientModel,
                  inputs: _Inputs, projector: Projector, seeds: Sequence[int], scales: Sequence[float],
                  device: torch.device, opts: CollectOptions, on_shard_written: Callable[[int], None] | None) -> None:
    """Stage 7: each shard's rows (:func:`.gradients.shard_rows`), checked finite, written durably."""
    bar = None
    if opts.progress:
        from tqdm.auto import tqdm

        done_rows = spec.n - sum(spec.shard_rows(s)[1] - spec.shard_rows(s)[0] for s in writer.missing_shards())
        bar = tqdm(total=spec.n, initial=done_rows, desc=f"collect {opts.gradient_type} T={spec.t} d={spec.d}",
                   unit="ex", dynamic_ncols=True)
    for shard in todo:
        start, stop = spec.shard_rows(shard)
        rows = shard_rows(grad_model.net, inputs.tokenized[start:stop], opts.task, inputs.pad_id, opts.batch_size,
                          grad_model.states, grad_model.moments, grad_model.names, projector, opts.d, seeds, scales,
                          opts.normalise, opts.vmap_chunk_size, device, bar.update if bar is not None else None)
        if not torch.isfinite(rows).all():
            raise InputError(f"shard {shard}: the gradients of rows {start}..{stop - 1} are not finite (NaN/Inf); "
                             "check the model and checkpoints (a diverged warm-up? try model_dtype float32)")
        writer.write_shard(shard, rows.cpu().numpy(), input_sha256=inputs.input_digests[shard])
        if on_shard_written is not None:
            on_shard_written(shard)
    if bar is not None:
        bar.close()


# ---- the plan printed before the work (the estimates themselves: .calibration) ----


def _print_warmup_plan(trainee: torch.nn.Module, plan: _Plan, inputs: _Inputs, warm: _WarmUp,
                       opts: CollectOptions) -> tuple[Projector, dict[str, float]]:
    """Calibrate on the model about to warm up (no checkpoint exists yet) and print the plan with
    the warm-up's and the collection's estimates; returns the projector and calibration made."""
    params = trainable_parameters(trainee)
    names = list(params)
    seeds = opts.seeds(plan.t_count)
    projector = Projector({n: params[n].numel() for n in names}, opts.d, sorted(set(seeds)), kind=opts.kind,
                          backend=opts.backend, device=plan.device, cache_mb=opts.projection_cache_mb)
    todo = [s for s in range(plan.n_shards) if opts.shards is None or s in set(opts.shards)]
    calibration = calibrate(trainee, inputs.tokenized, opts.task, inputs.pad_id, opts.batch_size, params, None, names,
                            projector, opts.d, seeds[0], opts.normalise, opts.vmap_chunk_size, plan.device)
    for line in plan_lines(calibration, inputs.tokenized, len(inputs.tokenized), plan.t_count, opts.d, opts.max_length,
                           opts.batch_size, opts.shard_size, todo, plan.n_shards,
                           sum(x.numel() for x in params.values()), adapter_description(warm.lora), opts.gradient_type,
                           warm.settings, projector, plan.device):
        print(line, flush=True)
    return projector, calibration


def _print_collection_plan(warm: _WarmUp, grad_model: _GradientModel, inputs: _Inputs, spec: StoreSpec,
                           todo: Sequence[int], projector: Projector, seeds: Sequence[int], device: torch.device,
                           opts: CollectOptions) -> None:
    """Print the plan before the gradients, calibrated at the first checkpoint unless the warm-up
    plan already calibrated (then it was printed already)."""
    if warm.calibration is not None:
        return
    calibration = calibrate(grad_model.net, inputs.tokenized, opts.task, inputs.pad_id, opts.batch_size,
                            grad_model.states[0], grad_model.moments[0] if grad_model.moments else None,
                            grad_model.names, projector, opts.d, seeds[0], opts.normalise, opts.vmap_chunk_size, device)
    adapter = "peft adapter" if warm.checkpoints[0].layout == "peft" else adapter_description(warm.lora)
    for line in plan_lines(calibration, inputs.tokenized, spec.n, spec.t, opts.d, opts.max_length, opts.batch_size,
                           opts.shard_size, todo, spec.n_shards, spec.metadata["trainable_parameters"], adapter,
                           opts.gradient_type, None, projector, device):
        print(line, flush=True)
