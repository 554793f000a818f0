"""The gradients stage: per-example gradients at one checkpoint, Adam direction, K1 block.

For the examples of one batch at checkpoint t (trainable values theta_t, Adam moments m_t, v_t):

    g_i(t)     per-example gradient of example i's loss at theta_t (:func:`.per_example.per_example_gradients`)
    gbar_i(t)  = m_t' / sqrt(v_t' + eps)   (moments given: "adam", candidates)   or g_i(t) ("sgd", targets)
    p_i(t)     = Pi_t gbar_i(t) in R^d      (K1 through a :class:`.projector.Projector`, parameter by parameter)
    block_i(t) = c_t * p_i(t) / ||p_i(t)||  (normalise; else c_t * p_i(t))

:func:`shard_rows` fills the (rows, T, d) block of one store shard, batch by batch and checkpoint by
checkpoint: shards are independent, so a shard is the unit a run (or a rank) computes.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from .data import TokenizedExample, collate
from .per_example import adam_precondition, per_example_gradients

Moments = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
#: block += scale * flat @ Pi_seed[:, offset(name) ...]^T, as :class:`.projector.Projector` does
ProjectInto = Callable[[torch.Tensor, str, int, torch.Tensor, float], None]


def project_checkpoint(
    net: torch.nn.Module, batch: Mapping[str, torch.Tensor], task: str, state: Mapping[str, torch.Tensor],
    moments: Moments | None, names: Sequence[str], projector: ProjectInto, d: int, seed: int, scale: float, normalise: bool, chunk_size: int | None,
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


def shard_rows(
    net: torch.nn.Module, examples: Sequence[TokenizedExample], task: str, pad_id: int, batch_size: int,
    states: Sequence[Mapping[str, torch.Tensor]], moments: Sequence[Moments] | None, names: Sequence[str],
    projector: ProjectInto, d: int, seeds: Sequence[int],
    scales: Sequence[float], normalise: bool, chunk_size: int | None, device: torch.device,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(len(examples), T, d) float32 rows of one shard on ``device``: for each batch of
    ``batch_size`` examples and each checkpoint t, :func:`project_checkpoint` with ``states[t]``,
    ``moments[t]`` (None: plain gradients), ``seeds[t]`` and ``scales[t]``. ``on_batch`` is called
    with each batch's size once its T blocks are done (progress)."""
    t_count = len(states)
    rows = torch.empty(len(examples), t_count, d, dtype=torch.float32, device=device)
    for b0 in range(0, len(examples), batch_size):
        b1 = min(len(examples), b0 + batch_size)
        batch = {k: v.to(device) for k, v in collate(examples[b0:b1], pad_id).items()}
        for t in range(t_count):
            rows[b0:b1, t] = project_checkpoint(
                net, batch, task, states[t], moments[t] if moments else None, names, projector,
                d, seeds[t], scales[t], normalise, chunk_size)
        if on_batch is not None:
            on_batch(b1 - b0)
    return rows
