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

Converting a release (``python -m experiments.convert``), sources in the official loading order — later
files replace earlier ones, as the official ``load_state_dict(strict=False)`` calls do::

    python -m experiments.convert --model=video_llama --variant=video_llama2_7b --dst=OUT --src=\
        eva_vit_g.pth,blip2_pretrained_flant5xxl.pth,imagebind_huge.pth,llama-2-7b-chat-hf,\
        VL_LLaMA_2_7B_Finetuned.pth,AL_LLaMA_2_7B_Finetuned.pth

* ``VL_*.pth`` / ``AL_*.pth`` / ``blip2_pretrained_flant5xxl.pth`` are LAVIS runner checkpoints: their
  ``model`` entry is read, the optimizer state ignored (:class:`vjax.convert.lavis.RunnerCheckpointSource`).
* Bare component files are recognised by their keys (:func:`vjax.convert.lavis.component_key`): EVA keys go
  under ``visual_encoder.``, ImageBind's ``modality_*`` under ``audio_encoder.``, the HF LLM folder's
  ``model.*`` / ``lm_head.weight`` under ``llama_model.``. ``visual_encoder.=eva_vit_g.pth``,
  ``audio_encoder.=imagebind_huge.pth``, ``llama_model.=LLM_DIR`` say the same explicitly.
* ``imagebind_huge.pth`` holds all six modalities: the audio ones are read, the vision, text, depth,
  thermal and IMU ones are dropped by name (:data:`IMAGEBIND_OTHER_MODALITIES`; the CLI logs them).
  ``t5_proj`` / ``t5_model`` of the BLIP-2 FlanT5 checkpoint, if present, are dropped likewise.
* ``ln_vision`` is taken from the BLIP-2 checkpoint; without it, the official model keeps LayerNorm's
  initialisation (gamma 1, beta 0), which :func:`defaults` supplies (logged when used).
* Variants: ``video_llama_vicuna7b`` (v1, ``finetune-vicuna7b-v2.pth`` + ``finetune_vicuna7b_audiobranch.pth``,
  Vicuna-7B v0 folder), ``video_llama2_7b``, ``video_llama2_13b``.
"""

from __future__ import annotations

from vjax.convert.decoder import decoder_table
from vjax.convert.encoders import eva_lavis_table, imagebind_audio_table
from vjax.convert.lavis import component_key, layer_norm_init, no_config_json
from vjax.convert.layout import Layout
from vjax.convert.mapping import Rule, Skip, with_prefix
from vjax.convert.qformer import qformer_lavis_table
from vjax.models.video_llama import VideoLLaMAConfig

VARIANTS = ("video_llama_vicuna7b", "video_llama2_7b", "video_llama2_13b")
IMAGEBIND_OTHER_MODALITIES = tuple(
    f"audio_encoder.modality_{part}.{m}.**" for m in ("vision", "text", "depth", "thermal", "imu")
    for part in ("preprocessors", "trunks", "heads", "postprocessors"))
BLIP2_T5 = ("t5_proj.weight", "t5_proj.bias", "t5_model.**")  # the FlanT5 side of the BLIP-2 checkpoint
canonical_key = component_key("llama_model.", audio="audio_encoder.")
config_from_hf = no_config_json("Video-LLaMA", VARIANTS)


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


def layout_table(config: VideoLLaMAConfig, keys=None) -> list:
    """:func:`video_llama_table` plus the tensors of the released files that Video-LLaMA does not use,
    dropped by name: ImageBind's other modalities and BLIP-2's T5 side."""
    skips = [*IMAGEBIND_OTHER_MODALITIES] if config.audio_branch else ["audio_encoder.**"]
    return [*video_llama_table(config), *(Skip(s) for s in (*skips, *BLIP2_T5))]


def defaults(config: VideoLLaMAConfig) -> dict:
    """``ln_vision`` as constructed (used only when no source holds it)."""
    return layer_norm_init("ln_vision", config.vision.width) if config.vision.post_norm else {}


def layout() -> Layout:
    return Layout("video_llama", config_from_hf, layout_table, canonical_key, defaults=defaults,
                  hint="Video-LLaMA is released in pieces: python -m experiments.convert --model=video_llama "
                       "--variant=video_llama2_7b --src=eva_vit_g.pth,blip2_pretrained_flant5xxl.pth,"
                       "imagebind_huge.pth,LLM_DIR,VL_*.pth,AL_*.pth")
