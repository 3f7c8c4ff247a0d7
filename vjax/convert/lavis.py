"""Reading the LAVIS-family releases (Video-LLaMA, MiniGPT4-video, MA-LMM): runner checkpoints, bare component
files, and the tensors the official models take from their own initialisation.

Three things these releases share (spec_qformer_family.md §2.6, §3.5, §4.5):

* **Runner checkpoints.** LAVIS' ``_save_checkpoint`` writes ``{"model": state, "optimizer": ..., "config": ...,
  "scaler": ..., "epoch": n}`` where ``state`` holds only the parameters that trained (and persistent
  buffers). :class:`RunnerCheckpointSource` reads such a file as ``state`` alone — keys exactly as the model
  names them (``video_Qformer.bert...``), not ``model.video_Qformer...`` — and records what it ignored
  (the optimizer's moment tensors, scaler, config, epoch) in ``notes``. Any other ``.pth`` reads as
  :class:`vjax.convert.io.TorchSource` does (nested dicts flattened with dots).
* **Bare component files**, whose keys lack the prefix the model gives them. :func:`component_key` places them
  by their first name: ``eva_vit_g.pth`` (``cls_token``, ``pos_embed``, ``patch_embed.*``, ``blocks.*``) under
  ``visual_encoder.``; ``imagebind_huge.pth`` (``modality_*``) under the audio prefix; an HF LLM folder
  (``model.*``, ``lm_head.weight``) under the model's LLM attribute. A ``PREFIX=PATH`` source
  (``python -m experiments.convert``) spells the same placement out; a prefixed key is left as it is.
* **Initial values.** A frozen module that no released file holds keeps its PyTorch initialisation in the
  official model (e.g. MiniGPT4-video's ``ln_vision``: LayerNorm gamma 1, beta 0). A layout's ``defaults``
  supplies those as the first source, so any file that does hold them replaces them (and the CLI logs which
  defaults were used).
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Mapping

import numpy as np

from vjax.convert.io import TensorSource, TorchSource, _flatten

EVA_KEYS = ("cls_token", "pos_embed", "patch_embed.", "blocks.")
HF_LLM_KEYS = ("model.", "lm_head.")


def is_runner_checkpoint(obj) -> bool:
    """``{"model": {...}, "optimizer": ..., "epoch": ...}`` (LAVIS ``RunnerBase._save_checkpoint``, or a bare
    ``{"model": {...}}``): a nested ``model`` dict beside no top-level tensors. A flat state dict (an HF
    ``.bin``, ``eva_vit_g.pth``) has tensors at the top level and no nested ``model`` dict."""
    import torch  # noqa: PLC0415

    return (isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping)
            and not any(isinstance(v, torch.Tensor) for v in obj.values()))


class RunnerCheckpointSource(TorchSource):
    """``.pth`` files read with ``torch.load(weights_only=True)``; a LAVIS runner checkpoint contributes its
    ``model`` entry only (``notes`` says what else it held). Other files: every tensor, nested dicts flattened."""

    def __init__(self, files: Iterable[str | os.PathLike]):
        self.notes: list[str] = []
        super().__init__(files)

    def _state_dict(self, obj, path):
        if not is_runner_checkpoint(obj):
            return obj
        import torch  # noqa: PLC0415

        def count(tree) -> int:
            flat: dict = {}
            _flatten(tree, "", flat)
            return sum(isinstance(v, torch.Tensor) for v in flat.values())

        ignored = [f"{name!r} ({count({name: obj[name]})} tensor(s))" if count({name: obj[name]}) else repr(name)
                   for name in sorted(k for k in obj if k != "model")]
        self.notes.append(f"{path}: LAVIS training checkpoint: the {count(obj['model'])} tensor(s) of its 'model' "
                          f"entry are read; ignored: {', '.join(ignored) or 'nothing else'}")
        return obj["model"]


class ArraySource(TensorSource):
    """In-memory arrays under torch key names (a layout's initial values)."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        super().__init__()
        self._tensors = dict(tensors)
        self._where = {k: ("", tuple(np.shape(v))) for k, v in self._tensors.items()}

    def get(self, key: str) -> np.ndarray:
        return np.array(self._tensors[key])


def component_key(llm: str, vision: str = "visual_encoder.", audio: str | None = None) -> Callable[[str], str]:
    """The canonical-key function of a LAVIS-family layout: bare EVA keys go under ``vision``, bare ImageBind
    keys (``modality_*``) under ``audio`` (when given), HF LLM keys (``model.*``, ``lm_head.*``) under ``llm``;
    every other key (the model's own names, or a ``PREFIX=``-placed one) is kept."""

    def rename(key: str) -> str:
        if key in EVA_KEYS[:2] or key.startswith(EVA_KEYS[2:]):
            return vision + key
        if audio is not None and key.startswith("modality_"):
            return audio + key
        if key.startswith(HF_LLM_KEYS):
            return llm + key
        return key

    return rename


def layer_norm_init(name: str, width: int) -> dict[str, np.ndarray]:
    """``torch.nn.LayerNorm(width)`` as constructed: weight 1, bias 0."""
    return {f"{name}.weight": np.ones(width, np.float32), f"{name}.bias": np.zeros(width, np.float32)}


def no_config_json(model: str, variants: Iterable[str]) -> Callable:
    """``config_from_hf`` of a layout whose releases ship no config of their own: a clear error."""

    def config_from_hf(configs=None, shapes=None, **kw):
        raise ValueError(f"{model} releases carry no config of their own (the LLM folder's config.json describes "
                         f"only the LLM): pass --variant (one of {', '.join(variants)}) or --config_file "
                         f"(a vjax config JSON)")

    return config_from_hf
