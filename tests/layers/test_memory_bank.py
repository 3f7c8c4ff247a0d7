"""MA-LMM memory bank: golden vectors of the official compression, a NumPy transcription of §4.3, scan use."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from vjax.layers import memory_bank as mb

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "golden" / "ma_lmm_memory"


# ---------------------------------------------------------------------------------------------------
# Independent NumPy transcription of spec_qformer_family.md §4.3 (loops, float64).


def np_compress(bank: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bank = np.asarray(bank, np.float64)
    counts = np.asarray(counts, np.float64)
    b_, t_, n_, c_ = bank.shape
    out = np.zeros((b_, t_ - 1, n_, c_))
    out_s = np.zeros((b_, t_ - 1, n_))
    ks = np.zeros((b_, n_), np.int64)
    for b in range(b_):
        for n in range(n_):
            sims = []
            for t in range(t_ - 1):
                x, y = bank[b, t, n], bank[b, t + 1, n]
                sims.append(x @ y / (max(np.linalg.norm(x), 1e-8) * max(np.linalg.norm(y), 1e-8)))
            k = int(np.argmax(sims))  # first maximum
            ks[b, n] = k
            entries = [bank[b, t, n] for t in range(t_)]
            sizes = [counts[b, t, n] for t in range(t_)]
            merged = (sizes[k] * entries[k] + sizes[k + 1] * entries[k + 1]) / (sizes[k] + sizes[k + 1])
            entries = entries[:k] + [merged] + entries[k + 2 :]
            sizes = sizes[:k] + [sizes[k] + sizes[k + 1]] + sizes[k + 2 :]
            out[b, :, n] = np.stack(entries)
            out_s[b, :, n] = sizes
    return out, out_s, ks


def np_run_bank(frames: np.ndarray, capacity: int, valid: np.ndarray | None = None):
    """MA-LMM's loop per sample: append the frame; if the bank holds more than L entries, compress once."""
    b_, t_, n_, c_ = frames.shape
    results = []
    for b in range(b_):
        bank = np.zeros((0, n_, c_))
        sizes = np.zeros((0, n_))
        for t in range(t_):
            if valid is not None and not valid[b, t]:
                continue
            bank = np.concatenate([bank, frames[b, t][None]], 0)
            sizes = np.concatenate([sizes, np.ones((1, n_))], 0)
            if len(bank) > capacity:
                nb, ns, _ = np_compress(bank[None], sizes[None])
                bank, sizes = nb[0], ns[0]
        results.append((bank, sizes))
    return results


# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["T2", "T3", "T5", "T8"])
def test_compress_matches_official_golden(case):
    g = load_file(str(GOLDEN / f"case_compress_{case}.safetensors"))
    out, cnt = jax.jit(mb.memory_bank_compress)(jnp.asarray(g["in/memory_bank"]), jnp.asarray(g["in/compression_size"]))
    d_bank = float(np.max(np.abs(np.asarray(out, np.float64) - g["out/memory_bank"])))
    d_cnt = float(np.max(np.abs(np.asarray(cnt, np.float64) - g["out/compression_size"])))
    print(f"compress_{case}: max|d| bank {d_bank:.3g}, counts {d_cnt:.3g}")
    assert out.shape == g["out/memory_bank"].shape and out.dtype == jnp.float32
    assert d_bank <= 1e-4 and d_cnt == 0.0
    sim = mb.adjacent_cosine_similarity(jnp.asarray(g["in/memory_bank"]))
    np.testing.assert_allclose(np.asarray(sim), g["out/adjacent_cosine_similarity"], atol=1e-5)
    np.testing.assert_array_equal(np.argmax(np.asarray(sim), axis=1), g["out/merge_index"])


@pytest.mark.parametrize("seed", range(4))
def test_compress_matches_numpy_transcription_including_ties(seed):
    rng = np.random.default_rng(seed)
    b, t, n, c = 2, 6, 5, 7
    bank = rng.normal(size=(b, t, n, c)).astype(np.float32)
    # Exact ties (bitwise-equal pairs, so equal similarities in any precision): the first pair must win.
    bank[0, 3, :] = bank[0, 2, :]
    bank[0, 4, :] = bank[0, 2, :]
    bank[1, 1, 0] = 2.0 * bank[1, 0, 0]
    bank[1, 4, 0] = bank[1, 0, 0]
    bank[1, 5, 0] = bank[1, 1, 0]
    counts = rng.integers(1, 5, size=(b, t, n)).astype(np.float32)
    ref, ref_s, ref_k = np_compress(bank, counts)
    out, cnt = mb.memory_bank_compress(jnp.asarray(bank), jnp.asarray(counts))
    assert ref_k[0, 0] == 2 and ref_k[1, 0] == 0
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cnt), ref_s)


@pytest.mark.parametrize("capacity", [1, 3, 4])
def test_scan_equals_reference_loop_and_length_never_exceeds_capacity(capacity):
    rng = np.random.default_rng(capacity)
    b, t, n, c = 3, 9, 4, 6
    frames = rng.normal(size=(b, t, n, c)).astype(np.float32)
    valid = np.ones((b, t), bool)
    valid[1, 6:] = False  # a shorter video: trailing padded frames
    valid[2, [1, 4]] = False  # padded frames in the middle

    def step(bank, xs):
        frame, ok = xs
        bank = mb.append_and_compress(bank, frame, ok)
        return bank, bank.length

    init = mb.memory_bank_init(b, capacity, n, c)
    xs = (jnp.swapaxes(jnp.asarray(frames), 0, 1), jnp.swapaxes(jnp.asarray(valid), 0, 1))
    bank, lengths = jax.jit(lambda i, x: jax.lax.scan(step, i, x))(init, xs)
    assert int(lengths.max()) <= capacity
    np.testing.assert_array_equal(np.asarray(lengths[-1]), np.minimum(valid.sum(1), capacity))
    for i, (ref_bank, ref_sizes) in enumerate(np_run_bank(frames, capacity, valid)):
        length = int(bank.length[i])
        assert length == len(ref_bank)
        np.testing.assert_allclose(np.asarray(bank.tokens[i, :length]), ref_bank, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(bank.counts[i, :length]), ref_sizes)
        # Count conservation: each token position still accounts for every real frame seen.
        np.testing.assert_array_equal(np.asarray(bank.counts[i]).sum(0), np.full(n, valid[i].sum()))
        assert not np.any(np.asarray(bank.tokens[i, length:]))


def test_identical_frames_compress_to_their_value():
    frame = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
    bank = mb.memory_bank_init(2, 3, 5, 8)
    for _ in range(7):
        bank = mb.append_and_compress(bank, jnp.asarray(frame))
    assert bank.length.tolist() == [3, 3]
    np.testing.assert_allclose(np.asarray(bank.tokens), np.broadcast_to(frame[:, None], (2, 3, 5, 8)), atol=1e-6)
    assert np.asarray(bank.counts).sum(1).tolist() == [[7.0] * 5] * 2


def test_attend_view_masks_empty_slots_and_bank_is_detached():
    b, n, c = 2, 3, 4
    bank = mb.memory_bank_init(b, 3, n, c)
    bank = mb.append_and_compress(bank, jnp.ones((b, n, c)), jnp.array([True, False]))
    frame = jnp.full((b, n, c), 2.0)
    tokens, mask = mb.memory_bank_attend_view(bank, frame)
    assert tokens.shape == (b, 4, n, c)
    assert mask.tolist() == [[True, False, False, True], [False, False, False, True]]
    np.testing.assert_array_equal(np.asarray(tokens[:, -1]), np.asarray(frame))

    def loss(f):
        new = mb.append_and_compress(bank, f)
        return jnp.sum(new.tokens) + jnp.sum(mb.memory_bank_attend_view(new, f)[0])

    assert not np.any(np.asarray(jax.grad(loss)(frame)))


def test_compress_rejects_single_entry():
    with pytest.raises(ValueError, match="at least 2"):
        mb.memory_bank_compress(jnp.zeros((1, 1, 2, 3)), jnp.ones((1, 1, 2)))
