"""Multi-head / grouped-query attention with masks and an explicit KV cache.

    attn(q, k, v) = softmax(q k^T * scale + mask) v,     scale = head_dim ** -0.5

Grouped-query attention (Ainslie et al. 2023): ``H`` query heads share ``K`` key/value heads,
``G = H / K`` query heads per kv head; ``K == H`` is ordinary multi-head attention.
Logits and softmax are computed in float32 whatever the compute dtype.

The KV cache is explicit — a dict ``{"k": [B, S, K, Dh], "v": [B, S, K, Dh]}`` passed in and
returned — so decoding is a pure function that ``lax.while_loop``/``scan`` can carry. A chunk of
``L`` tokens is written at cache slots ``[index, index + L)``; masks are expressed over slots.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vjax.layers.lora import LoRADense
from vjax.layers.mlp import dense
from vjax.layers.rope import apply_rotary_pos_emb

Cache = dict  # {"k": [B, S, K, Dh], "v": [B, S, K, Dh]}


def make_attention_mask(
    kv_valid: jax.Array,
    query_length: int,
    *,
    query_offset: jax.Array | int = 0,
    causal: bool = True,
    sliding_window: int | None = None,
) -> jax.Array:
    """Boolean mask ``[B, 1, L, S]``: may query slot ``query_offset + i`` attend key slot ``j``?

    ``kv_valid [B, S]`` marks real (non-padding) key slots. With ``causal`` a query sees key slots
    ``j <= i``; with ``sliding_window = W`` only ``i - W < j`` as well (Mistral).

    >>> import jax.numpy as jnp
    >>> make_attention_mask(jnp.array([[0, 1, 1]]), 3)[0, 0].astype(int).tolist()
    [[0, 0, 0], [0, 1, 0], [0, 1, 1]]
    """
    kv_valid = kv_valid.astype(bool)
    s = kv_valid.shape[-1]
    q_slot = jnp.asarray(query_offset, jnp.int32)[..., None] + jnp.arange(query_length)  # [L] or [B, L]
    q_slot = jnp.broadcast_to(q_slot, (kv_valid.shape[0], query_length))[:, :, None]  # [B, L, 1]
    k_slot = jnp.arange(s)[None, None, :]  # [1, 1, S]
    mask = jnp.broadcast_to(kv_valid[:, None, :], (kv_valid.shape[0], query_length, s))
    if causal:
        mask = mask & (k_slot <= q_slot)
    if sliding_window is not None:
        mask = mask & (k_slot > q_slot - sliding_window)
    return mask[:, None]  # [B, 1, L, S]


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    bias: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """``q [B, L, H, Dh]``, ``k``/``v [B, S, K, Dh]`` with ``H % K == 0`` -> ``[B, L, H, Dh]``.

    ``mask`` is boolean, broadcastable to ``[B, H, L, S]`` (True = attend). ``bias`` is added to the
    logits (broadcastable to ``[B, H, L, S]``). A row with nothing to attend gives the mean of ``v``
    (finite, never NaN); callers ignore such rows (padding queries).
    """
    b, l, h, dh = q.shape
    kh = k.shape[2]
    if h % kh:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kh})")
    g = h // kh
    scale = dh**-0.5 if scale is None else scale
    qg = q.reshape(b, l, kh, g, dh)  # [B, L, K, G, Dh]
    logits = jnp.einsum("blkgd,bskd->bkgls", qg, k, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) * scale  # [B, K, G, L, S]
    if bias is not None:
        bias = jnp.broadcast_to(bias, (b, h) + logits.shape[-2:]).reshape(logits.shape)
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, h) + logits.shape[-2:]).reshape(logits.shape)
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgls,bskd->blkgd", probs, v)  # [B, L, K, G, Dh]
    return out.reshape(b, l, h, dh)


def update_cache(cache: Cache, k: jax.Array, v: jax.Array, index: jax.Array) -> Cache:
    """Write ``k``/``v [B, L, K, Dh]`` into cache slots ``[index, index + L)``."""
    zero = jnp.zeros((), jnp.int32)
    start = (zero, jnp.asarray(index, jnp.int32), zero, zero)
    return {
        "k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start),
        "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start),
    }


def init_cache(batch: int, length: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32) -> Cache:
    """An empty cache of ``length`` slots."""
    shape = (batch, length, num_kv_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _bias_flags(qkv_bias: bool | Sequence[bool]) -> tuple[bool, bool, bool]:
    if isinstance(qkv_bias, bool):
        return (qkv_bias,) * 3
    flags = tuple(bool(f) for f in qkv_bias)
    if len(flags) != 3:
        raise ValueError(f"qkv_bias must be a bool or three bools (q, k, v), got {qkv_bias!r}")
    return flags  # type: ignore[return-value]


class Attention(nn.Module):
    """Self- or cross-attention with projections ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``.

    Attributes:
      num_heads, num_kv_heads, head_dim: head layout (``num_kv_heads < num_heads`` is GQA).
      qkv_bias: bias on q/k/v projections, one bool or a triple (EVA's q and v bias without k).
      out_bias: bias on the output projection.
      scale: logit scale, default ``head_dim ** -0.5``.
      bias_kv: learned key and value vectors ``bias_k``/``bias_v`` ``[K * Dh]`` appended after the
        projected keys/values as one extra, always visible key slot (``torch.nn.MultiheadAttention``
        with ``add_bias_kv=True``, used by ImageBind): ``S -> S + 1``. Not combinable with a cache.
      lora_rank, lora_alpha, lora_targets: a LoRA adapter (:class:`vjax.layers.lora.LoRADense`) of rank
        ``lora_rank`` and scale ``lora_alpha / lora_rank`` on the named projections (e.g. ``("q_proj",
        "v_proj")``); ``lora_rank = 0`` (default) builds plain projections.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool | tuple[bool, bool, bool] = False
    out_bias: bool = False
    out_features: int | None = None
    scale: float | None = None
    bias_kv: bool = False
    lora_rank: int = 0
    lora_alpha: float = 1.0
    lora_targets: tuple[str, ...] = ()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _proj(self, name: str, features: int, axes: tuple[str, str], use_bias: bool) -> nn.Module:
        kw = dict(use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        if self.lora_rank and name in self.lora_targets:
            return LoRADense(features, axes, self.lora_rank, self.lora_alpha, **kw)
        return dense(features, axes, **kw)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        kv_inputs: jax.Array | None = None,
        cos: jax.Array | None = None,
        sin: jax.Array | None = None,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, Cache | None]:
        """``x [B, L, D]`` (and ``kv_inputs [B, S, E]`` for cross-attention) -> ``([B, L, D], cache)``.

        ``cos``/``sin [B, L, Dh]`` rotate q and k (self-attention only). With ``cache``, the new keys
        and values are written at ``cache_index`` and attention runs over all cache slots; ``mask``
        must then be ``[B, 1, L, S_cache]``.
        """
        bq, bk, bv = _bias_flags(self.qkv_bias)
        b, l, d = x.shape
        src = x if kv_inputs is None else kv_inputs
        q = self._proj("q_proj", self.num_heads * self.head_dim, ("embed", "heads"), bq)(x)
        k = self._proj("k_proj", self.num_kv_heads * self.head_dim, ("embed", "kv_heads"), bk)(src)
        v = self._proj("v_proj", self.num_kv_heads * self.head_dim, ("embed", "kv_heads"), bv)(src)
        q = q.reshape(b, l, self.num_heads, self.head_dim)  # [B, L, H, Dh]
        k = k.reshape(b, src.shape[1], self.num_kv_heads, self.head_dim)  # [B, S, K, Dh]
        v = v.reshape(b, src.shape[1], self.num_kv_heads, self.head_dim)
        if cos is not None:
            q = apply_rotary_pos_emb(q, cos, sin)
            k = apply_rotary_pos_emb(k, cos, sin)
        if self.bias_kv:
            if cache is not None:
                raise ValueError("bias_kv attention does not support a KV cache")
            k, v = self._append_bias_kv(k, v)  # [B, S + 1, K, Dh]
            if mask is not None:  # the learned slot is visible to every query
                mask = jnp.concatenate([mask, jnp.ones(mask.shape[:-1] + (1,), bool)], axis=-1)
            if bias is not None:
                bias = jnp.pad(bias, [(0, 0)] * (bias.ndim - 1) + [(0, 1)])
        new_cache = None
        if cache is not None:
            new_cache = update_cache(cache, k, v, cache_index)
            k, v = new_cache["k"].astype(self.dtype), new_cache["v"].astype(self.dtype)
        out = dot_product_attention(q, k, v, mask, bias=bias, scale=self.scale)  # [B, L, H, Dh]
        out = out.reshape(b, l, self.num_heads * self.head_dim)
        out = self._proj("o_proj", self.out_features or d, ("heads", "embed"), self.out_bias)(out)
        return out, new_cache

    def _append_bias_kv(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Append the learned ``bias_k``/``bias_v`` as one more key/value slot: ``[B, S+1, K, Dh]``."""
        shape = (self.num_kv_heads * self.head_dim,)
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("kv_heads",))
        extra = []
        for name, x in (("bias_k", k), ("bias_v", v)):
            b = self.param(name, init, shape, self.param_dtype).astype(x.dtype)
            b = jnp.broadcast_to(b.reshape(1, 1, self.num_kv_heads, self.head_dim), (x.shape[0], 1) + x.shape[2:])
            extra.append(jnp.concatenate([x, b], axis=1))
        return extra[0], extra[1]
