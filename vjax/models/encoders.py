"""The vision and audio encoder towers of the seven video LLMs: one ViT (``vjax.layers.vit``), five configs.

| tower (``EncoderConfig.tower``) | used by | features returned (``EncoderOutput.features``) |
|---|---|---|
| ``clip``  OpenAI CLIP ViT-L/14 @224/@336 | Video-ChatGPT, Chat-UniVi | ``hidden_states[-2][:, 1:]`` ``[B, 256, 1024]`` (penultimate block, CLS dropped, no final LN) |
| ``eva``   EVA-CLIP ViT-g/14 of BLIP-2 + ``ln_vision`` | Video-LLaMA, MiniGPT4-video, MA-LMM | ``ln_vision(vit(x))`` ``[B, 257, 1408]`` (CLS kept) |
| ``eva2``  EVA2-CLIP-E of CogVLM2 | CogVLM2-Video | ``vit(x)[:, 1:]`` ``[B, 256, 1792]`` (CLS dropped; the model's adapter follows) |
| ``qwen2_vl`` Qwen2-VL ViT (3-D patches, 2-D RoPE, packed) | Qwen2-VL | ``[sum t*h*w, 1280]`` patch features (the model's merger follows) |
| ``imagebind_audio`` ImageBind-Huge audio trunk + head + x20 L2 norm | Video-LLaMA audio branch | ``[B, 1024]`` with norm 20 |

A tower is a trunk: what turns its features into LLM tokens (a projector, CogVLM2's conv + GLU adapter,
Qwen2-VL's patch merger) lives in the model that uses it.

Per-tower differences are switches of the one trunk (sources: the official code as read in
``spec_vit_family.md`` §1.1, §4.2, §5.3 and ``spec_qformer_family.md`` §1.1, §1.2, §2.1):

* CLIP: patch conv without bias, ``pre_layrnorm`` on [cls; patches] + positions, pre-LN blocks (eps 1e-5),
  quick_gelu; ``post_layernorm`` only on the pooled CLS (``EncoderOutput.pooled``).
* EVA-g: patch conv with bias, q/v bias without k bias, pre-LN eps 1e-6, exact GELU, 39 blocks, no final
  norm inside the ViT; then ``ln_vision`` (eps 1e-5) over all tokens.
* EVA2-CLIP-E: post-branch norms ``x + LN(Attn(x))``, fused qkv with bias, no final LN; CLS dropped
  (CogVLM2-Video's adapter: ``vjax.models.cogvlm2_video``).
* Qwen2-VL: Conv3d (2, 14, 14) without bias on pre-flattened patches, no cls/abs positions, 2-D RoPE
  (theta 1e4) on q/k, block-diagonal attention per image / temporal slice, LN eps 1e-6, quick_gelu (the
  patch merger: ``vjax.models.qwen2_vl``).
* ImageBind audio: 1-channel Conv2d kernel 16 stride 10 without bias on the ``[128 mel, 204 frames]``
  fbank, LayerNorm (1e-5) on the patch tokens, cls, learned positions; 12 pre-LN blocks (eps 1e-6) whose
  attention appends learned ``bias_k``/``bias_v``; head ``LN(1e-6) -> CLS -> Linear(no bias)``;
  post-processing ``20 * x / ||x||``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vjax.layers.attention import check_impl
from vjax.layers.mlp import dense
from vjax.layers.norm import LayerNorm
from vjax.layers.scan import check_remat_policy
from vjax.layers.vit import (
    ViT,
    grid_positions_2d,
    grid_segment_ids,
    l2_normalize,
    rope_2d_cos_sin,
    segment_structure,
)

TOWERS = ("clip", "eva", "eva2", "qwen2_vl", "imagebind_audio")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of one encoder tower (see the module docstring for what each switch means)."""

    tower: str = "clip"
    # input geometry
    image_size: int = 28  # images: square side; audio: mel bins (rows)
    image_width: int | None = None  # audio: target frames (columns); default = image_size
    patch_size: int = 14
    patch_stride: int | None = None
    temporal_patch_size: int | None = None  # Qwen2-VL: 2 (3-D patches)
    in_channels: int = 3
    # trunk
    width: int = 32
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 64
    act: str = "gelu"
    eps: float = 1e-6
    norm_position: str = "pre"
    qkv_bias: tuple[bool, bool, bool] = (True, True, True)
    bias_kv: bool = False
    patch_bias: bool = True
    cls_token: bool = True
    abs_pos: bool = True
    patch_norm: bool = False
    pre_norm: bool = False
    post_norm: bool = False  # EVA's ln_vision
    patch_norm_eps: float = 1e-5
    pre_norm_eps: float = 1e-5
    post_norm_eps: float = 1e-5
    rope_2d: bool = False
    rope_theta: float = 10000.0
    # feature selection and heads
    feature_layer: int = -1  # CLIP: -2 (index into hidden_states)
    drop_cls: bool = False
    pool_norm: bool = False  # CLIP post_layernorm on the CLS token
    out_dim: int | None = None  # LLM width of the model's eva2 adapter / qwen2_vl merger; ImageBind's 1024
    glu_dim: int | None = None  # eva2 GLU inner width (the LLM's intermediate_size)
    glu_eps: float = 1e-5
    spatial_merge_size: int = 2
    merger_eps: float = 1e-6
    head_eps: float = 1e-6
    logit_scale: float = 20.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "auto"  # vjax.layers.attention.attention: auto | xla | chunked | cudnn | splash
    scan_layers: bool = False  # one block scanned over the depth: trunk params `vit/blocks` [depth, ...]
    remat_policy: str = "none"  # vjax.layers.scan.REMAT_POLICIES, applied to every trunk block

    def __post_init__(self):
        check_impl(self.attention_impl)
        check_remat_policy(self.remat_policy)
        if self.tower not in TOWERS:
            raise ValueError(f"tower={self.tower!r} is not one of {TOWERS}")
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not a multiple of num_heads={self.num_heads}")
        if self.tower in ("eva2", "qwen2_vl", "imagebind_audio") and self.out_dim is None:
            raise ValueError(f"tower {self.tower!r} needs out_dim")

    def replace(self, **kw) -> "EncoderConfig":
        return dataclasses.replace(self, **kw)

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of a 2-D input of the configured size."""
        s = self.patch_stride or self.patch_size
        w = self.image_width or self.image_size
        return (self.image_size - self.patch_size) // s + 1, (w - self.patch_size) // s + 1

    @property
    def num_positions(self) -> int | None:
        if not self.abs_pos:
            return None
        return self.grid[0] * self.grid[1] + int(self.cls_token)

    # ---------------------------------------------------------------- published configurations
    @classmethod
    def clip_vit_l14_224(cls, **kw) -> "EncoderConfig":
        """``openai/clip-vit-large-patch14`` (Video-ChatGPT, Chat-UniVi): spec_vit_family §1.1."""
        base = dict(tower="clip", image_size=224, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096,
                    act="quick_gelu", eps=1e-5, patch_bias=False, pre_norm=True, pool_norm=True,
                    feature_layer=-2, drop_cls=True)
        return cls(**{**base, **kw})

    @classmethod
    def clip_vit_l14_336(cls, **kw) -> "EncoderConfig":
        """``openai/clip-vit-large-patch14-336`` (Chat-UniVi v1.5): 24x24 = 576 patches."""
        return cls.clip_vit_l14_224(**{"image_size": 336, **kw})

    @classmethod
    def eva_vit_g(cls, **kw) -> "EncoderConfig":
        """EVA-CLIP ViT-g/14 as in BLIP-2 (39 blocks) + ``ln_vision``: spec_qformer_family §1.1-1.2."""
        base = dict(tower="eva", image_size=224, patch_size=14, width=1408, depth=39, num_heads=16, mlp_dim=6144,
                    act="gelu", eps=1e-6, qkv_bias=(True, False, True), patch_bias=True, post_norm=True,
                    post_norm_eps=1e-5)
        return cls(**{**base, **kw})

    @classmethod
    def eva2_clip_e(cls, **kw) -> "EncoderConfig":
        """EVA2-CLIP-E of CogVLM2-Video (224 px, 63 layers) + conv + GLU to Llama-3-8B: spec_vit_family §4.2."""
        base = dict(tower="eva2", image_size=224, patch_size=14, width=1792, depth=63, num_heads=16, mlp_dim=15360,
                    act="gelu", eps=1e-6, norm_position="post_branch", patch_bias=True, drop_cls=True,
                    out_dim=4096, glu_dim=14336)
        return cls(**{**base, **kw})

    @classmethod
    def qwen2_vl_vision(cls, **kw) -> "EncoderConfig":
        """Qwen2-VL vision tower (all sizes; ``out_dim`` = LLM width, 3584 for 7B): spec_vit_family §5.3."""
        base = dict(tower="qwen2_vl", patch_size=14, temporal_patch_size=2, width=1280, depth=32, num_heads=16,
                    mlp_dim=5120, act="quick_gelu", eps=1e-6, patch_bias=False, cls_token=False, abs_pos=False,
                    rope_2d=True, out_dim=3584)
        return cls(**{**base, **kw})

    @classmethod
    def qwen2_vl_2b_vision(cls, **kw) -> "EncoderConfig":
        """Qwen2-VL-2B's vision tower (merger to 1536)."""
        return cls.qwen2_vl_vision(**{"out_dim": 1536, **kw})

    @classmethod
    def imagebind_audio_huge(cls, **kw) -> "EncoderConfig":
        """ImageBind-Huge audio encoder (Video-LLaMA's audio branch): spec_qformer_family §2.1."""
        base = dict(tower="imagebind_audio", image_size=128, image_width=204, patch_size=16, patch_stride=10,
                    in_channels=1, width=768, depth=12, num_heads=12, mlp_dim=3072, act="gelu", eps=1e-6,
                    bias_kv=True, patch_bias=False, patch_norm=True, patch_norm_eps=1e-5, out_dim=1024)
        return cls(**{**base, **kw})

    @classmethod
    def tiny(cls, tower: str = "clip", **kw) -> "EncoderConfig":
        """A 2-block, 32-wide version of ``tower`` that runs on a CPU in milliseconds."""
        small = dict(width=32, depth=2, num_heads=4, mlp_dim=64)
        published = {
            "clip": lambda: cls.clip_vit_l14_224(image_size=28, **small),
            "eva": lambda: cls.eva_vit_g(image_size=28, **small),
            "eva2": lambda: cls.eva2_clip_e(image_size=56, out_dim=48, glu_dim=96, **small),
            "qwen2_vl": lambda: cls.qwen2_vl_vision(out_dim=48, **small),
            "imagebind_audio": lambda: cls.imagebind_audio_huge(image_size=36, image_width=46, out_dim=24, **small),
        }
        if tower not in published:
            raise ValueError(f"tower={tower!r} is not one of {TOWERS}")
        return published[tower]().replace(**kw)


@flax.struct.dataclass
class EncoderOutput:
    """``features``: what the video model consumes (see the module table); ``last_hidden_state``: the
    trunk's last output (before ``ln_vision``/heads); ``pooled``: CLIP's post-LN CLS or ImageBind's
    pre-projection CLS; ``hidden_states``: trunk input + every block output run."""

    features: jax.Array
    last_hidden_state: jax.Array
    pooled: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] = ()


class Encoder(nn.Module):
    """One encoder tower; ``config.tower`` picks its final norm or head. Parameter tree: ``vit`` (the trunk)
    plus ``post_layernorm`` (clip), ``ln_vision`` (eva), ``head_norm``/``head_proj`` (imagebind_audio)."""

    config: EncoderConfig

    def example_inputs(self) -> dict[str, Any]:
        """Smallest inputs that create every parameter (used by ``vjax.pretrained.abstract_params``)."""
        c = self.config
        if c.tower == "qwen2_vl":
            m = c.spatial_merge_size
            n = c.in_channels * c.temporal_patch_size * c.patch_size**2
            return {"inputs": jnp.zeros((m * m, n), jnp.float32), "grid_thw": np.array([[1, m, m]])}
        return {"inputs": jnp.zeros((1, c.image_size, c.image_width or c.image_size, c.in_channels), jnp.float32)}

    def trunk(self) -> ViT:
        c = self.config
        return ViT(
            width=c.width, depth=c.depth, num_heads=c.num_heads, mlp_dim=c.mlp_dim, patch_size=c.patch_size,
            in_channels=c.in_channels, patch_stride=c.patch_stride, temporal_patch_size=c.temporal_patch_size,
            patch_bias=c.patch_bias, cls_token=c.cls_token, num_positions=c.num_positions, patch_norm=c.patch_norm,
            pre_norm=c.pre_norm, post_norm=False, eps=c.eps, patch_norm_eps=c.patch_norm_eps,
            pre_norm_eps=c.pre_norm_eps, norm_position=c.norm_position, act=c.act, qkv_bias=c.qkv_bias,
            bias_kv=c.bias_kv, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
            attention_impl=c.attention_impl, scan_layers=c.scan_layers, remat_policy=c.remat_policy, name="vit",
        )

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        grid_thw: np.ndarray | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        slice_size: int | None = None,
    ) -> EncoderOutput:
        """Encode a batch.

        Args:
          inputs: images ``[B, H, W, C]`` (channels-last, normalised) for clip/eva/eva2; the fbank
            ``[B, mel, frames]`` or ``[B, mel, frames, 1]`` for imagebind_audio; Qwen2-VL's packed
            flattened patches ``[N, C*T*P*P]`` (all images and videos of the batch, in order).
          grid_thw: Qwen2-VL only, host ``int [n, 3]`` grids of the packed items; or pass ``positions
            [N, 2]`` and ``segment_ids [N]`` (from :func:`qwen2_vl_vision_inputs`) to trace under ``jit``.
          slice_size: Qwen2-VL only: when every temporal slice of every item has this many patches
            (``h * w`` equal across items), attention runs per slice as a batch instead of one
            block-masked attention over all ``N`` patches (same result, ``N / slice_size`` times fewer
            attention FLOPs).
        """
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        if c.tower == "qwen2_vl":
            return self._qwen2_vl(inputs, grid_thw, positions, segment_ids, slice_size)
        if c.tower == "imagebind_audio" and inputs.ndim == 3:
            inputs = inputs[..., None]  # [B, mel, frames, 1]
        n_hidden = c.depth + 1
        layer = c.feature_layer % n_hidden
        out = self.trunk()(inputs, num_blocks=layer if c.tower == "clip" else None)
        hidden = out.hidden_states
        h = hidden[layer] if c.tower == "clip" else out.last  # [B, 1 + N, D]
        if c.tower == "clip":
            pooled = None
            if len(hidden) == n_hidden:  # the whole trunk ran (always at init)
                pooled = LayerNorm(c.post_norm_eps, param_dtype=pdt, name="post_layernorm")(out.last[:, 0])
            feats = h[:, 1:] if c.drop_cls else h
            return EncoderOutput(feats, out.last, pooled, hidden)
        if c.tower == "eva":
            feats = LayerNorm(c.post_norm_eps, param_dtype=pdt, name="ln_vision")(h) if c.post_norm else h
            return EncoderOutput(feats, h, None, hidden)
        if c.tower == "eva2":
            return EncoderOutput(h[:, 1:], h, None, hidden)  # [B, g*g, D]: the patch grid, row-major
        # imagebind_audio: head = LN -> CLS -> Linear (no bias); postprocessor = logit_scale * l2norm
        cls = LayerNorm(c.head_eps, param_dtype=pdt, name="head_norm")(h)[:, 0]  # [B, D]
        emb = dense(c.out_dim, ("embed", "mlp"), dtype=dt, param_dtype=pdt, name="head_proj")(cls)  # [B, out]
        feats = (c.logit_scale * l2_normalize(emb).astype(jnp.float32)).astype(emb.dtype)
        return EncoderOutput(feats, h, cls, hidden)

    def _qwen2_vl(self, inputs, grid_thw, positions, segment_ids, slice_size=None) -> EncoderOutput:
        c = self.config
        if positions is None or segment_ids is None:
            if grid_thw is None:
                raise ValueError("qwen2_vl needs grid_thw (host array) or positions and segment_ids")
            positions, segment_ids = qwen2_vl_vision_inputs(grid_thw, c.spatial_merge_size)
        positions, segment_ids = jnp.asarray(positions), jnp.asarray(segment_ids)
        if inputs.shape[0] != positions.shape[0]:
            raise ValueError(f"{inputs.shape[0]} patches but the grids describe {positions.shape[0]}")
        n = inputs.shape[0]
        if slice_size is not None:  # uniform slices: a batch of independent slices, no mask
            if n % slice_size:
                raise ValueError(f"{n} patches do not split into slices of {slice_size}")
            s = n // slice_size
            cos, sin = rope_2d_cos_sin(positions.reshape(s, slice_size, 2), c.width // c.num_heads, c.rope_theta)
            out = self.trunk()(inputs.reshape(s, slice_size, -1), cos=cos, sin=sin)  # [S, n/S, D]
            last = out.last.reshape(1, n, -1)
            hidden = tuple(h.reshape(1, n, -1) for h in out.hidden_states)
        else:
            cos, sin = rope_2d_cos_sin(positions[None], c.width // c.num_heads, c.rope_theta)  # [1, N, Dh]
            mask = segment_structure(segment_ids[None])  # block-diagonal; densified only by impl "xla"
            out = self.trunk()(inputs[None], cos=cos, sin=sin, mask=mask)
            last, hidden = out.last, out.hidden_states
        return EncoderOutput(last[0], last[0], None, hidden)  # [N, D] in merge-block order


def qwen2_vl_vision_inputs(grid_thw, merge: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Host-side ``(positions [N, 2], segment_ids [N])`` for packed Qwen2-VL items with ``grid_thw [n, 3]``."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    if (grid[:, 1:] % merge).any():
        raise ValueError(f"every grid h and w must be a multiple of spatial_merge_size={merge}: {grid.tolist()}")
    return grid_positions_2d(grid, merge), grid_segment_ids(grid)
