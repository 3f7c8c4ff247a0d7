"""Weight layout of LLaVA-NeXT-Video (``llava-hf/LLaVA-NeXT-Video-7B-hf``, ``-7B-DPO-hf``): transformers'
``LlavaNextVideoForConditionalGeneration``, one HF directory.

The table uses the released spelling, which is also what ``save_pretrained`` of transformers 5 writes (it
maps its module names back); every other spelling is renamed to it first (:func:`canonical_key`):

    canonical (released)                         also read as
    vision_tower.vision_model.X                  vision_tower.X (transformers 5 save),
                                                 model.vision_tower[.vision_model].X
    multi_modal_projector.linear_{1,2}.*         model.multi_modal_projector.*
    language_model.model.X                       model.language_model.X (transformers 5 module names)
    language_model.lm_head.weight                lm_head.weight
    image_newline                                model.image_newline

    vjax                                          torch
    vision/vit/*, vision/post_layernorm           vision_tower.vision_model.*           (clip_hf_table)
    multi_modal_projector/fc1, fc2/{kernel,bias}  multi_modal_projector.linear_1, linear_2.{weight,bias} ("T")
    llm/*                                         language_model.model.*, language_model.lm_head.weight
    (dropped: images are not supported)           image_newline [D]

The average ``vision_resampler`` has no parameters.
"""

from __future__ import annotations

from typing import Any, Mapping

from vjax.convert.decoder import decoder_table
from vjax.convert.encoders import clip_hf_table
from vjax.convert.layout import Layout
from vjax.convert.mapping import Rule, Skip, with_prefix
from vjax.models.llava_next_video import LlavaNextVideoConfig

HF_ARCHITECTURE = "LlavaNextVideoForConditionalGeneration"
HF_MODEL_TYPE = "llava_next_video"
VISION = "vision_tower.vision_model."
LLM = "language_model.model."
LM_HEAD = "language_model.lm_head.weight"
_CLIP_BARE = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")
_MODEL_LEVEL = ("vision_tower.", "multi_modal_projector.", "image_newline")


def canonical_key(key: str) -> str:
    """The released spelling of a key (see the module table); unknown keys unchanged."""
    if key.startswith("model.language_model."):
        return LLM + key[len("model.language_model."):]
    if key == "lm_head.weight":
        return LM_HEAD
    if key.startswith("model.") and key[len("model."):].startswith(_MODEL_LEVEL):
        key = key[len("model."):]
    if key.startswith("vision_tower.") and key[len("vision_tower."):].startswith(_CLIP_BARE):
        return VISION + key[len("vision_tower."):]
    return key


def llava_next_video_table(config: LlavaNextVideoConfig, keys=None) -> list:
    """Rules over the canonical key names."""
    proj = []
    for i, dst in ((1, "fc1"), (2, "fc2")):
        proj.append(Rule(f"multi_modal_projector.linear_{i}.weight", f"multi_modal_projector/{dst}/kernel", "T"))
        if config.projector_bias:
            proj.append(Rule(f"multi_modal_projector.linear_{i}.bias", f"multi_modal_projector/{dst}/bias"))
    return [*with_prefix(clip_hf_table(config.vision, prefix=VISION), "vision/"), *proj, Skip("image_newline"),
            *decoder_table(config.llm, prefix=LLM, dst_prefix="llm/", lm_head=LM_HEAD)]


def config_from_hf(configs: Mapping[str, Any] | list, shapes=None, **kw) -> LlavaNextVideoConfig:
    cfg = configs if isinstance(configs, Mapping) else next(iter(configs))
    return LlavaNextVideoConfig.from_hf(cfg, **kw)


def to_hf(config: LlavaNextVideoConfig) -> dict:
    """A transformers ``LlavaNextVideoConfig`` ``config.json`` dict (read back by :func:`config_from_hf`)."""
    v = config.vision
    text = {k: val for k, val in config.llm.to_hf().items() if k != "torch_dtype"}
    return {"architectures": [HF_ARCHITECTURE], "model_type": HF_MODEL_TYPE, "text_config": text,
            "vision_config": dict(model_type="clip_vision_model", image_size=v.image_size, patch_size=v.patch_size,
                                  hidden_size=v.width, num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
                                  intermediate_size=v.mlp_dim, hidden_act=v.act, layer_norm_eps=v.eps,
                                  num_channels=v.in_channels),
            "video_token_index": config.placeholder_id, "image_token_index": config.image_token_id,
            "vision_feature_layer": v.feature_layer, "vision_feature_select_strategy": "default",
            "spatial_pool_mode": "average", "spatial_pool_stride": config.pool_stride,
            "projector_hidden_act": config.projector_act, "multimodal_projector_bias": config.projector_bias,
            "tie_word_embeddings": config.llm.tie_word_embeddings}


def layout() -> Layout:
    """The :class:`~vjax.convert.Layout` of ``llava_next_video`` (its model spec names this module)."""
    return Layout("llava_next_video", config_from_hf, llava_next_video_table, canonical_key, to_hf)
