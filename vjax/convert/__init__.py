"""PyTorch/safetensors checkpoints <-> vjax parameters, one declarative table per layout.

A :class:`Layout` says, for one vjax model, how a released checkpoint is read: the config builder
(from the ``config.json`` files found among the sources and the tensor shapes), the canonical key
spelling (aliases of the same tensor in different releases), the mapping table, and — where an HF
layout exists — ``to_hf`` for export. ``LAYOUTS`` is keyed by vjax model name (``experiments.convert
--model=``); ``HF_ARCHITECTURES`` maps an HF ``config.json`` architecture to its layout
(:func:`vjax.from_pretrained`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Mapping, Sequence

from vjax.convert.io import (  # noqa: F401
    CheckpointError,
    OverlaySource,
    UnsafeCheckpointError,
    checkpoint_files,
    open_checkpoint,
    save_safetensors,
    save_sharded_safetensors,
)
from vjax.convert.mapping import ConversionError, PadRows, Rule, Skip, Split, convert, export  # noqa: F401


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one vjax model reads (and writes) its released checkpoints.

    Attributes:
      model: vjax registry name.
      config_from_hf: ``(config.json dicts, {key: shape}) -> Config``.
      table: ``(config, checkpoint keys) -> rules`` over canonical key names.
      canonical_key: renames a key to the spelling the table uses (``None``: keys are used as they are).
      to_hf: ``config -> config.json dict`` for ``export_hf`` (``None``: no HF export).
      hint: appended to errors (e.g. which further source a partial checkpoint needs).
      defaults: ``config -> {canonical key: array}``: tensors the official model keeps at their initial
        value when no released file holds them (read first, so any source replaces them).
    """

    model: str
    config_from_hf: Callable[..., Any]
    table: Callable[..., list]
    canonical_key: Callable[[str], str] | None = None
    to_hf: Callable[[Any], dict] | None = None
    hint: str = ""
    defaults: Callable[[Any], dict] | None = None

    def __iter__(self):  # ``name, from_hf, table_fn = hf_entry(cfg)`` keeps working
        return iter((self.model, self.config_from_hf, self.table))


def _decoder() -> Layout:
    from vjax.convert.decoder import decoder_table  # noqa: PLC0415
    from vjax.models.decoder import DecoderConfig  # noqa: PLC0415

    def cfg(configs, shapes=None, **kw):
        return DecoderConfig.from_hf(configs if isinstance(configs, Mapping) else next(iter(configs)), **kw)

    return Layout("decoder", cfg, lambda config, keys=None: decoder_table(config), to_hf=lambda c: c.to_hf())


def _qwen2_vl() -> Layout:
    from vjax.convert import qwen2_vl as m  # noqa: PLC0415

    return Layout("qwen2_vl", m.config_from_hf,
                  lambda config, keys=None: m.qwen2_vl_table(config, m.detect_layout(keys or ())), to_hf=m.to_hf)


def _cogvlm2_video() -> Layout:
    from vjax.convert import cogvlm2_video as m  # noqa: PLC0415

    return Layout("cogvlm2_video", m.config_from_hf, m.cogvlm2_video_table)


def _chat_univi() -> Layout:
    from vjax.convert import chat_univi as m  # noqa: PLC0415

    return Layout("chat_univi", m.config_from_hf, m.chat_univi_table, m.canonical_key, m.to_hf,
                  hint="Chat-UniVi releases may omit the CLIP tower: add the openai/clip-vit-large-patch14 "
                       "directory as a further source (python -m experiments.convert --src=MODEL_DIR,CLIP_DIR)")


def _video_chatgpt() -> Layout:
    from vjax.convert import video_chatgpt as m  # noqa: PLC0415

    return Layout("video_chatgpt", m.config_from_hf, m.video_chatgpt_table, m.canonical_key, m.to_hf,
                  hint="Video-ChatGPT is released in three pieces: python -m experiments.convert "
                       "--model=video_chatgpt --src=LLAVA_DIR,CLIP_DIR,video_chatgpt-7B.bin")


def _lavis(model: str, hint: str) -> Layout:
    """Video-LLaMA, MiniGPT4-video, MA-LMM: released in pieces, no config of their own, initial values."""
    m = importlib.import_module(f"vjax.convert.{model}")
    return Layout(model, m.config_from_hf, m.layout_table, m.canonical_key, defaults=m.defaults, hint=hint)


_video_llama = functools.partial(
    _lavis, "video_llama", "Video-LLaMA is released in pieces: python -m experiments.convert --model=video_llama "
    "--variant=video_llama2_7b --src=eva_vit_g.pth,blip2_pretrained_flant5xxl.pth,imagebind_huge.pth,LLM_DIR,"
    "VL_*.pth,AL_*.pth")
_minigpt4_video = functools.partial(
    _lavis, "minigpt4_video", "MiniGPT4-video is released in pieces: python -m experiments.convert "
    "--model=minigpt4_video --variant=minigpt4_video_llama2 --src=eva_vit_g.pth,LLM_DIR,video_llama_checkpoint_last.pth")
_ma_lmm = functools.partial(
    _lavis, "ma_lmm", "MA-LMM is released in pieces: python -m experiments.convert --model=ma_lmm "
    "--variant=ma_lmm_vicuna7b --src=eva_vit_g.pth,VICUNA_DIR,instruct_blip_vicuna7b_trimmed.pth,checkpoint_best.pth")


LAYOUTS: dict[str, Callable[[], Layout]] = {
    "decoder": _decoder,
    "qwen2_vl": _qwen2_vl,
    "cogvlm2_video": _cogvlm2_video,
    "chat_univi": _chat_univi,
    "video_chatgpt": _video_chatgpt,
    "video_llama": _video_llama,
    "minigpt4_video": _minigpt4_video,
    "ma_lmm": _ma_lmm,
}

# HF architecture name -> layout factory
HF_ARCHITECTURES: dict[str, Callable[[], Layout]] = {
    "LlamaForCausalLM": _decoder,
    "MistralForCausalLM": _decoder,
    "Qwen2ForCausalLM": _decoder,
    "Qwen2VLForConditionalGeneration": _qwen2_vl,
    "CogVLMVideoForCausalLM": _cogvlm2_video,
    "ChatUniViLlamaForCausalLM": _chat_univi,
    "VideoChatGPTLlamaForCausalLM": _video_chatgpt,
}

HF_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen2_vl": "Qwen2VLForConditionalGeneration", "ChatUniVi": "ChatUniViLlamaForCausalLM",
                  "VideoChatGPT": "VideoChatGPTLlamaForCausalLM"}


def hf_entry(hf_config: Mapping[str, Any]) -> Layout:
    """The :class:`Layout` of an HF ``config.json`` dict; a clear error for unsupported architectures."""
    archs = hf_config.get("architectures") or []
    for a in archs:
        if a in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[a]()
    mt = hf_config.get("model_type")
    if mt in HF_MODEL_TYPES and (not archs or mt in ("ChatUniVi", "VideoChatGPT", "qwen2_vl")):
        return HF_ARCHITECTURES[HF_MODEL_TYPES[mt]]()
    raise ValueError(
        f"unsupported architecture {archs or mt!r} in config.json; vjax converts {sorted(HF_ARCHITECTURES)} "
        f"(and, from several sources, python -m experiments.convert --model={sorted(LAYOUTS)})"
    )


def layout(model: str) -> Layout:
    """The :class:`Layout` of a vjax model name."""
    if model not in LAYOUTS:
        raise KeyError(f"no checkpoint layout for model {model!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[model]()


DEFAULTS_LABEL = "initial values"


def combine(sources: Sequence[tuple[str, str, Any]], lay: Layout, config: Any = None) -> OverlaySource:
    """Sources (``(label, key prefix, TensorSource)``, in loading order) as one, keys made canonical.

    With ``config`` and a layout that has ``defaults``, those come first (labelled :data:`DEFAULTS_LABEL`),
    so every source replaces them."""
    if config is not None and lay.defaults is not None:
        from vjax.convert.lavis import ArraySource  # noqa: PLC0415

        init = lay.defaults(config)
        if init:
            sources = [(DEFAULTS_LABEL, "", ArraySource(init)), *sources]
    return OverlaySource(sources, rename=lay.canonical_key)
