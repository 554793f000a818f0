"""Model-family knowledge: the tasks, the model classes they load, LoRA, per-family quirks.

Everything the collection needs to know about a transformers model lives here; the stages
(:mod:`.per_example`, :mod:`.warmup`, :mod:`.pipeline`) ask this module instead of testing
model types themselves:

- tasks (:data:`TASKS`): ``causal_lm`` (``AutoModelForCausalLM``, mean token cross-entropy over
  the example's target tokens) and ``classification`` (``AutoModelForSequenceClassification``, a
  head trained by the warm-up, class cross-entropy): :func:`example_loss`, :func:`batch_loss`;
- loading offline (a local folder or the local HF cache, never a download) and the LM-head
  checks: a causal-LM collection refuses a checkpoint without a trained LM head, before loading
  (:func:`check_task_fits_config`) and after (:func:`check_lm_head_loaded`);
- which parameters train: LoRA adapters through peft (its default target modules per
  architecture unless named; plus the classifier head for classification) or every parameter
  (:func:`wrap_for_training`), or a foreign peft adapter (:func:`attach_checkpoint_adapter`);
- quirks: bidirectional encoders (:data:`BIDIRECTIONAL_MODEL_TYPES`) cannot take explicit
  positions; decoder classifiers pool the last token that is not ``config.pad_token_id``
  (:func:`check_pad_token_id`, :func:`align_pad_token_id`); vmap has no batching rule for the
  fused SDPA backward, so collection runs eager attention (:func:`use_eager_attention`).

transformers and peft are imported only inside the functions that need them.
"""
from __future__ import annotations

import copy
import os
import pickle
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F

from ..validation import InputError, check_choice, refused_pickle_reason
from .data import IGNORE_INDEX

if TYPE_CHECKING:  # warmup imports this module
    from .warmup import Checkpoint, LoraSettings

#: what a collection can compute gradients of
TASKS = ("causal_lm", "classification")


def check_task(task: Any, name: str = "task") -> str:
    """``task`` when it is one of :data:`TASKS`, else InputError."""
    return check_choice(task, name, TASKS)


def peft_task_type(task: str) -> Any:
    """peft's TaskType for a task (it decides which head stays trainable besides the adapters)."""
    from peft import TaskType

    return TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# Encoders attend both ways: their padding must be masked explicitly (see module docstring).
BIDIRECTIONAL_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
     "mpnet", "camembert", "modernbert", "ernie", "megatron-bert", "roformer", "nomic_bert"}
)



def uses_causal_attention(model: torch.nn.Module) -> bool:
    """True unless the model's config names a bidirectional encoder architecture."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return model_type not in BIDIRECTIONAL_MODEL_TYPES



def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def accepts_position_ids(model: torch.nn.Module) -> bool:
    """True when the (unwrapped) model's forward names a ``position_ids`` argument."""
    import inspect

    try:
        return "position_ids" in inspect.signature(base_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def text_config(model: torch.nn.Module) -> Any:
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config



def vocabulary_size(source: Any, tokenizer: Any = None) -> int | None:
    """V, the number of tokens a causal LM's softmax is over (its chance level is ln V): the
    output embedding's rows of a module (what the loss is computed over, padding rows
    included), else the (text) config's ``vocab_size`` of a module or a config; the tokenizer's
    length as a fallback (a model factory, not built yet). None when none of them gives V >= 2."""
    counts = []
    if isinstance(source, torch.nn.Module):
        get_output = getattr(source, "get_output_embeddings", None)
        head = get_output() if callable(get_output) else None
        weight = getattr(head, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            counts.append(weight.shape[0])
        source = text_config(source)
    get_text = getattr(source, "get_text_config", None)
    config = get_text() if callable(get_text) else source
    counts.append(getattr(config, "vocab_size", None))
    if tokenizer is not None:
        try:
            counts.append(len(tokenizer))
        except TypeError:  # not sized
            pass
    for count in counts:
        if isinstance(count, int) and not isinstance(count, bool) and count >= 2:
            return int(count)
    return None


def check_pools_real_tokens(model: torch.nn.Module, task: str, causal_attention: bool) -> None:
    """ValueError for a decoder classifier whose ``config.pad_token_id`` is unset: it pools the last
    token that is not the pad id, so an example alone in vmap would pool a padding position."""
    config = text_config(model)
    if task == "classification" and causal_attention and config is not None and getattr(config, "pad_token_id", None) is None:
        raise ValueError(
            f"model: {type(base_model(model)).__name__} pools the last non-padding token by config.pad_token_id, "
            "which is unset, so each example would pool a padding position; set model.config.pad_token_id "
            "to the pad id of the batch")


def example_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Loss of ONE example. logits (S, V) with labels (S,) for causal LM; logits (C,), label () otherwise."""
    if task == "causal_lm":
        shifted_logits = logits[:-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:-1]
        shifted_labels = labels[1:]
        token_losses = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="none")
        n_targets = (shifted_labels != IGNORE_INDEX).sum()
        return token_losses.sum() / n_targets
    if task == "classification":
        class_logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        return F.cross_entropy(class_logits[None], labels[None])
    raise ValueError(f"task must be 'causal_lm' or 'classification', got {task!r}")



def batch_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Token-mean loss over the batch's targets (causal LM), class cross-entropy otherwise."""
    if task == "causal_lm":
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    return torch.nn.functional.cross_entropy(logits.float(), labels)



def _not_found(what: str, name: str) -> str:
    return (f"{what}: {name!r} is neither a local model folder nor a model in the local Hugging Face cache; "
            "nothing is downloaded at run time (pass a folder holding config.json and the weights, "
            "or fetch the model beforehand)")


def check_model_source(model: Any) -> Any:
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


def check_task_fits_config(config: Any, task: str, name: str) -> None:
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


def check_lm_head_loaded(built: torch.nn.Module, missing: Sequence[str], task: str, name: str) -> None:
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


def load_tokenizer(source: Any) -> Any:
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


def resolve_model_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from its name ("float32", "bf16", ...); None and torch dtypes pass through."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
    if dtype not in table:
        raise InputError(f"model_dtype must be one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def build_model(model: Any, task: str, label2id: dict[str, int] | None, model_dtype: torch.dtype | None, seed: int,
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
    check_lm_head_loaded(built, missing, task, model_name(model))
    if model_dtype is not None:
        built = built.to(model_dtype)
    if pad_id is not None:
        align_pad_token_id(built, pad_id, task, f"model {model_name(model)}")
    return built


def _in_local_cache(name: str) -> bool:
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - only asking whether it is there
        return False


def model_name(model: Any) -> str:
    """How errors and the store's metadata name a model: its path, class or factory name."""
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    if isinstance(model, torch.nn.Module):
        return type(model).__name__
    return getattr(model, "__name__", type(model).__name__)



def wrap_for_training(model: torch.nn.Module, task: str, lora: "LoraSettings | None") -> torch.nn.Module:
    """Apply LoRA (trainable: adapters, plus the classifier head for classification) or leave
    every parameter trainable for full fine-tuning."""
    if lora is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora.peft_config(task))
    except ValueError as error:  # peft: unknown target modules, no default targets for the architecture
        targets = ",".join(lora.target_modules) if lora.target_modules else "peft's default"
        raise InputError(f"lora target_modules ({targets}): {str(error).splitlines()[0]} "
                         "(choose modules of this model, or warm up without LoRA)") from None



def _pad_configs(model_or_config: Any) -> list[Any]:
    """The config(s) a classifier reads pad_token_id from: the model's config and, for composite
    (e.g. vision-language) configs, its text config."""
    config = getattr(model_or_config, "config", None) if isinstance(model_or_config, torch.nn.Module) else model_or_config
    if config is None:
        return []
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else config
    if text is not None and text is not config:
        configs.append(text)
    return configs


def _is_decoder_config(config: Any) -> bool:
    return getattr(config, "model_type", None) not in BIDIRECTIONAL_MODEL_TYPES


def check_pad_token_id(config: Any, pad_token_id: int, task: str, where: str = "model") -> None:
    """Raise an InputError when a decoder classifier's ``config.pad_token_id`` is set and differs
    from ``pad_token_id``, the id its batches are padded with (it pools the last token that is not
    ``config.pad_token_id``, so it would pool a padding position)."""
    if task != "classification":
        return
    for cfg in _pad_configs(config):
        have = getattr(cfg, "pad_token_id", None)
        if have is not None and _is_decoder_config(cfg) and int(have) != int(pad_token_id):
            raise InputError(
                f"{where}: config.pad_token_id is {have}, but batches are padded with {pad_token_id} (the tokenizer's pad "
                "id, else its EOS id); a decoder classifier pools the last token that is not config.pad_token_id, so it "
                "would pool a padding position. Use the model's own tokenizer, or make the two pad ids agree")


def align_pad_token_id(model: torch.nn.Module, pad_token_id: int, task: str, where: str = "model") -> torch.nn.Module:
    """For classification, set ``model.config.pad_token_id`` to ``pad_token_id`` (the id the
    batches are padded with) when it is unset, so decoder classifiers (Llama, GPT-2, ...
    ``ForSequenceClassification``) pool each example's last real token; a decoder's differing
    pad id is an InputError (:func:`check_pad_token_id`). Returns ``model``."""
    if task != "classification":
        return model
    check_pad_token_id(model, pad_token_id, task, where)
    for cfg in _pad_configs(model):
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = int(pad_token_id)
    return model


def attach_checkpoint_adapter(net: torch.nn.Module, checkpoint: "Checkpoint", source_name: str) -> torch.nn.Module:
    """Wrap ``net`` with the peft adapter of a foreign checkpoint folder (layout "peft"), trainable
    (its values are replaced per checkpoint by the collection); a refused or unloadable adapter is
    an InputError."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(net, checkpoint.path, is_trainable=True, local_files_only=True)
    except pickle.UnpicklingError as error:  # refused by torch.load(weights_only=True): nothing ran
        raise InputError(f"checkpoints: the peft adapter in {checkpoint.path} was refused, it holds pickled Python "
                         f"objects besides tensors, which are never loaded ({refused_pickle_reason(error)})") from None
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise InputError(f"checkpoints: cannot load the peft adapter {checkpoint.path} onto "
                         f"{source_name} ({_first_line(error)})") from None


def use_eager_attention(net: torch.nn.Module, implementation: str = "eager") -> None:
    """Switch a transformers model to another attention implementation where it can; vmap has no
    batching rule for the fused SDPA backward and would loop over examples, so per-example
    gradients run "eager". Models without the switch (or refusing it) are left as they are."""
    if hasattr(net, "set_attn_implementation"):
        try:
            net.set_attn_implementation(implementation)
        except (ValueError, NotImplementedError):
            pass


def attention_implementation(net: torch.nn.Module) -> str | None:
    """The model's current attention implementation (None where it does not say)."""
    return getattr(getattr(net, "config", None), "_attn_implementation", None)
