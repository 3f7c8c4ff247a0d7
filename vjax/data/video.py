"""Video and audio reading with decord: decode only the sampled frames, audio at 16 kHz mono.

Readers are opened per call and closed before returning: decord's ``VideoReader``/``AudioReader`` are
not picklable (so they must never live on a Grain transform) and ``AVReader`` leaks memory, so it is
not used at all. Every failure to read a file — missing, empty, truncated, not a video, no video
stream — is raised as :class:`UnreadableVideo` with the path and a short reason, so data pipelines can
skip and count the record instead of crashing.

Facts this module relies on (checked with decord 0.6.0, see ``shared/specs/offline_assets.md``):

* ``VideoReader(path, width=W, height=H)`` resizes on decode (aspect ratio not kept), which is how
  Video-LLaMA's ``load_video`` decodes at 224x224; ``get_batch(indices)`` is bit-identical to PyAV's
  rgb24 decoding on clean files.
* ``AudioReader(path, sample_rate=16000, mono=True)`` resamples; it raises ``DECORDError`` ("Can't find
  audio stream") on a file with no audio — here that clip is silent (zeros), not an error.
* A truncated mp4 either fails to open ("moov atom not found") or fails inside ``get_batch``; both
  raise quickly (no hang) and both become :class:`UnreadableVideo`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import tempfile
import threading
from typing import Callable, Sequence

import numpy as np

AUDIO_SAMPLE_RATE = 16_000  # Hz; Video-LLaMA / ImageBind resample every clip to 16 kHz mono.


# What went wrong, as a short name for counters (``skipped/<kind>`` in training metrics): kind -> the
# beginnings of the reasons this module (and the pipeline) give.
UNREADABLE_KINDS: dict[str, tuple[str, ...]] = {
    "missing": ("file does not exist",),
    "not_a_file": ("not a regular file",),
    "empty": ("file is empty",),
    "cannot_open": ("FFmpeg cannot open",),
    "no_video_stream": ("no video stream",),
    "corrupt": ("truncated or corrupt", "video stream has no frames", "decoded ", "decoding failed",
                "invalid average fps", "could not decode"),
    "no_path": ("record ",),
    "other": (),
}


class UnreadableVideo(Exception):
    """A video file that cannot be decoded. ``path`` is the file, ``reason`` a short explanation,
    ``kind`` its class (a key of :data:`UNREADABLE_KINDS`)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"unreadable video {self.path!r}: {reason}")

    @property
    def kind(self) -> str:
        return unreadable_kind(self.reason)

    def __reduce__(self):  # keep the two-argument constructor picklable across worker processes
        return (UnreadableVideo, (self.path, self.reason))


def unreadable_kind(reason: str) -> str:
    """The :data:`UNREADABLE_KINDS` key of an :class:`UnreadableVideo` reason (``other`` if none fits)."""
    return next((k for k, starts in UNREADABLE_KINDS.items() if reason.startswith(starts)), "other")


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """Container-level facts of a video: frame count, average fps, decoded height/width, duration (s)."""

    num_frames: int
    fps: float
    height: int
    width: int

    @property
    def duration(self) -> float:
        """Duration in seconds, ``num_frames / fps``."""
        return self.num_frames / self.fps if self.fps > 0 else 0.0


class _ScalerBug(Exception):
    """decord 0.6.0's frame copy fails for some output widths (e.g. 16, 24, 48 px), resized on decode or native,
    with "DECORDArrayCopyFromTo: The size must exactly match"; the readers then decode at the native size
    (with PyAV, :func:`_read_with_pyav`, where the native width is one of those) and resize with
    :func:`resize_frames`."""


def check_file(path: str | os.PathLike) -> str:
    """Cheap pre-checks before decord sees the file; returns the path as ``str``.

    Raises :class:`UnreadableVideo` for a missing path, a path that is not a regular file, and a
    zero-byte file (decord's own error message for those is just "Error reading ...").
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise UnreadableVideo(p, "file does not exist")
    if not os.path.isfile(p):
        raise UnreadableVideo(p, "not a regular file")
    if os.path.getsize(p) == 0:
        raise UnreadableVideo(p, "file is empty (0 bytes)")
    return p


def _decord():
    import decord  # imported lazily: decord pulls in its bundled FFmpeg libraries

    if not getattr(decord, "_vjax_quiet", False):
        # FFmpeg's own log lines ("[mov,mp4,...] moov atom not found") repeat what UnreadableVideo says
        decord.logging.set_level(decord.logging.QUIET)
        decord._vjax_quiet = True
    return decord


# decord's C++ LOG(ERROR) lines ("[20:42:25] .../video_reader.cc:83: ERROR opening: ...") and FFmpeg's
# ("[mov,mp4,m4a,3gp,3g2,mj2 @ 0x5604680d6000] ...") go straight to file descriptor 2.
_NATIVE_NOISE = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+\.(cc|h):\d+: |^\[[\w,.-]+ @ 0x[0-9a-f]+\] ")
_FILTER = {"lock": threading.Lock(), "depth": 0, "saved": -1, "capture": None}


@contextlib.contextmanager
def native_logs_filtered():
    """Run decord calls with file descriptor 2 captured; when the last concurrent one ends, write back every
    captured line except decord's and FFmpeg's native log lines (their content is in the
    :class:`UnreadableVideo` reason). Lines that other threads print meanwhile are kept, only delayed;
    decoding in several threads is not serialised. A no-op where fd 2 cannot be duplicated."""
    state = _FILTER
    with state["lock"]:
        if state["depth"] == 0:
            try:
                saved = os.dup(2)
            except OSError:
                saved = -1
            if saved >= 0:
                with contextlib.suppress(AttributeError, ValueError):
                    sys.stderr.flush()
                capture = tempfile.TemporaryFile()
                os.dup2(capture.fileno(), 2)
                state["saved"], state["capture"] = saved, capture
        state["depth"] += 1
    try:
        yield
    finally:
        with state["lock"]:
            state["depth"] -= 1
            if state["depth"] == 0 and state["saved"] >= 0:
                saved, capture = state["saved"], state["capture"]
                state["saved"], state["capture"] = -1, None
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                text = capture.read().decode("utf-8", "replace")
                capture.close()
                kept = [ln for ln in text.splitlines(keepends=True) if not _NATIVE_NOISE.match(ln)]
                if kept:
                    os.write(2, "".join(kept).encode())


def _reason(err: BaseException) -> str:
    """First useful line of a decord/FFmpeg error, without the C++ source location prefix."""
    text = str(err).strip().splitlines()
    line = text[-1] if text else type(err).__name__
    if "] " in line and line.startswith("["):
        line = line.split("] ", 1)[1]
    if "cannot find video stream" in line:
        return "no video stream"
    if line.startswith("Error reading"):
        return "FFmpeg cannot open it (not a video container, or truncated)"
    if "av_read_frame failed" in line:
        return "truncated or corrupt stream (av_read_frame failed)"
    return f"{type(err).__name__}: {line[:200]}"


def open_video(path: str | os.PathLike, size: tuple[int, int] | None = None, num_threads: int = 1):
    """Open a decord ``VideoReader`` (CPU), resizing on decode to ``size=(height, width)`` if given.

    Returns the reader. The caller owns it and should drop it after use (do not store it on anything
    that is pickled). Raises :class:`UnreadableVideo` if decord cannot open the file or it has no
    frames.
    """
    p = check_file(path)
    if size is not None:
        h, w = size
        if int(h) <= 0 or int(w) <= 0:
            raise ValueError(f"size must be positive (height, width), got {size!r}")
    decord = _decord()
    kwargs = {"ctx": decord.cpu(0), "num_threads": num_threads}
    if size is not None:
        kwargs.update(height=int(size[0]), width=int(size[1]))
    try:
        with native_logs_filtered():
            vr = decord.VideoReader(p, **kwargs)
    except Exception as err:  # RuntimeError / DECORDError from the C++ side
        raise UnreadableVideo(p, _reason(err)) from None
    if len(vr) == 0:
        raise UnreadableVideo(p, "video stream has no frames")
    return vr


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, average fps and native (height, width) of a video, decoding only frame 0.

    Decoding one frame proves the stream really decodes; raises :class:`UnreadableVideo` otherwise.
    """
    p = os.fspath(path)
    vr = open_video(p)
    try:
        try:
            first = _get_batch(vr, p, [0])  # [1, H, W, 3]
        except _ScalerBug:  # a width decord cannot copy: the frame decodes natively instead
            first = _native_fallback(p, [0], None, 1)
        return VideoInfo(
            num_frames=len(vr), fps=float(vr.get_avg_fps()), height=first.shape[1], width=first.shape[2]
        )
    finally:
        del vr


def read_frames(
    path: str | os.PathLike,
    indices: Sequence[int] | np.ndarray,
    size: tuple[int, int] | None = None,
    num_threads: int = 1,
) -> np.ndarray:
    """Decode only the frames at ``indices`` (any order, repeats allowed) -> uint8 ``[T, H, W, 3]`` RGB.

    ``size=(height, width)`` resizes on decode (decord's scaler; aspect ratio not kept). Indices out
    of range raise ``IndexError`` naming the index and the frame count; decode failures raise
    :class:`UnreadableVideo`.
    """
    p = os.fspath(path)
    vr = open_video(p, size=size, num_threads=num_threads)
    try:
        return _get_batch(vr, p, indices)
    except _ScalerBug:
        vr = None
        return _native_fallback(p, indices, size, num_threads)
    finally:
        vr = None


def _native_fallback(path: str, indices, size: tuple[int, int] | None, num_threads: int) -> np.ndarray:
    """Frames decord could not copy (:class:`_ScalerBug`): natively (PyAV when decord fails there too), resized
    to ``size`` if given."""
    frames = _read_with_pyav(path, indices) if size is None else read_frames(path, indices, None, num_threads)
    return frames if size is None else resize_frames(frames, size)


def _read_with_pyav(path: str, indices) -> np.ndarray:
    """PyAV rgb24 decoding of the frames at ``indices`` (decoded in order up to the last one asked); decord's own
    decoding equals it on clean files (``shared/specs/offline_assets.md``)."""
    import av  # noqa: PLC0415

    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    wanted, got = set(idx.tolist()), {}
    try:
        with av.open(path) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    got[i] = frame.to_ndarray(format="rgb24")
                if i >= idx.max():
                    break
    except Exception as err:  # av.error.FFmpegError and friends
        raise UnreadableVideo(path, f"decoding failed (PyAV: {type(err).__name__}: {str(err)[:160]})") from None
    missing = sorted(wanted - set(got))
    if missing:
        raise UnreadableVideo(path, f"could not decode frame {missing[0]} (PyAV)")
    return np.stack([got[int(i)] for i in idx])


def _get_batch(vr, path: str, indices) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    n = len(vr)
    if idx.size == 0:
        raise ValueError(f"no frame indices given for {path!r}")
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
        raise IndexError(f"frame index {int(bad[0])} out of range for {path!r} with {n} frames")
    try:
        with native_logs_filtered():
            frames = vr.get_batch(idx.tolist()).asnumpy()  # [T, H, W, 3] uint8
    except Exception as err:
        if "DECORDArrayCopyFromTo" in str(err):
            raise _ScalerBug(str(err)) from None
        raise UnreadableVideo(path, _reason(err)) from None
    if frames.shape[0] != idx.size:
        raise UnreadableVideo(path, f"decoded {frames.shape[0]} frames, expected {idx.size}")
    return frames


def read_sampled_frames(
    path: str | os.PathLike,
    sampler: Callable[[int, float], "object"],
    size: tuple[int, int] | None = None,
    num_threads: int = 1,
):
    """Open once, sample with ``sampler(num_frames, fps)``, decode only those frames.

    ``sampler`` is any function from :mod:`vjax.data.sampling` (or a ``functools.partial`` of one);
    it returns a ``FrameSample`` (indices, timestamps). Returns ``(frames [T, H, W, 3] uint8,
    sample, VideoInfo)`` where the info's height/width are the decoded (possibly resized) ones.
    """
    p = os.fspath(path)
    vr = open_video(p, size=size, num_threads=num_threads)
    try:
        num_frames, fps = len(vr), float(vr.get_avg_fps())
        if not np.isfinite(fps) or fps <= 0:
            raise UnreadableVideo(p, f"invalid average fps {fps!r}")
        sample = sampler(num_frames, fps)
        try:
            frames = _get_batch(vr, p, sample.indices)
        except _ScalerBug:
            vr = None
            frames = _native_fallback(p, sample.indices, size, num_threads)
        info = VideoInfo(num_frames=num_frames, fps=fps, height=frames.shape[1], width=frames.shape[2])
        return frames, sample, info
    finally:
        vr = None


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (half-pixel centres, no antialias) of uint8 ``[T, H, W, C]`` to ``size=(h, w)``.

    Used only when decord's own resize-on-decode fails for the requested width.
    """
    t, h, w, c = frames.shape
    oh, ow = int(size[0]), int(size[1])

    def axis(n_in: int, n_out: int):
        x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(x).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (x - lo).astype(np.float32)

    y0, y1, wy = axis(h, oh)
    x0, x1, wx = axis(w, ow)
    f = frames.astype(np.float32)
    rows = f[:, y0] * (1 - wy)[None, :, None, None] + f[:, y1] * wy[None, :, None, None]
    out = rows[:, :, x0] * (1 - wx)[None, None, :, None] + rows[:, :, x1] * wx[None, None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def read_audio(
    path: str | os.PathLike,
    sample_rate: int = AUDIO_SAMPLE_RATE,
    duration: float | None = None,
) -> tuple[np.ndarray, bool]:
    """Whole audio track resampled to ``sample_rate`` mono -> (float32 ``[num_samples]``, has_audio).

    A file with a readable video but no audio stream returns zeros of ``round(duration *
    sample_rate)`` samples (``duration`` defaults to the video's frames / fps) and ``has_audio=False``.
    The decoded length includes the AAC encoder priming (a few hundred samples at 16 kHz). Missing or
    broken files raise :class:`UnreadableVideo`.
    """
    p = check_file(path)
    decord = _decord()
    try:
        with native_logs_filtered():
            ar = decord.AudioReader(p, ctx=decord.cpu(0), sample_rate=int(sample_rate), mono=True)
    except Exception as err:
        if "audio stream" not in str(err):
            raise UnreadableVideo(p, _reason(err)) from None
        if duration is None:
            duration = probe_video(p).duration  # raises UnreadableVideo if it is not a video either
        return np.zeros(int(round(duration * sample_rate)), np.float32), False
    try:
        with native_logs_filtered():
            wav = ar[:].asnumpy()  # [1, num_samples] float32 in [-1, 1]
    except Exception as err:
        raise UnreadableVideo(p, _reason(err)) from None
    finally:
        del ar
    return np.ascontiguousarray(wav.reshape(-1), dtype=np.float32), True
