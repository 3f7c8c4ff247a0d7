"""PyTorch/safetensors checkpoints <-> vjax parameters, one declarative table per layout.

A :class:`Layout` says, for one vjax model, how a released checkpoint is read: the config builder
(from the ``config.json`` files found among the sources and the tensor shapes), the canonical key
spelling (aliases of the same tensor in different releases), the mapping table, and — where an HF
layout exists — ``to_hf`` for export. Each model's spec names the module whose ``layout()`` returns it
(``ModelSpec.conversion``) and the ``config.json`` architectures it reads (:func:`layout`, :func:`hf_entry`;
``experiments.convert --model=``, :func:`vjax.from_pretrained`).
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, Mapping, Sequence

from vjax.convert.io import (  # noqa: F401
    CheckpointError,
    OverlaySource,
    UnsafeCheckpointError,
    checkpoint_files,
    open_checkpoint,
    save_safetensors,
    save_sharded_safetensors,
)
from vjax.convert.layout import Layout  # noqa: F401
from vjax.convert.mapping import ConversionError, PadRows, Rule, Skip, Split, convert, export  # noqa: F401


def layout(model: str) -> Layout:
    """The :class:`Layout` of a vjax model name (the ``layout()`` of the module its spec names)."""
    from vjax.models import registry  # noqa: PLC0415

    try:
        spec = registry.spec(model)
    except KeyError:
        raise KeyError(f"no checkpoint layout for model {model!r}; known: {layout_names()}") from None
    if not spec.conversion:
        raise KeyError(f"model {model!r} declares no checkpoint layout; known: {layout_names()}")
    return importlib.import_module(spec.conversion).layout()


def layout_names() -> list[str]:
    """Models that can be converted from released checkpoints."""
    from vjax.models import registry  # noqa: PLC0415

    return [n for n in registry.names() if registry.spec(n).conversion]


def hf_entry(hf_config: Mapping[str, Any]) -> Layout:
    """The :class:`Layout` of an HF ``config.json`` dict: the model whose spec lists one of its
    ``architectures``, else one that claims its ``model_type`` (``hf_model_types``; generic decoder types only
    when no architecture is named); a clear error for anything else."""
    from vjax.models import registry  # noqa: PLC0415

    specs = [registry.spec(n) for n in registry.names()]
    archs = hf_config.get("architectures") or []
    mt = hf_config.get("model_type")
    for s in specs:
        if any(a in s.hf_architectures for a in archs):
            return layout(s.name)
    for s in specs:
        if mt in s.hf_model_types or (not archs and mt in s.hf_bare_model_types):
            return layout(s.name)
    known = sorted(a for s in specs for a in s.hf_architectures)
    raise ValueError(
        f"unsupported architecture {archs or mt!r} in config.json; vjax converts {known} "
        f"(and, from several sources, python -m experiments.convert --model={layout_names()})"
    )


PROCESSOR_FILES = ("preprocessor_config", "video_preprocessor_config")


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of an HF checkpoint directory, with the processor files released beside it
    (``preprocessor_config.json``, ``video_preprocessor_config.json``) under the keys of their names without
    ``.json``, so a model's ``Config.from_hf`` takes its preprocessing from the release (Qwen2-VL's pixel
    bounds and fps); a processor file that is not a JSON object is a ``ValueError`` naming it."""
    d = os.fspath(directory)
    with open(os.path.join(d, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    for name in PROCESSOR_FILES:
        path = os.path.join(d, f"{name}.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                value = json.load(f)
            if not isinstance(value, dict):
                raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
            cfg[name] = value
    return cfg


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
