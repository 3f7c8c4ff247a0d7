"""LLaVA-NeXT-Video equals transformers' LlavaNextVideoForConditionalGeneration on a left-padded batch of
4-frame videos (max |Δ logits| <= 1e-4, float32), greedy generation token for token; the spatial pooling
equals torch's avg_pool2d; the published layout and parameter count match the transformers meta model."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import vjax
from vjax.convert.llava_next_video import canonical_key, llava_next_video_table, to_hf
from vjax.convert.mapping import export_plan, plan_conversion
from vjax.generate import generate
from vjax.layers.pooling import spatial_avg_pool
from vjax.models.llava_next_video import LlavaNextVideo, LlavaNextVideoConfig
from vjax.pretrained import abstract_params
from vjax.pytree import flatten_params

VID, IMG = 5, 6
TOL = 1e-4


def hf_config(**text) -> transformers.LlavaNextVideoConfig:
    """The tiny test model: CLIP 2 blocks at 56 px (4 x 4 patches -> 2 x 2 pooled), LLaMA 2 layers."""
    cfg = transformers.LlavaNextVideoConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=56, patch_size=14, projection_dim=16),
        text_config=dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1, **text),
        video_token_index=VID, image_token_index=IMG)
    cfg._attn_implementation = "eager"
    return cfg


@functools.lru_cache(maxsize=None)
def hf_model():
    torch.manual_seed(0)
    model = transformers.LlavaNextVideoForConditionalGeneration(hf_config()).eval()
    with torch.no_grad():  # non-trivial biases and norms so every parameter matters
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """save_pretrained -> vjax.from_pretrained (the registered Layout picks the model from config.json)."""
    d = tmp_path_factory.mktemp("lnv")
    hf_model().save_pretrained(d)
    module, params = vjax.from_pretrained(d)
    assert isinstance(module, LlavaNextVideo) and module.config.tokens_per_frame == 4
    return module, params


def batch():
    """Row 0 left-padded, row 1 full; a 4-frame 56 px video each (4 x 4 = 16 video tokens)."""
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(2, 4, 56, 56, 3)).astype(np.float32)  # [B, T, H, W, 3]
    row0 = [1, 20, 21] + [VID] * 16 + [30, 31, 32]
    row1 = [1, 22, 23, 24] + [VID] * 16 + [40, 41, 42, 43, 44]
    length = len(row1)
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    ids[0, length - len(row0):], mask[0, length - len(row0):] = row0, 1
    ids[1], mask[1] = row1, 1
    return ids, mask, frames


def hf_inputs(ids, mask, frames) -> dict:
    pos = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)  # what HF generate uses for a left-padded batch
    return dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                pixel_values_videos=torch.tensor(frames.transpose(0, 1, 4, 2, 3)))  # [B, T, 3, H, W]


def test_logits_match_transformers(converted):
    module, params = converted
    ids, mask, frames = batch()
    with torch.no_grad():
        ref = hf_model()(**hf_inputs(ids, mask, frames)).logits.numpy()
    apply = jax.jit(lambda p, i, m, f, fm: module.apply({"params": p}, i, attention_mask=m, frames=f,
                                                          frame_mask=fm).logits)
    out = np.asarray(apply(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(frames), None))
    err = np.abs(out - ref)[mask.astype(bool)].max()
    print(f"llava_next_video: max |Δ logits| = {err:.2e}")
    assert err <= TOL
    # an all-real frame_mask (the training batches' format) changes nothing
    masked = apply(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(frames), jnp.ones((2, 4), bool))
    np.testing.assert_allclose(np.asarray(masked)[mask.astype(bool)], out[mask.astype(bool)], atol=1e-5)


def test_greedy_generation_matches_transformers(converted):
    module, params = converted
    ids, mask, frames = batch()
    n = 12
    inputs = hf_inputs(ids, mask, frames)
    inputs.pop("position_ids")  # generate derives them from the mask
    with torch.no_grad():
        ref = hf_model().generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0)
    ref_new = ref[:, ids.shape[1]:].numpy()
    out = generate(module, params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=n, eos_token_ids=(2,),
                   pad_token_id=0, prefill_inputs=dict(frames=jnp.asarray(frames)))
    print(f"llava_next_video greedy: {ref_new.tolist()}")
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, : ref_new.shape[1]], ref_new)


def test_fewer_real_frames_equal_the_shorter_clip(converted):
    """A clip padded from 2 to 4 frames (frame_mask) gives transformers' logits for its 2 real frames."""
    module, params = converted
    _, _, frames = batch()
    ids = np.asarray([[1, 20] + [VID] * 8 + [30, 31]])
    with torch.no_grad():
        ref = hf_model()(input_ids=torch.tensor(ids),
                         pixel_values_videos=torch.tensor(frames[:1, :2].transpose(0, 1, 4, 2, 3))).logits.numpy()
    padded = np.concatenate([frames[:1, :1], np.zeros_like(frames[:1, :2]), frames[:1, 1:2]], axis=1)  # real 0 and 3
    long_ids = np.asarray([[1, 20] + [VID] * 16 + [30, 31]])
    out = module.apply({"params": params}, jnp.asarray(long_ids), frames=jnp.asarray(padded),
                       frame_mask=jnp.asarray([[True, False, False, True]]))
    keep = np.asarray(out.attention_mask[0]).astype(bool)  # the 8 hidden slots are left out
    assert keep.sum() == ids.shape[1]
    assert np.abs(np.asarray(out.logits)[0, keep] - ref[0]).max() <= TOL


def test_images_are_refused_by_name(converted):
    module, params = converted
    with pytest.raises(ValueError, match="videos \\(frames\\) only.*pixel_values.*any-res image path"):
        module.apply({"params": params}, jnp.asarray([[1, IMG, 3]]), pixel_values=jnp.zeros((1, 5, 3, 56, 56)))


def test_export_round_trip_loads_in_transformers(converted, tmp_path_factory):
    """to_hf + export: transformers loads the directory (image_newline, unused by videos, is initialised) and
    gives the reference logits; the config reads back to the same vjax config."""
    module, params = converted
    assert LlavaNextVideoConfig.from_hf(to_hf(module.config)) == module.config.replace(num_frames=32)
    out_dir = tmp_path_factory.mktemp("lnv_hf")
    vjax.export_hf(out_dir, module, params)
    back = transformers.LlavaNextVideoForConditionalGeneration.from_pretrained(out_dir, attn_implementation="eager")
    ids, mask, frames = batch()
    with torch.no_grad():
        a = back.eval()(**hf_inputs(ids, mask, frames)).logits.numpy()
        b = hf_model()(**hf_inputs(ids, mask, frames)).logits.numpy()
    assert np.abs(a - b)[mask.astype(bool)].max() <= 1e-5


def test_prompt_is_the_release_chat_template():
    """transformers' chat template of llava-hf/LLaVA-NeXT-Video-7B-hf renders one user turn with a video as
    ``USER: <video>\n{question} ASSISTANT:`` (no system prompt); the spec's template gives that string."""
    from vjax.data.templates import VisualContext, render, to_string
    from vjax.models import registry

    spec = registry.spec("llava_next_video")
    pieces = render(spec.template, "What is shown?", context=VisualContext(num_frames=4), variant=spec.template_variant,
                    options=spec.template_options)
    assert to_string(pieces, {"video": "<video>"}) == "USER: <video>\nWhat is shown? ASSISTANT:"


@pytest.mark.parametrize("grid,stride", [((6, 6), 2), ((5, 7), 2), ((7, 7), 3)])
def test_spatial_avg_pool_matches_torch(grid, stride):
    h, w = grid
    x = np.random.default_rng(1).normal(size=(2, 3, h * w, 8)).astype(np.float32)  # [B, T, N, C]
    t = torch.tensor(x.reshape(6, h, w, 8)).permute(0, 3, 1, 2)  # [B*T, C, h, w]
    ref = torch.nn.functional.avg_pool2d(t, stride, stride).flatten(2).transpose(1, 2).numpy()
    out = np.asarray(spatial_avg_pool(jnp.asarray(x), grid, stride))
    assert out.shape == (2, 3, (h // stride) * (w // stride), 8)
    np.testing.assert_allclose(out.reshape(ref.shape), ref, atol=1e-6)


# LLaVA-NeXT-Video-7B(-DPO)-hf as its config.json gives it (transformers' defaults for the keys it omits).
PUBLISHED_7B = dict(
    text_config=dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                     max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
    video_token_index=32000, image_token_index=32001)
PARAMS_7B = 7_063_431_168  # transformers' meta-device model (model card: 7.06B), image_newline [4096] included


def test_published_layout_and_parameter_count_match_transformers_meta_model():
    hf_cfg = transformers.LlavaNextVideoConfig(**PUBLISHED_7B)
    with torch.device("meta"):
        hf = transformers.LlavaNextVideoForConditionalGeneration(hf_cfg)
    torch_shapes = {canonical_key(k): tuple(p.shape) for k, p in hf.named_parameters()}

    config = LlavaNextVideoConfig.llava_next_video_7b()
    assert LlavaNextVideoConfig.from_hf(hf_cfg.to_dict()) == config
    expected = {k: tuple(v.shape) for k, v in flatten_params(abstract_params(LlavaNextVideo(config))).items()}
    table = llava_next_video_table(config)
    plan = plan_conversion(torch_shapes, table, expected)  # torch -> vjax: every key, every shape
    assert (plan.missing, plan.unexpected, plan.mismatched) == ([], [], [])
    back = {k for k, _, _ in export_plan(list(expected), table)}  # vjax -> torch: all but image_newline
    assert back == set(torch_shapes) - {"image_newline"}

    n_hf = sum(p.numel() for p in hf.parameters())
    n_vjax = sum(int(np.prod(s)) for s in expected.values())
    print(f"LLaVA-NeXT-Video-7B: transformers {n_hf:,}, vjax {n_vjax:,} (no image_newline)")
    assert n_hf == PARAMS_7B and n_vjax == n_hf - 4096
    assert config.num_visual_tokens == 32 * 144


def test_the_convert_command_reads_the_release_layout(converted, tmp_path):
    """``python -m experiments.convert --model=llava_next_video`` on a transformers directory gives the same
    model as ``vjax.from_pretrained`` of it (the spec names the layout; nothing else was registered)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = tmp_path / "hf"
    hf_model().save_pretrained(src)
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "experiments.convert", "--model=llava_next_video", f"--src={src}",
                        f"--dst={tmp_path / 'out'}"], cwd=root, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr[-2000:]
    module, params = vjax.from_pretrained(tmp_path / "out")
    want_module, want = converted
    assert module.config == want_module.config
    for (k, a), (k2, b) in zip(sorted(flatten_params(params).items()), sorted(flatten_params(want).items())):
        assert k == k2 and np.array_equal(np.asarray(a), np.asarray(b)), k
