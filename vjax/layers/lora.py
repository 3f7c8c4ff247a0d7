"""LoRA: a trainable low-rank update beside a frozen linear map (Hu et al. 2021, arXiv 2106.09685, Eq. 3).

    y = x W + b + (alpha / r) * (x A) B          W [in, out] frozen, A [in, r], B [r, out] trained

``B`` starts at zero, so an untrained adapter leaves the base layer's output unchanged; ``A`` starts
uniform in ``[-1/sqrt(in), 1/sqrt(in)]`` (PEFT's default, Kaiming-uniform with ``a = sqrt(5)``).
Merging folds the update into the base weight: ``W' = W + (alpha / r) A B`` (PEFT ``merge``; torch
stores ``lora_A.weight [r, in]`` and ``lora_B.weight [out, r]``, i.e. ``W'_torch = W_torch + s B_t A_t``).
MiniGPT4-video puts LoRA (r = 64, alpha = 16, scale 0.25) on the LLM's ``q_proj`` and ``v_proj``
(spec_qformer_family.md §3.1). Dropout on the adapter input (0.05 in training) is not applied here.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vjax.layers.quant import quantized_matmul, sibling_scale


def lora_scale(rank: int, alpha: float) -> float:
    """``alpha / r``."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return float(alpha) / rank


class LoRADense(nn.Module):
    """A ``Dense`` with a LoRA adapter. Parameters ``kernel [in, out]``, ``bias [out]`` (optional) — the
    names and logical axes of :func:`vjax.layers.mlp.dense`, so base checkpoints load unchanged —
    plus ``lora_A [in, r]`` (axes ``(axes[0], None)``) and ``lora_B [r, out]`` (``(None, axes[1])``).

    >>> import jax, jax.numpy as jnp
    >>> layer = LoRADense(6, ("embed", "heads"), rank=2, alpha=4.0)
    >>> params = layer.init(jax.random.key(0), jnp.ones((1, 3, 5)))["params"]
    >>> sorted(params), params["lora_A"].value.shape, params["lora_B"].value.shape
    (['kernel', 'lora_A', 'lora_B'], (5, 2), (2, 6))
    """

    features: int
    axes: tuple[str | None, str | None]
    rank: int
    alpha: float
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Any = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        d_in, ax_in, ax_out = x.shape[-1], self.axes[0], self.axes[1]
        part = nn.with_logical_partitioning
        kernel = self.param("kernel", part(self.kernel_init, (ax_in, ax_out)), (d_in, self.features), self.param_dtype)
        a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # U(-1/sqrt(in), 1/sqrt(in))
        lora_a = self.param("lora_A", part(a_init, (ax_in, None)), (d_in, self.rank), self.param_dtype)
        lora_b = self.param("lora_B", part(nn.initializers.zeros, (None, ax_out)), (self.rank, self.features),
                            self.param_dtype)
        bias = (self.param("bias", part(nn.initializers.zeros, (ax_out,)), (self.features,), self.param_dtype)
                if self.use_bias else None)
        scale = sibling_scale(self, "kernel")
        x, lora_a, lora_b = (v.astype(self.dtype) for v in (x, lora_a, lora_b))
        contract = (((x.ndim - 1,), (0,)), ((), ()))
        y = quantized_matmul(x, kernel, scale, self.dtype)  # [..., out]; an int8 kernel times its kernel_scale
        if bias is not None:
            y = y + bias.astype(self.dtype)
        low = jax.lax.dot_general(x, lora_a, contract)  # [..., r]
        return y + lora_scale(self.rank, self.alpha) * jax.lax.dot_general(low, lora_b, contract)


def merge_lora(params: Mapping[str, Any], config: Any) -> dict[str, Any]:
    """Fold every LoRA adapter of ``params`` into its base kernel: ``kernel + (alpha / r) lora_A @ lora_B``.

    ``config`` is the scale ``alpha / r`` (a number) or any object with ``lora_rank`` and ``lora_alpha``
    (e.g. :class:`vjax.models.decoder.DecoderConfig`). Returns a new tree without ``lora_A``/``lora_B``:
    the parameters of the same model built with ``lora_rank = 0``. Merging runs in float32.
    """
    scale = float(config) if isinstance(config, (int, float)) else lora_scale(config.lora_rank, config.lora_alpha)

    def walk(node):
        if not isinstance(node, Mapping):
            return node
        out = {k: walk(v) for k, v in node.items() if k not in ("lora_A", "lora_B")}
        if "lora_A" in node and "lora_B" in node:
            if "kernel_scale" in node:
                raise ValueError("merge LoRA before quantising: this kernel is int8 (it has a kernel_scale)")
            w = node["kernel"]
            delta = jnp.matmul(jnp.asarray(node["lora_A"], jnp.float32), jnp.asarray(node["lora_B"], jnp.float32),
                               precision=jax.lax.Precision.HIGHEST)
            out["kernel"] = (jnp.asarray(w, jnp.float32) + scale * delta).astype(jnp.asarray(w).dtype)
        return out

    return walk(params)
