"""LLaVA-NeXT-Video (Zhang et al. 2024, "LLaVA-NeXT: A Strong Zero-shot Video Understanding Model",
llava-vl.github.io/blog/2024-04-30-llava-next-video): CLIP ViT-L/14-336 frame features, 2x2 spatial average
pooling per frame, a two-layer GELU projector, a Vicuna-7B v1.5 decoder.

    F = CLIP(frames)[-2][:, 1:]                 [B, T, 576, 1024]   (penultimate layer, CLS dropped)
    P = avgpool_2x2(F on its 24 x 24 grid)      [B, T, 144, 1024]   (stride = window 2; odd grids floor)
    Z = linear_2(GELU(linear_1(P)))             [B, T, 144, D]      (``multi_modal_projector``, biases)
    logits = LLaMA(splice(embed(ids), flatten_frames(Z)))          [B, T * 144 visual tokens]

The visual tokens (frame-major, then pooled patches in raster order) replace the ``<video>`` placeholders
(``video_token_index``, 32000) in order; positions are the decoder's 1-D ``cumsum(mask) - 1``. Frames are
CLIP-normalised (OpenAI mean/std), resized and centre-cropped to the tower's size (336).
Reference: transformers ``LlavaNextVideoForConditionalGeneration`` (``get_video_features``,
``LlavaNextVideoPooler``, ``LlavaNextVideoMultiModalProjector``), ``spatial_pool_mode="average"``,
``vision_feature_select_strategy="default"``, ``vision_feature_layer=-2``.

Differences from the reference, on purpose:

* Videos only. LLaVA-NeXT's image path (any-res tiling over ``image_grid_pinpoints``, unpadding, the
  ``image_newline`` row token) is not implemented: passing images (``pixel_values``/``image_sizes``) is an
  error naming this; ``image_newline`` is read and dropped by the converter (and left out of ``to_hf``
  exports, where transformers initialises it).
* ``frame_mask``: a clip with fewer real frames than the batch's T gets its real frames' tokens first and
  its other slots hidden (``encode_masked``), as if those frames were not there; the reference has no mask.
* Pooling only ``"average"`` (the release's); ``"max"``/``"conv"`` and lists of feature layers are refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from vjax.layers.mlp import Mlp
from vjax.layers.pooling import spatial_avg_pool
from vjax.models.decoder import CausalLM, DecoderConfig
from vjax.models.encoders import Encoder, EncoderConfig
from vjax.models.spec import ModelSpec, Preprocess, Visual
from vjax.models.video_llm import VideoLLM


@dataclasses.dataclass(frozen=True)
class LlavaNextVideoConfig:
    vision: EncoderConfig = EncoderConfig.tiny("clip", image_size=56)
    llm: DecoderConfig = DecoderConfig.tiny()
    num_frames: int = 4
    placeholder_id: int = 5  # <video> (video_token_index)
    image_token_id: int = 6  # <image> (image_token_index): kept for config.json only (images unsupported)
    pool_stride: int = 2  # spatial_pool_stride
    projector_act: str = "gelu"  # projector_hidden_act
    projector_bias: bool = True  # multimodal_projector_bias
    _nested_configs = {"vision": EncoderConfig, "llm": DecoderConfig}

    def replace(self, **kw) -> "LlavaNextVideoConfig":
        return dataclasses.replace(self, **kw)

    @property
    def pooled_grid(self) -> tuple[int, int]:
        h, w = self.vision.grid
        return h // self.pool_stride, w // self.pool_stride

    @property
    def tokens_per_frame(self) -> int:
        """Pooled patches of one frame (144 at 336 px)."""
        h, w = self.pooled_grid
        return h * w

    def visual_tokens_for(self, frames: int) -> int:
        """Tokens of a clip of ``frames`` real frames."""
        return max(frames, 0) * self.tokens_per_frame

    @property
    def num_visual_tokens(self) -> int:
        """Tokens of a clip of ``num_frames`` frames (32 x 144 = 4608 at the published settings)."""
        return self.visual_tokens_for(self.num_frames)

    @property
    def max_visual_tokens(self) -> int:
        return self.num_visual_tokens

    @classmethod
    def tiny(cls, **kw) -> "LlavaNextVideoConfig":
        """2-block CLIP at 56 px (4 x 4 patches -> 2 x 2 pooled), 2-layer LLM, 4 frames: 16 visual tokens."""
        return cls(**kw)

    @classmethod
    def llava_next_video_7b(cls, **kw) -> "LlavaNextVideoConfig":
        """``llava-hf/LLaVA-NeXT-Video-7B-hf``: CLIP ViT-L/14-336, Vicuna-7B v1.5 with the vocabulary padded
        to 32064 (``<video>`` 32000, ``<image>`` 32001), 32 uniformly sampled frames (model card).
        RoPE scaling is whatever ``text_config`` of a checkpoint's config.json says (``from_hf``)."""
        base = dict(vision=EncoderConfig.clip_vit_l14_336(), llm=DecoderConfig.vicuna_7b_v15(vocab_size=32064),
                    num_frames=32, placeholder_id=32000, image_token_id=32001)
        return cls(**{**base, **kw})

    # llava-hf/LLaVA-NeXT-Video-7B-DPO-hf: the same architecture, DPO-tuned weights.
    llava_next_video_7b_dpo = llava_next_video_7b

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], **kw) -> "LlavaNextVideoConfig":
        """From a transformers ``LlavaNextVideoConfig`` ``config.json`` dict (nested ``text_config`` /
        ``vision_config``; absent keys take transformers' defaults)."""
        mode = cfg.get("spatial_pool_mode", "average")
        layer = cfg.get("vision_feature_layer", -2)
        strategy = cfg.get("vision_feature_select_strategy", "default")
        if mode != "average":
            raise ValueError(f"spatial_pool_mode={mode!r}: vjax implements LLaVA-NeXT-Video's 'average' only")
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer={layer!r}: vjax takes one layer index, not a list")
        if strategy != "default":
            raise ValueError(f"vision_feature_select_strategy={strategy!r}: the video path needs 'default' "
                             "(CLS dropped: the patches must form a grid)")
        text = {"model_type": "llama", **(cfg.get("text_config") or {})}
        if cfg.get("tie_word_embeddings"):
            text["tie_word_embeddings"] = True
        llm = DecoderConfig.from_hf(text)
        v = {**dict(image_size=336, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16), **(cfg.get("vision_config") or {})}
        vision = EncoderConfig.clip_vit_l14_336(
            image_size=v["image_size"], patch_size=v.get("patch_size", 14), width=v["hidden_size"],
            depth=v["num_hidden_layers"], num_heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
            act=v.get("hidden_act", "quick_gelu"), eps=float(v.get("layer_norm_eps", 1e-5)),
            in_channels=v.get("num_channels", 3), feature_layer=layer)
        base = dict(vision=vision, llm=llm, num_frames=32,
                    placeholder_id=cfg.get("video_token_index", cfg.get("video_token_id", 32000)),
                    image_token_id=cfg.get("image_token_index", cfg.get("image_token_id", 32001)),
                    pool_stride=cfg.get("spatial_pool_stride", 2),
                    projector_act=cfg.get("projector_hidden_act", "gelu"),
                    projector_bias=bool(cfg.get("multimodal_projector_bias", True)))
        return cls(**{**base, **kw})

    # stages: which parameter paths train (regexes over "a/b/c" paths); the CLIP tower stays frozen
    STAGES = {"projector": (r"^multi_modal_projector/",),
              "finetune": (r"^multi_modal_projector/", r"^llm/"), "full": None}


class LlavaNextVideo(VideoLLM):
    config: LlavaNextVideoConfig

    def setup(self):
        c = self.config
        self.vision = Encoder(c.vision)
        self.multi_modal_projector = Mlp(c.llm.hidden_size, c.llm.hidden_size, c.projector_act, c.projector_bias,
                                         jnp.dtype(c.llm.dtype), jnp.dtype(c.llm.param_dtype))
        self.llm = CausalLM(c.llm)

    def encode(self, frames: jax.Array | None = None, frame_mask: jax.Array | None = None,
               **images: Any) -> jax.Array:
        """``frames [B, T, H, W, 3]`` -> video tokens ``[B, T * N', D]`` (frame-major; ``N'`` pooled patches)."""
        return self.encode_masked(frames, frame_mask, **images)[0]

    def encode_masked(self, frames: jax.Array | None = None, frame_mask: jax.Array | None = None,
                      **images: Any) -> tuple[jax.Array, jax.Array | None]:
        """:meth:`encode` and, given ``frame_mask``, which slots hold real tokens (real frames' tokens first)."""
        if images or frames is None:
            got = sorted(images) or "no frames"
            raise ValueError(f"LLaVA-NeXT-Video in vjax takes videos (frames) only; got {got}: "
                             "the any-res image path (image_grid_pinpoints, image_newline) is not implemented")
        c = self.config
        feats = self.frame_features(frames)  # [B, T, N, C]
        pooled = spatial_avg_pool(feats, c.vision.grid, c.pool_stride)  # [B, T, N', C]
        tokens = self.multi_modal_projector(pooled)  # [B, T, N', D]
        b, t, n, d = tokens.shape
        if frame_mask is None:
            return tokens.reshape(b, t * n, d), None
        order = jnp.argsort(~jnp.asarray(frame_mask, bool), axis=1, stable=True)  # real frames first, in order
        tokens = jnp.take_along_axis(tokens, order[:, :, None, None], axis=1)
        mask = jnp.take_along_axis(jnp.asarray(frame_mask, bool), order, axis=1)  # [B, T]
        return tokens.reshape(b, t * n, d), jnp.repeat(mask, n, axis=1)  # [B, T * N', D], [B, T * N']


SPEC = ModelSpec(
    name="llava_next_video", config=LlavaNextVideoConfig, module=LlavaNextVideo,
    # transformers' chat template of llava-hf/LLaVA-NeXT-Video-7B-hf: "USER: <video>\n{question} ASSISTANT:"
    template="vicuna_v1", template_options={"system": ""}, visual=(Visual("video", "visual_tokens_for"),),
    # the release's load_video: np.linspace(0, frames - 1, n, dtype=int) over the whole clip
    preprocess=Preprocess("shortest_side", "pil_bicubic", crop=True,
                          source="transformers LlavaNextVideo processor: shortest side bicubic + centre crop"),
    sampler="linspace_floor", sampler_kwargs={"clip_end_sec": None},
    marker_tokens={"placeholder_id": "<video>", "image_token_id": "<image>"},
    conversion="vjax.convert.llava_next_video", hf_architectures=("LlavaNextVideoForConditionalGeneration",),
    hf_model_types=("llava_next_video",))
