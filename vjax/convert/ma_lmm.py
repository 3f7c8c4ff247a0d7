"""Weight layouts of MA-LMM: transformers ``InstructBlipVideoForConditionalGeneration`` (the plain
InstructBLIP-video path, ``memory_bank=False``) and the official LAVIS checkpoint layout.

    vjax                     transformers                          MA-LMM (LAVIS)
    vision/vit, ln_vision    vision_model.*, post_layernorm        visual_encoder.*, ln_vision.*
    qformer/*                qformer.*, query_tokens               Qformer.bert.*, query_tokens
    qformer/frame_position   (none)                                image_pe.weight        (memory bank only)
    llm_proj                 language_projection                   llm_proj
    llm/*                    language_model.{model.*, lm_head}     llm_model.{model.*, lm_head}

Source of the key names: spec_qformer_family.md §1.1-1.3, §4.5, §5 (and a ``save_pretrained`` of
transformers 5.23). The official fine-tuned files hold trainable parameters only: load them with
``strict=False`` over EVA (``eva_vit_g.pth``) and the Vicuna folder.
"""

from __future__ import annotations

from vjax.convert.decoder import decoder_table
from vjax.convert.encoders import eva_hf_table, eva_lavis_table
from vjax.convert.mapping import Rule, with_prefix
from vjax.convert.qformer import qformer_hf_table, qformer_lavis_table
from vjax.models.ma_lmm import MALMMConfig


def _proj(src: str) -> list[Rule]:
    return [Rule(f"{src}.weight", "llm_proj/kernel", "T"), Rule(f"{src}.bias", "llm_proj/bias")]


def ma_lmm_hf_table(config: MALMMConfig) -> list:
    """transformers ``InstructBlipVideoForConditionalGeneration`` keys (a config with ``memory_bank=False``:
    the transformers model has no ``image_pe``)."""
    if config.memory_bank:
        raise ValueError("the transformers layout has no image_pe: use a config with memory_bank=False")
    return [*with_prefix(eva_hf_table(config.vision, prefix="vision_model."), "vision/"),
            *qformer_hf_table(config.qformer, prefix="qformer.", dst_prefix="qformer/"),
            *_proj("language_projection"),
            *decoder_table(config.llm, prefix="language_model.model.", dst_prefix="llm/",
                           lm_head="language_model.lm_head.weight")]


def ma_lmm_lavis_table(config: MALMMConfig) -> list:
    """The official MA-LMM / LAVIS InstructBLIP state dict (``visual_encoder.``, ``Qformer.bert.``,
    ``llm_model.``); ``image_pe.weight`` with the memory bank."""
    image_pe = "image_pe.weight" if config.memory_bank else None
    return [*with_prefix(eva_lavis_table(config.vision), "vision/"),
            *qformer_lavis_table(config.qformer, dst_prefix="qformer/", image_pe=image_pe),
            *_proj("llm_proj"),
            *decoder_table(config.llm, prefix="llm_model.model.", dst_prefix="llm/",
                           lm_head="llm_model.lm_head.weight")]
