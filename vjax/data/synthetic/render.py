"""Rendering a scene: frames, the beep track, the H.264/AAC mp4 and the SRT subtitles."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np

from vjax.data.synthetic.config import PALETTE, PITCHES, SHAPES, TEXTURE_STD
from vjax.data.synthetic.scene import _position, _visible


def _shape_mask(shape: str, cx: float, cy: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    if shape == "triangle":  # apex up, base at cy + r, base half-width r
        h = (yy - (cy - r)) / (2 * r)
        return (h >= 0) & (h <= 1) & (np.abs(xx - cx) <= r * h)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _drawn(scene: dict, t: float, yy: np.ndarray, xx: np.ndarray):
    """``(object, mask)`` of every object visible at ``t`` seconds, in drawing order (later ones on top)."""
    duration = scene["num_frames"] / scene["fps"]
    for obj in scene["objects"]:
        if _visible(obj, t):
            cx, cy = _position(obj, t, duration)
            yield obj, _shape_mask(obj["shape"], cx, cy, obj["radius"], yy, xx)


def render_frames(scene: dict, seed: int, indices=None) -> np.ndarray:
    """Frames of a scene -> uint8 ``[T, size, size, 3]``: noisy grey background + objects. ``indices``: only
    these frames (each with its own noise draw; the default, every frame, is what the set's videos hold)."""
    rng = np.random.default_rng(seed)
    n, size, fps = scene["num_frames"], scene["size"], scene["fps"]
    indices = range(n) if indices is None else [int(f) for f in indices]
    texture = 110.0 + rng.normal(0.0, scene.get("texture_std", TEXTURE_STD), (size, size, 1))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    frames = np.empty((len(indices), size, size, 3), np.uint8)
    for k, f in enumerate(indices):
        img = np.repeat(texture + rng.normal(0.0, 3.0, (size, size, 1)), 3, axis=2)
        for obj, mask in _drawn(scene, f / fps, yy, xx):
            img[mask] = PALETTE[obj["colour"]]
        frames[k] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def patch_labels(scene: dict, frame: int, grid: int, min_cover: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """What each cell of a ``grid x grid`` partition of frame ``frame`` shows: ``(colour, shape)`` ``int32
    [grid, grid]``, 1 + the index in ``PALETTE`` / ``SHAPES`` of the object covering the most of the cell (the one
    drawn on top where they overlap), 0 (background) where no object covers ``min_cover`` of it. ``size`` must be a
    multiple of ``grid``: the cells are a resized frame's patches (64 px in 8 x 8 cells = 56 px in 7-px patches)."""
    size = scene["size"]
    if size % grid:
        raise ValueError(f"a {size}-px frame does not split into {grid} x {grid} cells")
    cell = size // grid
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    owner = np.full((size, size), -1)
    objs = []
    for obj, mask in _drawn(scene, frame / scene["fps"], yy, xx):
        owner[mask] = len(objs)
        objs.append(obj)
    colour, shape = np.zeros((grid, grid), np.int32), np.zeros((grid, grid), np.int32)
    if objs:
        cover = np.stack([(owner == k) for k in range(len(objs))]).reshape(len(objs), grid, cell, grid, cell)
        cover = cover.mean(axis=(2, 4))  # [objects, grid, grid]
        best, top = cover.argmax(0), cover.max(0) >= min_cover
        colours = np.array([1 + list(PALETTE).index(o["colour"]) for o in objs])
        shapes = np.array([1 + SHAPES.index(o["shape"]) for o in objs])
        colour[top], shape[top] = colours[best[top]], shapes[best[top]]
    return colour, shape


def render_audio(scene: dict, sample_rate: int, seed: int) -> np.ndarray:
    """Audio of a scene -> float32 mono ``[round(duration * sample_rate)]``: faint noise + beeps."""
    rng = np.random.default_rng(seed)
    n = int(round(scene["num_frames"] / scene["fps"] * sample_rate))
    wav = rng.normal(0.0, 0.003, n)
    for b in scene["beeps"]:
        s = int(round(b["start_s"] * sample_rate))
        m = int(round(b["duration_s"] * sample_rate))
        t = np.arange(m) / sample_rate
        ramp = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)  # 10 ms fade in/out
        wav[s : s + m] += 0.5 * ramp[: n - s] * np.sin(2 * np.pi * PITCHES[b["pitch"]] * t)[: n - s]
    return wav.astype(np.float32)


def write_mp4(path: str, frames: np.ndarray, fps: int | float, audio: np.ndarray | None = None,
              sample_rate: int = 16_000, crf: int = 18) -> None:
    """Write uint8 ``[T, H, W, 3]`` frames as H.264 yuv420p (and float32 mono audio as AAC) with PyAV.

    Written to ``path + '.tmp'`` then renamed, so an interrupted run never leaves a half file.
    """
    import av

    tmp = path + ".tmp"
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(tmp, "w", format="mp4") as box:
        vs = box.add_stream("libx264", rate=rate, options={"crf": str(crf), "preset": "veryfast"})
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        vs.codec_context.thread_count = 1
        as_ = None
        if audio is not None:
            as_ = box.add_stream("aac", rate=sample_rate)
            as_.layout = "mono"
        for frame in frames:
            for pkt in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                box.mux(pkt)
        for pkt in vs.encode():
            box.mux(pkt)
        if as_ is not None:
            wav = np.asarray(audio, np.float32).reshape(1, -1)
            for k in range(0, wav.shape[1], 1024):
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav[:, k : k + 1024]), format="fltp",
                                                layout="mono")
                af.sample_rate, af.pts = sample_rate, k
                for pkt in as_.encode(af):
                    box.mux(pkt)
            for pkt in as_.encode():
                box.mux(pkt)
    os.replace(tmp, path)


def _srt_time(t: float) -> str:
    ms = int(round(t * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def write_srt(path: str, cues: list[tuple[float, float, str]]) -> None:
    """Write ``(start_s, end_s, text)`` cues as an SRT file."""
    lines = []
    for i, (s, e, text) in enumerate(cues, start=1):
        lines += [str(i), f"{_srt_time(s)} --> {_srt_time(e)}", text, ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
