"""Frame and audio-clip samplers of the seven video LLMs, as pure functions.

Every frame sampler maps ``(num_frames, fps, **config)`` to a :class:`FrameSample`: the frame
``indices`` (int64 ``[T]``) to decode and their ``timestamps`` in seconds (float64 ``[T]``,
``index / fps`` — the start time of each frame for a constant-rate video). Random samplers take an
explicit ``seed`` and are deterministic given it. Nothing here opens a file; use
:func:`vjax.data.video.read_sampled_frames` to decode what a sampler picked, e.g.
``read_sampled_frames(path, functools.partial(uniform_floor, num_samples=8))``.

Samplers are named by their rule; the release that uses a rule names it in its model spec
(``ModelSpec.sampler``), and the earlier names by model stay as aliases (:data:`ALIASES`).

Sources (formulas from ``shared/specs``, read from each official code base):

==========================  =====================================================================
sampler                     formula
==========================  =====================================================================
uniform_floor               n = min(8, L); idx_i = floor(i * L / n)                 (Video-LLaMA)
head_tail_random            n/2 sorted random from [0, L//2), n/2 from [L//2, L)     (VL stage 1)
segment_midpoints           T = min(L, 100); seg = (L-1)/T;
                            idx_i = (round(seg*i) + round(seg*(i+1))) // 2, half-to-even (Video-ChatGPT)
linspace_rint               rint(linspace(0, L-1, T))                                 (MA-LMM eval)
segment_random              one random index per segment of linspace(0, L, T+1)       (MA-LMM train)
fps_stride                  stride = int(round(fps)); 0, stride, ... <= L-1; if more than
                            max_frames: positions[linspace(0, n-1, max_frames, dtype=int)] (Chat-UniVi)
fixed_interval              interval = max(1, int(total / T)); every frame with i % interval == 0,
                            the first T of them; training pads to T with the last frame (MiniGPT4-video)
fps_arange_floor            n = floor2(min(max(L / fps * 2, 4), floor2(min(768, L)), L));
                            idx = arange(0, L, L/n).int()     (transformers' Qwen2VLVideoProcessor)
fps_linspace_even           n = L / fps * 2.0, clamped to [ceil2(4), floor2(min(768, L))], rounded
                            to a multiple of 2; idx = round(linspace(0, L-1, n))  (qwen-vl-utils)
nearest_each_second         for s = 0..round(max_ts): frame with timestamp closest to s; <= 24 (CogVLM2)
linspace_floor              linspace(0, min(L, 60*fps) - 1, 24, dtype=int)      (CogVLM2-Video base)
video_llama_audio_clips     8 clips of 2 s, start_k = k * max(dur - 2, 0) / 7
==========================  =====================================================================
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from fractions import Fraction
from typing import Any, Callable, NamedTuple

import numpy as np


class FrameSample(NamedTuple):
    """Chosen frames: ``indices`` int64 ``[T]`` into the video, ``timestamps`` float64 ``[T]`` seconds."""

    indices: np.ndarray
    timestamps: np.ndarray


def _check(num_frames: int, fps: float) -> tuple[int, float]:
    if int(num_frames) != num_frames or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if not (isinstance(fps, (int, float, np.floating, np.integer)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive finite number, got {fps!r}")
    return int(num_frames), float(fps)


def _positive(name: str, value: int) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _sample(indices, fps: float) -> FrameSample:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    return FrameSample(indices=idx, timestamps=idx.astype(np.float64) / fps)


# ---------------------------------------------------------------------------------------------
# Uniform samplers (they differ in rounding)
# ---------------------------------------------------------------------------------------------


def uniform_floor(num_frames: int, fps: float, num_samples: int = 8) -> FrameSample:
    """Video-LLaMA ``load_video(sampling="uniform")``: n = min(num_samples, L), idx_i = floor(i*L/n).

    Source: Video-LLaMA ``processors/video_processor.py`` (spec_qformer_family §2.4). A video shorter
    than ``num_samples`` gives all its frames.
    """
    n_total, fps = _check(num_frames, fps)
    n = min(_positive("num_samples", num_samples), n_total)
    return _sample([(i * n_total) // n for i in range(n)], fps)


def head_tail_random(num_frames: int, fps: float, num_samples: int = 8, seed: int = 0) -> FrameSample:
    """Video-LLaMA stage-1 "headtail": sorted random frames, half from each half of the video.

    ``num_samples // 2`` distinct indices from ``[0, L//2)`` and ``num_samples - num_samples // 2``
    from ``[L//2, L)``, each group sorted, head first (spec_qformer_family §2.4; the official code
    uses n//2 per half, so it differs only for odd ``num_samples``). When a half has fewer frames than
    requested the draw is with replacement (the official code raises there). Deterministic in
    ``seed`` (numpy ``default_rng``).
    """
    n_total, fps = _check(num_frames, fps)
    n = _positive("num_samples", num_samples)
    rng = np.random.default_rng(seed)
    half = n_total // 2
    n_head, n_tail = n // 2, n - n // 2

    def draw(lo: int, hi: int, k: int) -> list[int]:
        if k == 0:
            return []
        if hi <= lo:  # empty half (a 1-frame video): fall back to the frame at `lo`
            return [min(lo, n_total - 1)] * k
        replace = hi - lo < k
        return sorted(int(v) for v in rng.choice(np.arange(lo, hi), size=k, replace=replace))

    return _sample(draw(0, half, n_head) + draw(half, n_total, n_tail), fps)


def segment_midpoints(num_frames: int, fps: float, num_samples: int = 100) -> FrameSample:
    """Video-ChatGPT segment sampling: T = min(L, 100); seg = (L-1)/T;
    idx_i = (round(seg*i) + round(seg*(i+1))) // 2 with numpy's round-half-to-even.

    Source: Video-ChatGPT ``video_chatgpt/eval/model_utils.py`` ``get_seq_frames`` (spec_vit_family §2.2).
    """
    n_total, fps = _check(num_frames, fps)
    t = min(_positive("num_samples", num_samples), n_total)
    seg = (n_total - 1) / t
    idx = [(int(np.round(seg * i)) + int(np.round(seg * (i + 1)))) // 2 for i in range(t)]
    return _sample(idx, fps)


def linspace_rint(num_frames: int, fps: float, num_samples: int = 20) -> FrameSample:
    """MA-LMM evaluation sampling: ``np.rint(np.linspace(0, L-1, T))`` (T frames, repeats if L < T).

    Source: MA-LMM ``lavis/datasets/datasets`` video loaders (spec_qformer_family §4.4).
    """
    n_total, fps = _check(num_frames, fps)
    t = _positive("num_samples", num_samples)
    return _sample(np.rint(np.linspace(0, n_total - 1, t)), fps)


def segment_random(num_frames: int, fps: float, num_samples: int = 20, seed: int = 0) -> FrameSample:
    """MA-LMM training sampling: split ``[0, L)`` at ``linspace(0, L, T+1)`` (truncated to int) into T
    segments and draw one index uniformly from each; an empty segment (L < T) gives its start frame.

    Source: spec_qformer_family §4.4. Deterministic in ``seed``.
    """
    n_total, fps = _check(num_frames, fps)
    t = _positive("num_samples", num_samples)
    edges = np.linspace(0, n_total, t + 1).astype(np.int64)
    rng = np.random.default_rng(seed)
    idx = [
        int(rng.integers(lo, hi)) if hi > lo else int(min(lo, n_total - 1))
        for lo, hi in zip(edges[:-1], edges[1:])
    ]
    return _sample(idx, fps)


def fps_stride(num_frames: int, fps: float, max_frames: int = 64, sample_fps: float = 1.0) -> FrameSample:
    """Chat-UniVi ``_get_rawvideo_dec``: one frame per second, at most ``max_frames``.

    stride = int(round(fps / sample_fps)) (Python rounding, half-to-even; at least 1); positions
    0, stride, 2*stride, ... <= L-1; if there are more than ``max_frames`` positions, keep
    ``positions[np.linspace(0, n-1, max_frames, dtype=int)]`` (truncating). ``max_frames`` is 64 in
    training/eval and 100 in the README demo (spec_vit_family §3.6).
    """
    n_total, fps = _check(num_frames, fps)
    m = _positive("max_frames", max_frames)
    stride = max(1, int(round(fps / sample_fps)))
    pos = np.arange(0, n_total, stride)
    if len(pos) > m:
        pos = pos[np.linspace(0, len(pos) - 1, m, dtype=int)]
    return _sample(pos, fps)


def fixed_interval(
    num_frames: int,
    fps: float,
    num_samples: int = 45,
    total_frames: int | None = None,
    pad: bool = False,
) -> FrameSample:
    """MiniGPT4-video fixed-interval sampling.

    interval = max(1, int(total / T)) with total = ``total_frames`` (the official code uses moviepy's
    ``int(duration * fps)``; default: ``num_frames``); keep every decoded frame with index % interval
    == 0 until T are collected, so the tail is skipped when total / T is fractional. ``pad=True``
    (training) repeats the last kept frame up to T. T is 45 for Llama-2 and 90 for Mistral
    (spec_qformer_family §3.3).
    """
    n_total, fps = _check(num_frames, fps)
    t = _positive("num_samples", num_samples)
    total = n_total if total_frames is None else _positive("total_frames", total_frames)
    interval = max(1, total // t)
    idx = list(range(0, n_total, interval))[:t]
    if pad and len(idx) < t:
        idx += [idx[-1]] * (t - len(idx))
    return _sample(idx, fps)


# ---------------------------------------------------------------------------------------------
# Qwen2-VL (qwen-vl-utils)
# ---------------------------------------------------------------------------------------------

QWEN_IMAGE_FACTOR = 28  # patch 14 x spatial merge 2
QWEN_FRAME_FACTOR = 2  # temporal patch size
QWEN_FPS = 2.0
QWEN_FPS_MIN_FRAMES = 4
QWEN_FPS_MAX_FRAMES = 768
QWEN_VIDEO_MIN_PIXELS = 128 * 28 * 28
QWEN_VIDEO_MAX_PIXELS = 768 * 28 * 28
QWEN_VIDEO_TOTAL_PIXELS = 24576 * 28 * 28
QWEN_MAX_RATIO = 200


def _round_by(x: float, f: int) -> int:
    return round(x / f) * f  # Python round: half-to-even, as qwen-vl-utils


def _ceil_by(x: float, f: int) -> int:
    return math.ceil(x / f) * f


def _floor_by(x: float, f: int) -> int:
    return math.floor(x / f) * f


def fps_linspace_even(
    num_frames: int,
    fps: float,
    sample_fps: float = QWEN_FPS,
    min_frames: int = QWEN_FPS_MIN_FRAMES,
    max_frames: int = QWEN_FPS_MAX_FRAMES,
    nframes: int | None = None,
) -> FrameSample:
    """Qwen2-VL ``qwen-vl-utils`` ``smart_nframes`` + ``linspace(...).round()``.

    n = L / fps * sample_fps, clamped to [ceil2(min_frames), floor2(min(max_frames, L))], rounded to
    a multiple of the temporal patch 2 (half-to-even); or an explicit ``nframes`` rounded to a
    multiple of 2. Indices ``np.linspace(0, L-1, n).round()`` (spec_vit_family §5.2).

    Deviation: qwen-vl-utils raises when fewer than 2 frames fit (a 1-frame video); here such a
    video gives its frame twice, which is what the processor's padding to the temporal patch does.
    """
    n_total, fps = _check(num_frames, fps)
    f = QWEN_FRAME_FACTOR
    if nframes is not None:
        n = _round_by(_positive("nframes", nframes), f)
    else:
        lo = _ceil_by(_positive("min_frames", min_frames), f)
        hi = _floor_by(min(_positive("max_frames", max_frames), n_total), f)
        n = n_total / fps * sample_fps
        n = _round_by(min(max(n, lo), hi), f)
    if n_total < f:
        return _sample([0] * f, fps)
    if not f <= n <= n_total:
        raise ValueError(f"nframes should be in [{f}, {n_total}] for a {n_total}-frame video, got {n}")
    return _sample(np.linspace(0, n_total - 1, n).round(), fps)


def fps_arange_floor(
    num_frames: int,
    fps: float,
    sample_fps: float = QWEN_FPS,
    min_frames: int = QWEN_FPS_MIN_FRAMES,
    max_frames: int = QWEN_FPS_MAX_FRAMES,
    nframes: int | None = None,
) -> FrameSample:
    """Qwen2-VL as transformers' ``Qwen2VLVideoProcessor.sample_frames`` (temporal patch 2):

    n = min(max(L / fps * sample_fps, min_frames), floor2(min(max_frames, L)), L), floored to a multiple of 2;
    or an explicit ``nframes`` rounded (half-to-even) to a multiple of 2. Indices ``torch.arange(0, L, L / n).int()``:
    ``ceil(L / step)`` of them with ``step = L / n`` in float64 (so n + 1 when the division rounds up, e.g.
    L = 17, n = 14: 15 frames, as the processor then sees), each ``int(float32(i * step))`` (checked against torch);
    an index that reaches ``L`` there (transformers would index past the last frame) is clamped to ``L - 1``.

    Differs from qwen-vl-utils (:func:`fps_linspace_even`: count rounded, ``linspace(...).round()``). A video
    with fewer than 2 frames gives its frame twice (the processor's temporal padding)."""
    n_total, fps = _check(num_frames, fps)
    f = QWEN_FRAME_FACTOR
    if nframes is not None:
        n = _round_by(_positive("nframes", nframes), f)
    else:
        top = _floor_by(min(_positive("max_frames", max_frames), n_total), f)
        n = min(max(n_total / fps * float(sample_fps), _positive("min_frames", min_frames)), top, n_total)
        n = _floor_by(n, f)
    if n_total < f or n < f:
        return _sample([0] * f if n_total < f else [0, n_total // 2], fps)
    if n > n_total:
        raise ValueError(f"nframes={n} exceeds the video's {n_total} frames")
    step = n_total / n
    idx = (np.arange(math.ceil(n_total / step)) * step).astype(np.float32).astype(np.int64)
    return _sample(np.minimum(idx, n_total - 1), fps)


def smart_resize(
    height: int,
    width: int,
    factor: int = QWEN_IMAGE_FACTOR,
    min_pixels: float = 56 * 56,
    max_pixels: float = 28 * 28 * 16384,
) -> tuple[int, int]:
    """Qwen2-VL ``smart_resize``: (height, width) -> multiples of ``factor`` with area in [min, max].

    Round each side to the nearest multiple of ``factor`` (at least ``factor``); if the area exceeds
    ``max_pixels`` scale by beta = sqrt(h*w/max) and floor to multiples; if below ``min_pixels`` scale
    by beta = sqrt(min/(h*w)) and ceil. The aspect ratio must be < 200 (spec_vit_family §5.2; defaults
    are the released image ``preprocessor_config.json``).
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {(height, width)!r}")
    if max(height, width) / min(height, width) > QWEN_MAX_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {QWEN_MAX_RATIO}, got "
            f"{max(height, width) / min(height, width)} for {(height, width)!r}"
        )
    h = max(factor, _round_by(height, factor))
    w = max(factor, _round_by(width, factor))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, _floor_by(height / beta, factor))
        w = max(factor, _floor_by(width / beta, factor))
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = _ceil_by(height * beta, factor)
        w = _ceil_by(width * beta, factor)
    return h, w


def qwen2_vl_video_size(
    height: int,
    width: int,
    nframes: int,
    min_pixels: float = QWEN_VIDEO_MIN_PIXELS,
    max_pixels: float = QWEN_VIDEO_MAX_PIXELS,
    total_pixels: float = QWEN_VIDEO_TOTAL_PIXELS,
) -> tuple[int, int]:
    """Per-frame (height, width) of a Qwen2-VL video: ``smart_resize`` with the video pixel budget
    max_pixels' = max(min(max_pixels, total_pixels / nframes * 2), 1.05 * min_pixels)
    (qwen-vl-utils ``fetch_video``; spec_vit_family §5.2)."""
    n = _positive("nframes", nframes)
    budget = max(min(max_pixels, total_pixels / n * QWEN_FRAME_FACTOR), min_pixels * 1.05)
    return smart_resize(height, width, QWEN_IMAGE_FACTOR, min_pixels=min_pixels, max_pixels=budget)


# ---------------------------------------------------------------------------------------------
# CogVLM2-Video
# ---------------------------------------------------------------------------------------------


def nearest_each_second(
    num_frames: int,
    fps: float,
    max_frames: int = 24,
    timestamps: np.ndarray | None = None,
) -> FrameSample:
    """CogVLM2-Video chat sampling: for each integer second s = 0, 1, ..., round(max_ts), the frame
    whose timestamp is closest to s (first on ties), stopping at ``max_frames`` = 24.

    ``timestamps`` are the frames' start times (decord ``get_frame_timestamp(...)[:, 0]``); default
    ``arange(L) / fps``. The returned timestamps are the chosen frames' own times. The prompt labels
    frame i with the integer i (= seconds at 1 fps) (spec_vit_family §4.3).
    """
    n_total, fps = _check(num_frames, fps)
    m = _positive("max_frames", max_frames)
    ts = np.arange(n_total) / fps if timestamps is None else np.asarray(timestamps, np.float64).reshape(-1)
    if ts.shape[0] != n_total:
        raise ValueError(f"timestamps has {ts.shape[0]} entries for a {n_total}-frame video")
    idx = []
    for s in range(int(round(float(ts.max()))) + 1):
        idx.append(int(np.argmin(np.abs(ts - s))))
        if len(idx) >= m:
            break
    idx_arr = np.asarray(idx, np.int64)
    return FrameSample(indices=idx_arr, timestamps=ts[idx_arr])


def linspace_floor(
    num_frames: int, fps: float, num_samples: int = 24, clip_end_sec: float | None = 60.0
) -> FrameSample:
    """``np.linspace(0, end-1, num_samples, dtype=int)`` with end = min(L, int(clip_end_sec * fps)): CogVLM2-Video
    base sampling, 24 frames over the first 60 s (spec_vit_family §4.3); ``clip_end_sec=None``: the whole clip
    (LLaVA-NeXT-Video's ``load_video``)."""
    n_total, fps = _check(num_frames, fps)
    t = _positive("num_samples", num_samples)
    end = n_total if clip_end_sec is None else max(1, min(n_total, int(clip_end_sec * fps)))
    return _sample(np.linspace(0, end - 1, t, dtype=int), fps)


# ---------------------------------------------------------------------------------------------
# Audio clips (Video-LLaMA / ImageBind)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AudioClips:
    """Audio windows: ``starts``/``ends`` float64 ``[K]`` seconds; ``start_samples``/``end_samples``
    int64 ``[K]`` (``int(t * sample_rate)``, end exclusive) at ``sample_rate``."""

    starts: np.ndarray
    ends: np.ndarray
    start_samples: np.ndarray
    end_samples: np.ndarray
    sample_rate: int


def video_llama_audio_clips(
    duration: float, num_clips: int = 8, clip_duration: float = 2.0, sample_rate: int = 16_000
) -> AudioClips:
    """Video-LLaMA audio clips (ImageBind ``load_and_transform_audio_data``, pytorchvideo
    ``ConstantClipsPerVideoSampler``): K = 8 clips of 2 s, start_k = k * max(duration - 2, 0) / (K-1),
    end_k = start_k + 2; sample ranges ``[int(start*sr), int(end*sr))`` at 16 kHz. A clip running past
    the end of a short audio is shorter; :func:`cut_audio_clips` zero-pads it (spec_qformer_family §2.4).
    """
    if not (math.isfinite(duration) and duration >= 0):
        raise ValueError(f"duration must be a finite number of seconds >= 0, got {duration!r}")
    k = _positive("num_clips", num_clips)
    sr = _positive("sample_rate", sample_rate)
    # Exact rational arithmetic, as pytorchvideo's sampler (Fractions): start_k = k * max_start / (K-1).
    max_start = max(Fraction(duration) - Fraction(clip_duration), Fraction(0))
    starts = [max_start * i / max(k - 1, 1) for i in range(k)]
    ends = [s + Fraction(clip_duration) for s in starts]
    return AudioClips(
        starts=np.asarray([float(s) for s in starts], np.float64),
        ends=np.asarray([float(e) for e in ends], np.float64),
        start_samples=np.asarray([int(s * sr) for s in starts], np.int64),
        end_samples=np.asarray([int(e * sr) for e in ends], np.int64),
        sample_rate=sr,
    )


def cut_audio_clips(audio: np.ndarray, clips: AudioClips) -> np.ndarray:
    """Cut a mono waveform ``[N]`` into the clips -> float32 ``[K, clip_len]`` zero-padded at the end,
    where clip_len = max(end_samples - start_samples)."""
    wav = np.asarray(audio, np.float32).reshape(-1)
    length = int((clips.end_samples - clips.start_samples).max())
    out = np.zeros((len(clips.starts), length), np.float32)
    for i, (s, e) in enumerate(zip(clips.start_samples, clips.end_samples)):
        piece = wav[s:e]
        out[i, : piece.shape[0]] = piece
    return out


FRAMES_ARGS = ("num_samples", "max_frames", "nframes")  # the frame-count argument, by sampler


def make_sampler(name: str, num_frames: int | None = None, **kwargs: Any) -> Callable[..., FrameSample]:
    """The frame sampler ``name`` (a rule, or an earlier name in :data:`ALIASES`) with ``kwargs`` bound; a
    clip's frame count ``num_frames`` goes to the sampler's first frame-count argument (:data:`FRAMES_ARGS`)
    unless ``kwargs`` set one. Unknown names and arguments are a ``ValueError`` naming them.

    >>> make_sampler("uniform_floor", 4)(num_frames=100, fps=25.0).indices.tolist()
    [0, 25, 50, 75]
    """
    fn = globals().get(ALIASES.get(name, name))
    if not (inspect.isfunction(fn) and not name.startswith("_") and "fps" in inspect.signature(fn).parameters):
        raise ValueError(f"unknown sampler {name!r}; known: {sampler_names()}")
    params = inspect.signature(fn).parameters
    for k in kwargs:
        if k not in params or k in ("num_frames", "fps"):
            raise ValueError(f"{name}() has no parameter {k!r}; known: {list(params)[2:]}")
    frames_arg = next((a for a in FRAMES_ARGS if a in params), None)
    if num_frames is not None and frames_arg and not any(a in kwargs for a in FRAMES_ARGS):
        kwargs[frames_arg] = int(num_frames)
    return functools.partial(fn, **kwargs)


def config_sampler(name: str, num_frames: int, kwargs: dict[str, Any], model: Any = None) -> Callable[..., FrameSample]:
    """The sampler a data config names (``name``, ``kwargs``); ``name=""`` takes the model's from its spec
    (``ModelSpec.sampler`` with its ``sampler_kwargs``, ``kwargs`` over them)."""
    if not name and model is not None:
        name, kwargs = model.sampler, {**model.sampler_kwargs, **kwargs}
    return make_sampler(name, num_frames, **kwargs)


def sampler_names() -> list[str]:
    """The frame samplers, by rule."""
    return sorted(n for n, f in globals().items() if inspect.isfunction(f) and not n.startswith("_")
                  and "fps" in inspect.signature(f).parameters and n not in ALIASES and f.__name__ == n)


# Earlier names, by the model that samples so (kept working).
ALIASES = {
    "video_llama_uniform": "uniform_floor",
    "video_llama_headtail": "head_tail_random",
    "video_chatgpt_uniform": "segment_midpoints",
    "ma_lmm_uniform": "linspace_rint",
    "ma_lmm_segment_random": "segment_random",
    "chat_univi_fps": "fps_stride",
    "minigpt4_video_interval": "fixed_interval",
    "qwen2_vl_fps": "fps_linspace_even",
    "cogvlm2_chat_seconds": "nearest_each_second",
    "cogvlm2_base_linspace": "linspace_floor",
}
video_llama_uniform = uniform_floor
video_llama_headtail = head_tail_random
video_chatgpt_uniform = segment_midpoints
ma_lmm_uniform = linspace_rint
ma_lmm_segment_random = segment_random
chat_univi_fps = fps_stride
minigpt4_video_interval = fixed_interval
qwen2_vl_fps = fps_linspace_even
cogvlm2_chat_seconds = nearest_each_second
cogvlm2_base_linspace = linspace_floor
