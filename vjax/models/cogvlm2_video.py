"""CogVLM2-Video (Hong et al. 2024, arXiv 2408.16500): EVA2-CLIP-E frames with a 2x2 conv + GLU
adapter (:class:`CogVLM2Adapter`, after the tower's trunk), each frame followed by its timestamp, CogVLM's
position ids, and a Llama-3 decoder.

    per frame:  V_t = [boi ; GLU(conv2x2(EVA2(frame_t))) ; eoi]       [66, D]   (224 px)
    sequence:   BOS, V_0, "0", V_1, "1", ..., V_{T-1}, "T-1", "Question: ... Answer:"
    positions:  build_position_ids(token types): boi p, all patches p+1, eoi p+2, timestamp p+3
    decoder:    ``llm.visual_experts=True``  — CogVLM's visual-expert layers in every decoder layer (the survey's
                form; separate q/k/v/o and MLP weights for vision tokens), trained end to end in ``tiny``;
                ``llm.visual_experts=False`` — plain Llama-3 (the released ``cogvlm2-video-llama3-chat`` has no
                experts: spec_vit_family.md §4.1), so its weights load.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vjax.layers.mlp import GatedMlp, activation, dense
from vjax.layers.norm import LayerNorm
from vjax.layers.partitioning import constrain
from vjax.layers.visual_expert import build_position_ids, vision_expert_mask
from vjax.models.decoder import CausalLM, DecoderConfig
from vjax.models.encoders import Encoder, EncoderConfig
from vjax.models.spec import ModelSpec, Preprocess, Visual
from vjax.models.video_llm import VideoLLM


@dataclasses.dataclass(frozen=True)
class CogVLM2VideoConfig:
    vision: EncoderConfig = EncoderConfig.tiny("eva2", out_dim=64, glu_dim=128)
    llm: DecoderConfig = DecoderConfig.tiny(rope_theta=500000.0, rms_norm_eps=1e-5, visual_experts=True)
    num_frames: int = 4
    placeholder_id: int = 6  # the pad id (128002) that marks vision slots in the release
    _nested_configs = {"vision": EncoderConfig, "llm": DecoderConfig}

    def __post_init__(self):
        if self.vision.out_dim != self.llm.hidden_size:
            raise ValueError(f"vision.out_dim={self.vision.out_dim} must equal llm.hidden_size={self.llm.hidden_size}")

    def replace(self, **kw) -> "CogVLM2VideoConfig":
        return dataclasses.replace(self, **kw)

    @property
    def tokens_per_frame(self) -> int:
        """``(grid / 2)^2 + 2`` (66 at 224 px: 64 patches + boi + eoi)."""
        g = self.vision.grid[0] // 2
        return g * g + 2

    @property
    def num_visual_tokens(self) -> int:
        """Vision tokens per clip (24 frames x 66 = 1584, plus one timestamp token per frame)."""
        return self.num_frames * self.tokens_per_frame

    @classmethod
    def tiny(cls, **kw) -> "CogVLM2VideoConfig":
        return cls(**kw)

    @classmethod
    def cogvlm2_video_llama3_chat(cls, **kw) -> "CogVLM2VideoConfig":
        """The released ``THUDM/cogvlm2-video-llama3-chat``: 24 frames, plain Llama-3-8B (no experts)."""
        base = dict(vision=EncoderConfig.eva2_clip_e(), llm=DecoderConfig.llama3_8b(
            max_position_embeddings=2048, eos_token_id=128001, pad_token_id=128002),
            num_frames=24, placeholder_id=128002)
        return cls(**{**base, **kw})

    @classmethod
    def cogvlm2_video_experts(cls, **kw) -> "CogVLM2VideoConfig":
        """The survey's form at the published size: visual experts in all 32 layers (CogVLM2-19B LM)."""
        base = cls.cogvlm2_video_llama3_chat()
        return cls.cogvlm2_video_llama3_chat(**{"llm": base.llm.replace(visual_experts=True), **kw})

    STAGES = {"full": None, "llm": (r"^llm/",), "adapter": (r"^adapter/",)}


class GluAdapter(nn.Module):
    """CogVLM2's ``linear_proj``: ``y = LN(linear_proj(x)); y = GELU(y); down(silu(gate(y)) * up(y))``."""

    hidden_size: int
    intermediate_size: int
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, N, D] -> [B, N, H]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = dense(self.hidden_size, ("embed", "mlp"), name="linear_proj", **kw)(x)  # [B, N, H]
        y = LayerNorm(self.eps, param_dtype=self.param_dtype, name="norm1")(y)
        y = activation("gelu")(y)
        # Batch-sharded, features replicated: without this pin, XLA's SPMD partitioner mis-partitions the
        # backward pass of this block on meshes that use all three axes (data, fsdp, tensor) — the
        # gradients of the whole EVA2 tower came out wrong (tests/train/test_sharded.py, cogvlm2 2x2x2).
        y = constrain(y, ("batch", None, None))
        return GatedMlp(self.hidden_size, self.intermediate_size, "silu", name="mlp", **kw)(y)


class CogVLM2Adapter(nn.Module):
    """CogVLM2's vision head after the EVA2 trunk (``visual.py``): the ``g x g`` patch grid (CLS dropped) is
    downsampled by a 2x2 stride-2 ``conv``, projected by :class:`GluAdapter` (``glu``) to the LLM width, and
    framed by learned ``boi`` / ``eoi``: ``[B, g*g, D] -> [B, (g/2)^2 + 2, H]``."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        b, _, d = x.shape
        g = c.grid[0]
        x = x.reshape(b, g, g, d)  # row-major grid
        x = nn.Conv(d, (2, 2), strides=(2, 2), padding="VALID", dtype=dt, param_dtype=pdt, name="conv",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                             (None, None, "embed", None)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(x)
        x = x.reshape(b, -1, d)  # [B, (g/2)^2, D]
        x = GluAdapter(c.out_dim, c.glu_dim, c.glu_eps, dt, pdt, name="glu")(x)  # [B, (g/2)^2, H]
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",))
        boi = self.param("boi", init, (c.out_dim,), pdt).astype(x.dtype)
        eoi = self.param("eoi", init, (c.out_dim,), pdt).astype(x.dtype)
        edge = lambda v: jnp.broadcast_to(v, (b, 1, c.out_dim))  # noqa: E731
        return jnp.concatenate([edge(boi), x, edge(eoi)], axis=1)  # [B, (g/2)^2 + 2, H]


class CogVLM2Video(VideoLLM):
    config: CogVLM2VideoConfig

    def setup(self):
        c = self.config
        self.vision = Encoder(c.vision)  # the EVA2-CLIP-E trunk
        self.adapter = CogVLM2Adapter(c.vision)
        self.llm = CausalLM(c.llm)  # llm.visual_experts: CogVLM's expert blocks (decoder.visual_expert_block)

    def encode(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        """``[B, T, H, W, 3]`` -> ``[B, T * 66, D]`` in frame order (padded frames are never referenced)."""
        feats = self.frame_features(frames)  # [B, T, g*g, C]
        b, t, n, d = feats.shape
        tokens = self.adapter(feats.reshape(b * t, n, d))  # [B*T, 66, D]
        return tokens.reshape(b, -1, tokens.shape[-1])

    def token_types(self, input_ids: jax.Array) -> jax.Array:
        """``[B, L]`` 1 on vision slots (the placeholder), 0 on text."""
        return (input_ids == self.config.placeholder_id).astype(jnp.int32)

    def positions(self, input_ids: jax.Array, attention_mask: jax.Array, **visual: Any) -> jax.Array:
        """CogVLM's ids (``build_position_ids``): a vision run shares one position."""
        return build_position_ids(self.token_types(input_ids), attention_mask)

    def llm_inputs(self, input_ids: jax.Array) -> dict[str, jax.Array]:
        """The routing of the visual-expert blocks (vision slots to the vision expert)."""
        if not self.config.llm.visual_experts:
            return {}
        return {"vision": vision_expert_mask(self.token_types(input_ids))}


SPEC = ModelSpec(
    name="cogvlm2_video", config=CogVLM2VideoConfig, module=CogVLM2Video,
    template="cogvlm2_video", visual=(Visual("frame", "tokens_per_frame"),),
    # normalise, pytorchvideo ShortSideScale (bilinear, no antialias), CenterCropVideo (offsets rounded)
    preprocess=Preprocess("shortest_side", "torch_bilinear", crop=True, crop_offset="round",
                          source="CogVLM2-Video: ShortSideScale bilinear + CenterCropVideo"),
    sampler="nearest_each_second", marker_tokens={"placeholder_id": "<|image_pad|>"},
    conversion="vjax.convert.cogvlm2_video", hf_architectures=("CogVLMVideoForCausalLM",))
