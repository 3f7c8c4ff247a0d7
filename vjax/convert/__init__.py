"""PyTorch/safetensors checkpoints <-> vjax parameters, one declarative table per layout.

``HF_ARCHITECTURES`` maps an HF ``config.json`` architecture to the vjax model name, the config
builder and the mapping table used by :func:`vjax.from_pretrained` and ``experiments.convert``.
"""

from __future__ import annotations

from typing import Any, Callable

from vjax.convert.io import (  # noqa: F401
    CheckpointError,
    UnsafeCheckpointError,
    checkpoint_files,
    open_checkpoint,
    save_safetensors,
    save_sharded_safetensors,
)
from vjax.convert.mapping import ConversionError, Rule, Skip, Split, convert, export  # noqa: F401


def _decoder_entry():
    from vjax.convert.decoder import decoder_table  # noqa: PLC0415
    from vjax.models.decoder import DecoderConfig  # noqa: PLC0415

    return "decoder", DecoderConfig.from_hf, decoder_table


# HF architecture name -> factory of (vjax model name, config-from-hf, table-from-config)
HF_ARCHITECTURES: dict[str, Callable[[], tuple[str, Callable[..., Any], Callable[..., Any]]]] = {
    "LlamaForCausalLM": _decoder_entry,
    "MistralForCausalLM": _decoder_entry,
    "Qwen2ForCausalLM": _decoder_entry,
}

HF_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_entry(hf_config: dict) -> tuple[str, Callable[..., Any], Callable[..., Any]]:
    """The vjax entry for an HF ``config.json`` dict; a clear error for unsupported architectures."""
    archs = hf_config.get("architectures") or []
    for a in archs:
        if a in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[a]()
    if not archs and hf_config.get("model_type") in HF_MODEL_TYPES:  # config.json without "architectures"
        return HF_ARCHITECTURES[HF_MODEL_TYPES[hf_config["model_type"]]]()
    raise ValueError(
        f"unsupported architecture {archs or hf_config.get('model_type')!r} in config.json; "
        f"vjax converts {sorted(HF_ARCHITECTURES)}"
    )
