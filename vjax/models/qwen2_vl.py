"""Qwen2-VL (Wang et al. 2024, arXiv 2409.12191): a ViT at native resolution (3-D patches of 2 frames
x 14 x 14, 2-D RoPE, block-diagonal attention per image / frame pair, 2x2 patch merger) feeding a
Qwen2 decoder with M-RoPE over (temporal, height, width).

    patches  = pack(images, videos)                         [N, 3*2*14*14]   (merge-block-major order)
    features = merger(ViT(patches, grid_thw))               [N / 4, D]       (PatchMerger: the model's, after the trunk)
    embeds   = embed(ids) with image/video pad tokens <- features (in order)
    pos      = rope_index(ids, grids)                       [3, B, L]        (original Qwen2-VL rule)
    logits   = Qwen2(embeds, M-RoPE(pos))

Source: spec_vit_family.md §5; the transformers ``Qwen2VLForConditionalGeneration`` is the reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vjax.layers.mlp import activation, dense
from vjax.layers.mrope import get_rope_index_jax
from vjax.layers.norm import LayerNorm
from vjax.layers.splice import splice_tokens
from vjax.models.decoder import CausalLM, DecoderConfig
from vjax.models.encoders import Encoder, EncoderConfig, qwen2_vl_vision_inputs
from vjax.models.spec import ModelSpec, Preprocess, Visual
from vjax.models.video_llm import VideoLLM


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    vision: EncoderConfig = EncoderConfig.tiny("qwen2_vl", out_dim=64)
    llm: DecoderConfig = DecoderConfig.tiny(arch="qwen2", attention_bias=True, mrope_section=(2, 3, 3),
                                            rope_theta=1e6, vocab_size=256)
    num_frames: int = 4
    image_size: int = 56  # frames are resized to image_size x image_size in the synthetic pipeline
    image_token_id: int = 10
    video_token_id: int = 11
    vision_start_token_id: int = 12
    max_visual_blocks: int | None = None  # None: sized from each call's grids (see get_rope_index_jax)
    frame_shape: tuple[int, int] | None = None  # (height, width) of native-resolution frames; None: image_size^2
    # The release's video preprocessing (transformers' Qwen2VLVideoProcessor; from_hf reads the checkpoint's
    # preprocessor files): smart_resize bounds per frame, and the frame choice (fps, frame-count bounds).
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 768
    image_min_pixels: int = 56 * 56  # the released preprocessor_config.json (images)
    image_max_pixels: int = 28 * 28 * 16384
    _nested_configs = {"vision": EncoderConfig, "llm": DecoderConfig}

    def __post_init__(self):
        if self.vision.out_dim != self.llm.hidden_size:
            raise ValueError(f"vision.out_dim={self.vision.out_dim} must equal llm.hidden_size={self.llm.hidden_size}")
        if self.frame_shape is not None:
            shape = tuple(int(x) for x in self.frame_shape)
            f = self.pixel_factor
            if len(shape) != 2 or any(x < f or x % f for x in shape):
                raise ValueError(f"frame_shape={self.frame_shape!r} must be (height, width), multiples of "
                                 f"patch_size x spatial_merge_size = {f}")
            object.__setattr__(self, "frame_shape", shape)
        if not 0 < self.video_min_pixels <= self.video_max_pixels:
            raise ValueError(f"video_min_pixels={self.video_min_pixels} and video_max_pixels={self.video_max_pixels} "
                             f"must satisfy 0 < min <= max")

    @property
    def pixel_factor(self) -> int:
        """Frame sides are multiples of ``patch_size * spatial_merge_size`` (28 for the releases)."""
        return self.vision.patch_size * self.vision.spatial_merge_size

    def replace(self, **kw) -> "Qwen2VLConfig":
        return dataclasses.replace(self, **kw)

    @property
    def placeholder_id(self) -> int:
        return self.video_token_id

    @property
    def video_grid(self) -> tuple[int, int, int]:
        """Patch grid ``(t, h, w)`` of a clip of ``num_frames`` frames of ``frame_shape`` (default ``image_size``
        square): ``t = ceil(num_frames / 2)``, as the reference pads an odd frame count by repeating the last
        frame (:func:`qwen2_vl_patchify`), ``h = height / patch``, ``w = width / patch``."""
        p, tp = self.vision.patch_size, self.vision.temporal_patch_size
        height, width = self.frame_shape or (self.image_size, self.image_size)
        return (max(1, -(-self.num_frames // tp)), height // p, width // p)

    @property
    def num_visual_tokens(self) -> int:
        """Tokens per clip ``t * h * w / 4`` (a 10 s 640x360 clip at 2 fps: 20 x 26 x 46 / 4 = 5980)."""
        t, h, w = self.video_grid
        return t * h * w // self.vision.spatial_merge_size**2

    @classmethod
    def tiny(cls, **kw) -> "Qwen2VLConfig":
        return cls(**kw)

    @classmethod
    def qwen2_vl_7b(cls, **kw) -> "Qwen2VLConfig":
        """Qwen2-VL-7B(-Instruct)."""
        base = dict(vision=EncoderConfig.qwen2_vl_vision(out_dim=3584),
                    llm=DecoderConfig.qwen2_7b(mrope_section=(16, 24, 24)), num_frames=16, image_size=448,
                    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652)
        return cls(**{**base, **kw})

    @classmethod
    def qwen2_vl_2b(cls, **kw) -> "Qwen2VLConfig":
        """Qwen2-VL-2B(-Instruct): Qwen2-1.5B LLM (tied embeddings)."""
        return cls.qwen2_vl_7b(**{"vision": EncoderConfig.qwen2_vl_vision(out_dim=1536),
                                  "llm": DecoderConfig.qwen2_1_5b(mrope_section=(16, 24, 24)), **kw})

    @classmethod
    def from_hf(cls, cfg: dict, **kw) -> "Qwen2VLConfig":
        """From a Qwen2-VL ``config.json`` (release layout: text keys at top level; transformers 5:
        ``text_config``), with its ``vision_config``; the preprocessing from the checkpoint's processor files
        when the reader put them under ``cfg["preprocessor_config"]`` / ``cfg["video_preprocessor_config"]``
        (:func:`preprocessing_from_hf`), else the release's defaults."""
        text = dict(cfg.get("text_config") or cfg)
        text.setdefault("architectures", ["Qwen2ForCausalLM"])
        text["architectures"] = ["Qwen2ForCausalLM"]
        if "rope_scaling" in cfg and "rope_parameters" not in text:
            text["rope_scaling"] = cfg["rope_scaling"]
        text.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
        llm = DecoderConfig.from_hf(text)
        v = cfg["vision_config"]
        width = v.get("embed_dim", 1280)
        vision = EncoderConfig.qwen2_vl_vision(
            width=width, depth=v.get("depth", 32), num_heads=v.get("num_heads", 16),
            mlp_dim=int(width * v.get("mlp_ratio", 4)), patch_size=v.get("patch_size", 14),
            temporal_patch_size=v.get("temporal_patch_size", 2), spatial_merge_size=v.get("spatial_merge_size", 2),
            in_channels=v.get("in_chans", v.get("in_channels", 3)), out_dim=v.get("hidden_size", llm.hidden_size))
        ids = dict(image_token_id=cfg.get("image_token_id", 151655), video_token_id=cfg.get("video_token_id", 151656),
                   vision_start_token_id=cfg.get("vision_start_token_id", 151652))
        pre = preprocessing_from_hf(cfg.get("preprocessor_config"), cfg.get("video_preprocessor_config"), vision)
        return cls(**{"vision": vision, "llm": llm, **ids, **pre, **kw})

    # "vision": the paper's stage 1 (the ViT and merger train, the LLM frozen); "llm": its stage 3
    STAGES = {"full": None, "llm": (r"^llm/",), "vision_merger": (r"^merger/", r"^llm/"),
              "vision": (r"^vision/", r"^merger/")}


def _pixels(d: dict, key: str, size_key: str) -> int | None:
    value = d.get(key, (d.get("size") or {}).get(size_key))
    if value is None:
        return None
    if not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"preprocessor config: {key}={value!r} must be a positive number of pixels")
    return int(value)


def preprocessing_from_hf(image: dict | None, video: dict | None, vision: EncoderConfig) -> dict:
    """``Qwen2VLConfig`` preprocessing fields from a checkpoint's ``preprocessor_config.json`` (``image``) and
    ``video_preprocessor_config.json`` (``video``; transformers' ``Qwen2VLVideoProcessor``), either may be
    ``None``. Images: ``min_pixels``/``max_pixels`` (or ``size.shortest_edge``/``longest_edge``). Videos: the
    same keys of the video file, ``fps``, ``min_frames``, ``max_frames``; without a video file the video
    processor's defaults (128·28² to 768·28² pixels per frame, 2 fps, 4-768 frames) stand, as in transformers.
    ``patch_size``, ``temporal_patch_size`` and ``merge_size`` must agree with the vision config."""
    out: dict = {}
    for name, d, prefix in (("preprocessor_config.json", image, "image"),
                            ("video_preprocessor_config.json", video, "video")):
        if not d:
            continue
        for key, cfg_value in (("patch_size", vision.patch_size), ("temporal_patch_size", vision.temporal_patch_size),
                               ("merge_size", vision.spatial_merge_size)):
            if key in d and int(d[key]) != cfg_value:
                raise ValueError(f"{name}: {key}={d[key]!r} disagrees with the vision config's {cfg_value}")
        for key, size_key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            value = _pixels(d, key, size_key)
            if value is not None:
                out[f"{prefix}_{key}"] = value
        if prefix == "video":
            for key, cast in (("fps", float), ("min_frames", int), ("max_frames", int)):
                if d.get(key) is not None:
                    out[f"video_{key}"] = cast(d[key])
    return out


def qwen2_vl_patchify(frames: jax.Array, patch: int = 14, temporal: int = 2, merge: int = 2) -> jax.Array:
    """``[T, H, W, C]`` normalised frames -> Qwen2-VL's flattened patches ``[t*h*w, C*temporal*patch*patch]``.

    Patch order is ``(t, h/m, w/m, m, m)`` (merge blocks contiguous), each patch flattened as
    ``(C, temporal, patch, patch)``: the layout of the reference image processor. ``T`` is padded to a
    multiple of ``temporal`` by repeating the last frame.
    """
    t, h, w, c = frames.shape
    if t % temporal:
        frames = jnp.concatenate([frames, jnp.repeat(frames[-1:], temporal - t % temporal, axis=0)])
        t = frames.shape[0]
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, gh // merge, merge, patch, gw // merge, merge, patch, c)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)  # [gt, gh/m, gw/m, m, m, C, temporal, p, p]
    return x.reshape(gt * gh * gw, c * temporal * patch * patch)


def _host_grid(grid: Any, name: str) -> np.ndarray:
    if isinstance(grid, jax.core.Tracer):
        raise TypeError(f"{name} must be a host array or tuple (static shapes), not a traced value; pass it "
                        f"as a tuple of (t, h, w) rows (generate treats tuples as static)")
    return np.asarray(grid, np.int64).reshape(-1, 3)


class PatchMerger(nn.Module):
    """Qwen2-VL ``merger``: ``ln_q`` per patch, concatenate ``m*m`` consecutive (= spatially adjacent, by the
    merge-block order) patches, then ``mlp_0 -> GELU -> mlp_2`` (``[N, D] -> [N / m^2, out]``)."""

    out_dim: int
    merge: int = 2
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        k = self.merge**2
        x = LayerNorm(self.eps, param_dtype=self.param_dtype, name="ln_q")(x)
        x = x.reshape(b, n // k, k * d)  # [B, N/4, 4D]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
        x = dense(k * d, ("embed", "mlp"), name="mlp_0", **kw)(x)
        x = activation("gelu")(x)
        return dense(self.out_dim, ("mlp", "embed"), name="mlp_2", **kw)(x)  # [B, N/4, out]


class Qwen2VL(VideoLLM):
    config: Qwen2VLConfig

    def setup(self):
        c = self.config
        self.vision = Encoder(c.vision)  # the ViT trunk (packed patches, 2-D RoPE)
        v = c.vision
        self.merger = PatchMerger(v.out_dim, v.spatial_merge_size, v.merger_eps, jnp.dtype(v.dtype),
                                  jnp.dtype(v.param_dtype))
        self.llm = CausalLM(c.llm)

    def _visual_inputs(self, batch: int, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                       video_grid_thw=None, frames=None, frame_mask=None) -> dict[str, tuple[Any, np.ndarray, int]]:
        """``{"image" | "video": (packed patches, host grid [n, 3], placeholder id)}`` of the given inputs;
        ``frames [B, T, H, W, 3]`` (one video per row, static grid) are patchified here."""
        c = self.config
        if frames is not None:
            pixel_values_videos = jax.vmap(lambda f: qwen2_vl_patchify(
                f, c.vision.patch_size, c.vision.temporal_patch_size, c.vision.spatial_merge_size))(frames)
            pixel_values_videos = pixel_values_videos.reshape(-1, pixel_values_videos.shape[-1])
            tp, p = c.vision.temporal_patch_size, c.vision.patch_size
            grid = (max(1, -(-frames.shape[1] // tp)), frames.shape[2] // p, frames.shape[3] // p)  # static shapes
            video_grid_thw = np.asarray([grid] * batch, np.int64)
        out = {}
        for name, pix, grid, token in (("image", pixel_values, image_grid_thw, c.image_token_id),
                                       ("video", pixel_values_videos, video_grid_thw, c.video_token_id)):
            if pix is not None:
                out[name] = (pix, _host_grid(grid, f"{name}_grid_thw"), token)
        return out

    def splice(self, embeds, input_ids, visual_tokens=None, **visual):
        """Images' and videos' merged patch features at their pad tokens, in order, across the batch.

        Visual inputs: packed image patches ``pixel_values [N_i, 1176]`` with host ``image_grid_thw``, the same
        for videos (``pixel_values_videos`` / ``video_grid_thw``), or a batch of clips ``frames
        [B, T, H, W, 3]`` (``frame_mask`` is accepted for the shared batch format: Qwen2-VL encodes every
        frame it is given)."""
        if visual_tokens is not None:
            raise ValueError("Qwen2-VL splices images and videos by kind: pass pixels (or frames), not visual_tokens")
        c = self.config
        b, l = input_ids.shape
        for pix, grid, token in self._visual_inputs(b, **visual).values():
            pos2d, seg = qwen2_vl_vision_inputs(grid, c.vision.spatial_merge_size)
            areas = set((grid[:, 1] * grid[:, 2]).tolist())  # equal h*w everywhere: attend per slice, unmasked
            slice_size = areas.pop() if len(areas) == 1 else None
            patches = self.vision(pix, positions=pos2d, segment_ids=seg, slice_size=slice_size).features  # [N, C]
            feats = self.merger(patches[None])[0]  # [N/4, D]
            flat = splice_tokens(embeds.reshape(1, b * l, -1), feats[None], (input_ids == token).reshape(1, b * l))
            embeds = flat.reshape(b, l, -1)
        return embeds, None

    def positions(self, input_ids, attention_mask, **visual):
        """M-RoPE ids of the original Qwen2-VL rule (``vjax.layers.mrope``) from the host grids."""
        c = self.config
        grids = {k: jnp.asarray(g, jnp.int32) for k, (_, g, _) in self._visual_inputs(input_ids.shape[0],
                                                                                      **visual).items()}
        if not grids:
            return None
        position_ids, _ = get_rope_index_jax(
            input_ids, grids.get("image"), grids.get("video"), attention_mask, image_token_id=c.image_token_id,
            video_token_id=c.video_token_id, vision_start_token_id=c.vision_start_token_id,
            spatial_merge_size=c.vision.spatial_merge_size, max_visual_blocks=c.max_visual_blocks)
        return position_ids

    def example_batch(self, batch: int = 2) -> dict[str, jax.Array]:
        c = self.config
        n = c.num_visual_tokens
        ids = jnp.concatenate([
            jnp.ones((batch, 1), jnp.int32), jnp.full((batch, 1), c.vision_start_token_id, jnp.int32),
            jnp.full((batch, n), c.video_token_id, jnp.int32), jnp.full((batch, 8), 5, jnp.int32)], axis=1)
        return {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
                "loss_mask": jnp.zeros_like(ids).at[:, -4:].set(1),
                "frames": jnp.zeros((batch, c.num_frames, *(c.frame_shape or (c.image_size,) * 2), 3), jnp.float32),
                "frame_mask": jnp.ones((batch, c.num_frames), bool)}


SPEC = ModelSpec(
    name="qwen2_vl", config=Qwen2VLConfig, module=Qwen2VL,
    template="qwen2_vl", visual=(Visual("video", "num_visual_tokens", id_field="video_token_id"),),
    stop_strings=("<|im_end|>",), sampler="fps_arange_floor", image_size="image_size", frame_shape="frame_shape",
    preprocess=Preprocess(
        resize="smart_resize", resampler="pil_bicubic", min_pixels="video_min_pixels", max_pixels="video_max_pixels",
        factor="pixel_factor", sampler_args={"sample_fps": "video_fps", "min_frames": "video_min_frames",
                                             "max_frames": "video_max_frames"},
        source="transformers Qwen2VLVideoProcessor: smart_resize, bicubic, frames at fps"),
    marker_tokens={"video_token_id": "<|video_pad|>", "image_token_id": "<|image_pad|>",
                   "vision_start_token_id": "<|vision_start|>"},
    conversion="vjax.convert.qwen2_vl", hf_architectures=("Qwen2VLForConditionalGeneration",),
    hf_model_types=("qwen2_vl",))
