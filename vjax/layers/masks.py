"""Attention masks described by their structure, so that a kernel never needs the dense ``[L, S]`` mask.

Query ``i`` (``0 <= i < L``) sits at cache slot ``q_offset + i``; key ``j`` (``0 <= j < S``) is slot ``j``.
Query ``i`` may attend key ``j`` iff every part that is set allows it:

    kv_valid[b, j]                                          padding of the keys (left or right)
    causal:          j <= q_offset + i
    sliding_window:  j >  q_offset + i - W                  Mistral's window of W slots
    segments:        q_segment_ids[b, i] == kv_segment_ids[b, j] and q_segment_ids[b, i] >= 0
                                                            block-diagonal packing (Qwen2-VL's cu_seqlens)

:meth:`StructuredMask.block` evaluates this on any tile of query and key indices (what a blockwise kernel
needs); :meth:`StructuredMask.dense` on all of them (what the einsum reference needs).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class StructuredMask:
    """A boolean attention mask given by its parts (module docstring); unset parts allow everything.

    Attributes:
      kv_valid: ``bool [B, S]`` real (True) or padding key slots; None: every slot is real.
      q_offset: the cache slot of query 0: a Python int (kept static through ``jit``, ``remat`` and ``scan``:
        it is pytree metadata, so a kernel with static masks can use it), or an int array (scalar or ``[B]``).
      q_segment_ids / kv_segment_ids: ``int [B, L]`` / ``int [B, S]`` segment of every query / key; ``-1`` marks
        padding queries (they attend nothing). Both or neither.
      causal: static; keys at slots after the query's are hidden.
      sliding_window: static ``W``; only keys with ``slot > q_slot - W`` are seen (None: no window).

    >>> import jax.numpy as jnp
    >>> m = StructuredMask(kv_valid=jnp.array([[0, 1, 1, 1]], bool), causal=True, sliding_window=2)
    >>> m.dense(4, 4)[0, 0].astype(int).tolist()
    [[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """

    kv_valid: jax.Array | None = None
    q_offset: jax.Array | int = 0
    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None
    causal: bool = False
    sliding_window: int | None = None

    def __post_init__(self):
        if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
            raise ValueError("StructuredMask needs both q_segment_ids and kv_segment_ids, or neither")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")

    def replace(self, **kw) -> "StructuredMask":
        return dataclasses.replace(self, **kw)

    @property
    def static_offset(self) -> int | None:
        """``q_offset`` as a Python int when it is one (known at trace time), else None."""
        off = self.q_offset
        return int(off) if isinstance(off, (int, np.integer)) else None

    def block(self, q_index: jax.Array, kv_index: jax.Array) -> jax.Array | None:
        """The mask on a tile: ``bool [B or 1, 1, len(q_index), len(kv_index)]``; None when nothing is masked.

        ``q_index`` are query positions (``0 .. L-1``), ``kv_index`` key slots (``0 .. S-1``), each an int
        vector. Indices past the end of ``kv_valid`` / the segment ids count as padding (hidden).
        """
        qi = jnp.asarray(q_index, jnp.int32)[:, None]  # [bq, 1]
        kj = jnp.asarray(kv_index, jnp.int32)[None, :]  # [1, bk]
        mask = None

        def both(a, b):
            return b if a is None else a & b

        if self.causal or self.sliding_window is not None:
            off = jnp.asarray(self.q_offset, jnp.int32)
            off = off[:, None, None] if off.ndim == 1 else off  # [B, 1, 1] or scalar
            q_slot = qi + off  # [bq, 1] or [B, bq, 1]
            if self.causal:
                mask = both(mask, kj <= q_slot)
            if self.sliding_window is not None:
                mask = both(mask, kj > q_slot - self.sliding_window)
        if self.kv_valid is not None:
            valid = jnp.take(self.kv_valid.astype(bool), kv_index, axis=1, mode="fill", fill_value=False)  # [B, bk]
            mask = both(mask, valid[:, None, :])
        if self.q_segment_ids is not None:
            qs = jnp.take(self.q_segment_ids, q_index, axis=1, mode="fill", fill_value=-1)  # [B, bq]
            ks = jnp.take(self.kv_segment_ids, kv_index, axis=1, mode="fill", fill_value=-2)  # [B, bk]
            mask = both(mask, (qs[:, :, None] == ks[:, None, :]) & (qs[:, :, None] >= 0))
        if mask is None:
            return None
        if mask.ndim == 2:
            mask = mask[None]
        return mask[:, None]  # [B or 1, 1, bq, bk]

    def dense(self, query_length: int, kv_length: int, batch: int | None = None) -> jax.Array:
        """The whole mask ``bool [B, 1, L, S]`` (``B`` from the arrays, or ``batch``, else 1)."""
        mask = self.block(jnp.arange(query_length), jnp.arange(kv_length))
        if mask is None:
            mask = jnp.ones((1, 1, query_length, kv_length), bool)
        b = batch or mask.shape[0]
        return jnp.broadcast_to(mask, (b, 1, query_length, kv_length))


def _flatten(m: StructuredMask):
    static_off = m.static_offset
    children = (m.kv_valid, None if static_off is not None else m.q_offset, m.q_segment_ids, m.kv_segment_ids)
    return children, (m.causal, m.sliding_window, static_off)


def _unflatten(aux, children) -> StructuredMask:
    causal, window, static_off = aux
    kv_valid, off, q_seg, kv_seg = children
    return StructuredMask(kv_valid, static_off if static_off is not None else off, q_seg, kv_seg, causal, window)


jax.tree_util.register_pytree_node(StructuredMask, _flatten, _unflatten)


def is_structured(mask) -> bool:
    """True for a :class:`StructuredMask`, False for a dense boolean array (or None)."""
    return isinstance(mask, StructuredMask)
