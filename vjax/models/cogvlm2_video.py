"""CogVLM2-Video (Hong et al. 2024, arXiv 2408.16500): EVA2-CLIP-E frames with a 2x2 conv + GLU
adapter, each frame followed by its timestamp, CogVLM's position ids, and a Llama-3 decoder.

    per frame:  V_t = [boi ; GLU(conv2x2(EVA2(frame_t))) ; eoi]       [66, D]   (224 px)
    sequence:   BOS, V_0, "0", V_1, "1", ..., V_{T-1}, "T-1", "Question: ... Answer:"
    positions:  build_position_ids(token types): boi p, all patches p+1, eoi p+2, timestamp p+3
    decoder:    ``llm.visual_experts=True``  — CogVLM's visual-expert layers in every decoder layer (the survey's
                form; separate q/k/v/o and MLP weights for vision tokens), trained end to end in ``tiny``;
                ``llm.visual_experts=False`` — plain Llama-3 (the released ``cogvlm2-video-llama3-chat`` has no
                experts: spec_vit_family.md §4.1), so its weights load.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vjax.layers.splice import splice_tokens
from vjax.layers.visual_expert import build_position_ids
from vjax.models.decoder import CausalLM, CausalLMOutput, DecoderConfig
from vjax.models.encoders import Encoder, EncoderConfig
from vjax.models.spec import ModelSpec, Visual
from vjax.models.video_llm import VideoLLM


@dataclasses.dataclass(frozen=True)
class CogVLM2VideoConfig:
    vision: EncoderConfig = EncoderConfig.tiny("eva2", out_dim=64, glu_dim=128)
    llm: DecoderConfig = DecoderConfig.tiny(rope_theta=500000.0, rms_norm_eps=1e-5, visual_experts=True)
    num_frames: int = 4
    placeholder_id: int = 6  # the pad id (128002) that marks vision slots in the release
    _nested_configs = {"vision": EncoderConfig, "llm": DecoderConfig}

    def __post_init__(self):
        if self.vision.out_dim != self.llm.hidden_size:
            raise ValueError(f"vision.out_dim={self.vision.out_dim} must equal llm.hidden_size={self.llm.hidden_size}")

    def replace(self, **kw) -> "CogVLM2VideoConfig":
        return dataclasses.replace(self, **kw)

    @property
    def tokens_per_frame(self) -> int:
        """``(grid / 2)^2 + 2`` (66 at 224 px: 64 patches + boi + eoi)."""
        g = self.vision.grid[0] // 2
        return g * g + 2

    @property
    def num_visual_tokens(self) -> int:
        """Vision tokens per clip (24 frames x 66 = 1584, plus one timestamp token per frame)."""
        return self.num_frames * self.tokens_per_frame

    @classmethod
    def tiny(cls, **kw) -> "CogVLM2VideoConfig":
        return cls(**kw)

    @classmethod
    def cogvlm2_video_llama3_chat(cls, **kw) -> "CogVLM2VideoConfig":
        """The released ``THUDM/cogvlm2-video-llama3-chat``: 24 frames, plain Llama-3-8B (no experts)."""
        base = dict(vision=EncoderConfig.eva2_clip_e(), llm=DecoderConfig.llama3_8b(
            max_position_embeddings=2048, eos_token_id=128001, pad_token_id=128002),
            num_frames=24, placeholder_id=128002)
        return cls(**{**base, **kw})

    @classmethod
    def cogvlm2_video_experts(cls, **kw) -> "CogVLM2VideoConfig":
        """The survey's form at the published size: visual experts in all 32 layers (CogVLM2-19B LM)."""
        base = cls.cogvlm2_video_llama3_chat()
        return cls.cogvlm2_video_llama3_chat(**{"llm": base.llm.replace(visual_experts=True), **kw})

    STAGES = {"full": None, "llm": (r"^llm/",), "adapter": (r"^vision/(conv|glu|boi|eoi)",)}


class CogVLM2Video(VideoLLM):
    config: CogVLM2VideoConfig

    def setup(self):
        c = self.config
        self.vision = Encoder(c.vision)
        self.llm = CausalLM(c.llm)  # llm.visual_experts switches CogVLM's expert layers on

    def encode(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        """``[B, T, H, W, 3]`` -> ``[B, T * 66, D]`` in frame order (padded frames are never referenced)."""
        feats = self.frame_features(frames)  # [B, T, 66, D]
        return feats.reshape(feats.shape[0], -1, feats.shape[-1])

    def __call__(self, input_ids, *, attention_mask=None, position_ids=None, cache=None, cache_index=0,
                 frames=None, frame_mask=None) -> CausalLMOutput:
        b, l = input_ids.shape
        types = (input_ids == self.config.placeholder_id).astype(jnp.int32)  # 1 = vision slot
        embeds = self.llm.embed(input_ids)
        if frames is not None:
            embeds = splice_tokens(embeds, self.encode(frames, frame_mask), types.astype(bool))
        mask = attention_mask if attention_mask is not None else jnp.ones((b, l), jnp.int32)
        if position_ids is None:
            if not (isinstance(cache_index, int) and cache_index == 0):
                raise ValueError("position_ids are required when decoding from a non-empty cache")
            position_ids = build_position_ids(types, mask[:, :l])
        experts = {"token_type_ids": types} if self.config.llm.visual_experts else {}
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                        cache=cache, cache_index=cache_index, **experts)


SPEC = ModelSpec(
    name="cogvlm2_video", config=CogVLM2VideoConfig, module=CogVLM2Video,
    template="cogvlm2_video", visual=(Visual("frame", "tokens_per_frame"),),
    sampler="nearest_each_second", sampler_frames="max_frames", marker_tokens={"placeholder_id": "<|image_pad|>"},
    conversion="vjax.convert.cogvlm2_video", hf_architectures=("CogVLMVideoForCausalLM",))
