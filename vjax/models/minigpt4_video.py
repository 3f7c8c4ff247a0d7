"""MiniGPT4-video (Ataallah et al. 2024, arXiv 2404.03413): EVA ViT-g frame tokens, 1x4 adjacent-token
concatenation, one linear projection, frames interleaved with subtitles in a LoRA-tuned Llama-2 / Mistral.

    F_t = ln_vision(EVA(frame_t))[:, 1:]                 [B, T, 256, 1408]   (CLS dropped)
    P_t = concat_adjacent(F_t, 4)                        [B, T, 64, 5632]    (1x4 groups in raster order)
    Z_t = llama_proj(P_t)                                [B, T, 64, D]
    logits = LLM_LoRA(splice(embed(ids), [Z_1 .. Z_T]))  frame t's 64 tokens at the t-th ``<ImageHere>``

Prompt: ``[INST] <Img><ImageHere><Cap>subtitle ... <Img><ImageHere>\\n question [/INST]``
(``vjax.data.templates._minigpt4_video``). The LLM has LoRA (r 64, alpha 16) on ``q_proj``/``v_proj``
(``DecoderConfig.lora_rank``); :func:`merge_lora` folds it back into plain decoder weights.
Source: spec_qformer_family.md §3 (official ``minigpt4/models/mini_gpt4_llama_v2.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from vjax.layers import lora
from vjax.layers.mlp import dense
from vjax.layers.pooling import concat_adjacent_tokens
from vjax.models.decoder import CausalLM, DecoderConfig
from vjax.models.encoders import Encoder, EncoderConfig
from vjax.models.spec import ModelSpec, Preprocess, Visual
from vjax.models.video_llm import VideoLLM, example_text


@dataclasses.dataclass(frozen=True)
class MiniGPT4VideoConfig:
    vision: EncoderConfig = EncoderConfig.tiny("eva", image_size=56)  # 4x4 patches -> 4 tokens per frame
    llm: DecoderConfig = DecoderConfig.tiny(lora_rank=4, lora_alpha=1.0)
    num_frames: int = 3
    token_group: int = 4  # adjacent patch tokens concatenated into one
    placeholder_id: int = 4  # <ImageHere>
    _nested_configs = {"vision": EncoderConfig, "llm": DecoderConfig}

    def replace(self, **kw) -> "MiniGPT4VideoConfig":
        return dataclasses.replace(self, **kw)

    @property
    def tokens_per_frame(self) -> int:
        g = self.vision.grid
        return g[0] * g[1] // self.token_group

    @property
    def subtitle_words(self) -> int:
        """Subtitle words the release shows at most: 400 with Llama-2, 800 with Mistral."""
        return 800 if self.llm.arch == "mistral" else 400

    @property
    def num_visual_tokens(self) -> int:
        """``64 x frames``: 2880 (Llama-2, 45 frames) or 5760 (Mistral, 90 frames)."""
        return self.tokens_per_frame * self.num_frames

    @classmethod
    def tiny(cls, **kw) -> "MiniGPT4VideoConfig":
        return cls(**kw)

    @classmethod
    def minigpt4_video_llama2(cls, **kw) -> "MiniGPT4VideoConfig":
        """MiniGPT4-video with Llama-2-7b-chat: 45 frames, LoRA r 64 / alpha 16 on q_proj, v_proj."""
        base = dict(vision=EncoderConfig.eva_vit_g(), llm=DecoderConfig.llama2_7b(lora_rank=64, lora_alpha=16.0),
                    num_frames=45, placeholder_id=32000)  # any id: its embedding is replaced
        return cls(**{**base, **kw})

    @classmethod
    def minigpt4_video_mistral(cls, **kw) -> "MiniGPT4VideoConfig":
        """MiniGPT4-video with Mistral-7B-Instruct-v0.2: 90 frames."""
        return cls.minigpt4_video_llama2(**{"llm": DecoderConfig.mistral_7b_instruct_v02(lora_rank=64, lora_alpha=16.0),
                                            "num_frames": 90, **kw})

    # Frozen throughout: EVA, ln_vision, the base LLM (spec §3.4). "projector_llm": the projector and the whole LLM
    # (base and LoRA), EVA frozen: a stage 2 for the tiny staged run, where a 2-layer LLM with LoRA rank 4 alone does
    # not learn to read the frames ("video"); its default trains everything ("full"; docs/results.md)
    STAGES = {
        "image_pretrain": (r"^llama_proj/",),
        "video": (r"^llama_proj/", r"/lora_[AB]$"),
        "projector_llm": (r"^llama_proj/", r"^llm/"),
        "full": None,
    }


class MiniGPT4Video(VideoLLM):
    config: MiniGPT4VideoConfig

    def setup(self):
        c = self.config
        self.vision = Encoder(c.vision)  # EVA ViT-g + ln_vision
        self.llama_proj = dense(c.llm.hidden_size, ("mlp", "embed"), use_bias=True, dtype=jnp.dtype(c.llm.dtype),
                                param_dtype=jnp.dtype(c.llm.param_dtype))
        self.llm = CausalLM(c.llm)

    def encode(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        """``frames [B, T, H, W, 3]`` -> ``[B, T * 64, D]`` (frame-major; every frame has its placeholders,
        short clips are padded with their last frame by the data pipeline, so ``frame_mask`` is unused)."""
        b, t = frames.shape[:2]
        feats = self.vision(frames.reshape(b * t, *frames.shape[2:])).features[:, 1:]  # [B*T, 256, 1408]
        tokens = concat_adjacent_tokens(feats, self.config.token_group)  # [B*T, 64, 5632]
        z = self.llama_proj(tokens)  # [B*T, 64, D]
        return z.reshape(b, t * z.shape[1], z.shape[2])

    def example_batch(self, batch: int = 2) -> dict[str, jax.Array]:
        c = self.config
        s = c.vision.image_size
        return {**example_text(batch, c.num_visual_tokens, c.placeholder_id),
                "frames": jnp.zeros((batch, c.num_frames, s, s, 3), jnp.float32),
                "frame_mask": jnp.ones((batch, c.num_frames), bool)}


def merge_lora(params: Mapping[str, Any], config: MiniGPT4VideoConfig) -> tuple[dict[str, Any], MiniGPT4VideoConfig]:
    """Fold the LLM's LoRA into its weights (``W + (alpha / r) A B``): the params and config of the same
    model without adapters (``llm.lora_rank = 0``), e.g. for export to a plain Llama / Mistral checkpoint."""
    merged = lora.merge_lora(params, config.llm)
    return merged, config.replace(llm=config.llm.replace(lora_rank=0))


SPEC = ModelSpec(
    name="minigpt4_video", config=MiniGPT4VideoConfig, module=MiniGPT4Video,
    template="minigpt4_video", visual=(Visual("frame", "tokens_per_frame"),),
    preprocess=Preprocess("square", "pil_bicubic", source="MiniGPT4-video: PIL Resize((224, 224), bicubic)"),
    sampler="fixed_interval", marker_tokens={"placeholder_id": "<ImageHere>"},
    conversion="vjax.convert.minigpt4_video", subtitles=True, subtitle_words="subtitle_words")
