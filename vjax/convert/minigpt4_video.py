"""Weight layout of MiniGPT4-video: the official model's state-dict names (PEFT-wrapped LLM).

    vjax                                   MiniGPT4-video (``minigpt4/models/mini_gpt4_llama_v2.py``)
    vision/vit, vision/ln_vision           visual_encoder.*, ln_vision.*           (eva_vit_g.pth)
    llama_proj                             llama_proj                              (released .pth)
    llm/*                                  llama_model.base_model.model.{model.*, lm_head.weight}
    llm/layers_i/self_attn/{q,v}_proj/     ...layers.i.self_attn.{q,v}_proj.lora_A.weight [r, in] -> lora_A [in, r]
        lora_A, lora_B                     ...lora_B.weight [out, r] -> lora_B [r, out]   (released .pth)

Key names: spec_qformer_family.md §1.1, §3.1, §3.5. peft 0.2.0 (pinned by the release) writes
``lora_A.weight``; newer peft writes ``lora_A.default.weight`` and ``base_layer.weight``: both are read,
the first form is written. The released checkpoints hold ``llama_proj`` and the LoRA tensors only: load
them with ``strict=False`` over EVA and the base LLM (its HF folder: ``decoder_table(config.llm, "model.")``).
"""

from __future__ import annotations

from vjax.convert.decoder import decoder_table
from vjax.convert.encoders import eva_lavis_table
from vjax.convert.mapping import Rule, with_prefix
from vjax.models.minigpt4_video import MiniGPT4VideoConfig

PEFT = "llama_model.base_model.model."


def lora_rules(config: MiniGPT4VideoConfig, prefix: str = PEFT) -> list[Rule]:
    """The LoRA tensors of every target projection, in both peft spellings."""
    rules = []
    if not config.llm.lora_rank:
        return rules
    for proj in config.llm.lora_targets:
        src, dst = f"{prefix}model.layers.{{i}}.self_attn.{proj}", f"llm/layers_{{i}}/self_attn/{proj}"
        for ab in ("A", "B"):
            rules += [Rule(f"{src}.lora_{ab}.weight", f"{dst}/lora_{ab}", "T"),
                      Rule(f"{src}.lora_{ab}.default.weight", f"{dst}/lora_{ab}", "T")]
        rules.append(Rule(f"{src}.base_layer.weight", f"{dst}/kernel", "T"))  # newer peft's base weight
    return rules


def minigpt4_video_table(config: MiniGPT4VideoConfig) -> list:
    return [*with_prefix(eva_lavis_table(config.vision), "vision/"),
            Rule("llama_proj.weight", "llama_proj/kernel", "T"), Rule("llama_proj.bias", "llama_proj/bias"),
            *decoder_table(config.llm, prefix=f"{PEFT}model.", dst_prefix="llm/", lm_head=f"{PEFT}lm_head.weight"),
            *lora_rules(config)]
