"""Video-ChatGPT pooling and MiniGPT4-video concatenation vs NumPy transcriptions of the spec."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vjax.layers.pooling import concat_adjacent_tokens, video_chatgpt_pool, video_chatgpt_token_mask


def np_video_chatgpt(frames: np.ndarray, num_temporal: int = 100) -> np.ndarray:
    """spec_vit_family.md §2.3 for ONE video of T real frames ``[T, N, C]`` (loops, float64); the release
    (``get_spatio_temporal_features_torch``) pads the temporal tokens only when T < 100."""
    t_, n_, c_ = frames.shape
    temporal = np.zeros((max(num_temporal, t_), c_))
    for i in range(t_):
        temporal[i] = sum(frames[i, n] for n in range(n_)) / n_
    spatial = np.zeros((n_, c_))
    for n in range(n_):
        spatial[n] = sum(frames[i, n] for i in range(t_)) / t_
    return np.concatenate([temporal, spatial], 0)


def np_minigpt4_concat(frame: np.ndarray) -> np.ndarray:
    """spec_qformer_family.md §3.1: 4 consecutive raster-order patches concatenated channel-wise."""
    n_, c_ = frame.shape
    out = np.zeros((n_ // 4, 4 * c_), frame.dtype)
    for j in range(n_ // 4):
        for q in range(4):
            out[j, q * c_ : (q + 1) * c_] = frame[4 * j + q]
    return out


@pytest.mark.parametrize("t,n,c", [(7, 256, 4), (100, 16, 3), (1, 9, 5)])
def test_video_chatgpt_pool_matches_numpy(t, n, c):
    x = np.random.default_rng(t).normal(size=(2, t, n, c)).astype(np.float32)
    out = jax.jit(video_chatgpt_pool)(jnp.asarray(x))
    assert out.shape == (2, 100 + n, c)
    for b in range(2):
        np.testing.assert_allclose(np.asarray(out[b]), np_video_chatgpt(x[b].astype(np.float64)), atol=1e-5)
    assert not np.any(np.asarray(out[:, t:100]))  # zero padding of the temporal tokens


def test_clip_l14_token_count_is_356():
    out = video_chatgpt_pool(jnp.ones((1, 12, 256, 2)))
    assert out.shape == (1, 356, 2)


@pytest.mark.parametrize("seed", range(3))
def test_padded_frames_change_nothing(seed):
    rng = np.random.default_rng(seed)
    t_max, n, c = 10, 6, 3
    real_counts = [4, 10, 1]
    x = rng.normal(size=(3, t_max, n, c)).astype(np.float32)
    mask = np.zeros((3, t_max), bool)
    for b, k in enumerate(real_counts):
        mask[b, rng.choice(t_max, size=k, replace=False)] = True  # padding anywhere in the clip
    out = video_chatgpt_pool(jnp.asarray(x), jnp.asarray(mask), num_temporal=12)
    garbage = np.where(mask[..., None, None], x, rng.normal(size=x.shape) * 100).astype(np.float32)
    out2 = video_chatgpt_pool(jnp.asarray(garbage), jnp.asarray(mask), num_temporal=12)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))
    for b in range(3):
        real = x[b][mask[b]]  # real frames, in order
        alone = video_chatgpt_pool(jnp.asarray(real[None]), num_temporal=12)
        np.testing.assert_allclose(np.asarray(out[b]), np.asarray(alone[0]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(out[b]), np_video_chatgpt(real.astype(np.float64), 12), atol=1e-5)


def test_pool_keeps_dtype():
    out = video_chatgpt_pool(jnp.ones((1, 3, 4, 2), jnp.bfloat16), num_temporal=None)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 7, 2)


def test_more_frames_than_num_temporal_pool_every_frame_as_the_release():
    """101 frames: the release keeps 101 temporal tokens (it only pads below 100). In a batch, a clip with
    fewer real frames gets its own max(num_temporal, T_b) + N tokens first; the mask marks them."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1, 101, 6, 3)).astype(np.float32)
    out = video_chatgpt_pool(jnp.asarray(x))
    assert out.shape == (1, 107, 3)
    np.testing.assert_allclose(np.asarray(out[0]), np_video_chatgpt(x[0].astype(np.float64)), atol=1e-5)
    x = rng.normal(size=(3, 7, 4, 2)).astype(np.float32)
    mask = np.zeros((3, 7), bool)
    mask[0], mask[1, :6], mask[2, [1, 4]] = True, True, True  # 7, 6 and 2 real frames, num_temporal 5
    out = np.asarray(video_chatgpt_pool(jnp.asarray(x), jnp.asarray(mask), num_temporal=5))
    token_mask = np.asarray(video_chatgpt_token_mask(jnp.asarray(mask), 5, 4))
    assert out.shape == (3, 7 + 4, 2) and token_mask.sum(axis=1).tolist() == [11, 10, 9]
    for b in range(3):
        ref = np_video_chatgpt(x[b][mask[b]].astype(np.float64), 5)  # [max(5, T_b) + 4, 2]
        n = len(ref)
        assert token_mask[b, :n].all() and not token_mask[b, n:].any()
        np.testing.assert_allclose(out[b, :n], ref, atol=1e-5)
        assert not np.any(out[b, n:])


def test_minigpt4_concat_matches_numpy_and_is_1x4_horizontal():
    x = np.random.default_rng(0).normal(size=(3, 256, 5)).astype(np.float32)  # 3 frames
    out = np.asarray(jax.jit(concat_adjacent_tokens)(jnp.asarray(x)))
    assert out.shape == (3, 64, 20)
    for f in range(3):
        np.testing.assert_array_equal(out[f], np_minigpt4_concat(x[f]))
    # On the 16 x 16 patch grid, token j covers row j // 4, columns 4 * (j % 4) .. 4 * (j % 4) + 3.
    grid = np.arange(256).reshape(16, 16)
    ids = np.asarray(concat_adjacent_tokens(jnp.asarray(grid.reshape(1, 256, 1))))[0]  # [64, 4]
    for j in range(64):
        r, q = divmod(j, 4)
        assert ids[j].tolist() == grid[r, 4 * q : 4 * q + 4].tolist()
    with pytest.raises(ValueError, match="divisible"):
        concat_adjacent_tokens(jnp.ones((1, 10, 2)))
