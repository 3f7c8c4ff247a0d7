"""MA-LMM memory bank (He et al. 2024, "MA-LMM", arXiv 2404.05726, §3.2 and Eq. 5) as pure functions.

A memory bank stores, for each past frame, one entry of ``N`` token vectors, together with a count per
token saying how many original frames that entry stands for. MA-LMM keeps two kinds of banks (the visual
bank of frame features, and one query bank per Q-Former self-attention layer); both use the same
compression, ``memory_bank_compress`` in ``lavis/models/blip2_models/blip2.py`` of boheumd/MA-LMM @ ffe9fa9:

    sim[b, t, n] = cos(M[b, t, n], M[b, t+1, n])                    t = 0 .. T-2   (adjacent entries only)
    k[b, n]      = argmax_t sim[b, t, n]                            (first maximum; per token position n)
    M'[k]        = (S[k] M[k] + S[k+1] M[k+1]) / (S[k] + S[k+1]),   S'[k] = S[k] + S[k+1]
    entries before k stay, entries after k+1 move one slot to the left       -> [B, T-1, N, C]

The official model appends each new frame and compresses once whenever the length exceeds the
``memory_bank_length`` L, so the bank never holds more than L entries between frames.

For ``jax.lax.scan`` over frames the bank here has a fixed capacity L: ``MemoryBank.tokens [B, L, N, C]``,
``counts [B, L, N]`` (0 in empty slots) and ``length [B]`` (filled slots, always a prefix). Use
``memory_bank_attend_view`` to get what attention sees at a step (stored entries plus the current frame,
``[B, L+1, N, C]`` and a mask) and ``append_and_compress`` to store the frame afterwards. Banks are
runtime state: wrap them in ``jax.lax.stop_gradient`` as MA-LMM detaches them (done by the functions here).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class MemoryBank(NamedTuple):
    """Fixed-capacity memory bank (a pytree: carry it through ``jax.lax.scan``).

    Attributes:
      tokens: ``[B, L, N, C]`` stored entries; slots ``>= length`` are zero.
      counts: ``[B, L, N]`` original frames merged into each entry (float; 0 in empty slots).
      length: ``[B]`` int32, number of filled slots (``<= L``).
    """

    tokens: jax.Array
    counts: jax.Array
    length: jax.Array

    @property
    def capacity(self) -> int:
        return self.tokens.shape[1]


def adjacent_cosine_similarity(bank: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Cosine similarity of temporally adjacent entries at the same token index.

    ``sim[b, t, n] = <M[b,t,n], M[b,t+1,n]> / (max(|M[b,t,n]|, eps) * max(|M[b,t+1,n]|, eps))``
    (``torch.nn.functional.cosine_similarity`` over channels, eps 1e-8), computed in float32.

    Args:
      bank: ``[B, T, N, C]``.

    Returns:
      ``[B, T-1, N]`` float32.

    >>> import jax.numpy as jnp, numpy as np
    >>> m = jnp.array([[[[1.0, 0.0]], [[1.0, 1.0]], [[0.0, 1.0]]]])  # [1, 3, 1, 2]
    >>> np.asarray(adjacent_cosine_similarity(m), np.float64).round(4).tolist()
    [[[0.7071], [0.7071]]]
    """
    m = bank.astype(jnp.float32)
    a, b = m[:, :-1], m[:, 1:]  # [B, T-1, N, C]
    dot = jnp.sum(a * b, axis=-1)
    na = jnp.maximum(jnp.linalg.norm(a, axis=-1), eps)
    nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), eps)
    return dot / (na * nb)


def memory_bank_compress(bank: jax.Array, counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """MA-LMM ``memory_bank_compress``: merge the most similar adjacent pair of entries, per token.

    For every sample b and token position n separately, ``k = argmax_t cos(M[t], M[t+1])`` (first index
    on ties), then entries k and k+1 become their count-weighted mean
    ``(S[k] M[k] + S[k+1] M[k+1]) / (S[k] + S[k+1])`` with count ``S[k] + S[k+1]``; later entries shift
    down by one. Exactly one entry is removed per call. Source: boheumd/MA-LMM
    ``lavis/models/blip2_models/blip2.py::memory_bank_compress``; paper Eq. 5.

    Args:
      bank: ``[B, T, N, C]`` with ``T >= 2``.
      counts: ``[B, T, N]`` (the official ``compression_size``).

    Returns:
      ``(bank [B, T-1, N, C], counts [B, T-1, N])``; the bank keeps its dtype (the arithmetic is float32).

    >>> import jax.numpy as jnp, numpy as np
    >>> m = jnp.array([[[[1.0, 0.0]], [[3.0, 0.1]], [[0.0, 1.0]]]])  # [B=1, T=3, N=1, C=2]
    >>> s = jnp.array([[[1.0], [3.0], [1.0]]])                      # [1, 3, 1]
    >>> out, cnt = memory_bank_compress(m, s)
    >>> np.asarray(out[0, :, 0], np.float64).round(3).tolist(), cnt[0, :, 0].tolist()
    ([[2.5, 0.075], [0.0, 1.0]], [4.0, 1.0])
    """
    t = bank.shape[1]
    if t < 2:
        raise ValueError(f"memory_bank_compress needs at least 2 entries, got T={t}")
    return _memory_bank_compress(bank, counts)


@jax.jit
def _memory_bank_compress(bank: jax.Array, counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    t = bank.shape[1]
    m = bank.astype(jnp.float32)
    s = counts.astype(jnp.float32)
    k = jnp.argmax(adjacent_cosine_similarity(bank), axis=1)  # [B, N], first max on ties
    slot = jnp.arange(t - 1)[None, :, None]  # [1, T-1, 1]
    src = slot + (slot > k[:, None, :])  # [B, T-1, N] entry each output slot copies
    m_src = jnp.take_along_axis(m, src[..., None], axis=1)  # [B, T-1, N, C]
    s_src = jnp.take_along_axis(s, src, axis=1)  # [B, T-1, N]
    m_k = jnp.take_along_axis(m, k[:, None, :, None], axis=1)  # [B, 1, N, C]
    m_k1 = jnp.take_along_axis(m, k[:, None, :, None] + 1, axis=1)
    s_k = jnp.take_along_axis(s, k[:, None, :], axis=1)  # [B, 1, N]
    s_k1 = jnp.take_along_axis(s, k[:, None, :] + 1, axis=1)
    s_merged = s_k + s_k1
    m_merged = (s_k[..., None] * m_k + s_k1[..., None] * m_k1) / s_merged[..., None]
    is_k = slot == k[:, None, :]  # [B, T-1, N]
    out = jnp.where(is_k[..., None], m_merged, m_src)
    out_counts = jnp.where(is_k, s_merged, s_src)
    return out.astype(bank.dtype), out_counts.astype(counts.dtype)


def memory_bank_init(
    batch: int, capacity: int, num_tokens: int, dim: int, dtype=jnp.float32
) -> MemoryBank:
    """An empty bank of ``capacity`` (MA-LMM's ``memory_bank_length``) entries.

    >>> bank = memory_bank_init(2, 3, 5, 8)
    >>> bank.tokens.shape, bank.counts.shape, bank.length.tolist()
    ((2, 3, 5, 8), (2, 3, 5), [0, 0])
    """
    if capacity < 1:
        raise ValueError(f"memory bank capacity must be >= 1, got {capacity}")
    return MemoryBank(
        tokens=jnp.zeros((batch, capacity, num_tokens, dim), dtype),
        counts=jnp.zeros((batch, capacity, num_tokens), jnp.float32),
        length=jnp.zeros((batch,), jnp.int32),
    )


def memory_bank_attend_view(bank: MemoryBank, frame: jax.Array) -> tuple[jax.Array, jax.Array]:
    """What attention sees at this step: the stored entries followed by the current frame.

    Returns ``tokens [B, L+1, N, C]`` = ``concat(bank.tokens, frame)`` and ``mask [B, L+1]`` (True for
    filled slots and for the current frame at slot L). MA-LMM attends over
    ``[M_1 .. M_T', f_t]`` without positional terms on the keys, so empty slots need only be masked out.

    >>> import jax.numpy as jnp
    >>> bank = memory_bank_init(1, 3, 2, 4)
    >>> tokens, mask = memory_bank_attend_view(bank, jnp.ones((1, 2, 4)))
    >>> tokens.shape, mask.tolist()
    ((1, 4, 2, 4), [[False, False, False, True]])
    """
    frame = jax.lax.stop_gradient(frame).astype(bank.tokens.dtype)
    tokens = jnp.concatenate([bank.tokens, frame[:, None]], axis=1)  # [B, L+1, N, C]
    cap = bank.capacity
    filled = jnp.arange(cap)[None, :] < bank.length[:, None]  # [B, L]
    mask = jnp.concatenate([filled, jnp.ones((filled.shape[0], 1), bool)], axis=1)
    return tokens, mask


def append_and_compress(bank: MemoryBank, frame: jax.Array, valid: jax.Array | None = None) -> MemoryBank:
    """Append ``frame [B, N, C]`` (count 1); if the bank then holds ``L + 1`` entries, compress once.

    This is MA-LMM's per-frame update: ``M <- concat(M, f_t)``; ``if len(M) > L: M = compress(M)``.
    While ``length < L`` the frame goes into slot ``length``; when the bank is full the ``L + 1``
    entries are compressed back to ``L`` with ``memory_bank_compress``. ``valid [B]`` (optional) leaves
    the bank of samples whose frame is padding unchanged. The frame is stored through
    ``stop_gradient`` (MA-LMM stores detached tensors). Static shapes: use it as a ``lax.scan`` step.

    >>> import jax, jax.numpy as jnp
    >>> frames = jnp.ones((1, 5, 2, 4))                          # [B, T, N, C], five identical frames
    >>> def step(bank, f):
    ...     return append_and_compress(bank, f), None
    >>> bank, _ = jax.lax.scan(step, memory_bank_init(1, 3, 2, 4), jnp.swapaxes(frames, 0, 1))
    >>> bank.length.tolist(), bank.counts[0, :, 0].tolist(), float(bank.tokens.max())
    ([3], [3.0, 1.0, 1.0], 1.0)
    """
    return _append_and_compress(bank, frame, valid)


@jax.jit
def _append_and_compress(bank: MemoryBank, frame: jax.Array, valid: jax.Array | None) -> MemoryBank:
    cap = bank.capacity
    frame = jax.lax.stop_gradient(frame).astype(bank.tokens.dtype)
    b, n = frame.shape[0], frame.shape[1]
    # Not full: write into slot `length`.
    slot_is_new = jnp.arange(cap)[None, :] == bank.length[:, None]  # [B, L]
    appended_tokens = jnp.where(slot_is_new[:, :, None, None], frame[:, None], bank.tokens)
    appended_counts = jnp.where(slot_is_new[:, :, None], 1.0, bank.counts)
    # Full: L + 1 entries -> compress back to L.
    ext_tokens = jnp.concatenate([bank.tokens, frame[:, None]], axis=1)  # [B, L+1, N, C]
    ext_counts = jnp.concatenate([bank.counts, jnp.ones((b, 1, n), bank.counts.dtype)], axis=1)
    comp_tokens, comp_counts = memory_bank_compress(ext_tokens, ext_counts)  # [B, L, N, C]
    full = bank.length >= cap  # [B]
    tokens = jnp.where(full[:, None, None, None], comp_tokens, appended_tokens)
    counts = jnp.where(full[:, None, None], comp_counts, appended_counts)
    length = jnp.minimum(bank.length + 1, cap)
    if valid is not None:
        valid = jnp.asarray(valid, bool)
        tokens = jnp.where(valid[:, None, None, None], tokens, bank.tokens)
        counts = jnp.where(valid[:, None, None], counts, bank.counts)
        length = jnp.where(valid, length, bank.length)
    return MemoryBank(tokens=tokens, counts=counts, length=length.astype(jnp.int32))
