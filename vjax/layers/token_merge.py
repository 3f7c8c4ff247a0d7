"""Chat-UniVi token merging: DPC-KNN clustering and cluster-mean merging (Jin et al. 2024, arXiv 2311.08046, §3.1).

Read from PKU-YuanGroup/Chat-UniVi @ ec0b3db (``ChatUniVi/model/cluster.py``: ``cluster_dpc_knn``,
``merge_tokens``, ``CTM``; ``ChatUniVi/model/arch.py``: ``project``). For tokens ``x [N, C]``:

    D_ij   = ||x_i - x_j||_2 / sqrt(C)                       (torch.cdist in float32; for N > 25 cdist uses
                                                              sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 1e-30)))
    rho_i  = exp(-mean_{j in kNN(i)} D_ij^2)                 (the k nearest include i itself)
    rho_i += noise_i                                         (official: U[0,1) * 1e-6 from torch's global RNG)
    delta_i = min_{j: rho_j > rho_i} D_ij, or max_{i,j} D_ij for the densest token
    score_i = delta_i * rho_i;  centers = top-c scores, in descending score order
    cluster(i) = argmin_j D(center_j, i), each center forced into its own cluster
    merged_j = sum_{i in j} w_i x_i / (sum_{i in j} w_i + 1e-6)      (w = 1 in Chat-UniVi)

Cluster count: ``c = ceil(ratio)`` for ``ratio > 1``, else ``max(ceil(N * ratio), 1)``; kNN size: ``k`` unless
``k > c``, then ``min(3, max(c // 2, 1))``. Images: 256 tokens -> 64 -> 32 -> 16 (each step clusters the
previous step's output; k = 5, 3, 3), output ``[64 | 32 | 16]`` = 112 tokens. Videos: the per-frame patch means
are clustered into ``ceil(T / 16)`` events (k = 5); events are ordered by their first frame (they need not be
contiguous in time); per event the frames' level-l tokens are concatenated and re-clustered to 64 / 32 / 16.

JAX notes. Everything has static shapes: a ``mask`` marks real tokens (padded tokens are never neighbours,
denser tokens or centers, the fallback distance is the maximum over real pairs only, and they get no merge
weight, and the distance formula is chosen by the real count, as ``torch.cdist`` sees only real tokens),
which reproduces the unpadded result. The density noise is an explicit ``density_noise [B, N]`` input;
without it ties in density are broken deterministically (the lower token index counts as denser), with it
the comparison is the official strict ``rho_j > rho_i``. Exact ties in the score are ordered by
``lax.top_k``: lower index first (``torch.topk`` orders exact ties differently, so with equal scores the
two may pick different centers; with the official noise exact ties do not occur). Clustering runs under
``stop_gradient``; only the final averaging is differentiable, as in the official ``no_grad`` block.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def cluster_count(num_tokens: int, ratio: float) -> int:
    """Chat-UniVi's number of clusters: ``ceil(ratio)`` if ``ratio > 1`` else ``max(ceil(N * ratio), 1)``.

    >>> cluster_count(256, 64), cluster_count(20, 1 / 16), cluster_count(3, 1 / 16)
    (64, 2, 1)
    """
    if ratio > 1:
        return max(math.ceil(ratio), 1)
    return max(math.ceil(num_tokens * ratio), 1)


def knn_size(k: int, num_clusters: int) -> int:
    """kNN size used by ``CTM``: ``k`` unless ``k > num_clusters``, then ``min(3, max(num_clusters // 2, 1))``.

    >>> [knn_size(5, c) for c in (1, 2, 3, 4, 5, 64)]
    [1, 1, 1, 2, 5, 5]
    """
    if k > num_clusters:
        return min(3, max(num_clusters // 2, 1))
    return k


def _knn_size_array(k: int, num_clusters: jax.Array) -> jax.Array:
    small = jnp.minimum(3, jnp.maximum(num_clusters // 2, 1))
    return jnp.where(k > num_clusters, small, k).astype(jnp.int32)


def token_distances(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Pairwise distances ``cdist(x, x) / sqrt(C)`` in float32, ``[B, N, C] -> [B, N, N]``.

    Follows ``torch.cdist``'s default mode: the direct difference formula for ``N <= 25`` (exact zero
    diagonal) and ``sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 1e-30))`` for ``N > 25``. With a ``mask [B, N]``
    of real tokens, ``N`` is each row's real count (the release clusters unpadded tokens): a row of at most
    25 real tokens among more slots gets the direct formula between its real tokens.

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> np.asarray(token_distances(jnp.array([[[0.0, 0.0], [3.0, 4.0]]])), np.float64).round(4).tolist()
    [[[0.0, 3.5355], [3.5355, 0.0]]]
    """
    x = x.astype(jnp.float32)
    n, c = x.shape[-2], x.shape[-1]
    if n <= _DIRECT_MAX:
        return _direct_distances(x) / math.sqrt(c)
    sq = jnp.sum(x * x, axis=-1)  # [B, N]
    gram = jnp.einsum("bic,bjc->bij", x, x, precision=_HIGHEST)  # [B, N, N]
    d = jnp.sqrt(jnp.maximum(sq[:, :, None] + sq[:, None, :] - 2.0 * gram, 1e-30))
    if mask is not None:  # rows with few real tokens: the direct formula among them (real tokens first)
        mask = jnp.asarray(mask, bool)
        first = jnp.argsort(~mask, axis=1, stable=True)[:, :_DIRECT_MAX]  # [B, 25]: the real ones lead
        small = _direct_distances(jnp.take_along_axis(x, first[..., None], axis=1))  # [B, 25, 25]

        def put(d_b, first_b, small_b):
            return d_b.at[first_b[:, None], first_b[None, :]].set(small_b)

        few = jnp.sum(mask, axis=1) <= _DIRECT_MAX
        d = jnp.where(few[:, None, None], jax.vmap(put)(d, first, small), d)
    return d / math.sqrt(c)


_DIRECT_MAX = 25  # torch.cdist's default mode: matrix formula above 25 rows


def _direct_distances(x: jax.Array) -> jax.Array:
    diff = x[..., :, None, :] - x[..., None, :, :]  # [B, N, N, C]
    return jnp.sqrt(jnp.sum(diff * diff, axis=-1))


class DPCKNN(NamedTuple):
    """Result of ``cluster_dpc_knn``.

    Attributes:
      idx_cluster: ``[B, N]`` int32 cluster of each token (cluster j = j-th best center).
      centers: ``[B, c]`` int32 token index of each center, in descending score order.
      density: ``[B, N]`` float32 local density (noise included).
      score: ``[B, N]`` float32 ``delta * density`` (``-inf`` for masked tokens).
    """

    idx_cluster: jax.Array
    centers: jax.Array
    density: jax.Array
    score: jax.Array


def cluster_dpc_knn(
    x: jax.Array,
    num_clusters: int,
    k: int,
    *,
    mask: jax.Array | None = None,
    density_noise: jax.Array | None = None,
    num_valid_clusters: jax.Array | None = None,
    num_valid_k: jax.Array | None = None,
) -> DPCKNN:
    """Density-peaks clustering with k nearest neighbours (Chat-UniVi/TCFormer ``cluster_dpc_knn``).

    Formula in the module docstring. ``k`` is used as given (apply ``knn_size`` first, as ``CTM`` does).

    Args:
      x: ``[B, N, C]`` tokens (no gradient flows through the clustering).
      num_clusters: static number of clusters c (``<= N``).
      k: static kNN size, the token itself included.
      mask: ``[B, N]`` bool, True for real tokens (default all).
      density_noise: ``[B, N]`` added to the densities (official: ``torch.rand * 1e-6``). ``None``: no noise,
        equal densities are ordered by token index (lower index denser).
      num_valid_clusters: ``[B]`` per-sample cluster counts ``<= num_clusters``; centers beyond it are
        ignored in the assignment (the first ones of a top-c list are the top ones of a shorter list).
      num_valid_k: ``[B]`` per-sample kNN sizes ``<= k``.

    Returns:
      ``DPCKNN(idx_cluster [B, N], centers [B, c], density [B, N], score [B, N])``.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[[0.0], [0.1], [5.0], [5.2], [5.1]]])   # two obvious groups
    >>> out = cluster_dpc_knn(x, num_clusters=2, k=2)
    >>> out.idx_cluster.tolist(), out.centers.tolist()
    ([[0, 0, 1, 1, 1]], [[0, 2]])
    """
    n = x.shape[1]
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters={num_clusters} must be in [1, N={n}]")
    return _cluster_dpc_knn(x, int(num_clusters), min(int(k), n), mask, density_noise, num_valid_clusters, num_valid_k)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _cluster_dpc_knn(x, num_clusters, k, mask, density_noise, num_valid_clusters, num_valid_k) -> DPCKNN:
    b, n, _ = x.shape
    x = jax.lax.stop_gradient(x)
    valid = jnp.ones((b, n), bool) if mask is None else jnp.asarray(mask, bool)
    dist = token_distances(x, None if mask is None else valid)  # [B, N, N]
    pair_valid = valid[:, :, None] & valid[:, None, :]  # [B, N, N]

    # Local density from the k nearest real tokens (self included).
    d_knn = jnp.where(valid[:, None, :], dist, jnp.inf)
    nearest = -jax.lax.top_k(-d_knn, k)[0]  # [B, N, k] ascending
    if num_valid_k is None:
        density = jnp.exp(-jnp.mean(nearest**2, axis=-1))
    else:
        kv = jnp.asarray(num_valid_k, jnp.int32)[:, None, None]  # [B, 1, 1]
        take = jnp.arange(k)[None, None, :] < kv
        density = jnp.exp(-jnp.sum(jnp.where(take, nearest**2, 0.0), axis=-1) / kv[..., 0])
    if density_noise is not None:
        density = density + density_noise.astype(jnp.float32)

    # Distance to the nearest denser token (global max of real pairs for the densest one).
    rho_i, rho_j = density[:, :, None], density[:, None, :]
    denser = rho_j > rho_i  # [B, N(i), N(j)]
    if density_noise is None:
        idx = jnp.arange(n)
        denser = denser | ((rho_j == rho_i) & (idx[None, None, :] < idx[None, :, None]))
    denser = denser & valid[:, None, :]
    dist_max = jnp.max(jnp.where(pair_valid, dist, -jnp.inf), axis=(1, 2))  # [B]
    delta = jnp.min(jnp.where(denser, dist, dist_max[:, None, None]), axis=-1)  # [B, N]
    score = jnp.where(valid, delta * density, -jnp.inf)

    centers = jax.lax.top_k(score, num_clusters)[1].astype(jnp.int32)  # [B, c], descending score
    d_center = jnp.take_along_axis(dist, centers[:, :, None], axis=1)  # [B, c, N]: D(center_j, i)
    cluster_ids = jnp.arange(num_clusters, dtype=jnp.int32)
    if num_valid_clusters is not None:
        center_ok = cluster_ids[None, :] < jnp.asarray(num_valid_clusters)[:, None]  # [B, c]
        d_center = jnp.where(center_ok[:, :, None], d_center, jnp.inf)
    else:
        center_ok = jnp.ones((b, num_clusters), bool)
    idx_cluster = jnp.argmin(d_center, axis=1).astype(jnp.int32)  # [B, N], first on ties

    def force(idx_b, centers_b, ok_b):
        return idx_b.at[centers_b].set(jnp.where(ok_b, cluster_ids, idx_b[centers_b]))

    idx_cluster = jax.vmap(force)(idx_cluster, centers, center_ok)
    return DPCKNN(idx_cluster=idx_cluster, centers=centers, density=density, score=score)


def merge_tokens(
    x: jax.Array,
    idx_cluster: jax.Array,
    num_clusters: int,
    *,
    token_weight: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Weighted cluster means (``merge_tokens`` of Chat-UniVi/TCFormer), differentiable in ``x``.

    ``merged_j = sum_{i: idx_i = j} x_i * w_i / (W_j + 1e-6)`` with ``W_j = sum_{i: idx_i = j} w_i``;
    ``w`` = ``token_weight`` (Chat-UniVi: all ones) times ``mask``. Weights and sums are float32; the
    result has ``x``'s dtype. An empty cluster gives zeros.

    Args:
      x: ``[B, N, C]``; idx_cluster: ``[B, N]`` ints in ``[0, num_clusters)``;
      token_weight: ``[B, N]`` (default ones); mask: ``[B, N]`` bool (default all real).

    Returns:
      ``[B, num_clusters, C]``.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[[1.0], [3.0], [10.0]]])
    >>> merge_tokens(x, jnp.array([[0, 0, 1]]), 2).tolist()   # 1e-6 in the denominators
    [[[1.9999990463256836], [9.999990463256836]]]
    """
    return _merge_tokens(x, idx_cluster, int(num_clusters), token_weight, mask)


@functools.partial(jax.jit, static_argnums=(2,))
def _merge_tokens(x, idx_cluster, num_clusters, token_weight, mask):
    b, n, _ = x.shape
    w = jnp.ones((b, n), jnp.float32) if token_weight is None else token_weight.astype(jnp.float32)
    if mask is not None:
        w = jnp.where(jnp.asarray(mask, bool), w, 0.0)

    def one(x_b, idx_b, w_b):
        total = jax.ops.segment_sum(w_b, idx_b, num_segments=num_clusters) + 1e-6  # [c]
        norm_w = w_b / total[idx_b]  # [N]
        return jax.ops.segment_sum(x_b.astype(jnp.float32) * norm_w[:, None], idx_b, num_segments=num_clusters)

    return jax.vmap(one)(x, idx_cluster, w).astype(x.dtype)  # [B, c, C]


def _uniform_noise(rng: jax.Array | None, shape: tuple[int, ...]) -> jax.Array | None:
    """The official tie-break noise ``U[0, 1) * 1e-6`` (drawn from ``rng``), or None."""
    if rng is None:
        return None
    return jax.random.uniform(rng, shape, jnp.float32) * 1e-6


def ctm(
    x: jax.Array,
    sample_ratio: float,
    k: int,
    *,
    mask: jax.Array | None = None,
    density_noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One Chat-UniVi ``CTM`` step: DPC-KNN clustering + unit-weight merging (the module has no parameters).

    ``c = cluster_count(N, sample_ratio)`` (N = static token count) and ``k' = knn_size(k, c)``.

    Returns:
      ``(merged [B, c, C], idx_cluster [B, N])``.

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> x = jnp.array([[[0.0], [0.1], [5.0], [5.2], [5.1]]])
    >>> merged, idx = ctm(x, sample_ratio=2, k=5)
    >>> np.asarray(merged, np.float64).round(3).tolist(), idx.tolist()
    ([[[0.05], [5.1]]], [[0, 0, 1, 1, 1]])
    """
    n = x.shape[1]
    c = cluster_count(n, sample_ratio)
    res = cluster_dpc_knn(x, c, knn_size(k, c), mask=mask, density_noise=density_noise)
    return merge_tokens(x, res.idx_cluster, c, mask=mask), res.idx_cluster


def spatial_merge(
    x: jax.Array,
    ratios: Sequence[float] = (64, 32, 16),
    ks: Sequence[int] = (5, 3, 3),
    *,
    mask: jax.Array | None = None,
    density_noise: Sequence[jax.Array | None] | None = None,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Chat-UniVi's multi-scale spatial merging of image tokens (``project(..., "image")``).

    Each level clusters the previous level's output (``ctm0 -> ctm1 -> ctm2``) and the levels are
    concatenated: ``[B, 256, C] -> [B, 64 + 32 + 16 = 112, C]`` with the released config.

    Args:
      x: ``[B, N, C]`` patch features (CLIP layer -2, CLS dropped).
      ratios, ks: per-level ``sample_ratio`` and k.
      mask: ``[B, N]`` real tokens of the input (later levels are all real).
      density_noise: per level, ``[B, N_l]`` density noise (``N_0 = N``, ``N_l = c_{l-1}``) or None.
      rng: PRNG key used, where ``density_noise`` gives none, to draw the official ``U[0,1) * 1e-6`` noise.
        Neither: the deterministic tie-break.

    Returns:
      ``(tokens [B, sum(c_l), C], (level_0 [B, c_0, C], level_1, ...))``.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (2, 64, 8))
    >>> tokens, levels = spatial_merge(x, ratios=(16, 8, 4))
    >>> tokens.shape, [l.shape[1] for l in levels]
    ((2, 28, 8), [16, 8, 4])
    """
    if len(ratios) != len(ks):
        raise ValueError(f"ratios {tuple(ratios)} and ks {tuple(ks)} must have the same length")
    noises = tuple(density_noise) if density_noise is not None else (None,) * len(ratios)
    if len(noises) != len(ratios):
        raise ValueError(f"density_noise needs one entry per level ({len(ratios)}), got {len(noises)}")
    return _spatial_merge(x, tuple(ratios), tuple(ks), mask, noises, rng)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _spatial_merge(x, ratios, ks, mask, noises, rng):
    keys = [None] * len(ratios) if rng is None else list(jax.random.split(rng, len(ratios)))
    levels = []
    cur, cur_mask = x, mask
    for ratio, k, noise, key in zip(ratios, ks, noises, keys):
        if noise is None:
            noise = _uniform_noise(key, cur.shape[:2])
        cur, _ = ctm(cur, ratio, k, mask=cur_mask, density_noise=noise)  # [B, c_l, C]
        cur_mask = None
        levels.append(cur)
    return jnp.concatenate(levels, axis=1), tuple(levels)


def temporal_events(
    frame_features: jax.Array,
    ratio: float = 1 / 16,
    k: int = 5,
    *,
    frame_mask: jax.Array | None = None,
    density_noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Chat-UniVi event segmentation: DPC-KNN over per-frame features, events ordered by first frame.

    Per sample with ``T_b`` real frames: ``c_b = cluster_count(T_b, ratio)`` clusters (``ceil(T_b / 16)``)
    and kNN size ``knn_size(k, c_b)`` (so ``k = 1`` for 17-48 frames, where the density noise alone orders
    the frames: pass the official noise to reproduce a run). Event ids are renumbered so that event 0
    holds the first frame, event 1 the first frame not in event 0, and so on.

    Args:
      frame_features: ``[B, T, C]`` (Chat-UniVi: mean over each frame's patch features).
      frame_mask: ``[B, T]`` bool, True for real frames.
      density_noise: ``[B, T]`` added to the frame densities.

    Returns:
      ``(event_id [B, T] int32 (-1 for padded frames), num_events [B] int32)``; at most
      ``cluster_count(T, ratio)`` events.

    >>> import jax.numpy as jnp
    >>> f = jnp.array([[[0.0], [5.0], [0.1], [5.1], [0.2]]])     # frames alternate between two scenes
    >>> event_id, n = temporal_events(f, ratio=0.4, k=5)
    >>> event_id.tolist(), n.tolist()
    ([[0, 1, 0, 1, 0]], [2])
    """
    return _temporal_events(frame_features, float(ratio), int(k), frame_mask, density_noise)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _temporal_events(frame_features, ratio, k, frame_mask, density_noise):
    b, t, _ = frame_features.shape
    valid = jnp.ones((b, t), bool) if frame_mask is None else jnp.asarray(frame_mask, bool)
    c_max = cluster_count(t, ratio)
    k_max = knn_size(k, c_max)
    t_real = jnp.sum(valid, axis=1).astype(jnp.int32)  # [B]
    # Per-sample counts from a host table: exactly Python's ceil(T_b * ratio) (no float32 rounding).
    table = jnp.asarray([cluster_count(i, ratio) for i in range(t + 1)], jnp.int32)  # [T+1]
    c_b = jnp.minimum(table[t_real], jnp.maximum(t_real, 1))
    k_b = _knn_size_array(k, c_b)
    res = cluster_dpc_knn(
        frame_features,
        c_max,
        k_max,
        mask=valid,
        density_noise=density_noise,
        num_valid_clusters=c_b,
        num_valid_k=k_b,
    )
    # Renumber clusters by their first (real) frame.
    frames = jnp.arange(t)[None, :]
    onehot = (res.idx_cluster[:, :, None] == jnp.arange(c_max)[None, None, :]) & valid[:, :, None]  # [B, T, c]
    first = jnp.min(jnp.where(onehot, frames[:, :, None], t), axis=1)  # [B, c]
    rank = jnp.argsort(jnp.argsort(first, axis=1, stable=True), axis=1, stable=True)  # [B, c]
    event_id = jnp.take_along_axis(rank, res.idx_cluster, axis=1)
    event_id = jnp.where(valid, event_id, -1).astype(jnp.int32)
    return event_id, jnp.where(t_real > 0, c_b, 0).astype(jnp.int32)


class VideoMergeNoise(NamedTuple):
    """Density noise of every clustering in ``video_merge`` (any field may be None).

    The official ``project(..., "video")`` draws ``torch.rand`` in this order: ``temporal`` (ctm3 on the frame
    means), ``frame_levels`` (ctm0/1/2 on all frames), then per event ``event_levels`` (ctm0/1/2).

    Attributes:
      temporal: ``[B, T]``.
      frame_levels: per level l, ``[B * T, N_l]`` (``N_0 = N``, ``N_l = c_{l-1}``), frames folded into the batch.
      event_levels: per level l, ``[B, E, F * c_l]``: event e's frames in time order occupy the first
        ``|f_e| * c_l`` slots (E event slots, F = ``max_event_frames`` frame slots).
    """

    temporal: jax.Array | None = None
    frame_levels: Sequence[jax.Array | None] | None = None
    event_levels: Sequence[jax.Array | None] | None = None


def video_merge(
    features: jax.Array,
    *,
    frame_mask: jax.Array | None = None,
    spatial_ratios: Sequence[float] = (64, 32, 16),
    spatial_ks: Sequence[int] = (5, 3, 3),
    temporal_ratio: float = 1 / 16,
    temporal_k: int = 5,
    density_noise: VideoMergeNoise | None = None,
    rng: jax.Array | None = None,
    max_event_frames: int | None = None,
    frame_levels: Sequence[jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Chat-UniVi video tokens (``project(..., "video")``): events, then multi-scale merging per event.

    1. ``event_id = temporal_events(mean_n features[:, t, n])``.
    2. Per frame, the spatial hierarchy ``L_0 -> L_1 -> L_2`` (``spatial_merge`` with batch = frames).
    3. Per event e and level l: concatenate ``L_l`` of the event's frames (in time order) and cluster them
       again with level l's ratio and k (``[|f_e| * c_l, C] -> [c_l, C]``).
    4. Output ``[e_0: c_0, c_1, c_2 | e_1: ... ]``.

    Static shapes: the output has ``E = cluster_count(T, temporal_ratio)`` event slots; slots beyond a
    sample's event count are zero and masked. Each event is gathered into ``max_event_frames`` frame slots
    (default T, always enough; a smaller value saves memory but drops the frames of an event beyond it).

    Args:
      features: ``[B, T, N, C]`` per-frame patch features.
      frame_mask: ``[B, T]`` bool real frames (padded frames change nothing).
      spatial_ratios: fixed cluster counts per level (values > 1, as Chat-UniVi's 64, 32, 16).
      density_noise: explicit noise of the clusterings (``VideoMergeNoise``).
      rng: key for the official ``U[0,1) * 1e-6`` noise wherever ``density_noise`` gives none (neither: the
        deterministic tie-break).
      frame_levels: step 2's result when the caller has it already: per level, ``[B * T, c_l, C]`` (the
        ``levels`` of ``spatial_merge`` over the frames folded into the batch); skips that step.

    Returns:
      ``(tokens [B, E * sum(c_l), C], token_mask [B, E * sum(c_l)], event_id [B, T])``; a sample's real events
      come first, so its real tokens are a prefix.

    >>> import jax, jax.numpy as jnp
    >>> f = jax.random.normal(jax.random.key(0), (1, 6, 16, 4))
    >>> tokens, token_mask, event_id = video_merge(f, spatial_ratios=(4, 2), spatial_ks=(3, 3),
    ...                                            temporal_ratio=1 / 3)
    >>> tokens.shape, int(token_mask.sum()), event_id.shape
    ((1, 12, 4), 12, (1, 6))
    """
    if any(r <= 1 for r in spatial_ratios):
        raise ValueError(f"video_merge needs fixed spatial cluster counts (ratios > 1), got {tuple(spatial_ratios)}")
    if len(spatial_ratios) != len(spatial_ks):
        raise ValueError(f"spatial_ratios {tuple(spatial_ratios)} and spatial_ks {tuple(spatial_ks)} differ in length")
    if density_noise is not None:
        density_noise = VideoMergeNoise(
            density_noise.temporal,
            None if density_noise.frame_levels is None else tuple(density_noise.frame_levels),
            None if density_noise.event_levels is None else tuple(density_noise.event_levels),
        )
    if frame_levels is not None:
        frame_levels = tuple(frame_levels)
        b, t = features.shape[:2]
        want = [(b * t, int(r), features.shape[-1]) for r in spatial_ratios]
        if [tuple(lv.shape) for lv in frame_levels] != want:
            raise ValueError(f"frame_levels have shapes {[tuple(lv.shape) for lv in frame_levels]}, expected {want}")
    static = (tuple(spatial_ratios), tuple(spatial_ks), temporal_ratio, temporal_k, max_event_frames)
    return _video_merge(features, frame_mask, density_noise, rng, frame_levels, *static)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _video_merge(features, frame_mask, density_noise, rng, frame_levels, spatial_ratios, spatial_ks, temporal_ratio,
                 temporal_k, max_event_frames):
    b, t, n, c = features.shape
    valid = jnp.ones((b, t), bool) if frame_mask is None else jnp.asarray(frame_mask, bool)
    f_slots = t if max_event_frames is None else min(max_event_frames, t)
    num_levels = len(spatial_ratios)
    noise = density_noise if density_noise is not None else VideoMergeNoise()
    keys = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
    event_noise = list(noise.event_levels) if noise.event_levels is not None else [None] * num_levels
    event_keys = [None] * num_levels if rng is None else list(jax.random.split(keys[2], num_levels))

    # 1. Events from the per-frame means.
    frame_means = jnp.mean(features.astype(jnp.float32), axis=2)  # [B, T, C]
    noise_t = noise.temporal if noise.temporal is not None else _uniform_noise(keys[0], (b, t))
    event_id, num_events = temporal_events(
        frame_means, temporal_ratio, temporal_k, frame_mask=valid, density_noise=noise_t
    )
    e_max = cluster_count(t, temporal_ratio)

    # 2. Per-frame spatial hierarchy (frames folded into the batch).
    levels = frame_levels
    if levels is None:
        _, levels = spatial_merge(
            features.reshape(b * t, n, c), spatial_ratios, spatial_ks, density_noise=noise.frame_levels, rng=keys[1]
        )  # each [B*T, c_l, C]

    # 3. Frames of each event, in time order: event e owns sorted slots [start_e, start_e + n_e).
    sort_key = jnp.where(valid, event_id * t, e_max * t) + jnp.arange(t)[None, :]
    order = jnp.argsort(sort_key, axis=1)  # [B, T]
    n_e = jnp.sum(event_id[:, :, None] == jnp.arange(e_max)[None, None, :], axis=1)  # [B, E]
    start = jnp.cumsum(n_e, axis=1) - n_e  # [B, E]
    slot = jnp.arange(f_slots)[None, None, :]  # [1, 1, F]
    pos = jnp.minimum(start[:, :, None] + slot, t - 1)  # [B, E, F]
    frame_of = jnp.take_along_axis(order, pos.reshape(b, -1), axis=1).reshape(b, e_max, f_slots)
    frame_ok = slot < n_e[:, :, None]  # [B, E, F]

    out = []
    for lvl, (ratio, k, level) in enumerate(zip(spatial_ratios, spatial_ks, levels)):
        c_l = level.shape[1]
        level = level.reshape(b, t, c_l, c)
        gathered = jax.vmap(lambda lv, fr: lv[fr])(level, frame_of)  # [B, E, F, c_l, C]
        gathered = gathered.reshape(b * e_max, f_slots * c_l, c)
        tok_ok = jnp.repeat(frame_ok, c_l, axis=2).reshape(b * e_max, f_slots * c_l)
        lvl_noise = event_noise[lvl]
        if lvl_noise is not None:
            lvl_noise = jnp.asarray(lvl_noise).reshape(b * e_max, f_slots * c_l)
        else:
            lvl_noise = _uniform_noise(event_keys[lvl], gathered.shape[:2])
        n_clusters = cluster_count(f_slots * c_l, ratio)
        res = cluster_dpc_knn(gathered, n_clusters, knn_size(k, n_clusters), mask=tok_ok, density_noise=lvl_noise)
        merged = merge_tokens(gathered, res.idx_cluster, n_clusters, mask=tok_ok)  # [B*E, c_l', C]
        out.append(merged.reshape(b, e_max, n_clusters, c))
    tokens = jnp.concatenate(out, axis=2)  # [B, E, sum c_l, C]
    per_event = tokens.shape[2]
    event_ok = jnp.arange(e_max)[None, :] < num_events[:, None]  # [B, E]
    tokens = jnp.where(event_ok[:, :, None, None], tokens, 0).reshape(b, e_max * per_event, c)
    token_mask = jnp.repeat(event_ok, per_event, axis=1)
    return tokens.astype(features.dtype), token_mask, event_id
