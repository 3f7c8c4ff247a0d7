"""CogVLM / CogVLM2's language model: a LLaMA-style decoder whose layers have visual experts.

    h_0    = inputs_embeds            (text embeddings with the image features written at vision slots)
    vision = vision_expert_mask(token_type_ids)
    pos    = build_position_ids(token_type_ids, attention_mask)     (interior image tokens share one position)
    h_l+1  = VisualExpertDecoderLayer(h_l, vision, RoPE(pos), causal + padding mask)
    logits = lm_head(RMSNorm(h_L))     (float32)

Numerics of ``CogVLMForCausalLM`` in the remote code of ``THUDM/cogvlm2-llama3-chat-19B``
(golden ``cogvlm_visual_expert/case_full_tiny*``). The vision tower and the splice of its features
into ``inputs_embeds`` belong to the full model; this module starts from ``input_ids`` or ``inputs_embeds``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from vjax.layers.attention import Cache, init_cache, make_attention_mask
from vjax.layers.mlp import dense
from vjax.layers.norm import RMSNorm
from vjax.layers.rope import rope_cos_sin, rope_inv_freq
from vjax.layers.visual_expert import (
    VisualExpertConfig,
    VisualExpertDecoderLayer,
    build_position_ids,
    vision_expert_mask,
)


@flax.struct.dataclass
class VisualExpertLMOutput:
    """``logits [B, L, V]`` float32; ``hidden_states``: the input embeddings and every layer's output
    (the last one after the final norm) when asked for; the updated ``cache`` (or None)."""

    logits: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    cache: Any = None


class VisualExpertCausalLM(nn.Module):
    """``embed_tokens``, ``layers_{i}`` (:class:`VisualExpertDecoderLayer`), ``norm``, ``lm_head``.

    >>> import jax, jax.numpy as jnp
    >>> lm = VisualExpertCausalLM(VisualExpertConfig.tiny())
    >>> ids, types = jnp.zeros((1, 6), jnp.int32), jnp.array([[0, 1, 1, 1, 1, 0]])
    >>> params = lm.init(jax.random.key(0), ids, token_type_ids=types)
    >>> lm.apply(params, ids, token_type_ids=types).logits.shape
    (1, 6, 48)
    """

    config: VisualExpertConfig

    def setup(self):
        c = self.config
        pdt, dt = jnp.dtype(c.param_dtype), jnp.dtype(c.dtype)
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=dt, param_dtype=pdt, embedding_init=(
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))))
        self.layers = [VisualExpertDecoderLayer(c, name=f"layers_{i}") for i in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, pdt)
        self.lm_head = dense(c.vocab_size, ("embed", "vocab"), dtype=dt, param_dtype=pdt)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings ``[B, L, D]`` (the full model overwrites the vision slots with image features)."""
        return self.embed_tokens(input_ids)

    def init_cache(self, batch: int, length: int, dtype=None) -> list[Cache]:
        c = self.config
        dt = jnp.dtype(dtype or c.dtype)
        return [init_cache(batch, length, c.num_kv_heads, c.head_dim, dt) for _ in range(c.num_layers)]

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        token_type_ids: jax.Array,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        cache: Sequence[Cache] | None = None,
        cache_index: jax.Array | int = 0,
        return_hidden: bool = False,
    ) -> VisualExpertLMOutput:
        """Run the decoder.

        Args:
          input_ids / inputs_embeds: ``int32[B, L]`` or ``[B, L, D]`` (exactly one).
          token_type_ids: ``[B, L]`` 1 for image tokens (boi, patches, eoi), 0 for text.
          attention_mask: ``[B, S]`` validity of every key slot (``S = L``, or the cache length).
          position_ids: ``[B, L]``; default :func:`build_position_ids` (only without a filled cache).
          cache / cache_index: KV cache per layer and the slot where this chunk starts.
        """
        c = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(jnp.dtype(c.dtype))
        b, l, _ = h.shape
        s = l if cache is None else cache[0]["k"].shape[1]
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), jnp.int32)
        if position_ids is None:
            if not (isinstance(cache_index, int) and cache_index == 0):
                raise ValueError("position_ids are required when decoding from a non-empty cache")
            position_ids = build_position_ids(token_type_ids, attention_mask[:, :l])
        cos, sin = rope_cos_sin(position_ids, rope_inv_freq(c.head_dim, c.rope_theta))
        mask = make_attention_mask(attention_mask, l, query_offset=cache_index)  # [B, 1, L, S]
        vision = vision_expert_mask(token_type_ids)
        hidden = [h]
        new_cache = []
        for i, layer in enumerate(self.layers):
            h, layer_cache = layer(h, vision, cos, sin, mask, None if cache is None else cache[i], cache_index)
            new_cache.append(layer_cache)
            hidden.append(h)
        h = self.norm(h)
        hidden[-1] = h
        return VisualExpertLMOutput(
            logits=self.lm_head(h).astype(jnp.float32),
            hidden_states=tuple(hidden) if return_hidden else None,
            cache=None if cache is None else new_cache,
        )

    def example_inputs(self) -> dict[str, Any]:
        return {"input_ids": jnp.zeros((1, 2), jnp.int32), "token_type_ids": jnp.array([[1, 1]], jnp.int32)}
