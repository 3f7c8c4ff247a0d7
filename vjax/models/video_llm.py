"""What the seven video LLMs share: splice visual tokens into the LLM's input embeddings, the loss,
the KV cache and the documented batch format.

Batch format (every model reads the keys it needs; shapes are static per bucket):

| key | shape | meaning |
|---|---|---|
| ``input_ids`` | ``int32[B, L]`` | prompt + answer, with ``placeholder_id`` where visual tokens go |
| ``attention_mask`` | ``int32[B, L]`` | 1 on real tokens (right padding in training, left in generation) |
| ``loss_mask`` | ``int32[B, L]`` | 1 on answer tokens |
| ``frames`` | ``float32[B, T, H, W, 3]`` | normalised frames (images are one-frame videos) |
| ``frame_mask`` | ``bool[B, T]`` | real frames |
| ``audio`` | ``float32[B, C, mel, frames]`` | fbank clips (Video-LLaMA) with ``audio_mask bool[B, C]`` |
| ``qformer_input_ids`` | ``int32[B, Lq]`` | the instruction given to an InstructBLIP Q-Former (MA-LMM), with ``qformer_attention_mask`` |

A model subclasses :class:`VideoLLM`, builds ``self.llm`` (a :class:`~vjax.models.decoder.CausalLM`)
in ``setup`` and implements ``encode(**visual) -> [B, N, D_llm]``; its visual tokens, in prompt order,
replace the placeholder positions (``vjax.layers.splice``).

A model whose token count depends on the clip (Chat-UniVi's events, Video-ChatGPT beyond 100 frames)
implements ``encode_masked(**visual) -> (tokens [B, N, D], token_mask bool[B, N])`` with each row's real
tokens first. The data pipeline writes as many placeholders as the row's clip has tokens (the release's
sequence exactly); a placeholder beyond a row's real tokens is hidden instead — removed from the attention
mask, so neither attention nor the position ids (``cumsum(mask) - 1``) see it, as if it were not there.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vjax.layers.splice import splice_tokens
from vjax.models.decoder import CausalLMOutput, cache_length, decoder_cache

VISUAL_KEYS = ("frames", "frame_mask", "audio", "audio_mask", "qformer_input_ids", "qformer_attention_mask")


class VideoLLM(nn.Module):
    """Base class; subclasses define ``config`` (with ``llm`` and ``placeholder_id``), ``setup``,
    ``encode(**visual) -> [B, N, D]`` and ``example_batch(batch) -> dict``.

    ``__call__`` is shared; a model changes what differs through hooks: :meth:`encode_masked` (its tokens
    and which slots are real), :meth:`splice` (where they go: Qwen2-VL packs images and videos),
    :meth:`positions` (CogVLM's and Qwen2-VL's position ids) and :meth:`llm_inputs` (extra inputs of the
    decoder's blocks, such as CogVLM's visual-expert routing)."""

    def positions(self, input_ids, attention_mask, **visual) -> jax.Array | None:
        """Position ids of a prefill; ``None``: the decoder's default (``cumsum(mask) - 1``)."""
        return None

    def llm_inputs(self, input_ids) -> dict[str, jax.Array]:
        """Extra keyword inputs of the decoder's blocks for ``input_ids`` (default none)."""
        return {}

    def splice(self, embeds: jax.Array, input_ids: jax.Array, visual_tokens: jax.Array | None = None,
               **visual: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Visual tokens into the text embeddings at the placeholders: ``(embeds, hide)`` where ``hide`` is
        ``(placeholder [B, L], token_mask [B, N])`` when some visual slots hold no real token."""
        tokens, token_mask = self.encode_masked(**visual) if visual_tokens is None else (visual_tokens, None)
        placeholder = input_ids == self.config.placeholder_id
        embeds = splice_tokens(embeds, tokens, placeholder)  # tokens [B, N, D]
        return embeds, None if token_mask is None else (placeholder, token_mask)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        cache: Any = None,
        cache_index: jax.Array | int = 0,
        visual_tokens: jax.Array | None = None,
        logits_at: jax.Array | None = None,
        head: bool = True,
        **visual: Any,
    ) -> CausalLMOutput:
        """Logits for ``input_ids`` with the visual inputs spliced in (when given: prefill/training).

        ``visual_tokens [B, N, D]``: visual tokens computed beforehand (e.g. MA-LMM streamed over a long
        video, or one video encoded once for several prompts) spliced instead of ``encode(**visual)``.
        ``logits_at [B, S]``: compute the logits at these positions only; ``head=False``: no logits, the LM
        head's input instead (both: see ``CausalLM``).
        """
        embeds = self.llm.embed(input_ids)  # [B, L, D]
        present = {k: v for k, v in visual.items() if v is not None}
        hidden = None
        if visual_tokens is not None or present:
            embeds, hide = self.splice(embeds, input_ids, visual_tokens, **present)
            if hide is not None:
                attention_mask = hide_slots(attention_mask, *hide, cache, cache_index)
                hidden = attention_mask
        if position_ids is None:
            if not (isinstance(cache_index, int) and cache_index == 0):
                raise ValueError("position_ids are required when decoding from a non-empty cache")
            mask = attention_mask if attention_mask is not None else jnp.ones(input_ids.shape, jnp.int32)
            position_ids = self.positions(input_ids, mask[:, : input_ids.shape[1]], **present)
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, cache_index=cache_index, logits_at=logits_at, head=head,
                       **self.llm_inputs(input_ids))
        return out if hidden is None else out.replace(attention_mask=hidden)

    def encode_masked(self, **visual: Any) -> tuple[jax.Array, jax.Array | None]:
        """``(tokens [B, N, D], token_mask [B, N] | None)``: :meth:`encode` with every token real by default."""
        return self.encode(**visual), None

    def frame_features(self, frames: jax.Array) -> jax.Array:
        """``frames [B, T, H, W, 3]`` -> the tower's per-frame features ``[B, T, N, C]`` (``self.vision``)."""
        b, t = frames.shape[:2]
        feats = self.vision(frames.reshape(b * t, *frames.shape[2:])).features  # [B*T, N, C]
        return feats.reshape(b, t, *feats.shape[1:])

    def example_batch(self, batch: int = 2) -> dict[str, jax.Array]:
        """A batch of the documented format for models whose visual input is ``frames`` (override otherwise)."""
        c = self.config
        s = c.vision.image_size
        return {**example_text(batch, c.num_visual_tokens, c.placeholder_id),
                "frames": jnp.zeros((batch, c.num_frames, s, s, 3), jnp.float32),
                "frame_mask": jnp.ones((batch, c.num_frames), bool)}

    def loss(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
        """Next-token cross-entropy over ``loss_mask`` (answer tokens); with ``loss_positions [B, S]`` in the
        batch the LM head runs at those positions only, fused with the loss (``CausalLM.head_loss``)."""
        visual = {k: batch[k] for k in VISUAL_KEYS if k in batch}
        positions = batch.get("loss_positions")
        out = self(batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch.get("position_ids"), logits_at=positions, head=False, **visual)
        return self.llm.head_loss(out.head_input, batch["input_ids"], batch["loss_mask"], positions)

    def init_cache(self, batch: int, length: int, dtype=None):
        """An empty KV cache of the LLM (works on an unbound module, as ``generate`` calls it)."""
        return decoder_cache(self.config.llm, batch, length, dtype)

    def example_inputs(self) -> dict[str, Any]:
        """Inputs that trace every parameter (used by ``abstract_params``)."""
        b = self.example_batch(1)
        return {"input_ids": b["input_ids"], **{k: b[k] for k in VISUAL_KEYS if k in b}}


def hide_slots(attention_mask: jax.Array | None, placeholder: jax.Array, token_mask: jax.Array, cache: Any = None,
               cache_index: jax.Array | int = 0) -> jax.Array:
    """The attention mask with every placeholder whose visual token is not real set to 0.

    Placeholder ``k`` of row ``b`` (counted left to right) shows ``token_mask[b, k]``; placeholders beyond
    ``N`` are hidden. ``attention_mask [B, S]`` covers the key slots (``S = L`` without a cache); the chunk's
    ``L`` slots start at ``cache_index``. Returns an int32 ``[B, S]`` mask.

    >>> import jax.numpy as jnp
    >>> ph = jnp.array([[False, True, True, True, False]])
    >>> hide_slots(None, ph, jnp.array([[True, False, False]])).tolist()
    [[1, 1, 0, 0, 1]]
    """
    b, l = placeholder.shape
    s = l if cache is None else cache_length(cache)
    mask = jnp.ones((b, s), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
    k = jnp.cumsum(placeholder.astype(jnp.int32), axis=1) - 1  # [B, L]: which visual token each slot shows
    n = token_mask.shape[1]
    real = jnp.take_along_axis(token_mask.astype(bool), jnp.clip(k, 0, n - 1), axis=1) & (k < n)
    keep = ~(placeholder & ~real)  # [B, L]
    start = jnp.asarray(cache_index, jnp.int32)
    chunk = jax.lax.dynamic_slice_in_dim(mask, start, l, axis=1) * keep.astype(jnp.int32)
    return jax.lax.dynamic_update_slice_in_dim(mask, chunk, start, axis=1)


def example_text(batch: int, num_visual: int, placeholder_id: int, text: int = 8) -> dict[str, jax.Array]:
    """``input_ids`` with ``num_visual`` placeholders after one BOS, then ``text`` tokens; masks."""
    text_id = 3 if placeholder_id != 3 else 4
    ids = jnp.concatenate([
        jnp.ones((batch, 1), jnp.int32),
        jnp.full((batch, num_visual), placeholder_id, jnp.int32),
        jnp.full((batch, text), text_id, jnp.int32),
    ], axis=1)
    loss_mask = jnp.zeros_like(ids).at[:, -text // 2:].set(1)
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": loss_mask}
