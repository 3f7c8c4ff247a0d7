"""Chat-UniVi DPC-KNN merging vs a NumPy transcription of spec_vit_family.md §3.2-§3.4 (loops, float64).

The density noise is injected explicitly into both implementations (as golden vectors of the official code
would be made). Its scale here (1e-3) is larger than the official 1e-6 so that float32 (JAX) and float64
(NumPy) make the same discrete choices; the deterministic tie-break (no noise) is tested on exact ties.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vjax.layers import token_merge as tm

NOISE = 1e-3


# ---------------------------------------------------------------------------------------------------
# NumPy transcription of the spec (one sample, real tokens only).


def np_dist(x: np.ndarray) -> np.ndarray:
    n, c = x.shape
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            d[i, j] = math.sqrt(float(np.sum((x[i] - x[j]) ** 2))) / math.sqrt(c)
    return d


def np_dpc_knn(x: np.ndarray, c: int, k: int, noise: np.ndarray | None):
    """Returns (idx_cluster [N], centers [c]) for x [N, C]."""
    x = np.asarray(x, np.float64)
    n = len(x)
    d = np_dist(x)
    rho = np.array([math.exp(-np.mean(np.sort(d[i])[:k] ** 2)) for i in range(n)])
    if noise is not None:
        rho = rho + np.asarray(noise, np.float64)

    def denser(j, i):
        if noise is not None:
            return rho[j] > rho[i]
        return rho[j] > rho[i] or (rho[j] == rho[i] and j < i)

    delta = np.zeros(n)
    for i in range(n):
        cands = [d[i, j] for j in range(n) if denser(j, i)]
        delta[i] = min(cands) if cands else d.max()
    score = delta * rho
    centers = sorted(range(n), key=lambda i: (-score[i], i))[:c]
    idx = np.array([int(np.argmin([d[ctr, i] for ctr in centers])) for i in range(n)])
    for j, ctr in enumerate(centers):
        idx[ctr] = j
    return idx, np.array(centers)


def np_merge(x: np.ndarray, idx: np.ndarray, c: int, w: np.ndarray | None = None) -> np.ndarray:
    w = np.ones(len(x)) if w is None else np.asarray(w, np.float64)
    out = np.zeros((c, x.shape[1]))
    for j in range(c):
        members = [i for i in range(len(x)) if idx[i] == j]
        total = sum(w[i] for i in members) + 1e-6
        out[j] = sum(x[i] * w[i] / total for i in members) if members else 0.0
    return out


def np_ctm(x, ratio, k, noise):
    c = tm.cluster_count(len(x), ratio)
    idx, _ = np_dpc_knn(x, c, tm.knn_size(k, c), noise)
    return np_merge(x, idx, c), idx


def np_spatial(x, ratios, ks, noises):
    levels = []
    for ratio, k, noise in zip(ratios, ks, noises):
        x, _ = np_ctm(x, ratio, k, noise)
        levels.append(x)
    return levels


def np_video(frames, frame_noise_of, temporal_noise, event_noise_of, ratios, ks, t_ratio, t_k):
    """§3.4 for ONE video of real frames [T, N, C]; *_noise_of(level, index) give the injected noise."""
    t = len(frames)
    means = frames.mean(axis=1)
    c_t = tm.cluster_count(t, t_ratio)
    idx, _ = np_dpc_knn(means, c_t, tm.knn_size(t_k, c_t), temporal_noise)
    events = OrderedDict()
    for f, e in enumerate(idx.tolist()):
        events.setdefault(e, []).append(f)
    per_frame = [np_spatial(frames[f], ratios, ks, [frame_noise_of(l, f) for l in range(len(ratios))]) for f in range(t)]
    out = []
    for e_rank, members in enumerate(events.values()):
        for lvl, (ratio, k) in enumerate(zip(ratios, ks)):
            tokens = np.concatenate([per_frame[f][lvl] for f in members], 0)
            merged, _ = np_ctm(tokens, ratio, k, event_noise_of(lvl, e_rank, len(tokens)))
            out.append(merged)
    event_of_frame = np.array([list(events).index(e) for e in idx.tolist()])
    return np.concatenate(out, 0), event_of_frame


# ---------------------------------------------------------------------------------------------------


def test_cluster_count_and_knn_rules():
    assert [tm.cluster_count(256, 64), tm.cluster_count(64, 32), tm.cluster_count(32, 16)] == [64, 32, 16]
    assert [tm.cluster_count(t, 1 / 16) for t in (1, 3, 16, 17, 48, 64, 100)] == [1, 1, 1, 2, 3, 4, 7]
    assert [tm.knn_size(5, c) for c in (1, 2, 3, 4, 5, 9)] == [1, 1, 1, 2, 5, 5]
    assert [tm.knn_size(3, c) for c in (1, 2, 3, 16)] == [1, 1, 3, 3]


@pytest.mark.parametrize("n,c", [(10, 6), (40, 16)])
def test_token_distances_match_torch_cdist(n, c):
    x = np.random.default_rng(n).normal(size=(2, n, c)).astype(np.float32) * 3
    ref = (torch.cdist(torch.tensor(x), torch.tensor(x)) / math.sqrt(c)).numpy()
    out = np.asarray(tm.token_distances(jnp.asarray(x)))
    off = ~np.eye(n, dtype=bool)
    d_off = np.abs(out - ref)[:, off].max()
    d_diag = np.abs(out - ref)[:, ~off].max()
    print(f"N={n}: cdist max|d| off-diagonal {d_off:.3g}, diagonal {d_diag:.3g}")
    assert d_off <= 1e-5
    if n <= 25:
        assert np.all(np.diagonal(out, axis1=1, axis2=2) == 0)  # direct formula: exact zero diagonal
    else:
        assert d_diag <= 1e-2  # sqrt of rounding noise in the mm formula, in both implementations


@pytest.mark.parametrize("n,ch,c,k", [(20, 6, 5, 3), (40, 8, 8, 5), (64, 8, 16, 5), (12, 4, 12, 3)])
def test_dpc_knn_and_merge_match_numpy(n, ch, c, k):
    rng = np.random.default_rng(n + c)
    x = rng.normal(size=(2, n, ch)).astype(np.float32)
    noise = (rng.uniform(size=(2, n)) * NOISE).astype(np.float32)
    res = jax.jit(tm.cluster_dpc_knn, static_argnums=(1, 2))(jnp.asarray(x), c, k, density_noise=jnp.asarray(noise))
    merged = tm.merge_tokens(jnp.asarray(x), res.idx_cluster, c)
    for b in range(2):
        idx, centers = np_dpc_knn(x[b], c, k, noise[b])
        np.testing.assert_array_equal(np.asarray(res.centers[b]), centers)
        np.testing.assert_array_equal(np.asarray(res.idx_cluster[b]), idx)
        np.testing.assert_allclose(np.asarray(merged[b]), np_merge(x[b], idx, c), atol=1e-5)


def test_deterministic_tie_break_k1():
    # k = 1: every density is exp(0) = 1 exactly, so the order of the tokens alone decides (lower index denser).
    x = np.random.default_rng(3).normal(size=(1, 12, 5)).astype(np.float32)
    res = tm.cluster_dpc_knn(jnp.asarray(x), 3, 1)
    assert np.all(np.asarray(res.density) == 1.0)
    idx, centers = np_dpc_knn(x[0], 3, 1, None)
    assert centers[0] == 0  # the densest token (index 0) gets the global max distance
    np.testing.assert_array_equal(np.asarray(res.centers[0]), centers)
    np.testing.assert_array_equal(np.asarray(res.idx_cluster[0]), idx)


@pytest.mark.parametrize("seed", range(3))
def test_invariant_to_token_order_up_to_relabelling(seed):
    rng = np.random.default_rng(seed)
    n, c = 48, 10
    x = rng.normal(size=(1, n, 8)).astype(np.float32)
    noise = (rng.uniform(size=(1, n)) * NOISE).astype(np.float32)
    perm = rng.permutation(n)
    a_merged, a_idx = tm.ctm(jnp.asarray(x), c, 5, density_noise=jnp.asarray(noise))
    b_merged, b_idx = tm.ctm(jnp.asarray(x[:, perm]), c, 5, density_noise=jnp.asarray(noise[:, perm]))
    # Output order = score order, which does not depend on the input order: same merged tokens, same labels.
    np.testing.assert_allclose(np.asarray(b_merged), np.asarray(a_merged), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(b_idx[0]), np.asarray(a_idx[0])[perm])


@pytest.mark.parametrize("n,ratio", [(30, 1.5), (30, 30), (200, 64), (200, 0.1)])
def test_exactly_the_requested_number_of_clusters(n, ratio):
    x = np.random.default_rng(n).normal(size=(2, n, 6)).astype(np.float32)
    merged, idx = jax.jit(tm.ctm, static_argnums=(1, 2))(jnp.asarray(x), ratio, 5)
    expected = {1.5: 2, 30: 30, 64: 64, 0.1: 20}[ratio]
    assert merged.shape == (2, expected, 6)
    for b in range(2):
        assert sorted(set(np.asarray(idx[b]).tolist())) == list(range(expected))  # every cluster non-empty


def test_single_cluster_is_the_mean():
    x = np.random.default_rng(0).normal(size=(2, 30, 6)).astype(np.float32)
    n = x.shape[1]
    one, one_idx = tm.ctm(jnp.asarray(x), 1 / n, 5)  # ratio < 1: max(ceil(N * r), 1) = 1 cluster
    assert one.shape == (2, 1, 6) and not np.any(np.asarray(one_idx))
    np.testing.assert_allclose(np.asarray(one[:, 0]), x.mean(1) * n / (n + 1e-6), atol=1e-5)


def test_merged_tokens_are_weighted_means_of_members():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 33, 5)).astype(np.float32)
    w = rng.uniform(0.1, 2.0, size=(2, 33)).astype(np.float32)
    res = tm.cluster_dpc_knn(jnp.asarray(x), 6, 3)
    merged = tm.merge_tokens(jnp.asarray(x), res.idx_cluster, 6, token_weight=jnp.asarray(w))
    for b in range(2):
        np.testing.assert_allclose(np.asarray(merged[b]), np_merge(x[b], np.asarray(res.idx_cluster[b]), 6, w[b]), atol=1e-5)
    # Gradient flows through the averaging only: d sum(merged) / d x_i = w_i / (W_j + 1e-6).
    g = jax.grad(lambda v: jnp.sum(tm.merge_tokens(v, res.idx_cluster, 6, token_weight=jnp.asarray(w))))(jnp.asarray(x))
    idx = np.asarray(res.idx_cluster)
    tot = np.stack([np.bincount(idx[b], weights=w[b], minlength=6) for b in range(2)]) + 1e-6
    expect = w / np.take_along_axis(tot, idx, axis=1)
    np.testing.assert_allclose(np.asarray(g), np.broadcast_to(expect[..., None], x.shape), rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_masked_tokens_change_nothing(seed):
    rng = np.random.default_rng(seed)
    n_real, n_pad, ch, c = 30, 14, 6, 8
    real = rng.normal(size=(n_real, ch)).astype(np.float32)
    noise_real = (rng.uniform(size=n_real) * NOISE).astype(np.float32)
    slots = np.sort(rng.choice(n_real + n_pad, size=n_real, replace=False))
    x = (rng.normal(size=(1, n_real + n_pad, ch)) * 50).astype(np.float32)  # garbage in padded slots
    noise = np.full((1, n_real + n_pad), 0.5, np.float32)
    mask = np.zeros((1, n_real + n_pad), bool)
    x[0, slots], noise[0, slots], mask[0, slots] = real, noise_real, True
    merged, idx = tm.ctm(jnp.asarray(x), c, 5, mask=jnp.asarray(mask), density_noise=jnp.asarray(noise))
    ref_merged, ref_idx = np_ctm(real, c, 5, noise_real)
    np.testing.assert_allclose(np.asarray(merged[0]), ref_merged, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(idx[0])[slots], ref_idx)
    g = jax.grad(lambda v: jnp.sum(tm.ctm(v, c, 5, mask=jnp.asarray(mask))[0] ** 2))(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(g))) and not np.any(np.asarray(g)[~mask])


def test_spatial_merge_matches_numpy():
    rng = np.random.default_rng(11)
    b, n, ch = 2, 48, 6
    ratios, ks = (12, 6, 3), (5, 3, 3)
    x = rng.normal(size=(b, n, ch)).astype(np.float32)
    noises = [(rng.uniform(size=(b, m)) * NOISE).astype(np.float32) for m in (48, 12, 6)]
    tokens, levels = jax.jit(tm.spatial_merge, static_argnums=(1, 2))(
        jnp.asarray(x), ratios, ks, density_noise=[jnp.asarray(z) for z in noises]
    )
    assert tokens.shape == (b, 21, ch) and [lv.shape[1] for lv in levels] == [12, 6, 3]
    for i in range(b):
        ref = np_spatial(x[i], ratios, ks, [z[i] for z in noises])
        np.testing.assert_allclose(np.asarray(tokens[i]), np.concatenate(ref, 0), atol=1e-5)  # [12 | 6 | 3]


def test_temporal_events_ordered_by_first_frame_with_per_sample_counts():
    rng = np.random.default_rng(5)
    t, ch = 40, 6
    scenes = rng.normal(size=(3, ch)) * 3
    frames = (scenes[rng.integers(0, 3, size=(2, t))] + rng.normal(size=(2, t, ch)) * 0.3).astype(np.float32)
    mask = np.ones((2, t), bool)
    mask[1, 20:] = False  # 20 real frames: ceil(20/16) = 2 events; the first sample: ceil(40/16) = 3, k = 1
    noise = (rng.uniform(size=(2, t)) * NOISE).astype(np.float32)
    event_id, n_events = tm.temporal_events(jnp.asarray(frames), frame_mask=jnp.asarray(mask), density_noise=jnp.asarray(noise))
    assert n_events.tolist() == [3, 2]
    assert np.all(np.asarray(event_id[1, 20:]) == -1)
    for b, n_real in enumerate((40, 20)):
        c = tm.cluster_count(n_real, 1 / 16)
        idx, _ = np_dpc_knn(frames[b, :n_real], c, tm.knn_size(5, c), noise[b, :n_real])
        first = OrderedDict()
        for f, e in enumerate(idx.tolist()):
            first.setdefault(e, f)
        expected = [list(first).index(e) for e in idx.tolist()]
        ev = np.asarray(event_id[b, :n_real])
        np.testing.assert_array_equal(ev, expected)
        assert ev[0] == 0 and all(ev[:f].max() >= ev[f] - 1 for f in range(1, n_real))  # new ids appear in order


def _video_case(seed, t=10, n=16, ch=6, ratios=(6, 4, 2), t_ratio=1 / 4):
    rng = np.random.default_rng(seed)
    b = 2
    scenes = rng.normal(size=(3, n, ch)) * 2
    x = (scenes[rng.integers(0, 3, size=(b, t))] + rng.normal(size=(b, t, n, ch)) * 0.5).astype(np.float32)
    mask = np.ones((b, t), bool)
    mask[1, [2, 5, 9]] = False  # 7 real frames in the second video, padding anywhere
    e_max = tm.cluster_count(t, t_ratio)
    sizes = [n] + list(ratios[:-1])
    noise = tm.VideoMergeNoise(
        temporal=(rng.uniform(size=(b, t)) * NOISE).astype(np.float32),
        frame_levels=[(rng.uniform(size=(b * t, m)) * NOISE).astype(np.float32) for m in sizes],
        event_levels=[(rng.uniform(size=(b, e_max, t * r)) * NOISE).astype(np.float32) for r in ratios],
    )
    return x, mask, noise, e_max


def test_video_merge_matches_numpy_transcription():
    ratios, ks, t_ratio = (6, 4, 2), (5, 3, 3), 1 / 4
    x, mask, noise, e_max = _video_case(0)
    b, t = mask.shape
    fn = jax.jit(
        lambda x_, m_, z_: tm.video_merge(
            x_, frame_mask=m_, spatial_ratios=ratios, spatial_ks=ks, temporal_ratio=t_ratio, temporal_k=5, density_noise=z_
        )
    )
    tokens, token_mask, event_id = fn(jnp.asarray(x), jnp.asarray(mask), jax.tree.map(jnp.asarray, noise))
    per_event = sum(ratios)
    assert tokens.shape == (b, e_max * per_event, x.shape[-1])
    for i in range(b):
        real = np.flatnonzero(mask[i])
        ref, ref_events = np_video(
            x[i, real].astype(np.float64),
            lambda l, f: noise.frame_levels[l][i * t + real[f]],
            noise.temporal[i, real],
            lambda l, e, m: noise.event_levels[l][i, e, :m],
            ratios,
            ks,
            t_ratio,
            5,
        )
        n_tok = len(ref)
        assert int(token_mask[i].sum()) == n_tok and bool(token_mask[i, :n_tok].all())
        np.testing.assert_allclose(np.asarray(tokens[i, :n_tok]), ref, atol=1e-5)
        assert not np.any(np.asarray(tokens[i, n_tok:]))
        np.testing.assert_array_equal(np.asarray(event_id[i])[real], ref_events)
    # Padded frames change nothing (garbage there gives the same output).
    garbage = np.where(mask[:, :, None, None], x, 100.0).astype(np.float32)
    again = fn(jnp.asarray(garbage), jnp.asarray(mask), jax.tree.map(jnp.asarray, noise))
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(tokens))


def test_video_merge_deterministic_without_noise_and_official_noise_from_rng():
    x, mask, _, _ = _video_case(1)
    kw = dict(frame_mask=jnp.asarray(mask), spatial_ratios=(6, 4, 2), spatial_ks=(5, 3, 3), temporal_ratio=1 / 4)
    a = tm.video_merge(jnp.asarray(x), **kw)
    b = tm.video_merge(jnp.asarray(x), **kw)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    r = tm.video_merge(jnp.asarray(x), rng=jax.random.key(0), **kw)
    assert r[0].shape == a[0].shape and np.all(np.isfinite(np.asarray(r[0])))


def test_event_count_uses_exact_ceil():
    # ceil(20 * 0.1) = 2 (float32 arithmetic would give 20 * 0.1f = 2.0000000298 -> 3).
    x = np.random.default_rng(0).normal(size=(1, 30, 4)).astype(np.float32)
    mask = np.arange(30)[None] < 20
    _, n_events = tm.temporal_events(jnp.asarray(x), 0.1, 5, frame_mask=jnp.asarray(mask))
    assert n_events.tolist() == [tm.cluster_count(20, 0.1)] == [2]


@pytest.mark.parametrize("n_real", [20, 30])
def test_token_distances_choose_the_formula_by_the_real_count(n_real):
    """torch.cdist sees only the real tokens: 20 real of 40 slots -> the direct formula (exact zero
    diagonal, as torch gives for 20 rows); 30 real -> the matrix formula, as torch for 30 rows."""
    rng = np.random.default_rng(n_real)
    c, slots = 6, 40
    real = rng.normal(size=(n_real, c)).astype(np.float32) * 3
    where = np.sort(rng.choice(slots, size=n_real, replace=False))
    x = (rng.normal(size=(1, slots, c)) * 9).astype(np.float32)
    x[0, where] = real
    mask = np.zeros((1, slots), bool)
    mask[0, where] = True
    ref = (torch.cdist(torch.tensor(real), torch.tensor(real)) / math.sqrt(c)).numpy()
    out = np.asarray(tm.token_distances(jnp.asarray(x), jnp.asarray(mask)))[0][np.ix_(where, where)]
    off = ~np.eye(n_real, dtype=bool)
    if n_real <= 25:  # direct formula on both sides: exact zero diagonal, float32 rounding elsewhere
        assert np.all(np.diagonal(out) == 0) and np.all(np.diagonal(ref) == 0)
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    else:  # matrix formula on both sides: rounding noise on the diagonal (sqrt of it), as in torch
        assert not np.all(np.diagonal(out) == 0) and np.abs(np.diagonal(out) - np.diagonal(ref)).max() <= 1e-2
        np.testing.assert_allclose(out[off], ref[off], atol=1e-5)


def test_video_merge_reuses_given_frame_levels():
    x, mask, _, _ = _video_case(2)
    kw = dict(frame_mask=jnp.asarray(mask), spatial_ratios=(6, 4, 2), spatial_ks=(5, 3, 3), temporal_ratio=1 / 4)
    b, t, n, ch = x.shape
    _, levels = tm.spatial_merge(jnp.asarray(x).reshape(b * t, n, ch), (6, 4, 2), (5, 3, 3))
    a = tm.video_merge(jnp.asarray(x), **kw)
    given = tm.video_merge(jnp.asarray(x), frame_levels=levels, **kw)
    for u, v in zip(a, given):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    with pytest.raises(ValueError, match="frame_levels have shapes"):
        tm.video_merge(jnp.asarray(x), frame_levels=levels[:2], **kw)
