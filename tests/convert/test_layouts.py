"""Every released checkpoint layout, at the published size, maps completely onto the vjax parameters.

A manifest (tensor name -> shape) is written per released file: from the transformers model on the
``meta`` device where one exists (LLaMA, CLIP, Qwen2-VL), else from the spec's key lists
(spec_vit_family.md §2.6, §3.8, §4.7, §5.9). The files are combined in the official loading order
(:func:`vjax.convert.combine`: later files replace keys of earlier ones, aliases made canonical) and planned
against ``abstract_params`` of the published variant: every tensor must land in exactly one parameter of
the right shape, every parameter must be provided, and nothing is read.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import transformers

from vjax.convert import combine, hf_entry, layout
from vjax.convert.io import TensorSource
from vjax.convert.mapping import flatten_params, plan_conversion
from vjax.models import registry
from vjax.pretrained import abstract_params


class Manifest(TensorSource):
    """Names and shapes only (nothing to read)."""

    def __init__(self, shapes: dict):
        super().__init__()
        self._where = {k: ("manifest", tuple(s)) for k, s in shapes.items()}


def meta_shapes(model_cls, config, prefix: str = "") -> dict:
    with torch.device("meta"):
        m = model_cls(config)
    return {prefix + k: tuple(p.shape) for k, p in m.named_parameters()}


# ----------------------------------------------------------------------------- released files
CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                patch_size=14, image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)


@functools.lru_cache(maxsize=None)
def clip_dir() -> dict:
    """``openai/clip-vit-large-patch14``: a full CLIPModel (text tower too) + old position_ids buffers."""
    cfg = transformers.CLIPConfig(vision_config=CLIP_L14, text_config=dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768),
        projection_dim=768)
    shapes = meta_shapes(transformers.CLIPModel, cfg)
    assert any(k.startswith("text_model.") for k in shapes) and "vision_model.pre_layrnorm.weight" in shapes
    return {**shapes, "vision_model.embeddings.position_ids": (1, 257), "text_model.embeddings.position_ids": (1, 77)}


@functools.lru_cache(maxsize=None)
def clip_vision_keys(prefix: str) -> dict:
    return meta_shapes(transformers.CLIPVisionModel, transformers.CLIPVisionConfig(**CLIP_L14), prefix)


LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32)


@functools.lru_cache(maxsize=None)
def llama_dir(vocab: int, **kw) -> dict:
    return meta_shapes(transformers.LlamaForCausalLM, transformers.LlamaConfig(vocab_size=vocab, **{**LLAMA_7B, **kw}))


def projector(d_llm=4096, d_vis=1024) -> dict:
    return {"model.mm_projector.weight": (d_llm, d_vis), "model.mm_projector.bias": (d_llm,)}


def video_chatgpt_files() -> list:
    """LLaVA-Lightning-7B-v1-1 (vocab 32003, old rotary buffers, LLaVA's projector), CLIP, video_chatgpt-7B.bin."""
    llava = {**llama_dir(32003), **projector(),
             **{f"model.layers.{i}.self_attn.rotary_emb.inv_freq": (64,) for i in range(32)}}
    vcg_bin = {**projector(), "model.embed_tokens.weight": (32006, 4096)}
    return [("llava", llava), ("clip", clip_dir()), ("video_chatgpt-7B.bin", vcg_bin)]


def chat_univi_files(size: str, with_tower: bool) -> list:
    kw = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
              num_key_value_heads=40) if size == "13b" else {}
    model = {**llama_dir(32000, **kw), **projector(5120 if size == "13b" else 4096)}
    if with_tower:
        return [("chat_univi", {**model, **clip_vision_keys("model.vision_tower.vision_tower.vision_model.")})]
    return [("chat_univi", model), ("clip", clip_dir())]


def cogvlm2_video_files() -> list:
    """spec_vit_family.md §4.7, written out."""
    s = {"model.embed_tokens.weight": (128256, 4096), "model.norm.weight": (4096,), "lm_head.weight": (128256, 4096)}
    for i in range(32):
        p = f"model.layers.{i}."
        s.update({p + "input_layernorm.weight": (4096,), p + "post_attention_layernorm.weight": (4096,),
                  p + "self_attn.language_expert_query_key_value.weight": (6144, 4096),
                  p + "self_attn.language_expert_dense.weight": (4096, 4096),
                  p + "mlp.language_mlp.gate_proj.weight": (14336, 4096),
                  p + "mlp.language_mlp.up_proj.weight": (14336, 4096),
                  p + "mlp.language_mlp.down_proj.weight": (4096, 14336)})
    v = "model.vision."
    s.update({v + "patch_embedding.proj.weight": (1792, 3, 14, 14), v + "patch_embedding.proj.bias": (1792,),
              v + "patch_embedding.cls_embedding": (1, 1792), v + "patch_embedding.position_embedding.weight": (257, 1792),
              v + "conv.weight": (1792, 1792, 2, 2), v + "conv.bias": (1792,),
              v + "linear_proj.linear_proj.weight": (4096, 1792), v + "linear_proj.norm1.weight": (4096,),
              v + "linear_proj.norm1.bias": (4096,), v + "linear_proj.gate_proj.weight": (14336, 4096),
              v + "linear_proj.dense_h_to_4h.weight": (14336, 4096), v + "linear_proj.dense_4h_to_h.weight": (4096, 14336),
              v + "boi": (1, 1, 4096), v + "eoi": (1, 1, 4096)})
    for j in range(63):
        p = f"{v}transformer.layers.{j}."
        for n, shape in (("input_layernorm", (1792,)), ("post_attention_layernorm", (1792,)),
                         ("attention.query_key_value", (5376, 1792)), ("attention.dense", (1792, 1792)),
                         ("mlp.fc1", (15360, 1792)), ("mlp.fc2", (1792, 15360))):
            s[p + n + ".weight"] = shape
            s[p + n + ".bias"] = (shape[0],)
    return [("cogvlm2-video-llama3-chat", s)]


QWEN2_VL = {
    "qwen2_vl_7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                        num_key_value_heads=4, tie_word_embeddings=False),
    "qwen2_vl_2b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                        num_key_value_heads=2, tie_word_embeddings=True),
}


def qwen2_vl_hf_config(variant: str) -> transformers.Qwen2VLConfig:
    t = QWEN2_VL[variant]
    return transformers.Qwen2VLConfig(
        text_config=dict(num_hidden_layers=28, rms_norm_eps=1e-6, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
                         **t),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=t["hidden_size"], mlp_ratio=4, num_heads=16,
                           in_chans=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        tie_word_embeddings=t["tie_word_embeddings"])


def qwen2_vl_files(variant: str, released: bool) -> list:
    """transformers 5 names (``model.visual.``, ``model.language_model.``) or the released ones."""
    shapes = meta_shapes(transformers.Qwen2VLForConditionalGeneration, qwen2_vl_hf_config(variant))
    if released:
        shapes = {("visual." + k[len("model.visual."):] if k.startswith("model.visual.") else
                   "model." + k[len("model.language_model."):] if k.startswith("model.language_model.") else k): s
                  for k, s in shapes.items()}
    return [(variant, shapes)]


# (model, published variant, files, published parameter count rounded as the release states it)
CASES = {
    "video_chatgpt_7b": ("video_chatgpt", "video_chatgpt_7b", video_chatgpt_files, None),
    "chat_univi_7b_with_tower": ("chat_univi", "chat_univi_7b", lambda: chat_univi_files("7b", True), None),
    "chat_univi_7b_plus_clip": ("chat_univi", "chat_univi_7b", lambda: chat_univi_files("7b", False), None),
    "chat_univi_13b_plus_clip": ("chat_univi", "chat_univi_13b", lambda: chat_univi_files("13b", False), None),
    "cogvlm2_video": ("cogvlm2_video", "cogvlm2_video_llama3_chat", cogvlm2_video_files, (12.5, 1)),
    "qwen2_vl_7b_released": ("qwen2_vl", "qwen2_vl_7b", lambda: qwen2_vl_files("qwen2_vl_7b", True), (8.29, 2)),
    "qwen2_vl_7b_transformers5": ("qwen2_vl", "qwen2_vl_7b", lambda: qwen2_vl_files("qwen2_vl_7b", False), (8.29, 2)),
    "qwen2_vl_2b_released": ("qwen2_vl", "qwen2_vl_2b", lambda: qwen2_vl_files("qwen2_vl_2b", True), (2.21, 2)),
}


@functools.lru_cache(maxsize=None)
def expected_shapes(model: str, variant: str) -> dict:
    config_cls, module_cls = registry.get(model)
    params = abstract_params(module_cls(getattr(config_cls, variant)()))
    return {k: tuple(v.shape) for k, v in flatten_params(params).items()}


def plan_case(case: str, edit=None):
    model, variant, files, _ = CASES[case]
    lay = layout(model)
    manifests = files()
    if edit is not None:
        manifests = edit(manifests)
    source = combine([(label, "", Manifest(shapes)) for label, shapes in manifests], lay)
    shapes = {k: source.shape(k) for k in source.keys()}
    config_cls, _ = registry.get(model)
    table = lay.table(getattr(config_cls, variant)(), list(shapes))
    return plan_conversion(shapes, table, expected_shapes(model, variant)), source, shapes


@pytest.mark.parametrize("case", sorted(CASES))
def test_published_layout_maps_completely(case):
    model, variant, _, published = CASES[case]
    plan, source, shapes = plan_case(case)
    assert (plan.missing, plan.unexpected, plan.mismatched) == ([], [], [])
    want = expected_shapes(model, variant)
    # every parameter is written exactly once, with all of its elements
    landed: dict[str, int] = {}
    for key, rule, fields in plan.assignments:
        for path, shape in rule.plan(shapes[key], fields):
            landed[path] = landed.get(path, 0) + 1
            assert tuple(shape) == want[path], (key, path)
    assert set(landed) == set(want) and set(landed.values()) == {1}
    n = sum(int(np.prod(s)) for s in want.values())
    if published is not None:
        assert round(n / 1e9, published[1]) == published[0], n


def test_video_chatgpt_later_files_replace_earlier_ones():
    plan, source, shapes = plan_case("video_chatgpt_7b")
    replaced = {(k, old, new) for k, old, new in source.overridden}
    assert replaced == {("model.mm_projector.weight", "llava", "video_chatgpt-7B.bin"),
                        ("model.mm_projector.bias", "llava", "video_chatgpt-7B.bin"),
                        ("model.embed_tokens.weight", "llava", "video_chatgpt-7B.bin")}
    assert source.origin("model.embed_tokens.weight") == "video_chatgpt-7B.bin"
    assert shapes["lm_head.weight"] == (32003, 4096)  # LLaVA's head, padded to 32006 rows on load
    head = next(rule for key, rule, _ in plan.assignments if key == "lm_head.weight")
    assert type(head).__name__ == "PadRows" and head.rows == 32006


def test_chat_univi_tower_inside_the_model_and_clip_dir_are_the_same_parameters():
    _, source, _ = plan_case("chat_univi_7b_with_tower")
    assert "vision_model.encoder.layers.23.mlp.fc2.weight" in source.keys()
    assert not any(k.startswith("model.vision_tower") for k in source.keys())


@pytest.mark.parametrize("case", ["video_chatgpt_7b", "cogvlm2_video", "qwen2_vl_2b_released"])
def test_a_missing_or_extra_tensor_fails_loudly(case):
    def drop(ms):
        label, shapes = ms[0]
        victim = sorted(k for k in shapes if "layers.3." in k and k.endswith(".weight"))[0]
        return [(label, {k: v for k, v in shapes.items() if k != victim}), *ms[1:]], victim

    dropped = {}

    def edit_drop(ms):
        out, dropped["key"] = drop(ms)
        return out

    plan, _, _ = plan_case(case, edit_drop)
    assert len(plan.missing) == 1 and plan.missing[0].startswith(dropped["key"]) and not plan.unexpected

    def edit_extra(ms):
        label, shapes = ms[-1]
        return [*ms[:-1], (label, {**shapes, "model.layers.3.self_attn.extra.weight": (4, 4)})]

    plan, _, _ = plan_case(case, edit_extra)
    assert plan.unexpected == ["model.layers.3.self_attn.extra.weight"] and not plan.missing


def test_hf_config_json_of_each_release_builds_the_published_config():
    """config.json -> registered layout -> Config.from_hf equals the published variant where it matters."""
    cases = {
        "qwen2_vl_7b": {**qwen2_vl_hf_config("qwen2_vl_7b").to_dict(), "architectures": ["Qwen2VLForConditionalGeneration"]},
        "cogvlm2_video_llama3_chat": dict(
            architectures=["CogVLMVideoForCausalLM"], vocab_size=128256, hidden_size=4096, intermediate_size=14336,
            num_hidden_layers=32, num_attention_heads=32, num_multi_query_heads=8, max_position_embeddings=2048,
            rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001, pad_token_id=128002,
            vision_config=dict(image_size=224, patch_size=14, hidden_size=1792, num_hidden_layers=63, num_heads=16,
                               intermediate_size=15360, layer_norm_eps=1e-6, in_channels=3)),
        "chat_univi_7b": {**transformers.LlamaConfig(vocab_size=32000, **LLAMA_7B, rms_norm_eps=1e-5).to_dict(),
                          "architectures": ["ChatUniViLlamaForCausalLM"], "model_type": "ChatUniVi",
                          "mm_vision_select_layer": -2, "config": {"spatial_cluster_rate0": 64,
                                                                   "spatial_cluster_rate1": 32,
                                                                   "spatial_cluster_rate2": 16}},
    }
    for variant, hf in cases.items():
        lay = hf_entry(hf)
        config_cls, _ = registry.get(lay.model)
        got, want = lay.config_from_hf(hf, {}), getattr(config_cls, variant)()
        assert abstract_shapes(lay.model, got) == expected_shapes(lay.model, variant), variant
        assert got.llm.rope_theta == want.llm.rope_theta and got.llm.rms_norm_eps == want.llm.rms_norm_eps


def abstract_shapes(model, config):
    _, module_cls = registry.get(model)
    return {k: tuple(v.shape) for k, v in flatten_params(abstract_params(module_cls(config))).items()}
