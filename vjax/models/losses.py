"""Losses shared by every model: next-token cross-entropy over the answer tokens only.

    loss = sum_t m_t * (-log softmax(logits_t)[y_{t+1}]) / max(1, sum_t m_t)

where ``m_t`` is the loss mask of the *target* token ``t + 1`` (1 on answer tokens). The softmax runs
in float32 whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, dict]:
    """``logits [B, L, V]``, ``input_ids [B, L]``, ``loss_mask [B, L]`` (mask of each token as a target).

    Returns the mean loss over supervised targets and metrics (``loss``, ``token_accuracy``,
    ``num_targets``).
    """
    logits = logits[:, :-1].astype(jnp.float32)  # [B, L-1, V] predicts tokens 1..L-1
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, L-1]
    n = jnp.maximum(mask.sum(), 1.0)
    loss = (nll * mask).sum() / n
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return loss, {"loss": loss, "token_accuracy": (correct * mask).sum() / n, "num_targets": mask.sum()}
