"""Losses shared by every model: next-token cross-entropy over the answer tokens only.

    loss = sum_t w_t * (logsumexp(z_t) - z_t[y_t]) / max(1, sum_t w_t)

with ``y_t = input_ids[t + 1]`` (the targets shifted left, the last position padded) and ``w_t =
loss_mask[t + 1]`` (1 on answer tokens, 0 at the last position). The logits ``z`` are float32 whatever the
compute dtype; ``z_t[y_t]`` is picked with a one-hot product (its gradient is dense and cheap, where a
gather's is a scatter), and no slice of the ``[B, L, V]`` logits is taken.

The logits may be computed at the supervised positions only (``positions [B, S]``, made by the data
pipeline: :func:`vjax.data.pipeline.loss_positions`): ``z`` is then ``[B, S, V]`` and the targets and weights
are gathered the same way, which saves the LM head on every unsupervised position (most of a video-QA
sequence).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shifted_targets(input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(targets [B, L], weights [B, L] float32)``: ``targets[t] = input_ids[t + 1]``, ``weights[t] =
    loss_mask[t + 1]``, both 0 at ``t = L - 1``."""
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    mask = loss_mask.astype(jnp.float32)
    weights = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    return targets, weights


def targets_at(input_ids: jax.Array, loss_mask: jax.Array, positions: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """:func:`shifted_targets`, gathered at ``positions [B, S]`` when the logits were computed there only."""
    targets, weights = shifted_targets(input_ids, loss_mask)
    if positions is not None:
        targets = jnp.take_along_axis(targets, positions, axis=1)
        weights = jnp.take_along_axis(weights, positions, axis=1)
    return targets, weights


def next_token_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                    positions: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """``logits [B, L, V]`` (or ``[B, S, V]`` at ``positions [B, S]``), ``input_ids [B, L]``, ``loss_mask [B, L]``
    (mask of each token as a target).

    Returns the mean loss over supervised targets and metrics (``loss``, ``token_accuracy``: the target's
    logit is the row's maximum — an exact tie counts as right —, ``num_targets``).
    """
    targets, weights = targets_at(input_ids, loss_mask, positions)
    logits = logits.astype(jnp.float32)
    target_logit = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32), axis=-1)
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    n = jnp.maximum(weights.sum(), 1.0)
    loss = (nll * weights).sum() / n
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    return loss, {"loss": loss, "token_accuracy": (correct * weights).sum() / n, "num_targets": weights.sum()}
