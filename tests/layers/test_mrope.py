"""Qwen2-VL M-RoPE: position ids and cos/sin vs transformers 5.23 and the original (4.45) rule of spec §5.5."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2VLConfig
from transformers.models.qwen2_vl import modeling_qwen2_vl as hf

from vjax.layers import mrope
from vjax.layers.rope import apply_rotary_pos_emb

VS, VE, IMG, VID = 151652, 151653, 151655, 151656  # Qwen2-VL vision_start, vision_end, image_pad, video_pad
M = 2  # spatial_merge_size
TOKENS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, spatial_merge_size=M)


@functools.lru_cache(maxsize=None)
def hf_model() -> hf.Qwen2VLModel:
    text = dict(
        hidden_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,  # head_dim 128, as the released models
        num_key_value_heads=1,
        intermediate_size=32,
        vocab_size=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    )
    vision = dict(depth=1, embed_dim=16, hidden_size=256, num_heads=2, mlp_ratio=1, spatial_merge_size=M)
    config = Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS
    )
    torch.manual_seed(0)
    return hf.Qwen2VLModel(config).eval()


def hf_rope_index(ids, image_grid=None, video_grid=None, mask=None):
    ids_t = torch.tensor(ids)
    types = torch.zeros_like(ids_t, dtype=torch.int32)
    types[ids_t == IMG] = 1
    types[ids_t == VID] = 2
    pos, delta = hf_model().get_rope_index(
        ids_t,
        mm_token_type_ids=types,
        image_grid_thw=None if image_grid is None else torch.tensor(image_grid),
        video_grid_thw=None if video_grid is None else torch.tensor(video_grid),
        attention_mask=None if mask is None else torch.tensor(mask),
    )
    return pos.numpy(), delta.numpy()


def video(grid) -> list[int]:
    t, h, w = grid
    return [VS] + [VID] * (t * h * w // M**2) + [VE]


def image(grid) -> list[int]:
    t, h, w = grid
    return [VS] + [IMG] * (t * h * w // M**2) + [VE]


def left_pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    length = max(map(len, rows))
    ids = np.array([[0] * (length - len(r)) + r for r in rows], np.int64)
    mask = np.array([[0] * (length - len(r)) + [1] * len(r) for r in rows], np.int64)
    return ids, mask


# (name, rows, image grids, video grids): all with t <= max(h', w'), where 5.23 equals the original rule.
CASES = [
    ("text_only", [[5, 6, 7, 8, 9, 10]], None, None),
    ("text_image", [[5, 6] + image((1, 4, 6)) + [7, 8, 9]], [[1, 4, 6]], None),
    ("two_images", [[5] + image((1, 4, 6)) + [6, 7] + image((1, 8, 4)) + [8]], [[1, 4, 6], [1, 8, 4]], None),
    ("short_video", [[5, 6, 7] + video((3, 6, 8)) + [8, 9]], None, [[3, 6, 8]]),
    (
        "batch_image_video",
        [[5] + image((1, 6, 4)) + [6] + video((2, 4, 4)) + [7, 1, 2, 3, 4], [8, 9] + video((2, 6, 6)) + [10, 11, 12]],
        [[1, 6, 4]],
        [[2, 4, 4], [2, 6, 6]],
    ),
]


@pytest.mark.parametrize("name,rows,img,vid", CASES, ids=[c[0] for c in CASES])
def test_rope_index_matches_transformers(name, rows, img, vid):
    ids, _ = left_pad(rows)
    assert all(len(r) == ids.shape[1] for r in rows)  # no padding here
    pos, delta = mrope.get_rope_index(ids, img, vid, **TOKENS)
    ref_pos, ref_delta = hf_rope_index(ids, img, vid)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(delta, ref_delta)
    if name == "text_only":
        np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(ids.shape[1]), pos.shape))
        np.testing.assert_array_equal(mrope.get_rope_index(ids, **TOKENS)[0], pos)  # text-only branch


def test_rope_index_left_padding_matches_transformers_on_real_tokens():
    rows = [[5] + image((1, 4, 6)) + [6, 7], [8, 9, 10] + video((2, 4, 6)) + [11] + image((1, 2, 2)) + [12]]
    ids, mask = left_pad(rows)
    img, vid = [[1, 4, 6], [1, 2, 2]], [[2, 4, 6]]
    pos, delta = mrope.get_rope_index(ids, img, vid, mask, **TOKENS)
    ref_pos, _ = hf_rope_index(ids, img, vid, mask)
    real = mask.astype(bool)
    np.testing.assert_array_equal(pos[:, real], ref_pos[:, real])
    assert np.all(pos[:, ~real] == 1)  # the original fills padding with 1 (5.23 uses 0)
    # Original delta: max id + 1 - padded length (5.23 subtracts the unpadded length instead).
    np.testing.assert_array_equal(delta[:, 0], pos.max(axis=(0, 2)) + 1 - ids.shape[1])


def long_video_reference(n_before: int, grid, n_after: int) -> np.ndarray:
    """Spec §5.5 formula written out: text, then (s + t, s + row, s + col), then text from s + max(t, h', w')."""
    t, h, w = grid[0], grid[1] // M, grid[2] // M
    cols = [[i] * 3 for i in range(n_before)]  # includes vision_start
    s = n_before
    for tt in range(t):
        for hh in range(h):
            for ww in range(w):
                cols.append([s + tt, s + hh, s + ww])
    nxt = s + max(t, h, w)
    cols += [[nxt + i] * 3 for i in range(n_after)]
    return np.array(cols).T


@pytest.mark.parametrize("grid", [(8, 4, 4), (20, 6, 6)])
def test_long_video_follows_original_rule(grid):
    ids = np.array([[5, 6, 7, 8] + video(grid) + [9, 10, 11, 12, 13]])
    pos, delta = mrope.get_rope_index(ids, None, [list(grid)], **TOKENS)
    ref = long_video_reference(5, grid, 6)  # 4 text tokens + vision_start; vision_end + 5 text tokens
    np.testing.assert_array_equal(pos[:, 0], ref)
    assert delta[0, 0] == ref.max() + 1 - ids.shape[1]
    # Text after the video starts at s + t, not s + max(h', w') as transformers 5.23 computes it.
    first_after = 5 + grid[0] * grid[1] * grid[2] // M**2
    assert pos[0, 0, first_after] == 5 + grid[0]
    assert hf_rope_index(ids, None, [list(grid)])[0][0, 0, first_after] == 5 + max(grid[1], grid[2]) // M


def test_decode_positions_continue_after_prompt():
    ids, mask = left_pad([[5] + video((8, 4, 4)) + [6], [7, 8, 9] + image((1, 4, 4)) + [10]])
    pos, delta = mrope.get_rope_index(ids, [[1, 4, 4]], [[8, 4, 4]], mask, **TOKENS)
    nxt = mrope.mrope_decode_position_ids(jnp.arange(ids.shape[1], ids.shape[1] + 2), jnp.asarray(delta))
    np.testing.assert_array_equal(np.asarray(nxt[:, :, 0]), np.broadcast_to(pos.max(axis=(0, 2)) + 1, (3, 2)))


JAX_KW = dict(TOKENS, max_visual_blocks=3)


def jax_index_fn():
    traces = []

    @functools.partial(jax.jit, static_argnames=tuple(JAX_KW))
    def f(ids, img, vid, mask, **kw):
        traces.append(1)
        return mrope.get_rope_index_jax(ids, img, vid, mask, **kw)

    return f, traces


def test_jax_rope_index_equals_numpy_and_compiles_once():
    f, traces = jax_index_fn()
    length, n_grid = 200, 4  # one bucket: [B=2, 200] tokens, grids padded to 4 rows
    batches = [
        ([[5] + image((1, 4, 6)) + [6, 7], [8, 9, 10] + video((2, 4, 6)) + [11] + image((1, 2, 2)) + [12]],
         [[1, 4, 6], [1, 2, 2]], [[2, 4, 6]]),
        ([[5, 6] + video((8, 4, 4)) + [7] + video((3, 2, 4)), [1, 2, 3, 4]], [], [[8, 4, 4], [3, 2, 4]]),
        ([[1] + image((1, 2, 2)) + image((1, 4, 2)) + image((1, 2, 6)) + [2], [3, 4] + image((1, 6, 6))],
         [[1, 2, 2], [1, 4, 2], [1, 2, 6], [1, 6, 6]], []),
        ([[5, 6, 7], [8] + video((20, 6, 6)) + [9, 10]], [], [[20, 6, 6]]),
    ]
    for rows, img, vid in batches:
        ids, mask = left_pad(rows)
        pad = length - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (pad, 0)))
        mask = np.pad(mask, ((0, 0), (pad, 0)))
        ref_pos, ref_delta = mrope.get_rope_index(ids, img or None, vid or None, mask, **TOKENS)
        img_p = np.zeros((n_grid, 3), np.int32)
        vid_p = np.zeros((n_grid, 3), np.int32)
        img_p[: len(img)] = np.reshape(img, (-1, 3))
        vid_p[: len(vid)] = np.reshape(vid, (-1, 3))
        pos, delta = f(jnp.asarray(ids, jnp.int32), jnp.asarray(img_p), jnp.asarray(vid_p), jnp.asarray(mask), **JAX_KW)
        np.testing.assert_array_equal(np.asarray(pos), ref_pos)
        np.testing.assert_array_equal(np.asarray(delta), ref_delta)
    assert len(traces) == 1


@pytest.mark.parametrize("name,rows,img,vid", CASES, ids=[c[0] for c in CASES])
def test_jax_rope_index_equals_numpy_without_mask(name, rows, img, vid):
    ids, _ = left_pad(rows)
    ref = mrope.get_rope_index(ids, img, vid, **TOKENS)
    img_j = None if img is None else jnp.asarray(img)
    vid_j = None if vid is None else jnp.asarray(vid)
    out = mrope.get_rope_index_jax(jnp.asarray(ids), img_j, vid_j, None, **JAX_KW)
    np.testing.assert_array_equal(np.asarray(out[0]), ref[0])
    np.testing.assert_array_equal(np.asarray(out[1]), ref[1])


def test_text_only_with_padding_matches_original_text_branch():
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]])
    pos, delta = mrope.get_rope_index(ids, None, None, mask, **TOKENS)
    expected = np.array([[0, 1, 2, 3], [1, 1, 0, 1]])  # cumsum(mask) - 1, padding filled with 1
    np.testing.assert_array_equal(pos, np.broadcast_to(expected, (3, 2, 4)))
    np.testing.assert_array_equal(delta, [[0], [-2]])
    out = mrope.get_rope_index_jax(jnp.asarray(ids), None, None, jnp.asarray(mask), **JAX_KW)
    np.testing.assert_array_equal(np.asarray(out[0]), pos)
    np.testing.assert_array_equal(np.asarray(out[1]), delta)


@pytest.mark.parametrize("name,rows,img,vid", CASES + [("long_video", [[5] + video((20, 6, 6)) + [6]], None, [[20, 6, 6]])],
                         ids=[c[0] for c in CASES] + ["long_video"])
def test_cos_sin_match_transformers_rotary(name, rows, img, vid):
    ids, _ = left_pad(rows)
    pos, _ = mrope.get_rope_index(ids, img, vid, **TOKENS)
    pos = pos + 1000  # large positions too: float32 angles of size ~1e3
    model = hf_model()
    rotary = hf.Qwen2VLRotaryEmbedding(model.config.text_config)
    x = torch.zeros(1, dtype=torch.float32)
    ref_cos, ref_sin = rotary(x, torch.tensor(pos))
    cos, sin = mrope.mrope_cos_sin(jnp.asarray(pos), 128, 1_000_000.0, (16, 24, 24))
    d = max(float(np.abs(np.asarray(cos) - ref_cos.numpy()).max()), float(np.abs(np.asarray(sin) - ref_sin.numpy()).max()))
    print(f"{name}: cos/sin max|d| {d:.3g}")
    assert cos.shape == tuple(ref_cos.shape) and d <= 1e-5
    # Rotating q with the rotate-half convention matches transformers' apply_rotary_pos_emb.
    q = np.random.default_rng(0).normal(size=(1, 2, ids.shape[1], 128)).astype(np.float32)  # [B, H, L, Dh]
    ref_q, _ = hf.apply_rotary_pos_emb(torch.tensor(q), torch.tensor(q), ref_cos, ref_sin)
    out_q = apply_rotary_pos_emb(jnp.asarray(q).transpose(0, 2, 1, 3), cos, sin).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(np.asarray(out_q), ref_q.numpy(), atol=5e-5)


def test_chunked_layout_and_text_equals_1d_rope():
    pos = np.stack([np.full((1, 3), 7), np.full((1, 3), 11), np.full((1, 3), 13)])  # [3, 1, 3]
    cos, _ = mrope.mrope_cos_sin(jnp.asarray(pos), 16, 10000.0, (2, 3, 3))
    inv = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    angle = np.concatenate([7 * inv[:2], 11 * inv[2:5], 13 * inv[5:]])  # contiguous sections, not interleaved
    np.testing.assert_allclose(np.asarray(cos[0, 0]), np.cos(np.concatenate([angle, angle])), atol=1e-6)
    ids1 = np.arange(5)[None]
    c3, s3 = mrope.mrope_cos_sin(jnp.asarray(np.stack([ids1] * 3)), 16, 10000.0, (2, 3, 3))
    c1, s1 = mrope.mrope_cos_sin(jnp.asarray(ids1), 16, 10000.0, (2, 3, 3))
    a = ids1[0][:, None] * inv
    np.testing.assert_allclose(np.asarray(c3[0]), np.cos(np.concatenate([a, a], -1)), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(c3), np.asarray(c1))
    np.testing.assert_array_equal(np.asarray(s3), np.asarray(s1))


def test_mrope_section_validation_names_both_values():
    with pytest.raises(ValueError, match=r"sum\(mrope_section\) = 64 .* head_dim // 2 = 40"):
        mrope.mrope_cos_sin(jnp.zeros((3, 1, 2), jnp.int32), 80, 1e6, (16, 24, 24))


def test_jax_rope_index_bound_below_the_grid_count_raises():
    """A bound smaller than the number of grids may be exceeded: never read the extra blocks as text."""
    rows = [[5] + image((1, 2, 2)) + image((1, 2, 2)) + image((1, 2, 2)) + [6]]
    ids, _ = left_pad(rows)
    grids = jnp.asarray([[1, 2, 2]] * 3)
    kw = dict(TOKENS, max_visual_blocks=2)
    with pytest.raises(ValueError, match="sequence 0 holds 3 images \\+ videos, more than max_visual_blocks=2"):
        mrope.get_rope_index_jax(jnp.asarray(ids), grids, None, None, **kw)
    traced = jax.jit(lambda i: mrope.get_rope_index_jax(i, grids, None, None, **kw))
    with pytest.raises(Exception, match="more than max_visual_blocks=2"):
        jax.block_until_ready(traced(jnp.asarray(ids)))
    ref = mrope.get_rope_index(ids, [[1, 2, 2]] * 3, None, **TOKENS)[0]
    unbounded = mrope.get_rope_index_jax(jnp.asarray(ids), grids, None, None, **TOKENS)[0]
    np.testing.assert_array_equal(np.asarray(unbounded), ref)
