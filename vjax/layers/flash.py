"""Blockwise attention with an online softmax (FlashAttention, Dao et al. 2022; FlashAttention-2, Dao 2023)
in plain ``jnp``/``lax``: runs on any backend, and its temporaries are ``O(L x block)``, not ``O(L x S)``.

Forward, per query block ``i`` and key block ``j`` (``s = scale * q k^T`` with hidden entries set to the
float32 minimum, as the einsum reference does):

    m_new = max(m, rowmax(s_ij));   p = exp(s_ij - m_new)
    l     = l * exp(m - m_new) + rowsum(p)
    acc   = acc * exp(m - m_new) + p v_j                    out_i = acc / l

Only ``m`` and ``l`` per query row are saved (not the probabilities). The backward pass recomputes
``P_ij = exp(s_ij - m_i) / l_i`` tile by tile and applies, with ``D_i = rowsum(dO_i * O_i)``:

    dV_j = sum_i P_ij^T dO_i            dP_ij = dO_i V_j^T          dS_ij = P_ij * (dP_ij - D_i)
    dQ_i = scale * sum_j dS_ij K_j      dK_j  = scale * sum_i dS_ij^T Q_i

(``dS`` is zero on hidden entries, as the reference's ``where`` makes it). A row with nothing to attend
gets every key with the same logit, so it is the mean of ``v`` (the reference's convention): finite, and
its gradient flows only to ``v``. Grouped-query heads are never repeated: ``q`` is viewed as
``[B, L, K, G, Dh]`` and each kv head serves its ``G`` query heads inside the tile einsum. ``L`` and ``S``
are padded internally to multiples of the blocks; padded keys get probability exactly 0.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vjax.layers.masks import StructuredMask

_MIN = float(jnp.finfo(jnp.float32).min)


class _Static(NamedTuple):
    scale: float
    block_q: int
    block_kv: int
    q_len: int  # L before padding
    kv_len: int  # S before padding
    causal: bool
    sliding_window: int | None


def _pad_to(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    n = x.shape[axis]
    extra = -n % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _tile_mask(st: _Static, arrays: dict, i: jax.Array, j: jax.Array, heads: tuple[int, int]) -> jax.Array:
    """``bool [B or 1, K or 1, G or 1, bq, bk]``: which entries of tile ``(i, j)`` are seen (not counting the
    internal key padding, handled separately)."""
    q_idx = i * st.block_q + jnp.arange(st.block_q)
    k_idx = j * st.block_kv + jnp.arange(st.block_kv)
    spec = StructuredMask(kv_valid=arrays.get("kv_valid"), q_offset=arrays.get("q_offset", 0),
                          q_segment_ids=arrays.get("q_segment_ids"), kv_segment_ids=arrays.get("kv_segment_ids"),
                          causal=st.causal, sliding_window=st.sliding_window)
    mask = spec.block(q_idx, k_idx)  # [B or 1, 1, bq, bk] or None
    mask = jnp.ones((1, 1, 1, 1), bool) if mask is None else mask
    mask = mask[:, :, None]  # [B|1, 1, 1, bq, bk]
    dense = arrays.get("dense")
    if dense is not None:  # [Bm, Hm, Lp, Sp], padded with False
        tile = jax.lax.dynamic_slice(dense, (0, 0, i * st.block_q, j * st.block_kv),
                                     dense.shape[:2] + (st.block_q, st.block_kv))
        kh, g = heads
        tile = tile.reshape(tile.shape[0], kh, g, st.block_q, st.block_kv) if tile.shape[1] > 1 else tile[:, :, None]
        mask = mask & tile
    return mask


def _logits(st: _Static, qt: jax.Array, kt: jax.Array, mask: jax.Array) -> jax.Array:
    """``qt [B, bq, K, G, Dh]``, ``kt [B, bk, K, Dh]`` -> masked float32 logits ``[B, K, G, bq, bk]``."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", qt, kt, preferred_element_type=jnp.float32).astype(jnp.float32)
    return jnp.where(mask, s * st.scale, _MIN)


def _key_in_range(st: _Static, j: jax.Array) -> jax.Array:
    return (j * st.block_kv + jnp.arange(st.block_kv)) < st.kv_len  # [bk]


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """``[B, Np, ...]`` -> ``[Np / block, B, block, ...]`` (the scan axis first)."""
    b, n = x.shape[:2]
    return jnp.moveaxis(x.reshape((b, n // block, block) + x.shape[2:]), 1, 0)


def _unblocks(x: jax.Array) -> jax.Array:
    """Inverse of :func:`_blocks`."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def _forward(st: _Static, q, k, v, arrays):
    """Padded ``q [B, Lp, K, G, Dh]``, ``k``/``v [B, Sp, K, Dh]`` -> ``(out [B, Lp, K, G, Dh] in v's dtype,
    m [B, K, G, Lp], l [B, K, G, Lp])``."""
    b, lp, kh, g, dh = q.shape
    qb, kb, vb = _blocks(q, st.block_q), _blocks(k, st.block_kv), _blocks(v, st.block_kv)
    nk = kb.shape[0]

    def q_step(_, xs):
        i, qt = xs

        def kv_step(carry, ys):
            m, l, acc = carry
            j, kt, vt = ys
            s = _logits(st, qt, kt, _tile_mask(st, arrays, i, j, (kh, g)))  # [B, K, G, bq, bk]
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(_key_in_range(st, j), jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
            acc = acc * corr[..., None] + pv.astype(jnp.float32)
            return (m_new, l, acc), None

        init = (jnp.full((b, kh, g, st.block_q), _MIN, jnp.float32), jnp.zeros((b, kh, g, st.block_q), jnp.float32),
                jnp.zeros((b, kh, g, st.block_q, dh), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(kv_step, init, (jnp.arange(nk), kb, vb))
        out = (acc / l[..., None]).astype(v.dtype)  # [B, K, G, bq, Dh]
        return None, (jnp.moveaxis(out, 3, 1), m, l)  # out [B, bq, K, G, Dh]

    _, (out, m, l) = jax.lax.scan(q_step, None, (jnp.arange(qb.shape[0]), qb))
    # m, l: [nq, B, K, G, bq] -> [B, K, G, Lp]
    m = jnp.moveaxis(m, 0, 3).reshape(b, kh, g, lp)
    l = jnp.moveaxis(l, 0, 3).reshape(b, kh, g, lp)
    return _unblocks(out), m, l


def _backward(st: _Static, q, k, v, arrays, out, m, l, d_out):
    """Gradients ``(dq, dk, dv)`` of the padded problem, one pass: outer scan over key blocks (accumulating
    that block's dK, dV), inner scan over query blocks; dQ is carried whole (``O(L x Dh)``)."""
    b, lp, kh, g, dh = q.shape
    delta = jnp.einsum("blkgd,blkgd->bkgl", d_out.astype(jnp.float32), out.astype(jnp.float32))  # D [B, K, G, Lp]
    qb, dob = _blocks(q, st.block_q), _blocks(d_out, st.block_q)
    kb, vb = _blocks(k, st.block_kv), _blocks(v, st.block_kv)
    nq = qb.shape[0]

    def row_stats(x, i):  # [B, K, G, Lp] -> this query block's [B, K, G, bq, 1]
        return jax.lax.dynamic_slice_in_dim(x, i * st.block_q, st.block_q, axis=3)[..., None]

    def kv_step(dq, ys):
        j, kt, vt = ys

        def q_step(carry, xs):
            dk, dv, dq = carry
            i, qt, dot = xs
            s = _logits(st, qt, kt, mask := _tile_mask(st, arrays, i, j, (kh, g)))
            p = jnp.exp(s - row_stats(m, i)) / row_stats(l, i)
            p = jnp.where(_key_in_range(st, j), p, 0.0)  # [B, K, G, bq, bk]
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p, dot.astype(jnp.float32))
            dp = jnp.einsum("bqkgd,bskd->bkgqs", dot.astype(jnp.float32), vt.astype(jnp.float32))
            ds = jnp.where(mask, p * (dp - row_stats(delta, i)), 0.0) * st.scale
            dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qt.astype(jnp.float32))
            dq_i = jnp.einsum("bkgqs,bskd->bqkgd", ds, kt.astype(jnp.float32))
            prev = jax.lax.dynamic_slice_in_dim(dq, i * st.block_q, st.block_q, axis=1)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, prev + dq_i, i * st.block_q, axis=1)
            return (dk, dv, dq), None

        zeros = jnp.zeros((b, st.block_kv, kh, dh), jnp.float32)
        (dk, dv, dq), _ = jax.lax.scan(q_step, (zeros, zeros, dq), (jnp.arange(nq), qb, dob))
        return dq, (dk, dv)

    dq0 = jnp.zeros(q.shape, jnp.float32)
    dq, (dk, dv) = jax.lax.scan(kv_step, dq0, (jnp.arange(kb.shape[0]), kb, vb))
    return dq.astype(q.dtype), _unblocks(dk).astype(k.dtype), _unblocks(dv).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, arrays):
    return _forward(st, q, k, v, arrays)[0]


def _flash_fwd(st, q, k, v, arrays):
    out, m, l = _forward(st, q, k, v, arrays)
    return out, (q, k, v, arrays, out, m, l)


def _flash_bwd(st, res, d_out):
    q, k, v, arrays, out, m, l = res
    dq, dk, dv = _backward(st, q, k, v, arrays, out, m, l, d_out)
    return dq, dk, dv, jax.tree_util.tree_map(lambda _: None, arrays)


_flash.defvjp(_flash_fwd, _flash_bwd)


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: StructuredMask | jax.Array | None = None,
    *,
    scale: float | None = None,
    block_q: int = 512,
    block_kv: int = 512,
) -> jax.Array:
    """Blockwise attention (module docstring): ``q [B, L, H, Dh]``, ``k``/``v [B, S, K, Dh]`` -> ``[B, L, H, Dh]``.

    ``mask``: a :class:`~vjax.layers.masks.StructuredMask` (never densified), or a dense boolean array
    broadcastable to ``[B, H, L, S]`` (sliced per tile; it costs what the caller built). Equals
    :func:`vjax.layers.attention.dot_product_attention` (same fully-masked-row convention). Blocks shrink
    to ``L`` / ``S`` (rounded up to 8) for short inputs.
    """
    b, l, h, dh = q.shape
    s, kh = k.shape[1], k.shape[2]
    if h % kh:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kh})")
    g = h // kh
    bq = min(block_q, -(-l // 8) * 8)
    bk = min(block_kv, -(-s // 8) * 8)
    arrays: dict = {}
    causal, window = False, None
    if isinstance(mask, StructuredMask):
        causal, window = mask.causal, mask.sliding_window
        arrays = {"kv_valid": mask.kv_valid, "q_offset": jnp.asarray(mask.q_offset, jnp.int32),
                  "q_segment_ids": mask.q_segment_ids, "kv_segment_ids": mask.kv_segment_ids}
        arrays = {key: val for key, val in arrays.items() if val is not None}
    elif mask is not None:
        dense = jnp.asarray(mask).astype(bool)
        dense = dense.reshape((1,) * (4 - dense.ndim) + dense.shape)
        dense = jnp.broadcast_to(dense, dense.shape[:2] + (l, s))  # [Bm, Hm, L, S]
        if dense.shape[1] not in (1, h):
            raise ValueError(f"mask head axis {dense.shape[1]} is neither 1 nor num_heads={h}")
        arrays = {"dense": _pad_to(_pad_to(dense, 2, bq, False), 3, bk, False)}
    st = _Static(float(dh**-0.5 if scale is None else scale), bq, bk, l, s, causal, window)
    qp = _pad_to(q, 1, bq).reshape(b, -1, kh, g, dh)  # [B, Lp, K, G, Dh]
    kp, vp = _pad_to(k, 1, bk), _pad_to(v, 1, bk)  # [B, Sp, K, Dh]
    out = _flash(st, qp, kp, vp, arrays)  # [B, Lp, K, G, Dh]
    return out[:, :l].reshape(b, l, h, dh)
