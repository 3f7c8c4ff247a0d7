"""Multi-head / grouped-query attention with masks and an explicit KV cache.

    attn(q, k, v) = softmax(q k^T * scale + mask) v,     scale = head_dim ** -0.5

Grouped-query attention (Ainslie et al. 2023): ``H`` query heads share ``K`` key/value heads,
``G = H / K`` query heads per kv head; ``K == H`` is ordinary multi-head attention.
Logits and softmax are computed in float32 whatever the compute dtype.

The KV cache is explicit — a dict ``{"k": [B, S, K, Dh], "v": [B, S, K, Dh]}`` passed in and
returned — so decoding is a pure function that ``lax.while_loop``/``scan`` can carry. A chunk of
``L`` tokens is written at cache slots ``[index, index + L)``; masks are expressed over slots.

:func:`attention` is the one entry point with several implementations (``impl``): the einsum reference
(:func:`dot_product_attention`, ``"xla"``), a blockwise online softmax in ``jnp`` (``"chunked"``,
:mod:`vjax.layers.flash`), ``jax.nn.dot_product_attention`` (``"cudnn"``), TPU splash attention
(``"splash"``, :mod:`vjax.layers.splash`) and ``"auto"`` (by backend). Masks are a dense boolean array or a
:class:`~vjax.layers.masks.StructuredMask` (padding, offset, causal, window, segments), which the
memory-efficient kernels use without ever building the ``[L, S]`` mask.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vjax.layers.flash import chunked_attention
from vjax.layers.lora import LoRADense
from vjax.layers.masks import StructuredMask
from vjax.layers.mlp import dense
from vjax.layers.partitioning import target_platform
from vjax.layers.rope import apply_rotary_pos_emb
from vjax.layers.splash import splash_attention, splash_supports

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
    return structured_mask(kv_valid, query_offset=query_offset, causal=causal,
                           sliding_window=sliding_window).dense(query_length, kv_valid.shape[-1])  # [B, 1, L, S]


def structured_mask(
    kv_valid: jax.Array | None,
    *,
    query_offset: jax.Array | int = 0,
    causal: bool = True,
    sliding_window: int | None = None,
) -> StructuredMask:
    """The :class:`~vjax.layers.masks.StructuredMask` whose ``dense(L, S)`` is :func:`make_attention_mask`."""
    return StructuredMask(kv_valid=None if kv_valid is None else kv_valid.astype(bool), q_offset=query_offset,
                          causal=causal, sliding_window=sliding_window)


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


IMPLS = ("auto", "xla", "chunked", "cudnn", "splash")


def check_impl(impl: str) -> str:
    """``impl`` if it names an attention implementation, else a ``ValueError`` naming it and the choices."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl={impl!r} is not one of {IMPLS}")
    return impl


def resolve_impl(impl: str, q_len: int, mask=None, bias=None, dtype=None) -> str:
    """The implementation ``"auto"`` stands for on the target platform (:func:`target_platform`; others are
    returned as they are):

    * tpu: ``"splash"`` when :func:`~vjax.layers.splash.splash_supports` the call (structured mask with a
      static offset, no bias, ``L > 1``), else ``"chunked"`` (no bias) or ``"xla"``;
    * gpu: ``"cudnn"`` for float16/bfloat16 (cuDNN's flash kernel takes only those), else ``"xla"``;
    * cpu and anything else: ``"xla"``.
    """
    check_impl(impl)
    if impl != "auto":
        return impl
    backend = target_platform()
    if backend == "tpu":
        if splash_supports(q_len, mask, bias):
            return "splash"
        return "xla" if bias is not None or q_len <= 1 else "chunked"
    if backend in ("gpu", "cuda", "rocm"):
        return "cudnn" if jnp.dtype(dtype or jnp.float32) in (jnp.float16, jnp.bfloat16) else "xla"
    return "xla"


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: StructuredMask | jax.Array | None = None,
    *,
    bias: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """``jax.nn.dot_product_attention`` with ``implementation="cudnn"`` on a GPU for float16/bfloat16 inputs and
    ``None`` (its XLA path) otherwise (float32, any other backend), so the same mapping runs and is tested on a
    CPU. Shapes as :func:`attention`.

    Structure maps to its arguments where it fits: ``causal`` with a static zero offset and ``L == S`` ->
    ``is_causal``, plus a sliding window ``W`` -> ``local_window_size=(W - 1, 0)``; padding and segments
    (and any other case) go in as a dense ``[B, 1, L, S]`` mask, which cuDNN also takes. A row with nothing
    to attend is the mean of ``v`` on the XLA path (as the reference); cuDNN's value there is unspecified.
    cuDNN trains on even lengths only: an odd ``L`` or ``S`` gets one hidden padding slot (:func:`_pad_to_even`).
    """
    b, l, h, dh = q.shape
    s = k.shape[1]
    is_causal, window = False, None
    if isinstance(mask, StructuredMask):
        if mask.causal and mask.static_offset == 0 and l == s:
            is_causal = True
            window = None if mask.sliding_window is None else (mask.sliding_window - 1, 0)
            rest = mask.replace(causal=False, sliding_window=None)
            rest_mask = rest.block(jnp.arange(l), jnp.arange(s))
            mask = None if rest_mask is None else jnp.broadcast_to(rest_mask, (b, 1, l, s))
        else:
            mask = mask.dense(l, s, b)
    elif mask is not None:
        mask = jnp.asarray(mask).astype(bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        mask = jnp.broadcast_to(mask, (b, mask.shape[1], l, s))  # [B, 1 or H, L, S]
    if bias is not None:
        bias = jnp.asarray(bias)
        bias = jnp.broadcast_to(bias.reshape((1,) * (4 - bias.ndim) + bias.shape), (b, h, l, s))
    # cuDNN's fused kernel takes float16/bfloat16 only: float32 on a GPU goes to jax.nn's XLA path (None)
    half = jnp.dtype(q.dtype) in (jnp.float16, jnp.bfloat16)
    implementation = "cudnn" if half and target_platform() in ("gpu", "cuda") else None
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if implementation == "cudnn" and (l % 2 or s % 2):
        q, k, v, mask, bias = _pad_to_even(q, k, v, mask, bias, hidden=not (is_causal and l == s))
    out = jax.nn.dot_product_attention(q, k, v, bias, mask, scale=scale, is_causal=is_causal,
                                       local_window_size=window, implementation=implementation)
    return out[:, :l]


def _pad_to_even(q, k, v, mask, bias, hidden: bool):
    """One padding query and/or key slot so that ``L`` and ``S`` are even (cuDNN refuses to train on odd lengths,
    e.g. the 257 tokens of a CLIP ViT-L/14). The padding key is hidden from every query by the mask (``hidden``;
    unnecessary under a causal mask with ``L == S``, where it comes after every real query); the padding query
    attends the real keys (so its row is finite) and its output is sliced off by the caller."""
    b, l, h, _ = q.shape
    s = k.shape[1]
    pl, ps = l % 2, s % 2
    q = jnp.pad(q, ((0, 0), (0, pl), (0, 0), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, ps), (0, 0), (0, 0))) for x in (k, v))
    if mask is None and hidden:
        mask = jnp.ones((b, 1, l, s), bool)
    if mask is not None:  # padding query rows attend every real key; padding key columns are hidden
        mask = jnp.pad(jnp.pad(mask, ((0, 0), (0, 0), (0, pl), (0, 0)), constant_values=True),
                       ((0, 0), (0, 0), (0, 0), (0, ps)), constant_values=False)
    if bias is not None:
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pl), (0, ps)))
    return q, k, v, mask, bias


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: StructuredMask | jax.Array | None = None,
    *,
    bias: jax.Array | None = None,
    scale: float | None = None,
    impl: str = "xla",
    block_q: int = 512,
    block_kv: int = 512,
    interpret: bool | None = None,
) -> jax.Array:
    """``softmax(scale * q k^T + bias, masked) v``: ``q [B, L, H, Dh]``, ``k``/``v [B, S, K, Dh]`` -> ``[B, L, H, Dh]``.

    ``mask``: a dense boolean array broadcastable to ``[B, H, L, S]`` (True = attend) or a
    :class:`~vjax.layers.masks.StructuredMask`. ``impl``:

    * ``"xla"``: :func:`dot_product_attention`, the reference (densifies a structured mask);
    * ``"chunked"``: :func:`vjax.layers.flash.chunked_attention`, ``O(L x block)`` memory on any backend,
      ``block_q``/``block_kv`` its tiles; no ``bias`` (``ValueError``);
    * ``"cudnn"``: :func:`cudnn_attention` (cuDNN on a GPU, ``jax.nn``'s XLA path elsewhere);
    * ``"splash"``: :func:`vjax.layers.splash.splash_attention` (TPU Pallas; interpreted elsewhere); needs a
      structured mask with a static offset and no bias (``ValueError`` otherwise). The decode step
      (``L = 1``) runs the reference instead. ``interpret``: run the kernel in the Pallas interpreter
      (default: when the platform compiled for is not a TPU -- the active mesh's devices, so a CPU host
      compiling for abstract TPU chips under ``jax.set_mesh`` compiles the kernel; pass False to do so
      without a mesh). Under a mesh and logical rules it runs per device (``jax.shard_map``);
    * ``"auto"``: :func:`resolve_impl` (tpu: splash or chunked, gpu: cudnn, cpu: xla).

    Every implementation equals the reference on rows that attend something; a row that attends nothing is
    the mean of ``v`` (finite) except under splash and cuDNN proper, where it is finite but unspecified.
    """
    impl = resolve_impl(impl, q.shape[1], mask, bias, q.dtype)
    if impl == "splash" and q.shape[1] == 1:
        impl = "xla"
    if impl == "xla":
        if isinstance(mask, StructuredMask):
            mask = mask.dense(q.shape[1], k.shape[1], q.shape[0])
        return dot_product_attention(q, k, v, mask, bias=bias, scale=scale)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, mask, bias=bias, scale=scale)
    if bias is not None:
        raise ValueError(f"impl={impl!r} takes no additive bias; use impl='xla' or 'cudnn' for a biased call")
    if impl == "chunked":
        return chunked_attention(q, k, v, mask, scale=scale, block_q=block_q, block_kv=block_kv)
    return splash_attention(q, k, v, mask, scale=scale, interpret=interpret)


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
      impl: the attention implementation (:func:`attention`); the default is the reference ``"xla"``. A call
        with ``bias`` runs the reference whatever ``impl`` says (the kernels take none).
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
    impl: str = "xla"
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
        mask: StructuredMask | jax.Array | None = None,
        bias: jax.Array | None = None,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, Cache | None]:
        """``x [B, L, D]`` (and ``kv_inputs [B, S, E]`` for cross-attention) -> ``([B, L, D], cache)``.

        ``cos``/``sin [B, L, Dh]`` rotate q and k (self-attention only). With ``cache``, the new keys
        and values are written at ``cache_index`` and attention runs over all cache slots; ``mask``
        must then be ``[B, 1, L, S_cache]`` (or a :class:`~vjax.layers.masks.StructuredMask` over the slots).
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
            if isinstance(mask, StructuredMask):  # densify: the extra slot breaks causal/segment structure
                mask = mask.dense(l, src.shape[1], b)
            if mask is not None:  # the learned slot is visible to every query
                mask = jnp.broadcast_to(mask, jnp.broadcast_shapes(mask.shape, (1, 1, l, src.shape[1])))
                mask = jnp.concatenate([mask, jnp.ones(mask.shape[:-1] + (1,), bool)], axis=-1)
            if bias is not None:
                bias = jnp.pad(bias, [(0, 0)] * (bias.ndim - 1) + [(0, 1)])
        new_cache = None
        if cache is not None:
            new_cache = update_cache(cache, k, v, cache_index)
            k, v = new_cache["k"].astype(self.dtype), new_cache["v"].astype(self.dtype)
        impl = "xla" if bias is not None else self.impl
        out = attention(q, k, v, mask, bias=bias, scale=self.scale, impl=impl)  # [B, L, H, Dh]
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
