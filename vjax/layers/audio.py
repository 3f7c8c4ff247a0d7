"""Kaldi-compatible log-mel filter banks ("fbank") and ImageBind's audio clip features.

Kaldi's ``compute-fbank-feats`` (as ``torchaudio.compliance.kaldi.fbank`` reproduces it), per frame:

    frames   = windows of ``L = sr * frame_length`` samples every ``S = sr * frame_shift`` samples
               (``snip_edges``: only whole windows, ``1 + (N - L) // S`` frames)
    x        = x - mean(x)                                   remove DC offset (per frame)
    x[i]     = x[i] - 0.97 * x[i - 1],  x[-1] := x[0]         pre-emphasis
    x        = x * w                                         window: povey = hann(L, symmetric) ** 0.85,
                                                             hanning = hann(L, symmetric), hamming, rectangular
    X        = |rfft(x zero-padded to 2^ceil(log2 L))|^2      power spectrum, NFFT/2 + 1 bins
    mel(f)   = 1127 ln(1 + f / 700)
    E_m      = sum_k X_k * tri_m(mel(k * sr / NFFT))          triangles equally spaced in mel between
                                                             low_freq (20 Hz) and high_freq (Nyquist)
    fbank    = ln(max(E_m, eps)),  eps = float32 machine epsilon (1.19e-7)

ImageBind (Girdhar et al. 2023, ``data.load_and_transform_audio_data``, used by Video-LLaMA's audio branch):
16 kHz mono, ``num_clips`` clips of 2 s with starts evenly spaced over ``[0, duration - 2]``; per clip
subtract the clip mean, fbank with 128 mel bins, Hanning window, 25 ms / 10 ms, dither 0 (198 frames),
transpose to ``[mel, frames]``, zero-pad or crop to 204 frames, then ``(x + 4.268) / 9.138``.

Every function takes NumPy arrays (host data pipeline; float64 in gives float64 out) or JAX arrays
(traceable, static shapes).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)
IMAGEBIND_MEAN, IMAGEBIND_STD = -4.268, 9.138


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np


def mel_scale(freq):
    """Kaldi's mel scale ``1127 ln(1 + f / 700)``."""
    return 1127.0 * np.log(1.0 + np.asarray(freq, np.float64) / 700.0)


def window_function(kind: str, length: int) -> np.ndarray:
    """Kaldi window of ``length`` samples (float64): ``povey``, ``hanning``, ``hamming``, ``rectangular``.

    >>> window_function("hanning", 5).round(3).tolist()
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    n = np.arange(length, dtype=np.float64)
    hann = 0.5 - 0.5 * np.cos(2 * math.pi * n / (length - 1))  # symmetric
    if kind == "hanning":
        return hann
    if kind == "povey":
        return hann**0.85
    if kind == "hamming":
        return 0.54 - 0.46 * np.cos(2 * math.pi * n / (length - 1))
    if kind == "rectangular":
        return np.ones(length)
    raise ValueError(f"unknown window {kind!r}; known: povey, hanning, hamming, rectangular")


def mel_filterbank(num_bins: int, nfft: int, sample_rate: float, low_freq: float = 20.0,
                   high_freq: float = 0.0) -> np.ndarray:
    """Triangular filters ``[nfft // 2 + 1, num_bins]`` (float64) over the power-spectrum bins.

    ``high_freq <= 0`` counts back from Nyquist (Kaldi). The Nyquist bin gets weight 0 in every filter.
    """
    nyquist = 0.5 * sample_rate
    high = high_freq + nyquist if high_freq <= 0 else high_freq
    lo, hi = mel_scale(low_freq), mel_scale(high)
    delta = (hi - lo) / (num_bins + 1)
    edges = lo + delta * np.arange(num_bins + 2)  # left edge of bin m = edges[m], centre edges[m+1]
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # [M, 1]
    mel = mel_scale(np.arange(nfft // 2) * sample_rate / nfft)[None]  # [1, nfft/2]
    tri = np.maximum(0.0, np.minimum((mel - left) / (centre - left), (right - mel) / (right - centre)))
    return np.concatenate([tri, np.zeros((num_bins, 1))], axis=1).T  # [nfft/2 + 1, M]


def kaldi_fbank(
    waveform,
    sample_rate: float = 16000.0,
    num_mel_bins: int = 23,
    *,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    window: str = "povey",
    preemphasis: float = 0.97,
    remove_dc_offset: bool = True,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    round_to_power_of_two: bool = True,
    use_power: bool = True,
    eps: float = FLOAT32_EPS,
):
    """Log-mel filter-bank energies ``[frames, num_mel_bins]`` of a mono ``waveform [N]`` (module docstring).

    Kaldi/torchaudio defaults except ``num_mel_bins``; ``dither`` is always 0 (deterministic) and
    ``snip_edges`` is always on. The result has the dtype of ``waveform`` (computed in it).
    """
    xp = _xp(waveform)
    x = waveform
    length = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    nfft = 2 ** math.ceil(math.log2(length)) if round_to_power_of_two else length
    n = x.shape[-1]
    num_frames = 0 if n < length else 1 + (n - length) // shift
    idx = np.arange(num_frames)[:, None] * shift + np.arange(length)[None]  # [F, L]
    frames = x[idx]  # [F, L]
    if remove_dc_offset:
        frames = frames - xp.mean(frames, axis=1, keepdims=True)
    if preemphasis:
        prev = xp.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
        frames = frames - preemphasis * prev
    frames = frames * xp.asarray(window_function(window, length), dtype=frames.dtype)[None]
    spectrum = xp.abs(xp.fft.rfft(frames, n=nfft, axis=1))  # [F, nfft/2 + 1]
    if use_power:
        spectrum = spectrum**2
    banks = xp.asarray(mel_filterbank(num_mel_bins, nfft, sample_rate, low_freq, high_freq), dtype=frames.dtype)
    energies = spectrum.astype(frames.dtype) @ banks  # [F, M]
    return xp.log(xp.maximum(energies, eps)).astype(waveform.dtype)


def clip_bounds(duration: float, num_clips: int, clip_duration: float = 2.0) -> list[tuple[float, float]]:
    """``(start, end)`` seconds of ``num_clips`` clips evenly spaced over ``[0, duration - clip_duration]``
    (pytorchvideo ``ConstantClipsPerVideoSampler``, as ImageBind and Video-LLaMA use it)."""
    span = max(duration - clip_duration, 0.0)
    step = span / max(num_clips - 1, 1)
    return [(k * step, k * step + clip_duration) for k in range(num_clips)]


def imagebind_audio_features(
    waveform,
    sample_rate: int = 16000,
    *,
    num_clips: int = 3,
    clip_duration: float = 2.0,
    num_mel_bins: int = 128,
    target_length: int = 204,
    mean: float = IMAGEBIND_MEAN,
    std: float = IMAGEBIND_STD,
):
    """ImageBind's audio input ``[num_clips, num_mel_bins, target_length]`` from a mono 16 kHz ``waveform [N]``.

    ImageBind's own default is 3 clips; Video-LLaMA passes ``num_clips=8``.
    """
    xp = _xp(waveform)
    out = []
    for start, end in clip_bounds(waveform.shape[-1] / sample_rate, num_clips, clip_duration):
        clip = waveform[int(start * sample_rate):int(end * sample_rate)]
        clip = clip - xp.mean(clip)
        fb = kaldi_fbank(clip, sample_rate, num_mel_bins, window="hanning").T  # [mel, frames]
        frames = fb.shape[1]
        if frames < target_length:
            fb = xp.pad(fb, ((0, 0), (0, target_length - frames)))
        fb = fb[:, :target_length]
        out.append((fb - mean) / std)
    return xp.stack(out)
