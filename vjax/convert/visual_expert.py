"""Weight layout of CogVLM / CogVLM2's visual-expert language model (``modeling_cogvlm.py`` names).

    model.layers.i.self_attn.{vision,language}_expert_query_key_value.weight [(H + 2K) Dh, D]
        rows [q | k | v]  ->  layers_i/self_attn/{vision,language}_{q,k,v}_proj/kernel   (Split, "T")
    model.layers.i.self_attn.vision_expert_query_key_value.bias -> .../vision_{q,k,v}_proj/bias
    model.layers.i.self_attn.{vision,language}_expert_dense.weight -> .../{vision,language}_o_proj/kernel
    model.layers.i.mlp.{vision,language}_mlp.{gate,up,down}_proj.weight -> layers_i/mlp/...
    model.layers.i.{input,post_attention}_layernorm.weight, model.norm.weight, model.embed_tokens.weight,
    lm_head.weight; ``rotary_emb.inv_freq`` buffers are accepted and dropped (RoPE is recomputed).

The vision tower (``model.vision.*``) has its own table.
"""

from __future__ import annotations

from vjax.convert.mapping import Rule, Skip, Split
from vjax.layers.visual_expert import VisualExpertConfig


def visual_expert_layer_rules(config: VisualExpertConfig, src: str = "model.layers.{i}.",
                              dst: str = "layers_{i}/") -> list[Rule | Split | Skip]:
    """Rules of the decoder layers (``src``/``dst`` may hold ``{i}``, or name one layer).

    >>> import numpy as np
    >>> from vjax.convert.mapping import Split
    >>> rules = visual_expert_layer_rules(VisualExpertConfig.tiny())          # q 64 | k 32 | v 32 rows
    >>> split = next(r for r in rules if isinstance(r, Split) and r.src.endswith("query_key_value.weight"))
    >>> [p.shape for p in split.load(np.zeros((128, 64)))]                  # -> Dense kernels [in, out]
    [(64, 64), (64, 32), (64, 32)]
    """
    c = config
    sizes = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim)
    rules: list[Rule | Split | Skip] = [
        Rule(f"{src}input_layernorm.weight", f"{dst}input_layernorm/scale"),
        Rule(f"{src}post_attention_layernorm.weight", f"{dst}post_attention_layernorm/scale"),
        Skip(f"{src}self_attn.rotary_emb.inv_freq"),
    ]
    for expert, bias in (("vision", c.vision_qkv_bias), ("language", c.language_qkv_bias)):
        qkv = f"{src}self_attn.{expert}_expert_query_key_value"
        projs = tuple(f"{dst}self_attn/{expert}_{p}_proj" for p in "qkv")
        rules.append(Split(f"{qkv}.weight", tuple(f"{p}/kernel" for p in projs), sizes, axis=0, transform="T"))
        if bias:
            rules.append(Split(f"{qkv}.bias", tuple(f"{p}/bias" for p in projs), sizes, axis=0))
        rules.append(Rule(f"{src}self_attn.{expert}_expert_dense.weight",
                          f"{dst}self_attn/{expert}_o_proj/kernel", "T"))
        for p in ("gate_proj", "up_proj", "down_proj"):
            rules.append(Rule(f"{src}mlp.{expert}_mlp.{p}.weight", f"{dst}mlp/{expert}_mlp/{p}/kernel", "T"))
    return rules


def visual_expert_lm_table(config: VisualExpertConfig, prefix: str = "model.", dst_prefix: str = "",
                           lm_head: str = "lm_head.weight") -> list[Rule | Split | Skip]:
    """Rules for a visual-expert :class:`vjax.models.decoder.CausalLM` (the language model only).

    >>> from vjax.convert.mapping import flatten_params, plan_conversion
    >>> from vjax.models.decoder import CausalLM, DecoderConfig
    >>> from vjax.pretrained import abstract_params
    >>> cfg = VisualExpertConfig.tiny(num_layers=1)
    >>> want = {k: v.shape for k, v in flatten_params(abstract_params(CausalLM(DecoderConfig.from_expert_config(cfg)))).items()}
    >>> names = {"model.layers.0.self_attn.language_expert_query_key_value.weight": (128, 64),
    ...          "model.layers.0.self_attn.rotary_emb.inv_freq": (8,)}
    >>> plan = plan_conversion(names, visual_expert_lm_table(cfg), want)
    >>> plan.unexpected, plan.mismatched, len(plan.missing)                  # everything else is still missing
    ([], [], 19)
    """
    p, d = prefix, dst_prefix
    return [
        Rule(f"{p}embed_tokens.weight", f"{d}embed_tokens/embedding"),
        Rule(f"{p}norm.weight", f"{d}norm/scale"),
        Rule(lm_head, f"{d}lm_head/kernel", "T"),
        *visual_expert_layer_rules(config, f"{p}layers.{{i}}.", f"{d}layers_{{i}}/"),
    ]
