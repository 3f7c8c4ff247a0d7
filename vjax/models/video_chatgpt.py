"""Video-ChatGPT (Maaz et al. 2023, arXiv 2306.05424): frozen CLIP ViT-L/14 frame features,
spatio-temporal pooling, one linear projection, a Vicuna (LLaVA) decoder.

    F = CLIP(frames)[-2][:, 1:]                  [B, T, 256, 1024]   (penultimate layer, CLS dropped)
    V = [mean_patches F (T, zero-padded to 100) ; mean_frames F (256)]      [B, 356, 1024]
    Z = mm_projector(V)                          [B, 356, D]          (Linear with bias)
    logits = LLaMA(splice(embed(ids), Z))

Source: spec_vit_family.md §2 (official ``video_chatgpt/model/video_chatgpt.py``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vjax.layers.mlp import dense
from vjax.layers.pooling import video_chatgpt_pool
from vjax.models.decoder import CausalLM, DecoderConfig
from vjax.models.encoders import Encoder, EncoderConfig
from vjax.models.video_llm import VideoLLM


@dataclasses.dataclass(frozen=True)
class VideoChatGPTConfig:
    vision: EncoderConfig = EncoderConfig.tiny("clip")
    llm: DecoderConfig = DecoderConfig.tiny()
    num_frames: int = 4
    num_temporal: int = 4  # temporal tokens (100 in the release: frames zero-padded to 100)
    placeholder_id: int = 4  # <vid_patch>
    _nested_configs = {"vision": EncoderConfig, "llm": DecoderConfig}

    def replace(self, **kw) -> "VideoChatGPTConfig":
        return dataclasses.replace(self, **kw)

    @property
    def num_visual_tokens(self) -> int:
        """Tokens per clip: ``num_temporal + patches`` (356 at the published settings)."""
        g = self.vision.grid
        return self.num_temporal + g[0] * g[1]

    @classmethod
    def tiny(cls, **kw) -> "VideoChatGPTConfig":
        return cls(**kw)

    @classmethod
    def video_chatgpt_7b(cls, **kw) -> "VideoChatGPTConfig":
        """Video-ChatGPT-7B: CLIP ViT-L/14@224, 100 frames, LLaVA-Lightning-7B-v1-1 (vocab 32006)."""
        base = dict(vision=EncoderConfig.clip_vit_l14_224(), llm=DecoderConfig.llama_7b(vocab_size=32006),
                    num_frames=100, num_temporal=100, placeholder_id=32003)
        return cls(**{**base, **kw})

    # stages: which parameter paths train (regexes over "a/b/c" paths)
    STAGES = {"finetune": (r"^mm_projector/",), "full": None}


class VideoChatGPT(VideoLLM):
    config: VideoChatGPTConfig

    def setup(self):
        c = self.config
        self.vision = Encoder(c.vision)
        self.mm_projector = dense(c.llm.hidden_size, ("mlp", "embed"), use_bias=True,
                                  dtype=jnp.dtype(c.llm.dtype), param_dtype=jnp.dtype(c.llm.param_dtype))
        self.llm = CausalLM(c.llm)

    def encode(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        """``frames [B, T, H, W, 3]`` -> video tokens ``[B, num_temporal + N, D]``."""
        feats = self.frame_features(frames)  # [B, T, N, C]
        pooled = video_chatgpt_pool(feats, frame_mask, self.config.num_temporal)  # [B, Tt + N, C]
        return self.mm_projector(pooled)  # [B, Tt + N, D]
