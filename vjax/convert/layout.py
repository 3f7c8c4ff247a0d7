"""How one vjax model reads (and writes) its released checkpoints: the :class:`Layout` each conversion module
returns from its ``layout()`` (the module a model's spec names, ``ModelSpec.conversion``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


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
