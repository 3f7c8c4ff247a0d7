"""Qwen2-VL equals transformers' Qwen2VLForConditionalGeneration on text + images + a video
(max |Δ logits| <= 1e-4, float32), greedy generation token for token."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from vjax.convert.io import open_checkpoint
from vjax.convert.mapping import convert
from vjax.convert.qwen2_vl import detect_layout, qwen2_vl_table
from vjax.generate import generate
from vjax.models.qwen2_vl import Qwen2VL, Qwen2VLConfig, qwen2_vl_patchify
from vjax.pretrained import abstract_params

IMG, VID, VS, VE = 10, 11, 12, 13
TOL = 1e-4


@functools.lru_cache(maxsize=None)
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, mlp_ratio=2),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
    cfg._attn_implementation = "eager"
    model = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


@functools.lru_cache(maxsize=None)
def converted(tmpdir: str):
    hf = hf_model()
    hf.save_pretrained(tmpdir)
    config = Qwen2VLConfig.from_hf(hf.config.to_dict())
    module = Qwen2VL(config)
    src = open_checkpoint(tmpdir)
    params = convert(src, qwen2_vl_table(config, detect_layout(src.keys())), abstract_params(module))
    return module, jax.tree_util.tree_map(jnp.asarray, params)


def batch():
    """Row 0 (left-padded): an image 4x4 patches; row 1: an image 4x6 and a 4-frame video 2x4x4."""
    rng = np.random.default_rng(0)
    img_grid = np.array([[1, 4, 4], [1, 4, 6]])
    vid_grid = np.array([[2, 4, 4]])
    pix_img = rng.normal(size=(16 + 24, 3 * 2 * 14 * 14)).astype(np.float32)
    frames = rng.normal(size=(4, 56, 56, 3)).astype(np.float32)
    pix_vid = np.asarray(qwen2_vl_patchify(jnp.asarray(frames)))
    row0 = [1, 20, 21, VS] + [IMG] * 4 + [VE, 30, 31, 32]
    row1 = [1, VS] + [IMG] * 6 + [VE, 22, VS] + [VID] * 8 + [VE, 40, 41, 42]
    length = len(row1)
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    ids[0, length - len(row0):] = row0
    mask[0, length - len(row0):] = 1
    ids[1] = row1
    mask[1] = 1
    return ids, mask, pix_img, img_grid, pix_vid, vid_grid, frames


def test_logits_match_transformers(tmp_path_factory):
    module, params = converted(str(tmp_path_factory.mktemp("qwen2vl")))
    ids, mask, pix_img, img_grid, pix_vid, vid_grid, _ = batch()
    with torch.no_grad():
        ref = hf_model()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         pixel_values=torch.tensor(pix_img), image_grid_thw=torch.tensor(img_grid),
                         pixel_values_videos=torch.tensor(pix_vid), video_grid_thw=torch.tensor(vid_grid),
                         mm_token_type_ids=torch.tensor((ids == IMG) * 1 + (ids == VID) * 2)).logits.numpy()
    out = module.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                       pixel_values=jnp.asarray(pix_img), image_grid_thw=img_grid,
                       pixel_values_videos=jnp.asarray(pix_vid), video_grid_thw=vid_grid)
    err = np.abs(np.asarray(out.logits) - ref)[mask.astype(bool)].max()
    print(f"qwen2_vl: max |Δ logits| = {err:.2e}")
    assert err <= TOL


def test_greedy_generation_matches_transformers(tmp_path_factory):
    module, params = converted(str(tmp_path_factory.mktemp("qwen2vl_gen")))
    ids, mask, pix_img, img_grid, pix_vid, vid_grid, _ = batch()
    n = 12
    with torch.no_grad():
        ref = hf_model().generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                  pixel_values=torch.tensor(pix_img), image_grid_thw=torch.tensor(img_grid),
                                  pixel_values_videos=torch.tensor(pix_vid), video_grid_thw=torch.tensor(vid_grid),
                                  mm_token_type_ids=torch.tensor((ids == IMG) * 1 + (ids == VID) * 2),
                                  max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0)
    ref_new = ref[:, ids.shape[1]:].numpy()
    out = generate(module, params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=n, eos_token_ids=(2,),
                   pad_token_id=0, prefill_inputs=dict(
                       pixel_values=jnp.asarray(pix_img), image_grid_thw=tuple(map(tuple, img_grid.tolist())),
                       pixel_values_videos=jnp.asarray(pix_vid), video_grid_thw=tuple(map(tuple, vid_grid.tolist()))))
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, : ref_new.shape[1]], ref_new)


def test_frames_path_equals_packed_path(tmp_path_factory):
    """Training batches carry frames [B, T, H, W, 3]; they must give the packed-patch result."""
    module, params = converted(str(tmp_path_factory.mktemp("qwen2vl_frames")))
    module = module.clone(config=module.config.replace(num_frames=4, image_size=56))
    _, _, _, _, pix_vid, vid_grid, frames = batch()
    ids = jnp.asarray([[1, VS] + [VID] * 8 + [VE, 40, 41]])
    a = module.apply({"params": params}, ids, pixel_values_videos=jnp.asarray(pix_vid), video_grid_thw=vid_grid)
    b = module.apply({"params": params}, ids, frames=jnp.asarray(frames)[None])
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)


def test_per_slice_attention_equals_block_masked_attention(tmp_path_factory):
    """Uniform grids attend per temporal slice (no mask); the result equals the block-diagonal mask."""
    module, params = converted(str(tmp_path_factory.mktemp("qwen2vl_slices")))
    from vjax.models.encoders import Encoder, qwen2_vl_vision_inputs

    grid = np.array([[2, 4, 4], [1, 4, 4]])  # two items, three slices of 16 patches
    pix = jnp.asarray(np.random.default_rng(5).normal(size=(48, 3 * 2 * 14 * 14)), jnp.float32)
    pos, seg = qwen2_vl_vision_inputs(grid)
    enc = Encoder(module.config.vision)
    dense = enc.apply({"params": params["vision"]}, pix, positions=pos, segment_ids=seg).features
    sliced = enc.apply({"params": params["vision"]}, pix, positions=pos, segment_ids=seg, slice_size=16).features
    np.testing.assert_allclose(sliced, dense, atol=1e-5)


def test_many_visual_blocks_match_transformers(tmp_path_factory):
    """Five images and a video in one row: every block gets M-RoPE positions (no silent cap at 4)."""
    module, params = converted(str(tmp_path_factory.mktemp("qwen2vl_many")))
    assert module.config.max_visual_blocks is None  # from_hf: sized from the grids of each call
    rng = np.random.default_rng(3)
    img_grid = np.array([[1, 4, 4], [1, 2, 4], [1, 4, 2], [1, 2, 2], [1, 4, 4]])
    vid_grid = np.array([[2, 4, 4]])
    row = [1, 20]
    for g in img_grid:
        row += [VS] + [IMG] * (int(np.prod(g)) // 4) + [VE, 21]
    row += [VS] + [VID] * 8 + [VE, 30, 31]
    ids = np.asarray([row], np.int64)
    pix_img = rng.normal(size=(int(np.prod(img_grid, axis=1).sum()), 1176)).astype(np.float32)
    pix_vid = rng.normal(size=(32, 1176)).astype(np.float32)
    with torch.no_grad():
        ref = hf_model()(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix_img),
                         image_grid_thw=torch.tensor(img_grid), pixel_values_videos=torch.tensor(pix_vid),
                         video_grid_thw=torch.tensor(vid_grid),
                         mm_token_type_ids=torch.tensor((ids == IMG) * 1 + (ids == VID) * 2)).logits.numpy()
    out = module.apply({"params": params}, jnp.asarray(ids), pixel_values=jnp.asarray(pix_img),
                       image_grid_thw=img_grid, pixel_values_videos=jnp.asarray(pix_vid), video_grid_thw=vid_grid)
    err = float(np.abs(np.asarray(out.logits) - ref).max())
    print(f"qwen2_vl, 5 images + 1 video: max |Δ logits| = {err:.2e}")
    assert err <= TOL
    capped = module.clone(config=module.config.replace(max_visual_blocks=4))
    with pytest.raises(ValueError, match="holds 6 images \\+ videos, more than max_visual_blocks=4"):
        capped.apply({"params": params}, jnp.asarray(ids), pixel_values=jnp.asarray(pix_img),
                     image_grid_thw=img_grid, pixel_values_videos=jnp.asarray(pix_vid), video_grid_thw=vid_grid)


def test_odd_frame_count_pads_the_last_frame_as_transformers(tmp_path_factory):
    """5 frames: transformers' video processor repeats the last frame up to a multiple of the temporal patch
    (grid t = ceil(5 / 2) = 3; 3 * 6 * 6 / 4 = 27 tokens at 84 x 84); the frames path must give the same
    logits as transformers fed the 6-frame padded clip. (84 px keeps t <= h / 2, where transformers 5's
    text positions after a video agree with the original rule; see vjax.layers.mrope.)"""
    module, params = converted(str(tmp_path_factory.mktemp("qwen2vl_odd")))
    module = module.clone(config=module.config.replace(num_frames=5, image_size=84))
    assert module.config.video_grid == (3, 6, 6) and module.config.num_visual_tokens == 27
    frames = np.random.default_rng(4).normal(size=(5, 84, 84, 3)).astype(np.float32)
    padded = np.concatenate([frames, frames[-1:]])
    ids = np.asarray([[1, VS] + [VID] * 27 + [VE, 40, 41]], np.int64)
    with torch.no_grad():
        ref = hf_model()(input_ids=torch.tensor(ids),
                         pixel_values_videos=torch.tensor(np.asarray(qwen2_vl_patchify(jnp.asarray(padded)))),
                         video_grid_thw=torch.tensor([[3, 6, 6]]),
                         mm_token_type_ids=torch.tensor((ids == VID) * 2)).logits.numpy()
    out = module.apply({"params": params}, jnp.asarray(ids), frames=jnp.asarray(frames)[None])
    assert float(np.abs(np.asarray(out.logits) - ref).max()) <= TOL


def test_patch_layout_matches_the_transformers_image_processor():
    """transformers' PIL image processor (no resize/rescale/normalise) tiles an image over the temporal
    patch; qwen2_vl_patchify of the image twice must give the same flattened patches, grid (1, 4, 6)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = np.random.default_rng(6).uniform(0, 255, size=(56, 84, 3)).astype(np.float32)
    proc = Qwen2VLImageProcessorPil(do_resize=False, do_rescale=False, do_normalize=False, do_convert_rgb=False)
    ref = proc(images=[img], return_tensors="np", input_data_format="channels_last")
    assert ref["image_grid_thw"].tolist() == [[1, 4, 6]]
    ours = np.asarray(qwen2_vl_patchify(jnp.asarray(np.stack([img, img]))))
    np.testing.assert_array_equal(ours, ref["pixel_values"])
