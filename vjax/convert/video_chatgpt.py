"""Weight layout of Video-ChatGPT-7B: three released pieces combined in the official loading order.

    source (in this order; a key in a later source replaces the earlier one)   keys
    1. LLaVA-Lightning-7B-v1-1 HF dir (``mmaaz60/LLaVA-7B-Lightening-v1-1``)   model.*, lm_head.weight,
                                                                              model.mm_projector.* (LLaVA's)
    2. CLIP ViT-L/14 HF dir (``openai/clip-vit-large-patch14``)                vision_model.* (text_model.* dropped)
    3. ``video_chatgpt-7B.bin`` (``VideoChatGPTTrainer._save``)                model.mm_projector.{weight,bias},
                                                                              model.embed_tokens.weight [32006, D]

That is the demo's order (spec_vit_family.md §2.6): LLaVA is loaded, 3 video tokens are added (vocabulary
32003 -> 32006), then ``load_state_dict(video_chatgpt-7B.bin, strict=False)`` overwrites the projector and
the whole embedding matrix. ``lm_head.weight`` keeps LLaVA's 32003 rows; the 3 new rows are set to the mean
of the others (:class:`~vjax.convert.mapping.PadRows`, LLaVA's ``initialize_vision_tokenizer`` rule;
the released demo leaves them at transformers' random init, so no exact value exists).

    vjax                      torch
    vision/vit/*, vision/post_layernorm   vision_model.*                      (clip_hf_table)
    mm_projector/{kernel,bias}            model.mm_projector.{weight,bias}    ("T")
    llm/*                                 model.*, lm_head.weight             (decoder_table)
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
from vjax.convert.mapping import PadRows, Rule, with_prefix
from vjax.models.decoder import DecoderConfig
from vjax.models.video_chatgpt import VideoChatGPTConfig

HF_ARCHITECTURE = "VideoChatGPTLlamaForCausalLM"
canonical_key = canonical_clip_key


def video_chatgpt_table(config: VideoChatGPTConfig, keys=None) -> list:
    """Rules over the canonical key names (see :func:`canonical_key`)."""
    llm = []
    v = config.llm.vocab_size
    for r in decoder_table(config.llm, prefix="model.", dst_prefix="llm/"):
        if isinstance(r, Rule) and r.src in ("model.embed_tokens.weight", "lm_head.weight"):
            r = PadRows(r.src, r.dst, v, r.transform)
        llm.append(r)
    return [*with_prefix(clip_hf_table(config.vision), "vision/"), *CLIP_TEXT_SKIPS,
            *projector_rules(), *llm]


def config_from_hf(configs: Mapping[str, Any] | list, shapes: Mapping[str, tuple] | None = None,
                   **kw) -> VideoChatGPTConfig:
    """From the LLaVA/Video-ChatGPT ``config.json`` (and a CLIP ``config.json``, if given among ``configs``).

    The vocabulary is the row count of ``model.embed_tokens.weight`` when ``shapes`` has it (32006 once the
    Video-ChatGPT ``.bin`` is applied; the LLaVA config says 32003); ``<vid_patch>`` is the first added
    video token, ``vocab - 3`` (32003). Frame/temporal counts are the release's (100).
    """
    configs = [configs] if isinstance(configs, Mapping) else list(configs)
    clip = next((c for c in configs if is_clip_config(c)), None)
    main = next((c for c in configs if not is_clip_config(c)), None)
    if main is None:
        raise ValueError("Video-ChatGPT needs the LLaVA / Video-ChatGPT config.json (a LLaMA config)")
    cfg = dict(main)
    if shapes and "model.embed_tokens.weight" in shapes:
        cfg["vocab_size"] = int(shapes["model.embed_tokens.weight"][0])
    llm = DecoderConfig.from_hf(llama_config(cfg))
    vision = clip_config_from_hf(cfg.get("vision_config") or clip, cfg.get("mm_vision_select_layer", -2))
    return VideoChatGPTConfig.video_chatgpt_7b(**{"vision": vision, "llm": llm,
                                                  "placeholder_id": llm.vocab_size - 3, **kw})


def to_hf(config: VideoChatGPTConfig) -> dict:
    """A ``config.json`` that :func:`config_from_hf` reads back (the LLaMA fields + the CLIP vision config)."""
    c = config.vision
    hf = {**config.llm.to_hf(), "architectures": [HF_ARCHITECTURE], "model_type": "VideoChatGPT",
          "mm_vision_select_layer": c.feature_layer, "mm_hidden_size": c.width, "vid_patch_token": config.placeholder_id,
          "vision_config": dict(model_type="clip_vision_model", image_size=c.image_size, patch_size=c.patch_size,
                                hidden_size=c.width, num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
                                intermediate_size=c.mlp_dim, hidden_act=c.act, layer_norm_eps=c.eps,
                                num_channels=c.in_channels)}
    return hf


def layout() -> Layout:
    return Layout("video_chatgpt", config_from_hf, video_chatgpt_table, canonical_key, to_hf,
                  hint="Video-ChatGPT is released in three pieces: python -m experiments.convert "
                       "--model=video_chatgpt --src=LLAVA_DIR,CLIP_DIR,video_chatgpt-7B.bin")
