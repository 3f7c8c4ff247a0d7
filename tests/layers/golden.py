"""Helpers shared by the golden-vector layer tests: read a case, feed its tensors to a conversion table."""

from __future__ import annotations

import json
import pathlib
from typing import Mapping

import numpy as np
from safetensors.numpy import load_file

from vjax.convert.io import TensorSource

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "golden"


class DictSource(TensorSource):
    """In-memory tensors under torch key names (what a checkpoint file would hold)."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        super().__init__()
        self._tensors = dict(tensors)
        self._where = {k: ("", tuple(np.shape(v))) for k, v in self._tensors.items()}

    def get(self, key: str) -> np.ndarray:
        return np.asarray(self._tensors[key])


def load_case(folder: str, case: str) -> tuple[dict[str, np.ndarray], dict]:
    """``(tensors, meta)`` of ``tests/golden/<folder>/case_<case>.{safetensors,json}``."""
    base = GOLDEN / folder / f"case_{case}"
    return load_file(str(base) + ".safetensors"), json.loads((base.parent / (base.name + ".json")).read_text())


def with_prefix(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The tensors whose name starts with ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
