"""What the LLaVA-style layouts (Video-ChatGPT, Chat-UniVi) share: CLIP key spellings and config parsing.

A LLaVA-style checkpoint is an HF LLaMA (``model.*``, ``lm_head.weight``) plus ``model.mm_projector.*``;
the CLIP tower comes from its own HF directory (``openai/clip-vit-large-patch14``: a full ``CLIPModel``,
whose text tower is accepted and dropped) or, in some releases, inside the model under
``model.vision_tower.vision_tower.vision_model.*``. Every spelling is renamed to the canonical
``vision_model.*`` before matching (:func:`canonical_clip_key`):

    model.vision_tower.vision_tower.vision_model.X   (LLaVA-1.5 / Chat-UniVi ``CLIPVisionTower``)
    model.vision_tower.vision_model.X                (LLaVA v1 kept the bare CLIPVisionModel)
    vision_tower.vision_model.X
    embeddings.X, encoder.X, pre_layrnorm.X, post_layernorm.X
                                                     (``CLIPVisionModel.save_pretrained`` of transformers 5)
"""

from __future__ import annotations

from typing import Any, Mapping

from vjax.convert.mapping import Rule, Skip
from vjax.models.encoders import EncoderConfig

_ALIASES = ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_model.",
            "vision_tower.vision_model.")
_BARE = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


def canonical_clip_key(key: str) -> str:
    """The canonical (``vision_model.``) spelling of a CLIP key; other keys unchanged."""
    for a in _ALIASES:
        if key.startswith(a):
            return "vision_model." + key[len(a):]
    if key.startswith(_BARE):
        return "vision_model." + key
    return key


# the text half of a full CLIPModel directory (openai/clip-vit-large-patch14)
CLIP_TEXT_SKIPS = [Skip("text_model.**"), Skip("text_projection.weight"), Skip("visual_projection.weight"),
                   Skip("logit_scale")]


def projector_rules(src: str = "model.mm_projector", dst: str = "mm_projector") -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/kernel", "T"), Rule(f"{src}.bias", f"{dst}/bias")]


def clip_config_from_hf(cfg: Mapping[str, Any] | None, select_layer: int = -2) -> EncoderConfig:
    """CLIP ViT config from a ``CLIPVisionConfig`` (or a ``CLIPConfig`` with ``vision_config``) dict;
    ``None``: ``openai/clip-vit-large-patch14`` (what the LLaVA configs name in ``mm_vision_tower``)."""
    if cfg is None:
        return EncoderConfig.clip_vit_l14_224(feature_layer=select_layer)
    v = cfg.get("vision_config") or cfg
    width = v.get("hidden_size", 1024)
    return EncoderConfig.clip_vit_l14_224(
        image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 14), width=width,
        depth=v.get("num_hidden_layers", 24), num_heads=v.get("num_attention_heads", 16),
        mlp_dim=v.get("intermediate_size", 4 * width), act=v.get("hidden_act", "quick_gelu"),
        eps=float(v.get("layer_norm_eps", 1e-5)), in_channels=v.get("num_channels", 3), feature_layer=select_layer)


def is_clip_config(cfg: Mapping[str, Any]) -> bool:
    return cfg.get("model_type") in ("clip", "clip_vision_model") or any(
        a.startswith("CLIP") for a in cfg.get("architectures") or [])


def llama_config(cfg: Mapping[str, Any]) -> dict:
    """The LLaMA part of a LLaVA-style ``config.json`` as a ``LlamaForCausalLM`` config dict."""
    return {**cfg, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
