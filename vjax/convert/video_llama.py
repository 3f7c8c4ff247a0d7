"""Weight layout of Video-LLaMA (v1 and Video-LLaMA-2): the official model's state-dict names.

    vjax                                  Video-LLaMA (``video_llama/models/video_llama.py``)
    vision/vit, vision/ln_vision          visual_encoder.*, ln_vision.*          (eva_vit_g.pth / BLIP-2)
    qformer/*                             Qformer.bert.*, query_tokens           (blip2_pretrained_flant5xxl.pth)
    video_frame_position_embedding        video_frame_position_embedding.weight  (VL checkpoint)
    video_qformer/*                       video_Qformer.bert.*, video_query_tokens
    llama_proj                            llama_proj
    audio_encoder/*                       audio_encoder.modality_*.audio.*       (imagebind_huge.pth)
    audio_position_embedding              audio_position_embedding.weight        (AL checkpoint)
    audio_qformer/*                       audio_Qformer.bert.*, audio_query_tokens
    audio_llama_proj                      audio_llama_proj
    llm/*                                 llama_model.{model.*, lm_head.weight}  (HF LLM folder)

Key names: spec_qformer_family.md §1.1-1.3, §2.1, §2.6. The released VL_* / AL_* files hold only the
trained modules (and ``*.bert.embeddings.position_ids`` buffers, accepted and dropped): load each with
``strict=False`` and merge the trees. The text parts of the BLIP-2 Q-Former (word/position embeddings,
text FFN, ``Qformer.cls``) are accepted and dropped, as Video-LLaMA deletes them.
"""

from __future__ import annotations

from vjax.convert.decoder import decoder_table
from vjax.convert.encoders import eva_lavis_table, imagebind_audio_table
from vjax.convert.mapping import Rule, with_prefix
from vjax.convert.qformer import qformer_lavis_table
from vjax.models.video_llama import VideoLLaMAConfig


def _linear(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/kernel", "T"), Rule(f"{src}.bias", f"{dst}/bias")]


def video_llama_table(config: VideoLLaMAConfig, llm_prefix: str = "llama_model.") -> list:
    """Rules for the whole model; ``llm_prefix=""`` reads the LLM from its own HF folder (``model.*``)."""
    rules = [
        *with_prefix(eva_lavis_table(config.vision), "vision/"),
        *qformer_lavis_table(config.image_qformer, dst_prefix="qformer/"),
        Rule("video_frame_position_embedding.weight", "video_frame_position_embedding/embedding"),
        *qformer_lavis_table(config.video_qformer, prefix="video_Qformer.bert.", query_tokens="video_query_tokens",
                             dst_prefix="video_qformer/"),
        *_linear("llama_proj", "llama_proj"),
    ]
    if config.audio_branch:
        rules += [
            *with_prefix(imagebind_audio_table(config.audio, prefix="audio_encoder."), "audio_encoder/"),
            Rule("audio_position_embedding.weight", "audio_position_embedding/embedding"),
            *qformer_lavis_table(config.audio_qformer, prefix="audio_Qformer.bert.", query_tokens="audio_query_tokens",
                                 dst_prefix="audio_qformer/"),
            *_linear("audio_llama_proj", "audio_llama_proj"),
        ]
    return rules + decoder_table(config.llm, prefix=f"{llm_prefix}model.", dst_prefix="llm/",
                                 lm_head=f"{llm_prefix}lm_head.weight")
