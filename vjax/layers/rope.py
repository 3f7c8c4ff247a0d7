"""Rotary position embeddings (Su et al. 2021, "RoFormer"), rotate-half convention of LLaMA/HF.

For a head vector ``x`` of width ``Dh`` at position ``p``:

    inv_freq[i] = theta ** (-2i / Dh),              i = 0 .. Dh/2 - 1
    angle       = p * inv_freq                      [Dh/2], duplicated to [Dh]
    rope(x)     = x * cos(angle) + rotate_half(x) * sin(angle)
    rotate_half([x1, x2]) = [-x2, x1]               (halves of the last axis)

Llama-3 rope scaling (``rope_type="llama3"``, Meta's Llama-3.1 release) rescales ``inv_freq`` by
wavelength ``w = 2 pi / inv_freq`` with ``L0 = original_max_position_embeddings``:
long waves (``w > L0 / low_freq_factor``) are divided by ``factor``, short waves
(``w < L0 / high_freq_factor``) are kept, and the band between is interpolated with
``s = (L0 / w - low_freq_factor) / (high_freq_factor - low_freq_factor)`` as
``(1 - s) * inv_freq / factor + s * inv_freq``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` (float32, host NumPy: they are constants).

    ``scaling`` is the HF ``rope_scaling``/``rope_parameters`` dict; ``rope_type`` ``default``,
    ``linear`` (positions divided by ``factor``) and ``llama3`` are supported.

    >>> rope_inv_freq(4, 10000.0).tolist()
    [1.0, 0.009999999776482582]
    """
    if head_dim % 2:
        raise ValueError(f"rotary head_dim must be even, got {head_dim}")
    # theta ** (2i / Dh) evaluated in float64 and rounded to float32, then inverted in float32: the
    # operation order of the references with a correctly rounded power (a float32 pow differs from
    # torch's in the last bit for many entries, which moves cos/sin by ~6e-5 at positions ~1e3).
    exponent = (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)).astype(np.float64)
    inv = (np.float32(1.0) / (float(theta) ** exponent).astype(np.float32)).astype(np.float32)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default", "mrope"):
        return inv
    if kind == "linear":
        return (inv / float(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = float(scaling["factor"])
        lo, hi = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        l0 = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > l0 / lo, inv / factor, inv)
        smooth = (l0 / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < l0 / hi) & ~(wavelen > l0 / lo)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope_type {kind!r}; supported: default, linear, llama3")


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array | np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[..., Dh]`` for integer ``positions [...]`` (float32)."""
    angle = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [..., Dh/2]
    angle = jnp.concatenate([angle, angle], axis=-1)  # [..., Dh]
    return jnp.cos(angle), jnp.sin(angle)


def rotate_half(x: jax.Array) -> jax.Array:
    """``[x1, x2] -> [-x2, x1]`` over the halves of the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary_pos_emb(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, L, H, Dh]`` by ``cos``/``sin`` ``[B, L, Dh]`` (broadcast over heads).

    Only the first ``cos.shape[-1]`` channels rotate (partial rotary); the rest pass through.
    Computed in float32 and cast back to ``x.dtype``.

    >>> import jax.numpy as jnp
    >>> x = jnp.ones((1, 1, 1, 4))
    >>> cos, sin = rope_cos_sin(jnp.zeros((1, 1), jnp.int32), rope_inv_freq(4, 1e4))
    >>> bool(jnp.allclose(apply_rotary_pos_emb(x, cos, sin), x))
    True
    """
    rot = cos.shape[-1]
    x32 = x.astype(jnp.float32)
    xr, xp = x32[..., :rot], x32[..., rot:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = xr * c + rotate_half(xr) * s
    if xp.shape[-1]:
        out = jnp.concatenate([out, xp], axis=-1)
    return out.astype(x.dtype)
