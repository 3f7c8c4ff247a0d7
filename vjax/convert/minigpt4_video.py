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

Converting a release (``python -m experiments.convert``)::

    python -m experiments.convert --model=minigpt4_video --variant=minigpt4_video_llama2 --dst=OUT \
        --src=eva_vit_g.pth,Llama-2-7b-chat-hf,video_llama_checkpoint_last.pth [--merge_lora]

* The released ``.pth`` is a LAVIS runner checkpoint: its ``model`` entry (``llama_proj`` + LoRA) is read
  (:class:`vjax.convert.lavis.RunnerCheckpointSource`).
* Bare ``eva_vit_g.pth`` keys go under ``visual_encoder.``; the HF LLM folder's ``model.*`` / ``lm_head.weight``
  under ``llama_model.base_model.model.`` (:func:`vjax.convert.lavis.component_key`); or say so with
  ``visual_encoder.=eva_vit_g.pth`` / ``llama_model.base_model.model.=LLM_DIR``.
* ``ln_vision`` is in no released file: MiniGPT4-video loads no BLIP-2 checkpoint and freezes it at its
  initialisation, LayerNorm gamma 1, beta 0 (spec §3.1), which :func:`defaults` supplies (logged).
* ``--merge_lora`` folds ``W + (alpha / r) A B`` into the base kernels (:func:`vjax.layers.lora.merge_lora`)
  and writes a model with ``llm.lora_rank = 0``.
* Variants: ``minigpt4_video_llama2`` (Llama-2-7b-chat), ``minigpt4_video_mistral`` (Mistral-7B-Instruct-v0.2).
"""

from __future__ import annotations

from vjax.convert.decoder import decoder_table
from vjax.convert.encoders import eva_lavis_table
from vjax.convert.lavis import component_key, layer_norm_init, no_config_json
from vjax.convert.layout import Layout
from vjax.convert.mapping import Rule, with_prefix
from vjax.models.minigpt4_video import MiniGPT4VideoConfig

PEFT = "llama_model.base_model.model."
VARIANTS = ("minigpt4_video_llama2", "minigpt4_video_mistral")
canonical_key = component_key(PEFT)
config_from_hf = no_config_json("MiniGPT4-video", VARIANTS)


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


def layout_table(config: MiniGPT4VideoConfig, keys=None) -> list:
    return minigpt4_video_table(config)


def defaults(config: MiniGPT4VideoConfig) -> dict:
    """``ln_vision`` as constructed: no MiniGPT4-video file holds it (spec §3.1)."""
    return layer_norm_init("ln_vision", config.vision.width) if config.vision.post_norm else {}


def layout() -> Layout:
    return Layout("minigpt4_video", config_from_hf, layout_table, canonical_key, defaults=defaults,
                  hint="MiniGPT4-video is released in pieces: python -m experiments.convert --model=minigpt4_video "
                       "--variant=minigpt4_video_llama2 --src=eva_vit_g.pth,LLM_DIR,video_llama_checkpoint_last.pth")
