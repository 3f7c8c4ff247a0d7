"""A release's frame preprocessing, run on decoded frames: resize (square, shortest side, or Qwen2-VL's native
``smart_resize``), centre crop, and the release's resampler. What each model does is declared in its spec
(``vjax.models.spec.Preprocess``); this module only runs it.

    proc = FrameProcessor.for_model(model_spec, config)   # plain data, picklable (Grain workers)
    frames = read_frames(path, indices, size=proc.decode_size)   # native size, or S x S for decord
    frames = proc(frames)                                  # uint8 [T, h, w, 3], the release's pixels

Output sizes, with ``S`` the model's side:

* ``square``: ``(S, S)``;
* ``shortest_side``: short side ``S``, long side ``int(S * long / short)``; with ``crop`` then ``(S, S)`` from
  offset ``(H' - S) // 2`` (``floor``, transformers) or ``round((H' - S) / 2)`` (``round``, torchvision video);
* ``smart_resize``: ``sampling.smart_resize(H, W, factor, min_pixels, max_pixels)``: each side rounded to a
  multiple of ``factor``, scaled by ``sqrt(H W / max_pixels)`` (floored) or ``sqrt(min_pixels / (H W))``
  (ceiled) when the area leaves the bounds. With ``native=False`` (training's static batches) it is ``(S, S)``,
  or, with ``buckets``, the ``(height, width)`` bucket nearest the video's aspect (:func:`nearest_bucket`;
  training's static frame shapes, and chat and eval on a run trained so).

Resamplers (uint8 in, uint8 out):

* ``pil_bicubic``: ``PIL.Image.resize(..., BICUBIC)`` — Pillow's antialiased bicubic, what transformers' PIL
  processors, torchvision transforms on PIL images and LAVIS do;
* ``torch_nearest``: ``F.interpolate(mode="nearest")``: ``src = min(floor(dst * (in / out)), in - 1)`` in float32;
* ``torch_bilinear``: ``align_corners=False``, no antialias: ``src = max((dst + 0.5) * in / out - 0.5, 0)``,
  weights ``1 - frac``/``frac`` of ``floor(src)`` and ``min(floor(src) + 1, in - 1)``; rounded back to uint8 (a
  release that resizes normalised floats, CogVLM2-Video, differs by at most half a grey level);
* ``decord``: decord's scaler resizes on decode (``decode_size``); frames given at another size are resized
  bilinearly (``vjax.data.video.resize_frames``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from vjax.data import sampling
from vjax.data.video import resize_frames as bilinear_uint8


@dataclasses.dataclass(frozen=True)
class FrameProcessor:
    """One model's frame preprocessing with its numbers resolved (see the module docstring).

    ``resize``/``resampler``/``crop``/``crop_offset``: as ``Preprocess``; ``size``: ``S``; ``min_pixels``,
    ``max_pixels``, ``factor``: ``smart_resize``'s; ``native``: ``smart_resize`` follows each video (chat, eval)
    rather than giving ``S x S`` (training's static shapes); ``source``: where the rule comes from."""

    resize: str
    resampler: str
    size: int
    crop: bool = False
    crop_offset: str = "floor"
    min_pixels: int = 0
    max_pixels: int = 0
    factor: int = 0
    native: bool = True
    source: str = ""
    buckets: tuple[tuple[int, int], ...] = ()  # (height, width) frame shapes: the one nearest the video's aspect

    def __post_init__(self):
        if int(self.size) < 1:
            raise ValueError(f"FrameProcessor size must be a positive number of pixels, got {self.size!r}")
        buckets = tuple(tuple(int(x) for x in b) for b in self.buckets)
        if any(len(b) != 2 or min(b) < 1 for b in buckets):
            raise ValueError(f"FrameProcessor buckets must be (height, width) pairs in pixels, got {self.buckets!r}")
        object.__setattr__(self, "buckets", buckets)

    @classmethod
    def for_model(cls, model: Any, config: Any, *, native: bool = True, size: int | None = None,
                  buckets: tuple = ()) -> "FrameProcessor":
        """The processor a model's spec (``ModelSpec.preprocess``) declares, numbers read from ``config``;
        ``size`` overrides the side ``S`` (default: the spec's ``image_size`` of ``config``); ``buckets``: frame
        shapes of a native-resolution model trained on them."""
        pre = model.preprocess
        kw = {k: int(getattr(config, getattr(pre, k))) for k in ("min_pixels", "max_pixels", "factor")
              if getattr(pre, k)}
        return cls(resize=pre.resize, resampler=pre.resampler, size=int(size or model.frame_size(config)),
                   crop=pre.crop, crop_offset=pre.crop_offset, native=native, source=pre.source,
                   buckets=tuple(buckets) if pre.native else (), **kw)

    @property
    def is_native(self) -> bool:
        """The output size follows the video's (``smart_resize`` in chat and eval)."""
        return self.resize == "smart_resize" and self.native

    @property
    def per_video(self) -> bool:
        """The frame size depends on the video (native resolution, or frame-shape buckets): chat and eval then
        size the model per video."""
        return self.is_native or bool(self.buckets)

    @property
    def decode_size(self) -> tuple[int, int] | None:
        """``(S, S)`` for decord's resize-on-decode, else ``None`` (decode at the source resolution)."""
        return (self.size, self.size) if self.resampler == "decord" else None

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` after the resize, before any crop."""
        s = self.size
        if self.buckets:
            return self.buckets[nearest_bucket(height, width, self.buckets)]
        if self.resize == "square" or (self.resize == "smart_resize" and not self.native):
            return s, s
        if self.resize == "shortest_side":
            short, long = min(height, width), max(height, width)
            other = int(s * long / short)
            return (s, other) if height <= width else (other, s)
        return sampling.smart_resize(int(height), int(width), self.factor, self.min_pixels, self.max_pixels)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of the processed frames of a ``height x width`` video."""
        return (self.size, self.size) if self.crop else self.resized_size(height, width)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """uint8 ``[T, H, W, 3]`` decoded frames -> uint8 ``[T, h, w, 3]`` as the release feeds its model."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
        h, w = self.resized_size(frames.shape[1], frames.shape[2])
        if (h, w) != frames.shape[1:3]:
            frames = RESAMPLERS[self.resampler](frames, (h, w))
        if self.crop:
            frames = center_crop(frames, self.size, self.crop_offset)
        return frames

    def describe(self) -> str:
        """One line: what this processor does (chat and eval print it)."""
        if self.buckets:
            what = "the frame-shape bucket nearest the video's aspect of " + ", ".join(
                f"{w}x{h}" for h, w in self.buckets)
        elif self.is_native:
            what = (f"smart_resize at the video's aspect (multiples of {self.factor}, {self.min_pixels}-"
                    f"{self.max_pixels} pixels per frame)")
        elif self.resize == "shortest_side":
            what = f"shortest side to {self.size}" + (f", centre crop {self.size}x{self.size}" if self.crop else "")
        else:
            what = f"{self.size}x{self.size} (aspect not kept)"
        src = f" [{self.source}]" if self.source else ""
        return f"frames: {what}, {self.resampler} resampler{src}"


def nearest_bucket(height: int, width: int, buckets) -> int:
    """Index of the ``(h, w)`` bucket whose aspect ratio is nearest a ``height x width`` video's:
    ``argmin |log(h / w) - log(height / width)|``, the first on ties."""
    if not buckets:
        raise ValueError("no frame-shape buckets to choose from")
    aspect = math.log(height / width)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - aspect))


def center_crop(frames: np.ndarray, size: int, offset: str = "floor") -> np.ndarray:
    """``[T, H, W, C]`` -> ``[T, size, size, C]`` from the centre: top ``(H - size) // 2`` (``floor``) or
    ``round((H - size) / 2)`` (``round``, Python's half-to-even), the same for the left edge."""
    t, h, w, _ = frames.shape
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from frames of {h}x{w}")
    if offset == "round":
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    else:
        top, left = (h - size) // 2, (w - size) // 2
    return frames[:, top: top + size, left: left + size]


def pil_bicubic(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pillow's bicubic (antialiased when shrinking) per frame, uint8 ``[T, H, W, 3]`` -> ``[T, h, w, 3]``."""
    from PIL import Image  # noqa: PLC0415

    h, w = size
    return np.stack([np.asarray(Image.fromarray(f).resize((int(w), int(h)), Image.Resampling.BICUBIC))
                     for f in frames])


def torch_nearest(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``torch.nn.functional.interpolate(mode="nearest")``: ``src = min(floor(dst * float32(in / out)), in - 1)``."""
    def index(n_in: int, n_out: int) -> np.ndarray:
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)

    return frames[:, index(frames.shape[1], size[0])][:, :, index(frames.shape[2], size[1])]


def torch_bilinear(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``F.interpolate(mode="bilinear", align_corners=False)`` without antialias, rounded to uint8."""
    return bilinear_uint8(frames, size)


def decord_fallback(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Frames that decord did not resize on decode (given at another size): bilinear, as the readers' fallback."""
    return bilinear_uint8(frames, size)


RESAMPLERS = {"pil_bicubic": pil_bicubic, "torch_nearest": torch_nearest, "torch_bilinear": torch_bilinear,
              "decord": decord_fallback}
