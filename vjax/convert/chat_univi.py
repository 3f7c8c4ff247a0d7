"""Weight layout of Chat-UniVi(-13B) (``Chat-UniVi/Chat-UniVi``, ``Chat-UniVi/Chat-UniVi-13B``).

    source                                   keys
    the Chat-UniVi HF dir                    model.*, lm_head.weight, model.mm_projector.{weight,bias},
                                             optionally model.vision_tower.vision_tower.vision_model.*
    a CLIP ViT-L/14 HF dir (when the model   vision_model.* (text_model.* of a full CLIPModel dropped)
    dir has no vision keys; given after it,
    it replaces them)

Key spellings are made canonical by :func:`vjax.convert.llava.canonical_clip_key`. The clustering has no
parameters; its rates come from the nested ``config`` dict of ``config.json``
(``spatial_cluster_rate0..2``, ``temporal_cluster_rate``); spec_vit_family.md §3.8.
"""

from __future__ import annotations

from typing import Any, Mapping

from vjax.convert.decoder import decoder_table
from vjax.convert.encoders import clip_hf_table
from vjax.convert.layout import Layout
from vjax.convert.llava import (
    CLIP_TEXT_SKIPS,
    canonical_clip_key,
    clip_config_from_hf,
    is_clip_config,
    llama_config,
    projector_rules,
)
from vjax.convert.mapping import with_prefix
from vjax.models.chat_univi import ChatUniViConfig
from vjax.models.decoder import DecoderConfig

HF_ARCHITECTURE = "ChatUniViLlamaForCausalLM"
HF_MODEL_TYPE = "ChatUniVi"
canonical_key = canonical_clip_key


def chat_univi_table(config: ChatUniViConfig, keys=None) -> list:
    return [*with_prefix(clip_hf_table(config.vision), "vision/"), *CLIP_TEXT_SKIPS, *projector_rules(),
            *decoder_table(config.llm, prefix="model.", dst_prefix="llm/")]


def config_from_hf(configs: Mapping[str, Any] | list, shapes=None, **kw) -> ChatUniViConfig:
    """From Chat-UniVi's ``config.json`` (and a CLIP ``config.json`` if given among ``configs``)."""
    configs = [configs] if isinstance(configs, Mapping) else list(configs)
    clip = next((c for c in configs if is_clip_config(c)), None)
    main = next((c for c in configs if not is_clip_config(c)), None)
    if main is None:
        raise ValueError("Chat-UniVi needs its config.json (a LLaMA config with model_type 'ChatUniVi')")
    llm = DecoderConfig.from_hf(llama_config(main))
    vision = clip_config_from_hf(main.get("vision_config") or clip, main.get("mm_vision_select_layer", -2))
    cluster = main.get("config") or {}
    ratios = tuple(cluster.get(f"spatial_cluster_rate{i}", d) for i, d in enumerate((64, 32, 16)))
    return ChatUniViConfig.chat_univi_7b(**{
        "vision": vision, "llm": llm, "spatial_ratios": ratios,
        "temporal_ratio": float(cluster.get("temporal_cluster_rate", 1 / 16)),
        "placeholder_id": llm.vocab_size, **kw})


def to_hf(config: ChatUniViConfig) -> dict:
    c = config.vision
    cluster = {f"spatial_cluster_rate{i}": r for i, r in enumerate(config.spatial_ratios)}
    return {**config.llm.to_hf(), "architectures": [HF_ARCHITECTURE], "model_type": HF_MODEL_TYPE,
            "mm_vision_select_layer": c.feature_layer, "mm_hidden_size": c.width,
            "config": {**cluster, "temporal_cluster_rate": config.temporal_ratio, "use_cluster": True},
            "vision_config": dict(model_type="clip_vision_model", image_size=c.image_size, patch_size=c.patch_size,
                                  hidden_size=c.width, num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
                                  intermediate_size=c.mlp_dim, hidden_act=c.act, layer_norm_eps=c.eps,
                                  num_channels=c.in_channels)}


def layout() -> Layout:
    return Layout("chat_univi", config_from_hf, chat_univi_table, canonical_key, to_hf,
                  hint="Chat-UniVi releases may omit the CLIP tower: add the openai/clip-vit-large-patch14 "
                       "directory as a further source (python -m experiments.convert --src=MODEL_DIR,CLIP_DIR)")
