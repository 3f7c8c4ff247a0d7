"""Chat-UniVi (Jin et al. 2023, arXiv 2311.08046): CLIP features merged into dynamic visual tokens by
DPC-KNN clustering, one linear projection, a Vicuna decoder.

    F = CLIP(frames)[-2][:, 1:]                          [B, T, N, C]
    image (T <= 2): per frame  L0 = merge(F, 64) -> L1 = merge(L0, 32) -> L2 = merge(L1, 16); [L0|L1|L2]
    video (T >= 3): events = DPC-KNN over per-frame means (ceil(T/16) clusters, ordered by first frame);
                    per event and level l: merge the event's L_l tokens again to c_l; [e1: 64|32|16 | e2 ...]
    Z = mm_projector(tokens);  logits = LLaMA(splice(embed(ids), Z))

The clustering itself is ``vjax.layers.token_merge`` (spec_vit_family.md §3); it has no parameters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vjax.layers.mlp import dense
from vjax.layers.token_merge import cluster_count, spatial_merge, video_merge
from vjax.models.decoder import CausalLM, DecoderConfig
from vjax.models.encoders import Encoder, EncoderConfig
from vjax.models.video_llm import VideoLLM


@dataclasses.dataclass(frozen=True)
class ChatUniViConfig:
    vision: EncoderConfig = EncoderConfig.tiny("clip", image_size=56)
    llm: DecoderConfig = DecoderConfig.tiny()
    num_frames: int = 4
    spatial_ratios: tuple[float, ...] = (8, 4, 2)  # released: (64, 32, 16) clusters per level
    spatial_ks: tuple[int, ...] = (5, 3, 3)
    temporal_ratio: float = 1 / 16
    temporal_k: int = 5
    placeholder_id: int = 5  # <image> (IMAGE_TOKEN_INDEX in the release; any id works: it is replaced)
    _nested_configs = {"vision": EncoderConfig, "llm": DecoderConfig}

    def replace(self, **kw) -> "ChatUniViConfig":
        return dataclasses.replace(self, **kw)

    @property
    def tokens_per_event(self) -> int:
        return sum(int(r) for r in self.spatial_ratios)

    @property
    def num_visual_tokens(self) -> int:
        """Tokens per clip: ``sum(c_l)`` per event (video) or per frame (1-2 frame inputs)."""
        if self.num_frames <= 2:
            return self.num_frames * self.tokens_per_event
        return cluster_count(self.num_frames, self.temporal_ratio) * self.tokens_per_event

    @classmethod
    def tiny(cls, **kw) -> "ChatUniViConfig":
        return cls(**kw)

    @classmethod
    def chat_univi_7b(cls, **kw) -> "ChatUniViConfig":
        """Chat-UniVi-7B: CLIP ViT-L/14@224, Vicuna-7B v1.5, clusters (64, 32, 16), events ceil(T/16), 64 frames."""
        base = dict(vision=EncoderConfig.clip_vit_l14_224(), llm=DecoderConfig.llama2_7b(), num_frames=64,
                    spatial_ratios=(64, 32, 16), placeholder_id=32000)
        return cls(**{**base, **kw})

    @classmethod
    def chat_univi_13b(cls, **kw) -> "ChatUniViConfig":
        """Chat-UniVi-13B: Vicuna-13B v1.5."""
        return cls.chat_univi_7b(**{"llm": DecoderConfig.llama2_13b(), **kw})

    STAGES = {"pretrain": (r"^mm_projector/",), "finetune": (r"^mm_projector/", r"^llm/"), "full": None}


class ChatUniVi(VideoLLM):
    config: ChatUniViConfig

    def setup(self):
        c = self.config
        self.vision = Encoder(c.vision)
        self.mm_projector = dense(c.llm.hidden_size, ("mlp", "embed"), use_bias=True,
                                  dtype=jnp.dtype(c.llm.dtype), param_dtype=jnp.dtype(c.llm.param_dtype))
        self.llm = CausalLM(c.llm)

    def merge(self, feats: jax.Array, frame_mask: jax.Array | None) -> jax.Array:
        """``[B, T, N, C]`` CLIP features -> merged tokens ``[B, num_visual_tokens, C]``."""
        c = self.config
        b, t, n, d = feats.shape
        if t <= 2:  # images: the spatial hierarchy of each frame
            tokens, _ = spatial_merge(feats.reshape(b * t, n, d), c.spatial_ratios, c.spatial_ks)
            return tokens.reshape(b, t * tokens.shape[1], d)
        tokens, _, _ = video_merge(feats, frame_mask=frame_mask, spatial_ratios=c.spatial_ratios,
                                   spatial_ks=c.spatial_ks, temporal_ratio=c.temporal_ratio, temporal_k=c.temporal_k)
        return tokens

    def encode(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        tokens = self.merge(self.frame_features(frames), frame_mask)  # [B, M, C]
        return self.mm_projector(tokens)  # [B, M, D]
