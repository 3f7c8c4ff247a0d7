"""Encoder towers against their references, through the converter tables under the reference key names.

* CLIP ViT-L/14 (224/336)  vs transformers ``CLIPVisionModel``          (penultimate features, pooled CLS)
* EVA ViT-g + ln_vision    vs transformers ``Blip2VisionModel``          (HF and LAVIS key layouts)
* EVA2-CLIP-E trunk + CogVLM2-Video's conv + GLU adapter vs golden vectors of CogVLM2's ``visual.py``
  (tests/golden/eva2_clip_e)
* Qwen2-VL vision trunk + Qwen2-VL's patch merger vs ``Qwen2VLForConditionalGeneration.model.visual``
  (2 images + 1 video packed)
* ImageBind audio encoder  vs a torch transcription of spec_qformer_family §2.1 written below
Tolerance: max |Δ| <= 1e-4 in float32. Published sizes: parameter names/shapes and counts.
"""

from __future__ import annotations

import functools
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from vjax.convert.encoders import (
    clip_hf_table,
    eva2_cogvlm2_adapter_table,
    eva2_cogvlm2_table,
    eva_hf_table,
    eva_lavis_table,
    imagebind_audio_table,
    qwen2_vl_merger_table,
    qwen2_vl_vision_table,
)
from vjax.convert.io import SafetensorsSource, TorchSource, save_safetensors
from vjax.convert.mapping import (
    ConversionError,
    convert,
    export,
    export_plan,
    flatten_params,
    plan_conversion,
    with_prefix,
)
from vjax.models.cogvlm2_video import CogVLM2Adapter
from vjax.models.encoders import Encoder, EncoderConfig, qwen2_vl_vision_inputs
from vjax.models.qwen2_vl import PatchMerger
from vjax.pretrained import abstract_params


class TowerThenHead(nn.Module):
    """A trunk followed by the head its model puts after it (CogVLM2-Video's adapter, Qwen2-VL's merger), as
    the models compose them; ``features`` of the output is what the LLM consumes."""

    config: EncoderConfig

    def setup(self):
        c = self.config
        self.vision = Encoder(c)
        self.head = CogVLM2Adapter(c) if c.tower == "eva2" else PatchMerger(c.out_dim, c.spatial_merge_size,
                                                                             c.merger_eps)

    def __call__(self, inputs, grid_thw=None, **kw):
        out = self.vision(inputs, grid_thw, **kw)
        head = self.head(out.features) if self.config.tower == "eva2" else self.head(out.features[None])[0]
        return out.replace(features=head)

    def example_inputs(self):
        return Encoder(self.config, parent=None).example_inputs()


def tower_then_head_table(config: EncoderConfig, prefix: str) -> list:
    """The trunk's and the head's tables under ``TowerThenHead``'s parameter names."""
    if config.tower == "eva2":
        return [*with_prefix(eva2_cogvlm2_table(config, prefix), "vision/"),
                *with_prefix(eva2_cogvlm2_adapter_table(prefix), "head/")]
    return [*with_prefix(qwen2_vl_vision_table(config, prefix), "vision/"),
            *with_prefix(qwen2_vl_merger_table(prefix), "head/")]

TOL = 1e-4
GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "golden" / "eva2_clip_e"


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial norms and biases so that every parameter matters (eval mode, float32)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias") or name.endswith("bias_k") or name.endswith("bias_v"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def torch_source(state: dict, tmp_path: pathlib.Path, name: str = "model.safetensors") -> SafetensorsSource:
    """Save a state dict as safetensors (under its own key names) and open it lazily."""
    path = tmp_path / name
    save_safetensors({k: v.detach().numpy() for k, v in state.items()}, path)
    return SafetensorsSource([path])


def load_tower(config: EncoderConfig, source, table, module: nn.Module | None = None) -> tuple[nn.Module, dict]:
    module = Encoder(config) if module is None else module
    params = convert(source, table, abstract_params(module))
    return module, jax.tree_util.tree_map(jnp.asarray, params)


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


# ============================================================================ CLIP
CLIP_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=14,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5)


@functools.lru_cache(maxsize=None)
def tiny_clip(image_size: int):
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(image_size=image_size, **CLIP_TINY)
    cfg._attn_implementation = "eager"
    return perturb_(transformers.CLIPVisionModel(cfg))


@pytest.mark.parametrize("image_size,variant", [(28, "clip_vit_l14_224"), (42, "clip_vit_l14_336")])
def test_clip_matches_transformers(image_size, variant, tmp_path):
    hf = tiny_clip(image_size)
    # transformers 5.x saves CLIPVisionModel without the "vision_model." prefix of the released files
    released = {f"vision_model.{k}": v for k, v in hf.state_dict().items()}
    config = getattr(EncoderConfig, variant)(image_size=image_size, width=32, depth=3, num_heads=4, mlp_dim=64)
    module, params = load_tower(config, torch_source(released, tmp_path), clip_hf_table(config))
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True)
    out = module.apply({"params": params}, nhwc(x))
    err = max_err(out.features, ref.hidden_states[-2][:, 1:])  # Video-ChatGPT / Chat-UniVi selection
    assert out.features.shape == (2, (image_size // 14) ** 2, 32)
    assert out.pooled is None  # the last block is not run for penultimate features
    full = module.clone(config=config.replace(feature_layer=-1, drop_cls=False)).apply({"params": params}, nhwc(x))
    err_last = max_err(full.features, ref.last_hidden_state)
    err_pool = max_err(full.pooled, ref.pooler_output)
    print(f"clip {image_size}px: max |Δ| penultimate {err:.2e}, last {err_last:.2e}, pooled {err_pool:.2e}")
    assert max(err, err_last, err_pool) <= TOL
    # export back to the released layout gives the same tensors
    back = dict(export(params, clip_hf_table(config)))
    assert set(back) == set(released)
    for k, v in released.items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


# ============================================================================ EVA ViT-g (BLIP-2)
EVA_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
                patch_size=14, qkv_bias=True)


@functools.lru_cache(maxsize=None)
def tiny_blip2_vision():
    torch.manual_seed(0)
    cfg = transformers.Blip2VisionConfig(**EVA_TINY)
    cfg._attn_implementation = "eager"
    model = perturb_(transformers.Blip2VisionModel(cfg))
    model.post_layernorm.eps = 1e-5  # LAVIS ln_vision is a default LayerNorm (spec §5, difference 1)
    return model


def eva_tiny_config(**kw) -> EncoderConfig:
    return EncoderConfig.eva_vit_g(image_size=28, width=32, depth=3, num_heads=4, mlp_dim=64, **kw)


def to_lavis(hf_state: dict) -> dict:
    """HF Blip2VisionModel keys -> LAVIS ``visual_encoder.*`` + ``ln_vision.*`` (spec_qformer_family §5, item 3),
    with LAVIS's separate ``q_bias``/``v_bias`` and no k bias."""
    out = {}
    for k, v in hf_state.items():
        k2 = (k.replace("embeddings.class_embedding", "cls_token")
               .replace("embeddings.position_embedding", "pos_embed")
               .replace("embeddings.patch_embedding", "patch_embed.proj")
               .replace("encoder.layers.", "blocks.")
               .replace("layer_norm1", "norm1").replace("layer_norm2", "norm2")
               .replace("self_attn.projection", "attn.proj").replace("self_attn.qkv", "attn.qkv"))
        if k2.startswith("post_layernorm"):
            out[k2.replace("post_layernorm", "ln_vision")] = v
        elif k2.endswith("attn.qkv.bias"):
            q, _, vb = v.chunk(3)
            out["visual_encoder." + k2.replace("qkv.bias", "q_bias")] = q
            out["visual_encoder." + k2.replace("qkv.bias", "v_bias")] = vb
        else:
            out["visual_encoder." + k2] = v
    return out


def test_eva_vit_g_matches_blip2_vision_model(tmp_path):
    hf = tiny_blip2_vision()
    state = hf.state_dict()
    d = EVA_TINY["hidden_size"]
    assert all(float(state[f"encoder.layers.{i}.self_attn.qkv.bias"][d:2 * d].abs().max()) > 0 for i in range(3)), \
        "the HF k-bias third is non-zero here: dropping it must still be exact"
    config = eva_tiny_config()
    module, params = load_tower(config, torch_source(state, tmp_path), eva_hf_table(config, prefix=""))
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True)
    out = module.apply({"params": params}, nhwc(x))
    err = max_err(out.features, ref.last_hidden_state)  # ln_vision(ViT(x)), all 257-style tokens
    err_vit = max_err(out.last_hidden_state, ref.hidden_states[-1])
    print(f"eva_vit_g: max |Δ| after ln_vision {err:.2e}, before {err_vit:.2e}")
    assert max(err, err_vit) <= TOL

    # the LAVIS layout (separate q_bias/v_bias, no k bias) loads to the same parameters and outputs
    lavis = to_lavis({k: v.clone() for k, v in state.items()})
    pth = tmp_path / "blip2_vision.pth"
    torch.save(lavis, pth)
    module2, params2 = load_tower(config, TorchSource([pth]), eva_lavis_table(config))
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    back = dict(export(params2, eva_lavis_table(config)))
    assert set(back) == set(lavis)
    # HF export writes the k-bias third as zeros; the function is unchanged
    hf_back = dict(export(params, eva_hf_table(config, prefix="")))
    assert set(hf_back) == set(state)
    assert not hf_back["encoder.layers.0.self_attn.qkv.bias"][d:2 * d].any()


# ============================================================================ EVA2-CLIP-E (CogVLM2)
@pytest.mark.parametrize("case", ["cogvlm2_visual_img56", "cogvlm2_visual_img112"])
def test_eva2_clip_e_matches_cogvlm2_golden(case, tmp_path):
    meta = json.loads((GOLDEN / f"case_{case}.json").read_text())
    data = load_file(str(GOLDEN / f"case_{case}.safetensors"))
    vc = meta["config"]["vision_config"]
    config = EncoderConfig.eva2_clip_e(
        image_size=vc["image_size"], patch_size=vc["patch_size"], width=vc["hidden_size"],
        depth=vc["num_hidden_layers"],
        num_heads=vc["num_heads"], mlp_dim=vc["intermediate_size"], eps=vc["layer_norm_eps"],
        out_dim=meta["config"]["hidden_size(LLM)"], glu_dim=meta["config"]["intermediate_size(LLM, used by GLU)"])
    assert config.num_positions == vc["num_positions"]
    weights = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
    path = tmp_path / "vision.safetensors"
    save_safetensors(weights, path)
    table = tower_then_head_table(config, "model.vision.")
    module, params = load_tower(config, SafetensorsSource([path]), table, TowerThenHead(config))
    images = jnp.asarray(data["in/images"].transpose(0, 2, 3, 1))
    out = module.apply({"params": params}, images)
    err = max_err(out.features, data["out/features"])
    err_vit = max_err(out.last_hidden_state, data["out/transformer_output"])
    print(f"eva2_clip_e {case}: max |Δ| features {err:.2e}, transformer {err_vit:.2e}")
    assert out.features.shape == data["out/features"].shape
    assert max(err, err_vit) <= TOL
    assert set(dict(export(params, table))) == set(weights)


# ============================================================================ Qwen2-VL
QWEN_GRIDS = np.array([[1, 4, 6], [1, 2, 4], [2, 4, 4]])  # image, smaller image, 4-frame video (2 slices)


@functools.lru_cache(maxsize=None)
def tiny_qwen2_vl():
    torch.manual_seed(0)
    cfg = transformers.Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=48, num_heads=4, mlp_ratio=2, patch_size=14,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
        text_config=dict(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 4], "rope_theta": 1e6}),
    )
    cfg._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    model = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    visual = perturb_(model.model.visual)
    with torch.no_grad():  # larger q/k so that attention is far from uniform and the masks show
        for blk in visual.blocks:
            blk.attn.qkv.weight.mul_(8.0)
    return visual


def qwen_tiny_config(**kw) -> EncoderConfig:
    return EncoderConfig.qwen2_vl_vision(width=32, depth=2, num_heads=4, mlp_dim=64, out_dim=48, **kw)


@pytest.fixture(scope="module")
def qwen_converted(tmp_path_factory):
    visual = tiny_qwen2_vl()
    released = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    config = qwen_tiny_config()
    module, params = load_tower(config, torch_source(released, tmp_path_factory.mktemp("qwen")),
                                tower_then_head_table(config, "visual."), TowerThenHead(config))
    n = int(np.prod(QWEN_GRIDS, axis=1).sum())
    x = torch.randn(n, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = visual(x, grid_thw=torch.tensor(QWEN_GRIDS))
    return visual, released, config, module, params, x, ref


def test_qwen2_vl_vision_matches_transformers_packed_batch(qwen_converted):
    _, released, config, module, params, x, ref = qwen_converted
    out = module.apply({"params": params}, jnp.asarray(x.numpy()), QWEN_GRIDS)
    err = max_err(out.features, ref.pooler_output)  # merger output, what the LLM consumes
    err_vit = max_err(out.last_hidden_state, ref.last_hidden_state)
    print(f"qwen2_vl vision (2 images + 1 video): max |Δ| merged {err:.2e}, ViT {err_vit:.2e}")
    assert out.features.shape == (x.shape[0] // 4, 48)
    assert max(err, err_vit) <= TOL
    assert set(dict(export(params, tower_then_head_table(config, "visual.")))) == set(released)


def test_qwen2_vl_vision_under_jit_and_masks_matter(qwen_converted):
    _, _, config, module, params, x, ref = qwen_converted
    pos, seg = qwen2_vl_vision_inputs(QWEN_GRIDS)
    fn = jax.jit(lambda p, v, a, b: module.apply({"params": p}, v, positions=a, segment_ids=b).features)
    got = fn(params, jnp.asarray(x.numpy()), jnp.asarray(pos), jnp.asarray(seg))
    assert max_err(got, ref.pooler_output) <= TOL
    # one segment for everything (no block-diagonal mask) changes the result: the masks are exercised
    full = fn(params, jnp.asarray(x.numpy()), jnp.asarray(pos), jnp.zeros_like(jnp.asarray(seg)))
    assert max_err(full, ref.pooler_output) > 10 * TOL


@pytest.mark.parametrize("impl", ["chunked", "cudnn"])
def test_qwen2_vl_vision_under_memory_efficient_attention(qwen_converted, impl):
    """The packed tower passes its segment ids as structure; chunked and jax.nn's attention give the
    transformers features too."""
    _, _, config, module, params, x, ref = qwen_converted
    module = module.clone(config=config.replace(attention_impl=impl))
    out = module.apply({"params": params}, jnp.asarray(x.numpy()), QWEN_GRIDS)
    err = max(max_err(out.features, ref.pooler_output), max_err(out.last_hidden_state, ref.last_hidden_state))
    print(f"qwen2_vl vision ({impl}): max |Δ| {err:.2e}")
    assert err <= TOL


# ============================================================================ ImageBind audio
class RefAudioEncoder(torch.nn.Module):
    """ImageBind audio path as written in spec_qformer_family §2.1, with ImageBind's module names:
    conv(16, stride 10, no bias) -> LN(1e-5) on patches -> [cls; patches] + pos -> pre-LN blocks (LN 1e-6,
    MultiheadAttention with add_bias_kv, GELU MLP) -> LN(1e-6) -> CLS -> Linear(no bias) -> 20 * l2norm."""

    def __init__(self, d, depth, heads, mlp, out, mel, frames):
        super().__init__()
        nn = torch.nn
        grid = ((mel - 16) // 10 + 1) * ((frames - 16) // 10 + 1)
        stem = nn.Module()
        stem.proj = nn.Conv2d(1, d, kernel_size=16, stride=10, bias=False)
        stem.norm_layer = nn.LayerNorm(d)
        pre = nn.Module()
        pre.rgbt_stem = stem
        pre.cls_token = nn.Parameter(0.1 * torch.randn(1, 1, d))
        pre.pos_embedding_helper = nn.Module()
        pre.pos_embedding_helper.pos_embed = nn.Parameter(0.1 * torch.randn(1, grid + 1, d))
        blocks = nn.ModuleList()
        for _ in range(depth):
            b = nn.Module()
            b.attn = nn.MultiheadAttention(d, heads, bias=True, add_bias_kv=True)
            b.norm_1, b.norm_2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
            b.mlp = nn.Module()
            b.mlp.fc1, b.mlp.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)
            blocks.append(b)
        trunk = nn.Module()
        trunk.blocks = blocks
        post = nn.Module()
        post.register_buffer("log_logit_scale", torch.tensor(np.log(20.0), dtype=torch.float32))
        self.modality_preprocessors = nn.ModuleDict({"audio": pre})
        self.modality_trunks = nn.ModuleDict({"audio": trunk})
        self.modality_heads = nn.ModuleDict({"audio": nn.Sequential(nn.LayerNorm(d, eps=1e-6), nn.Identity(),
                                                                    nn.Linear(d, out, bias=False))})
        self.modality_postprocessors = nn.ModuleDict({"audio": nn.Sequential(nn.Identity(), post)})

    def forward(self, x):  # x [B, 1, mel, frames]
        pre = self.modality_preprocessors["audio"]
        t = pre.rgbt_stem.proj(x).flatten(2).transpose(1, 2)  # [B, N, D] (row-major over mel x time)
        t = pre.rgbt_stem.norm_layer(t)
        t = torch.cat([pre.cls_token.expand(x.shape[0], -1, -1), t], dim=1) + pre.pos_embedding_helper.pos_embed
        h = t.transpose(0, 1)  # [L, B, D], MultiheadAttention's layout
        for b in self.modality_trunks["audio"].blocks:
            y = b.norm_1(h)
            h = h + b.attn(y, y, y, need_weights=False)[0]
            h = h + b.mlp.fc2(torch.nn.functional.gelu(b.mlp.fc1(b.norm_2(h))))
        h = h.transpose(0, 1)
        head = self.modality_heads["audio"]
        emb = head[2](head[0](h)[:, 0])
        scale = torch.clip(self.modality_postprocessors["audio"][1].log_logit_scale.exp(), max=100)
        return scale * torch.nn.functional.normalize(emb, dim=-1), h


AUDIO_TINY = dict(d=32, depth=2, heads=4, mlp=64, out=24, mel=36, frames=46)


@functools.lru_cache(maxsize=None)
def tiny_audio_reference():
    torch.manual_seed(0)
    return perturb_(RefAudioEncoder(**AUDIO_TINY))


def test_imagebind_audio_matches_reference(tmp_path):
    ref_model = tiny_audio_reference()
    state = dict(ref_model.state_dict())
    assert "modality_postprocessors.audio.1.log_logit_scale" in state
    # the released file holds every modality: an unrelated one must be ignored with strict=False
    state["modality_trunks.vision.blocks.0.attn.in_proj_weight"] = torch.zeros(3, 3)
    config = EncoderConfig.imagebind_audio_huge(image_size=36, image_width=46, width=32, depth=2, num_heads=4,
                                                mlp_dim=64, out_dim=24)
    pth = tmp_path / "imagebind.pth"
    torch.save(state, pth)
    module = Encoder(config)
    with pytest.raises(ConversionError, match="modality_trunks.vision"):
        convert(TorchSource([pth]), imagebind_audio_table(config), abstract_params(module))
    params = convert(TorchSource([pth]), imagebind_audio_table(config), abstract_params(module), strict=False)
    x = torch.randn(3, 1, 36, 46, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, ref_h = ref_model(x)
    out = module.apply({"params": params}, jnp.asarray(x[:, 0].numpy()))
    err = max_err(out.features, ref)
    err_h = max_err(out.last_hidden_state, ref_h)
    print(f"imagebind audio: max |Δ| features {err:.2e}, trunk {err_h:.2e}")
    assert max(err, err_h) <= TOL
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out.features), axis=-1), 20.0, rtol=1e-5)


# ============================================================================ bf16
def random_params(module: Encoder, seed: int = 0) -> dict:
    """Random parameters from the abstract tree (no compilation): kernels ~ N(0, 1/fan_in), norm scales
    ~ 1 + N(0, 0.1), other vectors ~ N(0, 0.05)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in flatten_params(abstract_params(module)).items():
        shape = tuple(leaf.shape)
        if path.endswith("scale"):
            flat[path] = 1 + 0.1 * rng.standard_normal(shape)
        elif len(shape) >= 2:
            flat[path] = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        else:
            flat[path] = 0.05 * rng.standard_normal(shape)
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for q in parents:
            node = node.setdefault(q, {})
        node[leaf] = jnp.asarray(v, jnp.float32)
    return tree


def test_bf16_towers_stay_close_to_f32():
    """Every tower in bf16 params + compute (LayerNorm statistics and softmax stay float32) vs float32."""
    rng = np.random.default_rng(0)
    for tower in ("clip", "eva", "eva2", "qwen2_vl", "imagebind_audio"):
        config = EncoderConfig.tiny(tower)
        f32_module = Encoder(config)
        bf_module = Encoder(config.replace(dtype="bfloat16", param_dtype="bfloat16"))
        assert {a.dtype for a in jax.tree_util.tree_leaves(abstract_params(bf_module))} == {jnp.dtype(jnp.bfloat16)}
        grid = np.array([[2, 2, 4]]) if tower == "qwen2_vl" else None
        shape = (16, 1176) if tower == "qwen2_vl" else (2,) + f32_module.example_inputs()["inputs"].shape[1:]
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        params = random_params(f32_module)

        @jax.jit
        def both(p, x):
            bf_p = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), p)
            return (f32_module.apply({"params": p}, x, grid).features,
                    bf_module.apply({"params": bf_p}, x, grid).features)

        f32, out = both(params, x)
        assert out.dtype == jnp.bfloat16
        rel = max_err(out, f32) / float(jnp.max(jnp.abs(f32)))
        print(f"{tower}: bf16 max |Δ| / max |f32| = {rel:.2e}")
        assert rel < 3e-2, tower


# ============================================================================ published sizes
def expected_shapes(config: EncoderConfig, module: nn.Module | None = None) -> dict[str, tuple]:
    module = Encoder(config) if module is None else module
    return {k: tuple(v.shape) for k, v in flatten_params(abstract_params(module)).items()}


def assert_layout(config, table, torch_shapes, module: nn.Module | None = None) -> int:
    expected = expected_shapes(config, module)
    plan = plan_conversion(torch_shapes, table, expected)
    assert (plan.missing, plan.unexpected, plan.mismatched) == ([], [], [])
    assert {k for k, _, _ in export_plan(list(expected), table)} == set(torch_shapes)
    return sum(int(np.prod(s)) for s in expected.values())


def meta_shapes(model) -> dict[str, tuple]:
    return {k: tuple(p.shape) for k, p in model.named_parameters()}


@pytest.mark.parametrize("variant,image_size", [("clip_vit_l14_224", 224), ("clip_vit_l14_336", 336)])
def test_clip_published_layout(variant, image_size):
    with torch.device("meta"):
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=image_size, patch_size=14, hidden_act="quick_gelu"))
    shapes = {f"vision_model.{k}": s for k, s in meta_shapes(hf).items()}  # released key prefix
    config = getattr(EncoderConfig, variant)()
    n = assert_layout(config, clip_hf_table(config), shapes)
    assert n == sum(p.numel() for p in hf.parameters())
    # 303.2 M (224) — the vision half of openai/clip-vit-large-patch14; 336 adds 320 positions x 1024
    assert n == {224: 303_179_776, 336: 303_507_456}[image_size]
    assert config.num_positions == (image_size // 14) ** 2 + 1


def test_eva_vit_g_published_layouts():
    with torch.device("meta"):
        hf = transformers.Blip2VisionModel(transformers.Blip2VisionConfig())  # defaults = BLIP-2's EVA ViT-g
    config = EncoderConfig.eva_vit_g()
    shapes = meta_shapes(hf)
    n = assert_layout(config, eva_hf_table(config, prefix=""), shapes)
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_hf - n == 39 * 1408  # HF's softmax-invariant k bias, dropped on load
    # LAVIS layout: spec_qformer_family §1.1 key list (+ ln_vision §1.2)
    lavis = {"visual_encoder.cls_token": (1, 1, 1408), "visual_encoder.pos_embed": (1, 257, 1408),
             "visual_encoder.patch_embed.proj.weight": (1408, 3, 14, 14),
             "visual_encoder.patch_embed.proj.bias": (1408,),
             "ln_vision.weight": (1408,), "ln_vision.bias": (1408,)}
    for i in range(39):
        b = f"visual_encoder.blocks.{i}."
        lavis.update({b + "norm1.weight": (1408,), b + "norm1.bias": (1408,), b + "norm2.weight": (1408,),
                      b + "norm2.bias": (1408,), b + "attn.qkv.weight": (4224, 1408), b + "attn.q_bias": (1408,),
                      b + "attn.v_bias": (1408,), b + "attn.proj.weight": (1408, 1408), b + "attn.proj.bias": (1408,),
                      b + "mlp.fc1.weight": (6144, 1408), b + "mlp.fc1.bias": (6144,),
                      b + "mlp.fc2.weight": (1408, 6144), b + "mlp.fc2.bias": (1408,)})
    assert assert_layout(config, eva_lavis_table(config), lavis) == n
    assert round(n / 1e6, 1) == 985.9  # spec_qformer_family §1.1: "≈ 985.9 M parameters"
    assert n == 985_897_344


def test_eva2_clip_e_published_layout():
    """Key list and shapes of spec_vit_family §4.7 (``model.vision.*`` of cogvlm2-video-llama3-chat)."""
    d, mlp, h, inner = 1792, 15360, 4096, 14336
    p = "model.vision."
    shapes = {p + "patch_embedding.proj.weight": (d, 3, 14, 14), p + "patch_embedding.proj.bias": (d,),
              p + "patch_embedding.cls_embedding": (1, d), p + "patch_embedding.position_embedding.weight": (257, d),
              p + "conv.weight": (d, d, 2, 2), p + "conv.bias": (d,), p + "linear_proj.linear_proj.weight": (h, d),
              p + "linear_proj.norm1.weight": (h,), p + "linear_proj.norm1.bias": (h,),
              p + "linear_proj.gate_proj.weight": (inner, h), p + "linear_proj.dense_h_to_4h.weight": (inner, h),
              p + "linear_proj.dense_4h_to_h.weight": (h, inner), p + "boi": (1, 1, h), p + "eoi": (1, 1, h)}
    for j in range(63):
        b = f"{p}transformer.layers.{j}."
        shapes.update({b + "input_layernorm.weight": (d,), b + "input_layernorm.bias": (d,),
                       b + "attention.query_key_value.weight": (3 * d, d),
                       b + "attention.query_key_value.bias": (3 * d,),
                       b + "attention.dense.weight": (d, d), b + "attention.dense.bias": (d,),
                       b + "mlp.fc1.weight": (mlp, d), b + "mlp.fc1.bias": (mlp,), b + "mlp.fc2.weight": (d, mlp),
                       b + "mlp.fc2.bias": (d,), b + "post_attention_layernorm.weight": (d,),
                       b + "post_attention_layernorm.bias": (d,)})
    config = EncoderConfig.eva2_clip_e()
    n = assert_layout(config, tower_then_head_table(config, p), shapes, TowerThenHead(config))
    adapter = d * d * 4 + d + h * d + 2 * h + 3 * h * inner + 2 * h
    # spec §4.1: "EVA2-CLIP-E (63 layers) ≈ 4.28 B + adapter ≈ 0.2 B"
    assert round((n - adapter) / 1e9, 2) == 4.28 and round(adapter / 1e9, 1) == 0.2
    assert n == 4_477_269_248


def test_qwen2_vl_vision_published_layout():
    for out_dim, variant in ((3584, "qwen2_vl_vision"), (1536, "qwen2_vl_2b_vision")):
        with torch.device("meta"):
            hf = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(
                vision_config=dict(hidden_size=out_dim), text_config=dict(
                    hidden_size=out_dim, num_hidden_layers=1, vocab_size=16, intermediate_size=16,
                    num_attention_heads=4, num_key_value_heads=4)))
        shapes = {k.replace("model.visual.", "visual."): s for k, s in meta_shapes(hf).items()
                  if k.startswith("model.visual.")}
        config = getattr(EncoderConfig, variant)()
        n = assert_layout(config, tower_then_head_table(config, "visual."), shapes, TowerThenHead(config))
        assert n == sum(int(np.prod(s)) for s in shapes.values())
        # Qwen2-VL paper: a 675 M-parameter ViT for every size (7B merger to 3584: 675.8 M)
        assert n == {3584: 675_759_104, 1536: 665_271_296}[out_dim]


def test_imagebind_audio_huge_published_layout():
    """Keys of ``imagebind_huge.pth``'s audio modality (spec_qformer_family §2.1/§2.6, ImageBind names)."""
    d, mlp = 768, 3072
    shapes = {"modality_preprocessors.audio.rgbt_stem.proj.weight": (d, 1, 16, 16),
              "modality_preprocessors.audio.rgbt_stem.norm_layer.weight": (d,),
              "modality_preprocessors.audio.rgbt_stem.norm_layer.bias": (d,),
              "modality_preprocessors.audio.cls_token": (1, 1, d),
              "modality_preprocessors.audio.pos_embedding_helper.pos_embed": (1, 229, d),
              "modality_heads.audio.0.weight": (d,), "modality_heads.audio.0.bias": (d,),
              "modality_heads.audio.2.weight": (1024, d),
              "modality_postprocessors.audio.1.log_logit_scale": ()}
    for i in range(12):
        b = f"modality_trunks.audio.blocks.{i}."
        shapes.update({b + "attn.in_proj_weight": (3 * d, d), b + "attn.in_proj_bias": (3 * d,),
                       b + "attn.bias_k": (1, 1, d), b + "attn.bias_v": (1, 1, d),
                       b + "attn.out_proj.weight": (d, d), b + "attn.out_proj.bias": (d,),
                       b + "norm_1.weight": (d,), b + "norm_1.bias": (d,), b + "norm_2.weight": (d,),
                       b + "norm_2.bias": (d,), b + "mlp.fc1.weight": (mlp, d), b + "mlp.fc1.bias": (mlp,),
                       b + "mlp.fc2.weight": (d, mlp), b + "mlp.fc2.bias": (d,)})
    config = EncoderConfig.imagebind_audio_huge()
    assert config.grid == (12, 19) and config.num_positions == 229  # 12 x 19 patches + CLS (spec §2.1)
    expected = expected_shapes(config)
    plan = plan_conversion(shapes, imagebind_audio_table(config), expected)
    assert (plan.missing, plan.unexpected, plan.mismatched) == ([], [], [])
    exported = {k for k, _, _ in export_plan(list(expected), imagebind_audio_table(config))}
    assert exported == set(shapes) - {"modality_postprocessors.audio.1.log_logit_scale"}  # a fixed buffer
    n = sum(int(np.prod(s)) for s in expected.values())
    assert n == sum(int(np.prod(s)) for s in shapes.values()) - 1
    assert n == 86_235_648
