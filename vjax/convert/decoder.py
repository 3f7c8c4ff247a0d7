"""Weight layout of HF ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``.

torch ``nn.Linear.weight`` is ``[out, in]``; a vjax ``Dense`` kernel is ``[in, out]`` (``"T"``).
"""

from __future__ import annotations

from typing import Mapping

from vjax.convert.layout import Layout
from vjax.convert.mapping import Rule, Skip
from vjax.models.decoder import DecoderConfig


def decoder_table(config: DecoderConfig, prefix: str = "model.", dst_prefix: str = "",
                  lm_head: str = "lm_head.weight") -> list[Rule | Skip]:
    """Rules for one decoder; ``prefix``/``dst_prefix`` place it inside a larger checkpoint/model."""
    p, d = prefix, dst_prefix
    rules = [
        Rule(f"{p}embed_tokens.weight", f"{d}embed_tokens/embedding"),
        Rule(f"{p}norm.weight", f"{d}norm/scale"),
        Rule(f"{p}layers.{{i}}.input_layernorm.weight", f"{d}layers_{{i}}/input_layernorm/scale"),
        Rule(f"{p}layers.{{i}}.post_attention_layernorm.weight", f"{d}layers_{{i}}/post_attention_layernorm/scale"),
    ]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rules.append(Rule(f"{p}layers.{{i}}.self_attn.{proj}.weight", f"{d}layers_{{i}}/self_attn/{proj}/kernel", "T"))
        if config.attention_bias and proj != "o_proj":
            rules.append(Rule(f"{p}layers.{{i}}.self_attn.{proj}.bias", f"{d}layers_{{i}}/self_attn/{proj}/bias"))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rules.append(Rule(f"{p}layers.{{i}}.mlp.{proj}.weight", f"{d}layers_{{i}}/mlp/{proj}/kernel", "T"))
    if config.tie_word_embeddings:
        rules.append(Skip(lm_head))  # some tied checkpoints store the shared matrix twice
    else:
        rules.append(Rule(lm_head, f"{d}lm_head/kernel", "T"))
    rules.append(Skip(f"{p}layers.{{i}}.self_attn.rotary_emb.inv_freq"))  # old transformers buffers
    return rules


def layout() -> Layout:
    """The LLaMA-family decoder (Llama, Mistral, Qwen2 ``*ForCausalLM`` directories)."""

    def config(configs, shapes=None, **kw):
        return DecoderConfig.from_hf(configs if isinstance(configs, Mapping) else next(iter(configs)), **kw)

    return Layout("decoder", config, lambda config, keys=None: decoder_table(config), to_hf=lambda c: c.to_hf())
