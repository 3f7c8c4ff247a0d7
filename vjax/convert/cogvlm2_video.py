"""Weight layout of CogVLM2-Video (``THUDM/cogvlm2-video-llama3-chat``; spec_vit_family.md §4.6-4.7).

The released decoder has only the language expert of CogVLM's layer (§4.1), i.e. it is Llama-3-8B under
CogVLM names:

    torch (``model.layers.i.``)                                   vjax (``llm/layers_i/``)
    self_attn.language_expert_query_key_value.weight [(H+2K)Dh, D]  self_attn/{q,k,v}_proj/kernel (rows [q|k|v], "T")
    self_attn.language_expert_dense.weight                        self_attn/o_proj/kernel
    mlp.language_mlp.{gate,up,down}_proj.weight                   mlp/{gate,up,down}_proj/kernel
    {input,post_attention}_layernorm.weight                       {input,post_attention}_layernorm/scale
    model.embed_tokens.weight, model.norm.weight, lm_head.weight  llm/embed_tokens, llm/norm, llm/lm_head
    model.vision.*                                                vision/*  (:func:`eva2_cogvlm2_table`)

A config with ``llm.visual_experts=True`` (the survey's form: CogVLM2-19B-style layers) reads the
``vision_expert_*`` / ``mlp.vision_mlp.*`` tensors too (:func:`visual_expert_lm_table`).
"""

from __future__ import annotations

from typing import Any, Mapping

from vjax.convert.encoders import eva2_cogvlm2_adapter_table, eva2_cogvlm2_table
from vjax.convert.layout import Layout
from vjax.convert.mapping import Rule, Skip, Split, with_prefix
from vjax.convert.visual_expert import visual_expert_lm_table
from vjax.models.cogvlm2_video import CogVLM2VideoConfig
from vjax.models.decoder import DecoderConfig
from vjax.models.encoders import EncoderConfig

HF_ARCHITECTURE = "CogVLMVideoForCausalLM"


def language_lm_table(llm: DecoderConfig, prefix: str = "model.", dst_prefix: str = "llm/") -> list:
    """The released (language-expert-only) decoder -> a plain vjax decoder."""
    p, d, c = prefix, dst_prefix, llm
    dh = c.resolved_head_dim
    sizes = (c.num_heads * dh, c.num_kv_heads * dh, c.num_kv_heads * dh)
    L, D = f"{p}layers.{{i}}.", f"{d}layers_{{i}}/"
    rules = [
        Rule(f"{p}embed_tokens.weight", f"{d}embed_tokens/embedding"),
        Rule(f"{p}norm.weight", f"{d}norm/scale"),
        Rule(f"{L}input_layernorm.weight", f"{D}input_layernorm/scale"),
        Rule(f"{L}post_attention_layernorm.weight", f"{D}post_attention_layernorm/scale"),
        Split(f"{L}self_attn.language_expert_query_key_value.weight",
              tuple(f"{D}self_attn/{n}_proj/kernel" for n in "qkv"), sizes, 0, "T"),
        Rule(f"{L}self_attn.language_expert_dense.weight", f"{D}self_attn/o_proj/kernel", "T"),
        *[Rule(f"{L}mlp.language_mlp.{n}.weight", f"{D}mlp/{n}/kernel", "T")
          for n in ("gate_proj", "up_proj", "down_proj")],
        Skip(f"{L}self_attn.rotary_emb.inv_freq"),
    ]
    if c.attention_bias:
        rules.append(Split(f"{L}self_attn.language_expert_query_key_value.bias",
                           tuple(f"{D}self_attn/{n}_proj/bias" for n in "qkv"), sizes, 0))
    if c.tie_word_embeddings:
        rules.append(Skip("lm_head.weight"))
    else:
        rules.append(Rule("lm_head.weight", f"{d}lm_head/kernel", "T"))
    return rules


def cogvlm2_video_table(config: CogVLM2VideoConfig, keys=None) -> list:
    vision = [*with_prefix(eva2_cogvlm2_table(config.vision), "vision/"),
              *with_prefix(eva2_cogvlm2_adapter_table(), "adapter/")]
    if config.llm.visual_experts:
        return [*vision, *visual_expert_lm_table(config.llm.expert_config, prefix="model.", dst_prefix="llm/")]
    return [*vision, *language_lm_table(config.llm)]


def config_from_hf(configs: Mapping[str, Any] | list, shapes: Mapping[str, tuple] | None = None,
                   **kw) -> CogVLM2VideoConfig:
    """From CogVLM2-Video's ``config.json``; visual experts iff the checkpoint holds ``vision_expert_*`` tensors
    (or the architecture is the image model ``CogVLMForCausalLM``)."""
    cfg = configs if isinstance(configs, Mapping) else next(iter(configs))
    experts = any("vision_expert_query_key_value" in k for k in (shapes or {})) or (
        "CogVLMForCausalLM" in (cfg.get("architectures") or []))
    heads = cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id", 128001)
    llm = DecoderConfig.llama3_8b(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=cfg.get("num_multi_query_heads") or cfg.get("num_key_value_heads") or heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), rope_theta=float(cfg.get("rope_theta", 500000.0)),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048), bos_token_id=cfg.get("bos_token_id", 128000),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos, pad_token_id=cfg.get("pad_token_id", 128002),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), visual_experts=experts)
    v = cfg.get("vision_config") or {}
    vision = EncoderConfig.eva2_clip_e(
        image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 14), width=v.get("hidden_size", 1792),
        depth=v.get("num_hidden_layers", 63), num_heads=v.get("num_heads", 16),
        mlp_dim=v.get("intermediate_size", 15360), eps=float(v.get("layer_norm_eps", 1e-6)),
        in_channels=v.get("in_channels", 3), act=v.get("hidden_act", "gelu"), out_dim=llm.hidden_size,
        glu_dim=llm.intermediate_size)
    pad = llm.pad_token_id if llm.pad_token_id is not None else 128002
    return CogVLM2VideoConfig.cogvlm2_video_llama3_chat(**{"vision": vision, "llm": llm, "placeholder_id": pad, **kw})


def layout() -> Layout:
    return Layout("cogvlm2_video", config_from_hf, cogvlm2_video_table)
