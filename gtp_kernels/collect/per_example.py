"""Per-example gradients of a transformers model, a whole batch per backward pass.

For example i with tokens x_i and target mask m_i (non-padding tokens whose label is not -100),
the loss is the mean token cross-entropy over its own targets,

    L_i(theta) = (1 / |m_i|) * sum_{s in m_i} CE(logits_{s-1}(x_i; theta), x_{i,s})   (causal LM)
    L_i(theta) = CE(logits(x_i; theta), y_i)                                           (classification)

and g_i = d L_i / d theta over the trainable parameters only (LoRA matrices, or every parameter
for full fine-tuning). :func:`per_example_gradients` computes all g_i of a batch at once with
``torch.func``: ``vmap(grad(L))`` over the examples, parameters passed by ``functional_call``.

Padding. Inside ``vmap`` each example keeps the batch's padded length S. transformers builds its
attention mask with data-dependent Python control flow, which ``vmap`` cannot trace, so the mask
is passed pre-built: an additive (1, 1, S, S) mask hiding padded keys, and future keys for causal
decoders (transformers passes 4-D masks through unchanged). Padded positions are excluded from
the loss. Either way g_i equals the gradient of
example i run alone, unpadded (tests check this in float64 against one backward per example).
A batch that is not right-padded (e.g. left-padded) gets explicit ``position_ids`` =
cumsum(mask) - 1 (clamped at 0), so absolute-position models (GPT-2) see each example at the
positions it has alone; models whose forward takes no ``position_ids``, and bidirectional
encoders (some, like RoBERTa, derive positions from the pad id themselves), are refused such a
batch. Decoder classifiers (``...ForSequenceClassification`` of Llama, GPT-2, ...) pool the last
token that is not ``config.pad_token_id``; with it unset, an example alone in ``vmap`` would pool
a padding position, so such a model must have it set (to the pad id of the batch).

Adam preconditioning (LESS, training candidates): with the checkpoint's optimizer moments m, v,

    m' = beta1 m + (1 - beta1) g,   v' = beta2 v + (1 - beta2) g^2,   g_hat = m' / sqrt(v' + eps)

elementwise, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, no bias correction. Target (validation)
examples use the plain gradient g ("sgd").
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch.func import functional_call, grad, vmap

from .models import (  # noqa: F401  (BIDIRECTIONAL_MODEL_TYPES: re-exported)
    BIDIRECTIONAL_MODEL_TYPES, accepts_position_ids, base_model, check_pools_real_tokens, example_loss, uses_causal_attention,
)

def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached trainable parameters by name, in ``named_parameters`` order (the flattening order)."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model: no parameter requires grad (nothing to differentiate)")
    return params


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row of the (B, S) mask is ones then zeros (no padding counts as right-padded)."""
    present = attention_mask != 0
    return bool((present[:, 1:] <= present[:, :-1]).all())


def _additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype, causal: bool) -> torch.Tensor:
    """(S,) 0/1 mask -> (1, 1, S, S) additive mask hiding padded keys (and future keys if causal)."""
    length = attention_mask.shape[-1]
    hidden = (attention_mask == 0)[None, :].expand(length, length)
    if causal:
        future = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).triu(1)
        hidden = hidden | future
    return torch.zeros(length, length, dtype=dtype, device=attention_mask.device).masked_fill(hidden, torch.finfo(dtype).min)[None, None]


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def per_example_gradients(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    task: str,
    params: Mapping[str, torch.Tensor] | None = None,
    causal_attention: bool | None = None,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Gradients of every example's loss in ``batch``, one tensor (B, *param.shape) per parameter.

    Args:
        model: a transformers model (peft-wrapped or not); put it in eval mode for deterministic
            gradients (dropout off).
        batch: ``input_ids`` and ``attention_mask`` (B, S), right-padded (or padded on any side
            for decoders taking ``position_ids``); ``labels`` (B, S) with -100 off target, or (B,)
            class ids.
        task: 'causal_lm' or 'classification'.
        params: values for the parameters to differentiate (default: the model's trainable ones);
            e.g. the trainable weights of another checkpoint, without loading them into the model.
        causal_attention: override the encoder/decoder guess made from ``config.model_type``.
        chunk_size: examples per vmap chunk (memory bound); None = the whole batch.

    Raises:
        ValueError: a missing batch key; a batch not right-padded for a model that cannot take
            ``position_ids`` (or a bidirectional encoder); a decoder classifier whose
            ``config.pad_token_id`` is unset (it would pool a padding position).
    """
    for key in ("input_ids", "attention_mask", "labels"):
        if key not in batch:
            raise ValueError(f"batch: missing {key!r}")
    if params is None:
        params = trainable_parameters(model)
    params = dict(params)
    if causal_attention is None:
        causal_attention = uses_causal_attention(model)
    check_pools_real_tokens(model, task, causal_attention)
    mask_dtype = _model_dtype(model)
    position_ids = None
    if not is_right_padded(batch["attention_mask"]):
        if not causal_attention or not accepts_position_ids(model):
            why = ("a bidirectional encoder" if not causal_attention
                   else f"{type(base_model(model)).__name__}.forward takes no position_ids")
            raise ValueError(f"batch: not right-padded, and positions cannot be given explicitly ({why}); "
                             "right-pad the batch (as collate does)")
        position_ids = (batch["attention_mask"].ne(0).long().cumsum(-1) - 1).clamp_min(0)

    def loss_of_one(p: dict[str, torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                    positions: torch.Tensor | None) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids[None], "attention_mask": _additive_mask(attention_mask, mask_dtype, causal_attention)}
        if positions is not None:
            kwargs["position_ids"] = positions[None]
        if task == "causal_lm" or causal_attention:
            kwargs["use_cache"] = False
        logits = functional_call(model, p, args=(), kwargs=kwargs).logits[0]
        return example_loss(logits, labels, task)

    in_dims = (None, 0, 0, 0, None if position_ids is None else 0)
    batched = vmap(grad(loss_of_one), in_dims=in_dims, chunk_size=chunk_size)
    return batched(params, batch["input_ids"], batch["attention_mask"], batch["labels"], position_ids)


def per_example_gradients_loop(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    task: str,
) -> dict[str, torch.Tensor]:
    """The one-example-per-backward baseline (as LESS does): each example unpadded (its
    non-padding tokens, whatever the padding side), alone, with the model's own forward (its
    standard attention mask path). Same output layout as :func:`per_example_gradients`."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for row in range(batch["input_ids"].shape[0]):
        present = batch["attention_mask"][row] != 0
        input_ids = batch["input_ids"][row][present][None]
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        labels = batch["labels"][row][present] if task == "causal_lm" else batch["labels"][row]
        model.zero_grad(set_to_none=True)
        logits = model(**kwargs).logits[0]
        example_loss(logits, labels, task).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                rows[name].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    model.zero_grad(set_to_none=True)
    return {name: torch.stack(values) for name, values in rows.items()}


def adam_precondition(
    gradient: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> torch.Tensor:
    """LESS's Adam direction m' / sqrt(v' + eps) (no bias correction); ``gradient`` may carry a
    leading batch dimension over the moments' shape."""
    if gradient.shape[-exp_avg.dim():] != exp_avg.shape or exp_avg.shape != exp_avg_sq.shape:
        raise ValueError(f"adam_precondition: gradient {tuple(gradient.shape)} does not end with the moment shape {tuple(exp_avg.shape)}")
    exp_avg = exp_avg.to(gradient.dtype)
    exp_avg_sq = exp_avg_sq.to(gradient.dtype)
    updated_avg = beta1 * exp_avg + (1 - beta1) * gradient
    updated_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * gradient.square()
    return updated_avg / torch.sqrt(updated_avg_sq + eps)


def flatten_gradients(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate per-parameter gradients (B, *shape) into (B, P), in mapping order."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)
