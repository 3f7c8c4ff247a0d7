"""Static-shape splicing of visual tokens into a text embedding sequence.

The ``k``-th placeholder position of row ``b`` (``placeholder[b, l]`` true, counted left to right)
receives ``visual[b, k]``; every other position keeps its text embedding:

    k(b, l) = cumsum(placeholder[b])[l] - 1
    out[b, l] = visual[b, k(b, l)] if placeholder[b, l] else text[b, l]

One gather and one ``where``: the same compiled function serves every batch of a bucket, whatever
the placement of the placeholders (the data pipeline expands each ``<video>`` marker into as many
placeholder ids as the model makes visual tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def splice_tokens(text: jax.Array, visual: jax.Array, placeholder: jax.Array) -> jax.Array:
    """``text [B, L, D]``, ``visual [B, N, D]``, ``placeholder bool[B, L]`` -> ``[B, L, D]``.

    Placeholders beyond ``N`` in a row reuse the last visual token (callers make counts equal; see
    :func:`count_mismatch`).

    >>> import jax.numpy as jnp
    >>> text = jnp.zeros((1, 4, 1)); vis = jnp.array([[[1.0], [2.0]]])
    >>> splice_tokens(text, vis, jnp.array([[False, True, True, False]]))[0, :, 0].tolist()
    [0.0, 1.0, 2.0, 0.0]
    """
    placeholder = placeholder.astype(bool)
    idx = jnp.cumsum(placeholder.astype(jnp.int32), axis=1) - 1  # [B, L]
    idx = jnp.clip(idx, 0, visual.shape[1] - 1)
    gathered = jnp.take_along_axis(visual, idx[..., None], axis=1)  # [B, L, D]
    return jnp.where(placeholder[..., None], gathered.astype(text.dtype), text)


def count_mismatch(placeholder: jax.Array, num_visual: int | jax.Array) -> jax.Array:
    """``[B]`` bool: rows whose placeholder count differs from the visual-token count."""
    return placeholder.astype(jnp.int32).sum(axis=1) != num_visual
