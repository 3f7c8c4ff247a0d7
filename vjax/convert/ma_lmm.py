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

Converting a release (``python -m experiments.convert``), sources in the official loading order (EVA at
init, the LLM, ``load_pretrained`` of InstructBLIP, then the fine-tuned checkpoint replacing what it holds)::

    python -m experiments.convert --model=ma_lmm --variant=ma_lmm_vicuna7b --dst=OUT \
        --src=eva_vit_g.pth,vicuna-7b,instruct_blip_vicuna7b_trimmed.pth,msrvtt_qa/checkpoint_best.pth

* Both ``.pth`` files are LAVIS runner checkpoints: their ``model`` entry is read
  (:class:`vjax.convert.lavis.RunnerCheckpointSource`).
* Bare ``eva_vit_g.pth`` keys go under ``visual_encoder.``; the Vicuna folder's ``model.*`` /
  ``lm_head.weight`` under ``llm_model.`` (:func:`vjax.convert.lavis.component_key`); or
  ``visual_encoder.=eva_vit_g.pth`` / ``llm_model.=VICUNA_DIR``.
* Vicuna-7B v1.1 has 32000 rows; MA-LMM adds ``[PAD]`` (``resize_token_embeddings``, 32001): the new row of
  the embedding and the LM head is filled with the mean of the others (:class:`~vjax.convert.mapping.PadRows`;
  the official row is random, and ``[PAD]`` is never attended to). The CLI logs the padding.
* ``image_pe`` (memory bank only) comes from a fine-tuned checkpoint; zero-shot (InstructBLIP weights alone)
  it keeps its zero initialisation (:func:`defaults`, logged). A config with ``memory_bank=False`` drops it.
"""

from __future__ import annotations

import numpy as np

from vjax.convert.decoder import decoder_table
from vjax.convert.encoders import eva_hf_table, eva_lavis_table
from vjax.convert.lavis import component_key, no_config_json
from vjax.convert.layout import Layout
from vjax.convert.mapping import PadRows, Rule, Skip, with_prefix
from vjax.convert.qformer import qformer_hf_table, qformer_lavis_table
from vjax.models.ma_lmm import MALMMConfig

VARIANTS = ("ma_lmm_vicuna7b", "ma_lmm_caption")
canonical_key = component_key("llm_model.")
config_from_hf = no_config_json("MA-LMM", VARIANTS)


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


def layout_table(config: MALMMConfig, keys=None) -> list:
    """:func:`ma_lmm_lavis_table` for a release: the LLM's rows padded to ``config.llm.vocab_size`` (``[PAD]``),
    ``image_pe`` dropped by name when the config has no memory bank."""
    rows = config.llm.vocab_size
    out = [PadRows(r.src, r.dst, rows, r.transform)
           if isinstance(r, Rule) and r.src in ("llm_model.model.embed_tokens.weight", "llm_model.lm_head.weight")
           else r for r in ma_lmm_lavis_table(config)]
    return out if config.memory_bank else [*out, Skip("image_pe.weight")]


def defaults(config: MALMMConfig) -> dict:
    """``image_pe`` as constructed (zeros; spec §4.1) for zero-shot use without a fine-tuned checkpoint."""
    if not config.memory_bank:
        return {}
    return {"image_pe.weight": np.zeros((config.max_num_frames, config.vision.width), np.float32)}


def layout() -> Layout:
    return Layout("ma_lmm", config_from_hf, layout_table, canonical_key, defaults=defaults,
                  hint="MA-LMM is released in pieces: python -m experiments.convert --model=ma_lmm "
                       "--variant=ma_lmm_vicuna7b --src=eva_vit_g.pth,VICUNA_DIR,instruct_blip_vicuna7b_trimmed.pth,"
                       "checkpoint_best.pth")
