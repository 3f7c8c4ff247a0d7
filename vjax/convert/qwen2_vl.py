"""Weight layout of Qwen2-VL-2B/7B(-Instruct): the released safetensors (``visual.*``, ``model.*``,
``lm_head.weight``) and the layout transformers 5 writes (``model.visual.*``,
``model.language_model.*``). Both are read; export writes the released layout."""

from __future__ import annotations

from vjax.convert.decoder import decoder_table
from vjax.convert.encoders import qwen2_vl_vision_table
from vjax.convert.mapping import with_prefix
from vjax.models.qwen2_vl import Qwen2VLConfig


def qwen2_vl_table(config: Qwen2VLConfig, layout: str = "release") -> list:
    """``layout``: ``"release"`` (Qwen's files) or ``"transformers5"`` (``save_pretrained`` of transformers 5)."""
    if layout == "release":
        vision, llm = "visual.", "model."
    elif layout == "transformers5":
        vision, llm = "model.visual.", "model.language_model."
    else:
        raise ValueError(f"unknown Qwen2-VL layout {layout!r}; use 'release' or 'transformers5'")
    return [*with_prefix(qwen2_vl_vision_table(config.vision, prefix=vision), "visual/"),
            *decoder_table(config.llm, prefix=llm, dst_prefix="llm/")]


def detect_layout(keys) -> str:
    """Which layout a set of checkpoint keys uses."""
    return "transformers5" if any(k.startswith("model.language_model.") for k in keys) else "release"
