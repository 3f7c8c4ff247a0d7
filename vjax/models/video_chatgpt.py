"""Video-ChatGPT (Maaz et al. 2023, arXiv 2306.05424): frozen CLIP ViT-L/14 frame features,
spatio-temporal pooling, one linear projection, a Vicuna (LLaVA) decoder.

    F = CLIP(frames)[-2][:, 1:]                  [B, T, 256, 1024]   (penultimate layer, CLS dropped)
    V = [mean_patches F (T, zero-padded to 100) ; mean_frames F (256)]      [B, 356, 1024]
    Z = mm_projector(V)                          [B, 356, D]          (Linear with bias)
    logits = LLaMA(splice(embed(ids), Z))

Given more than ``num_temporal`` frames the release keeps one temporal token per frame (T + 256 tokens);
a clip with fewer real frames than the batch's longest gets ``visual_tokens_for(T_b)`` placeholders and
its extra slots are masked (``encode_masked``).

Source: spec_vit_family.md §2 (official ``video_chatgpt/model/video_chatgpt.py``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vjax.layers.mlp import dense
from vjax.layers.pooling import video_chatgpt_pool, video_chatgpt_token_mask
from vjax.models.decoder import CausalLM, DecoderConfig
from vjax.models.encoders import Encoder, EncoderConfig
from vjax.models.spec import ModelSpec, Preprocess, Visual
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
    def num_patches(self) -> int:
        g = self.vision.grid
        return g[0] * g[1]

    def visual_tokens_for(self, frames: int) -> int:
        """Tokens of a clip of ``frames`` real frames: ``max(num_temporal, frames) + patches``."""
        return max(self.num_temporal, frames) + self.num_patches

    @property
    def num_visual_tokens(self) -> int:
        """Tokens of a clip of ``num_frames`` frames (356 at the published settings)."""
        return self.visual_tokens_for(self.num_frames)

    @property
    def max_visual_tokens(self) -> int:
        return self.num_visual_tokens

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
    # "finetune": the paper's stage (the projector alone, from LLaVA); "projector_llm": LLaVA's instruction stage
    # (projector and LLM, tower frozen), the checkpoint Video-ChatGPT starts from; the tiny staged run trains it
    STAGES = {"finetune": (r"^mm_projector/",), "projector_llm": (r"^mm_projector/", r"^llm/"), "full": None}


class VideoChatGPT(VideoLLM):
    config: VideoChatGPTConfig

    def setup(self):
        c = self.config
        self.vision = Encoder(c.vision)
        self.mm_projector = dense(c.llm.hidden_size, ("mlp", "embed"), use_bias=True,
                                  dtype=jnp.dtype(c.llm.dtype), param_dtype=jnp.dtype(c.llm.param_dtype))
        self.llm = CausalLM(c.llm)

    def encode(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        """``frames [B, T, H, W, 3]`` -> video tokens ``[B, max(num_temporal, T) + N, D]``."""
        feats = self.frame_features(frames)  # [B, T, N, C]
        pooled = video_chatgpt_pool(feats, frame_mask, self.config.num_temporal)  # [B, Tt + N, C]
        return self.mm_projector(pooled)  # [B, Tt + N, D]

    def encode_masked(self, frames: jax.Array,
                      frame_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        """:meth:`encode` and, when T exceeds ``num_temporal``, which slots hold each clip's tokens."""
        c = self.config
        if frames.shape[1] <= c.num_temporal:  # every clip has num_temporal + N tokens
            return self.encode(frames, frame_mask), None
        mask = jnp.ones(frames.shape[:2], bool) if frame_mask is None else frame_mask
        return self.encode(frames, frame_mask), video_chatgpt_token_mask(mask, c.num_temporal, c.num_patches)


SPEC = ModelSpec(
    name="video_chatgpt", config=VideoChatGPTConfig, module=VideoChatGPT,
    template="video_chatgpt", template_variant="train", visual=(Visual("video", "visual_tokens_for"),),
    # load_video: F.interpolate (nearest) to 224x224 unless already so; CLIPImageProcessor is then a no-op
    preprocess=Preprocess("square", "torch_nearest", source="Video-ChatGPT load_video: nearest to 224x224"),
    sampler="segment_midpoints", marker_tokens={"placeholder_id": "<vid_patch>"},
    conversion="vjax.convert.video_chatgpt", hf_architectures=("VideoChatGPTLlamaForCausalLM",),
    hf_model_types=("VideoChatGPT",))
