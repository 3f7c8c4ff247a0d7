"""One configurable Vision Transformer (Dosovitskiy et al. 2021): the trunk of every encoder tower.

    tokens = PatchEmbed(x)                        2-D conv (CLIP, EVA, EVA2-CLIP-E, ImageBind audio)
                                                  or 3-D conv on pre-flattened patches (Qwen2-VL)
    tokens = PatchNorm(tokens)                    ImageBind audio stem only
    h_0    = [cls ; tokens] + pos                 optional learned cls token and absolute positions
    h_0    = PreNorm(h_0)                         CLIP's ``pre_layrnorm`` only
    h_l    = Block(h_{l-1}),  l = 1 .. depth
    out    = PostNorm(h_depth)                    BLIP-2's ``ln_vision`` (optional)

Two block flavours (``norm_position``):

    "pre"          x = x + Attn(LN1(x));  x = x + MLP(LN2(x))         CLIP, EVA-g, ImageBind, Qwen2-VL
    "post_branch"  x = x + LN1(Attn(x));  x = x + LN2(MLP(x))         EVA2-CLIP-E as in CogVLM/CogVLM2

Attention switches: q/k/v bias as one bool or a triple (EVA-g: q and v bias, no k bias), learned
``bias_kv`` (ImageBind), 2-D rotary cos/sin (Qwen2-VL), and any boolean mask, e.g. the block-diagonal
mask of :func:`segment_mask` that keeps every image (or temporal slice of a video) to itself when
many are packed into one sequence (Qwen2-VL's ``cu_seqlens``).

Everything runs in ``dtype`` with LayerNorm and softmax in float32 (see ``norm.py``, ``attention.py``).
Images are channels-last ``[B, H, W, C]``; conv kernels are ``[*K, C_in, C_out]`` (torch transposed).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vjax.layers.attention import Attention
from vjax.layers.masks import StructuredMask
from vjax.layers.mlp import Mlp
from vjax.layers.norm import LayerNorm
from vjax.layers.partitioning import ACTIVATION, constrain
from vjax.layers.rope import rope_inv_freq
from vjax.layers.scan import checkpoint_policy, gradient_barrier, remat_block, resolve_remat, scan_block


# ----------------------------------------------------------------------------- plain functions
def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """Block-diagonal boolean mask ``[B, 1, L, L]`` from ``segment_ids [B, L]``.

    Token ``i`` may attend token ``j`` iff both carry the same id ``>= 0`` (``-1`` marks padding).
    This is the dense form of a ``cu_seqlens`` (FlashAttention varlen) layout.

    >>> import jax.numpy as jnp
    >>> segment_mask(jnp.array([[0, 0, 1]]))[0, 0].astype(int).tolist()
    [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    """
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    valid = segment_ids[:, :, None] >= 0
    return (same & valid)[:, None]


def segment_structure(segment_ids: jax.Array) -> StructuredMask:
    """The :class:`~vjax.layers.masks.StructuredMask` whose dense form is :func:`segment_mask` (same ids for
    queries and keys); memory-efficient attention kernels use it without building ``[L, L]``."""
    return StructuredMask(q_segment_ids=segment_ids, kv_segment_ids=segment_ids)


def grid_segment_ids(grid_thw: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """Segment id per patch for Qwen2-VL packing: every temporal slice of every item is one segment.

    ``grid_thw [n, 3]`` holds ``(t, h, w)`` patch grids (host NumPy; shapes are static). Equivalent to
    ``cu_seqlens = cumsum(repeat(h * w, t))``. Returns ``int32 [sum t*h*w]``.

    >>> grid_segment_ids([[1, 2, 2], [2, 2, 2]]).tolist()
    [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    """
    sizes = [int(h) * int(w) for t, h, w in np.asarray(grid_thw) for _ in range(int(t))]
    return np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)


def grid_positions_2d(grid_thw: np.ndarray | Sequence[Sequence[int]], merge: int = 2) -> np.ndarray:
    """(row, column) of every patch in Qwen2-VL's merge-block-major order: ``int32 [sum t*h*w, 2]``.

    Patches of an ``h x w`` grid are ordered ``(h/m, w/m, m, m)`` — the ``m x m`` patches that the
    merger fuses are adjacent — and the same 2-D positions repeat for every temporal slice ``t``
    (there is no temporal position inside the ViT). Qwen2-VL, ``Qwen2VisionTransformerPretrainedModel``.

    >>> grid_positions_2d([[1, 2, 4]]).tolist()
    [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    """
    out = []
    for t, h, w in np.asarray(grid_thw):
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # [h, w]

        def blocks(a):  # [h, w] -> [(h/m) (w/m) m m]
            return a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)

        pos = np.stack([blocks(hh), blocks(ww)], axis=-1)  # [h*w, 2]
        out.append(np.tile(pos, (int(t), 1)))
    return np.concatenate(out).astype(np.int32)


def rope_2d_cos_sin(positions: jax.Array, head_dim: int, theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """2-D vision RoPE tables ``[..., head_dim]`` from ``(row, col)`` positions ``[..., 2]``.

    A quarter of the head width rotates with the row, a quarter with the column (Qwen2-VL ViT):

        inv_freq[i] = theta ** (-2i / (head_dim/2)),   i < head_dim / 4
        angle       = [row * inv_freq ; col * inv_freq]            (head_dim / 2)
        cos, sin    = cos/sin([angle ; angle])                      (rotate-half layout)
    """
    if head_dim % 4:
        raise ValueError(f"2-D rope needs head_dim divisible by 4, got {head_dim}")
    inv = rope_inv_freq(head_dim // 2, theta)  # [head_dim / 4]
    pos = positions.astype(jnp.float32)
    angle = jnp.concatenate([pos[..., 0:1] * inv, pos[..., 1:2] * inv], axis=-1)  # [..., head_dim / 2]
    angle = jnp.concatenate([angle, angle], axis=-1)  # [..., head_dim]
    return jnp.cos(angle), jnp.sin(angle)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||_2, eps)`` (``torch.nn.functional.normalize``), in float32."""
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=axis, keepdims=True))
    return (x32 / jnp.maximum(norm, eps)).astype(x.dtype)


# ----------------------------------------------------------------------------- modules
class PatchEmbed(nn.Module):
    """Patch projection as a strided convolution.

    * 2-D (``temporal_patch_size=None``): ``x [B, H, W, C] -> [B, H' * W', D]`` (row-major grid),
      ``H' = (H - P) // stride + 1`` (stride defaults to ``P``; ImageBind audio uses 16/10).
    * 3-D (Qwen2-VL): ``x [B, N, C * T * P * P]``, each patch pre-flattened in ``(C, T, P, P)`` order by
      the processor, ``-> [B, N, D]``; a Conv3d with kernel = stride = ``(T, P, P)`` applied to a single
      patch is this contraction.
    Parameters ``kernel [*K, C, D]`` (torch ``weight [D, C, *K]``) and optional ``bias [D]``.
    """

    features: int
    patch_size: int
    in_channels: int = 3
    stride: int | None = None
    temporal_patch_size: int | None = None
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p, c = self.patch_size, self.in_channels
        window = (p, p) if self.temporal_patch_size is None else (self.temporal_patch_size, p, p)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None,) * len(window) + (None, "embed")),
            window + (c, self.features),
            self.param_dtype,
        ).astype(self.dtype)
        x = x.astype(self.dtype)
        if self.temporal_patch_size is None:
            s = self.stride or p
            y = jax.lax.conv_general_dilated(
                x, kernel, (s, s), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # [B, H', W', D]
            y = y.reshape(y.shape[0], -1, self.features)  # [B, H'W', D]
        else:
            t = self.temporal_patch_size
            b, n, _ = x.shape
            patches = x.reshape(b, n, c, t, p, p)  # [B, N, C, T, P, P]
            y = jnp.einsum("bnctij,tijcd->bnd", patches, kernel)  # [B, N, D]
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class ViTBlock(nn.Module):
    """One transformer block, ``norm1``/``attn``/``norm2``/``mlp``; see the module docstring."""

    width: int
    num_heads: int
    mlp_dim: int
    act: str = "gelu"
    eps: float = 1e-6
    norm_position: str = "pre"  # "pre" | "post_branch"
    qkv_bias: bool | tuple[bool, bool, bool] = True
    out_bias: bool = True
    mlp_bias: bool = True
    bias_kv: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"  # vjax.layers.attention.attention's impl

    @nn.compact
    def __call__(self, x, *, cos=None, sin=None, mask=None):  # [B, L, D] -> [B, L, D]
        if self.norm_position not in ("pre", "post_branch"):
            raise ValueError(f"norm_position must be 'pre' or 'post_branch', got {self.norm_position!r}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = Attention(num_heads=self.num_heads, num_kv_heads=self.num_heads,
                         head_dim=self.width // self.num_heads, qkv_bias=self.qkv_bias, out_bias=self.out_bias,
                         bias_kv=self.bias_kv, impl=self.attention_impl, name="attn", **kw)
        mlp = Mlp(self.width, self.mlp_dim, self.act, use_bias=self.mlp_bias, name="mlp", **kw)
        norm1 = LayerNorm(self.eps, param_dtype=self.param_dtype, name="norm1")
        norm2 = LayerNorm(self.eps, param_dtype=self.param_dtype, name="norm2")
        x = gradient_barrier(x)  # the residual gradient computed once per block (see vjax.layers.scan)
        if self.norm_position == "pre":
            x = x + attn(norm1(x), cos=cos, sin=sin, mask=mask)[0]
            x = x + mlp(norm2(x))
        else:
            x = x + norm1(attn(x, cos=cos, sin=sin, mask=mask)[0])
            x = x + norm2(mlp(x))
        return constrain(x, ACTIVATION)


class ScanViTBlock(ViTBlock):
    """:class:`ViTBlock` with the call ``nn.scan`` needs: ``(x, inputs) -> (x, x)``, ``inputs`` the keyword
    arguments every block shares (``cos``, ``sin``, ``mask``); the output is emitted for ``hidden_states``."""

    def __call__(self, x, inputs):
        x = super().__call__(x, **inputs)
        return x, x


@flax.struct.dataclass
class ViTOutput:
    """``last [B, L, D]``: after the last block run (and ``post_norm`` if any); ``hidden_states``:
    the input of block 1 followed by the output of every block run (transformers' convention)."""

    last: jax.Array
    hidden_states: tuple[jax.Array, ...]


class ViT(nn.Module):
    """The configurable ViT trunk (module docstring). Parameter names: ``patch_embed``, ``cls_token [D]``,
    ``pos_embed [num_positions, D]``, ``patch_norm``, ``pre_norm``, ``blocks_{i}``, ``post_norm``.

    ``scan_layers``: one block scanned over the depth, parameters ``blocks`` stacked ``[depth, ...]``
    (:mod:`vjax.layers.scan`). ``remat_policy``: a :data:`vjax.layers.scan.REMAT_POLICIES` name, applied to
    every block (to the scanned body with ``scan_layers``)."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    in_channels: int = 3
    patch_stride: int | None = None
    temporal_patch_size: int | None = None
    patch_bias: bool = True
    cls_token: bool = True
    num_positions: int | None = None  # learned absolute positions over [cls ; patches]
    patch_norm: bool = False
    pre_norm: bool = False
    post_norm: bool = False
    eps: float = 1e-6  # block LayerNorms
    patch_norm_eps: float = 1e-5
    pre_norm_eps: float = 1e-5
    post_norm_eps: float = 1e-5
    norm_position: str = "pre"
    act: str = "gelu"
    qkv_bias: bool | tuple[bool, bool, bool] = True
    out_bias: bool = True
    mlp_bias: bool = True
    bias_kv: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"  # vjax.layers.attention.attention's impl
    scan_layers: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        cos: jax.Array | None = None,
        sin: jax.Array | None = None,
        mask: jax.Array | None = None,
        num_blocks: int | None = None,
    ) -> ViTOutput:
        """``x``: images ``[B, H, W, C]`` (2-D) or flattened patches ``[B, N, C*T*P*P]`` (3-D).

        ``cos``/``sin [B, L, Dh]``: rotary tables; ``mask``: boolean, broadcastable to ``[B, 1, L, L]``, or a
        :class:`~vjax.layers.masks.StructuredMask` (e.g. :func:`segment_structure`).
        ``num_blocks``: run only the first blocks (e.g. CLIP's penultimate-layer features); every
        block's parameters are still created at ``init``. ``post_norm`` applies only after the last block.
        With ``scan_layers`` and ``num_blocks < depth`` the same block is scanned over the first ``num_blocks``
        slices of the stacked parameters (one parameter tree whatever ``num_blocks`` a call asks for).
        """
        pdt = self.param_dtype
        h = PatchEmbed(self.width, self.patch_size, self.in_channels, self.patch_stride, self.temporal_patch_size,
                       self.patch_bias, self.dtype, pdt, name="patch_embed")(x)  # [B, N, D]
        if self.patch_norm:
            h = LayerNorm(self.patch_norm_eps, param_dtype=pdt, name="patch_norm")(h)
        if self.cls_token:
            cls = self.param("cls_token", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                             (self.width,), pdt)
            cls = jnp.broadcast_to(cls.astype(h.dtype), (h.shape[0], 1, self.width))
            h = jnp.concatenate([cls, h], axis=1)  # [B, 1 + N, D]
        if self.num_positions is not None:
            if h.shape[1] != self.num_positions:
                raise ValueError(f"{h.shape[1]} tokens but {self.num_positions} learned positions: "
                                 f"the input must have the configured image size")
            pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                             (self.num_positions, self.width), pdt)
            h = h + pos.astype(h.dtype)[None]
        if self.pre_norm:
            h = LayerNorm(self.pre_norm_eps, param_dtype=pdt, name="pre_norm")(h)
        h = h.astype(self.dtype)
        n = self.depth if num_blocks is None or self.is_initializing() else num_blocks
        if not 0 <= n <= self.depth:
            raise ValueError(f"num_blocks={num_blocks} outside [0, {self.depth}]")
        args = (self.width, self.num_heads, self.mlp_dim, self.act, self.eps, self.norm_position, self.qkv_bias,
                self.out_bias, self.mlp_bias, self.bias_kv, self.dtype, pdt, self.attention_impl)
        policy = resolve_remat(False, self.remat_policy)
        if self.scan_layers:
            h0 = h
            h, stacked = self._scanned_blocks(h, args, policy, n, dict(cos=cos, sin=sin, mask=mask))
            hidden = [h0, *stacked]  # stacked: [n, B, L, D]
        else:
            hidden = [h]
            block = remat_block(ViTBlock, policy)
            for i in range(n):
                h = block(*args, name=f"blocks_{i}")(h, cos=cos, sin=sin, mask=mask)
                hidden.append(h)
        if self.post_norm and n == self.depth:
            h = LayerNorm(self.post_norm_eps, param_dtype=pdt, name="post_norm")(h)
        return ViTOutput(last=h, hidden_states=tuple(hidden))

    def _scanned_blocks(self, h, args, policy: str, n: int, inputs: dict) -> tuple[jax.Array, jax.Array]:
        """The first ``n`` blocks scanned: ``(h after block n, every block's output [n, B, L, D])``.

        All ``depth`` blocks run through the ``nn.scan`` module ``blocks`` (which creates the stacked
        parameters at ``init``); fewer run as a ``lax.scan`` of the same step over the first ``n`` slices of
        those parameters, rematerialised by the same policy."""
        if n == self.depth:
            step = remat_block(ScanViTBlock, policy, scanned=True)
            return scan_block(step, self.depth, in_axes=(nn.broadcast,))(*args, name="blocks")(h, inputs)
        stacked = nn.meta.unbox(self.variables["params"]["blocks"])  # leaves [depth, ...]
        first = jax.tree_util.tree_map(lambda p: p[:n], stacked)
        body = ScanViTBlock(*args)

        def one(x, params):
            return body.apply({"params": params}, x, inputs)

        if policy != "none":
            one = jax.checkpoint(one, policy=checkpoint_policy(policy), prevent_cse=False)
        return jax.lax.scan(one, h, first)
