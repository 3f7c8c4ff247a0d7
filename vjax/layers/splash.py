"""TPU splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) behind a
:class:`~vjax.layers.masks.StructuredMask`.

The kernel sees one example: ``q [H, L, Dh]``, ``k``/``v [K, S, Dh]`` (``H % K == 0``: it maps query head
``h`` to kv head ``h // G`` itself, so GQA needs no repeat), a static per-head mask and optional segment ids
``q [L]``, ``kv [S]`` (query ``i`` sees key ``j`` only where the ids are equal). The batch is a ``vmap``.

XLA cannot partition a Pallas kernel (jit refuses one in a computation over several devices unless a
``shard_map`` hands it each device's part). So while a mesh (and logical rules) are active (the
``Trainer``'s steps, ``experiments.plan``) the kernel runs under ``jax.shard_map`` on each device's own
examples (``batch``) and, where the mesh splits them, its own heads (``heads``/``kv_heads``, only when both
split alike so every device keeps whole GQA groups) -- :func:`kernel_specs`. Call it under ``jax.set_mesh``
when its inputs are sharded: outside a mesh, jit refuses a Mosaic kernel on sharded inputs.
The structure maps as:

    causal, sliding_window, q_offset (a Python int)  -> the static mask: CausalMask / LocalMask((W-1, 0))
    kv_valid, q/kv segment ids, the internal padding  -> segment ids: q_seg = segment (or 0), -1 for a padding
                                                          query; kv_seg = segment (or 0) where the key is real,
                                                          -2 where it is padding

The kernel applies no logit scale, so ``q`` is multiplied by ``scale`` first. ``L`` and ``S`` are padded to
multiples of 128 (its lane width) and the blocks are the largest of 512/256/128 dividing them. A row with
nothing to attend is finite but is not the reference's mean of ``v`` (the kernel skips key blocks that the
static mask hides); the decoder ignores such rows (padding queries).

A dense mask cannot be expressed (the kernel takes structure), so :func:`splash_attention` raises; a traced
``q_offset`` (decoding) cannot either: ``vjax.layers.attention.attention`` with ``impl="auto"`` uses the
chunked kernel or the einsum in those cases (:func:`splash_supports`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vjax.layers.masks import StructuredMask
from vjax.layers.partitioning import axis_size, spec_for, target_platform

LANES = 128


def splash_supports(q_len: int, mask, bias=None) -> bool:
    """Whether :func:`splash_attention` can run this call: a structured (or no) mask with a Python-int
    ``q_offset``, no bias, and more than one query (the decode step, ``L = 1``, stays on the einsum)."""
    if bias is not None or q_len <= 1:
        return False
    if mask is None:
        return True
    return isinstance(mask, StructuredMask) and mask.static_offset is not None


def _block(n: int) -> int:
    return next(b for b in (512, 256, 128) if n % b == 0)


def _static_mask(spec: StructuredMask | None, heads: int, lp: int, sp: int):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    shape = (lp, sp)
    if spec is None or not (spec.causal or spec.sliding_window is not None):
        one = mask_lib.FullMask(shape)
    elif spec.sliding_window is not None:
        right = 0 if spec.causal else None
        one = mask_lib.LocalMask(shape, (spec.sliding_window - 1, right), offset=spec.static_offset)
    else:
        one = mask_lib.CausalMask(shape, offset=spec.static_offset)
    return mask_lib.MultiHeadMask([one] * heads)


def _segment_ids(spec: StructuredMask | None, b: int, l: int, s: int, lp: int, sp: int):
    """``(q_seg [B, Lp], kv_seg [B, Sp])`` int32 that encode padding and segments (module docstring)."""
    if spec is not None and spec.q_segment_ids is not None:
        q_seg = jnp.where(spec.q_segment_ids >= 0, spec.q_segment_ids, -1).astype(jnp.int32)
        kv_seg = jnp.where(spec.kv_segment_ids >= 0, spec.kv_segment_ids, -2).astype(jnp.int32)
    else:
        q_seg, kv_seg = jnp.zeros((b, l), jnp.int32), jnp.zeros((b, s), jnp.int32)
    if spec is not None and spec.kv_valid is not None:
        kv_seg = jnp.where(spec.kv_valid.astype(bool), kv_seg, -2)
    q_seg = jnp.pad(jnp.broadcast_to(q_seg, (b, l)), ((0, 0), (0, lp - l)), constant_values=-1)
    kv_seg = jnp.pad(jnp.broadcast_to(kv_seg, (b, s)), ((0, 0), (0, sp - s)), constant_values=-2)
    return q_seg, kv_seg


def kernel_specs(b: int, h: int, kh: int) -> tuple[P, P, int] | None:
    """``(operands, segment ids, head devices)`` under the active mesh (``jax.set_mesh``) and logical rules
    (``nn.logical_axis_rules``), or None without a mesh: the partition spec of ``q``/``k``/``v`` and the output
    ``[B, heads, ., .]``, that of the segment ids ``[B, .]``, and how many devices the heads split over. The batch
    splits by ``batch``'s rule; heads only when ``heads`` and ``kv_heads`` map to the same mesh axes (else a
    device would hold query heads without their kv head). Without rules nothing splits: every device runs the
    whole call (correct, if redundant), since XLA cannot partition the kernel itself."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    rules = nn.get_logical_axis_rules() or ()
    q_spec = spec_for(("batch", "heads"), (b, h), mesh, rules)
    kv_spec = spec_for(("batch", "kv_heads"), (b, kh), mesh, rules)
    batch, heads = q_spec[0], q_spec[1] if q_spec[1] == kv_spec[1] else None
    return P(batch, heads, None, None), P(batch, None), axis_size(mesh, heads)


def _default_precision(fn):
    """``fn(q, k, v, q_seg, kv_seg)`` traced, forward and backward, under the default matmul precision.

    Mosaic rejects an fp32 contraction precision on bf16/f16 operands, which a process-wide
    ``jax_default_matmul_precision="highest"`` would ask for inside the kernel; the kernel's own backward is
    traced lazily (during ``grad``), so the context is re-entered there through ``jax.vjp``."""

    @jax.custom_vjp
    def wrapped(q, k, v, q_seg, kv_seg):
        with jax.default_matmul_precision("default"):
            return fn(q, k, v, q_seg, kv_seg)

    def fwd(q, k, v, q_seg, kv_seg):
        with jax.default_matmul_precision("default"):
            out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, q_seg, kv_seg), q, k, v)
        return out, pullback

    def bwd(pullback, d_out):
        with jax.default_matmul_precision("default"):
            return (*pullback(d_out), None, None)

    wrapped.defvjp(fwd, bwd)
    return wrapped


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: StructuredMask | None = None,
    *,
    scale: float | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """``q [B, L, H, Dh]``, ``k``/``v [B, S, K, Dh]`` -> ``[B, L, H, Dh]`` with the splash kernel.

    ``interpret``: run the Pallas kernel in the interpreter (any backend, slow); default: when the platform
    compiled for (:func:`~vjax.layers.partitioning.target_platform`: the active mesh's devices, else the default
    backend) is not a TPU. Raises ``ValueError`` for a dense mask or a traced ``q_offset`` (see :func:`splash_supports`).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if mask is not None and not isinstance(mask, StructuredMask):
        raise ValueError("impl='splash' needs a StructuredMask (vjax.layers.masks), not a dense boolean mask: "
                         "pass the structure, or use impl='chunked' (or 'auto', which falls back to it)")
    if mask is not None and mask.static_offset is None:
        raise ValueError("impl='splash' needs q_offset as a Python int (its mask is static); a traced offset "
                         "(KV-cache decoding) needs impl='chunked' or 'xla' ('auto' picks them)")
    b, l, h, dh = q.shape
    s, kh = k.shape[1], k.shape[2]
    if h % kh:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kh})")
    if interpret is None:  # the platform compiled for: a CPU host compiling for abstract TPU chips compiles the kernel
        interpret = target_platform() != "tpu"
    scale = dh**-0.5 if scale is None else scale
    lp, sp = -(-l // LANES) * LANES, -(-s // LANES) * LANES
    bq, bk = _block(lp), _block(sp)
    blocks = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                           block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    specs = kernel_specs(b, h, kh)
    local_heads = h // specs[2] if specs else h  # the kernel's static mask is per head: this device's heads
    kernel = sa.make_splash_mha(_static_mask(mask, local_heads, lp, sp), block_sizes=blocks, head_shards=1,
                                q_seq_shards=1, interpret=interpret)
    q_seg, kv_seg = _segment_ids(mask, b, l, s, lp, sp)
    qt = jnp.pad(jnp.moveaxis(q * jnp.asarray(scale, q.dtype), 1, 2), ((0, 0), (0, 0), (0, lp - l), (0, 0)))
    kt = jnp.pad(jnp.moveaxis(k, 1, 2), ((0, 0), (0, 0), (0, sp - s), (0, 0)))  # [B, K, Sp, Dh]
    vt = jnp.pad(jnp.moveaxis(v, 1, 2), ((0, 0), (0, 0), (0, sp - s), (0, 0)))

    def one(qe, ke, ve, qs, ks):
        return kernel(qe, ke, ve, segment_ids=sa.SegmentIds(q=qs, kv=ks))

    low = jnp.dtype(q.dtype) in (jnp.bfloat16, jnp.float16)
    run = _default_precision(jax.vmap(one)) if low else jax.vmap(one)
    if specs is not None:  # each device runs the kernel on its own examples (and heads): module docstring
        spec, seg_spec, _ = specs
        run = jax.shard_map(run, in_specs=(spec, spec, spec, seg_spec, seg_spec), out_specs=spec, check_vma=False)
    out = run(qt, kt, vt, q_seg, kv_seg)  # [B, H, Lp, Dh]
    return jnp.moveaxis(out[:, :, :l], 1, 2).astype(v.dtype)

