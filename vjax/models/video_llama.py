"""Video-LLaMA (Zhang et al. 2023, arXiv 2306.02858): a vision-language and an audio-language branch of
Q-Formers over frozen towers, feeding a frozen Vicuna / Llama-2-chat decoder.

    VL:  F_t = ln_vision(EVA(frame_t))                     [B, T, 257, 1408]
         q_t = ImageQFormer(F_t)[:, :32]                   [B, T, 32, 768]     (frozen BLIP-2 Q-Former)
         e   = flatten_t(q_t + frame_pos[t])               [B, T*32, 768]      (frame-major)
         V   = llama_proj(VideoQFormer(e)[:, :32])         [B, 32, D]
    AL:  a_c = ImageBind_audio(fbank_c) + audio_pos[c]     [B, C, 1024]        (norm-20 embeddings)
         A   = audio_llama_proj(AudioQFormer(a)[:, :8])    [B, 8, D]
    logits = LLaMA(splice(embed(ids), [A ; V]))            audio tokens first, as in the prompt

Both branches' tokens fill the ``<ImageHere>`` placeholders in prompt order (the audio sentence comes
before the video sentence, ``vjax.data.templates._video_llama``). Padding frames / clips
(``frame_mask`` / ``audio_mask``) are masked out of the video / audio Q-Former's cross-attention.
Source: spec_qformer_family.md §2 (official ``video_llama/models/video_llama.py``).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vjax.layers.mlp import dense
from vjax.layers.qformer import QFormer, QFormerConfig
from vjax.layers.quant import Embed
from vjax.models.decoder import CausalLM, DecoderConfig
from vjax.models.encoders import Encoder, EncoderConfig
from vjax.models.spec import ModelSpec, Preprocess, Visual
from vjax.models.video_llm import VideoLLM, example_text


# everything between the towers and the LLM, both branches (the tiny recipe's stages)
_CONNECTORS = (r"^qformer/", r"^video_frame_position_embedding/", r"^video_qformer/", r"^llama_proj/",
               r"^audio_position_embedding/", r"^audio_qformer/", r"^audio_llama_proj/")


@dataclasses.dataclass(frozen=True)
class VideoLLaMAConfig:
    vision: EncoderConfig = EncoderConfig.tiny("eva")
    image_qformer: QFormerConfig = QFormerConfig.tiny(encoder_width=32, num_layers=2, num_query_tokens=4)
    video_qformer: QFormerConfig = QFormerConfig.tiny(encoder_width=64, num_layers=2, cross_attention_freq=1,
                                                      num_query_tokens=6)
    audio: EncoderConfig = EncoderConfig.tiny("imagebind_audio")
    audio_qformer: QFormerConfig = QFormerConfig.tiny(encoder_width=24, num_layers=2, cross_attention_freq=1,
                                                      num_query_tokens=3)
    llm: DecoderConfig = DecoderConfig.tiny()
    audio_branch: bool = True
    num_frames: int = 4
    max_frame_pos: int = 32  # video_frame_position_embedding rows (hence T <= 32)
    num_audio_clips: int = 2
    max_audio_pos: int = 8  # audio_position_embedding rows (8 clips of 2 s)
    placeholder_id: int = 4  # <ImageHere> (both branches)
    _nested_configs = {"vision": EncoderConfig, "image_qformer": QFormerConfig, "video_qformer": QFormerConfig,
                       "audio": EncoderConfig, "audio_qformer": QFormerConfig, "llm": DecoderConfig}

    def __post_init__(self):
        widths = [("image_qformer.encoder_width", self.image_qformer.encoder_width, "vision.width", self.vision.width),
                  ("video_qformer.encoder_width", self.video_qformer.encoder_width, "image_qformer.hidden_size",
                   self.image_qformer.hidden_size)]
        if self.audio_branch:
            widths.append(("audio_qformer.encoder_width", self.audio_qformer.encoder_width, "audio.out_dim",
                           self.audio.out_dim))
        for a, x, b, y in widths:
            if x != y:
                raise ValueError(f"{a}={x} must equal {b}={y}")

    def replace(self, **kw) -> "VideoLLaMAConfig":
        return dataclasses.replace(self, **kw)

    @property
    def num_video_tokens(self) -> int:
        return self.video_qformer.num_query_tokens

    @property
    def num_audio_tokens(self) -> int:
        return self.audio_qformer.num_query_tokens if self.audio_branch else 0

    @property
    def audio_input(self) -> tuple[int, int, int]:
        """``(clips, mel bins, frames)`` of the audio input: ImageBind fbank clips (8 x 128 x 204 released)."""
        return self.num_audio_clips, self.audio.image_size, self.audio.image_width or self.audio.image_size

    @property
    def num_visual_tokens(self) -> int:
        """Tokens per clip: 8 audio + 32 video at the published settings (32 without the audio branch)."""
        return self.num_audio_tokens + self.num_video_tokens

    @classmethod
    def tiny(cls, **kw) -> "VideoLLaMAConfig":
        return cls(**kw)

    @classmethod
    def video_llama_vicuna7b(cls, **kw) -> "VideoLLaMAConfig":
        """Video-LLaMA v1 (``finetune-vicuna7b-v2.pth`` + ``finetune_vicuna7b_audiobranch.pth``): Vicuna-7B v0."""
        base = dict(vision=EncoderConfig.eva_vit_g(), image_qformer=QFormerConfig.blip2(),
                    video_qformer=QFormerConfig.video_llama_video(), audio=EncoderConfig.imagebind_audio_huge(),
                    audio_qformer=QFormerConfig.video_llama_audio(), llm=DecoderConfig.llama_7b(), num_frames=8,
                    num_audio_clips=8, placeholder_id=32000)
        return cls(**{**base, **kw})

    @classmethod
    def video_llama2_7b(cls, **kw) -> "VideoLLaMAConfig":
        """Video-LLaMA-2-7B (``VL_LLaMA_2_7B_*.pth`` + ``AL_LLaMA_2_7B_*.pth``): Llama-2-7B-chat."""
        return cls.video_llama_vicuna7b(**{"llm": DecoderConfig.llama2_7b(), **kw})

    @classmethod
    def video_llama2_13b(cls, **kw) -> "VideoLLaMAConfig":
        """Video-LLaMA-2-13B: Llama-2-13B-chat (``llama_proj`` 768 -> 5120)."""
        return cls.video_llama_vicuna7b(**{"llm": DecoderConfig.llama2_13b(), **kw})

    # The paper's stages (spec §2.5): everything else (EVA, ln_vision, image Q-Former, ImageBind, LLM) is frozen.
    STAGES = {
        "vl_pretrain": (r"^video_frame_position_embedding/", r"^video_qformer/", r"^llama_proj/"),
        "vl_finetune": (r"^video_frame_position_embedding/", r"^video_qformer/", r"^llama_proj/"),
        "al_pretrain": (r"^audio_position_embedding/", r"^audio_qformer/", r"^audio_llama_proj/"),
        "al_finetune": (r"^audio_position_embedding/", r"^audio_qformer/", r"^audio_llama_proj/"),
        # the tiny recipe's stage 1 (no pretrained Q-Former exists at tiny size): both branches' Q-Formers, positions
        # and projections train; the towers and the LLM stay frozen
        "connectors": _CONNECTORS,
        # the connectors and the LLM; both towers (EVA with ln_vision, ImageBind) frozen, as in every paper stage
        "connectors_llm": (*_CONNECTORS, r"^llm/"),
        "full": None,
    }


def _position_table(rows: int, width: int, pdt) -> Embed:
    return Embed(rows, width, param_dtype=pdt,
                 embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")))


class VideoLLaMA(VideoLLM):
    config: VideoLLaMAConfig

    def setup(self):
        c = self.config
        pdt, dt = jnp.dtype(c.llm.param_dtype), jnp.dtype(c.llm.dtype)
        # vision-language branch
        self.vision = Encoder(c.vision)  # EVA ViT-g + ln_vision
        self.qformer = QFormer(c.image_qformer)
        self.video_frame_position_embedding = _position_table(c.max_frame_pos, c.video_qformer.encoder_width, pdt)
        self.video_qformer = QFormer(c.video_qformer)
        self.llama_proj = dense(c.llm.hidden_size, ("mlp", "embed"), use_bias=True, dtype=dt, param_dtype=pdt)
        # audio-language branch
        if c.audio_branch:
            self.audio_encoder = Encoder(c.audio)  # ImageBind-Huge audio, post-processed (x20 L2 norm)
            self.audio_position_embedding = _position_table(c.max_audio_pos, c.audio_qformer.encoder_width, pdt)
            self.audio_qformer = QFormer(c.audio_qformer)
            self.audio_llama_proj = dense(c.llm.hidden_size, ("mlp", "embed"), use_bias=True, dtype=dt,
                                          param_dtype=pdt)
        self.llm = CausalLM(c.llm)

    def connector_queries(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        """``frames [B, T, H, W, 3]`` -> the video Q-Former's query outputs ``[B, 32, 768]`` (before ``llama_proj``)."""
        b, t = frames.shape[:2]
        feats = self.vision(frames.reshape(b * t, *frames.shape[2:])).features  # [B*T, 257, 1408]
        q = self.qformer(feats)[:, : self.config.image_qformer.num_query_tokens]  # [B*T, 32, 768]
        q = q.reshape(b, t, *q.shape[1:])  # [B, T, 32, 768]
        q = q + self.video_frame_position_embedding(jnp.arange(t))[None, :, None].astype(q.dtype)
        enc_mask = None
        if frame_mask is not None:
            enc_mask = jnp.repeat(frame_mask.astype(bool), q.shape[2], axis=1)  # [B, T*32]
        v = self.video_qformer(q.reshape(b, -1, q.shape[-1]), encoder_mask=enc_mask)  # [B, 32, 768]
        return v[:, : self.config.video_qformer.num_query_tokens]

    def encode_video(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        """``frames [B, T, H, W, 3]`` -> video tokens ``[B, 32, D]``."""
        return self.llama_proj(self.connector_queries(frames, frame_mask))  # [B, 32, D]

    def audio_connector_queries(self, audio: jax.Array, audio_mask: jax.Array | None = None) -> jax.Array:
        """``audio [B, C, 128, 204]`` fbank clips -> the audio Q-Former's query outputs ``[B, 8, 768]`` (before
        ``audio_llama_proj``)."""
        b, n = audio.shape[:2]
        emb = self.audio_encoder(audio.reshape(b * n, *audio.shape[2:])).features  # [B*C, 1024]
        emb = emb.reshape(b, n, -1) + self.audio_position_embedding(jnp.arange(n))[None].astype(emb.dtype)
        a = self.audio_qformer(emb, encoder_mask=audio_mask)  # [B, 8, 768]
        return a[:, : self.config.audio_qformer.num_query_tokens]

    def encode_audio(self, audio: jax.Array, audio_mask: jax.Array | None = None) -> jax.Array:
        """``audio [B, C, 128, 204]`` fbank clips -> audio tokens ``[B, 8, D]``."""
        return self.audio_llama_proj(self.audio_connector_queries(audio, audio_mask))  # [B, 8, D]

    def encode(self, frames: jax.Array | None = None, frame_mask: jax.Array | None = None,
               audio: jax.Array | None = None, audio_mask: jax.Array | None = None) -> jax.Array:
        """Tokens in prompt order: ``[audio (8) ; video (32)]``; either branch alone when only it has input."""
        parts = []
        if audio is not None and self.config.audio_branch:
            parts.append(self.encode_audio(audio, audio_mask))
        if frames is not None:
            parts.append(self.encode_video(frames, frame_mask))
        if not parts:
            raise ValueError("Video-LLaMA needs frames and/or audio (with config.audio_branch)")
        return jnp.concatenate(parts, axis=1)  # [B, 8 + 32, D]

    def example_batch(self, batch: int = 2) -> dict[str, jax.Array]:
        c = self.config
        s = c.vision.image_size
        out = {**example_text(batch, c.num_visual_tokens, c.placeholder_id),
               "frames": jnp.zeros((batch, c.num_frames, s, s, 3), jnp.float32),
               "frame_mask": jnp.ones((batch, c.num_frames), bool)}
        if c.audio_branch:
            mel, width = c.audio.image_size, c.audio.image_width or c.audio.image_size
            out["audio"] = jnp.zeros((batch, c.num_audio_clips, mel, width), jnp.float32)
            out["audio_mask"] = jnp.ones((batch, c.num_audio_clips), bool)
        return out


SPEC = ModelSpec(
    name="video_llama", config=VideoLLaMAConfig, module=VideoLLaMA,
    template="video_llama", visual=(Visual("video", "num_video_tokens"),
                                    Visual("audio", "num_audio_tokens", when="audio_branch")),
    preprocess=Preprocess("square", "decord", source="Video-LLaMA load_video: decord at 224x224"),
    stop_strings=("###", "</s>"), sampler="uniform_floor", marker_tokens={"placeholder_id": "<ImageHere>"},
    conversion="vjax.convert.video_llama", audio="audio_input",
    connector=("qformer", "video_frame_position_embedding", "video_qformer"),
    audio_tower="audio_encoder", audio_connector=("audio_position_embedding", "audio_qformer"))
