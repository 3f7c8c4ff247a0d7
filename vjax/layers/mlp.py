"""Feed-forward blocks: ``Mlp`` (fc1 -> GELU -> fc2) and ``GatedMlp`` (SwiGLU, LLaMA family).

GatedMlp (Shazeer 2020, "GLU Variants Improve Transformer"; LLaMA's ``LlamaMLP``):

    y = down( act(gate(x)) * up(x) )
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vjax.layers.quant import Dense

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU() / "gelu"
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # "gelu_pytorch_tanh", "gelu_new"
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Look up an activation by the name transformers configs use (``hidden_act``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def dense(
    features: int,
    axes: tuple[str, str],
    *,
    use_bias: bool = False,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    name: str | None = None,
    kernel_init=nn.initializers.normal(0.02),
) -> Dense:
    """A ``nn.Dense`` whose kernel ``[in, out]`` (torch weight transposed) carries logical axes; it also runs an
    int8 kernel with its per-channel ``kernel_scale`` (:class:`vjax.layers.quant.Dense`)."""
    return Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


class GatedMlp(nn.Module):
    """SwiGLU MLP with ``gate_proj``, ``up_proj``, ``down_proj`` (LLaMA, Mistral, Qwen2)."""

    hidden_size: int
    intermediate_size: int
    act: str = "silu"
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D]
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        gate = dense(self.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = dense(self.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        h = activation(self.act)(gate) * up  # [..., I]
        return dense(self.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(h)


@functools.lru_cache(maxsize=None)
def _chunk_step(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` with a call that fits ``nn.scan``: ``(carry, x) -> (carry, cls(x))``."""

    class Step(cls):
        def __call__(self, carry, x):
            return carry, super().__call__(x)

    Step.__name__ = Step.__qualname__ = f"ChunkStep{cls.__name__}"
    return Step


def over_sequence_chunks(cls: type[nn.Module], chunks: int, **kw: Any) -> Callable[[jax.Array], jax.Array]:
    """A position-wise block ``cls(**kw)`` applied to ``x [B, L, ...]`` in ``chunks`` pieces of ``L / chunks``
    positions, one after the other (``nn.scan``, the parameters shared), each rematerialised.

    The values are the block's on the whole sequence. What changes is memory: the intermediates of one piece
    live at a time, in the forward pass and, recomputed, in the backward pass (a SwiGLU MLP at 16k tokens holds
    ``[16384, 11008]`` per gate, up and product: 344 MiB each in bfloat16 for Llama-2-7B). The parameters keep
    the block's names (build it with the block's ``name``), so a checkpoint loads into either form. Call it only
    inside a compact module method, with ``L`` a multiple of ``chunks``.
    """
    scanned = nn.scan(nn.remat(_chunk_step(cls), prevent_cse=False), variable_broadcast="params",
                      split_rngs={"params": False}, in_axes=0, out_axes=0, length=chunks)
    block = scanned(**kw)

    def run(x: jax.Array) -> jax.Array:
        b, n = x.shape[:2]
        if n % chunks:
            raise ValueError(f"{n} positions do not split into {chunks} equal chunks")
        pieces = x.reshape(b, chunks, n // chunks, *x.shape[2:]).swapaxes(0, 1)  # [chunks, B, L / chunks, ...]
        _, out = block(None, pieces)
        return out.swapaxes(0, 1).reshape(b, n, *out.shape[3:])

    return run


class Mlp(nn.Module):
    """Two-layer MLP ``fc2(act(fc1(x)))`` (ViT blocks, projectors). Names ``fc1``/``fc2``."""

    hidden_size: int
    intermediate_size: int
    act: str = "gelu"
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x)
        h = activation(self.act)(h)
        return dense(self.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)
