"""Weight layouts of the encoder towers: one declarative table per released layout.

| table | layout | key prefix |
|---|---|---|
| :func:`clip_hf_table` | transformers ``CLIPVisionModel`` (``openai/clip-vit-large-patch14[-336]``) | ``vision_model.`` |
| :func:`eva_hf_table` | transformers ``Blip2VisionModel`` (``post_layernorm`` = ``ln_vision``) | ``vision_model.`` |
| :func:`eva_lavis_table` | LAVIS ``eva_vit_g.pth`` / BLIP-2 checkpoints | ``visual_encoder.`` + ``ln_vision.`` |
| :func:`eva2_cogvlm2_table` | CogVLM2(-Video) safetensors | ``model.vision.`` |
| :func:`qwen2_vl_vision_table` | Qwen2-VL safetensors (``visual.``; transformers 5.x saves ``model.visual.``) | ``visual.`` |
| :func:`imagebind_audio_table` | ``imagebind_huge.pth`` audio modality | ``modality_*.audio.`` |

torch ``Linear.weight [out, in]`` -> vjax ``kernel [in, out]`` (``"T"``); conv ``[O, I, *K]`` ->
``[*K, I, O]`` (``"conv"``); fused q/k/v projections are split in row order ``[q | k | v]``.
Layout quirks handled by the two rule kinds below:

* :class:`Squeeze` — cls tokens, positions and boi/eoi are stored with leading singleton axes
  (``(1, 1, D)``, ``(1, N, D)``); vjax keeps ``[D]`` / ``[N, D]``.
* :class:`SplitDropping` — ``Blip2VisionModel`` keeps one ``qkv.bias`` of ``3D`` whose middle (k) third is
  a parameter, while EVA (LAVIS) has no k bias at all (a constant zero). A key bias adds ``q . b_k`` to
  every logit of a query row, which softmax cancels, so dropping it is exact; export writes zeros.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from vjax.convert.mapping import Rule, Skip, Split
from vjax.models.encoders import EncoderConfig


@dataclasses.dataclass(frozen=True)
class Squeeze:
    """A torch tensor of ``ndim`` axes whose leading ``ndim - keep`` axes are singletons <-> a vjax
    parameter of its last ``keep`` axes (e.g. ``cls_token (1, 1, D) <-> [D]``)."""

    src: str
    dst: tuple[str, ...]
    ndim: int
    keep: int

    @property
    def dsts(self) -> tuple[str, ...]:
        return self.dst

    def plan(self, shape: tuple, fields) -> list[tuple[str, tuple]]:
        path = self.dst[0].format(**fields)
        lead = len(shape) - self.keep
        if len(shape) != self.ndim or any(s != 1 for s in shape[:lead]):
            return [(path, ("squeeze", tuple(shape)))]  # never a real shape: reported as a mismatch
        return [(path, tuple(shape[lead:]))]

    def load(self, x: np.ndarray) -> list[np.ndarray]:
        return [x.reshape(x.shape[x.ndim - self.keep:])]

    def export(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        x = parts[0]
        return x.reshape((1,) * (self.ndim - x.ndim) + tuple(x.shape))


def squeeze(src: str, dst: str, ndim: int, keep: int) -> Squeeze:
    """:class:`Squeeze` rule: torch ``src`` with ``ndim`` axes <-> vjax ``dst`` with its last ``keep`` axes."""
    return Squeeze(src, (dst,), ndim, keep)


@dataclasses.dataclass(frozen=True)
class SplitDropping:
    """One fused torch tensor split along ``axis`` by ``sizes``; parts with ``keep[i] = False`` are dropped on
    load and written as zeros on export. ``dst`` names the kept parts in order."""

    src: str
    dst: tuple[str, ...]
    sizes: tuple[int, ...]
    keep: tuple[bool, ...]
    axis: int = 0

    @property
    def dsts(self) -> tuple[str, ...]:
        return self.dst

    def plan(self, shape: tuple, fields) -> list[tuple[str, tuple]]:
        kept = [n for n, k in zip(self.sizes, self.keep) if k]
        out = []
        for d, n in zip(self.dst, kept):
            s = list(shape)
            if sum(self.sizes) != shape[self.axis]:
                out.append((d.format(**fields), ("split", tuple(shape), self.sizes)))
                continue
            s[self.axis] = n
            out.append((d.format(**fields), tuple(s)))
        return out

    def load(self, x: np.ndarray) -> list[np.ndarray]:
        parts = np.split(x, np.cumsum(self.sizes)[:-1], axis=self.axis)
        return [p for p, k in zip(parts, self.keep) if k]

    def export(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        it = iter(parts)
        full = []
        ref = parts[0]
        for n, k in zip(self.sizes, self.keep):
            if k:
                full.append(next(it))
            else:
                s = list(ref.shape)
                s[self.axis] = n
                full.append(np.zeros(s, ref.dtype))
        return np.concatenate(full, axis=self.axis)


Table = list


def _qkv(src_w: str, src_b: str | None, blk: str, d: int, bias: tuple[bool, bool, bool]) -> Table:
    """Fused ``[q | k | v]`` weight (and bias) rows -> ``attn/{q,k,v}_proj``."""
    names = ("q_proj", "k_proj", "v_proj")
    rules: Table = [Split(src_w, tuple(f"{blk}/attn/{n}/kernel" for n in names), (d, d, d), 0, "T")]
    if src_b is not None:
        if all(bias):
            rules.append(Split(src_b, tuple(f"{blk}/attn/{n}/bias" for n in names), (d, d, d)))
        else:
            rules.append(SplitDropping(src_b, tuple(f"{blk}/attn/{n}/bias" for n, b in zip(names, bias) if b),
                                       (d, d, d), bias))
    return rules


def _linear(src: str, dst: str, bias: bool = True) -> Table:
    rules: Table = [Rule(f"{src}.weight", f"{dst}/kernel", "T")]
    if bias:
        rules.append(Rule(f"{src}.bias", f"{dst}/bias"))
    return rules


def _norm(src: str, dst: str) -> Table:
    return [Rule(f"{src}.weight", f"{dst}/scale"), Rule(f"{src}.bias", f"{dst}/bias")]


def _block(src: str, *, norm1: str, norm2: str, out: str, fc1: str = "mlp.fc1", fc2: str = "mlp.fc2") -> Table:
    """Norms, output projection and MLP of block ``{i}`` (q/k/v are layout-specific)."""
    blk = "vit/blocks_{i}"
    return [*_norm(f"{src}.{norm1}", f"{blk}/norm1"), *_norm(f"{src}.{norm2}", f"{blk}/norm2"),
            *_linear(f"{src}.{out}", f"{blk}/attn/o_proj"), *_linear(f"{src}.{fc1}", f"{blk}/mlp/fc1"),
            *_linear(f"{src}.{fc2}", f"{blk}/mlp/fc2")]


# ----------------------------------------------------------------------------- CLIP (HF)
def clip_hf_table(config: EncoderConfig, prefix: str = "vision_model.") -> Table:
    """transformers ``CLIPVisionModel`` (keys of ``openai/clip-vit-large-patch14[-336]``)."""
    p, layer = prefix, f"{prefix}encoder.layers.{{i}}"
    rules: Table = [
        Rule(f"{p}embeddings.class_embedding", "vit/cls_token"),
        Rule(f"{p}embeddings.patch_embedding.weight", "vit/patch_embed/kernel", "conv"),
        Rule(f"{p}embeddings.position_embedding.weight", "vit/pos_embed"),
        *_norm(f"{p}pre_layrnorm", "vit/pre_norm"),
        *_norm(f"{p}post_layernorm", "post_layernorm"),
        *_block(layer, norm1="layer_norm1", norm2="layer_norm2", out="self_attn.out_proj"),
        Skip(f"{p}embeddings.position_ids"),  # buffer in older checkpoints
    ]
    for n in ("q_proj", "k_proj", "v_proj"):
        rules += _linear(f"{layer}.self_attn.{n}", f"vit/blocks_{{i}}/attn/{n}")
    return rules


# ----------------------------------------------------------------------------- EVA ViT-g (BLIP-2)
def eva_hf_table(config: EncoderConfig, prefix: str = "vision_model.") -> Table:
    """transformers ``Blip2VisionModel`` / ``InstructBlipVisionModel``; ``post_layernorm`` is ``ln_vision``."""
    p, layer, d = prefix, f"{prefix}encoder.layers.{{i}}", config.width
    return [
        squeeze(f"{p}embeddings.class_embedding", "vit/cls_token", 3, 1),
        squeeze(f"{p}embeddings.position_embedding", "vit/pos_embed", 3, 2),
        Rule(f"{p}embeddings.patch_embedding.weight", "vit/patch_embed/kernel", "conv"),
        Rule(f"{p}embeddings.patch_embedding.bias", "vit/patch_embed/bias"),
        *_qkv(f"{layer}.self_attn.qkv.weight", f"{layer}.self_attn.qkv.bias", "vit/blocks_{i}", d, config.qkv_bias),
        *_block(layer, norm1="layer_norm1", norm2="layer_norm2", out="self_attn.projection"),
        *_norm(f"{p}post_layernorm", "ln_vision"),
    ]


def eva_lavis_table(config: EncoderConfig, prefix: str = "visual_encoder.", ln_prefix: str = "ln_vision.") -> Table:
    """LAVIS ``VisionTransformer`` (``eva_vit_g.pth``; inside BLIP-2/Video-LLaMA/MA-LMM as ``visual_encoder.``)
    plus BLIP-2's ``ln_vision``. Pass ``prefix=""`` for the bare ``eva_vit_g.pth`` state dict."""
    p, blk, d = prefix, f"{prefix}blocks.{{i}}", config.width
    rules: Table = [
        squeeze(f"{p}cls_token", "vit/cls_token", 3, 1),
        squeeze(f"{p}pos_embed", "vit/pos_embed", 3, 2),
        Rule(f"{p}patch_embed.proj.weight", "vit/patch_embed/kernel", "conv"),
        Rule(f"{p}patch_embed.proj.bias", "vit/patch_embed/bias"),
        *_qkv(f"{blk}.attn.qkv.weight", None, "vit/blocks_{i}", d, config.qkv_bias),
        *_block(blk, norm1="norm1", norm2="norm2", out="attn.proj"),
    ]
    for name, flag in zip(("q", "k", "v"), config.qkv_bias):
        if flag:
            rules.append(Rule(f"{blk}.attn.{name}_bias", f"vit/blocks_{{i}}/attn/{name}_proj/bias"))
    if config.post_norm:
        rules += _norm(ln_prefix.rstrip("."), "ln_vision")
    return rules


# ----------------------------------------------------------------------------- EVA2-CLIP-E (CogVLM2)
def eva2_cogvlm2_table(config: EncoderConfig, prefix: str = "model.vision.") -> Table:
    """CogVLM2 remote-code ``EVA2CLIPModel`` (``visual.py``) trunk keys, as in the released safetensors (its
    adapter: :func:`eva2_cogvlm2_adapter_table`)."""
    p, layer, d = prefix, f"{prefix}transformer.layers.{{i}}", config.width
    return [
        Rule(f"{p}patch_embedding.proj.weight", "vit/patch_embed/kernel", "conv"),
        Rule(f"{p}patch_embedding.proj.bias", "vit/patch_embed/bias"),
        squeeze(f"{p}patch_embedding.cls_embedding", "vit/cls_token", 2, 1),
        Rule(f"{p}patch_embedding.position_embedding.weight", "vit/pos_embed"),
        *_qkv(f"{layer}.attention.query_key_value.weight", f"{layer}.attention.query_key_value.bias",
              "vit/blocks_{i}", d, (True, True, True)),
        *_block(layer, norm1="input_layernorm", norm2="post_attention_layernorm", out="attention.dense"),
    ]


def eva2_cogvlm2_adapter_table(prefix: str = "model.vision.") -> Table:
    """CogVLM2's vision head after the trunk (``conv``, ``linear_proj``, ``boi``/``eoi`` of ``visual.py``) ->
    :class:`vjax.models.cogvlm2_video.CogVLM2Adapter` parameters."""
    p = prefix
    return [
        Rule(f"{p}conv.weight", "conv/kernel", "conv"),
        Rule(f"{p}conv.bias", "conv/bias"),
        Rule(f"{p}linear_proj.linear_proj.weight", "glu/linear_proj/kernel", "T"),
        *_norm(f"{p}linear_proj.norm1", "glu/norm1"),
        Rule(f"{p}linear_proj.gate_proj.weight", "glu/mlp/gate_proj/kernel", "T"),
        Rule(f"{p}linear_proj.dense_h_to_4h.weight", "glu/mlp/up_proj/kernel", "T"),
        Rule(f"{p}linear_proj.dense_4h_to_h.weight", "glu/mlp/down_proj/kernel", "T"),
        squeeze(f"{p}boi", "boi", 3, 1),
        squeeze(f"{p}eoi", "eoi", 3, 1),
    ]


# ----------------------------------------------------------------------------- Qwen2-VL
def qwen2_vl_vision_table(config: EncoderConfig, prefix: str = "visual.") -> Table:
    """Qwen2-VL ``visual.*`` trunk (released safetensors; ``prefix="model.visual."`` for transformers-5 saves;
    the merger: :func:`qwen2_vl_merger_table`)."""
    p, blk, d = prefix, f"{prefix}blocks.{{i}}", config.width
    return [
        Rule(f"{p}patch_embed.proj.weight", "vit/patch_embed/kernel", "conv"),
        *_qkv(f"{blk}.attn.qkv.weight", f"{blk}.attn.qkv.bias", "vit/blocks_{i}", d, (True, True, True)),
        *_block(blk, norm1="norm1", norm2="norm2", out="attn.proj"),
        Skip(f"{p}rotary_pos_emb.inv_freq"),
    ]


def qwen2_vl_merger_table(prefix: str = "visual.") -> Table:
    """Qwen2-VL's ``visual.merger.*`` -> :class:`vjax.models.qwen2_vl.PatchMerger` parameters."""
    return [*_norm(f"{prefix}merger.ln_q", "ln_q"), *_linear(f"{prefix}merger.mlp.0", "mlp_0"),
            *_linear(f"{prefix}merger.mlp.2", "mlp_2")]


# ----------------------------------------------------------------------------- ImageBind audio
def imagebind_audio_table(config: EncoderConfig, prefix: str = "") -> Table:
    """ImageBind(-Huge) audio modality keys (``imagebind_huge.pth``; ``audio_encoder.`` inside Video-LLaMA).

    The checkpoint holds every modality: load the audio tower from it with ``strict=False``. The fixed
    ``log_logit_scale`` buffer (ln 20, not learnable) is accepted and dropped: ``config.logit_scale`` holds it.
    """
    pre, trunk = f"{prefix}modality_preprocessors.audio.", f"{prefix}modality_trunks.audio.blocks.{{i}}"
    head, d = f"{prefix}modality_heads.audio.", config.width
    return [
        Rule(f"{pre}rgbt_stem.proj.weight", "vit/patch_embed/kernel", "conv"),
        *_norm(f"{pre}rgbt_stem.norm_layer", "vit/patch_norm"),
        squeeze(f"{pre}cls_token", "vit/cls_token", 3, 1),
        squeeze(f"{pre}pos_embedding_helper.pos_embed", "vit/pos_embed", 3, 2),
        *_qkv(f"{trunk}.attn.in_proj_weight", f"{trunk}.attn.in_proj_bias", "vit/blocks_{i}", d, (True, True, True)),
        squeeze(f"{trunk}.attn.bias_k", "vit/blocks_{i}/attn/bias_k", 3, 1),
        squeeze(f"{trunk}.attn.bias_v", "vit/blocks_{i}/attn/bias_v", 3, 1),
        *_block(trunk, norm1="norm_1", norm2="norm_2", out="attn.out_proj"),
        *_norm(f"{head}0", "head_norm"),
        Rule(f"{head}2.weight", "head_proj/kernel", "T"),
        Skip(f"{prefix}modality_postprocessors.audio.1.log_logit_scale"),
    ]


TABLES = {
    "clip_hf": clip_hf_table,
    "eva_hf": eva_hf_table,
    "eva_lavis": eva_lavis_table,
    "eva2_cogvlm2": eva2_cogvlm2_table,
    "qwen2_vl": qwen2_vl_vision_table,
    "imagebind_audio": imagebind_audio_table,
}
