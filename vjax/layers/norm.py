"""Normalisation layers with the exact numerics of the PyTorch references.

RMSNorm (LLaMA, Mistral, Qwen2; "Root Mean Square Layer Normalization", Zhang & Sennrich 2019):

    y = w * (x / sqrt(mean(x^2) + eps))

computed in float32 and cast back to the input dtype *before* the scale is applied, as in
transformers' ``LlamaRMSNorm``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """``scale * x / sqrt(mean(x**2, -1) + eps)`` with the statistics in float32.

    >>> import jax.numpy as jnp
    >>> y = rms_norm(jnp.array([[3.0, 4.0]]), jnp.ones(2), 0.0)
    >>> [round(float(v), 4) for v in y[0]]
    [0.8485, 1.1314]
    """
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + eps)).astype(dtype)
    return scale.astype(dtype) * y


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis; parameter ``scale`` (torch ``weight``), ones at init."""

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        return rms_norm(x, scale, self.eps)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis computed in float32 (``scale``/``bias`` = torch ``weight``/``bias``)."""

    eps: float = 1e-5
    use_bias: bool = True
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,), self.param_dtype
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(x.dtype)
