"""Qwen2-VL multimodal rotary position embedding (M-RoPE; Wang et al. 2024, arXiv 2409.12191, §2.1).

Every token has three position ids (temporal, height, width) ``position_ids [3, B, L]``. The ``head_dim / 2``
rotary frequencies ``inv_freq[i] = theta ** (-2i / head_dim)`` are split into **contiguous** sections
``mrope_section = (s_t, s_h, s_w)`` (Qwen2-VL-7B: (16, 24, 24) of 64): frequency i rotates with

    axis(i) = 0 (temporal) for i < s_t,  1 (height) for s_t <= i < s_t + s_h,  2 (width) otherwise
    angle[b, l, i] = position_ids[axis(i), b, l] * inv_freq[i]         -> [B, L, head_dim/2], duplicated to head_dim

then ``x * cos + rotate_half(x) * sin`` (``vjax.layers.rope.apply_rotary_pos_emb``). This is the chunked
layout of Qwen2-VL / Qwen2.5-VL (transformers ``apply_multimodal_rotary_pos_emb``), not the interleaved
layout of Qwen3-VL. With equal ids on the three axes it is ordinary 1-D RoPE.

Position ids (``get_rope_index``) follow the ORIGINAL Qwen2-VL rule (transformers 4.45-4.5x
``Qwen2VLForConditionalGeneration.get_rope_index``, also vLLM), on the tokens kept by ``attention_mask``:

* text continues from ``(largest id so far) + 1`` with equal ids on the three axes;
* a visual block of grid ``(t, h, w)`` (patches; merged grid ``h' = h / m``, ``w' = w / m`` with
  ``m = spatial_merge_size``) whose first token would get text id ``s`` has ``t * h' * w'`` tokens in
  ``(t, h', w')`` order with ids ``(s + frame_pair, s + row, s + col)``; the text after it starts at
  ``s + max(t, h', w')`` (transformers 5.x uses ``s + max(h', w')``, which differs for long videos);
* blocks are found by counting ``vision_start`` tokens followed by an image/video token, then taking, from
  the current position, whichever of the next image or video token comes first; grids are consumed in
  order from ``image_grid_thw`` / ``video_grid_thw`` across the whole batch;
* padded positions get id 1; ``rope_deltas[b] = max(ids of b) + 1 - L`` (L = padded length), so decoding
  token at cache position p uses id ``p + rope_deltas[b]`` on all three axes.
* without any grid (text only): ids = ``cumsum(attention_mask) - 1`` (padded: 1), ``rope_deltas`` = max + 1 - L
  (including the padded 1s), or ``arange(L)`` and 0 without a mask.

``get_rope_index`` runs in NumPy for the data pipeline; ``get_rope_index_jax`` is the same rule with static
shapes for use under ``jax.jit``: it scans one slot per grid row it is given (every block consumes one row, so
that is always enough), or at most ``max_visual_blocks`` slots when a smaller bound is asked for, and then
raises when a sequence holds more blocks than that bound (they would otherwise be read as text).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vjax.layers.rope import rope_inv_freq



def check_mrope_section(head_dim: int, mrope_section: Sequence[int]) -> tuple[int, int, int]:
    """Validate ``mrope_section`` (three sizes summing to ``head_dim // 2``).

    >>> check_mrope_section(128, [16, 24, 24])
    (16, 24, 24)
    >>> check_mrope_section(64, [16, 24, 24])
    Traceback (most recent call last):
    ...
    ValueError: sum(mrope_section) = 64 must equal head_dim // 2 = 32 (head_dim = 64, mrope_section = [16, 24, 24])
    """
    section = tuple(int(s) for s in mrope_section)
    if len(section) != 3 or min(section) < 0:
        raise ValueError(f"mrope_section must be three non-negative sizes (t, h, w), got {list(mrope_section)}")
    if head_dim % 2 or sum(section) != head_dim // 2:
        raise ValueError(
            f"sum(mrope_section) = {sum(section)} must equal head_dim // 2 = {head_dim // 2} "
            f"(head_dim = {head_dim}, mrope_section = {list(mrope_section)})"
        )
    return section  # type: ignore[return-value]


def mrope_cos_sin(
    position_ids: jax.Array,
    head_dim: int,
    theta: float = 1_000_000.0,
    mrope_section: Sequence[int] = (16, 24, 24),
) -> tuple[jax.Array, jax.Array]:
    """M-RoPE cos/sin tables with Qwen2-VL's chunked section layout.

    ``angle[b, l, i] = position_ids[axis(i), b, l] * theta ** (-2i / head_dim)`` with ``axis(i)`` given by the
    contiguous ``mrope_section`` chunks (module docstring); ``cos = cos([angle, angle])``, same for sin.
    Float32. Qwen2-VL: ``theta = 1e6``, ``mrope_section = (16, 24, 24)``, ``head_dim = 128``.

    Args:
      position_ids: ``[3, B, L]`` integer (t, h, w) ids (``[B, L]`` is broadcast to the three axes).

    Returns:
      ``(cos, sin)``, each ``[B, L, head_dim]`` float32.

    >>> import jax.numpy as jnp
    >>> ids = jnp.array([[[0, 1]], [[0, 2]], [[0, 3]]])           # [3, B=1, L=2]
    >>> cos, sin = mrope_cos_sin(ids, head_dim=6, theta=10000.0, mrope_section=(1, 1, 1))
    >>> cos.shape, [round(float(a), 4) for a in jnp.arccos(cos[0, 1, :3])]
    ((1, 2, 6), [1.0, 0.0928, 0.0065])
    """
    section = check_mrope_section(head_dim, mrope_section)
    position_ids = jnp.asarray(position_ids)
    if position_ids.ndim == 2:
        position_ids = jnp.broadcast_to(position_ids[None], (3,) + position_ids.shape)
    if position_ids.ndim != 3 or position_ids.shape[0] != 3:
        raise ValueError(f"position_ids must be [3, B, L] (or [B, L]), got shape {position_ids.shape}")
    inv_freq = jnp.asarray(rope_inv_freq(head_dim, theta), jnp.float32)  # [Dh/2]
    axis_of_freq = np.repeat(np.arange(3), section)  # [Dh/2] -> 0/1/2, contiguous chunks
    pos = position_ids.astype(jnp.float32)[axis_of_freq]  # [Dh/2, B, L]
    angle = jnp.moveaxis(pos, 0, -1) * inv_freq  # [B, L, Dh/2]
    angle = jnp.concatenate([angle, angle], axis=-1)  # [B, L, Dh]
    return jnp.cos(angle), jnp.sin(angle)


def mrope_decode_position_ids(cache_position: jax.Array, rope_deltas: jax.Array) -> jax.Array:
    """Position ids of decoded tokens: ``cache_position + rope_deltas`` on all three axes.

    Args:
      cache_position: ``[L]`` or ``[B, L]`` positions in the (padded) sequence.
      rope_deltas: ``[B, 1]`` from ``get_rope_index``.

    Returns:
      ``[3, B, L]``.

    >>> import jax.numpy as jnp
    >>> mrope_decode_position_ids(jnp.array([7, 8]), jnp.array([[-3]])).tolist()
    [[[4, 5]], [[4, 5]], [[4, 5]]]
    """
    pos = jnp.asarray(cache_position)
    if pos.ndim == 1:
        pos = pos[None, :]
    ids = pos + jnp.asarray(rope_deltas).reshape(-1, 1)  # [B, L]
    return jnp.broadcast_to(ids[None], (3,) + ids.shape)


# ----------------------------------------------------------------------------------------------------------
# Position ids: host NumPy version.


def _count_blocks(ids: np.ndarray, token_id: int, vision_start_token_id: int) -> int:
    starts = np.flatnonzero(ids[:-1] == vision_start_token_id)
    return int(np.sum(ids[starts + 1] == token_id))


def get_rope_index(
    input_ids,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask=None,
    *,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2-VL (t, h, w) position ids, original rule (module docstring), in NumPy for the data pipeline.

    Args:
      input_ids: ``[B, L]`` token ids with each image/video expanded to ``t * h * w / m^2`` pad tokens.
      image_grid_thw, video_grid_thw: ``[num, 3]`` patch grids of all images / videos of the batch, in order.
      attention_mask: ``[B, L]`` (1 real, 0 padding; any padding side).
      image_token_id, video_token_id, vision_start_token_id: Qwen2-VL: 151655, 151656, 151652.
      spatial_merge_size: m (Qwen2-VL: 2).

    Returns:
      ``(position_ids [3, B, L] int64, rope_deltas [B, 1] int64)``.

    >>> import numpy as np
    >>> V, I = 50, 51                                              # vision_start, image_pad
    >>> ids = np.array([[1, 2, V, I, I, I, I, I, I, 3, 4]])         # an image of 2 x 3 merged tokens
    >>> pos, delta = get_rope_index(ids, np.array([[1, 4, 6]]), image_token_id=I, video_token_id=52,
    ...                             vision_start_token_id=V)
    >>> pos[:, 0].tolist()
    [[0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7], [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7], [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]]
    >>> delta.tolist()
    [[-3]]
    """
    input_ids = np.asarray(input_ids)
    b, length = input_ids.shape
    mask = np.ones((b, length), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)

    if image_grid_thw is None and video_grid_thw is None:
        if attention_mask is None:
            pos = np.broadcast_to(np.arange(length, dtype=np.int64), (3, b, length)).copy()
            return pos, np.zeros((b, 1), np.int64)
        ids1 = np.where(mask, np.cumsum(mask, axis=1) - 1, 1).astype(np.int64)  # [B, L]
        deltas = ids1.max(axis=1, keepdims=True) + 1 - length
        return np.broadcast_to(ids1, (3, b, length)).copy(), deltas.astype(np.int64)

    img_grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64)
    vid_grids = np.zeros((0, 3), np.int64) if video_grid_thw is None else np.asarray(video_grid_thw, np.int64)
    m = spatial_merge_size
    pos = np.ones((3, b, length), np.int64)
    deltas = np.zeros((b, 1), np.int64)
    img_ptr = vid_ptr = 0
    for i in range(b):
        ids = input_ids[i][mask[i]]
        n = len(ids)
        rem_img = _count_blocks(ids, image_token_id, vision_start_token_id)
        rem_vid = _count_blocks(ids, video_token_id, vision_start_token_id)
        chunks = []  # each [3, n_chunk]
        st, next_id = 0, 0
        for _ in range(rem_img + rem_vid):
            img_hits = np.flatnonzero(ids[st:] == image_token_id) if rem_img > 0 else []
            vid_hits = np.flatnonzero(ids[st:] == video_token_id) if rem_vid > 0 else []
            ed_img = st + int(img_hits[0]) if len(img_hits) else n + 1
            ed_vid = st + int(vid_hits[0]) if len(vid_hits) else n + 1
            if ed_img < ed_vid:
                grid, ed = img_grids[img_ptr], ed_img
                img_ptr, rem_img = img_ptr + 1, rem_img - 1
            else:
                grid, ed = vid_grids[vid_ptr], ed_vid
                vid_ptr, rem_vid = vid_ptr + 1, rem_vid - 1
            gt, gh, gw = int(grid[0]), int(grid[1]) // m, int(grid[2]) // m
            text = np.arange(ed - st) + next_id
            chunks.append(np.stack([text] * 3))
            s = next_id + (ed - st)
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
            chunks.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + s)  # [3, t*h'*w']
            next_id = s + max(gt, gh, gw)
            st = ed + gt * gh * gw
        if st < n:
            text = np.arange(n - st) + next_id
            chunks.append(np.stack([text] * 3))
        llm_pos = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)
        pos[:, i, mask[i]] = llm_pos
        deltas[i, 0] = (llm_pos.max() + 1 if llm_pos.size else 0) - length
    return pos, deltas


# ----------------------------------------------------------------------------------------------------------
# Position ids: static-shape JAX version.


def get_rope_index_jax(
    input_ids: jax.Array,
    image_grid_thw: jax.Array | None = None,
    video_grid_thw: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    *,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int = 2,
    max_visual_blocks: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``get_rope_index`` with static shapes (jitted; also usable inside ``jax.jit``; int32).

    Same rule and outputs as the NumPy version. Grids may be padded with unused rows (only the first
    ``#blocks`` rows are read), so one compiled function serves every batch of a bucket. Whether a grid
    argument is ``None`` is static (``None`` for both selects the text-only rule).

    ``max_visual_blocks``: blocks (images + videos) scanned per sequence. ``None`` (default): the number of
    grid rows given, which every valid input respects (each block consumes a row). A smaller bound makes
    the scan shorter; a sequence holding more blocks than it raises ``ValueError`` naming the bound — at
    once when ``input_ids`` is a concrete array, or when the compiled function runs (through a host
    callback, as a ``JaxRuntimeError`` carrying the same message) when it is traced.

    Algorithm: compact the unmasked tokens to the front; a ``lax.scan`` over block slots finds each block's
    start, grid, first id ``s`` and the next text id; every token then reads its block (a count of block
    starts before it) and gets ``s + (tt, hh, ww)`` inside a block or ``next_id + offset`` in the text after
    it; ids are scattered back to their unpadded positions.

    >>> import jax, jax.numpy as jnp
    >>> V, I = 50, 51
    >>> ids = jnp.array([[1, 2, V, I, I, I, I, I, I, 3, 4]])
    >>> pos, delta = get_rope_index_jax(ids, jnp.array([[1, 4, 6]]), None, image_token_id=I, video_token_id=52,
    ...                                 vision_start_token_id=V, max_visual_blocks=2)
    >>> pos[:, 0].tolist(), delta.tolist()
    ([[0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7], [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7], [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]], [[-3]])
    """
    rows = sum(int(np.shape(g)[0]) for g in (image_grid_thw, video_grid_thw) if g is not None)
    bound = rows if max_visual_blocks is None else int(max_visual_blocks)
    if bound < 0:
        raise ValueError(f"max_visual_blocks must be >= 0, got {max_visual_blocks}")
    check = bound < rows  # a bound below the grid count can be exceeded by a valid prompt
    if check and not isinstance(input_ids, jax.core.Tracer):
        mask = None if attention_mask is None else np.asarray(attention_mask).astype(bool)
        _raise_if_over(visual_blocks_per_sequence(np.asarray(input_ids), mask, image_token_id, video_token_id,
                                                  vision_start_token_id), bound)
        check = False
    return _get_rope_index_jax(
        input_ids,
        image_grid_thw,
        video_grid_thw,
        attention_mask,
        int(image_token_id),
        int(video_token_id),
        int(vision_start_token_id),
        int(spatial_merge_size),
        max(bound, 1),
        check,
    )


def visual_blocks_per_sequence(input_ids: np.ndarray, attention_mask: np.ndarray | None, image_token_id: int,
                               video_token_id: int, vision_start_token_id: int) -> np.ndarray:
    """``[B]`` images + videos in each sequence (a ``vision_start`` directly followed, among the tokens kept by
    the mask, by an image or video token).

    >>> import numpy as np
    >>> visual_blocks_per_sequence(np.array([[7, 50, 51, 51, 50, 52, 3]]), None, 51, 52, 50).tolist()
    [2]
    """
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    return np.array([_count_blocks(row[m], image_token_id, vision_start_token_id)
                     + _count_blocks(row[m], video_token_id, vision_start_token_id) for row, m in zip(ids, mask)],
                    np.int64)


def _raise_if_over(blocks, bound: int) -> None:
    blocks = np.asarray(blocks)
    if blocks.size and int(blocks.max()) > bound:
        row = int(np.argmax(blocks))
        raise ValueError(f"sequence {row} holds {int(blocks[row])} images + videos, more than max_visual_blocks="
                         f"{bound}; raise max_visual_blocks (or leave it None: sized from the grids)")


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8, 9))
def _get_rope_index_jax(
    input_ids,
    image_grid_thw,
    video_grid_thw,
    attention_mask,
    image_token_id,
    video_token_id,
    vision_start_token_id,
    spatial_merge_size,
    max_visual_blocks,
    check_bound,
):
    input_ids = jnp.asarray(input_ids)
    b, length = input_ids.shape
    mask = jnp.ones((b, length), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)

    if image_grid_thw is None and video_grid_thw is None:
        if attention_mask is None:
            pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (3, b, length))
            return pos, jnp.zeros((b, 1), jnp.int32)
        ids1 = jnp.where(mask, jnp.cumsum(mask, axis=1) - 1, 1).astype(jnp.int32)
        deltas = jnp.max(ids1, axis=1, keepdims=True) + 1 - length
        return jnp.broadcast_to(ids1[None], (3, b, length)), deltas.astype(jnp.int32)

    def grids_or_dummy(g):
        g = jnp.zeros((0, 3), jnp.int32) if g is None else jnp.asarray(g).astype(jnp.int32)
        return jnp.concatenate([g, jnp.ones((1, 3), jnp.int32)], axis=0)  # a dummy row: never empty

    img_grids, vid_grids = grids_or_dummy(image_grid_thw), grids_or_dummy(video_grid_thw)
    m = spatial_merge_size
    n_valid = jnp.sum(mask, axis=1).astype(jnp.int32)  # [B]
    # Compact unmasked tokens to the front (stable); the tail is filled with a sentinel.
    order = jnp.argsort(~mask, axis=1, stable=True)
    ids_c = jnp.take_along_axis(input_ids, order, axis=1)
    idx = jnp.arange(length, dtype=jnp.int32)
    valid_c = idx[None, :] < n_valid[:, None]
    sentinel = jnp.asarray(min(image_token_id, video_token_id, vision_start_token_id) - 1, ids_c.dtype)
    ids_c = jnp.where(valid_c, ids_c, sentinel)

    # Blocks per sequence and where each sequence's grids start in the batch-wide grid lists.
    nxt = jnp.concatenate([ids_c[:, 1:], jnp.full((b, 1), sentinel, ids_c.dtype)], axis=1)
    is_start = ids_c == vision_start_token_id
    n_img = jnp.sum(is_start & (nxt == image_token_id), axis=1).astype(jnp.int32)
    n_vid = jnp.sum(is_start & (nxt == video_token_id), axis=1).astype(jnp.int32)
    img_off = jnp.cumsum(n_img) - n_img
    vid_off = jnp.cumsum(n_vid) - n_vid
    if check_bound:  # traced ids with a bound below the grid count: checked when the function runs
        jax.debug.callback(functools.partial(_raise_if_over, bound=max_visual_blocks), n_img + n_vid)

    def per_sequence(ids, n_img_b, n_vid_b, img_off_b, vid_off_b, n_valid_b):
        is_img = ids == image_token_id
        is_vid = ids == video_token_id
        big = length + 1

        def first_at_or_after(hit, st):
            cand = hit & (idx >= st)
            return jnp.where(jnp.any(cand), jnp.argmax(cand), big).astype(jnp.int32)

        def step(carry, j):
            st, next_id, rem_img, rem_vid, ip, vp = carry
            active = j < n_img_b + n_vid_b
            ed_img = jnp.where(rem_img > 0, first_at_or_after(is_img, st), big)
            ed_vid = jnp.where(rem_vid > 0, first_at_or_after(is_vid, st), big)
            use_img = ed_img < ed_vid
            ed = jnp.where(use_img, ed_img, ed_vid)
            g_img = img_grids[jnp.minimum(img_off_b + ip, img_grids.shape[0] - 1)]
            g_vid = vid_grids[jnp.minimum(vid_off_b + vp, vid_grids.shape[0] - 1)]
            grid = jnp.where(use_img, g_img, g_vid)
            gt, gh, gw = grid[0], grid[1] // m, grid[2] // m
            s = next_id + (ed - st)
            n_tok = gt * gh * gw
            new = (
                ed + n_tok,
                s + jnp.maximum(gt, jnp.maximum(gh, gw)),
                rem_img - use_img.astype(jnp.int32),
                rem_vid - (~use_img).astype(jnp.int32),
                ip + use_img.astype(jnp.int32),
                vp + (~use_img).astype(jnp.int32),
            )
            carry = jax.tree.map(lambda a, c: jnp.where(active, a, c), new, carry)
            record = (jnp.where(active, ed, big), n_tok, s, gt, gh, gw)
            return carry, record

        zero = jnp.int32(0)
        init = (zero, zero, n_img_b, n_vid_b, zero, zero)
        _, (bstart, bn, bs, bt, bh, bw) = jax.lax.scan(step, init, jnp.arange(max_visual_blocks))
        # Each token's block: the last block starting at or before it (-1: text before any block).
        blk = jnp.sum(bstart[None, :] <= idx[:, None], axis=1) - 1  # [L]
        has = blk >= 0
        kb = jnp.maximum(blk, 0)
        e, nb, sb = bstart[kb], bn[kb], bs[kb]
        tb, hb, wb = bt[kb], bh[kb], bw[kb]
        local = idx - e
        in_block = has & (local < nb)
        hw = jnp.maximum(hb * wb, 1)
        vis = jnp.stack([local // hw, (local // jnp.maximum(wb, 1)) % jnp.maximum(hb, 1), local % jnp.maximum(wb, 1)])
        after = sb + jnp.maximum(tb, jnp.maximum(hb, wb)) + (local - nb)
        text = jnp.where(has, after, idx)  # [L]
        pos_c = jnp.where(in_block[None, :], sb[None, :] + vis, text[None, :])  # [3, L]
        ok = idx < n_valid_b
        max_id = jnp.max(jnp.where(ok[None, :], pos_c, -1))
        delta = jnp.where(n_valid_b > 0, max_id + 1, 0) - length
        return pos_c, delta

    pos_c, deltas = jax.vmap(per_sequence)(ids_c, n_img, n_vid, img_off, vid_off, n_valid)  # [B, 3, L], [B]
    # Back to the original positions: token i is the rank[i]-th unmasked token.
    rank = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, length - 1)  # [B, L]
    pos = jnp.take_along_axis(pos_c, jnp.broadcast_to(rank[:, None, :], pos_c.shape), axis=2)
    pos = jnp.where(mask[:, None, :], pos, 1)
    return jnp.moveaxis(pos, 1, 0).astype(jnp.int32), deltas[:, None].astype(jnp.int32)
