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

Training does not materialise the logits at all: :func:`head_cross_entropy` fuses the LM head ``z = h W``
with the loss, one chunk of rows at a time (at most :data:`LOGITS_CHUNK_BYTES` of float32 logits), and
computes the gradient ``dz = (softmax(z) - onehot(y)) w`` in the same pass, so the backward pass reads two
stored products (``dz W^T`` and ``h^T dz``) instead of recomputing the softmax in a transposed layout
(1.33x faster on the benchmark's LLaMA loss tail, ``[512, 512] x [512, 32000]``); the logits of a
published vocabulary (152k for Qwen2) at thousands of positions never exist whole.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

LOGITS_CHUNK_BYTES = 256 << 20  # float32 logits of one chunk of rows in head_cross_entropy


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


def head_cross_entropy(h: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array, *,
                       dtype=None, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> tuple[jax.Array, jax.Array]:
    """The LM head and the cross-entropy in one: ``h [..., D]``, ``kernel [D, V]`` (an ``nn.Dense`` kernel, or a
    tied embedding transposed), ``targets [...]`` int, ``weights [...]`` float.

    Returns ``(sum_t w_t * (logsumexp(z_t) - z_t[y_t]), sum_t w_t * [z_t[y_t] >= max z_t])`` with the float32
    logits ``z = (h @ kernel)`` computed in ``dtype`` (default: ``h``'s) as ``nn.Dense`` computes them, one chunk
    of rows at a time (``chunk_bytes`` of logits each; rows padded with weight 0 to equal chunks). Differentiable
    in ``h``, ``kernel`` and ``weights``: the gradients are computed with the loss (see the module docstring), so
    calling it under ``jax.grad`` costs the head's three matmuls once, and without a gradient one."""
    if kernel.ndim != 2 or h.shape[-1] != kernel.shape[0]:
        raise ValueError(f"h {h.shape} and kernel {kernel.shape}: need h [..., D] and kernel [D, V]")
    if targets.shape != h.shape[:-1] or weights.shape != h.shape[:-1]:
        raise ValueError(f"targets {targets.shape} and weights {weights.shape} must both be h's leading shape "
                         f"{h.shape[:-1]}")
    d, v = kernel.shape
    n = max(1, targets.size)
    rows_max = max(1, chunk_bytes // (4 * v))
    chunks = -(-n // rows_max)
    rows = -(-n // chunks)
    pad = chunks * rows - targets.size
    h2, t2, w2 = h.reshape(-1, d), targets.reshape(-1), weights.astype(jnp.float32).reshape(-1)
    if pad:
        h2 = jnp.pad(h2, ((0, pad), (0, 0)))
        t2, w2 = jnp.pad(t2, (0, pad)), jnp.pad(w2, (0, pad))

    # chunk c holds rows c, c + chunks, ...: a data-sharded row axis stays whole-sharded inside every chunk
    def split(x):
        return x.reshape(rows, chunks, *x.shape[1:]).swapaxes(0, 1)

    dt = jnp.dtype(dtype or h.dtype)
    return _chunked_cross_entropy(dt, split(h2), kernel, split(t2), split(w2))


def _chunk_logits(dtype, h, kernel, targets):
    """float32 logits of one chunk ``[R, V]``, their row max, softmax denominator and the one-hot targets."""
    z = jax.lax.dot_general(h.astype(dtype), kernel.astype(dtype), (((1,), (0,)), ((), ()))).astype(jnp.float32)
    m = jnp.max(z, axis=-1)
    e = jnp.exp(z - m[:, None])
    s = jnp.sum(e, axis=-1)
    hot = targets[:, None] == jax.lax.broadcasted_iota(targets.dtype, z.shape, 1)
    target_logit = jnp.sum(jnp.where(hot, z, 0.0), axis=-1)
    nll = jnp.log(s) + m - target_logit
    return nll, (target_logit >= m).astype(jnp.float32), e, s, hot


def _over_chunks(body, carry, xs):
    """``lax.scan`` of ``body`` over the leading (chunk) axis; one chunk runs without a loop."""
    if xs[0].shape[0] == 1:
        carry, ys = body(carry, jax.tree_util.tree_map(lambda x: x[0], xs))
        return carry, jax.tree_util.tree_map(lambda y: y[None], ys)
    return jax.lax.scan(body, carry, xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_cross_entropy(dtype, h, kernel, targets, weights):
    k = kernel.astype(dtype)  # once, not in every chunk

    def body(_, xs):
        hc, tc, wc = xs
        nll, correct, *_ = _chunk_logits(dtype, hc, k, tc)
        return None, ((nll * wc).sum(), (correct * wc).sum())

    _, (nll, correct) = _over_chunks(body, None, (h, targets, weights))
    return nll.sum(), correct.sum()


def _chunked_cross_entropy_fwd(dtype, h, kernel, targets, weights):
    k = kernel.astype(dtype)

    def body(dk, xs):
        hc, tc, wc = xs
        nll, correct, e, s, hot = _chunk_logits(dtype, hc, k, tc)
        dz = ((e / s[:, None] - hot) * wc[:, None]).astype(dtype)  # d(sum_t w_t nll_t) / dz
        dh = jax.lax.dot_general(dz, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        dk = dk + jax.lax.dot_general(hc.astype(dtype), dz, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
        return dk, ((nll * wc).sum(), (correct * wc).sum(), nll, dh.astype(h.dtype))

    dk0 = jnp.zeros(kernel.shape, jnp.float32)
    dk, (nll_sum, correct_sum, nll, dh) = _over_chunks(body, dk0, (h, targets, weights))
    return (nll_sum.sum(), correct_sum.sum()), (dh, dk.astype(kernel.dtype), nll)


def _chunked_cross_entropy_bwd(dtype, residuals, cotangents):
    dh, dk, nll = residuals
    g = cotangents[0]  # the count of right answers is piecewise constant: no gradient
    return ((g * dh).astype(dh.dtype), (g * dk).astype(dk.dtype), None, g * nll)


_chunked_cross_entropy.defvjp(_chunked_cross_entropy_fwd, _chunked_cross_entropy_bwd)


def next_token_head_loss(h: jax.Array, kernel: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                         positions: jax.Array | None = None, *, dtype=None,
                         chunk_bytes: int = LOGITS_CHUNK_BYTES) -> tuple[jax.Array, dict]:
    """:func:`next_token_loss` of the logits ``h @ kernel`` without materialising them: ``h [B, L, D]`` (or
    ``[B, S, D]`` at ``positions [B, S]``) are the final hidden states, ``kernel [D, V]`` the LM head's (see
    :func:`head_cross_entropy`). Same loss, metrics and gradients as the logits path."""
    targets, weights = targets_at(input_ids, loss_mask, positions)
    nll, correct = head_cross_entropy(h, kernel, targets, weights, dtype=dtype, chunk_bytes=chunk_bytes)
    n = jnp.maximum(weights.sum(), 1.0)
    loss = nll / n
    return loss, {"loss": loss, "token_accuracy": correct / n, "num_targets": weights.sum()}
