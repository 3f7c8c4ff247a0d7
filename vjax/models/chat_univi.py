"""Chat-UniVi (Jin et al. 2023, arXiv 2311.08046): CLIP features merged into dynamic visual tokens by
DPC-KNN clustering, one linear projection, a Vicuna decoder.

    F = CLIP(frames)[-2][:, 1:]                          [B, T, N, C]
    image (T <= 2 real frames): per frame  L0 = merge(F, 64) -> L1 = merge(L0, 32) -> L2 = merge(L1, 16);
                    [f1: L0|L1|L2 | f2: ...]                          (112 tokens per frame)
    video (T >= 3): events = DPC-KNN over per-frame means (ceil(T/16) clusters, ordered by first frame);
                    per event and level l: merge the event's L_l tokens again to c_l; [e1: 64|32|16 | e2 ...]
    Z = mm_projector(tokens);  logits = LLaMA(splice(embed(ids), Z))

The clustering itself is ``vjax.layers.token_merge`` (spec_vit_family.md §3); it has no parameters.

As the release (``ChatUniVi/model/arch.py``), the path is chosen per clip by its *real* frame count: a clip of
1-2 frames padded to the batch's T is two images (224 tokens at the released size), not a video; a clip's
tokens (``E_b`` events or ``t_b`` frames) come first and the rest of the ``max_visual_tokens`` slots are
masked (``encode_masked``): the pipeline gives each clip ``visual_tokens_for(t_b)`` placeholders.

Density noise (``merge_noise``): the release adds ``torch.rand * 1e-6`` to every density. ``"none"`` (the
default) leaves it out: the output is a function of the video (reproducible eval and chat, no RNG to
thread), and equals the release's except where densities tie exactly — which happens where a clustering's
kNN size is 1, as in the temporal step for 17-48 frames (every frame's density is 1): there the release's
events are a random draw, and ``"none"`` orders the tie by frame (earlier frames denser), so events start
where the features jump. ``"release"`` draws the noise from the ``"merge"`` RNG stream (the trainer passes
one; without one, a fixed key, so inference stays reproducible).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vjax.layers.mlp import dense
from vjax.layers.token_merge import cluster_count, spatial_merge, video_merge

MERGE_NOISE = ("none", "release")
from vjax.models.decoder import CausalLM, DecoderConfig
from vjax.models.encoders import Encoder, EncoderConfig
from vjax.models.spec import ModelSpec, Preprocess, Visual
from vjax.models.video_llm import VideoLLM


@dataclasses.dataclass(frozen=True)
class ChatUniViConfig:
    vision: EncoderConfig = EncoderConfig.tiny("clip", image_size=56)
    llm: DecoderConfig = DecoderConfig.tiny()
    num_frames: int = 4
    spatial_ratios: tuple[float, ...] = (8, 4, 2)  # released: (64, 32, 16) clusters per level
    spatial_ks: tuple[int, ...] = (5, 3, 3)
    temporal_ratio: float = 1 / 16
    temporal_k: int = 5
    placeholder_id: int = 5  # <image> (IMAGE_TOKEN_INDEX in the release; any id works: it is replaced)
    merge_noise: str = "none"  # "none" | "release" (module docstring)
    _nested_configs = {"vision": EncoderConfig, "llm": DecoderConfig}

    def __post_init__(self):
        if self.merge_noise not in MERGE_NOISE:
            raise ValueError(f"merge_noise={self.merge_noise!r} is not one of {MERGE_NOISE}")

    def replace(self, **kw) -> "ChatUniViConfig":
        return dataclasses.replace(self, **kw)

    @property
    def tokens_per_event(self) -> int:
        return sum(int(r) for r in self.spatial_ratios)

    def visual_tokens_for(self, frames: int) -> int:
        """Tokens of a clip of ``frames`` real frames: ``sum(c_l)`` per frame for 1-2 frames (images), per
        event (``ceil(frames / 16)``) for 3 or more."""
        if frames <= 2:
            return max(frames, 0) * self.tokens_per_event
        return cluster_count(frames, self.temporal_ratio) * self.tokens_per_event

    @property
    def num_visual_tokens(self) -> int:
        """Tokens of a clip of ``num_frames`` real frames."""
        return self.visual_tokens_for(self.num_frames)

    @property
    def video_chatgpt_pooling_tokens(self) -> int:
        """What Video-ChatGPT's spatio-temporal pooling of the same features costs: ``T + patches`` (the paper's
        comparison: the same accuracy with fewer tokens)."""
        g = self.vision.grid
        return self.num_frames + g[0] * g[1]

    @property
    def max_visual_tokens(self) -> int:
        """Token slots of :meth:`ChatUniVi.encode_masked`: the most any clip of up to ``num_frames`` takes."""
        return max(self.visual_tokens_for(t) for t in range(self.num_frames + 1))

    @classmethod
    def tiny(cls, **kw) -> "ChatUniViConfig":
        return cls(**kw)

    @classmethod
    def chat_univi_7b(cls, **kw) -> "ChatUniViConfig":
        """Chat-UniVi-7B: CLIP ViT-L/14@224, Vicuna-7B v1.5, clusters (64, 32, 16), events ceil(T/16), 64 frames."""
        base = dict(vision=EncoderConfig.clip_vit_l14_224(), llm=DecoderConfig.llama2_7b(), num_frames=64,
                    spatial_ratios=(64, 32, 16), placeholder_id=32000)
        return cls(**{**base, **kw})

    @classmethod
    def chat_univi_13b(cls, **kw) -> "ChatUniViConfig":
        """Chat-UniVi-13B: Vicuna-13B v1.5."""
        return cls.chat_univi_7b(**{"llm": DecoderConfig.llama2_13b(), **kw})

    STAGES = {"pretrain": (r"^mm_projector/",), "finetune": (r"^mm_projector/", r"^llm/"), "full": None}


class ChatUniVi(VideoLLM):
    config: ChatUniViConfig

    def setup(self):
        c = self.config
        self.vision = Encoder(c.vision)
        self.mm_projector = dense(c.llm.hidden_size, ("mlp", "embed"), use_bias=True,
                                  dtype=jnp.dtype(c.llm.dtype), param_dtype=jnp.dtype(c.llm.param_dtype))
        self.llm = CausalLM(c.llm)

    def merge(self, feats: jax.Array, frame_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``[B, T, N, C]`` CLIP features -> ``(tokens [B, max_visual_tokens, C], token_mask [B, max_visual_tokens])``:
        each clip's tokens first (its 1-2 real frames as images, or its events), then masked slots."""
        c = self.config
        b, t, n, d = feats.shape
        valid = jnp.ones((b, t), bool) if frame_mask is None else jnp.asarray(frame_mask, bool)
        t_real = jnp.sum(valid, axis=1)  # [B]
        rng = None
        if c.merge_noise == "release":
            rng = self.make_rng("merge") if self.has_rng("merge") else jax.random.key(0)
        keys = (None, None) if rng is None else tuple(jax.random.split(rng))
        _, levels = spatial_merge(feats.reshape(b * t, n, d), c.spatial_ratios, c.spatial_ks, rng=keys[0])
        per_frame = jnp.concatenate(levels, axis=1).reshape(b, t, -1, d)  # [B, T, sum c_l, C]
        pe = per_frame.shape[2]
        # Images: the first (up to) two real frames, each [L0 | L1 | L2].
        first = jnp.argsort(~valid, axis=1, stable=True)[:, : min(t, 2)]  # [B, F]
        images = jnp.take_along_axis(per_frame, first[:, :, None, None], axis=1).reshape(b, -1, d)
        image_mask = jnp.repeat(jnp.arange(first.shape[1])[None, :] < t_real[:, None], pe, axis=1)
        if t <= 2:
            return images, image_mask
        video, video_mask, _ = video_merge(
            feats, frame_mask=valid, spatial_ratios=c.spatial_ratios, spatial_ks=c.spatial_ks,
            temporal_ratio=c.temporal_ratio, temporal_k=c.temporal_k, rng=keys[1], frame_levels=levels)
        slots = max(video.shape[1], images.shape[1])

        def fill(x, m):
            return (jnp.pad(x, ((0, 0), (0, slots - x.shape[1]), (0, 0))),
                    jnp.pad(m, ((0, 0), (0, slots - m.shape[1]))))

        (images, image_mask), (video, video_mask) = fill(images, image_mask), fill(video, video_mask)
        as_images = (t_real <= 2)[:, None]  # [B, 1]
        return jnp.where(as_images[..., None], images, video), jnp.where(as_images, image_mask, video_mask)

    def encode_masked(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``frames [B, T, H, W, 3]`` -> ``(tokens [B, max_visual_tokens, D], token_mask)`` (see :meth:`merge`)."""
        tokens, mask = self.merge(self.frame_features(frames), frame_mask)  # [B, M, C], [B, M]
        return self.mm_projector(tokens), mask  # [B, M, D]

    def encode(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        """All ``max_visual_tokens`` slots, masked ones included (use :meth:`encode_masked` for the mask)."""
        return self.encode_masked(frames, frame_mask)[0]


SPEC = ModelSpec(
    name="chat_univi", config=ChatUniViConfig, module=ChatUniVi,
    template="vicuna_v1", visual=(Visual("video", "visual_tokens_for"),),
    # _get_rawvideo_dec: decord frames -> PIL -> CLIPImageProcessor (no pad-to-square on the video path)
    preprocess=Preprocess("shortest_side", "pil_bicubic", crop=True,
                          source="Chat-UniVi: CLIPImageProcessor, shortest side bicubic + centre crop"),
    sampler="fps_stride", marker_tokens={"placeholder_id": "<image>"}, token_baseline="video_chatgpt_pooling_tokens",
    conversion="vjax.convert.chat_univi", hf_architectures=("ChatUniViLlamaForCausalLM",),
    hf_model_types=("ChatUniVi",))
