"""Model registry: a name -> the model file that declares its :class:`~vjax.models.spec.ModelSpec` as ``SPEC``.

Registering a model is one line here; everything else about it lives in its file's spec. Files are imported
lazily (``spec(name)``), so importing the registry costs nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping

_MODELS: dict[str, str] = {
    "decoder": "vjax.models.decoder",
    "video_chatgpt": "vjax.models.video_chatgpt",
    "chat_univi": "vjax.models.chat_univi",
    "qwen2_vl": "vjax.models.qwen2_vl",
    "video_llama": "vjax.models.video_llama",
    "ma_lmm": "vjax.models.ma_lmm",
    "minigpt4_video": "vjax.models.minigpt4_video",
    "cogvlm2_video": "vjax.models.cogvlm2_video",
    "llava_next_video": "vjax.models.llava_next_video",
}


def names() -> list[str]:
    """Registered model names."""
    return sorted(_MODELS)


def spec(name: str):
    """The :class:`~vjax.models.spec.ModelSpec` of a registered model name."""
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {names()}")
    s = importlib.import_module(_MODELS[name]).SPEC
    if s.name != name:
        raise ValueError(f"{_MODELS[name]}.SPEC is named {s.name!r}, registered as {name!r}")
    return s


def get(name: str) -> tuple[type, type]:
    """``(ConfigClass, ModuleClass)`` for a registered model name."""
    s = spec(name)
    return s.config, s.module


def tokens_per_clip(name: str, variant: str = "tiny") -> int:
    """Visual tokens one clip costs the LLM context at a model's settings (``Config.num_visual_tokens``)."""
    cfg_cls, _ = get(name)
    if not hasattr(cfg_cls, variant):
        raise KeyError(f"{name} has no variant {variant!r}")
    return int(getattr(cfg_cls, variant)().num_visual_tokens)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dict of a (nested) frozen config dataclass."""
    return dataclasses.asdict(config)


def _restore(tp: Any, value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_restore(None, v) for v in value)
    if isinstance(value, Mapping) and dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value)
    return value


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Inverse of :func:`config_to_dict`; unknown keys are an error naming them."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known: {sorted(fields)}")
    kw = {}
    for k, v in data.items():
        tp = fields[k].type
        sub = getattr(cls, "_nested_configs", {}).get(k)
        kw[k] = config_from_dict(sub, v) if sub is not None and isinstance(v, Mapping) else _restore(tp, v)
    return cls(**kw)
