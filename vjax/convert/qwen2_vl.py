"""Weight layout of Qwen2-VL-2B/7B(-Instruct): the released safetensors (``visual.*``, ``model.*``,
``lm_head.weight``) and the layout transformers 5 writes (``model.visual.*``,
``model.language_model.*``). Both are read; export writes the released layout."""

from __future__ import annotations

from vjax.convert.decoder import decoder_table
from vjax.convert.encoders import qwen2_vl_merger_table, qwen2_vl_vision_table
from vjax.convert.layout import Layout
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
    return [*with_prefix(qwen2_vl_vision_table(config.vision, prefix=vision), "vision/"),
            *with_prefix(qwen2_vl_merger_table(prefix=vision), "merger/"),
            *decoder_table(config.llm, prefix=llm, dst_prefix="llm/")]


def detect_layout(keys) -> str:
    """Which layout a set of checkpoint keys uses."""
    return "transformers5" if any(k.startswith("model.language_model.") for k in keys) else "release"


HF_ARCHITECTURE = "Qwen2VLForConditionalGeneration"


def config_from_hf(configs, shapes=None, **kw) -> Qwen2VLConfig:
    cfg = configs if isinstance(configs, dict) else next(iter(configs))
    return Qwen2VLConfig.from_hf(cfg, **kw)


def to_hf(config: Qwen2VLConfig) -> dict:
    """The released ``config.json`` layout (text keys at top level, ``rope_scaling`` of type ``mrope``),
    which transformers 4.45+ and 5.x both read."""
    llm, v = config.llm, config.vision
    hf = {k: val for k, val in llm.to_hf().items() if k not in ("rope_parameters", "rope_scaling", "head_dim")}
    hf.update(architectures=[HF_ARCHITECTURE], model_type="qwen2_vl",
              rope_scaling={"type": "mrope", "mrope_section": list(llm.mrope_section or ())},
              image_token_id=config.image_token_id, video_token_id=config.video_token_id,
              vision_start_token_id=config.vision_start_token_id,
              vision_end_token_id=config.vision_start_token_id + 1,
              vision_config=dict(depth=v.depth, embed_dim=v.width, mlp_ratio=v.mlp_dim // v.width if v.mlp_dim % v.width == 0 else v.mlp_dim / v.width, num_heads=v.num_heads,
                                 in_chans=v.in_channels, in_channels=v.in_channels, hidden_size=v.out_dim,
                                 patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
                                 temporal_patch_size=v.temporal_patch_size, hidden_act=v.act))
    return hf


def layout() -> Layout:
    def table(config, keys=None):
        return qwen2_vl_table(config, detect_layout(keys or ()))

    return Layout("qwen2_vl", config_from_hf, table, to_hf=to_hf)
