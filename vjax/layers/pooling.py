"""Parameter-free token pooling of per-frame patch features.

* Video-ChatGPT spatio-temporal pooling (Maaz et al. 2023, arXiv 2306.05424, §3; mbzuai-oryx/Video-ChatGPT
  ``get_spatio_temporal_features_torch`` / ``scripts/save_spatio_temporal_clip_features.py``).
  For patch features ``F [T, N, C]`` of T real frames:

      t_i = mean_n F[i, n]     i = 0 .. T-1, zero-padded at the end to ``num_temporal`` (100) tokens
      s_n = mean_i F[i, n]     n = 0 .. N-1 (mean over the real frames only)
      V   = [t_0 .. t_{99} ; s_0 .. s_{N-1}]                           -> [100 + N, C] (356 for CLIP-L/14)

  The release pads only up to 100: given more frames it keeps one temporal token per frame (T + N tokens).

* MiniGPT4-video adjacent-token concatenation (Ataallah et al. 2024, arXiv 2404.03413; Vision-CAIR/MiniGPT4-video
  ``mini_gpt4_llama_v2.py``, ``token_pooling``): the 256 patch tokens of a frame (CLS dropped), in raster
  order, are viewed as 64 groups of 4 consecutive tokens and each group is concatenated channel-wise:
  ``[256, C] -> [64, 4C]`` (1x4 horizontal groups inside each 16-patch row, not 2x2 squares).

* LLaVA-NeXT-Video spatial average pooling (Zhang et al. 2024, "LLaVA-NeXT: A Strong Zero-shot Video
  Understanding Model"; transformers ``LlavaNextVideoPooler``, ``spatial_pool_mode="average"``): each frame's
  ``h x w`` patch grid is averaged over non-overlapping ``s x s`` windows (window = stride, no padding), so
  ``[h * w, C] -> [floor(h / s) * floor(w / s), C]`` (CLIP-L/14-336: 24 x 24 -> 12 x 12 = 144 per frame).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def video_chatgpt_pool(
    features: jax.Array, frame_mask: jax.Array | None = None, num_temporal: int | None = 100
) -> jax.Array:
    """Video-ChatGPT spatio-temporal pooling: ``[temporal tokens ; spatial tokens]`` per clip.

    Temporal token i is the mean over the N patches of the i-th real frame; the real frames' tokens
    come first (in frame order), zero tokens pad them to ``num_temporal`` (the official code zero-pads to
    100; a clip of more real frames keeps one token per frame, as the release). Spatial token n is the mean
    of patch n over the real frames. A clip of ``T_b`` real frames thus has ``M_b = max(num_temporal, T_b)``
    temporal then N spatial tokens; the output has ``max(num_temporal, T) + N`` slots, and a clip shorter
    than the longest fills the slots after its own ``M_b + N`` tokens with zeros
    (:func:`video_chatgpt_token_mask` marks them). Padded frames (``frame_mask`` False, anywhere in the clip)
    change no output. Means accumulate in float32; the output has the input dtype.

    Args:
      features: ``[B, T, N, C]`` per-frame patch features (CLIP layer -2, CLS dropped).
      frame_mask: ``[B, T]`` bool, True for real frames (default: all real). A sample with no real
        frame gets zero tokens.
      num_temporal: temporal tokens of a clip of at most that many frames (Video-ChatGPT: 100); ``None``
        uses T.

    Returns:
      ``[B, max(num_temporal, T) + N, C]``.

    >>> import jax.numpy as jnp
    >>> f = jnp.arange(2 * 3 * 1, dtype=jnp.float32).reshape(1, 2, 3, 1)   # T=2 frames, N=3 patches
    >>> video_chatgpt_pool(f, num_temporal=4)[0, :, 0].tolist()
    [1.0, 4.0, 0.0, 0.0, 1.5, 2.5, 3.5]
    >>> video_chatgpt_pool(f, num_temporal=1)[0, :, 0].tolist()          # more frames than num_temporal
    [1.0, 4.0, 1.5, 2.5, 3.5]
    """
    b, t, n, c = features.shape
    num_temporal = t if num_temporal is None else int(num_temporal)
    slots = max(num_temporal, t)
    if frame_mask is None:
        frame_mask = jnp.ones((b, t), bool)
    frame_mask = jnp.asarray(frame_mask, bool)
    x = features.astype(jnp.float32)
    w = frame_mask.astype(jnp.float32)  # [B, T]
    temporal = jnp.mean(x, axis=2) * w[..., None]  # [B, T, C]
    # Move real frames to the front (stable: frame order kept); padded ones become zero slots at the end.
    order = jnp.argsort(~frame_mask, axis=1, stable=True)  # [B, T]
    temporal = jnp.take_along_axis(temporal, order[..., None], axis=1)  # [B, T, C]
    temporal = jnp.pad(temporal, ((0, 0), (0, slots - t), (0, 0)))  # [B, slots, C]
    n_real = jnp.sum(w, axis=1)  # [B]
    spatial = jnp.einsum("btnc,bt->bnc", x, w, precision=jax.lax.Precision.HIGHEST)  # [B, N, C]
    spatial = spatial / jnp.maximum(n_real, 1.0)[:, None, None]
    # Each clip's spatial tokens follow its own M_b = max(num_temporal, T_b) temporal tokens.
    m = jnp.maximum(num_temporal, jnp.sum(frame_mask, axis=1))[:, None]  # [B, 1]
    pos = jnp.arange(slots + n)[None, :]  # [1, S]
    t_idx = jnp.broadcast_to(jnp.minimum(pos, slots - 1), (b, slots + n))
    from_temporal = jnp.take_along_axis(temporal, t_idx[..., None], axis=1)
    from_spatial = jnp.take_along_axis(spatial, jnp.clip(pos - m, 0, n - 1)[..., None], axis=1)
    out = jnp.where((pos < m)[..., None], from_temporal, jnp.where((pos < m + n)[..., None], from_spatial, 0.0))
    return out.astype(features.dtype)  # [B, max(num_temporal, T) + N, C]


def video_chatgpt_token_mask(frame_mask: jax.Array, num_temporal: int, num_patches: int) -> jax.Array:
    """``bool [B, max(num_temporal, T) + N]``: the slots of :func:`video_chatgpt_pool` that hold a clip's
    tokens (its first ``max(num_temporal, T_b) + N``).

    >>> import jax.numpy as jnp
    >>> video_chatgpt_token_mask(jnp.array([[True, True, True], [True, False, False]]), 2, 1).astype(int).tolist()
    [[1, 1, 1, 1], [1, 1, 1, 0]]
    """
    frame_mask = jnp.asarray(frame_mask, bool)
    slots = max(int(num_temporal), frame_mask.shape[1]) + num_patches
    m = jnp.maximum(num_temporal, jnp.sum(frame_mask, axis=1))[:, None]
    return jnp.arange(slots)[None, :] < m + num_patches


def concat_adjacent_tokens(tokens: jax.Array, group: int = 4) -> jax.Array:
    """MiniGPT4-video token pooling: concatenate ``group`` consecutive tokens channel-wise.

    ``out[..., j, :] = concat(x[..., group*j], ..., x[..., group*j + group - 1])``, i.e. a row-major
    view ``[..., N, C] -> [..., N / group, group * C]`` (MiniGPT4-video: ``[256, 1408] -> [64, 5632]``).

    Args:
      tokens: ``[..., N, C]`` patch tokens in raster order, CLS already dropped; ``N % group == 0``.

    >>> import jax.numpy as jnp
    >>> x = jnp.arange(8.0).reshape(1, 8, 1)     # [B, N=8, C=1]
    >>> concat_adjacent_tokens(x).tolist()
    [[[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]]
    """
    *lead, n, c = tokens.shape
    if n % group:
        raise ValueError(f"number of tokens {n} is not divisible by the group size {group}")
    return tokens.reshape(*lead, n // group, group * c)


def spatial_avg_pool(features: jax.Array, grid: tuple[int, int], stride: int = 2) -> jax.Array:
    """Average pooling of row-major patch tokens over ``stride x stride`` windows of their 2-D grid.

        out[..., i * w' + j, :] = mean_{a, b < s} x[..., (s*i + a) * w + (s*j + b), :]
        h' = floor(h / s),  w' = floor(w / s)

    The same numbers as torch ``nn.AvgPool2d(kernel_size=s, stride=s)`` (``ceil_mode=False``, no padding):
    on an odd grid the last row/column of patches falls outside every window and is dropped. Sums
    accumulate in float32; the output has the input dtype.

    Args:
      features: ``[..., h * w, C]`` patch tokens of one grid each (e.g. ``[B, T, N, C]``), raster order.
      grid: ``(h, w)``, rows and columns of patches.
      stride: window side and step ``s``.

    Returns:
      ``[..., h' * w', C]``.

    >>> import jax.numpy as jnp
    >>> x = jnp.arange(16.0).reshape(1, 16, 1)          # a 4 x 4 grid, one channel
    >>> spatial_avg_pool(x, (4, 4))[0, :, 0].tolist()
    [2.5, 4.5, 10.5, 12.5]
    >>> spatial_avg_pool(jnp.arange(25.0).reshape(25, 1), (5, 5))[:, 0].tolist()   # odd: row/col 4 dropped
    [3.0, 5.0, 13.0, 15.0]
    """
    h, w = grid
    *lead, n, c = features.shape
    if n != h * w:
        raise ValueError(f"{n} tokens do not form the {h} x {w} grid")
    s = int(stride)
    hp, wp = h // s, w // s
    if hp == 0 or wp == 0:
        raise ValueError(f"grid {h} x {w} is smaller than the pooling window {s} x {s}")
    x = features.reshape(*lead, h, w, c)[..., : hp * s, : wp * s, :]  # [..., h's, w's, C]
    x = x.reshape(*lead, hp, s, wp, s, c).astype(jnp.float32)
    out = jnp.mean(x, axis=(-4, -2))  # [..., h', w', C]
    return out.reshape(*lead, hp * wp, c).astype(features.dtype)
